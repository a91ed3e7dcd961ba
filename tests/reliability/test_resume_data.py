"""The training data order and augmentation after a resume (qtrain.data.resumable), on the
real CIFAR-10 loader (smoke files in the real pickle format, RandomCrop + flip)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from qtrain.data.resumable import sample_seed
from qtrain.data.vision import CIFARDataModule

SEED = 3


def _dm(tmp_path, workers: int = 0) -> CIFARDataModule:
    dm = CIFARDataModule(root=str(tmp_path / "cifar"), fake=True, batch_size=8, num_workers=workers,
                         seed=SEED)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Epochs 0-2 of an uninterrupted loader: 64 images, 8 batches of 8."""
    loader = _dm(tmp_path_factory.mktemp("ref")).train_dataloader()
    return [_epoch(loader, e) for e in range(3)]


def test_batches_are_the_seeded_permutation_with_per_sample_seeded_augmentation(tmp_path, reference):
    """Independent reference: the permutation from torch.randperm seeded (seed, epoch), each
    image transformed by torchvision under torch.manual_seed(sample_seed(seed, epoch, i))."""
    dm = _dm(tmp_path)
    raw = dm.train_set  # torchvision CIFAR10: raw uint8 images, the train transform
    for epoch in (0, 2):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(SEED * 100003 + epoch))
        expected = []
        for i in order.tolist():
            torch.manual_seed(sample_seed(SEED, epoch, i))
            expected.append(raw.transform(T.functional.to_pil_image(raw.data[i])))
        got = torch.cat([x for x, _ in reference[epoch]])
        assert torch.equal(got, torch.stack(expected))
        assert torch.cat([y for _, y in reference[epoch]]).tolist() == [raw.targets[i] for i in order]
    # the augmentation is really on: most images differ from their un-augmented version
    plain = T.Compose(raw.transform.transforms[2:])  # ToTensor + Normalize only
    order = torch.randperm(64, generator=torch.Generator().manual_seed(SEED * 100003))
    x0 = torch.stack([plain(T.functional.to_pil_image(raw.data[i])) for i in order.tolist()])
    got = torch.cat([x for x, _ in reference[0]])
    assert sum(not torch.equal(a, b) for a, b in zip(got, x0)) > 48


@pytest.mark.parametrize("batches", [3, 7])
def test_mid_epoch_state_resumes_exactly_the_remaining_batches(tmp_path, reference, batches):
    loader = _dm(tmp_path).train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": batches}
    fresh = _dm(tmp_path).train_dataloader()  # a new process: new dataset, loader, sampler
    fresh.load_state_dict(state)
    assert _same(list(fresh), reference[1][batches:])  # Lightning calls iter() first...
    assert _same(_epoch(fresh, 2), reference[2])  # ...and the next epoch is whole


def test_state_of_another_epoch_is_not_applied(tmp_path, reference):
    """An end-of-epoch state (epoch 1, all 8 batches) must not shorten epoch 2."""
    loader = _dm(tmp_path).train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches": 8})
    assert _epoch(loader, 2)[0][0].shape[0] == 8
    assert _same(_epoch(loader, 2), reference[2])


def test_workers_and_global_rng_do_not_change_the_batches(tmp_path, reference):
    """2 worker processes (each seeded by Lightning-style worker seeds from a different base
    seed) give the same augmented batches as the main process, and the global RNG state
    neither affects them nor is consumed by them (it belongs to the model)."""
    torch.manual_seed(12345)
    np.random.seed(7)
    random.seed(9)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    loader = _dm(tmp_path).train_dataloader()
    assert _same(_epoch(loader, 1), reference[1])
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    workers = _dm(tmp_path, workers=2).train_dataloader()
    assert _same(_epoch(workers, 1), reference[1])
    workers.load_state_dict({"epoch": 2, "batches": 5})
    assert _same(list(workers), reference[2][5:])  # resumed with fresh workers
