"""ABC-Net: Lin, Zhao & Pan 2017, "Towards Accurate Binary Convolutional Neural Network"
(NeurIPS 2017, arXiv:1711.11294) -- the pure tensor math. Equation numbers are our reading
of the arXiv version (not re-checked against the paper in this session; the NeurIPS version
may number them differently).

Weights (sec. 3.1). ``W ~ alpha_1 B_1 + ... + alpha_M B_M`` with binary bases

    B_i = F_{u_i}(W) := sign(W_bar + u_i std(W)),  W_bar = W - mean(W)          (eq. 2)
    u_i = -1 + (i - 1) * 2 / (M - 1),  i = 1..M   (shifts evenly spread over [-std, std])

and the coefficients by least squares on the fixed bases (eq. 3)

    alpha = argmin_alpha || vec(W) - B alpha ||^2,   B = [vec(B_1), ..., vec(B_M)].

Training recomputes B and alpha in every forward (eq. 4); the backward is the
straight-through estimator of eq. (5): ``dc/dW = sum_m alpha_m dc/dB_m`` -- the gradient of
the quantized weight times ``sum_m alpha_m``, unclipped, alpha treated as a constant.

Conventions (stated, not hidden):

* per layer (the paper's vec(W) over the whole tensor); ``per_channel=True`` (a named option,
  not the paper) takes mean, std, bases and alpha per output channel (dim 0);
* ``std`` is the population standard deviation (divide by n); sign(0) := +1 (two-valued
  bases, as :func:`qtrain.quant.binary.binary_sign`);
* M = 1: the shift formula divides by M - 1 = 0; we take u_1 = 0 (the centre of the range),
  so B_1 = sign(W_bar) and alpha_1 = mean(W * sign(W_bar)) = mean|W_bar| + mean(W) *
  mean(sign(W_bar)) -- BWN / XNOR's mean|W| only when mean(W) = 0;
* the least-squares problem is solved through its normal equations in float64 with the
  pseudo-inverse: ``alpha = pinv(B^T B) B^T w`` -- the minimum-norm least-squares solution
  (numpy's ``lstsq``), also when two bases coincide (B rank-deficient), on any device;
* the quantized weight is summed base by base in a fixed order (:func:`combine`), so a
  packed table built with the same loop (:func:`code_table`) reproduces it bit for bit.

Activations (sec. 3.2). ``A ~ beta_1 H_{v_1}(R) + ... + beta_N H_{v_N}(R)`` with

    h_v(x) = clip(x + v, 0, 1),   H_v(R) = 2 * I[h_v(R) >= 0.5] - 1                (eq. 6-8)

learnable shifts ``v_n`` and scales ``beta_n`` (one each per base and layer). Backward
(straight-through): ``dH_v(R)/dR = dH_v(R)/dv = gain * 1[0 <= R + v <= 1]`` -- the
derivative of the clip h_v (``gain = 1``; ``gain = 2`` is the derivative of the proxy
2 h_v - 1); ``dA/dbeta_n = H_{v_n}(R)`` exactly. The STE's exact form and the initial values
of v and beta are our reading; the defaults used by :class:`qtrain.nn.abc_quantizer.
ABCActQuantizer` are ``v_n = 0.5 - (2n - 1) / (2N)`` (thresholds ``R >= 0.5 - v_n`` evenly
inside (0, 1); N = 1: v = 0, the plain H at 0.5) and ``beta_n = 1 / N``.
"""

from __future__ import annotations

import torch

from qtrain.quant.binary import binary_sign


def weight_shifts(m: int) -> torch.Tensor:
    """The paper's shifts ``u_i = -1 + (i - 1) 2 / (M - 1)`` (float64, shape (M,));
    M = 1 gives u_1 = 0 (module doc)."""
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"ABC-Net: the number of weight bases M must be an int >= 1, got {m!r}")
    if m == 1:
        return torch.zeros(1, dtype=torch.float64)
    return -1.0 + torch.arange(m, dtype=torch.float64) * (2.0 / (m - 1))


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` as (rows, n): one row for the whole tensor, or one per output channel."""
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def weight_bases(w: torch.Tensor, u: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``B_i = sign(W - mean(W) + u_i std(W))`` (eq. 2), shape (M, *w.shape), values +-1
    in ``w``'s dtype; mean and population std per tensor (or per row with ``per_channel``)."""
    w = w.detach()
    r = _rows(w, per_channel).double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(mean)
    u = u.to(device=w.device, dtype=torch.float64).reshape(-1, 1, 1)
    b = binary_sign((r - mean).unsqueeze(0) + u * std.unsqueeze(0))
    return b.to(w.dtype).reshape(u.shape[0], *w.shape)


def lstsq_alpha(w: torch.Tensor, bases: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """alpha minimising ``||vec(W) - B alpha||^2`` (eq. 3), minimum-norm when B is
    rank-deficient: shape (M,) per tensor, (M, rows) with ``per_channel``; float32 (or the
    weight's dtype), no gradient."""
    w = w.detach()
    m = bases.shape[0]
    r = _rows(w, per_channel).double()                                  # (rows, n)
    b = bases.detach().reshape(m, r.shape[0], -1).double().transpose(0, 1)  # (rows, M, n)
    gram = b @ b.transpose(1, 2)                                        # (rows, M, M)
    rhs = (b @ r.unsqueeze(2))                                          # (rows, M, 1)
    alpha = (torch.linalg.pinv(gram, hermitian=True) @ rhs).squeeze(2)  # (rows, M)
    alpha = alpha.to(w.dtype)
    return alpha.transpose(0, 1).contiguous() if per_channel else alpha[0]


def _alpha_view(alpha: torch.Tensor, i: int, w_dim: int) -> torch.Tensor:
    a = alpha[i]
    return a.reshape(-1, *([1] * (w_dim - 1))) if a.dim() else a


def combine(alpha: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """``sum_i alpha_i B_i`` summed in the order i = 1..M (the fixed order the packed table
    repeats); ``alpha`` (M,) or (M, rows) for per-channel bases."""
    out = _alpha_view(alpha, 0, bases.dim() - 1) * bases[0]
    for i in range(1, bases.shape[0]):
        out = out + _alpha_view(alpha, i, bases.dim() - 1) * bases[i]
    return out


def code_table(alpha: torch.Tensor) -> torch.Tensor:
    """Value of every M-bit code: ``table[..., c] = sum_i alpha_i (2 bit_i(c) - 1)`` (bit i of
    c is base i's sign bit, 1 for +1), summed in :func:`combine`'s order: shape (2^M,) for
    per-tensor alpha, (rows, 2^M) for per-channel (M, rows)."""
    m = alpha.shape[0]
    codes = torch.arange(2**m, device=alpha.device)
    signs = torch.stack([((codes >> i) & 1).to(alpha.dtype) * 2 - 1 for i in range(m)])  # (M, 2^M)
    if alpha.dim() == 2:
        signs = signs.unsqueeze(1).expand(m, alpha.shape[1], 2**m)       # (M, rows, 2^M)
    return combine(alpha, signs)


def codes(bases: torch.Tensor) -> torch.Tensor:
    """The M bit planes as one M-bit code per weight: ``sum_i 2^i [B_i = +1]`` (int64)."""
    out = torch.zeros(bases.shape[1:], dtype=torch.int64, device=bases.device)
    for i in range(bases.shape[0]):
        out |= (bases[i] > 0).long() << i
    return out


class _ABCWeightSTE(torch.autograd.Function):
    """Forward: the given ``sum alpha_i B_i``; backward: ``g * sum_i alpha_i`` (eq. 5)."""

    @staticmethod
    def forward(ctx, w, w_hat, alpha_sum):
        ctx.save_for_backward(alpha_sum)
        return w_hat.clone()

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return g * s, None, None


def abc_weight(w: torch.Tensor, m: int, per_channel: bool = False,
               u: torch.Tensor | None = None) -> torch.Tensor:
    """ABC-Net weight of eq. (2)-(5): bases and least-squares alpha from ``w`` now, value
    ``sum_i alpha_i B_i``, gradient ``dc/dW = sum_i alpha_i dc/dB_i`` (module doc)."""
    u = weight_shifts(m) if u is None else u
    bases = weight_bases(w, u, per_channel)
    alpha = lstsq_alpha(w, bases, per_channel)
    w_hat = combine(alpha, bases)
    s = alpha.sum(0)
    s = s.reshape(-1, *([1] * (w.dim() - 1))) if s.dim() else s
    return _ABCWeightSTE.apply(w, w_hat, s.to(w.dtype))


def act_bases(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H_{v_n}(x) = 2 I[clip(x + v_n, 0, 1) >= 0.5] - 1`` (eq. 7), shape (N, *x.shape)."""
    h = (x.detach().unsqueeze(0) + v.detach().reshape(-1, *([1] * x.dim()))).clamp(0, 1)
    return torch.where(h >= 0.5, 1.0, -1.0).to(x.dtype)


class _ABCActFn(torch.autograd.Function):
    """Forward ``sum_n beta_n H_{v_n}(x)``; backward: the STE of the module doc."""

    @staticmethod
    def forward(ctx, x, v, beta, gain):
        hb = act_bases(x, v)
        shape = (-1, *([1] * x.dim()))
        inside = ((x.unsqueeze(0) + v.reshape(shape)) >= 0) & ((x.unsqueeze(0) + v.reshape(shape)) <= 1)
        ctx.save_for_backward(hb, inside, beta)
        ctx.gain = gain
        return combine(beta.detach(), hb)

    @staticmethod
    def backward(ctx, g):
        hb, inside, beta = ctx.saved_tensors
        shape = (-1, *([1] * g.dim()))
        d = inside.to(g.dtype) * (ctx.gain * beta.reshape(shape).to(g.dtype))  # dA/d(x + v_n)
        gx = (g.unsqueeze(0) * d).sum(0)
        gv = (g.unsqueeze(0) * d).reshape(d.shape[0], -1).sum(1)
        gbeta = (g.unsqueeze(0) * hb).reshape(hb.shape[0], -1).sum(1)
        return gx, gv.to(beta.dtype), gbeta.to(beta.dtype), None


def abc_activation(x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                   gain: float = 1.0) -> torch.Tensor:
    """``A = sum_n beta_n H_{v_n}(x)`` (eq. 8) with the straight-through gradients to x, v
    and beta of the module doc (``v``, ``beta``: shape (N,))."""
    if v.shape != beta.shape or v.dim() != 1:
        raise ValueError(f"ABC-Net activations: v and beta must both be (N,), got "
                         f"{tuple(v.shape)} and {tuple(beta.shape)}")
    return _ABCActFn.apply(x, v, beta, float(gain))
