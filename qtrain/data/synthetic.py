"""Synthetic image classification: class-dependent Gaussian blobs (learnable, seeded)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qtrain.data.base import QDataModule


class SyntheticDataModule(QDataModule):
    def __init__(
        self, num_classes: int = 10, image_size: int = 32, channels: int = 3,
        n_train: int = 512, n_val: int = 128, n_test: int = 128, noise: float = 1.0, **kw,
    ) -> None:
        super().__init__(**kw)
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.sizes = (n_train, n_val, n_test)
        self.noise = noise

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.channels, self.image_size, self.image_size)
        protos = torch.randn(self.num_classes, *shape, generator=g)
        sets = []
        for n in self.sizes:
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            x = protos[y] + self.noise * torch.randn(n, *shape, generator=g)
            sets.append(TensorDataset(x, y))
        self.train_set, self.val_set, self.test_set = sets
