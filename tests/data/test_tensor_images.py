"""The in-memory tensor data path (qtrain.data.tensor_images, data.loader=tensor).

References: torchvision's functional pad/crop/hflip/normalize on each uint8 image (and the
PIL ToTensor path of the old loader), the old per-sample loaders' batches, a chi-square test
of the crop/flip draws recovered from the pixels of the loader's output, and the resumable
loader's own contract (a batch's draws depend on (seed, epoch, index) only).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import functional as F

from qtrain.data.base import QDataModule
from qtrain.data.digits import DigitsDataModule
from qtrain.data.resumable import sample_seed
from qtrain.data.tensor_images import (
    BatchTransform,
    RawImageBatch,
    TensorImages,
    augment_params,
)
from qtrain.data.vision import CIFAR_STATS, CIFARDataModule, MNISTDataModule
from qtrain.errors import ConfigError

MEAN, STD = CIFAR_STATS["cifar10"]
SEED = 3


def _reference(img: torch.Tensor, top: int, left: int, flip: int) -> torch.Tensor:
    """torchvision's functional ops on one uint8 CHW image, in RandomCrop/Flip/ToTensor/
    Normalize order."""
    out = F.crop(F.pad(img, [4]), top, left, 32, 32)
    if flip:
        out = F.hflip(out)
    return F.normalize(F.convert_image_dtype(out, torch.float32), MEAN, STD)


def test_batched_augmentation_equals_torchvision_per_sample_for_every_offset_and_flip():
    """All 9 x 9 x 2 (top, left, flip) outcomes on random images: bitwise equal to
    torchvision's tensor functional ops and to its PIL path (the old loader's ToTensor)."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([(t, lft, f) for t in range(9) for lft in range(9) for f in range(2)])
    images = torch.randint(0, 256, (len(grid), 3, 32, 32), dtype=torch.uint8, generator=g)
    x, y = BatchTransform(MEAN, STD, pad=4)(RawImageBatch(images, torch.arange(len(grid)), grid))
    assert torch.equal(y, torch.arange(len(grid)))
    for k, (t, lft, f) in enumerate(grid.tolist()):
        assert torch.equal(x[k], _reference(images[k], t, lft, f)), (t, lft, f)
        pil = F.to_pil_image(images[k])
        pil = F.crop(F.pad(pil, 4), t, lft, 32, 32)
        ref_pil = F.normalize(F.to_tensor(F.hflip(pil) if f else pil), MEAN, STD)
        assert torch.equal(x[k], ref_pil)


def _coordinate_set(n: int) -> TensorImages:
    """Image k: channel 0 = row + 1, channel 1 = column + 1 (so padding, 0, is distinct)."""
    r = torch.arange(1, 33, dtype=torch.uint8)
    img = torch.stack([r[:, None].expand(32, 32), r[None, :].expand(32, 32),
                       torch.zeros(32, 32, dtype=torch.uint8)])
    return TensorImages(img.expand(n, 3, 32, 32).clone(), torch.arange(n), pad=4, flip=True)


def _recover(x: torch.Tensor) -> torch.Tensor:
    """(top, left, flip) of each output image of a coordinate image: output pixel (16, 16)
    comes from padded (top + 16, left + 16) unflipped or (top + 16, left + 15) flipped."""
    v = x[:, :, 16, 16].round().long()
    flip = (x[:, 1, 16, 17] < x[:, 1, 16, 16]).long()
    return torch.stack([v[:, 0] - 13, v[:, 1] - 13 + flip, flip], 1)


def _coordinate_module(n: int, batch_size: int, seed: int = SEED) -> QDataModule:
    dm = QDataModule(batch_size=batch_size, seed=seed)
    dm.train_set = _coordinate_set(n)
    dm.batch_transform = BatchTransform(0.0, 1.0, scale=1.0, pad=4)  # pixel values as floats
    return dm


def _draws(dm: QDataModule, epoch: int) -> dict[int, tuple]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    out = {}
    for b in loader:
        x, y = dm.on_after_batch_transfer(b, 0)
        for i, p in zip(y.tolist(), _recover(x).tolist()):
            out[i] = tuple(p)
    return out


def test_offsets_uniform_over_81_positions_and_flip_bernoulli_half():
    """16,200 draws from the real train loader, read back from the augmented pixels:
    chi-square over the 162 (top, left, flip) cells and over the 81 positions, flip count
    within 4.5 sigma of N/2 (a no-op or a fixed crop fails all three)."""
    n = 16200
    p = np.array(list(_draws(_coordinate_module(n, 1000), 0).values()))
    assert len(p) == n and p[:, :2].min() == 0 and p[:, :2].max() == 8
    cells = np.bincount(p[:, 0] * 18 + p[:, 1] * 2 + p[:, 2], minlength=162)
    assert stats.chisquare(cells).pvalue > 1e-4, cells
    assert stats.chisquare(np.bincount(p[:, 0] * 9 + p[:, 1], minlength=81)).pvalue > 1e-4
    assert abs(p[:, 2].sum() - n / 2) < 4.5 * np.sqrt(n) / 2


def test_draws_are_a_function_of_seed_epoch_index_only():
    """The same sample gets the same crop/flip whatever the batch size and whether loaded
    from a resumed position; other epochs and other seeds draw afresh; the global RNGs are
    neither used nor consumed."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = _draws(_coordinate_module(300, 32), 1)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert a == _draws(_coordinate_module(300, 7), 1)
    assert a == {i: tuple(augment_params([sample_seed(SEED, 1, i)], 4, True)[0].tolist())
                 for i in range(300)}
    torch.manual_seed(99)  # the global RNG state has no say
    assert a == _draws(_coordinate_module(300, 32), 1)
    for other in (_draws(_coordinate_module(300, 32), 2),
                  _draws(_coordinate_module(300, 32, seed=SEED + 1), 1)):
        assert sum(a[i] == other[i] for i in a) < 30  # ~300/162 agree by chance


def _cifar(tmp_path, loader: str, **kw) -> CIFARDataModule:
    dm = CIFARDataModule(root=str(tmp_path / "cifar"), fake=True, batch_size=8, seed=SEED,
                         loader=loader, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _batches(dm, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                    for x, y in zip(a, b))


def test_cifar_train_batches_are_the_seeded_permutation_augmented_like_torchvision(tmp_path):
    """Smoke files in the real pickle format: epoch 2's batches equal, image by image,
    torchvision's functional ops on the raw image (the torchvision path's dataset) at the
    seeded permutation, with the sample's (seed, epoch, index) draws; most are augmented."""
    dm = _cifar(tmp_path, "tensor")
    raw = _cifar(tmp_path, "torchvision").train_set  # torchvision CIFAR10: data (N,32,32,3)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    got = _batches(dm, loader)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(SEED * 100003 + 2)).tolist()
    assert torch.cat([y for _, y in got]).tolist() == [raw.targets[i] for i in order]
    expected, moved = [], 0
    for i in order:
        img = torch.from_numpy(raw.data[i]).permute(2, 0, 1)
        t, lft, f = augment_params([sample_seed(SEED, 2, i)], 4, True)[0].tolist()
        expected.append(_reference(img, t, lft, f))
        moved += (t, lft, f) != (4, 4, 0)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.stack(expected))
    assert moved > 48


@pytest.mark.parametrize("batches", [3, 7])
def test_tensor_loader_mid_epoch_state_resumes_exactly_the_remaining_batches(tmp_path, batches):
    ref_dm = _cifar(tmp_path, "tensor")
    ref = ref_dm.train_dataloader()
    ref.sampler.set_epoch(1)
    reference = _batches(ref_dm, ref)
    ref.sampler.set_epoch(2)
    reference2 = _batches(ref_dm, ref)
    dm = _cifar(tmp_path, "tensor")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": batches}
    fresh_dm = _cifar(tmp_path, "tensor")  # a new process: new dataset, loader, sampler
    fresh = fresh_dm.train_dataloader()
    fresh.load_state_dict(state)
    assert _same(_batches(fresh_dm, fresh), reference[batches:])
    fresh.sampler.set_epoch(2)
    assert _same(_batches(fresh_dm, fresh), reference2)  # the next epoch is whole


@pytest.mark.parametrize("module", ["cifar", "cifar_no_augment", "cifar_imagefolder", "mnist",
                                    "digits"])
def test_unaugmented_batches_equal_the_per_sample_path(tmp_path, module):
    """Where nothing is random (eval and calibration batches; CIFAR with augment=false; MNIST
    and digits train batches) the tensor path gives bitwise the per-sample path's batches."""
    def make(loader):
        if module == "cifar_imagefolder":  # PNG files decoded once into the uint8 tensor
            return _cifar(tmp_path, loader, format="imagefolder")
        if module.startswith("cifar"):
            return _cifar(tmp_path, loader, augment=module == "cifar")
        if module == "mnist":
            dm = MNISTDataModule(root=str(tmp_path / "mnist"), fake=True, batch_size=8,
                                 seed=SEED, loader=loader)
            dm.prepare_data()
        else:
            dm = DigitsDataModule(batch_size=16, fake=True, seed=SEED, loader=loader)
        dm.setup("fit")
        return dm

    new, old = make("tensor"), make("torchvision")
    names = ["val_dataloader", "test_dataloader"]
    if module not in ("cifar", "cifar_imagefolder"):  # (else train batches are augmented)
        names += ["train_dataloader", "calibration_dataloader"]
    for name in names:
        a = _batches(new, getattr(new, name)())
        b = [tuple(t) for t in getattr(old, name)()]
        assert len(a) > 1 and _same(a, b), name


def test_tensor_path_needs_no_workers_and_rejects_unknown_loader(tmp_path):
    dm = _cifar(tmp_path, "tensor", num_workers=2)
    assert dm.train_dataloader().num_workers == 0 and dm.val_dataloader().num_workers == 0
    assert isinstance(dm.train_set, TensorImages) and dm.train_set.images.dtype == torch.uint8
    with pytest.raises(ConfigError, match="data.loader='pil'.*tensor.*torchvision"):
        CIFARDataModule(root=str(tmp_path), loader="pil")
