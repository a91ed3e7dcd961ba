"""Write a file so that a run killed while writing never leaves a partial one: temporary
file in the same folder, fsync, ``os.replace``, then fsync of the folder so the rename itself
is durable (checkpoints, packed models, ONNX / HF exports, FP32 snapshots)."""

from __future__ import annotations

import contextlib
import os
import uuid


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike):
    """A binary file object that becomes ``path`` when the block ends without an exception
    (module docstring); on any exception the temporary file is removed and ``path`` is left
    as it was. ``os.replace`` replaces a symlink named ``path`` itself, not its target."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """``data`` to ``path`` atomically (:func:`open_atomic`)."""
    with open_atomic(path) as f:
        f.write(data)
