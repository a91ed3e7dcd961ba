"""In-memory uint8 image tensors with batched augmentation on the training device.

For small image datasets (sklearn digits, MNIST, CIFAR-10/100) the whole split lives in
memory as one ``uint8`` tensor ``(N, C, H, W)`` plus ``int64`` labels (:class:`TensorImages`).
The train loader yields *index batches*: ``images[indices]`` as uint8, the labels, and each
sample's augmentation parameters (:class:`RawImageBatch`); nothing is decoded or transformed
per sample and no worker processes are needed. After Lightning moves the batch to the
training device, the datamodule's ``on_after_batch_transfer`` hook runs :class:`BatchTransform`
on the whole batch there: zero-pad + random crop + horizontal flip (train batches only) and
``(x / scale - mean) / std`` normalisation.

Faithful to the per-sample torchvision pipeline it replaces (``T.RandomCrop(32, padding=4)``,
``T.RandomHorizontalFlip()``, ``T.ToTensor()``, ``T.Normalize(mean, std)``: the standard CIFAR
augmentation of He et al. 2016, sec. 4.2): for the same crop offsets and flip bit, the batched
result equals torchvision's functional ``pad``/``crop``/``hflip``/``normalize`` of that image
bitwise (tests/data/test_tensor_images.py). Offsets are uniform over the ``(2 pad + 1)^2``
positions and the flip is Bernoulli(1/2), as in torchvision.

Resume exactness (:mod:`qtrain.data.resumable`): the sampler yields ``(index, sample_seed)``
keys, and a sample's crop offsets and flip are a pure function of its
``sample_seed(seed, epoch, index)`` (:func:`augment_params`, a SplitMix64 hash: no RNG stream
is consumed, global or otherwise), so they do not depend on batch composition, worker
processes or where a resumed run restarts; the mid-epoch skip of ``ResumableDataLoader``
works unchanged. The draws differ from the torchvision path's (which seeds torch's
generator with the same ``sample_seed``), so switching ``data.loader`` changes the
augmentation stream of a run, not its distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from qtrain.data.resumable import _splitmix64
from qtrain.errors import ConfigError

LOADERS = ("tensor", "torchvision")
#: mixed into every sample seed before drawing (the first 64 bits of pi's fraction), so the
#: augmentation draws are not the raw seeds that the torchvision path feeds to torch
_AUG_SALT = 0x243F6A8885A308D3


def check_loader(loader: str) -> str:
    if loader not in LOADERS:
        raise ConfigError(f"data.loader={loader!r}; allowed: {list(LOADERS)} (tensor: in-memory "
                          "uint8 batches augmented on the training device; torchvision: the "
                          "per-sample Dataset/transform path)")
    return loader


class RawImageBatch(NamedTuple):
    """What the tensor loaders yield: uint8 ``images (B, C, H, W)``, int64 ``labels (B,)`` and,
    for augmented training batches, ``aug (B, 3)`` int64 rows ``(top, left, flip)`` (else
    ``None``). Lightning moves the tensors to the device (a named tuple is a collection)."""

    images: torch.Tensor
    labels: torch.Tensor
    aug: torch.Tensor | None


def augment_params(seeds: Sequence[int], pad: int, flip: bool) -> torch.Tensor:
    """``(B, 3)`` int64 rows ``(top, left, flip)`` for samples with the given sample seeds.

    ``r = SplitMix64(seed XOR salt)`` and ``v = r mod (n * n * f)`` with ``n = 2 pad + 1``
    positions per axis and ``f = 2`` if flipping (else 1): ``flip = v mod f``,
    ``left = (v div f) mod n``, ``top = v div (f n)``. Uniform over the ``n^2 f`` outcomes up
    to a bias below ``n^2 f / 2^64``; a pure function of the seed."""
    n, f = 2 * pad + 1, 2 if flip else 1
    m = n * n * f
    rows = []
    for s in seeds:
        v = _splitmix64((int(s) ^ _AUG_SALT) & ((1 << 64) - 1)) % m
        rows.append((v // (f * n), (v // f) % n, v % f))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 3)


def crop_flip(images: torch.Tensor, aug: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad every image by ``pad``, crop ``H x W`` at ``(top, left)`` and mirror it
    left-right where ``flip`` is 1: torchvision's ``hflip(crop(pad(img, pad), top, left, H,
    W))`` per image, done for the whole batch with one ``gather`` on the images' device."""
    b, c, h, w = images.shape
    if pad:
        padded = images.new_zeros(b, c, h + 2 * pad, w + 2 * pad)
        padded[:, :, pad:pad + h, pad:pad + w] = images
    else:
        padded = images
    wp = w + 2 * pad
    aug = aug.to(images.device)
    top, left, fl = aug[:, 0:1], aug[:, 1:2], aug[:, 2:3].bool()
    r = torch.arange(h, device=images.device)
    col = torch.arange(w, device=images.device)
    cols = torch.where(fl, left + (w - 1 - col), left + col)  # (B, W)
    rows = top + r  # (B, H)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, idx).reshape(b, c, h, w)


class BatchTransform:
    """The device-side half of the tensor path: :func:`crop_flip` on augmented batches, then
    ``x.float() / scale``, ``- mean``, ``/ std`` per channel in float32 (the operations, in
    order, of ``T.ToTensor()`` + ``T.Normalize(mean, std)``).

    ``mean``/``std``: one value per channel (or one for all); ``scale``: 255 for 8-bit images
    (16 for sklearn's 4-bit digits)."""

    def __init__(self, mean, std, scale: float = 255.0, pad: int = 0) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.scale, self.pad = scale, pad
        self._on: dict = {}

    def _stats(self, device):
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        return self._on[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images.device)
        return images.to(torch.float32).div(self.scale).sub_(mean).div_(std)

    def __call__(self, batch: RawImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch.images
        if batch.aug is not None:
            images = crop_flip(images, batch.aug, self.pad)
        return self.normalize(images), batch.labels


class TensorImages(Dataset):
    """A whole split in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``.

    Keys are sample indices, or ``(index, sample_seed)`` pairs from
    :class:`~qtrain.data.resumable.ResumableSampler`; with ``pad``/``flip`` set, seeded keys
    get :func:`augment_params`. ``__getitems__`` (the DataLoader's batched fetch) returns one
    :class:`RawImageBatch`; use it with :func:`collate_raw`."""

    def __init__(self, images: torch.Tensor, labels, pad: int = 0, flip: bool = False,
                 classes: list[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"TensorImages: images must be uint8 (N, C, H, W), got "
                             f"{images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(self.images):
            raise ValueError(f"TensorImages: {len(self.images)} images but {len(self.labels)} labels")
        self.pad, self.flip, self.classes = int(pad), bool(flip), classes
        self.augments = self.pad > 0 or self.flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys) -> RawImageBatch:
        seeded = bool(keys) and isinstance(keys[0], tuple)
        idx = torch.tensor([k[0] for k in keys] if seeded else list(keys), dtype=torch.long)
        aug = None
        if seeded and self.augments:
            aug = augment_params([k[1] for k in keys], self.pad, self.flip)
        return RawImageBatch(self.images.index_select(0, idx), self.labels.index_select(0, idx), aug)


def collate_raw(batch: RawImageBatch) -> RawImageBatch:
    """The DataLoader's collate_fn for :class:`TensorImages`: the batch is already one."""
    return batch
