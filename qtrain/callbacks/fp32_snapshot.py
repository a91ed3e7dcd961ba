"""The FP32 snapshot of a method callback: the weights at the end of the FP32 phase, kept in a
file of the run dir instead of inside every checkpoint.

The QAT, INQ, ELQ and Deep Compression callbacks keep the module's ``state_dict`` at the end
of their FP32 phase (``fp32_state``): the run summary tests it as its FP32 row
(``fp32_source = "FP32 phase's last weights"``, :func:`qtrain.run.train`). Stored inside the
callback's checkpoint state, every checkpoint of the run carried the model a second time.
:class:`FP32Snapshot` keeps the tensors in memory (on CPU) for the run and writes them once:

- **with the first checkpoint after the FP32 phase** (:meth:`FP32Snapshot.take` keeps the
  tensors, :meth:`FP32Snapshot.ref` writes them): ``<run dir>/fp32_snapshot_<tag>.safetensors``
  (``trainer.default_root_dir``; ``<tag>``: the callback, so two snapshotting callbacks never
  share a file), written atomically (temporary file in the same folder, fsync,
  ``os.replace``) by global rank 0 before the checkpoint that references it; a run that never
  checkpoints writes no file;
- **in the checkpoint** (:meth:`FP32Snapshot.ref`): only a reference, ``{"file": <name>,
  "sha256": <SHA-256 of the file's bytes>, "bytes": <size>, "tensors": <count>}`` -- no path, so
  a run folder can be moved, and an uninterrupted and a resumed run write the same state;
- **on resume** (:meth:`FP32Snapshot.restore`, from the callback's ``load_state_dict``): the file
  is looked up next to the checkpoint being resumed (its folder, then the folder above it: the
  run dir of ``<run dir>/checkpoints/*.ckpt``) and in the resuming run's dir, its SHA-256 and
  size checked, and the tensors loaded; a missing file raises :class:`MissingFileError`, a
  changed or unreadable one :class:`DataFileError`, each naming the file(s). A run resumed into
  a new run dir (``ckpt_path=last``) writes its own copy there with its first checkpoint, so
  each run dir's checkpoints find the snapshot in that run dir.

The bytes are deterministic (safetensors orders the tensors by dtype and name; the metadata
has a single key), so the reference -- and the checkpoint -- of a resumed run equals the
uninterrupted run's bitwise.

Checkpoints written before this module (``fp32_state`` inline in the callback's state) still
resume: :meth:`FP32Snapshot.restore` takes the inline tensors.

Under DDP every rank keeps its own in-memory snapshot (as before); rank 0's file is the one the
checkpoints (written by rank 0) reference, and every rank reads it on resume (checkpoints and
run dir on a shared file system, as resuming needs anyway).
"""

from __future__ import annotations

import hashlib
import os
import weakref

import torch

from qtrain.atomic_file import write_atomic
from qtrain.errors import DataFileError, MissingFileError

KEY = "fp32_snapshot"  # the reference's key in a callback's state_dict
LEGACY_KEY = "fp32_state"  # older checkpoints: the tensors inline


def file_name(tag: str) -> str:
    return f"fp32_snapshot_{tag}.safetensors"


def serialize(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``state`` (tensors only; CPU, contiguous copies)."""
    from safetensors.torch import save

    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"FP32 snapshot: state_dict entries {bad[:3]} are not tensors "
                        "(a module's get_extra_state?); a snapshot file holds tensors only")
    # one metadata key: safetensors writes that map in hash order (two keys: bytes vary)
    return save({k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                 for k, v in state.items()}, metadata={"format": "pt"})


class FP32Snapshot:
    """One callback's FP32 snapshot (module docstring). ``state``: the tensors (None before
    the FP32 phase ends, and in runs without one).

    A callback calls :meth:`bind` in ``setup``, :meth:`take` when its FP32 phase ends, puts
    :meth:`ref` into its ``state_dict`` under :data:`KEY` (Lightning builds that state before
    it writes the checkpoint) and calls :meth:`restore` with its state in ``load_state_dict``."""

    def __init__(self, tag: str) -> None:
        self.name = file_name(tag)
        self.state: dict[str, torch.Tensor] | None = None
        self.run_dir: str | None = None  # where this run writes (trainer.default_root_dir)
        self._writer = True  # global rank 0
        self._trainer = None  # weak reference: trainer.ckpt_path while a checkpoint is restored
        self._ref: dict | None = None  # the reference of the bytes written (or read)
        self._in: str | None = None  # the folder that holds that file for this run

    def __getstate__(self) -> dict:  # picklable (ddp_spawn): without the trainer's weakref
        return {**self.__dict__, "_trainer": None}

    def bind(self, trainer) -> None:
        """The run's trainer (from the callback's ``setup``): its run dir, rank and, during a
        resume, the checkpoint's path."""
        if trainer is None:
            return
        self.run_dir = os.path.abspath(trainer.default_root_dir)
        self._writer = bool(trainer.is_global_zero)
        self._trainer = weakref.ref(trainer)

    def take(self, trainer, pl_module) -> None:
        """The FP32 phase ends: keep a CPU copy of ``pl_module.state_dict()`` (the file is
        written by the next :meth:`ref`)."""
        self.bind(trainer)
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        self._ref = None

    def _persist(self) -> None:
        data = serialize(self.state)
        self._ref = {"file": self.name, "sha256": hashlib.sha256(data).hexdigest(),
                     "bytes": len(data), "tensors": len(self.state)}
        self._in = self.run_dir or os.getcwd()
        if self._writer:
            write_atomic(data, os.path.join(self._in, self.name))

    def ref(self) -> dict | None:
        """What a checkpoint stores: the file's name, SHA-256, size and tensor count (None
        without a snapshot). Writes the file into this run's dir first if it is not there yet
        (the first checkpoint after the FP32 phase; a run resumed into a new run dir)."""
        if self.state is None:
            return None
        if self._ref is None or (self.run_dir is not None and self._in != self.run_dir):
            self._persist()
        return dict(self._ref)

    def _candidates(self, name: str) -> list[str]:
        dirs = []
        trainer = self._trainer() if self._trainer is not None else None
        ckpt = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        if ckpt:
            d = os.path.dirname(os.path.abspath(os.fspath(ckpt)))
            dirs += [d, os.path.dirname(d)]
        dirs += [d for d in (self.run_dir, self._in) if d]
        if not dirs:  # no trainer yet: Lightning's default run dir
            dirs.append(os.getcwd())
        return [os.path.join(d, name) for d in dict.fromkeys(dirs)]

    def restore(self, state: dict) -> None:
        """From a callback's checkpoint state: read and verify the referenced file (or take
        the inline tensors of an older checkpoint); nothing referenced: no snapshot."""
        ref = state.get(KEY)
        if ref is None:
            legacy = state.get(LEGACY_KEY)
            self.state = dict(legacy) if legacy is not None else None
            self._ref = None
            return
        paths = self._candidates(os.path.basename(ref["file"]))
        found = [p for p in paths if os.path.isfile(p)]
        if not found:
            raise MissingFileError(
                f"FP32 snapshot {ref['file']}: not found (looked for {', '.join(paths) or 'it'}); "
                "the checkpoint references this file of the run dir that wrote it (the weights "
                "at the end of the FP32 phase, tested as the run's FP32 row): copy it next to "
                "the checkpoint or resume from the checkpoint in its own run dir")
        bad = []
        for path in found:
            with open(path, "rb") as f:
                data = f.read()
            sha = hashlib.sha256(data).hexdigest()
            if len(data) == ref["bytes"] and sha == ref["sha256"]:
                break
            bad.append(f"{path} ({len(data)} bytes, sha256 {sha[:12]}...)")
        else:
            raise DataFileError(
                f"FP32 snapshot {ref['file']}: {'; '.join(bad)} differs from what the checkpoint "
                f"references ({ref['bytes']} bytes, sha256 {ref['sha256'][:12]}...): the file is "
                "corrupt, truncated or from another run; resume from a checkpoint of the run "
                "that wrote it, with its run dir")
        from safetensors.torch import load

        self.state = load(data)  # the bytes the checkpoint references (SHA-256 checked)
        self._ref, self._in = dict(ref), os.path.dirname(path)


def state_property() -> property:
    """``fp32_state`` of a callback with an ``fp32_snapshot``: the snapshot's tensors (the run
    summary reads this name)."""
    return property(lambda self: self.fp32_snapshot.state,
                    doc="The module's state_dict at the end of the FP32 phase (None before / "
                        "without one); kept by :class:`FP32Snapshot`.")
