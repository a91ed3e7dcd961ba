"""Storage accounting by hand and Huffman code lengths vs a worked example / entropy bounds."""

import math

import pytest
import torch
from torch import nn

from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.format_quantizers import TWNQuantizer
from qtrain.nn.uniform_quantizer import UniformQuantizer
from qtrain.quant.size import (
    entropy_bits,
    huffman_bits,
    huffman_code_lengths,
    model_huffman_bits,
    model_storage_bits,
)


def test_huffman_textbook_example():
    # Cormen et al., "Introduction to Algorithms", 16.3: a..f with frequencies (thousands)
    counts = {"a": 45, "b": 13, "c": 12, "d": 16, "e": 9, "f": 5}
    lengths = huffman_code_lengths(counts)
    assert lengths == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 4, "f": 4}
    assert sum(counts[s] * lengths[s] for s in counts) == 224
    assert sum(2.0 ** -v for v in lengths.values()) == 1.0  # complete prefix code (Kraft)


def test_huffman_single_symbol_and_zero_counts():
    assert huffman_code_lengths([0, 7, 0]) == {1: 1}
    assert huffman_bits(torch.zeros(10, dtype=torch.int32)) == 10


@pytest.mark.parametrize("seed", range(5))
def test_huffman_within_entropy_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.full((16,), 0.3)).sample()
    codes = torch.multinomial(p, 5000, replacement=True, generator=g)
    n = codes.numel()
    h, length = entropy_bits(codes) / n, huffman_bits(codes) / n
    assert h <= length + 1e-12 < h + 1
    lengths = huffman_code_lengths(torch.bincount(codes, minlength=16))
    assert sum(2.0 ** -v for v in lengths.values()) == pytest.approx(1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = QuantConv2d.from_float(
            nn.Conv2d(3, 4, 3, bias=False),
            UniformQuantizer(4, granularity="channel"),
            UniformQuantizer(8, observer="ema"),
        )
        self.bn = nn.BatchNorm2d(4)
        self.fc = QuantLinear.from_float(nn.Linear(4, 10), TWNQuantizer(2))
        self.head = nn.Linear(10, 2)
        self.tied = nn.Linear(10, 2)
        self.tied.weight = self.head.weight  # shared: counted once

    def forward(self, x):
        return self.head(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def test_model_storage_bits_by_hand():
    net = _Net()
    rep = model_storage_bits(net)
    # 4-bit codes + one fp32 scale per output channel + the input range (EMA min, max)
    conv = 108 * 4 + 4 * 32 + 2 * 32
    bn = 4 * 32 * 4 + 64  # weight, bias, running mean/var + int64 num_batches_tracked
    fc = 40 * 2 + 32 + 10 * 32  # ternary codes + alpha + fp32 bias
    head = 20 * 32 + 2 * 32
    tied = 2 * 32  # only its own bias: the weight is the head's
    rows = {r.name: r.bits for r in rep.layers}
    assert rows == {"conv": conv, "bn": bn, "fc": fc, "head": head, "tied": tied}
    assert rep.total_bits == conv + bn + fc + head + tied
    assert "total" in rep.table() and rep.compression > 1


def test_model_huffman_bits_replaces_dense_codes():
    net = _Net()
    dense = model_storage_bits(net)
    huff = model_huffman_bits(net)
    codes = net.conv.weight_quantizer.export_qparams(net.conv.weight)["codes"]
    rows_d = {r.name: r.bits for r in dense.layers}
    rows_h = {r.name: r.bits for r in huff.layers}
    assert rows_h["conv"] == rows_d["conv"] - 4 * 108 + huffman_bits(codes)
    tcodes = net.fc.weight_quantizer.codes(net.fc.weight)
    assert rows_h["fc"] == rows_d["fc"] - 2 * 40 + huffman_bits(tcodes)
    assert rows_h["head"] == rows_d["head"]
    assert math.isclose(huff.total_bits, sum(rows_h.values()))
