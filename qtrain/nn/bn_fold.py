"""Batch-normalization folding during QAT (Jacob et al. 2018, sec. 3.2 and Fig. C.8).

A conv (or linear) layer followed by BatchNorm is trained as ONE fake-quant layer whose
weight is the folded weight the integer model will use (sec. 3.2, eq. 14):

    w_fold = gamma w / sigma,    b_fold = beta + gamma (b - mu) / sigma,
    sigma = sqrt(var + eps)

and the *folded* weight is what the weight quantizer sees. Fig. C.8 ("BN folding with
correction", the graph TensorFlow's ``fold_batch_norms.py`` builds, the authors' code):

* The weights are always folded with the **moving** standard deviation sigma_mv, so the
  quantized weight changes slowly instead of jumping with every batch's statistics
  (TF: ``correction_scale = sigma_B / sigma_mv`` multiplies gamma / sigma_B).
* Before ``bn_freeze`` (training): batch statistics mu_B, sigma_B are computed from the
  conv output with the *float* weights (the unfolded conv is kept in the graph for its
  moments, gradients flow through them), the moving averages are updated, and the folded,
  quantized conv's output is corrected back to batch normalisation:

      y = conv(x, Q(w gamma / sigma_mv)) * sigma_mv / sigma_B + beta + gamma (b - mu_B) / sigma_B

  (TF: ``correction_recip = sigma_mv / sigma_B``, ``correction_offset = 0``.) With the
  quantizer off this equals conv -> BatchNorm in training mode exactly.
* After ``bn_freeze`` (training, TF's ``freeze_batch_norm_delay``) and in eval: the moving
  averages stop updating (TF sets the BN decay to 0) and the layer is the inference graph

      y = conv(x, Q(w gamma / sigma_mv)) + beta + gamma (b - mu_mv) / sigma_mv

  (TF: ``correction_recip = 1``, ``correction_offset = gamma (mu_B / sigma_B - mu_mv /
  sigma_mv)`` added to the batch bias beta - gamma mu_B / sigma_B: the batch terms cancel
  exactly, so the result is the formula above.) Departure, compute only: after the freeze
  we evaluate that formula directly instead of also running the float conv for batch
  moments whose contribution cancels; values and gradients are the same up to float
  rounding. gamma and beta keep training after the freeze; only the statistics freeze.

Bias: the paper quantizes the bias to int32 with scale S_w S_in at inference (sec. 2.4);
during training it stays float (TF does not fake-quantize biases either); the integer path
(:mod:`qtrain.nn.integer_inference`) rounds it.

The running-variance update follows PyTorch's ``BatchNorm`` (momentum, unbiased variance
for the moving average, biased for normalisation; TF undoes the Bessel correction the same
way), so a conv -> BN checkpoint converts without changing its statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear, _adopt


class _FoldedBNMixin:
    """Shared folding math; ``_layer(x, w, b)`` is the conv / linear op, ``_stat_dims``
    the dims BatchNorm reduces over and ``_w_shape`` the weight's per-channel view."""

    bn: nn.modules.batchnorm._BatchNorm

    def _init_fold(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        if not bn.track_running_stats:
            raise ValueError("BN folding needs running statistics (track_running_stats=True)")
        self.bn = bn
        self.register_buffer("bn_frozen", torch.tensor(False))

    def freeze_bn(self, flag: bool = True) -> None:
        """Switch to the moving statistics and stop updating them (TF ``freeze_batch_norm_delay``)."""
        self.bn_frozen.fill_(bool(flag))

    # -- folded parameters (eq. 14) -------------------------------------------------
    def _gamma_beta(self):
        bn = self.bn
        c = bn.num_features
        gamma = bn.weight if bn.affine else torch.ones(c, device=bn.running_var.device)
        beta = bn.bias if bn.affine else torch.zeros(c, device=bn.running_var.device)
        return gamma, beta

    def _sigma_mv(self) -> torch.Tensor:
        return torch.sqrt(self.bn.running_var + self.bn.eps)

    def folded_weight(self) -> torch.Tensor:
        """w gamma / sigma_mv (float, before the weight quantizer)."""
        gamma, _ = self._gamma_beta()
        return self.weight * (gamma / self._sigma_mv()).reshape(self._w_shape)

    def folded_bias(self) -> torch.Tensor:
        """beta + gamma (b - mu_mv) / sigma_mv: the inference bias."""
        gamma, beta = self._gamma_beta()
        b = self.bias if self.bias is not None else torch.zeros_like(beta)
        return beta + gamma * (b - self.bn.running_mean) / self._sigma_mv()

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        w = self.folded_weight()
        return w if wq is None else wq(w)

    @torch.no_grad()
    def unfolded(self) -> QuantConv2d | QuantLinear:
        """The inference graph of this layer as a plain fake-quant layer (eq. 14): weight
        gamma w / sigma_mv, bias beta + gamma (b - mu_mv) / sigma_mv, the same weight and
        input quantizers (shared, not copied). In eval it computes what this layer computes
        in eval (after ``bn_freeze`` also in training); the packed export packs it."""
        if isinstance(self, nn.Conv2d):
            plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                              self.padding, self.dilation, self.groups, True, self.padding_mode,
                              device=self.weight.device, dtype=self.weight.dtype)
            make = QuantConv2d.from_float
        else:
            plain = nn.Linear(self.in_features, self.out_features, True,
                              device=self.weight.device, dtype=self.weight.dtype)
            make = QuantLinear.from_float
        plain.weight.copy_(self.folded_weight())
        plain.bias.copy_(self.folded_bias())
        return make(plain, self.weight_quantizer, self.act_quantizer).train(self.training)

    def _batch_stats(self, y: torch.Tensor):
        """Batch mean / biased variance of ``y`` per channel; updates the moving averages
        as PyTorch's BatchNorm (unbiased variance), counting batches."""
        bn = self.bn
        mean = y.mean(self._stat_dims)
        var = y.var(self._stat_dims, unbiased=False)
        n = y.numel() // y.shape[1]
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - f).add_(f * mean.detach())
            bn.running_var.mul_(1 - f).add_(f * var.detach() * n / max(n - 1, 1))
        return mean, var

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantized_input(x)
        shape = [1] * xq.dim()
        shape[1] = -1
        gamma, beta = self._gamma_beta()
        if self.training and not bool(self.bn_frozen):
            sigma_mv = self._sigma_mv().detach()  # the moving std before this batch's update
            # Fig. C.8: batch moments of the conv with float (unfolded) weights
            mean_b, var_b = self._batch_stats(self._layer(xq, self.weight, self.bias))
            sigma_b = torch.sqrt(var_b + self.bn.eps)
            w = self.weight * (gamma / sigma_mv).reshape(self._w_shape)
            wq = w if self.weight_quantizer is None else self.weight_quantizer(w)
            b = self.bias if self.bias is not None else torch.zeros_like(beta)
            y = self._layer(xq, wq, None) * (sigma_mv / sigma_b).reshape(shape)
            return y + (beta + gamma * (b - mean_b) / sigma_b).reshape(shape)
        return self._layer(xq, self.quantized_weight(), self.folded_bias())

    def storage_bits(self) -> int:
        """Folded layer at inference: quantized folded weight + int32 bias (sec. 2.4) +
        the input quantizer's calibrated range (fp32); gamma/beta/statistics are folded away."""
        wq = self.weight_quantizer
        w = self.weight
        bits = 32 * w.numel() if wq is None else wq.storage_bits(w)
        bits += 32 * self.bn.num_features
        aq = self.act_quantizer
        if aq is not None:
            bits += sum(32 * t.numel() for t in aq.parameters())
            bits += sum(32 * b.numel() for b in aq.buffers() if b.is_floating_point())
        return bits


class FoldedConvBN(_FoldedBNMixin, QuantConv2d):
    """Conv2d -> BatchNorm2d folded for QAT (module docstring). Shares the conv's and the
    BN's parameters and buffers (the BN module is kept as the child ``bn``)."""

    _stat_dims = (0, 2, 3)
    _w_shape = (-1, 1, 1, 1)

    def _layer(self, x, w, b):
        return self._conv_forward(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._folded_forward(x)

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight_quantizer=None,
                     act_quantizer=None) -> FoldedConvBN:
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BN folding: BatchNorm has {bn.num_features} features, conv "
                             f"{conv.out_channels} output channels")
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                      conv.padding_mode)
        _adopt(new, conv)
        new._init_quantizers(weight_quantizer, act_quantizer)
        new._init_fold(bn)
        new.bn_frozen = new.bn_frozen.to(conv.weight.device)
        return new


class FoldedLinearBN(_FoldedBNMixin, QuantLinear):
    """Linear -> BatchNorm1d (on (N, C) inputs) folded for QAT (module docstring)."""

    _stat_dims = (0,)
    _w_shape = (-1, 1)

    def _layer(self, x, w, b):
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"FoldedLinearBN takes (N, C) inputs (BatchNorm1d), got {tuple(x.shape)}")
        return self._folded_forward(x)

    @classmethod
    def from_linear_bn(cls, lin: nn.Linear, bn: nn.BatchNorm1d, weight_quantizer=None,
                       act_quantizer=None) -> FoldedLinearBN:
        if bn.num_features != lin.out_features:
            raise ValueError(f"BN folding: BatchNorm has {bn.num_features} features, linear "
                             f"{lin.out_features} outputs")
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        _adopt(new, lin)
        new._init_quantizers(weight_quantizer, act_quantizer)
        new._init_fold(bn)
        new.bn_frozen = new.bn_frozen.to(lin.weight.device)
        return new


FOLD_PAIRS = ((nn.Conv2d, nn.BatchNorm2d, FoldedConvBN.from_conv_bn),
              (nn.Linear, nn.BatchNorm1d, FoldedLinearBN.from_linear_bn))


def find_conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{layer name: BatchNorm name} for every Conv2d -> BatchNorm2d (Linear -> BatchNorm1d)
    where the BN is the layer's only consumer, found by tracing ``model`` with torch.fx
    (``nn.Sequential`` neighbours and attribute pairs like ResNet's conv1 / bn1 alike)."""
    from torch import fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.
        raise ConfigError(f"quant.fold_bn=true: {type(model).__name__} cannot be traced by "
                          f"torch.fx to find conv -> BatchNorm pairs ({type(e).__name__}: {e})") from None
    mods = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module":
            continue
        layer, bn = mods.get(node.target), mods.get(user.target)
        for lt, bt, _ in FOLD_PAIRS:
            if type(layer) is lt and type(bn) is bt:
                pairs[node.target] = user.target
    return pairs


def fold_bn_layer(layer: nn.Module, bn: nn.Module, weight_quantizer=None, act_quantizer=None):
    """The folded module for ``layer`` -> ``bn`` (see :data:`FOLD_PAIRS`)."""
    for lt, bt, make in FOLD_PAIRS:
        if type(layer) is lt and type(bn) is bt:
            return make(layer, bn, weight_quantizer, act_quantizer)
    raise ValueError(f"BN folding: no folded layer for {type(layer).__name__} -> "
                     f"{type(bn).__name__}; allowed: Conv2d -> BatchNorm2d, Linear -> BatchNorm1d")
