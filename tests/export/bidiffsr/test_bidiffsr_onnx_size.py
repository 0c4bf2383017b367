"""The released x4 network (random weights of the right shapes, made here): the fp32 file is within 5 % of the
packed floor (FP params x 4 bytes + binarized params / 8 + per-channel scales), the fp16 file halves the FP part
(the group tables stay float32 by the spec), and `bdm export` (with its validation) holds at most 8 copies of the
latent weights beyond the libraries it imports."""

import json
import subprocess
import sys

import pytest
import torch

from bdm.export import registry
from bdm.export.base.sign_zeros import resolve_sign_zeros
from bdm.export.bidiffsr import network as bidiffsr, onnx_export


@pytest.fixture(scope="module")
def released():
    """The released network, every parameter perturbed (distinct GroupNorm affines and group tables, as trained
    weights have); exact zeros, if the draw made any, resolved to +1."""
    torch.manual_seed(0)
    model = bidiffsr.build_bidiffsr(None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    resolve_sign_zeros(bidiffsr.sign_sources, model, 1, "random released model")
    return model


def summary_of(model, tmp_path, **kwargs):
    onnx_model = onnx_export.to_onnx(model, **kwargs)
    path = tmp_path / f"released_{kwargs.get('dtype', 'fp32')}.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    return registry.inspect_file(path)


def test_released_x4_file_sizes(released, tmp_path, capsys):
    binarized = sum(m.binary_conv.weight.numel() for _, m in bidiffsr.biconvs(released))
    fp_params = sum(p.numel() for p in released.parameters()) - binarized
    scales = sum(m.out_channels for _, m in bidiffsr.biconvs(released))
    assert (binarized, fp_params) == (48_211_968, 3_068_419)  # ARCHITECTURE.md §4
    floor = 4 * fp_params + binarized / 8 + 4 * scales
    fp32 = summary_of(released, tmp_path)
    fp16 = summary_of(released, tmp_path, dtype="fp16")
    tables = sum(4 * t.numel() for _, m in bidiffsr.biconvs(released) for t in m.group_tables().values())
    fp16_expected = (fp32.fp_bytes - tables) / 2 + tables
    with capsys.disabled():
        print(f"\n[released x4] latent fp32 {fp32.latent_fp32_bytes / 1e6:.2f} MB; packed floor {floor / 1e6:.2f} MB")
        print(f"  fp32 file {fp32.file_bytes / 1e6:.2f} MB = floor x {fp32.file_bytes / floor:.4f}, compression "
              f"{fp32.compression_ratio:.2f}x; FP part {fp32.fp_bytes / 1e6:.2f} MB, packed bits "
              f"{fp32.packed_bytes / 1e6:.2f} MB")
        print(f"  fp16 file {fp16.file_bytes / 1e6:.2f} MB, compression {fp16.compression_ratio:.2f}x; FP part "
              f"{fp16.fp_bytes / 1e6:.2f} MB = fp32 FP part x {fp16.fp_bytes / fp32.fp_bytes:.3f} (float32 tables "
              f"{tables / 1e6:.2f} MB)")
    assert fp32.binarized_params == binarized and fp32.packed_bytes == binarized // 8  # Cin % 32 == 0 here
    # plus a few constants: InstanceNormalization's unit scales / zero biases, the time embedding's frequencies
    assert 0 <= fp32.fp_params - fp_params <= 2000
    assert floor <= fp32.file_bytes <= 1.05 * floor
    assert fp16.fp_bytes == pytest.approx(fp16_expected, rel=0.01)
    assert fp16.file_bytes < 0.75 * fp32.file_bytes


def child_run(*args):
    """rc, seconds, stderr and peak RSS (KiB, getrusage) of a child process."""
    probe = ("import json, resource, subprocess, sys, time; start = time.time(); "
             "run = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rc': run.returncode, 'seconds': time.time() - start, 'stderr': run.stderr, "
             "'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    out = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_released_x4_export_memory(released, tmp_path, capsys):
    """The default `bdm export` (validation included) in a child process: what it holds beyond the libraries it
    imports (measured here, in a child importing the same) stays within a few copies of the latent weights."""
    ckpt, onnx = tmp_path / "released_x4.pth", tmp_path / "released_x4.onnx"
    torch.save({"params": released.state_dict()}, ckpt)
    result = child_run(sys.executable, "-m", "bdm.cli.main", "export", ckpt, onnx)
    libraries = child_run(sys.executable, "-c", "import torch, onnx, onnxruntime, polygraphy.comparator, bdm.cli.main, "
                                                "bdm.export.registry, bdm.export.bidiffsr.validate")
    latent_kb = 4 * sum(p.numel() for p in released.parameters()) / 1024
    with capsys.disabled():
        print(f"\n[released x4] bdm export (validated): {result['seconds']:.1f} s, peak RSS "
              f"{result['peak_kb'] / 2 ** 20:.2f} GiB ({libraries['peak_kb'] / 2 ** 20:.2f} GiB of it the imported "
              f"libraries; latent weights {latent_kb / 2 ** 20:.2f} GiB); {result['stderr'].strip().splitlines()[-1]}")
    assert result["rc"] == 0 and libraries["rc"] == 0, result["stderr"] + libraries["stderr"]
    assert result["peak_kb"] - libraries["peak_kb"] <= 8 * latent_kb
