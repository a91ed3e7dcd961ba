"""Reading dataset files safely: a restricted unpickler for the CIFAR python batches and a
header / size check of MNIST's IDX files, each failure one
:class:`qtrain.errors.DataFileError` naming the file, what is wrong and what to do.

* CIFAR-10/100 "python version" batches (https://www.cs.toronto.edu/~kriz/cifar.html) are
  pickled dicts of str / bytes keys, lists of ints / strings and one uint8 numpy array.
  :func:`load_cifar_pickle` unpickles them with :class:`CIFARUnpickler`, which resolves only
  the globals such a file needs to rebuild that array (numpy's ``_reconstruct`` /
  ``_frombuffer``, ``ndarray``, ``dtype``, ``scalar`` and ``_codecs.encode``, which protocol-2
  pickles written by Python 3 use for bytes); any other global (``os.system``,
  ``builtins.eval``, ...) is refused before anything is called, so a crafted pickle cannot
  run code. The content is then checked against the batch layout.
* MNIST IDX files (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a big-endian header
  ``0x00000803 N 28 28`` (images) or ``0x00000801 N`` (labels), then exactly ``N * 28 * 28``
  (or ``N``) unsigned bytes. :func:`check_mnist_raw` checks both files of each split
  (magic, dimensions, size, same N) before torchvision reads them.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np

from qtrain.errors import DataFileError

CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _numpy_global(name: str):
    try:  # numpy >= 2 (numpy.core is a deprecated alias of numpy._core)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "_frombuffer": getattr(numeric, "_frombuffer", None)}[name]


def _codecs_encode(obj, encoding="utf-8"):
    import codecs

    return codecs.encode(obj, encoding)


_ALLOWED = {
    **{(mod, name): (lambda n=name: _numpy_global(n))
       for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    **{(mod, "_frombuffer"): (lambda: _numpy_global("_frombuffer"))
       for mod in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _codecs_encode,
}


class CIFARUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch needs (module doc)."""

    def find_class(self, module: str, name: str):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in a CIFAR batch (allowed: "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED))})")
        return make()


def _bad_cifar(path: str, why: str) -> DataFileError:
    return DataFileError(
        f"CIFAR file {path}: {why} -- expected a CIFAR 'python version' batch (a pickled dict "
        f"with 'data' (N, 3072) uint8 and 'labels' / 'fine_labels'; batches.meta / meta: "
        f"'label_names' / 'fine_label_names'); re-download cifar-*-python.tar.gz from "
        f"{CIFAR_PAGE} (or data.download=true) and extract it into data.root")


def load_cifar_pickle(path: str) -> dict:
    """The dict of a CIFAR pickle with str keys: the original Python 2 files (read as latin1)
    or bytes-keyed files written by Python 3 code; restricted unpickler (module doc)."""
    try:
        with open(path, "rb") as f:
            d = CIFARUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataFileError(f"CIFAR file {path} cannot be opened ({e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise _bad_cifar(path, f"not a readable pickle ({type(e).__name__}: {e}); the file "
                               "is truncated, corrupt or not a CIFAR batch") from None
    if not isinstance(d, dict):
        raise _bad_cifar(path, f"holds a {type(d).__name__}, not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, list[int]]:
    """(data (N, 3072) uint8, labels) of one CIFAR batch file, its layout checked."""
    d = load_cifar_pickle(path)
    keys = [label_key, "labels", "fine_labels"]
    lk = next((k for k in keys if k in d), None)
    if "data" not in d or lk is None:
        raise _bad_cifar(path, f"keys {sorted(d)[:6]}; need 'data' and {label_key!r}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise _bad_cifar(path, f"'data' is {got}")
    labels = d[lk]
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        n = len(labels) if hasattr(labels, "__len__") else type(labels).__name__
        raise _bad_cifar(path, f"{len(data)} images but {n} labels")
    return data, [int(v) for v in labels]


def cifar_classes(path: str, key: str) -> list[str]:
    d = load_cifar_pickle(path)
    names = d.get(key)
    if not isinstance(names, list) or not names:
        raise _bad_cifar(path, f"no class-name list {key!r}")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in names]


def check_md5(path: str, md5: str, root_key: str = "data.root") -> None:
    """The file's md5 against the value torchvision lists for the official release."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != md5:
        raise DataFileError(
            f"{root_key}: {path} has md5 {h.hexdigest()}, the official file {md5}: a corrupt "
            "or truncated download (delete it and re-download) or a re-encoded copy (then set "
            "data.verify_checksums=false)")


MNIST_SPLITS = ("train", "t10k")


def _idx_header(path: str, ndim: int) -> tuple[int, ...]:
    with open(path, "rb") as f:
        head = f.read(4 * (ndim + 1))
    if len(head) < 4 * (ndim + 1):
        raise ValueError(f"only {len(head)} bytes: shorter than the {4 * (ndim + 1)}-byte header")
    magic, *dims = np.frombuffer(head, dtype=">i4").tolist()
    want = 0x800 + ndim  # 0x08: unsigned byte data, then the number of dimensions
    if magic != want:
        raise ValueError(f"magic number {magic:#010x}; expected {want:#010x}")
    return tuple(dims)


def check_mnist_raw(raw: str) -> None:
    """Check torchvision's four MNIST files in ``raw`` (module doc); DataFileError if not."""
    fix = (f"re-download them (data.download=true with network) or gunzip the original "
           f"*-idx?-ubyte.gz files into {raw}")
    for split in MNIST_SPLITS:
        n_img = None
        for kind, ndim, tail in (("images", 3, (28, 28)), ("labels", 1, ())):
            path = os.path.join(raw, f"{split}-{kind}-idx{ndim}-ubyte")
            if not os.path.exists(path):
                raise DataFileError(f"MNIST file {path} is missing; {fix}")
            try:
                dims = _idx_header(path, ndim)
                if tuple(dims[1:]) != tail:
                    raise ValueError(f"dimensions {dims}; expected (N, {', '.join(map(str, tail))})"
                                     if tail else f"dimensions {dims}")
                size, want = os.path.getsize(path), 4 * (ndim + 1) + int(np.prod(dims))
                if size != want:
                    raise ValueError(f"{size} bytes; its header {dims} needs {want} (truncated "
                                     "or padded)")
                if n_img is not None and dims[0] != n_img:
                    raise ValueError(f"{dims[0]} labels for {n_img} images")
                n_img = dims[0]
            except ValueError as e:
                raise DataFileError(
                    f"MNIST file {path}: {e} -- expected an IDX file (big-endian int32 magic "
                    f"{0x800 + ndim:#010x}, then N{', 28, 28' if tail else ''}, then the "
                    f"unsigned bytes); {fix}") from None
