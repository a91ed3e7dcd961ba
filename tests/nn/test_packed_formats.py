"""qtrain.nn.packed_formats: lut / float / value_aware layers against hand-worked values and
brute-force loops, float zero-points, the triton backend, and the packer's drift guard."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from qtrain.nn import packed_formats as PF
from qtrain.nn.calibrated_quantizer import ValueAwareQuantizer
from qtrain.nn.format_quantizers import DynamicFixedPointQuantizer, TTQQuantizer
from qtrain.nn.learned_quantizers import DSQQuantizer, PolinoDifferentiableQuantizer
from qtrain.nn.packed import PackedLinear


def test_lut_layer_per_tensor_and_per_row_tables():
    torch.manual_seed(0)
    codes = torch.randint(0, 3, (4, 37))  # 3 used entries of a 2-bit table
    table = torch.tensor([[-0.5, 0.0, 1.25]])
    p = PF.lut_layer(codes, table, 2, backend="torch")
    assert p.lut.shape == (1, 4) and p.lut[0, 3] == 0  # padded to 2^c entries
    want = torch.tensor([[table[0, int(c)] for c in row] for row in codes])
    assert torch.equal(p.dequantize(), want)
    rows = torch.randn(4, 8)  # one table per row, 3-bit codes in 4-bit containers
    codes = torch.randint(0, 8, (4, 37))
    p = PF.lut_layer(codes, rows, 3, backend="torch")
    want = torch.stack([rows[n, codes[n]] for n in range(4)])
    assert p.lut.shape == (4, 16) and torch.equal(p.dequantize(), want)


def test_s2fp8_decode_by_hand():
    # alpha = 2, beta = 1: Y = 4 -> |X| = 2^((log2 4 - 1) / 2) = sqrt(2); Y = -0.5 -> -2^-1
    vals = torch.tensor([[4.0, -0.5, 0.0, -0.0]]).to(torch.float8_e5m2)
    p = PF.float_layer(vals, 8, backend="torch", s2fp8=(2.0, 1.0))
    got = p.dequantize()
    assert got[0, 0].item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert got[0, 1].item() == pytest.approx(-0.5, rel=1e-6)
    assert got[0, 2:].tolist() == [0.0, 0.0]


def test_float_layer_scale_and_bad_dtype():
    q = torch.tensor([[3, -7, 32767]], dtype=torch.int16)
    p = PF.float_layer(q, 16, backend="torch", fscale=2.0**-10)
    assert p.dequantize().tolist() == [[3 / 1024, -7 / 1024, 32767 / 1024]]
    with pytest.raises(ValueError, match="float format"):
        PF.float_layer(torch.zeros(2, 3, dtype=torch.float64), 64)


def test_value_aware_decode_is_dense_plus_outliers():
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    w[2, 7], w[5, 49] = 40.0, -35.0
    q = ValueAwareQuantizer(4, 0.01)  # ceil(3) outliers: the two above and the next largest
    p = PF.pack_weight(w, q, "w", scale_dtype=torch.float32)
    assert p.fmt == "value_aware" and p.sp_values.numel() == 3
    assert p.sp_index.shape == (9, 1, 1)  # ceil(log2 300) = 9 bit planes
    dense = PackedLinear.dequantize(PackedLinear._new(50, 6, "uniform", 4, None, True, "torch",
                                                      None, packed=p.packed, scales=p.scales))
    idx = torch.topk(w.abs().flatten(), 3).indices
    want = dense.clone()
    for i in idx.tolist():  # brute force: outliers keep their float value
        want[i // 50, i % 50] = w[i // 50, i % 50]
    assert torch.equal(p.dequantize(), want)
    assert torch.equal(p.dequantize(), q(w))


def test_from_qparams_zero_point_dtypes():
    codes = torch.randint(0, 16, (3, 8))
    for zp, dtype in ((7, torch.uint8), (7.5, torch.float16), (-2.0, torch.float16),
                      (300.0, torch.float16)):
        p = PackedLinear.from_qparams(codes, 0.1, zp, 4, False, None, 8, backend="torch")
        assert p.zeros.dtype == dtype
        torch.testing.assert_close(p.dequantize(), (codes - zp) * 0.1, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make", [TTQQuantizer,
                                  lambda: PolinoDifferentiableQuantizer(4, bucket_size=None),
                                  lambda: DSQQuantizer(3), lambda: DynamicFixedPointQuantizer(4)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_triton_backend_matches_torch(make, scale_dtype):
    """lut mode and float zero-points through the Triton kernel (interpreter on CPU)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 10)
    p = PF.pack_weight(lin.weight, make(), "lin", lin.bias, "triton", scale_dtype)
    x = torch.randn(2, 3, 96)
    yt = p(x)
    p.backend = "torch"
    torch.testing.assert_close(yt, p(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yt, x @ p.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)


def test_packer_guard_catches_a_drifting_computation(monkeypatch):
    def wrong(wq, w, flat, bias, backend, scale_dtype):  # W_p and W_n swapped
        u = (flat > 0.05 * flat.abs().max()).long() - (flat < -0.05 * flat.abs().max()).long()
        lut = torch.stack([-wq.w_p.detach(), torch.tensor(0.0), wq.w_n.detach()]).reshape(1, 3)
        return PF.lut_layer(u + 1, lut, 2, bias, backend), None

    torch.manual_seed(0)
    lin = nn.Linear(32, 4)
    q = TTQQuantizer()
    PF.pack_weight(lin.weight, q, "lin")  # right: no error (and initialises w_p, w_n)
    q.w_p.data.fill_(0.3)
    monkeypatch.setitem(PF.PACKERS, TTQQuantizer,
                        dataclasses.replace(PF.PACKERS[TTQQuantizer], weight=wrong))
    with pytest.raises(ValueError, match=r"lin \(TTQQuantizer\): packed weight differs"):
        PF.pack_weight(lin.weight, q, "lin")
