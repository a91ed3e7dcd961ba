"""Fake-quant layers: Linear / Conv2d / Embedding with a weight and an input quantizer.

Each layer is a subclass of its torch counterpart that *shares* the original Parameter
objects (conversion never copies or overwrites the float master weight) and computes its
forward with ``weight_quantizer(self.weight)`` and ``act_quantizer(input)``. Any
:class:`qtrain.nn.quantizer_base.Quantizer` can fill either slot (uniform, binary,
ternary, PACT, LSQ, FP8, ...); ``None`` means "keep float".

An activation quantizer may also scale the layer's output per position: XNOR-Net's K
(Rastegari et al. 2016 eq. 11; :class:`qtrain.nn.format_quantizers.XNORActQuantizer`)
depends on the layer's geometry, so the layer asks ``act_quantizer.input_scale(x, geometry)``
for it (:func:`input_scale`) and computes ``(x_q (*) w_q) . K + bias``.

Gradient quantization of the layer's output: DoReFa-Net (Zhou et al. 2016, Alg. 1; tensorpack
applies ``fg`` right after each quantized conv / fc) quantizes the gradient of the layer's
output, so the error entering both backward GEMMs is k-bit. An activation quantizer with a
``quantize_output_grad`` method (:class:`qtrain.nn.learned_quantizers.DoReFaActQuantizer`;
:class:`qtrain.nn.fp8_training.FP8TrainingQuantizer` rounds the error to E5M2 the same way,
Wang et al. 2018) gets the layer's output to wrap (:func:`output_grad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.quantizer_base import Quantizer


def input_scale(aq, x: torch.Tensor, geometry: dict | None = None) -> torch.Tensor | None:
    """The output scale K an activation quantizer asks for (None: none). ``geometry`` is
    :func:`conv_geometry` of a convolution, None for a linear layer."""
    fn = getattr(aq, "input_scale", None)
    return None if fn is None else fn(x, geometry)


def output_grad(quantizers, y: torch.Tensor) -> torch.Tensor:
    """``y`` with the gradient quantizer of the first of ``quantizers`` (act, then weight)
    that has one (DoReFa's k-bit gradients, FP8 training's E5M2 error); at most one per layer."""
    for q in quantizers:
        fn = getattr(q, "quantize_output_grad", None)
        if fn is not None:
            return fn(y)
    return y


def conv_geometry(conv: nn.Conv2d) -> dict:
    return {"kernel_size": tuple(conv.kernel_size), "stride": conv.stride,
            "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "out_channels": conv.out_channels, "padding_mode": conv.padding_mode}


def scaled_output(y: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, channel_dim: int):
    """``y . K + bias`` (bias broadcast along ``channel_dim``)."""
    y = y * k
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.reshape(shape)


class _FakeQuantMixin:
    weight_quantizer: Quantizer | None
    act_quantizer: Quantizer | None

    def _init_quantizers(self, weight_quantizer, act_quantizer) -> None:
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        return self.weight if wq is None else wq(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.act_quantizer
        return x if aq is None else aq(x)

    def quantizers(self):
        return [q for q in (self.weight_quantizer, self.act_quantizer) if q is not None]

    def storage_bits(self) -> int:
        """Bits to store this layer's own parameters: quantized weight + fp32 bias, plus the
        activation quantizer's learned parameters and calibrated float buffers (fp32)."""
        wq = self.weight_quantizer
        bits = 32 * self.weight.numel() if wq is None else wq.storage_bits(self.weight)
        bias = getattr(self, "bias", None)
        if bias is not None:
            bits += 32 * bias.numel()
        for name, p in self.named_parameters(recurse=True):
            # learned activation-quantizer parameters (PACT alpha, LSQ step); the weight
            # quantizer's own parameters are already in its storage_bits()
            if name not in ("weight", "bias") and not name.startswith("weight_quantizer."):
                bits += 32 * p.numel()
        aq = getattr(self, "act_quantizer", None)
        if aq is not None:
            # the input quantizer's calibrated range (EMA min/max, clip values, ...) is needed
            # at inference to quantize the layer input: its float buffers at fp32
            bits += sum(32 * b.numel() for b in aq.buffers() if b.is_floating_point())
        return bits


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make ``new`` share ``old``'s parameters and buffers (no copies) and train mode."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    new.train(old.training)
    return new


class QuantLinear(_FakeQuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = input_scale(self.act_quantizer, x)
        if k is None:
            y = F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)
        else:
            y = F.linear(self.quantized_input(x), self.quantized_weight())
            y = scaled_output(y, k, self.bias, -1)
        return output_grad((self.act_quantizer, self.weight_quantizer), y)

    @classmethod
    def from_float(cls, m: nn.Linear, weight_quantizer=None, act_quantizer=None) -> QuantLinear:
        with torch.device("meta"):
            new = cls(m.in_features, m.out_features, bias=m.bias is not None)
        _adopt(new, m)
        new._init_quantizers(weight_quantizer, act_quantizer)
        return new


class QuantConv2d(_FakeQuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = input_scale(self.act_quantizer, x, conv_geometry(self))
        if k is None:
            y = self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
        else:
            y = self._conv_forward(self.quantized_input(x), self.quantized_weight(), None)
            y = scaled_output(y, k, self.bias, 1)
        return output_grad((self.act_quantizer, self.weight_quantizer), y)

    @classmethod
    def from_float(cls, m: nn.Conv2d, weight_quantizer=None, act_quantizer=None) -> QuantConv2d:
        with torch.device("meta"):
            new = cls(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                m.dilation, m.groups, m.bias is not None, m.padding_mode,
            )
        _adopt(new, m)
        new._init_quantizers(weight_quantizer, act_quantizer)
        return new


class QuantEmbedding(_FakeQuantMixin, nn.Embedding):
    """Embedding with a quantized table (the input is indices: no activation quantizer)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            idx, self.quantized_weight(), self.padding_idx, self.max_norm,
            self.norm_type, self.scale_grad_by_freq, self.sparse,
        )

    @classmethod
    def from_float(cls, m: nn.Embedding, weight_quantizer=None, act_quantizer=None):
        if act_quantizer is not None:
            raise ValueError("QuantEmbedding takes indices as input: act_quantizer must be None")
        with torch.device("meta"):
            new = cls(
                m.num_embeddings, m.embedding_dim, m.padding_idx, m.max_norm, m.norm_type,
                m.scale_grad_by_freq, m.sparse,
            )
        _adopt(new, m)
        new._init_quantizers(weight_quantizer, None)
        return new


FAKE_QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Embedding: QuantEmbedding}


def is_fake_quant(m: nn.Module) -> bool:
    return isinstance(m, _FakeQuantMixin)
