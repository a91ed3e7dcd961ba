"""S2FP8 training (Cambier et al. 2020) through FP8TrainingQuantizer(fmt='s2fp8'): the
transform against a numpy reference written from the paper's eqs. 1-5, the truncation points
of a layer's forward and backward GEMMs, and training without loss scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantLinear, is_fake_quant
from qtrain.nn.fp8_training import FP8TrainingQuantizer
from tests.hydra_helpers import compose_cfg


def e5m2_rne(y: np.ndarray) -> np.ndarray:
    """E5M2 round-to-nearest-even of positive float64 values (1 + 2 mantissa bits, smallest
    normal 2^-14, subnormal step 2^-16, saturating at 57344), by hand."""
    _, ex = np.frexp(y)  # y = m 2^ex, m in [0.5, 1): floor(log2 y) = ex - 1
    e = np.maximum(ex - 1, -14)
    step = np.ldexp(1.0, e - 2)
    return np.minimum(np.round(y / step) * step, 57344.0)  # np.round: half to even


def s2fp8_ref(x: np.ndarray) -> np.ndarray:
    """Cambier 2020: mu, m = mean, max of log2|X| over non-zeros (eq. 3); alpha = 15/(m - mu),
    beta = -alpha mu (eq. 4); Y = 2^beta |X|^alpha (eq. 1); X^ = (2^-beta RNE_FP8(Y))^(1/alpha)
    (eq. 5), sign kept, zeros kept."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    nz = x != 0
    lg = np.log2(np.abs(x[nz]))
    mu, m = lg.mean(), lg.max()
    alpha = 15.0 / (m - mu) if m > mu else 1.0
    beta = -alpha * mu
    yq = e5m2_rne(2.0**beta * np.abs(x[nz]) ** alpha)
    out[nz] = np.sign(x[nz]) * (2.0**-beta * yq) ** (1.0 / alpha)
    out[nz][yq == 0] = 0.0
    return out


def q(**kw) -> FP8TrainingQuantizer:
    return FP8TrainingQuantizer(fmt="s2fp8", grad_fmt="s2fp8", **kw)


def test_round_trip_of_known_log_magnitudes_is_exact():
    # log2|X| = -20, -18, -16, -10 (mean -16, max -10): alpha = 15/6 = 2.5, beta = 40, so
    # log2|Y| = -10, -5, 0, 15: all E5M2 numbers, and the round trip is exact
    x = torch.tensor([2.0**-20, -(2.0**-18), 2.0**-16, -(2.0**-10), 0.0])
    out = q()(x)
    assert torch.equal(out, x)
    # the same tensor through plain E5M2: 2^-20 and 2^-18 underflow (smallest subnormal 2^-16)
    plain = FP8TrainingQuantizer(fmt="e5m2")(x)
    assert plain[0] == 0 and plain[1] == 0


def test_transform_matches_numpy_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-30, -5, (3000,), generator=g))
    x[::11] = 0
    out = q()(x).double().numpy()
    ref = s2fp8_ref(x.double().numpy())
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=0)
    assert (out[::11] == 0).all()
    # S2FP8 keeps 3 significant bits where the squeezed Y is normal: relative error <= 2^-3
    # / alpha-ish; here it stays well under 15% over 25 binades, plain E5M2 flushes most
    nz = x != 0
    rel = np.abs(out[nz.numpy()] - x[nz].double().numpy()) / x[nz].abs().double().numpy()
    assert np.median(rel) < 0.1
    plain = FP8TrainingQuantizer(fmt="e5m2")(x)
    assert (plain[nz] == 0).float().mean() > 0.5


def test_layer_truncates_before_and_after_each_gemm_forward_and_backward():
    """y = S(S(x) S(W)^T); e = S(dL/dy); dW = S(e^T S(x)); dX = S(e S(W)) with S the S2FP8
    round trip, each with the statistics of its own tensor (sec. 4.1)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 16, generator=g) * 0.1)
    m = QuantLinear.from_float(lin, q(grad_at="error_and_outputs"),
                               q(grad_at="error_and_outputs", round_output=True))
    x = (torch.randn(4, 16, generator=g) * 3).requires_grad_()
    up = torch.randn(4, 8, generator=g) * 1e-3  # the upstream gradient dL/dy
    y = m(x)
    (y * up).sum().backward()

    S = s2fp8_ref
    xn, wn = x.detach().double().numpy(), lin.weight.detach().double().numpy()
    xq, wq = S(xn), S(wn)
    np.testing.assert_allclose(y.detach().double().numpy(), S(xq @ wq.T), rtol=1e-4)
    e = S(up.double().numpy())
    np.testing.assert_allclose(lin.weight.grad.double().numpy(), S(e.T @ xq), rtol=1e-4)
    np.testing.assert_allclose(x.grad.double().numpy(), S(e @ wq), rtol=1e-4)
    # and they are really truncated: not the float GEMM results
    assert not np.allclose(lin.weight.grad.double().numpy(), e.T @ xq, rtol=1e-4)


def test_gradients_far_below_fp8_range_survive_without_loss_scaling():
    """Cambier 2020's point: no loss scaling. A loss scaled by 1e-12 gives errors ~1e-13, far
    below E5M2's smallest subnormal (2^-16 ~ 1.5e-5): plain FP8 flushes the weight gradient to
    zero, S2FP8 keeps it within a few percent of the float gradient."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 16, generator=g) * 0.1
    x = torch.randn(32, 16, generator=g)
    t = torch.randint(0, 8, (32,), generator=g)

    def weight_grad(wq, aq):
        lin = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w0)
        m = QuantLinear.from_float(lin, wq, aq)
        (F.cross_entropy(m(x), t) * 1e-12).backward()
        return lin.weight.grad

    ref = weight_grad(None, None)
    fp8 = weight_grad(FP8TrainingQuantizer(fmt="e5m2"), FP8TrainingQuantizer(fmt="e5m2"))
    s2 = weight_grad(q(grad_at="error_and_outputs"),
                     q(grad_at="error_and_outputs", round_output=True))
    assert ref.abs().max() < 1e-12 and (fp8 == 0).all()
    a, b = s2.double().flatten() * 1e12, ref.double().flatten() * 1e12  # cosine_similarity's eps
    cos = (a @ b) / (a.norm() * b.norm())
    assert cos > 0.98 and ((a - b).norm() / b.norm()) < 0.2


def test_storage_and_bad_format():
    w = torch.randn(5, 7)
    assert q().storage_bits(w) == 8 * 35 + 64  # codes + fp32 alpha, beta
    assert FP8TrainingQuantizer(fmt="e5m2").storage_bits(w) == 8 * 35
    with pytest.raises(ValueError, match="fmt='s2fp9'.*s2fp8"):
        FP8TrainingQuantizer(fmt="s2fp9")
    with pytest.raises(ConfigError, match="grad_at='outputs'.*error_and_outputs"):
        FP8TrainingQuantizer(fmt="s2fp8", grad_at="outputs")


def test_recipe_quantizes_every_layer_first_and_last_included(tmp_path):
    """The composed recipe config (real Hydra) builds S2FP8 quantizers in every conv/linear,
    first and last included, truncating the layer output and the backward GEMM outputs."""
    cfg = compose_cfg(["recipe=s2fp8_training_digits"], tmp_path)
    assert cfg.quant_start_epoch == 0
    cb = instantiate(cfg.quant)
    from qtrain.models.small import SmallCNN

    model = SmallCNN(num_classes=10)
    cb.convert(model)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert len(layers) == 4 and all(is_fake_quant(m) for m in layers)
    for m in layers:
        assert m.weight_quantizer.fmt == m.act_quantizer.fmt == "s2fp8"
        assert m.act_quantizer.grad_fmt == "s2fp8" and m.act_quantizer.round_output
        assert m.weight_quantizer.grad_at == "error_and_outputs"
        assert m.weight_quantizer.rounding == m.act_quantizer.grad_rounding == "nearest"
