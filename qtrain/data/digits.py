"""scikit-learn's real 8x8 handwritten digits (1,797 images, bundled offline).

Images are scaled to [0, 1] (pixel / 16), normalised by the training mean/std, shaped
(1, 8, 8). A fixed stratified split: 60% train, 20% val, 20% test (seeded).

``loader``: ``tensor`` keeps the 4-bit pixels as uint8 tensors and normalises each batch on
the training device (:mod:`qtrain.data.tensor_images`; bitwise the same floats as the
per-sample path); ``torchvision`` (the name shared with the image datasets' per-sample path;
no torchvision transform is involved here) serves pre-normalised float tensors from a
``TensorDataset`` sample by sample. No augmentation either way.

The images are read from scikit-learn's bundled ``datasets/data/digits.csv.gz`` (what
``sklearn.datasets.load_digits`` reads) and split by :func:`stratified_split`, scikit-learn's
``train_test_split(..., stratify=y, random_state=seed)`` algorithm written out in numpy: the
same indices (tests/data/test_digits_split.py checks them against scikit-learn), without
importing scikit-learn (~1.4 s of CPU at every start of a digits run on the 2-core dev VM).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from qtrain.data.base import QDataModule
from qtrain.data.tensor_images import BatchTransform, TensorImages, check_loader
from qtrain.errors import MissingFileError


def digits_file() -> str:
    """Path of scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(where[0], "datasets", "data", "digits.csv.gz") if where else ""
    if not os.path.isfile(path):
        raise MissingFileError("the digits dataset is read from scikit-learn's bundled "
                               f"datasets/data/digits.csv.gz ({path or 'scikit-learn not found'}); "
                               "pip install scikit-learn")
    return path


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64) float64 in 0..16, labels (1797,) int): the arrays
    ``sklearn.datasets.load_digits()`` returns as ``data`` and ``target``."""
    with gzip.open(digits_file(), "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Draws per class: floor of the proportional share, the rest to the largest remainders
    (ties broken by ``rng``) -- scikit-learn's ``utils.extmath._approximate_mode``."""
    share = counts / counts.sum() * n_draws
    out = np.floor(share)
    left = int(n_draws - out.sum())
    if left > 0:
        rest = share - out
        for value in np.sort(np.unique(rest))[::-1]:
            (tied,) = np.where(rest == value)
            take = min(len(tied), left)
            out[rng.choice(tied, size=take, replace=False)] += 1
            left -= take
            if left == 0:
                break
    return out.astype(int)


def stratified_split(idx: np.ndarray, y: np.ndarray, test_size: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` subsets of ``idx`` (labels ``y``): the output of scikit-learn's
    ``train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)``
    (``StratifiedShuffleSplit``: per class a seeded permutation, its approximate-mode share
    to train, then to test; both lists permuted)."""
    n_test = math.ceil(test_size * len(y))
    n_train = len(y) - n_test
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_tr = _approximate_mode(counts, n_train, rng)
    n_te = _approximate_mode(counts - n_tr, n_test, rng)
    train: list = []
    test: list = []
    for k in range(len(classes)):
        order = members[k].take(rng.permutation(counts[k]), mode="clip")
        train.extend(order[: n_tr[k]])
        test.extend(order[n_tr[k]: n_tr[k] + n_te[k]])
    return idx[rng.permutation(train)], idx[rng.permutation(test)]


class DigitsDataModule(QDataModule):
    num_classes = 10

    def __init__(self, batch_size: int = 64, fake: bool = False, seed: int = 0,
                 loader: str = "torchvision", **kw) -> None:
        super().__init__(batch_size=batch_size, fake=fake, seed=seed, **kw)
        self.loader = check_loader(loader)

    def prepare_data(self) -> None:  # bundled with scikit-learn: nothing to write
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pixels, target = load_digits_arrays()
        x = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(target, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        tr, rest = stratified_split(idx, target, 0.4, self.seed)
        va, te = stratified_split(rest, target[rest], 0.5, self.seed)
        if self.fake:  # smoke: the same real data, a small slice
            tr, va, te = tr[:128], va[:64], te[:64]
        mean, std = x[tr].mean(), x[tr].std()
        if self.loader == "tensor":  # pixels 0..16 exactly in uint8; (x / 16 - mean) / std later
            raw = torch.tensor(pixels, dtype=torch.uint8).reshape(-1, 1, 8, 8)
            self.train_set, self.val_set, self.test_set = (
                TensorImages(raw[s], y[s]) for s in (tr, va, te))
            self.batch_transform = BatchTransform(mean, std, scale=16.0)
            return
        x = (x - mean) / std
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])
