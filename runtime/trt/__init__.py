"""The TensorRT backend, split on Polygraphy's pattern (import the module you need; only what calls
`environment.import_tensorrt` needs TensorRT):

- `profile`: optimisation-profile shapes (NxHxW texts, defaults per model layout, per-input shapes).
- `sidecar`: the engine's JSON sidecar (what it was built for, checked against this machine) and the engine cache.
- `environment`: this machine's TensorRT (version floor), GPU identity and bdm plugin library.
- `build`: `bdm build-engine` (ONNX file -> engine + sidecar, timing cache, cached engines reused).
- `runner`: `TrtRunner`, the backends.Runner of an engine (per-shape contexts and CUDA graphs; close / `with`).
"""
