"""ABC-Net math (Lin, Zhao & Pan 2017; qtrain.quant.abc) against independent references:
bases worked by hand from the shift rule, alpha from numpy's lstsq, the STE gradients from
their closed forms / finite differences of the STE's proxy, and a check that an identity
(no-op) quantizer fails the same assertions."""

import numpy as np
import pytest
import torch

from qtrain.quant import abc as A

# a hand example: mean 5, population std sqrt(2) = 1.414...
W5 = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0])


def test_shifts_are_the_papers_rule():
    assert A.weight_shifts(1).tolist() == [0.0]  # M - 1 = 0: the centre (module doc)
    assert A.weight_shifts(2).tolist() == [-1.0, 1.0]
    assert A.weight_shifts(3).tolist() == [-1.0, 0.0, 1.0]
    assert A.weight_shifts(5).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="M must be an int >= 1"):
        A.weight_shifts(0)


def test_bases_worked_by_hand():
    # W_bar = [-2, -1, 0, 1, 2], std = 1.414: thresholds of sign(W_bar + u std) at -u std
    b = A.weight_bases(W5, A.weight_shifts(3))
    assert b.tolist() == [[-1, -1, -1, -1, 1],   # u = -1: W_bar >= 1.414
                          [-1, -1, 1, 1, 1],     # u = 0: W_bar >= 0 (sign(0) = +1)
                          [-1, 1, 1, 1, 1]]      # u = +1: W_bar >= -1.414


def test_m1_alpha_by_hand_is_not_bwn_unless_zero_mean():
    # B = sign(W_bar) = [-1, -1, 1, 1, 1]; alpha = B.w / 5 = (-3 - 4 + 5 + 6 + 7) / 5 = 2.2
    b = A.weight_bases(W5, A.weight_shifts(1))
    alpha = A.lstsq_alpha(W5, b)
    assert alpha.item() == pytest.approx(2.2, abs=1e-6)
    # mean|W_bar| + mean(W) mean(sign W_bar) = 1.2 + 5 * 0.2 (the rule implies BWN only at mean 0)
    assert alpha.item() != pytest.approx(W5.abs().mean().item())
    z = W5 - W5.mean()
    assert A.lstsq_alpha(z, A.weight_bases(z, A.weight_shifts(1))).item() == pytest.approx(
        z.abs().mean().item(), abs=1e-6)


def _np_reference(w: np.ndarray, m: int, per_channel: bool) -> np.ndarray:
    """Bases from the shift rule and alpha by numpy lstsq, written independently (float64)."""
    u = [0.0] if m == 1 else [-1 + i * 2 / (m - 1) for i in range(m)]
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        bases = np.stack([np.where(row - row.mean() + ui * row.std() >= 0, 1.0, -1.0)
                          for ui in u], axis=1)
        alpha = np.linalg.lstsq(bases, row, rcond=None)[0]
        out[r] = bases @ alpha
    return out.reshape(w.shape)


def _assert_abc_weight(fn, w: torch.Tensor, m: int, per_channel: bool = False):
    got = fn(w).detach().double().numpy()
    ref = _np_reference(w.double().numpy(), m, per_channel)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("per_channel", [False, True])
def test_alpha_equals_numpy_lstsq(m, per_channel):
    torch.manual_seed(m)
    w = torch.randn(6, 3, 3, 3) * 0.1 + 0.02
    bases = A.weight_bases(w, A.weight_shifts(m), per_channel)
    alpha = A.lstsq_alpha(w, bases, per_channel)
    rows = w.reshape(6, -1) if per_channel else w.reshape(1, -1)
    b = bases.reshape(m, rows.shape[0], -1)
    ref = np.stack([np.linalg.lstsq(b[:, r].T.double().numpy(), rows[r].double().numpy(),
                                    rcond=None)[0] for r in range(rows.shape[0])], axis=1)
    np.testing.assert_allclose(alpha.reshape(m, -1).double().numpy(), ref, rtol=1e-5, atol=1e-7)
    _assert_abc_weight(lambda t: A.abc_weight(t, m, per_channel), w, m, per_channel)


def test_rank_deficient_bases_give_numpys_minimum_norm_solution():
    w = torch.tensor([-3.0, 1.0, 1.0, 1.0])  # mean 0, std sqrt(3): u = 0 and +1 coincide
    bases = A.weight_bases(w, A.weight_shifts(3))
    assert bases.tolist() == [[-1, -1, -1, -1], [-1, 1, 1, 1], [-1, 1, 1, 1]]
    ref = np.linalg.lstsq(bases.T.double().numpy(), w.double().numpy(), rcond=None)[0]
    np.testing.assert_allclose(A.lstsq_alpha(w, bases).numpy(), ref, rtol=1e-6, atol=1e-7)
    assert ref[1] == pytest.approx(ref[2])  # the minimum-norm split between the twins


def test_identity_quantizer_fails_the_reference_check():
    w = torch.randn(4, 8)
    with pytest.raises(AssertionError):
        _assert_abc_weight(lambda t: t, w, 3)  # a silent no-op is caught
    with pytest.raises(AssertionError):
        _assert_abc_weight(lambda t: A.abc_weight(t, 2), w, 3)  # the wrong M too


def test_error_decreases_with_m():
    torch.manual_seed(0)
    w = torch.randn(64, 16, 3, 3)
    err = [float((A.abc_weight(w, m) - w).pow(2).mean()) for m in range(1, 9)]
    assert all(b < a for a, b in zip(err, err[1:])), err
    # ... towards a floor: the shifts stay in [-std, std], so the Gaussian tails are not
    # resolved (M = 8: ~7% of the variance left; M = 1: ~37%)
    assert err[-1] < 0.08 * float(w.pow(2).mean()) < err[0] / 4
    # nested shift sets ({-1, 1} in {-1, 0, 1} in {-1, -.5, 0, .5, 1}) can never do worse,
    # whatever the distribution (here a skewed one)
    v = torch.rand(500) ** 3
    e = {m: float((A.abc_weight(v, m) - v).pow(2).sum()) for m in (2, 3, 5)}
    assert e[5] <= e[3] + 1e-9 and e[3] <= e[2] + 1e-9


def test_weight_ste_is_sum_of_alphas():
    """eq. (5): dc/dW = sum_m alpha_m dc/dB_m, i.e. the upstream gradient times sum(alpha)."""
    torch.manual_seed(1)
    w = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    (A.abc_weight(w, 3) * g).sum().backward()
    bases = A.weight_bases(w, A.weight_shifts(3))
    alpha = np.linalg.lstsq(bases.reshape(3, -1).T.double().numpy(),
                            w.detach().reshape(-1).double().numpy(), rcond=None)[0]
    torch.testing.assert_close(w.grad, g * float(alpha.sum()), rtol=1e-5, atol=1e-6)
    wc = w.detach().clone().requires_grad_(True)  # per channel: that row's sum
    (A.abc_weight(wc, 2, per_channel=True) * g).sum().backward()
    s = A.lstsq_alpha(wc, A.weight_bases(wc, A.weight_shifts(2), True), True).sum(0)
    torch.testing.assert_close(wc.grad, g * s[:, None])


def test_code_table_reproduces_the_weight_bit_for_bit():
    torch.manual_seed(2)
    for pc in (False, True):
        w = torch.randn(6, 10)
        bases = A.weight_bases(w, A.weight_shifts(5), pc)
        alpha = A.lstsq_alpha(w, bases, pc)
        table, codes = A.code_table(alpha), A.codes(bases)
        got = table.reshape(-1 if pc else 1, 32).expand(6, 32).gather(1, codes)
        assert torch.equal(got, A.abc_weight(w, 5, pc).detach())


# ---------------------------------------------------------------------------- activations
X = torch.tensor([-0.5, 0.1, 0.3, 0.5, 0.9, 1.5])


def _default_v(n):
    return torch.tensor([0.5 - (2 * i - 1) / (2 * n) for i in range(1, n + 1)])


def _assert_abc_act(fn, x, v, beta):
    # by hand: H_v(x) = +1 iff x >= 0.5 - v (the clip does not move the threshold 0.5)
    ref = sum(b * (2.0 * (x >= 0.5 - vi).float() - 1) for vi, b in zip(v.tolist(), beta.tolist()))
    torch.testing.assert_close(fn(x).detach(), ref)


def test_activation_bases_worked_by_hand():
    v = _default_v(3)  # [1/3, 0, -1/3]: thresholds 1/6, 1/2, 5/6
    h = A.act_bases(X, v)
    assert h.tolist() == [[-1, -1, 1, 1, 1, 1], [-1, -1, -1, 1, 1, 1], [-1, -1, -1, -1, 1, 1]]
    beta = torch.full((3,), 1 / 3)
    a = A.abc_activation(X, v, beta)
    torch.testing.assert_close(a, torch.tensor([-1, -1, -1 / 3, 1 / 3, 1, 1]))
    _assert_abc_act(lambda t: A.abc_activation(t, v, beta), X, v, beta)
    with pytest.raises(AssertionError):
        _assert_abc_act(lambda t: t, X, v, beta)  # a no-op activation quantizer is caught


def test_beta_gradient_passes_gradcheck():
    """A is linear in beta: the exact gradient H_{v_n}(x) matches finite differences."""
    x = torch.randn(4, 5, dtype=torch.float64)
    v = _default_v(3).double()
    beta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: A.abc_activation(x, v, b), (beta,))


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_x_and_v_gradients_are_the_ste_proxys(gain):
    """The STE of H_v is the derivative of the proxy gain * clip(x + v, 0, 1): our backward
    for x and v equals central finite differences of sum_n beta_n gain h_{v_n}(x) (points
    kept away from the clip's kinks)."""
    torch.manual_seed(3)
    x = (torch.rand(40, dtype=torch.float64) * 2 - 0.5)
    v = torch.tensor([0.3, 0.05, -0.2], dtype=torch.float64)
    beta = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)
    kink = ((x[None] + v[:, None]).abs() < 1e-3) | ((x[None] + v[:, None] - 1).abs() < 1e-3)
    x = x[~kink.any(0)]
    g = torch.randn_like(x)

    def proxy(xx, vv):
        h = (xx[None] + vv[:, None]).clamp(0, 1)
        return (g * (beta[:, None] * gain * h).sum(0)).sum()

    xr, vr = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    (A.abc_activation(xr, vr, beta, gain) * g).sum().backward()
    eps = 1e-6
    fd_v = torch.stack([(proxy(x, v + eps * e) - proxy(x, v - eps * e)) / (2 * eps)
                        for e in torch.eye(3, dtype=torch.float64)])
    fd_x = torch.stack([(proxy(x + eps * e, v) - proxy(x - eps * e, v)) / (2 * eps)
                        for e in torch.eye(x.numel(), dtype=torch.float64)])
    torch.testing.assert_close(vr.grad, fd_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xr.grad, fd_x, rtol=1e-6, atol=1e-6)
    assert vr.grad.abs().sum() > 0
