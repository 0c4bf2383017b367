"""PyTorch checkpoint -> ONNX with `bdm` ops, and back to PyTorch for validation: one subpackage per model family
(bidiffsr/, binarydm/), what they share (base/), and the registry that loading, export, validation and inspection
dispatch through."""
