"""Image datasets: CIFAR-10/100 (torchvision pickle release or an ImageFolder tree), MNIST
(torchvision's raw IDX files) and ImageNet (ImageFolder ``train/`` and ``val/``).

CIFAR pickles are read with a restricted unpickler (a crafted pickle cannot run code) and
checked against the batch layout; MNIST's IDX headers and sizes are checked before reading;
a bad file raises one :class:`qtrain.errors.DataFileError` naming it and what to do
(:mod:`qtrain.data.file_checks`). With ``verify_checksums`` (default) every CIFAR file's md5
must be the official release's.

Nothing is downloaded unless ``download=true`` and there is network; a missing dataset
stops the run at once with one line naming ``data.root``. The validation split is the
official test split (as in the CIFAR/ImageNet papers' reported numbers).

``loader`` (CIFAR, MNIST): ``tensor`` holds each split in memory as uint8 tensors and runs
augmentation + normalisation batched on the training device
(:mod:`qtrain.data.tensor_images`; the configs' default, ``conf/data/*.yaml``);
``torchvision`` is the per-sample Dataset + PIL transform path with ``num_workers`` worker
processes (the Python default, and ImageNet's only path). Same files, same checks, same
augmentation distribution; ``num_workers`` applies to ``torchvision`` only.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from qtrain.data import file_checks as FC
from qtrain.data.base import QDataModule
from qtrain.data.tensor_images import BatchTransform, TensorImages, check_loader
from qtrain.errors import DataFileError
from qtrain.offline import require_network

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
MNIST_STATS = ((0.1307,), (0.3081,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FORMATS = ("pickle", "imagefolder")


class _SafePickles:
    """torchvision's CIFAR dataset (same layout, same __getitem__) read with the restricted
    unpickler of :mod:`qtrain.data.file_checks` (str- or bytes-keyed pickles); with ``verify``
    each file's md5 is first checked against the official release's."""

    label_key = "labels"

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False,
                 verify=True):
        datasets.VisionDataset.__init__(self, root, transform=transform,
                                        target_transform=target_transform)
        self.train = train
        if download:
            self.download()  # torchvision: skipped when the md5-checked files are present
        folder = os.path.join(self.root, self.base_folder)
        files = self.train_list if train else self.test_list
        if verify:
            for fname, md5 in [*files, (self.meta["filename"], self.meta["md5"])]:
                FC.check_md5(os.path.join(folder, fname), md5)
        data, targets = [], []
        for fname, _ in files:
            d, labels = FC.cifar_batch(os.path.join(folder, fname), self.label_key)
            data.append(d)
            targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = targets
        self.classes = FC.cifar_classes(os.path.join(folder, self.meta["filename"]),
                                        self.meta["key"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _SafeCIFAR10(_SafePickles, datasets.CIFAR10):
    pass


class _SafeCIFAR100(_SafePickles, datasets.CIFAR100):
    label_key = "fine_labels"


def _fake_images(n: int, size: int, channels: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    base = rng.integers(0, 256, (num_classes, size, size, channels))
    noise = rng.integers(-40, 40, (n, size, size, channels))
    imgs = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return imgs, labels


def _folder_tensor(folder: datasets.ImageFolder, size: int) -> tuple:
    """Every image of an ImageFolder tree decoded once into uint8 ``(N, 3, size, size)``."""
    imgs = np.empty((len(folder.samples), size, size, 3), np.uint8)
    for k, (path, _) in enumerate(folder.samples):
        img = folder.loader(path)
        if img.size != (size, size):
            raise DataFileError(f"{path}: {img.size[0]}x{img.size[1]} image; data.loader=tensor "
                                f"needs {size}x{size} (or use data.loader=torchvision)")
        imgs[k] = np.asarray(img)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), folder.targets


def write_image_folder(root: str, split: str, imgs, labels, classes) -> None:
    for i, (img, y) in enumerate(zip(imgs, labels)):
        d = os.path.join(root, split, classes[y])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img.squeeze()).save(os.path.join(d, f"{i:05d}.png"))


class CIFARDataModule(QDataModule):
    def __init__(
        self, name: str = "cifar10", root: str | None = None, format: str = "pickle",
        download: bool = False, verify_checksums: bool = True, augment: bool = True,
        loader: str = "torchvision", **kw,
    ) -> None:
        super().__init__(root=root, **kw)
        self.loader = check_loader(loader)
        if name not in CIFAR_STATS:
            raise ValueError(f"data.name={name!r}; allowed: {sorted(CIFAR_STATS)}")
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}; allowed: {FORMATS}")
        self.name, self.format, self.download = name, format, download
        self.verify = verify_checksums and not self.fake
        self.augment = augment
        self.num_classes = 10 if name == "cifar10" else 100

    def transforms(self, train: bool):
        mean, std = CIFAR_STATS[self.name]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and self.augment else []
        return T.Compose(aug + [T.ToTensor(), T.Normalize(mean, std)])

    def write_fake(self, root: str) -> None:
        classes = [f"class{i}" for i in range(self.num_classes)]
        tr = _fake_images(64, 32, 3, self.num_classes, self.seed)
        te = _fake_images(32, 32, 3, self.num_classes, self.seed + 1)
        if self.format == "imagefolder":
            write_image_folder(root, "train", *tr, classes)
            write_image_folder(root, "test", *te, classes)
            return
        cls = _SafeCIFAR10 if self.name == "cifar10" else _SafeCIFAR100
        folder = os.path.join(root, cls.base_folder)
        os.makedirs(folder, exist_ok=True)
        label_key = "labels" if self.name == "cifar10" else "fine_labels"

        def dump(fname, imgs, labels):
            data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)
            with open(os.path.join(folder, fname), "wb") as f:
                pickle.dump({"data": data, label_key: [int(v) for v in labels]}, f)

        train_files = [f for f, _ in cls.train_list]
        for k, fname in enumerate(train_files):
            sl = slice(k * len(tr[0]) // len(train_files), (k + 1) * len(tr[0]) // len(train_files))
            dump(fname, tr[0][sl], tr[1][sl])
        dump(cls.test_list[0][0], *te)
        with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
            pickle.dump({cls.meta["key"]: classes}, f)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.format == "imagefolder":
            self.require_root("train", "test")
            self.train_set = datasets.ImageFolder(os.path.join(self.root, "train"), self.transforms(True))
            self.val_set = datasets.ImageFolder(os.path.join(self.root, "test"), self.transforms(False))
        else:
            cls = _SafeCIFAR10 if self.name == "cifar10" else _SafeCIFAR100
            folder = os.path.join(self.root or "", cls.base_folder)
            if self.download and not os.path.isdir(folder):
                require_network(f"data.download=true for {self.name}", self.root_key,
                                host="www.cs.toronto.edu")
            else:
                self.require_root(cls.base_folder)
            self.train_set = cls(self.root, True, self.transforms(True), download=self.download,
                                 verify=self.verify)
            self.val_set = cls(self.root, False, self.transforms(False), verify=self.verify)
        if self.loader == "tensor":  # the decoded splits as uint8 tensors, transforms unused
            self.train_set, self.val_set = (self._tensor_split(ds, train)
                                            for ds, train in ((self.train_set, True),
                                                              (self.val_set, False)))
            self.batch_transform = BatchTransform(*CIFAR_STATS[self.name], scale=255.0,
                                                  pad=4 if self.augment else 0)
        self.test_set = self.val_set

    def _tensor_split(self, ds, train: bool) -> TensorImages:
        """RandomCrop(32, padding=4) + RandomHorizontalFlip for training (``augment``)."""
        if isinstance(ds, datasets.ImageFolder):
            images, labels = _folder_tensor(ds, 32)
        else:  # torchvision's CIFAR layout: data (N, 32, 32, 3) uint8, targets
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = ds.targets
        aug = train and self.augment
        return TensorImages(images, labels, pad=4 if aug else 0, flip=aug, classes=ds.classes)


class MNISTDataModule(QDataModule):
    num_classes = 10

    def __init__(self, root: str | None = None, download: bool = False,
                 loader: str = "torchvision", **kw) -> None:
        super().__init__(root=root, **kw)
        self.download = download
        self.loader = check_loader(loader)

    def write_fake(self, root: str) -> None:
        raw = os.path.join(root, "MNIST", "raw")
        os.makedirs(raw, exist_ok=True)
        for split, n, seed in (("train", 64, self.seed), ("t10k", 32, self.seed + 1)):
            imgs, labels = _fake_images(n, 28, 1, 10, seed)
            with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
                f.write(np.array([0x00000803, n, 28, 28], dtype=">i4").tobytes())
                f.write(imgs.astype(np.uint8).tobytes())
            with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
                f.write(np.array([0x00000801, n], dtype=">i4").tobytes())
                f.write(labels.astype(np.uint8).tobytes())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.download and not os.path.isdir(os.path.join(self.root or "", "MNIST", "raw")):
            require_network("data.download=true for MNIST", self.root_key, host="ossci-datasets.s3.amazonaws.com")
        else:
            self.require_root(os.path.join("MNIST", "raw", "train-images-idx3-ubyte"))
        raw = os.path.join(self.root or "", "MNIST", "raw")
        if not self.download or os.path.isdir(raw):  # (a fresh download is md5-checked)
            FC.check_mnist_raw(raw)
        tf = T.Compose([T.ToTensor(), T.Normalize(*MNIST_STATS)])
        self.train_set = datasets.MNIST(self.root, True, tf, download=self.download)
        self.val_set = self.test_set = datasets.MNIST(self.root, False, tf, download=False)
        if self.loader == "tensor":  # no augmentation: normalisation only, on the device
            self.train_set, self.val_set = (
                TensorImages(ds.data[:, None].contiguous(), ds.targets, classes=ds.classes)
                for ds in (self.train_set, self.val_set))
            self.test_set = self.val_set
            self.batch_transform = BatchTransform(*MNIST_STATS, scale=255.0)


class ImageNetDataModule(QDataModule):
    """ImageNet (or any ImageFolder tree) with ``train/`` and ``val/`` class folders."""

    def __init__(self, root: str | None = None, image_size: int = 224, num_classes: int = 1000,
                 **kw) -> None:
        super().__init__(root=root, **kw)
        self.image_size, self.num_classes = image_size, num_classes
        if self.fake:  # smoke: 4 classes of 64x64 images in the same ImageFolder layout
            self.image_size, self.num_classes = 64, min(num_classes, 4)

    def write_fake(self, root: str) -> None:
        classes = [f"n{i:08d}" for i in range(self.num_classes)]
        tr, va = (_fake_images(n, 72, 3, self.num_classes, self.seed + k) for k, n in ((0, 32), (1, 16)))
        tr[1][: self.num_classes] = va[1][: self.num_classes] = range(self.num_classes)
        write_image_folder(root, "train", *tr, classes)
        write_image_folder(root, "val", *va, classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.require_root("train", "val")
        s = self.image_size
        norm = T.Normalize(*IMAGENET_STATS)
        train_tf = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        val_tf = T.Compose([T.Resize(int(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), norm])
        self.train_set = datasets.ImageFolder(os.path.join(self.root, "train"), train_tf)
        self.val_set = datasets.ImageFolder(os.path.join(self.root, "val"), val_tf)
        if len(self.train_set.classes) != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.num_classes} but {self.root}/train has "
                f"{len(self.train_set.classes)} class folders"
            )
        self.test_set = self.val_set
