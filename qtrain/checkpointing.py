"""Checkpoint files that are written atomically, carry a checksum and say what wrote them.

:class:`VerifiedCheckpointIO` is the Lightning ``CheckpointIO`` plugin ``qtrain.run`` gives
every trainer, so every checkpoint (``ModelCheckpoint``'s, ``last.ckpt``, the one saved on a
signal, Lightning's SLURM ``hpc_ckpt_*``) goes through it:

- **atomic write**: the checkpoint is written to a temporary file in the target folder,
  flushed and fsynced, then renamed over the target (``os.replace``); a run killed while
  writing leaves the previous file intact, never a truncated one.
- **metadata** (``checkpoint["qtrain"]``): format version, recipe, method
  (``quant._target_``), model (``model._target_``/``model.name``) and every bit width in the
  ``quant`` and ``extra_callbacks`` configs (:func:`run_metadata`).
- **config** (``checkpoint["config"]``): the run's resolved Hydra config as plain
  containers, so a checkpoint says how it was trained without its run folder
  (:func:`checkpoint_config` reads it back).
- **checksum**: SHA-256 over every tensor (dtype, shape, raw bytes) and every other value of
  the checkpoint, in a canonical order, plus the metadata (:func:`checkpoint_checksum`).

On load (resume) the file is read with ``torch.load(weights_only=True)`` (no arbitrary
objects are unpickled), the checksum recomputed and the metadata compared with this run's:
a truncated, corrupt or foreign file, or one of another recipe / method / bit width, raises
one :class:`qtrain.errors.DataFileError` naming the file and what differs.

:func:`resolve_ckpt_path` turns ``ckpt_path=last`` or ``ckpt_path=<run dir>`` into the
run's ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from qtrain.atomic_file import open_atomic
from qtrain.errors import ConfigError, DataFileError

#: version of the qtrain checkpoint layout (the ``qtrain`` block and what it covers)
FORMAT_VERSION = 1
KEY = "qtrain"
CONFIG_KEY = "config"  # the resolved run config (plain containers)
LAST = "last.ckpt"


# ----------------------------------------------------------------------------- metadata
def _bit_widths(node: Any, prefix: str, out: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}"
            if "bits" in str(k) and not isinstance(v, dict):
                out[key] = v
            else:
                _bit_widths(v, key, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _bit_widths(v, f"{prefix}.{i}", out)


def run_metadata(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint of this run records and a resumed run must match: the recipe, the
    quantization method (``quant._target_``), the model and every ``*bits*`` key of the
    ``quant`` and ``extra_callbacks`` configs (bit widths, per-layer overrides)."""

    def get(key: str):
        v = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v

    bits: dict[str, Any] = {}
    for group in ("quant", "extra_callbacks"):
        _bit_widths(get(group), group, bits)
    model = get("model._target_")
    if get("model.name"):
        model = f"{model}:{get('model.name')}"
    return {"format_version": FORMAT_VERSION, "recipe": get("recipe_name"),
            "method": get("quant._target_"), "model": model, "bits": bits}


def describe_mismatch(saved: dict, expected: dict) -> list[str]:
    """``key: checkpoint X, this run Y`` for every metadata entry that differs."""
    out = []
    for key in ("format_version", "recipe", "method", "model"):
        if saved.get(key) != expected.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, this run {expected.get(key)!r}")
    sb, eb = saved.get("bits") or {}, expected.get("bits") or {}
    for key in sorted(set(sb) | set(eb)):
        if sb.get(key, "<unset>") != eb.get(key, "<unset>"):
            out.append(f"{key}: checkpoint {sb.get(key, '<unset>')!r}, "
                       f"this run {eb.get(key, '<unset>')!r}")
    return out


# ----------------------------------------------------------------------------- checksum
def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)};".encode())
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.Size)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:  # anything else a weights_only load can return: by type and value
        h.update(f"O{type(obj).__module__}.{type(obj).__qualname__}:{obj!r};".encode())


def checkpoint_checksum(checkpoint: dict, meta: dict) -> str:
    """SHA-256 over ``meta`` (JSON) and every entry of ``checkpoint`` but the ``qtrain``
    block: tensors by dtype, shape and raw bytes; containers in a canonical order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    _feed(h, {k: v for k, v in checkpoint.items() if k != KEY})
    return h.hexdigest()


# ----------------------------------------------------------------------------- read / write
def write_checkpoint(checkpoint: dict, path: str | os.PathLike, meta: dict | None = None) -> None:
    """``torch.save`` ``checkpoint`` plus its ``qtrain`` block (metadata + checksum) to
    ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``."""
    meta = dict(meta or {"format_version": FORMAT_VERSION})
    payload = {**checkpoint, KEY: {"meta": meta, "sha256": checkpoint_checksum(checkpoint, meta)}}
    with open_atomic(path) as f:
        torch.save(payload, f)


def _others(path: str) -> str:
    found = sorted(p for p in glob.glob(os.path.join(os.path.dirname(path) or ".", "*.ckpt"))
                   if os.path.abspath(p) != os.path.abspath(path))
    return (f"; other checkpoints in that folder: {', '.join(os.path.basename(p) for p in found)}"
            if found else "")


def read_checkpoint(path: str | os.PathLike, expected: dict | None = None,
                    map_location: Any = "cpu") -> dict:
    """Load a qtrain checkpoint and verify it: readable, written by qtrain (format
    :data:`FORMAT_VERSION`), checksum intact and, with ``expected`` (:func:`run_metadata` of
    this run), of the same recipe / method / model / bit widths. Raises one
    :class:`DataFileError` naming ``path`` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileError(f"checkpoint {path}: no such file{_others(path)}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise DataFileError(
                f"checkpoint {path}: holds Python objects other than tensors and plain values "
                "(qtrain checkpoints never do), so it was not written by qtrain or was altered; "
                "refusing to unpickle it" + _others(path)) from None
        raise DataFileError(f"checkpoint {path}: corrupt ({e}); the file is damaged, resume "
                            "from another checkpoint" + _others(path)) from None
    except Exception as e:  # zip directory missing (truncated), bad records, EOF, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataFileError(
            f"checkpoint {path}: cannot be read, the file is truncated or corrupt "
            f"({type(e).__name__}: {msg}); resume from another checkpoint" + _others(path)
        ) from None
    block = ckpt.get(KEY) if isinstance(ckpt, dict) else None
    if not isinstance(block, dict) or "sha256" not in block or "meta" not in block:
        raise DataFileError(
            f"checkpoint {path}: has no qtrain metadata and checksum (written by another tool "
            f"or a qtrain before checkpoint format {FORMAT_VERSION}); it cannot be verified, "
            "so it is not resumed from; start a new run")
    meta = block["meta"]
    if checkpoint_checksum(ckpt, meta) != block["sha256"]:
        raise DataFileError(
            f"checkpoint {path}: checksum mismatch (its tensors or values changed after it was "
            "written: the file is corrupt); resume from another checkpoint" + _others(path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataFileError(f"checkpoint {path}: format_version={meta.get('format_version')!r}; "
                            f"this qtrain reads {FORMAT_VERSION}")
    if expected is not None:
        diff = describe_mismatch(meta, expected)
        if diff:
            raise DataFileError(
                f"checkpoint {path} was written by another configuration: {'; '.join(diff)}. "
                "Resume with the checkpoint's recipe and settings (its run dir's "
                ".hydra/overrides.yaml), or start a new run without ckpt_path")
    return ckpt


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic writes with metadata and checksum
    (:func:`write_checkpoint`), verified reads (:func:`read_checkpoint`)."""

    def __init__(self, metadata: dict | None = None, config: dict | None = None) -> None:
        self.metadata = dict(metadata or {"format_version": FORMAT_VERSION})
        self.config = config
        self._preloaded: dict[str, dict] = {}

    def preload(self, path: str) -> None:
        """Read and verify ``path`` now (before data and model are built, so a bad file
        fails the run at once); the trainer's later load of that path gets this copy."""
        self._preloaded[os.path.realpath(path)] = read_checkpoint(path, self.metadata)

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("VerifiedCheckpointIO.save_checkpoint: storage_options not supported")
        if self.config is not None:
            checkpoint = {**checkpoint, CONFIG_KEY: self.config}
        write_checkpoint(checkpoint, path, self.metadata)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:  # Lightning's default is None; qtrain files never need it
            raise DataFileError(f"checkpoint {path}: qtrain reads checkpoints with "
                                "weights_only=True only")
        ckpt = self._preloaded.pop(os.path.realpath(os.fspath(path)), None)
        if ckpt is not None:
            return ckpt
        return read_checkpoint(path, self.metadata,
                               map_location if map_location is not None else "cpu")


def checkpoint_config(path: str | os.PathLike) -> dict:
    """The resolved config a qtrain checkpoint was trained with (verified file)."""
    ckpt = read_checkpoint(path)
    if CONFIG_KEY not in ckpt:
        raise DataFileError(f"checkpoint {path}: holds no run config (written before qtrain "
                            "stored it; the run folder's config_resolved.yaml has it)")
    return ckpt[CONFIG_KEY]


# ----------------------------------------------------------------------------- ckpt_path
def resolve_ckpt_path(value: Any, run_dir: str) -> str | None:
    """The checkpoint file ``ckpt_path`` names, or None (no resume):

    - ``last``: the newest ``checkpoints/last.ckpt`` of this run's folder or, failing that,
      of its sibling run folders (the earlier runs of the same recipe, ``runs/<recipe>/*``);
    - a run directory: its ``checkpoints/last.ckpt``;
    - a ``checkpoints/`` folder: its ``last.ckpt``;
    - a file: that file.

    A value that names nothing raises :class:`ConfigError` naming ``ckpt_path``."""
    if value is None or value == "":
        return None
    value = os.path.expanduser(str(value))
    if value == "last":
        own = os.path.join(run_dir, "checkpoints", LAST)
        if os.path.isfile(own):
            return own
        parent = os.path.dirname(os.path.abspath(run_dir))
        found = [p for p in glob.glob(os.path.join(parent, "*", "checkpoints", LAST))
                 if os.path.isfile(p)]
        if not found:
            raise ConfigError(
                f"ckpt_path=last: no {parent}/*/checkpoints/{LAST} (no earlier run of this "
                "recipe left a checkpoint); pass ckpt_path=<run dir> or a .ckpt file")
        return max(found, key=os.path.getmtime)
    if os.path.isdir(value):
        for cand in (os.path.join(value, "checkpoints", LAST), os.path.join(value, LAST)):
            if os.path.isfile(cand):
                return cand
        raise ConfigError(f"ckpt_path={value}: a folder without checkpoints/{LAST} or {LAST}; "
                          "pass a run dir, its checkpoints/ folder or a .ckpt file")
    if not os.path.isfile(value):
        raise ConfigError(f"ckpt_path={value}: no such file or folder (allowed: last, a run dir, "
                          "a checkpoints/ folder or a .ckpt file)")
    return value
