"""`bdm inspect`: what an exported model holds. Op census, where the bytes go (packed sign bits, per-channel
scales, full-precision weights), the latent fp32 size the checkpoint needed for the same network, the packed
floor and the compression ratio. The packed inputs of each bdm op come from its family (registry.inspect_file)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np
import onnx

from bdm.contract import ModelMetadata, metadata_key
from bdm.export.base import functions
from bdm.plugins import spec
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class ModelSummary:
    path: Path
    file_bytes: int
    census: Dict[str, int]
    metadata: ModelMetadata
    binarized_params: int   # latent weights of the binary convs (Cout * Cin * k * k each)
    packed_bytes: int       # their packed sign bits as stored (INT32 words)
    scale_params: int       # per-output-channel alpha of the binary convs
    scale_bytes: int
    fp_params: int          # every other float weight: FP layers and the TaR/TaA group tables
    fp_bytes: int           # ... as stored (fp32 or fp16; the tables stay float32)
    other_bytes: int        # integer constants and the like
    sign_bits: int = 0      # bits of packed signs the network needs: binarized_params x bases (BinaryDM: 1 or 2)

    @property
    def latent_fp32_bytes(self) -> int:
        """What the checkpoint stores for the same network: every latent weight in fp32."""
        return 4 * (self.binarized_params + self.fp_params)

    @property
    def packed_floor_bytes(self) -> float:
        """Stored FP weights + one bit per binarized weight and basis + the per-channel scales."""
        return self.fp_bytes + (self.sign_bits or self.binarized_params) / 8 + self.scale_bytes

    @property
    def compression_ratio(self) -> float:
        return self.latent_fp32_bytes / self.file_bytes

    def lines(self):
        mb = 1e6
        recorded = {f: self.metadata.to_props().get(metadata_key(f)) for f in ("family", "dtype", "fused", "act_mode")}
        yield f"{self.path}: {self.file_bytes / mb:.2f} MB, " + ", ".join(
            f"{k}={v}" for k, v in sorted(recorded.items()) if v is not None)
        yield "op census: " + ", ".join(f"{op} {count}" for op, count in self.census.items())
        yield (f"binarized weights: {self.binarized_params:,} -> packed sign bits {self.packed_bytes / mb:.2f} MB "
               f"(latent fp32 {4 * self.binarized_params / mb:.2f} MB), alpha {self.scale_params:,} "
               f"({self.scale_bytes / mb:.3f} MB)")
        yield f"full-precision weights: {self.fp_params:,} ({self.fp_bytes / mb:.2f} MB as stored)"
        yield (f"packed floor {self.packed_floor_bytes / mb:.2f} MB; file {self.file_bytes / mb:.2f} MB "
               f"({100 * (self.file_bytes / self.packed_floor_bytes - 1):+.1f} %); latent fp32 "
               f"{self.latent_fp32_bytes / mb:.2f} MB; compression ratio {self.compression_ratio:.2f}x")


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def census(onnx_model: onnx.ModelProto) -> Dict[str, int]:
    """Node count per op type (custom ops as domain::op_type), most frequent first."""
    counts: Dict[str, int] = {}
    for node in onnx_model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(model: onnx.ModelProto, path, file_bytes: int, metadata: ModelMetadata,
              packed_inputs: Mapping[str, Tuple[str, str]]) -> ModelSummary:
    """packed_inputs: {bdm op: (packed sign-bit input, per-channel scale input)} (ModelFamily.packed_inputs)."""
    initializers = {i.name: i for i in model.graph.initializer}
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    packed, scales = set(), set()
    binarized = sign_bits = 0
    for node in model.graph.node:
        if node.domain == functions.DOMAIN and node.op_type in packed_inputs:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            taps = attributes["kernel_size"] ** attributes.get("spatial_dims", 2)
            binarized += attributes["out_channels"] * attributes["in_channels"] * taps
            sign_bits += attributes["out_channels"] * attributes["in_channels"] * taps * attributes.get("num_bases", 1)
            inputs = dict(zip(spec.input_names(node.op_type), node.input))
            weight, alpha = (inputs[name] for name in packed_inputs[node.op_type])
            packed.add(weight)
            scales.add(alpha)
    summary = ModelSummary(Path(path), file_bytes, census(model), metadata, binarized,
                           sum(_tensor_bytes(initializers[n]) for n in packed if n in initializers),
                           sum(int(np.prod(initializers[n].dims)) for n in scales if n in initializers),
                           sum(_tensor_bytes(initializers[n]) for n in scales if n in initializers), 0, 0, 0,
                           sign_bits)
    for tensor in [*(t for n, t in initializers.items() if n not in packed | scales), *constants]:
        if tensor.data_type in _FLOATS and int(np.prod(tensor.dims)) > 1:
            summary.fp_params += int(np.prod(tensor.dims))
            summary.fp_bytes += _tensor_bytes(tensor)
        else:
            summary.other_bytes += _tensor_bytes(tensor)
    return summary

