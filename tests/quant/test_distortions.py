"""Merolla et al. 2016 projections / distortions (qtrain.quant.distortions) against
independent references: each deterministic formula by numpy, the random ones statistically
(expectation and spread over many draws), effective bits by numpy entropy and by the
empirical correlation of a Gaussian channel."""

import math

import numpy as np
import pytest
import torch

from qtrain.quant import distortions as D


def weights(n=4000, seed=0, scale=0.3):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_layer_scale_by_numpy():
    w = weights()
    a = w.numpy()
    assert float(D.layer_scale(w, "max_abs")) == pytest.approx(np.abs(a).max())
    assert float(D.layer_scale(w, "mean_abs")) == pytest.approx(np.abs(a).mean(), rel=1e-6)
    assert float(D.layer_scale(w, "none")) == 1.0
    assert float(D.layer_scale(torch.zeros(5), "max_abs")) == 1.0  # all-zero layer: no 0/0
    with pytest.raises(ValueError, match="scale='l2'.*allowed"):
        D.layer_scale(w, "l2")


def test_binary_by_numpy():
    w = torch.tensor([-0.7, -0.1, 0.0, 0.2, 0.9])
    out = D.project(w, "binary").numpy()
    np.testing.assert_array_equal(out, 0.9 * np.array([-1, -1, 1, 1, 1], dtype=np.float32))
    out = D.project(w, "binary", scale="none").numpy()
    np.testing.assert_array_equal(out, np.where(w.numpy() >= 0, 1.0, -1.0))


@pytest.mark.parametrize("scale", ["none", "max_abs"])
def test_stochastic_binary_expectation_is_the_clipped_weight(scale):
    # E[P(w)] = alpha (2 p - 1) = clip(w, -alpha, alpha), p = hard_sigmoid(w / alpha)
    w = torch.linspace(-2.0, 2.0, 41)
    draws = 20000
    out = D.project(w.repeat(draws, 1), "stochastic_binary", scale="none", generator=gen()) \
        if scale == "none" else torch.stack(
            [D.project(w, "stochastic_binary", scale=scale, generator=gen(s)) for s in range(2000)])
    alpha = 1.0 if scale == "none" else float(w.abs().max())
    values = torch.unique(out)
    assert set(values.tolist()) <= {-alpha, alpha}  # only the two binary values
    mean = out.mean(0).numpy()
    target = np.clip(w.numpy(), -alpha, alpha)
    n = out.shape[0]
    sd = np.sqrt(np.maximum(alpha**2 - target**2, 1e-12) / n)  # std of the mean of +-alpha draws
    assert np.all(np.abs(mean - target) <= 5 * sd + 1e-6)
    # outside the box the draw is deterministic (p = 0 or 1)
    if scale == "none":
        assert torch.all(out[:, w >= 1] == 1) and torch.all(out[:, w <= -1] == -1)


def test_stochastic_binary_probability_by_hand():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    p = D.stochastic_binarize_prob(w, 1.0)
    np.testing.assert_allclose(p.numpy(), [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def nearest_level(a, alpha, k):
    grid = alpha * np.linspace(-1.0, 1.0, k)
    return grid[np.abs(a[:, None] - grid[None, :]).argmin(1)]


@pytest.mark.parametrize("k", [2, 3, 4, 5, 16])
def test_kquant_nearest_by_numpy_grid(k):
    w = weights(2000, seed=k)
    alpha = float(w.abs().max())
    out = D.project(w, "kquant", levels=k).numpy()
    np.testing.assert_allclose(out, nearest_level(w.numpy(), alpha, k), rtol=0, atol=1e-6)
    assert len(np.unique(out)) <= k


def test_kquant_stochastic_is_unbiased_and_stays_between_neighbours():
    w = torch.linspace(-1.0, 1.0, 17)[1:-1] * 0.9
    k, draws = 4, 20000
    alpha = float(w.abs().max())
    out = torch.stack([D.kquant(w, alpha, k, "stochastic", gen(s)) for s in range(draws // 10)])
    grid = alpha * np.linspace(-1, 1, k)
    a = w.numpy()
    lo = grid[np.searchsorted(grid, a, side="right") - 1]
    hi = grid[np.minimum(np.searchsorted(grid, a, side="right"), k - 1)]
    o = out.numpy()
    assert np.all((np.abs(o - lo) < 1e-6) | (np.abs(o - hi) < 1e-6))
    step = grid[1] - grid[0]
    sd = step / 2 / np.sqrt(o.shape[0])
    assert np.all(np.abs(o.mean(0) - a) <= 5 * sd)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 2.0])
def test_power_by_numpy(beta):
    w = weights(500, seed=3)
    a = w.numpy()
    alpha = np.abs(a).max()
    u = a / alpha
    ref = alpha * (np.where(u >= 0, 1.0, -1.0) if beta == 0 else np.sign(u) * np.abs(u) ** beta)
    np.testing.assert_allclose(D.project(w, "power", beta=beta).numpy(), ref, rtol=1e-5, atol=1e-7)
    if beta == 1.0:  # identity inside the box
        np.testing.assert_allclose(D.project(w, "power", beta=1.0).numpy(), a, rtol=1e-6)
    if beta == 0.0:  # binarization is the limit
        assert torch.equal(D.project(w, "power", beta=0.0), D.project(w, "binary"))


def test_clip_by_numpy():
    w = weights(500, seed=4, scale=1.0)
    np.testing.assert_array_equal(D.project(w, "clip", clip_value=0.5).numpy(),
                                  np.clip(w.numpy(), -0.5, 0.5))


def test_mult_noise_moments():
    # E[P(w)] = w and Var[P(w)] = sigma^2 w^2, per weight
    w = torch.tensor([-0.8, -0.2, 0.05, 0.4, 1.5])
    sigma, draws = 0.7, 40000
    out = D.project(w.repeat(draws, 1), "mult_noise", sigma=sigma, generator=gen()).numpy()
    a = w.numpy()
    sd_mean = sigma * np.abs(a) / np.sqrt(draws)
    assert np.all(np.abs(out.mean(0) - a) <= 5 * sd_mean)
    np.testing.assert_allclose(out.std(0), sigma * np.abs(a), rtol=0.03)


def test_add_noise_moments_relative_to_layer_std():
    w = weights(200000, seed=5)
    sigma = 0.8
    noise = (D.project(w, "add_noise", sigma=sigma, generator=gen()) - w).numpy()
    assert abs(noise.mean()) < 5 * sigma * w.std().item() / np.sqrt(len(noise))
    assert noise.std() == pytest.approx(sigma * w.std().item(), rel=0.01)
    assert abs(np.corrcoef(noise, w.numpy())[0, 1]) < 0.01  # independent of the weight


def test_stochastic_multiply_factor_is_uniform_on_gamma_to_one_over_gamma():
    # P(w) / w = u ~ U[gamma, 1 / gamma]: range, mean (gamma + 1/gamma) / 2 and variance
    # (1/gamma - gamma)^2 / 12 of a uniform (numpy's formulas), a KS-style CDF check
    w = torch.full((200000,), -0.3)
    gamma = 0.5
    u = (D.project(w, "stochastic_multiply", gamma=gamma, generator=gen()) / w).numpy()
    assert u.min() >= gamma - 1e-6 and u.max() <= 1 / gamma + 1e-6
    assert u.mean() == pytest.approx((gamma + 1 / gamma) / 2, abs=5 * 0.433 / np.sqrt(len(u)))
    assert u.var() == pytest.approx((1 / gamma - gamma) ** 2 / 12, rel=0.01)
    qs = np.quantile(u, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(qs, gamma + (1 / gamma - gamma) * np.array([0.1, 0.5, 0.9]),
                               atol=0.01)
    assert D.uniform_factor_moments(0.5) == pytest.approx((1.25, 1.5**2 / 12))
    with pytest.raises(ValueError, match="gamma=1.0"):
        D.project(w, "stochastic_multiply", gamma=1.0)


def test_effective_bits_of_stochastic_multiply_by_numpy():
    w = weights(5000, seed=10) + 0.1
    a = w.numpy().astype(np.float64)
    g = 0.5
    m, v = (g + 1 / g) / 2, (1 / g - g) ** 2 / 12
    ref = 0.5 * np.log2(1 + m**2 * a.var() / (v * (a**2).mean()))
    assert D.effective_bits(w, "stochastic_multiply", gamma=g) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("granularity", ["layer", "weight"])
def test_stochastic_mixture_rate(granularity):
    w = weights(1000, seed=6)
    proj = D.project(w, "binary")
    p, steps = 0.3, 400
    differ = proj != w  # the projection changes these weights (all but the max-|w| one)
    hits = []
    for s in range(steps):
        out = D.stochastic_mixture(w, proj, p, granularity, gen(s))
        took = (out == proj)[differ]
        assert torch.all(took | (out == w)[differ])
        if granularity == "layer":
            assert took.all() or not took.any()  # the whole layer or none of it
        hits.append(took.float().mean().item())
    n = steps if granularity == "layer" else steps * int(differ.sum())
    assert np.mean(hits) == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / n))


def entropy(codes):
    _, c = np.unique(codes, return_counts=True)
    q = c / c.sum()
    return float(-(q * np.log2(q)).sum())


def test_effective_bits_of_discrete_projections_by_numpy_entropy():
    w = weights(3000, seed=7) + 0.1  # unbalanced signs: < 1 bit
    a = w.numpy()
    assert D.effective_bits(w, "binary") == pytest.approx(entropy(a >= 0), rel=1e-9)
    assert D.effective_bits(w, "binary") < 1.0
    alpha = np.abs(a).max()
    codes = np.round(nearest_level(a, alpha, 5) / alpha * 2 + 2)
    assert D.effective_bits(w, "kquant", levels=5) == pytest.approx(entropy(codes), rel=1e-9)
    assert D.effective_bits(w, "kquant", levels=5) <= math.log2(5)
    for name in ("none", "clip", "power"):
        assert D.effective_bits(w, name) == 32.0


def test_effective_bits_of_additive_noise_match_the_gaussian_channel():
    # I(W; W + N) = -0.5 log2(1 - rho^2) for jointly Gaussian W, W + N: an independent
    # estimate from the empirical correlation of one real draw
    w = weights(400000, seed=8)
    for sigma in (0.5, 0.8, 1.5):
        bits = D.effective_bits(w, "add_noise", sigma=sigma)
        assert bits == pytest.approx(0.5 * math.log2(1 + 1 / sigma**2), rel=1e-12)
        rho = np.corrcoef(w.numpy(), D.project(w, "add_noise", sigma=sigma, generator=gen()).numpy())[0, 1]
        assert bits == pytest.approx(-0.5 * math.log2(1 - rho**2), rel=0.02)
    # the paper's 0.68 effective bits per weight is sigma = 0.80 of the weight std
    assert D.effective_bits(w, "add_noise", sigma=0.8) == pytest.approx(0.679, abs=1e-3)


def test_effective_bits_of_multiplicative_noise_by_numpy():
    w = weights(5000, seed=9) + 0.2
    a = w.numpy().astype(np.float64)
    sigma = 0.6
    ref = 0.5 * np.log2(1 + a.var() / (sigma**2 * (a**2).mean()))
    assert D.effective_bits(w, "mult_noise", sigma=sigma) == pytest.approx(ref, rel=1e-9)
    assert D.effective_bits(w, "mult_noise", sigma=0.0) == 32.0


def test_bad_arguments_are_one_clear_error():
    w = weights(10)
    with pytest.raises(ValueError, match="projection='ternary'.*allowed"):
        D.project(w, "ternary")
    with pytest.raises(ValueError, match="levels=1.*>= 2"):
        D.project(w, "kquant", levels=1)
    with pytest.raises(ValueError, match="rounding"):
        D.project(w, "kquant", rounding="up")
    with pytest.raises(ValueError, match="p=1.5"):
        D.stochastic_mixture(w, w, 1.5)
