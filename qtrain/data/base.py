"""Shared LightningDataModule plumbing: loaders, smoke-mode fake data, fail-fast checks.

Smoke mode (``fake=true``, set by ``debug=smoke``): ``prepare_data`` writes a tiny dataset
in the *same on-disk format* as the real one into ``root`` (``write_fake``), and the module
then reads it with the same loader as a real run.

Splits held as :class:`~qtrain.data.tensor_images.TensorImages` (``data.loader=tensor``) get
loaders without worker processes that yield uint8 index batches; ``on_after_batch_transfer``
(Lightning calls it after moving a batch to the training device) turns them into normalised,
for training batches augmented, float batches with ``self.batch_transform``. Code that
iterates a loader itself must move batches with ``trainer.strategy.batch_to_device`` (which
runs this hook) rather than ``pl_module.transfer_batch_to_device`` (which does not).
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from qtrain.data.resumable import ResumableDataLoader, ResumableSampler, SeededSamples
from qtrain.data.tensor_images import BatchTransform, RawImageBatch, TensorImages, collate_raw
from qtrain.errors import ConfigError, MissingFileError


class QDataModule(pl.LightningDataModule):
    #: name of the config key that points the loader at local files (error messages)
    root_key = "data.root"

    def __init__(
        self, root: str | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
        num_workers: int = 0, fake: bool = False, seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = os.path.expanduser(root) if root else root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.fake = fake
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        #: the device-side transform of TensorImages batches (set by the module's setup)
        self.batch_transform: BatchTransform | None = None

    # -- smoke data -------------------------------------------------------------------
    def write_fake(self, root: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no smoke-data writer")

    def prepare_data(self) -> None:
        if self.fake:
            if not self.root:
                raise ConfigError("data.fake=true needs data.root (where to write smoke data)")
            marker = os.path.join(self.root, ".qtrain_fake_done")
            if not os.path.exists(marker):
                os.makedirs(self.root, exist_ok=True)
                self.write_fake(self.root)
                open(marker, "w").close()

    def require_root(self, *relative: str) -> None:
        """Fail fast with one line naming ``root_key`` if the expected files are missing."""
        if not self.root:
            raise MissingFileError(f"{self.root_key} is not set; point it at the dataset folder")
        for rel in relative:
            if not os.path.exists(os.path.join(self.root, rel)):
                raise MissingFileError(
                    f"{self.root_key}={self.root!r}: missing {rel!r} (set {self.root_key} to the "
                    "folder holding the dataset in its standard layout)"
                )

    # -- loaders ---------------------------------------------------------------------
    def _loader(self, ds: Dataset | None, train: bool, name: str) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"{type(self).__name__}: {name} split not set up")
        if isinstance(ds, TensorImages):  # index batches: no workers, no per-sample collate
            kw = dict(num_workers=0, collate_fn=collate_raw, drop_last=False,
                      generator=torch.Generator().manual_seed(self.seed))
            if train:
                return ResumableDataLoader(ds, batch_size=self.batch_size,
                                           sampler=ResumableSampler(ds, self.seed), **kw)
            return DataLoader(ds, batch_size=self.eval_batch_size, **kw)
        # own generator: creating an iterator (which draws the workers' base seed) never
        # consumes the global RNG, which belongs to the model (dropout, noise, rounding)
        kw = dict(num_workers=self.num_workers, collate_fn=getattr(self, "collate_fn", None),
                  drop_last=False, persistent_workers=self.num_workers > 0,
                  generator=torch.Generator().manual_seed(self.seed))
        if train:  # order and augmentation survive a kill and resume (qtrain.data.resumable)
            return ResumableDataLoader(
                SeededSamples(ds), batch_size=self.batch_size,
                sampler=ResumableSampler(ds, self.seed), **kw)
        return DataLoader(ds, batch_size=self.eval_batch_size, **kw)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """A :class:`RawImageBatch` (now on the training device) -> ``(x, y)``: crop/flip
        when it carries augmentation parameters, then normalisation; other batches as is."""
        if isinstance(batch, RawImageBatch):
            if self.batch_transform is None:
                raise RuntimeError(f"{type(self).__name__}: tensor batches but no batch_transform")
            return self.batch_transform(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, "test")

    def calibration_dataloader(self) -> DataLoader:
        """Training images without augmentation order randomness (PTQ / Hessian)."""
        return self._loader(self.train_set, False, "train")
