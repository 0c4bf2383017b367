"""Shared by the BinaryDM tests: the per-layer, attention, block and UNet goldens of shared/reference/binarydm, the
modules they were made with, built from each case's JSON and loaded from its state_dict, and the one-thread
fixture (a module that imports `one_thread` runs all its tests on one thread, without gradients)."""

import json

import numpy as np
import pytest
import torch

from bdm.export.binarydm.network import AttentionBlock, ResBlock, binarized_layers
from bdm.export.binarydm.layers import QuantizedQKVAttention, official_layer

LAYER_CASES = ["conv3x3_s1_order2", "conv3x3_s2_order2", "conv1x1_order1", "conv1d_qkv_order2", "linear_emb_order2",
               "conv3x3_s1_order2_a8"]
BLOCK_CASES = ["resblock_32to64_order2", "attnblock_64_order1"]
ATTENTION_CASE = "attention_core_legacy"
UNET_CASE = "unet_cifar_like_w32"
BOUND = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bit-exact comparisons need the official reduction order (the goldens were made with 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


def golden(bdm_ref, case):
    meta = json.loads((bdm_ref / f"{case}.json").read_text())
    state = torch.load(bdm_ref / f"{case}.pt", weights_only=True)
    arrays = {k: torch.from_numpy(v) for k, v in np.load(bdm_ref / f"{case}.npz").items()}
    return meta, state, arrays


@pytest.fixture(scope="module")
def unet_golden(bdm_ref):
    """(meta, state, arrays) of the official UNet golden."""
    return golden(bdm_ref, UNET_CASE)


def build_layer(meta, state):
    layer = official_layer(meta["official_class"], meta["constructor"], meta["act_quantizer"]["nbits"])
    layer.load_state_dict(state, strict=True)
    return layer


def build_case(bdm_ref, case):
    """(module, inputs, arrays) of any layer, attention or block case: module(*inputs) is the official call."""
    meta, state, arrays = golden(bdm_ref, case)
    bits = meta["act_quantizer"]["nbits"]
    c = meta["constructor"]
    if case in LAYER_CASES:
        return build_layer(meta, state), (arrays["x"],), arrays
    if case == ATTENTION_CASE:
        module = QuantizedQKVAttention(c["n_heads"], act_bits=bits)
        inputs = (arrays["x"],)
    elif meta["official_class"].endswith("ResBlock"):
        module = ResBlock(c["channels"], c["emb_channels"], c["out_channels"], bits)
        inputs = (arrays["x"], arrays["emb"])
    else:
        module = AttentionBlock(c["channels"], c["channels"] // c["num_head_channels"], bits)
        inputs = (arrays["x"],)
    module.load_state_dict(state, strict=True)
    for _, layer in binarized_layers(module):
        layer.configure(order=meta["order"])
    return module, inputs, arrays


def assert_within_bound(ours, official, what):
    err = float((ours - official).abs().max())
    bound = BOUND * float(official.abs().max())
    assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"
    return err / float(official.abs().max())
