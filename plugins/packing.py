"""Bit packing of binarized weights, exactly as `plugins/common.yaml` `bit_layout` says:

    packed[o, i, j, w] is an int32 word; its bit b (value 1 << b, LSB first) is the sign of input channel
    c = 32*w + b of tap (i, j) of output channel o: 1 = +1 (W > 0), 0 = -1 (W < 0); bits for c >= Cin are 0.

Latent weights are [Cout, Cin, k, k] (PyTorch conv layout); the packed array is [Cout, k, k, ceil(Cin/32)], so
one output pixel's taps read consecutive words. An exact-zero latent weight has sign 0, which one bit cannot
hold: packing refuses it unless `zero_sign` (+1 or -1) says which sign it gets.
"""

from typing import NamedTuple, Optional

import numpy as np

from bdm.plugins import spec

_LAYOUT = spec.common()["bit_layout"]
BITS_PER_WORD = int(_LAYOUT["bits_per_word"])
if _LAYOUT["word"] != "int32" or _LAYOUT["order"] != "lsb_first" or BITS_PER_WORD != 32:
    raise ImportError(f"bdm.plugins.packing implements int32 LSB-first words; common.yaml says {_LAYOUT}")

# The value of each bit position, as the unsigned word it sets.
_BIT_VALUES = np.left_shift(np.uint64(1), np.arange(BITS_PER_WORD, dtype=np.uint64))


class ZeroWeight(NamedTuple):
    """Where the exact zeros of one latent weight tensor are."""

    count: int
    first_index: tuple  # (o, c, i, j) in the latent [Cout, Cin, k, k] layout


class ZeroWeightError(ValueError):
    def __init__(self, zeros: ZeroWeight):
        super().__init__(f"{zeros.count} exact-zero latent weights (first at [o, c, i, j] = "
                         f"{list(zeros.first_index)}); sign(0) = 0 cannot be packed into one bit")
        self.zeros = zeros


def words_per_tap(in_channels: int) -> int:
    return -(-in_channels // BITS_PER_WORD)


def find_zeros(latent: np.ndarray) -> Optional[ZeroWeight]:
    zeros = np.asarray(latent) == 0  # -0.0 too
    if not zeros.any():
        return None
    return ZeroWeight(int(zeros.sum()), tuple(int(i) for i in np.argwhere(zeros)[0]))


def pack_signs(latent: np.ndarray, zero_sign: Optional[int] = None) -> np.ndarray:
    """Latent weights [Cout, Cin, k, k] (float) -> packed int32 [Cout, k, k, ceil(Cin/32)].

    zero_sign: None refuses exact zeros (ZeroWeightError); +1 or -1 packs them with that sign."""
    latent = np.asarray(latent)
    if latent.ndim != 4:
        raise ValueError(f"latent weights must be [Cout, Cin, k, k]; got shape {latent.shape}")
    if zero_sign not in (None, 1, -1):
        raise ValueError(f"zero_sign must be None, +1 or -1; got {zero_sign!r}")
    if zero_sign is None:
        zeros = find_zeros(latent)
        if zeros is not None:
            raise ZeroWeightError(zeros)
    positive = (latent > 0) | ((latent == 0) & (zero_sign == 1))
    cout, cin, k, _ = latent.shape
    words = words_per_tap(cin)
    bits = np.zeros((cout, k, k, words * BITS_PER_WORD), dtype=bool)
    bits[..., :cin] = positive.transpose(0, 2, 3, 1)
    bits = bits.reshape(cout, k, k, words, BITS_PER_WORD)
    # A sum of distinct powers of two is their bitwise OR; uint64 holds bit 31 without overflow, then the 32-bit
    # pattern is reinterpreted as int32 (a word with bit 31 set is negative).
    packed = (bits * _BIT_VALUES).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
    return packed.view(np.int32)


def unpack_signs(packed: np.ndarray, in_channels: int) -> np.ndarray:
    """Packed int32 [Cout, k, k, words] -> signs [Cout, Cin, k, k] as int8 (+1 / -1). Bits past in_channels
    are ignored, as the spec says."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.ndim != 4:
        raise ValueError(f"packed weights must be int32 [Cout, k, k, words]; got {packed.dtype} {packed.shape}")
    if packed.shape[-1] != words_per_tap(in_channels):
        raise ValueError(f"{packed.shape[-1]} words per tap do not fit {in_channels} input channels "
                         f"({words_per_tap(in_channels)} words)")
    words = packed.view(np.uint32).astype(np.uint64)[..., None]
    bits = (words & _BIT_VALUES) != 0  # [Cout, k, k, words, 32]
    cout, k = packed.shape[0], packed.shape[1]
    bits = bits.reshape(cout, k, k, -1)[..., :in_channels]
    return np.where(bits, 1, -1).astype(np.int8).transpose(0, 3, 1, 2)
