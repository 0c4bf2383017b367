"""Sign-0 weights, for every family: a binarized layer whose sign plane holds a 0 (an exact-zero latent weight, or for
a second basis an exact-zero residual W - s1*sign(W)) cannot be packed into one bit per weight. Each family lists its
sign planes (`SignSource`); this module finds their zeros, reports them with their location, refuses them, or moves
the latent weight to a chosen sign in the network itself, so that the PyTorch reference and the export agree."""

import math
from typing import Callable, Iterable, List, NamedTuple, Optional

import torch
from torch import nn

from bdm.errors import BdmError

_WHAT = {1: "exact-zero latent weights", 2: "exact-zero second-basis residuals W - s1*sign(W)"}


class SignSource(NamedTuple):
    """One sign plane of a binarized layer, as the layer computes it."""

    path: str               # the latent weight's parameter path, e.g. "ups.6.biconv2.binary_conv.weight"
    basis: int              # 1: sign(W); 2: sign(W - s1*sign(W))
    signs: torch.Tensor     # -1 / 0 / +1, the shape of the weight
    weight: torch.Tensor    # the latent weight parameter (what resolving moves)


class SignZero(NamedTuple):
    path: str
    basis: int
    index: tuple            # into the latent weight: (o, c, ...)


def find_sign_zeros(sources: Iterable[SignSource]) -> List[SignZero]:
    """Every sign 0 of `sources`, basis by basis in their order."""
    found = []
    for source in sources:
        with torch.no_grad():
            found += [SignZero(source.path, source.basis, tuple(int(i) for i in index))
                      for index in torch.nonzero(source.signs == 0)]
    return found


def describe(zeros: List[SignZero]) -> str:
    """'N sign-0 weights, which 1-bit packing cannot hold (first: ... at [o, c, ...] = [...], basis b)'."""
    first = zeros[0]
    return (f"{len(zeros)} sign-0 weights, which 1-bit packing cannot hold (first: {_WHAT[first.basis]} in "
            f"{first.path} at [o, c, ...] = {list(first.index)}, basis {first.basis})")


def refuse_sign_zeros(sign_sources: Callable[[nn.Module], Iterable[SignSource]], model: nn.Module, source: str):
    """BdmError naming the first sign-0 weight of `model`, if it has one (sign_sources: its family's)."""
    zeros = find_sign_zeros(sign_sources(model))
    if zeros:
        raise _refusal(zeros, source)


def resolve_sign_zeros(sign_sources: Callable[[nn.Module], Iterable[SignSource]], model: nn.Module,
                       zero_sign: Optional[int], source: str) -> int:
    """Refuse sign-0 weights (zero_sign None), or give them zero_sign by moving the latent weight in `model`: an
    exact-zero weight becomes zero_sign * the smallest normal float32 (alpha = mean|W| is unchanged), a weight whose
    residual is 0 moves one ulp towards zero_sign. The second basis is looked at once the first is settled (a zero
    latent weight is a zero of both). Returns how many sign-0 weights there were."""
    zeros = find_sign_zeros(sign_sources(model))
    if not zeros:
        return 0
    if zero_sign is None:
        raise _refusal(zeros, source)
    target = torch.tensor(zero_sign * math.inf)
    tiny = zero_sign * torch.finfo(torch.float32).tiny
    for basis in (1, 2):
        sources = [s for s in sign_sources(model) if s.basis == basis]
        weights = {s.path: s.weight for s in sources}
        with torch.no_grad():
            for zero in find_sign_zeros(sources):
                weight = weights[zero.path]
                weight[zero.index] = tiny if basis == 1 else torch.nextafter(weight[zero.index], target)
    remaining = find_sign_zeros(sign_sources(model))
    if remaining:
        raise BdmError(f"internal: {len(remaining)} sign-0 weights remain after --zero-weight-sign (first "
                       f"{remaining[0]})")
    return len(zeros)


def _refusal(zeros: List[SignZero], source: str) -> BdmError:
    return BdmError(f"{source}: {describe(zeros)}; pass --zero-weight-sign +1 or -1 to export them with that sign")
