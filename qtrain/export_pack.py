"""What gets packed: :func:`pack_model` (a copy of a trained model with its quantized layers
replaced by packed layers, through the layer kinds and packers registered in
:mod:`qtrain.nn.packed_registry`; what each becomes: :mod:`qtrain.export`) and
:func:`check_packable` (the same registry asked before training)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qtrain.nn import packed_formats  # noqa: F401  (registers its packers)
from qtrain.nn.fake_quant import QuantConv2d, QuantLinear
from qtrain.nn.packed import PackedConv2d, PackedEmbedding, PackedLinear
from qtrain.nn.packed_registry import LAYERS, packer_for, settings_error
from qtrain.nn.packers import has_codebook, is_pq, unpackable_message


def _pack_one(m: nn.Module, name: str, bits, group_size, symmetric, backend, scale_dtype):
    """The first registered layer kind (qtrain.nn.packed_registry.LAYERS) matching ``m``
    packs it; convs and embeddings are wrapped around the packed flattened weight."""
    kind = next((k for k in LAYERS if k.matches(m, bits)), None)
    packed = None if kind is None else kind.pack(m, name, bits, group_size, symmetric,
                                                 backend, scale_dtype)
    if packed is None:
        return None
    if isinstance(m, nn.Conv2d):
        packed = PackedConv2d.wrap(packed, m)
        packed.act_quantizer = getattr(m, "act_quantizer", None)
    elif isinstance(m, nn.Embedding):
        packed = PackedEmbedding.wrap(packed, m)
    return packed


def check_packable(model: nn.Module) -> None:
    """Raise one ValueError naming every fake-quant layer whose weight quantizer
    :func:`pack_model` cannot pack (checked before training, so no run is lost to it)."""
    bad = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear | QuantConv2d) or is_pq(m):
            continue  # embeddings without a packer stay fake-quant layers (not an error)
        wq = m.weight_quantizer
        why = settings_error(wq) if wq is not None else None
        if wq is None or (packer_for(wq) is not None and why is None):
            continue
        bad.append((name, type(wq).__name__ + (f": {why}" if why else "")))
    if bad:
        raise ValueError(unpackable_message(bad))


def _share_tied(new: PackedLinear, earlier: list[PackedLinear]) -> None:
    """Point ``new``'s weight buffers at those of an earlier layer packed from the same
    float weight Parameter when they are equal (tied weights: written once, re-tied on load)."""
    mine = {k: b for k, b in new.named_buffers(recurse=False) if k != "bias"}
    for old in earlier:
        theirs = {k: b for k, b in old.named_buffers(recurse=False) if k != "bias"}
        if mine.keys() == theirs.keys() and all(
                mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape
                and torch.equal(mine[k], theirs[k]) for k in mine):
            for k, b in theirs.items():
                new.register_buffer(k, b)
            return


def _source(m: nn.Module) -> dict | None:
    """What a fake-quant layer was packed from: its weight quantizer's type and bit width,
    stored in the file to name what differs on load (None for PQ / plain layers)."""
    wq = getattr(m, "weight_quantizer", None)
    if wq is None:
        return None
    return {"weight_quantizer": type(wq).__name__, "bits": getattr(wq, "bits", None)}


@torch.no_grad()
def pack_model(model: nn.Module, bits: int | None = None, group_size: int | None = 128,
               symmetric: bool = False, backend: str = "auto",
               scale_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Copy of ``model`` with its quantized layers replaced by packed layers (module doc).

    ``scale_dtype``: precision of the stored scales / zero-points (uniform formats) and of
    binary / ternary alpha. float32 (default) is the precision the fake-quant forward used,
    so those layers reproduce the trained weight bit for bit; float16 (a named option) halves
    the scale storage at ~2^-11 relative error of every dequantized weight."""
    out = copy.deepcopy(model)
    users: dict[int, int] = {}
    packed_from: dict[int, list[PackedLinear]] = {}  # id(float weight) -> its packed layers
    for m in out.modules():
        if has_codebook(m):
            users[id(m.centroids)] = users.get(id(m.centroids), 0) + 1
    for name, m in list(out.named_modules()):
        if has_codebook(m) and users[id(m.centroids)] > 1:
            continue  # tied codebook: keep the PQ layers (one codebook in the file)
        folded = hasattr(m, "unfolded")  # qtrain.nn.bn_fold: pack the inference graph (eq. 14)
        new = _pack_one(m.unfolded() if folded else m, name, bits, group_size, symmetric,
                        backend, scale_dtype)
        if new is None:
            continue
        new.source = _source(m)
        if folded:  # the BN's name lets load_run drop it from a float architecture
            new.source["bn_folded"] = getattr(m, "bn_name", True)
        w = m._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            _share_tied(new, packed_from.setdefault(id(w), []))
            packed_from[id(w)].append(new)
        new.train(m.training)
        parent = out.get_submodule(name.rpartition(".")[0]) if "." in name else out
        if name == "":
            raise ValueError("pack_model: the model itself is a single layer; wrap it")
        setattr(parent, name.rpartition(".")[2], new)
    return out
