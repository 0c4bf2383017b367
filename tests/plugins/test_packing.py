"""Bit packing against the spec's bit_layout (plugins/common.yaml), written out by hand for one case."""

import numpy as np
import pytest

from bdm.plugins import packing


def test_bit_layout_is_lsb_first_by_input_channel_with_unused_bits_zero():
    cin = 40
    latent = -np.ones((2, cin, 1, 1), np.float32)
    latent[0, [0, 5, 31, 32], 0, 0] = 0.5  # output 0: channels 0, 5, 31 in word 0 and channel 32 in word 1
    latent[1, 39, 0, 0] = 1e-30            # output 1: the last channel only (a tiny weight is still positive)
    packed = packing.pack_signs(latent)
    assert packed.dtype == np.int32 and packed.shape == (2, 1, 1, 2)
    assert packed[0, 0, 0].tolist() == [np.int32(np.uint32(1 | 1 << 5 | 1 << 31).view(np.int32)), 1]
    assert packed[1, 0, 0].tolist() == [0, 1 << 7]  # channels 40..63 do not exist: their bits stay 0


def test_taps_are_packed_in_row_major_order():
    latent = -np.ones((1, 1, 3, 3), np.float32)
    latent[0, 0, 0, 2] = 1.0  # tap (i=0, j=2)
    packed = packing.pack_signs(latent)
    assert packed.shape == (1, 3, 3, 1)
    assert np.argwhere(packed[0, :, :, 0] == 1).tolist() == [[0, 2]]


@pytest.mark.parametrize("cin", [1, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("k", [1, 3])
def test_unpack_inverts_pack(cin, k):
    latent = np.random.default_rng(cin * 10 + k).standard_normal((7, cin, k, k)).astype(np.float32)
    packed = packing.pack_signs(latent)
    assert packed.shape == (7, k, k, packing.words_per_tap(cin))
    np.testing.assert_array_equal(packing.unpack_signs(packed, cin), np.sign(latent))


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_exact_zero_weight_is_refused_with_its_location(zero):
    latent = np.ones((4, 8, 3, 3), np.float32)
    latent[2, 5, 1, 0] = zero
    latent[3, 0, 0, 0] = zero
    with pytest.raises(packing.ZeroWeightError, match=r"2 exact-zero.*\[2, 5, 1, 0\]") as error:
        packing.pack_signs(latent)
    assert error.value.zeros == packing.ZeroWeight(2, (2, 5, 1, 0))


@pytest.mark.parametrize("zero_sign", [1, -1])
def test_zero_sign_resolves_exact_zeros(zero_sign):
    latent = -np.ones((1, 3, 1, 1), np.float32)
    latent[0, 1, 0, 0] = 0.0
    signs = packing.unpack_signs(packing.pack_signs(latent, zero_sign=zero_sign), 3)
    assert signs[0, :, 0, 0].tolist() == [-1, zero_sign, -1]


def test_unpack_rejects_a_word_count_that_does_not_fit():
    with pytest.raises(ValueError, match="words per tap"):
        packing.unpack_signs(np.zeros((1, 1, 1, 2), np.int32), 32)
