"""Bit layout: hand-worked words, exact pack/unpack round trips (hypothesis), bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain_kernels.layout import (
    container_bits,
    dequantize_uniform,
    pack_bitplanes,
    pack_codes,
    unpack_bitplanes,
    unpack_codes,
)


def test_hand_worked_words():
    # 2-bit codes 1, 2, 3 -> 0b11_10_01 = 57 (element k at bits [2k, 2k+2), LSB first)
    assert pack_codes(torch.tensor([[1, 2, 3]]), 2).tolist() == [[57]]
    # 4-bit: 8 codes per word; code 15 at position 7 sets the sign bit of the int32
    w = pack_codes(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 15, 2]]), 4)
    assert w.tolist() == [[1 + (15 << 28) - 2**32, 2]]
    # 1-bit: 33 ones -> one full word (-1 as int32) and a word holding 1
    assert pack_codes(torch.ones(1, 33, dtype=torch.long), 1).tolist() == [[-1, 1]]
    # 8-bit: bytes little-endian
    assert pack_codes(torch.tensor([[1, 2, 3, 4]]), 8).tolist() == [[0x04030201]]


def test_container_bits():
    assert [container_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="bits=9"):
        container_bits(9)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    packed = pack_codes(codes, bits)
    e = 32 // container_bits(bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, -(-k // e))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(1, 8), k=st.integers(1, 70), seed=st.integers(0, 99))
def test_bitplanes_round_trip(bits, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (3, k), generator=g)
    planes = pack_bitplanes(codes, bits)
    assert planes.shape == (bits, 3, -(-k // 32))
    # plane p, word w, bit j = bit p of code[r, 32 w + j]
    p, r, j = bits - 1, 2, k - 1
    bit = (int(planes[p, r, j // 32]) & 0xFFFFFFFF) >> (j % 32) & 1
    assert bit == (int(codes[r, j]) >> p) & 1
    assert torch.equal(unpack_bitplanes(planes, k), codes)


def test_dequantize_uniform_matches_formula():
    u = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])
    s = torch.tensor([[0.5, 2.0]])
    z = torch.tensor([[1, 2]], dtype=torch.uint8)
    w = dequantize_uniform(pack_codes(u, 2), s, z, 2, 8)
    assert w.tolist() == [[-0.5, 0.0, 0.5, 1.0, 2.0, 0.0, -2.0, -4.0]]
    wb = dequantize_uniform(pack_codes(torch.tensor([[0, 1]]), 1), torch.tensor([[3.0]]), None,
                            1, 2, mode="binary")
    assert wb.tolist() == [[-3.0, 3.0]]


def test_bad_input():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.tensor([[1.0]]), 2)
    with pytest.raises(ValueError, match="K=40"):
        unpack_codes(torch.zeros(1, 1, dtype=torch.int32), 2, 40)
