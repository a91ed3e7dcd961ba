"""Product-quantized layers: trainable centroids, frozen assignments (Stock et al. 2019).

A PQ layer stores its weight as a codebook ``centroids`` (K, block_size) -- an
``nn.Parameter`` finetuned by the optimizer -- and ``assignments`` (one long index per block
of ``block_size`` consecutive input columns, a frozen buffer). The weight used in the
forward is ``centroids[assignments]`` reshaped to the float layer's shape
(:func:`qtrain.quant.kmeans.pq_reconstruct`).

Centroid gradient (Stock 2019, sec. 3.3 "finetuning the codebook"): the gradient of a
centroid is the *average* of the gradients of the blocks assigned to it (autograd would
give the sum). fairseq applied the averaging in its conv layer only; here every PQ layer
type (Linear, Conv2d, Embedding) uses the same averaging gather (:class:`_AvgGather`).

Tied weights (an LM's embedding and output projection sharing one Parameter, fairseq's
``share_decoder_input_output_embed`` / HF ``tie_word_embeddings``): :func:`pq_tied` builds
the PQ layer of the second user from the *same* ``centroids`` Parameter and ``assignments``
buffer as the first, so both uses reconstruct the same weight and the shared centroids get
the gradient of both (the sum of the two per-use block averages, as a tied float weight gets
the sum of both uses' gradients). :func:`tied_partners` finds the other users of a weight.

Per-segment codebooks (Gong et al. 2014 sec. 3.3, :mod:`qtrain.quant.pq_segments`): a PQ
layer built with ``centroids`` of shape (S, K, block_size) gives each column segment s (the
block position within a row) its own codebook; ``assignments`` stay one index per block
(row-major), and the gather reads ``centroids[s, a]``. The post-training VQ callback uses
this by default; iPQ (Stock et al. 2019) keeps one codebook per layer (K, block_size).

Common duck-typed interface (used by the export code): ``centroids``, ``assignments``,
``block_size``, ``n_centroids``, ``n_segments``, ``weight_from_codebook()``,
``storage_bits()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.convert import layer_class_for
from qtrain.quant import kmeans as KM
from qtrain.quant import pq_segments as PS


class _AvgGather(torch.autograd.Function):
    """``centroids[index]`` whose backward averages (not sums) the gradient per centroid."""

    @staticmethod
    def forward(ctx, centroids, index, counts):
        ctx.save_for_backward(index, counts)
        ctx.k = centroids.shape[0]
        return centroids[index]

    @staticmethod
    def backward(ctx, grad):
        index, counts = ctx.saved_tensors
        bs = grad.shape[-1]
        g = torch.zeros(ctx.k, bs, dtype=grad.dtype, device=grad.device)
        g.index_add_(0, index.reshape(-1), grad.reshape(-1, bs))
        return g / counts.clamp_min(1).to(grad.dtype)[:, None], None, None


class _PQMixin(nn.Module):
    centroids: nn.Parameter
    assignments: torch.Tensor

    def _init_codebook(self, centroids: torch.Tensor, assignments: torch.Tensor,
                       block_size: int) -> None:
        self.block_size = int(block_size)
        n_blocks = math.prod(self.weight_shape) // self.block_size
        per_row = n_blocks // self.weight_shape[0]
        if centroids.dim() not in (2, 3) or centroids.shape[-1] != self.block_size or (
                centroids.dim() == 3 and centroids.shape[0] != per_row):
            raise ValueError(f"{type(self).__name__}: centroids {tuple(centroids.shape)} must be "
                             f"(K, {self.block_size}) or one codebook per column segment "
                             f"({per_row}, K, {self.block_size})")
        if assignments.numel() != n_blocks:
            raise ValueError(f"{type(self).__name__}: {assignments.numel()} assignments for "
                             f"{n_blocks} blocks of weight {tuple(self.weight_shape)}")
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("assignments", assignments.detach().to(torch.long).reshape(-1).clone())

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[-2]

    @property
    def n_segments(self) -> int:
        """Codebooks: 1 (shared by all blocks) or one per column segment (Gong 2014)."""
        return self.centroids.shape[0] if self.centroids.dim() == 3 else 1

    def _flat(self, index: torch.Tensor) -> torch.Tensor:
        """Row-major block indices -> rows of ``centroids.reshape(-1, block_size)``."""
        if self.centroids.dim() == 2:
            return index
        seg = torch.arange(index.shape[-1], device=index.device) if index.dim() > 1 else None
        if seg is None:
            return PS.flat_index(index, self.n_segments, self.n_centroids)
        return index + self.n_centroids * seg  # (..., per_row) codes of whole rows

    def counts(self) -> torch.Tensor:
        """Number of blocks assigned to each centroid (K,) or (S * K,) per segment."""
        n = self.n_segments * self.n_centroids
        return torch.bincount(self._flat(self.assignments), minlength=n)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        flat = self.centroids.reshape(-1, self.block_size)
        return _AvgGather.apply(flat, self._flat(index), self.counts())

    def weight_from_codebook(self) -> torch.Tensor:
        """Reconstructed float weight ``centroids[assignments]`` in the layer's weight shape."""
        return self._gather(self.assignments).reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:  # read-only view for code that reads ``.weight``
        return self.weight_from_codebook()

    def storage_bits(self) -> int:
        """log2(K) bits per block index + fp16 centroids (all S codebooks) + fp32 bias
        (Stock 2019, sec. 4; Gong 2014 sec. 3.3)."""
        bits = PS.storage_bits(self.assignments.numel(), self.n_segments, self.n_centroids,
                               self.block_size)
        bias = getattr(self, "bias", None)
        return bits + (32 * bias.numel() if bias is not None else 0)

    @staticmethod
    def _fit(module, block_size, n_centroids, n_iter, seed, sample_inputs, row_weight, name):
        return KM.pq_fit(module.weight.detach(), block_size, n_centroids, n_iter, seed,
                         sample_inputs=sample_inputs, row_weight=row_weight, name=name)

    def extra_repr(self) -> str:
        return (f"weight_shape={tuple(self.weight_shape)}, block_size={self.block_size}, "
                f"n_centroids={self.n_centroids}, n_segments={self.n_segments}")


def _adopt_bias(new: nn.Module, old: nn.Module) -> None:
    b = getattr(old, "bias", None)
    if isinstance(b, nn.Parameter):
        new.bias = b
    else:
        new.register_parameter("bias", None)


class PQLinear(_PQMixin):
    def __init__(self, old: nn.Linear, centroids, assignments, block_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = old.in_features, old.out_features
        self.weight_shape = (old.out_features, old.in_features)
        self._init_codebook(centroids, assignments, block_size)
        _adopt_bias(self, old)
        self.train(old.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_from_codebook(), self.bias)

    @classmethod
    def from_float(cls, module: nn.Linear, block_size: int = 8, n_centroids: int = 256,
                   n_iter: int = 20, seed: int = 0, sample_inputs=None, name: str = "linear"):
        """Fit k-means on ``module.weight`` (sample_inputs: (n, in) layer inputs for the
        activation-aware objective) and return the PQ layer (shares ``module.bias``)."""
        r = cls._fit(module, block_size, n_centroids, n_iter, seed, sample_inputs, None, name)
        return cls(module, r.centroids, r.assignments, block_size)


class PQConv2d(_PQMixin):
    """Conv2d with a PQ weight; blocks run along the flattened ``in_channels*kh*kw`` axis
    (kill-the-bits: 3x3 -> block 9 = one whole kernel, 1x1 -> block 4 input channels)."""

    def __init__(self, old: nn.Conv2d, centroids, assignments, block_size: int) -> None:
        super().__init__()
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, a, getattr(old, a))
        self.weight_shape = tuple(old.weight.shape)
        self._init_codebook(centroids, assignments, block_size)
        _adopt_bias(self, old)
        self.train(old.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_from_codebook()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_float(cls, module: nn.Conv2d, block_size: int | None = None, n_centroids: int = 256,
                   n_iter: int = 20, seed: int = 0, sample_inputs=None, name: str = "conv"):
        """``block_size`` None: kh*kw for k>1 kernels (9 for 3x3), 4 for 1x1.
        ``sample_inputs``: unfolded patches (n*L, in*kh*kw) or raw inputs (n, C, H, W)."""
        if block_size is None:
            kk = module.kernel_size[0] * module.kernel_size[1]
            block_size = kk if kk > 1 else 4
        if sample_inputs is not None and sample_inputs.dim() == 4:
            sample_inputs = unfold_inputs(module, sample_inputs)
        r = cls._fit(module, block_size, n_centroids, n_iter, seed, sample_inputs, None, name)
        return cls(module, r.centroids, r.assignments, block_size)


def unfold_inputs(conv: nn.Conv2d, x: torch.Tensor, max_rows: int = 65536) -> torch.Tensor:
    """Input patches of ``conv`` as rows (n*L, in*kh*kw) (at most ``max_rows``, evenly spaced)."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        pad = 0
    else:
        pad = conv.padding
    if isinstance(pad, str):
        raise ValueError("unfold_inputs: string padding ('same'/'valid') is not supported")
    if conv.groups != 1:
        raise ValueError("activation-aware PQ of grouped convolutions is not supported")
    cols = F.unfold(x, conv.kernel_size, conv.dilation, pad, conv.stride)  # (n, C*k*k, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if rows.shape[0] > max_rows:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows).long()]
    return rows


class PQEmbedding(_PQMixin):
    """Embedding table with a PQ weight; blocks along ``embedding_dim``. Only the looked-up
    rows are reconstructed in the forward (no full-table gather)."""

    def __init__(self, old: nn.Embedding, centroids, assignments, block_size: int) -> None:
        super().__init__()
        if old.max_norm is not None:
            raise ValueError("PQEmbedding: max_norm (in-place renormalisation) is not supported")
        self.num_embeddings, self.embedding_dim = old.num_embeddings, old.embedding_dim
        self.padding_idx = old.padding_idx
        self.weight_shape = (old.num_embeddings, old.embedding_dim)
        self._init_codebook(centroids, assignments, block_size)
        self.train(old.training)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        per_row = self.embedding_dim // self.block_size
        codes = self.assignments.view(self.num_embeddings, per_row)[idx]  # (..., per_row)
        out = self._gather(codes).reshape(*idx.shape, self.embedding_dim)
        if self.padding_idx is not None:  # like nn.Embedding: no gradient from padding
            pad = (idx == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, out.detach(), out)
        return out

    @classmethod
    def from_float(cls, module: nn.Embedding, block_size: int = 8, n_centroids: int = 256,
                   n_iter: int = 20, seed: int = 0, sample_inputs=None, name: str = "embedding"):
        """``sample_inputs``: optional token indices; each row's blocks are then weighted by
        the token's frequency (the activation-aware objective for a one-hot input)."""
        row_weight = None
        if sample_inputs is not None:
            row_weight = torch.bincount(sample_inputs.reshape(-1).long(),
                                        minlength=module.num_embeddings).float()
            row_weight = row_weight + 1e-3  # unseen tokens still get a nearest centroid
        r = cls._fit(module, block_size, n_centroids, n_iter, seed, None, row_weight, name)
        return cls(module, r.centroids, r.assignments, block_size)


PQ_TYPES = {nn.Linear: PQLinear, nn.Conv2d: PQConv2d, nn.Embedding: PQEmbedding}


def pq_class_for(module: nn.Module):
    return layer_class_for(module, PQ_TYPES, "PQ")


def is_pq(module: nn.Module) -> bool:
    return isinstance(module, _PQMixin)


def pq_from_state(module: nn.Module, centroids: torch.Tensor, assignments: torch.Tensor):
    """PQ layer for float ``module`` with a given codebook (loading a compressed checkpoint)."""
    block_size = centroids.shape[-1]
    return pq_class_for(module)(module, centroids, assignments, block_size)


def _weight_param(module: nn.Module):
    return module._parameters.get("weight")


def tied_partners(model: nn.Module, module: nn.Module) -> list[str]:
    """Names of the other (non-PQ) layers of ``model`` whose ``weight`` Parameter is the
    very Parameter of ``module`` (weight tying)."""
    w = _weight_param(module)
    if w is None:
        return []
    return [n for n, m in model.named_modules()
            if m is not module and not is_pq(m) and _weight_param(m) is w]


def pq_tied(module: nn.Module, source: nn.Module) -> nn.Module:
    """PQ layer for ``module`` (Linear / Embedding / Conv2d) tied to the PQ layer ``source``:
    it holds the same ``centroids`` Parameter and ``assignments`` buffer (no copy)."""
    shape = tuple(module.weight.shape)
    if not is_pq(source) or shape != tuple(source.weight_shape):
        raise ValueError(f"pq_tied: cannot tie a {type(module).__name__} of weight shape {shape} "
                         f"to {type(source).__name__} "
                         f"{tuple(getattr(source, 'weight_shape', ()))}")
    new = pq_class_for(module)(module, source.centroids.detach(), source.assignments,
                               source.block_size)
    new.centroids = source.centroids
    new.assignments = source.assignments
    return new


def rebuild_pq_layers(model: nn.Module, state_dict, prefix: str = "") -> list[str]:
    """Replace every float layer of ``model`` whose entry in ``state_dict`` holds
    ``<name>.centroids``/``<name>.assignments`` by the matching PQ layer (in place).

    Lets a checkpoint of a (partly) product-quantized model load back into the float
    architecture. Layers tied in ``model`` (same weight Parameter) whose saved codebooks are
    equal are rebuilt tied (:func:`pq_tied`); saved codebooks that differ stay separate.
    Returns the names of the rebuilt layers.
    """
    from qtrain.nn.convert import set_submodule

    rebuilt, by_weight = [], {}
    for name, m in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        if (is_pq(m) or not isinstance(m, tuple(PQ_TYPES)) or f"{key}centroids" not in state_dict
                or f"{key}assignments" not in state_dict):
            continue  # (e.g. a packed codebook layer also stores ``centroids``)
        c, a = state_dict[f"{key}centroids"], state_dict[f"{key}assignments"]
        w = _weight_param(m)
        src = by_weight.get(id(w)) if w is not None else None
        if (src is not None and src.centroids.shape == c.shape
                and torch.equal(src.centroids.detach().cpu(), c.detach().cpu())
                and torch.equal(src.assignments.cpu(), a.reshape(-1).to(torch.long).cpu())):
            new = pq_tied(m, src)
        else:
            new = pq_from_state(m, c, a)
            if w is not None:
                by_weight.setdefault(id(w), new)
        set_submodule(model, name, new)
        rebuilt.append(name)
    return rebuilt
