"""scikit-learn's real 8x8 handwritten digits (1,797 images, bundled offline).

Images are scaled to [0, 1] (pixel / 16), normalised by the training mean/std, shaped
(1, 8, 8). A fixed stratified split: 60% train, 20% val, 20% test (seeded).

``loader``: ``tensor`` keeps the 4-bit pixels as uint8 tensors and normalises each batch on
the training device (:mod:`qtrain.data.tensor_images`; bitwise the same floats as the
per-sample path); ``torchvision`` (the name shared with the image datasets' per-sample path;
no torchvision transform is involved here) serves pre-normalised float tensors from a
``TensorDataset`` sample by sample. No augmentation either way.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qtrain.data.base import QDataModule
from qtrain.data.tensor_images import BatchTransform, TensorImages, check_loader


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
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        tr, rest = train_test_split(idx, test_size=0.4, random_state=self.seed, stratify=d.target)
        va, te = train_test_split(rest, test_size=0.5, random_state=self.seed,
                                  stratify=d.target[rest])
        if self.fake:  # smoke: the same real data, a small slice
            tr, va, te = tr[:128], va[:64], te[:64]
        mean, std = x[tr].mean(), x[tr].std()
        if self.loader == "tensor":  # pixels 0..16 exactly in uint8; (x / 16 - mean) / std later
            raw = torch.tensor(d.data, dtype=torch.uint8).reshape(-1, 1, 8, 8)
            self.train_set, self.val_set, self.test_set = (
                TensorImages(raw[s], y[s]) for s in (tr, va, te))
            self.batch_transform = BatchTransform(mean, std, scale=16.0)
            return
        x = (x - mean) / std
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])
