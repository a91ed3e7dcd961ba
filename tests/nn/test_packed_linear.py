"""PackedLinear: values vs the fake-quant math / paper formulas; triton == torch backend."""

import pytest
import torch
from torch import nn

from qtrain.nn.packed import PackedLinear
from qtrain.quant import uniform as U


@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(64, 19)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_from_linear_equals_fake_quant(lin, bits, symmetric):
    p = PackedLinear.from_linear(lin, bits, 32, symmetric, "torch", scale_dtype=torch.float32)
    ref = U.fake_quantize_tensor(lin.weight.detach(), bits, symmetric, "group", group_size=32)
    assert torch.equal(p.dequantize(), ref)
    x = torch.randn(3, 64)
    torch.testing.assert_close(p(x), x @ ref.t() + lin.bias.detach())
    assert lin.weight.requires_grad  # the float layer is untouched


def test_per_channel_and_storage_bits(lin):
    p = PackedLinear.from_linear(lin, 4, None, False, "torch")
    ref = U.fake_quantize_tensor(lin.weight.detach(), 4, False, "channel")
    assert (p.dequantize() - ref).abs().max() < 1e-3 * ref.abs().max()  # fp16 scales
    # 19 rows x 8 words x 32 bits + 19 fp16 scales + 19 uint8 zeros + 19 fp32 bias
    assert p.storage_bits() == 19 * 8 * 32 + 19 * 16 + 19 * 8 + 19 * 32


@pytest.mark.parametrize("ctor", ["from_linear", "from_linear_ternary", "from_linear_binary",
                                  "from_linear_w8a8"])
def test_triton_backend_matches_torch(ctor):
    torch.manual_seed(1)
    lin = nn.Linear(128, 19)  # default group_size=128
    make = getattr(PackedLinear, ctor)
    x = torch.randn(2, 3, 128)
    yt = make(lin, backend="triton")(x)
    yc = make(lin, backend="torch")(x)
    assert yt.shape == (2, 3, 19)
    torch.testing.assert_close(yt, yc, rtol=1e-4, atol=1e-4)


def test_ternary_twn_values():
    w = torch.tensor([[0.9, -0.1, -1.1, 0.05]])
    lin = nn.Linear(4, 1, bias=False)
    lin.weight.data = w
    p = PackedLinear.from_linear_ternary(lin, backend="torch")
    # Delta = 0.7 * mean|w| = 0.7 * 0.5375; kept: 0.9, -1.1; alpha = 1.0
    assert p.dequantize().tolist() == [[1.0, 0.0, -1.0, 0.0]]


def test_binary_xnor_values():
    lin = nn.Linear(4, 1, bias=False)
    lin.weight.data = torch.tensor([[0.5, -1.5, 0.0, 2.0]])
    p = PackedLinear.from_linear_binary(lin, backend="torch")
    assert p.dequantize().tolist() == [[1.0, -1.0, 1.0, 1.0]]  # alpha = mean|w| = 1


def test_codebook_values():
    cents = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])
    codes = torch.tensor([[2, 0], [1, 1]])
    p = PackedLinear.from_codebook(codes, cents, backend="triton")
    assert p.dequantize().tolist() == [[-1.0, 0.5, 1.0, 2.0], [3.0, 4.0, 3.0, 4.0]]
    x = torch.randn(3, 4)
    torch.testing.assert_close(p(x), x @ p.dequantize().t())


def test_bad_input(lin):
    with pytest.raises(ValueError, match="group_size=48 must be a positive int dividing K=64"):
        PackedLinear.from_linear(lin, 4, 48)
    with pytest.raises(ValueError, match="backend='cuda'"):
        PackedLinear.from_linear(lin, 4, 32, backend="cuda")
    with pytest.raises(ValueError, match="bits=9"):
        PackedLinear.from_linear(lin, 9, 32)
    p = PackedLinear.from_linear(lin, 4, 32, backend="triton")
    with pytest.raises(ValueError, match="input has 63 features; this layer expects 64"):
        p(torch.randn(2, 63))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        p(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be 2-D with values in"):
        PackedLinear.from_codebook(torch.tensor([[3]]), torch.zeros(3, 2))
