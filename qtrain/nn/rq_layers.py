"""Residual-quantized (RQ) layers for post-training vector quantization (Gong, Liu, Yang &
Bourdev 2014, "Compressing Deep Convolutional Networks using Vector Quantization", sec. 3.4
"residual quantization"; Chen et al. 2010).

The weight, reshaped to ``(out, in_flat)`` (conv: ``in * kh * kw``), is cut into sub-vectors
of ``block_size`` consecutive input columns (as PQ, :func:`qtrain.quant.kmeans.blocks_of`).
Stage 1 clusters the sub-vectors with k-means (K centroids); stage m clusters the residual
``w - sum_{l<m} c^l_{a_l}`` left by the stages before it (:func:`qtrain.quant.kmeans.rq_fit`).
The reconstruction is the sum over stages of each block's stage centroid (Gong 2014, eq. (5)):

    w_hat_j = sum_{m=1..M} c^m[a_m(j)].

Post-training only: the centroids are frozen buffers, nothing is retrained after the
clustering (that is what separates Gong 2014 from iPQ / Deep Compression). The centroids are
rounded to float16 when the layer is built (``fp16=True``), so the layer computes exactly
what the packed ``rq`` file stores (:mod:`qtrain.nn.packed_rq`).

Storage (``storage_bits``): ``M * (n_blocks * ceil(log2 K) + 16 * K * block_size)`` plus a
float32 bias: every stage stores one index per block and its own fp16 codebook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.convert import layer_class_for
from qtrain.nn.pq_layers import _adopt_bias
from qtrain.quant import kmeans as KM


def rq_storage_bits(n_blocks: int, n_stages: int, n_centroids: int, block_size: int) -> int:
    """M * (ceil(log2 K) bits per block index + K * bs fp16 centroids) (no bias)."""
    per_stage = KM.pq_storage_bits(n_blocks, n_centroids, block_size)
    return n_stages * per_stage


class _RQMixin(nn.Module):
    """Buffers: ``stage_centroids`` (M, K, bs) float32 and ``stage_codes`` (M, n_blocks) long.

    (Named unlike a PQ layer's ``centroids`` / ``assignments`` on purpose: the PQ export and
    checkpoint helpers must not mistake an RQ layer for a PQ one.)"""

    stage_centroids: torch.Tensor
    stage_codes: torch.Tensor
    weight_shape: tuple

    def _init_stages(self, books, codes, block_size: int, fp16: bool = True) -> None:
        books = torch.stack(list(books)) if isinstance(books, (list, tuple)) else books
        codes = torch.stack(list(codes)) if isinstance(codes, (list, tuple)) else codes
        numel = math.prod(self.weight_shape)
        if books.dim() != 3 or books.shape[2] != block_size:
            raise ValueError(f"RQ layer: stage centroids must be (M, K, block_size={block_size}), "
                             f"got {tuple(books.shape)}")
        if codes.shape != (books.shape[0], numel // block_size):
            raise ValueError(f"RQ layer: stage codes must be (M={books.shape[0]}, n_blocks="
                             f"{numel // block_size}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= books.shape[1]):
            raise ValueError(f"RQ layer: stage codes must lie in [0, {books.shape[1] - 1}]")
        self.block_size = int(block_size)
        b = books.detach().float()
        self.register_buffer("stage_centroids", (b.half().float() if fp16 else b).clone())
        self.register_buffer("stage_codes", codes.detach().to(torch.long).clone())

    @property
    def n_stages(self) -> int:
        return self.stage_centroids.shape[0]

    @property
    def n_centroids(self) -> int:
        return self.stage_centroids.shape[1]

    def weight_from_stages(self, n_stages: int | None = None) -> torch.Tensor:
        """``sum_m stage_centroids[m][stage_codes[m]]`` (first ``n_stages`` stages) in the
        layer's weight shape."""
        m = self.n_stages if n_stages is None else n_stages
        books, codes = self.stage_centroids[:m], self.stage_codes[:m]
        stage = torch.arange(m, device=codes.device)[:, None]
        return books[stage, codes].sum(0).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:  # read-only, for code that reads ``.weight``
        return self.weight_from_stages()

    def storage_bits(self) -> int:
        """M stages x (ceil(log2 K) bits per block + K * bs fp16 centroids) + fp32 bias."""
        bits = rq_storage_bits(self.stage_codes.shape[1], self.n_stages, self.n_centroids,
                               self.block_size)
        bias = getattr(self, "bias", None)
        return bits + (32 * bias.numel() if bias is not None else 0)

    @classmethod
    def from_float(cls, module: nn.Module, block_size: int = 8, n_stages: int = 2,
                   n_centroids: int = 256, n_iter: int = 20, seed: int = 0,
                   name: str = "layer", fp16: bool = True):
        """Residual k-means of ``module.weight`` (:func:`qtrain.quant.kmeans.rq_fit`); the new
        layer shares ``module.bias``. No retraining (post-training, Gong 2014)."""
        books, codes = KM.rq_fit(module.weight.detach(), block_size, n_stages, n_centroids,
                                 n_iter, seed, name=name)
        return cls(module, books, codes, block_size, fp16)

    def extra_repr(self) -> str:
        return (f"weight_shape={tuple(self.weight_shape)}, block_size={self.block_size}, "
                f"n_stages={self.n_stages}, n_centroids={self.n_centroids}")


class RQLinear(_RQMixin):
    def __init__(self, old: nn.Linear, books, codes, block_size: int, fp16: bool = True):
        super().__init__()
        self.in_features, self.out_features = old.in_features, old.out_features
        self.weight_shape = (old.out_features, old.in_features)
        self._init_stages(books, codes, block_size, fp16)
        _adopt_bias(self, old)
        self.train(old.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_from_stages(), self.bias)


class RQConv2d(_RQMixin):
    """Conv2d with an RQ weight; blocks run along the flattened ``in * kh * kw`` axis."""

    def __init__(self, old: nn.Conv2d, books, codes, block_size: int, fp16: bool = True):
        super().__init__()
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, a, getattr(old, a))
        self.weight_shape = tuple(old.weight.shape)
        self._init_stages(books, codes, block_size, fp16)
        _adopt_bias(self, old)
        self.train(old.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_from_stages()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


RQ_TYPES = {nn.Linear: RQLinear, nn.Conv2d: RQConv2d}


def rq_class_for(module: nn.Module):
    return layer_class_for(module, RQ_TYPES, "RQ")


def is_rq(module: nn.Module) -> bool:
    return isinstance(module, _RQMixin)


def rebuild_rq_layers(model: nn.Module, state_dict, prefix: str = "") -> list[str]:
    """Replace every plain float Linear / Conv2d of ``model`` whose ``state_dict`` entry holds
    ``<name>.stage_centroids`` / ``<name>.stage_codes`` by an RQ layer of those shapes (in
    place), so an RQ checkpoint loads into the float architecture. Returns the names."""
    from qtrain.nn.convert import set_submodule

    out = []
    for name, m in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        if type(m) not in RQ_TYPES or f"{key}stage_centroids" not in state_dict \
                or f"{key}stage_codes" not in state_dict:
            continue
        books, codes = state_dict[f"{key}stage_centroids"], state_dict[f"{key}stage_codes"]
        new = RQ_TYPES[type(m)](m, books, codes, books.shape[2], fp16=False)
        set_submodule(model, name, new)
        out.append(name)
    return out
