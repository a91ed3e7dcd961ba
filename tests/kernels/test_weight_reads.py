"""Small-batch decode reads each packed weight once (issue 17, item 2).

Counted under Triton's interpreter: every masked load is intercepted and the addresses that
fall inside the packed weight tensor are tallied. For M = 1 the GEMV reads every int32 word
once; for 2 <= M <= 16 (LLM decoding batches) the GEMM's 16-row tile reads every word once for
all rows -- the GEMV path before this change read them M times -- and M = 17 takes two tiles.
The outputs are checked against the torch reference at every M.
"""

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from qtrain_kernels import (
    codebook_linear,
    codebook_linear_reference,
    lowbit_linear,
    lowbit_linear_reference,
    pack_codes,
)


class _WordReads:
    """Per address of ``t``: how many times a kernel loaded it (masked-off lanes excluded)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.lo, self.n, self.size = t.data_ptr(), t.numel(), t.element_size()
        self.counts = np.zeros(self.n, dtype=np.int64)

    def __enter__(self):
        self._orig = interpreter.InterpreterBuilder.create_masked_load
        counter = self

        def counted(builder, ptrs, mask, *args, **kwargs):
            addr = np.asarray(ptrs.data).astype(np.int64).ravel()
            on = np.asarray(mask.data).astype(bool).ravel() if mask is not None else True
            off = addr - counter.lo
            hit = on & (off >= 0) & (off < counter.n * counter.size)
            np.add.at(counter.counts, off[hit] // counter.size, 1)
            return counter._orig(builder, ptrs, mask, *args, **kwargs)

        interpreter.InterpreterBuilder.create_masked_load = counted
        return self

    def __exit__(self, *exc):
        interpreter.InterpreterBuilder.create_masked_load = self._orig


@pytest.mark.parametrize("m", list(range(1, 18)))
def test_lowbit_reads_each_word_once_per_16_rows(m):
    torch.manual_seed(m)
    n, k, bits, group = 24, 128, 4, 32
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    scales = torch.rand(n, k // group) + 0.5
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8)
    x = torch.randn(m, k)
    with _WordReads(packed) as reads:
        y = lowbit_linear(x, packed, scales, zeros, bits=bits, k=k)
    tiles = -(-m // 16)
    assert reads.counts.min() == reads.counts.max() == tiles, (m, np.unique(reads.counts))
    ref = lowbit_linear_reference(x, packed, scales, zeros, bits=bits, k=k)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 2, 8, 16, 17])
def test_codebook_reads_each_code_once_per_16_rows(m):
    torch.manual_seed(m)
    n, k, bs = 24, 128, 8
    codes = torch.randint(0, 16, (n, k // bs), dtype=torch.uint8)
    cents = torch.randn(16, bs)
    x = torch.randn(m, k)
    with _WordReads(codes) as reads:
        y = codebook_linear(x, codes, cents)
    assert reads.counts.min() == reads.counts.max() == -(-m // 16), (m, np.unique(reads.counts))
    torch.testing.assert_close(y, codebook_linear_reference(x, codes, cents), rtol=1e-4,
                               atol=1e-4)


def test_the_counter_sees_a_row_by_row_path():
    """The counter itself: the GEMV kernel forced at M = 4 (one program per row) reads every
    word four times -- what decoding paid before."""
    n, k = 16, 64
    packed = pack_codes(torch.randint(0, 16, (n, k), dtype=torch.int32), 4)
    scales = torch.rand(n, 1) + 0.5
    from qtrain_kernels import runtime

    old = runtime.GEMV_MAX_M
    runtime.GEMV_MAX_M = 8
    try:
        with _WordReads(packed) as reads:
            lowbit_linear(torch.randn(4, k), packed, scales, bits=4, k=k)
    finally:
        runtime.GEMV_MAX_M = old
    assert reads.counts.min() == reads.counts.max() == 4
