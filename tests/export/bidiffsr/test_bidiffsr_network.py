"""The PyTorch BI-DiffSR network against the official goldens (../shared/reference/bi_diffsr).

Two modes (bdm.export.bidiffsr.config.MODES): "official" must reproduce the official outputs bit for bit
(1 thread, as the goldens were made); "deploy" (the default, the op spec's alpha*dot) must stay within
1e-5 * max|golden| unless a pre-sign value sits within rounding of 0, which the sign traces then show.
"""

import json

import numpy as np
import pytest
import torch

import bdm
from bdm.errors import BdmError
from bdm.export.bidiffsr.config import MODES
from bdm.export.bidiffsr.network import (BIConv, BIDiffSRUNet, biconvs, build_bidiffsr, first_sign_divergence,
                                         set_mode, sign_trace, timestep_group)
from bdm.plugins.spec import group_index

REL_BOUND = 1e-5  # README "Tolerances": max|ours - official| <= 1e-5 * max|official|


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The goldens were made with 1 thread; other thread counts change the fp32 summation order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(bi_ref):
    return bdm.load_model(bi_ref / "ckpt_small_x4.pth", config=bi_ref / "ckpt_small_x4.yml")


@pytest.fixture
def mode_model(model, request):
    set_mode(model, request.param)
    yield model
    set_mode(model, "deploy")


@pytest.fixture(scope="module")
def golden(bi_ref):
    arrays = dict(np.load(bi_ref / "net_golden.npz"))
    meta = json.loads((bi_ref / "net_golden.json").read_text())
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, meta


def _rel_err(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max())


TIMESTEPS = [1960, 1600, 1599, 1000, 800, 400, 399, 40, 0]


@pytest.mark.parametrize("mode_model", MODES, indirect=True)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_net_golden_every_timestep(mode_model, golden, t):
    arrays, _ = golden
    i = arrays["timesteps"].tolist().index(t)
    with torch.no_grad():
        y = mode_model(arrays["x"], arrays["c"], torch.tensor([[t]]))  # the official call: time [1,1]
    assert _rel_err(y, arrays["y"][i]) <= REL_BOUND
    if _is_official(mode_model):
        assert torch.equal(y, arrays["y"][i]), "official arithmetic must be bit-exact"


def _is_official(model):
    return next(m for _, m in biconvs(model)).binary_conv.mode == "official"


@pytest.mark.parametrize("mode_model", MODES, indirect=True)
def test_net_golden_mixed_timesteps(mode_model, golden):
    """time [[1500],[300]]: the group comes from sample 0 (3) for both samples, the embedding is per sample."""
    arrays, meta = golden
    assert meta["mixed_t_group"] == 3
    with torch.no_grad():
        y = mode_model(arrays["x"], arrays["c"], arrays["mixed_t"])
    assert _rel_err(y, arrays["y_mixed_t"]) <= REL_BOUND
    if _is_official(mode_model):
        assert torch.equal(y, arrays["y_mixed_t"])
    # per-sample embedding: sample 1 differs from running it at sample 0's timestep
    with torch.no_grad():
        y_same_t = mode_model(arrays["x"], arrays["c"], torch.tensor([[1500], [1500]]))
    assert torch.equal(y[0], y_same_t[0]) and not torch.allclose(y[1], y_same_t[1])


@pytest.mark.parametrize("mode_model", MODES, indirect=True)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_sign_counts_equal_official_traces(mode_model, golden, t):
    """Exact check: every BIConv, in execution order, sees the official group and the official numbers of
    +1 / -1 / 0 after the sign."""
    arrays, meta = golden
    _, rows = sign_trace(mode_model, arrays["x"], arrays["c"], torch.tensor([[t]]))
    reference = meta["traces"][str(t)]
    assert len(rows) == len(reference) == 56
    assert first_sign_divergence(rows, reference) is None


def test_posenc_and_temb_goldens(model, golden):
    arrays, _ = golden
    for t in TIMESTEPS:
        time = torch.tensor([t])
        with torch.no_grad():
            posenc = model.timestep_level_mlp[0](time)
            temb = model.timestep_level_mlp(time)
        torch.testing.assert_close(posenc, arrays[f"posenc_t{t}"], rtol=0, atol=1e-6)
        torch.testing.assert_close(temb, arrays[f"temb_t{t}"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode_model", MODES, indirect=True)
@pytest.mark.parametrize("name, max_flipped_steps", [("sampler_x4", 1), ("sampler_x2_pad", 0)])
def test_teacher_forcing(mode_model, bi_ref, name, max_flipped_steps):
    """The network on the stored x_in[i], cond_padded, t_i ([1,1] as in test()) reproduces eps[i].

    Official arithmetic: bit-exact on every saved step. Deploy arithmetic: within the bound except at steps
    where some pre-sign value lies within rounding of 0; each such step must show a sign divergence from the
    official-arithmetic run (measured: x4 step 9, first at downs.10.res_block.block2.conv, one element)."""
    data = {k: torch.from_numpy(v) for k, v in np.load(bi_ref / f"{name}.npz").items()}
    official = _is_official(mode_model)
    flipped = []
    for row, step in enumerate(data["saved_step_indices"].tolist()):
        x_in, time = data["x_in"][row], data["timesteps"][step].reshape(1, 1)
        with torch.no_grad():
            eps = mode_model(x_in, data["cond_padded"], time)
        if official:
            assert torch.equal(eps, data["eps"][row]), f"step {step} not bit-exact"
        elif _rel_err(eps, data["eps"][row]) > REL_BOUND:
            _, ours = sign_trace(mode_model, x_in, data["cond_padded"], time)
            set_mode(mode_model, "official")
            _, reference = sign_trace(mode_model, x_in, data["cond_padded"], time)
            set_mode(mode_model, "deploy")
            divergence = first_sign_divergence(ours, [r._asdict() for r in reference])
            assert divergence is not None, f"step {step}: eps off without any sign flip: a real mismatch"
            flipped.append((step, divergence[1].module))
    assert len(flipped) <= max_flipped_steps, flipped


@pytest.mark.parametrize("listing", ["keys_x4.json", "keys_x2.json"])
def test_released_config_has_the_official_keys(bi_ref, listing):
    reference = json.loads((bi_ref / listing).read_text())
    model = build_bidiffsr(device="meta")  # 51 M parameters: structure only, no allocation
    assert all(p.is_meta for p in model.parameters())
    state = model.state_dict()
    assert list(state) == list(reference["keys"])  # names and order
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in reference["keys"].items()}
    assert len(state) == reference["num_tensors"] == 1371 and not list(model.buffers())
    assert sum(v.numel() for v in state.values()) == reference["total_params"]
    binarized = sum(m.binary_conv.weight.numel() for _, m in biconvs(model))
    assert binarized == reference["binarized_params"]
    assert len(biconvs(model)) == 56


def test_reduced_config_has_the_small_checkpoint_keys(bi_ref):
    reference = json.loads((bi_ref / "ckpt_small_x4.json").read_text())["keys"]
    state = build_bidiffsr(bi_ref / "ckpt_small_x4.yml", device="meta").state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in reference["keys"].items()}
    assert list(state) == list(reference["keys"])
    assert sum(v.numel() for v in state.values()) == reference["total_params"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_one_trace_serves_every_timestep(model, golden):
    """Traced at t=1000 (group 2), run at t=100 (group 0): equals eager at t=100, so the group is not frozen."""
    arrays, _ = golden
    x, c = arrays["x"][:1], arrays["c"][:1]
    traced = torch.jit.trace(model, (x, c, torch.tensor([1000])), check_trace=False)
    with torch.no_grad():
        eager_100 = model(x, c, torch.tensor([100]))
        eager_1000 = model(x, c, torch.tensor([1000]))
        assert torch.equal(traced(x, c, torch.tensor([100])), eager_100)
        assert torch.equal(traced(x, c, torch.tensor([1000])), eager_1000)
    assert not torch.allclose(eager_100, eager_1000)


def test_timestep_group_is_the_spec_rule():
    for num_groups, total_steps in [(5, 2000), (3, 1000), (1, 10)]:
        for t0 in list(range(-3, total_steps + 3)):
            t = torch.tensor([t0, total_steps - 1 - t0])  # sample 1 never matters
            assert int(timestep_group(t, num_groups, total_steps)) == group_index(t0, num_groups, total_steps)
    g = timestep_group(torch.tensor([[1599], [0]]), 5, 2000)
    assert g.dtype == torch.int64 and g.dim() == 0 and int(g) == 3


def _numpy_biconv(x, tables, weight, g):
    """Independent float64 statement of the BIConv semantics (op spec): zero padding of the sign map."""
    s = np.sign(x + tables["threshold"][g][None, :, None, None])
    k = weight.shape[-1]
    p = k // 2
    s_pad = np.pad(s, ((0, 0), (0, 0), (p, p), (p, p)))
    h, w = x.shape[2:]
    dot = sum(np.einsum("nchw,oc->nohw", s_pad[:, :, i:i + h, j:j + w], np.sign(weight[:, :, i, j]))
              for i in range(k) for j in range(k))
    alpha = np.abs(weight).mean(axis=(1, 2, 3))
    z = alpha[None, :, None, None] * dot + tables["bias0"][g][None, :, None, None]
    prelu = np.where(z >= 0, z, tables["slope"][g][None, :, None, None] * z)
    return prelu + tables["bias1"][g][None, :, None, None] + x


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_biconv_matches_its_definition(kernel_size):
    torch.manual_seed(0)
    conv = BIConv(16, 16, kernel_size, num_groups=5, total_steps=2000)
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    x = torch.randn(2, 16, 6, 7)
    tables = {k: v.double().numpy() for k, v in conv.group_tables().items()}
    x[0, 3, 2, 2] = -conv.TaR["dynamic_move_1"].bias[0, 3, 0, 0].item()  # an exact 0 before the sign (t=500: group 1)
    for t in (0, 500, 1999):
        g = t // 400
        with torch.no_grad():
            y = conv(x, torch.tensor([t, 0]))
        reference = _numpy_biconv(x.double().numpy(), tables, conv.binary_conv.weight.detach().double().numpy(), g)
        np.testing.assert_allclose(y.numpy(), reference, rtol=1e-6, atol=1e-5)
    assert int((conv.sign_input(x, torch.tensor(1)) == 0).sum()) == 1


def test_biconv_exporter_contract(model):
    name, conv = biconvs(model)[0]
    assert name == "downs.1.res_block.block1.conv"
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.num_groups, conv.total_steps) == \
        (8, 8, 3, 5, 2000)
    tables = conv.group_tables()
    assert {k: tuple(v.shape) for k, v in tables.items()} == \
        {"threshold": (5, 8), "bias0": (5, 8), "slope": (5, 8), "bias1": (5, 8)}
    for g in range(5):
        relu = conv.TaA[f"dynamic_relu_{g}"]
        assert torch.equal(tables["threshold"][g], conv.TaR[f"dynamic_move_{g}"].bias.reshape(-1))
        assert torch.equal(tables["bias0"][g], relu.pr_bias0.bias.reshape(-1))
        assert torch.equal(tables["slope"][g], relu.pr_prelu.weight)
        assert torch.equal(tables["bias1"][g], relu.pr_bias1.bias.reshape(-1))
    alpha = conv.alpha()
    assert alpha.shape == (8,) and alpha.dtype == torch.float32
    assert torch.allclose(alpha, conv.binary_conv.weight.abs().mean(dim=(1, 2, 3)), rtol=0, atol=0)
    assert not any(t.requires_grad for t in tables.values()) and not alpha.requires_grad


def test_bad_inputs_fail_with_one_line(model, golden):
    arrays, _ = golden
    x, c = arrays["x"], arrays["c"]
    cases = [
        ((x[..., :44], c[..., :44], torch.tensor([5, 5])), "not a multiple of 8"),
        ((x, c, torch.tensor([5, 5, 5])), "t must be an int64 tensor of shape [N] or [N,1]"),
        ((x, c, torch.tensor([[5, 5]])), "t must be"),
        ((x, c[:, :2], torch.tensor([5])), "cond 3"),
        ((x, c[:1], torch.tensor([5])), "same N, H, W"),
    ]
    for args, message in cases:
        with pytest.raises(BdmError) as err:
            model(*args)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BdmError, match="mode 'exact' is unknown"):
        set_mode(model, "exact")


def test_model_is_in_eval_mode_and_dropout_is_identity(model, golden):
    arrays, _ = golden
    assert not model.training and isinstance(model, BIDiffSRUNet)
    with torch.no_grad():
        first = model(arrays["x"], arrays["c"], torch.tensor([7]))
        second = model(arrays["x"], arrays["c"], torch.tensor([7]))
    assert torch.equal(first, second)


def test_official_arithmetic_has_the_official_straight_through_gradients():
    """Training needs the official STEs: the activation sign passes ApproxSign's derivative max(0, 2 - 2|x|),
    the weights pass the gradient of clamp(W, -1, 1) (alpha and sign detached). The deploy arithmetic's
    torch.sign would pass nothing, so a model in it cannot learn its binary convs."""
    torch.manual_seed(0)
    conv = BIConv(4, 4, 3, num_groups=5, total_steps=2000)
    with torch.no_grad():
        conv.binary_conv.weight[0, 0, 0, 0] = 1.5  # outside the clamp: no gradient
    x = (torch.randn(1, 4, 6, 6) * 0.8).requires_grad_(True)
    t = torch.tensor([0])
    set_mode(conv, "official")
    upstream = torch.randn(1, 4, 6, 6)

    # Reference gradients from the official expressions themselves (ARCHITECTURE.md 3.1).
    shifted = x + conv.TaR["dynamic_move_0"].bias
    p = torch.where(shifted < -1, -torch.ones_like(shifted),
                    torch.where(shifted < 0, shifted * shifted + 2 * shifted,
                                torch.where(shifted < 1, -shifted * shifted + 2 * shifted, torch.ones_like(shifted))))
    sign_map = torch.sign(shifted).detach() - p.detach() + p
    w = conv.binary_conv.weight
    alpha = w.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
    w_eff = (alpha * torch.sign(w)).detach() - w.clamp(-1, 1).detach() + w.clamp(-1, 1)
    taa = conv.TaA["dynamic_relu_0"]
    y = torch.nn.functional.prelu(torch.nn.functional.conv2d(sign_map, w_eff, padding=1) + taa.pr_bias0.bias,
                                  taa.pr_prelu.weight) + taa.pr_bias1.bias + x
    want_x, want_w = torch.autograd.grad(y, (x, w), upstream)

    y_ours = conv(x, t)
    got_x, got_w = torch.autograd.grad(y_ours, (x, w), upstream)
    assert torch.allclose(y_ours, y, rtol=0, atol=1e-6)
    assert torch.allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert got_w[0, 0, 0, 0] == 0 and (got_w != 0).float().mean() > 0.5
    assert (got_x - upstream).abs().max() > 0.1  # the binary conv path passes gradient, not only the shortcut

    set_mode(conv, "deploy")
    deploy_x = torch.autograd.grad(conv(x, t), x, upstream)[0]
    assert torch.equal(deploy_x, upstream)  # sign passes nothing: only the identity shortcut
