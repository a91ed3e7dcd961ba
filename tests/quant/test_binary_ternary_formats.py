"""XNOR-Net / BNN / TWN / TTQ values and gradients against hand formulas."""

import torch

from qtrain.quant.binary import binarize_activation, xnor_binarize
from qtrain.quant.ternary import ttq_ternarize, twn_ternarize


def test_xnor_values_and_gradient_by_hand():
    w = torch.tensor([[0.5, -1.5, 0.0, -0.2], [2.0, 0.3, -0.1, 0.4]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, -0.7, 1.1, 2.0]])
    out = xnor_binarize(w)
    a = [(0.5 + 1.5 + 0.0 + 0.2) / 4, (2.0 + 0.3 + 0.1 + 0.4) / 4]
    s = [[1, -1, 1, -1], [1, 1, -1, 1]]
    ref = torch.tensor([[a[r] * s[r][c] for c in range(4)] for r in range(2)])
    torch.testing.assert_close(out, ref)
    out.backward(g)
    exp = torch.zeros(2, 4)
    for r in range(2):
        dot = sum(g[r, j].item() * s[r][j] for j in range(4))
        for c in range(4):
            inside = 1.0 if abs(w[r, c].item()) <= 1 else 0.0
            dabs = 0.0 if w[r, c].item() == 0 else s[r][c]  # d|w|/dw, 0 at w = 0
            exp[r, c] = a[r] * g[r, c] * inside + dabs / 4 * dot
    torch.testing.assert_close(w.grad, exp)


def test_xnor_detached_scale_gradient():
    w = torch.tensor([[0.5, -1.5]], requires_grad=True)
    xnor_binarize(w, scale_grad=False).sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0]]  # alpha * 1_{|w|<=1}, alpha = 1


def test_binary_activation_clipped_ste():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.0, 1.2], requires_grad=True)
    y = binarize_activation(x)
    assert y.tolist() == [-1, -1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]


def test_twn_values_by_hand_and_ste():
    w = torch.tensor([0.1, -0.9, 0.5, -0.05, 1.3, 0.2], requires_grad=True)
    delta = 0.7 * w.detach().abs().mean().item()  # 0.7 * 3.05/6 = 0.3558
    big = [v for v in w.tolist() if abs(v) > delta]
    alpha = sum(abs(v) for v in big) / len(big)
    ref = [alpha * (1 if v > 0 else -1) if abs(v) > delta else 0.0 for v in w.tolist()]
    out = twn_ternarize(w)
    torch.testing.assert_close(out, torch.tensor(ref))
    out.backward(torch.arange(6.0))
    assert w.grad.tolist() == list(range(6))


def test_twn_per_channel():
    w = torch.tensor([[1.0, 0.0, -1.0, 0.1], [10.0, 0.0, 0.0, 0.0]])
    out = twn_ternarize(w, per_channel=True)
    # row 0: delta = 0.7*0.525, alpha = 1 ; row 1: delta = 1.75, alpha = 10
    assert out.tolist() == [[1.0, 0.0, -1.0, 0.0], [10.0, 0.0, 0.0, 0.0]]


def test_ttq_values_and_paper_gradients():
    w = torch.tensor([1.0, -0.8, 0.04, -0.03, 0.3, -0.06], requires_grad=True)
    wp = torch.tensor(0.7, requires_grad=True)
    wn = torch.tensor(0.4, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = ttq_ternarize(w, wp, wn, 0.05)  # delta = 0.05
    torch.testing.assert_close(out, torch.tensor([0.7, -0.4, 0.0, 0.0, 0.7, -0.4]))
    out.backward(g)
    # I_p = {0, 4}, I_n = {1, 5}, I_z = {2, 3}
    torch.testing.assert_close(wp.grad, torch.tensor(1.0 + 5.0))
    torch.testing.assert_close(wn.grad, torch.tensor(-(2.0 + 6.0)))
    torch.testing.assert_close(w.grad, torch.tensor([0.7, 0.8, 3.0, 4.0, 3.5, 2.4]))
