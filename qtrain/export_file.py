"""Writing and reading a packed ``.safetensors`` file: :func:`save_packed` (tensors written
once per tied group, uint8 PQ indices, metadata, SHA-256 :func:`checksum`, atomic write, size
report), :func:`storage_bits` (what it writes) and :func:`read_packed` (the metadata and
tensors back, version and checksum verified)."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from qtrain.atomic_file import write_atomic
from qtrain.errors import DataFileError
from qtrain.export_spec import packed_specs
from qtrain.nn.packers import has_codebook
from qtrain_kernels.layout import FORMAT_VERSION, LAYOUT


def storage_bits(model: nn.Module) -> int:
    """Bits of every tensor :func:`save_packed` writes (uint8 PQ indices: 8 bits each;
    a tensor shared by several keys, e.g. tied weights, once)."""
    compact = set(_compact_index_keys(model))
    state = model.state_dict()
    aliases = _aliases(state)
    return sum(t.numel() * (8 if k in compact else t.element_size() * 8)
               for k, t in state.items() if k not in aliases)


def _aliases(state: dict) -> dict[str, str]:
    """{key: earlier key holding the very same tensor data} (tied weights)."""
    first, out = {}, {}
    for k, t in state.items():
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype)
        if t.numel() and sig in first:
            out[k] = first[sig]
        else:
            first.setdefault(sig, k)
    return out


def _compact_index_keys(model: nn.Module) -> list[str]:
    """State-dict keys of PQ layers left unpacked (e.g. PQEmbedding, PQConv2d) whose int64
    assignments fit in uint8 (K <= 256): they are written as uint8 and widened on load."""
    return sorted(f"{n}.assignments" if n else "assignments" for n, m in model.named_modules()
                  if has_codebook(m) and m.centroids.shape[-2] <= 256
                  and m.assignments.dtype == torch.int64)


FILE_VERSION = "2"  # qtrain packed-file metadata: 2 = sha256 checksum + run info + sources


def checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over every metadata entry but ``sha256`` itself and every tensor's name, dtype,
    shape and raw bytes (sorted by name): what :func:`save_packed` stores as ``sha256`` and
    :func:`load_packed` recomputes."""
    h = hashlib.sha256()
    for k in sorted(meta):
        if k != "sha256":
            h.update(json.dumps([k, meta[k]]).encode())
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def save_packed(model: nn.Module, path: str | os.PathLike, run: dict | None = None) -> dict:
    """Write ``model``'s state dict + metadata to ``path`` (atomically: a temporary file in
    the same folder, then a rename); returns a size report.

    The metadata holds the kernel layout version, the per-layer specs (format, bits, what
    each layer was packed from, its activation quantizer), ``run`` (recipe / method / bit
    widths, :func:`run_info`) and a SHA-256 :func:`checksum` of the tensors and metadata."""
    raw = model.state_dict()
    aliases = _aliases(raw)
    state = {k: v.detach().contiguous().cpu() for k, v in raw.items() if k not in aliases}
    compact = [k for k in _compact_index_keys(model) if k not in aliases]
    for k in compact:
        state[k] = state[k].to(torch.uint8)
    meta = {"format_version": str(FORMAT_VERSION), "layout": LAYOUT,
            "file_version": FILE_VERSION, "run": _dumps(run or {}), "tied": _dumps(aliases),
            "layers": _dumps(packed_specs(model)), "uint8_indices": _dumps(compact)}
    meta["sha256"] = checksum(state, meta)
    write_atomic(save(state, metadata=meta), path)
    size = os.path.getsize(path)
    bits = storage_bits(model)
    return {"path": str(path), "file_bytes": size, "storage_bits": bits,
            "storage_bytes": bits // 8, "n_packed_layers": len(packed_specs(model))}


_REDO = "re-export it (python train.py ... export=true, or qtrain.export.save_packed)"


def read_packed(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a packed file, its version and checksum verified; every way a
    file can be unreadable (missing, truncated, not safetensors, edited) is one DataFileError
    naming the file."""
    if not os.path.isfile(path):
        raise DataFileError(f"packed file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise DataFileError(f"packed file {path} cannot be read as safetensors ({e}): it is "
                            f"truncated or not a packed file; {_REDO}") from None
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise DataFileError(f"packed file {path}: format_version="
                            f"{meta.get('format_version')!r}; expected {FORMAT_VERSION!r}")
    if meta.get("layout") != LAYOUT:
        raise DataFileError(f"packed file {path}: layout={meta.get('layout')!r}; "
                            f"expected {LAYOUT!r}")
    if meta.get("file_version") != FILE_VERSION or "sha256" not in meta:
        raise DataFileError(f"packed file {path}: file_version={meta.get('file_version')!r} "
                            f"without a checksum (this qtrain writes and reads version "
                            f"{FILE_VERSION!r}); {_REDO}")
    if checksum(tensors, meta) != meta["sha256"]:
        raise DataFileError(f"packed file {path}: SHA-256 checksum mismatch -- its tensors or "
                            f"metadata changed after it was written (corrupt copy); {_REDO}")
    return meta, tensors


def read_json(meta: dict, key: str, default: str, path):
    try:
        return json.loads(meta.get(key, default))
    except json.JSONDecodeError as e:
        raise DataFileError(f"packed file {path}: metadata {key!r} is not JSON ({e})") from None
