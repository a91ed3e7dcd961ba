"""qtrain.data.digits reads scikit-learn's digits and splits them without importing
scikit-learn: the same arrays as ``load_digits`` and, for every seed tried, the same indices
as ``train_test_split(..., stratify=...)`` (scikit-learn is the reference here)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from qtrain.data.digits import DigitsDataModule, load_digits_arrays, stratified_split


def test_arrays_are_load_digits():
    pixels, target = load_digits_arrays()
    d = load_digits()
    assert pixels.dtype == d.data.dtype and np.array_equal(pixels, d.data)
    assert target.dtype == d.target.dtype and np.array_equal(target, d.target)


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 12345])
def test_split_is_train_test_split(seed):
    _, y = load_digits_arrays()
    idx = np.arange(len(y))
    tr, rest = stratified_split(idx, y, 0.4, seed)
    ref_tr, ref_rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y)
    assert np.array_equal(tr, ref_tr) and np.array_equal(rest, ref_rest)
    va, te = stratified_split(rest, y[rest], 0.5, seed)
    ref_va, ref_te = train_test_split(rest, test_size=0.5, random_state=seed, stratify=y[rest])
    assert np.array_equal(va, ref_va) and np.array_equal(te, ref_te)
    assert len(tr) + len(va) + len(te) == len(y) and len(set(tr) | set(va) | set(te)) == len(y)


def test_split_ties_and_small_classes_match():
    """Remainder ties (broken by the seeded RNG) on a small, uneven label set."""
    y = np.array([0] * 5 + [1] * 2 + [2] * 2 + [3] * 3 + [4] * 7)
    idx = np.arange(100, 100 + len(y))
    for seed in range(20):
        for size in (0.25, 0.4, 0.5):
            got = stratified_split(idx, y, size, seed)
            ref = train_test_split(idx, test_size=size, random_state=seed, stratify=y)
            assert all(np.array_equal(a, b) for a, b in zip(got, ref)), (seed, size)


def test_data_module_splits_60_20_20(tmp_path):
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1078, 359, 360)
    x, _ = dm.train_set.tensors
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4  # train-normalised
