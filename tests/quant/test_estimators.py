"""Gradient estimators: values and gradients against hand-worked formulas (qtrain.quant.estimators)."""

import math

import pytest
import torch

from qtrain.quant import estimators as E


def test_ste_round_value_and_identity_gradient():
    x = torch.tensor([-1.5, -0.6, 0.4, 0.5, 1.5, 2.49], requires_grad=True)
    y = E.ste_round(x)
    assert y.tolist() == [-2.0, -1.0, 0.0, 0.0, 2.0, 2.0]  # half to even
    g = torch.tensor([0.1, -2.0, 3.0, 0.5, 1.0, -1.0])
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_clipped_ste_round_hand_example():
    x = torch.tensor([-1.2, 0.3, 0.5, 1.7, 2.6], requires_grad=True)
    y = E.clipped_ste_round(x, 0.0, 2.0)
    assert y.tolist() == [0.0, 0.0, 0.0, 2.0, 2.0]
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    with pytest.raises(ValueError, match="lo < hi"):
        E.clipped_ste_round(x, 1.0, 1.0)


def test_dorefa_quantize_k_k2():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0], requires_grad=True)
    y = E.dorefa_quantize_k(x, 2)
    # 3x = 0, .3, .6, 1.5, 2.7, 3 -> 0, 0, 1, 2, 3, 3 (1.5 -> 2: half to even)
    assert torch.allclose(y, torch.tensor([0, 0, 1, 2, 3, 3]) / 3.0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


def _dorefa_weight_ref(w: list[float], k: int) -> list[float]:
    n = 2**k - 1
    t = [math.tanh(v) for v in w]
    m = max(abs(v) for v in t)
    return [2 * round((v / (2 * m) + 0.5) * n) / n - 1 for v in t]


def test_dorefa_weight_k2_values_and_gradient():
    w_list = [-2.0, -0.5, 0.05, 0.3, 1.0]
    w = torch.tensor(w_list, requires_grad=True)
    y = E.dorefa_weight(w, 2)
    assert torch.allclose(y, torch.tensor(_dorefa_weight_ref(w_list, 2)), atol=1e-6)
    # gradient (STE on quantize_k): d/dw_i sum_j g_j * t_j / M, with M = |t_0| (argmax at w=-2)
    g = [0.3, -1.0, 2.0, 0.5, -0.7]
    y.backward(torch.tensor(g))
    t = [math.tanh(v) for v in w_list]
    m = abs(t[0])
    ref = [gi * (1 - ti**2) / m for gi, ti in zip(g, t)]
    dm = math.copysign(1.0, t[0]) * (1 - t[0] ** 2)
    ref[0] -= sum(gi * ti for gi, ti in zip(g, t)) / m**2 * dm
    assert torch.allclose(w.grad, torch.tensor(ref), atol=1e-5)


def test_dorefa_weight_k1_sign_times_mean_abs():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0], requires_grad=True)
    y = E.dorefa_weight(w, 1)
    e = (2.0 + 0.5 + 0.0 + 0.3 + 1.0) / 5
    assert torch.allclose(y, torch.tensor([-e, -e, e, e, e]))
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(g)
    assert torch.equal(w.grad, g)  # identity (E|w| is a constant in the backward)


def test_dorefa_weight_all_zero_is_finite():
    assert torch.isfinite(E.dorefa_weight(torch.zeros(4), 3)).all()


def test_dorefa_activation_k2():
    x = torch.tensor([-0.5, 0.2, 0.5, 0.8, 1.4], requires_grad=True)
    y = E.dorefa_activation(x, 2)
    # clip -> 0, .2, .5, .8, 1; 3x -> 0, .6, 1.5, 2.4, 3 -> 0, 1, 2, 2, 3
    assert torch.allclose(y, torch.tensor([0, 1, 2, 2, 3]) / 3.0)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_dorefa_activation_k1():
    x = torch.tensor([-1.0, 0.3, 0.6, 3.0])
    assert E.dorefa_activation(x, 1).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_quantization_equals_hand_formula(k):
    dr = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    out = E.quantize_gradient_value(dr, k, per_sample=True,
                                    generator=torch.Generator().manual_seed(5))
    u = torch.rand(dr.shape, generator=torch.Generator().manual_seed(5))  # same draws
    n = 2**k - 1
    for b in range(3):
        m = max(abs(v) for v in dr[b].tolist())
        for j in range(7):
            noise = (u[b, j].item() - 0.5) / n
            v = min(max(dr[b, j].item() / (2 * m) + 0.5 + noise, 0.0), 1.0)
            ref = 2 * m * (round(v * n) / n - 0.5)
            assert out[b, j].item() == pytest.approx(ref, abs=1e-5)


def test_gradient_quantization_per_sample_vs_tensor_scale():
    dr = torch.tensor([[1.0, -1.0, 0.5], [1e-3, -2e-3, 0.0], [0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    out = E.quantize_gradient_value(dr, 2, per_sample=True, generator=g)
    assert out[1].abs().max() <= 2e-3 + 1e-9  # its own scale: row max 2e-3
    assert torch.equal(out[2], torch.zeros(3))  # zero rows stay zero
    out_t = E.quantize_gradient_value(dr, 2, per_sample=False, generator=g)
    grid = (out_t / 2 + 0.5) * 3  # tensor scale m = 1: values on the grid i/3
    assert torch.allclose(grid, grid.round(), atol=1e-5)


def test_gradient_quantization_unbiased():
    k, n, T = 2, 3, 20000
    step = 2.0 / n  # m = 1 per row -> grid step 2m/n
    # values 0.1 and 0.35 grid steps away from grid points: nearest rounding would be biased
    row = torch.tensor([1.0, -1.0, 1 - 0.1 * step, -1 + 1.35 * step, 0.3 * step])
    dr = row.expand(T, -1).contiguous()
    out = E.quantize_gradient_value(dr, k, generator=torch.Generator().manual_seed(0))
    err = (out.mean(0) - row).abs()
    # std of the mean <= step / (2 sqrt(T)); allow 5 sigma (~0.018 step) < 0.1 step bias
    assert (err < 5 * step / (2 * math.sqrt(T))).all(), err
    nearest = 2 * (torch.round((row / 2 + 0.5) * n) / n - 0.5)
    assert ((nearest - row).abs()[2:] > 0.09 * step).all()  # the test would catch no noise


def test_gradient_quantization_reproducible_with_seed():
    dr = torch.randn(4, 9)

    def run(seed):
        return E.quantize_gradient_value(dr, 3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_quantize_gradient_autograd_identity_forward_quantized_backward():
    x = torch.randn(5, 6, requires_grad=True)
    y = E.quantize_gradient(x, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, x)
    g = torch.randn(5, 6)
    y.backward(g)
    ref = E.quantize_gradient_value(g, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x.grad, ref)


@pytest.mark.parametrize("bad", [0, 33, 2.0, True])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError, match="bits"):
        E.dorefa_weight(torch.ones(3), bad)
    with pytest.raises(ValueError, match="bits"):
        E.quantize_gradient(torch.ones(3), bad)
