"""A training DataLoader whose data order and augmentation survive a kill and resume.

Three pieces, so a run resumed from any checkpoint (end of epoch or mid-epoch) sees exactly
the samples, in the order and with the random crops/flips, of an uninterrupted run:

- :class:`ResumableSampler` shuffles with a permutation that depends only on
  ``(seed, epoch)`` and yields ``(index, sample_seed)`` pairs.
- :class:`SeededSamples` loads sample ``index`` with the global torch / numpy / Python RNGs
  seeded from ``sample_seed`` (restored afterwards): a sample's augmentation depends on
  ``(seed, epoch, index)`` only, not on which worker loads it, how many workers there are,
  or how many samples a worker loaded before (workers restart on resume; the results are
  the same with ``num_workers=0`` or ``8``).
- :class:`ResumableDataLoader` implements Lightning's ``_Stateful`` protocol
  (``state_dict`` / ``load_state_dict``): Lightning stores its position (epoch, batches
  yielded) in the checkpoint's fit-loop state and, on a mid-epoch resume, hands it back
  before creating the iterator; the loader then skips the batches already trained on (their
  indices only: nothing is loaded). Without it Lightning 2.x restarts the interrupted epoch's
  data from its first batch ("your dataloader is not resumable" warning).

The skip works at the batch-sampler level, so it also holds under DDP (Lightning wraps the
sampler in a ``DistributedSamplerWrapper``, and each rank skips its own batches).
"""

from __future__ import annotations

import itertools
import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of sample ``index`` in ``epoch`` of a run seeded with ``seed`` (63 bits)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    return _splitmix64(h ^ (index & _MASK64)) >> 1


@contextmanager
def seeded_rngs(seed: int):
    """Run the block with the global CPU torch generator, numpy's global RNG and Python's
    ``random`` seeded from ``seed``; their previous states are restored on exit. CUDA
    generators are not touched (augmentation runs on the CPU)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class ResumableSampler(Sampler):
    """Random (or sequential, ``shuffle=False``) order from ``torch.randperm`` seeded with
    ``(seed, epoch)``; yields ``(index, sample_seed(seed, epoch, index))``. Lightning calls
    :meth:`set_epoch` every epoch (and forwards it through its DDP sampler wrapper)."""

    def __init__(self, data: Dataset, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = len(data), int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        epoch = self.epoch
        return ((i, sample_seed(self.seed, epoch, i)) for i in self.order())

    def __len__(self) -> int:
        return self.n


class SeededSamples(Dataset):
    """``dataset[index]`` under :func:`seeded_rngs` for keys ``(index, seed)`` from
    :class:`ResumableSampler` (a plain integer key loads without reseeding)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            with seeded_rngs(seed):
                return self.dataset[index]
        return self.dataset[key]


class _SkipFirst:
    """The loader's batch sampler with its first ``skip`` batches left out (indices only)."""

    def __init__(self, batch_sampler) -> None:
        self.batch_sampler, self.skip = batch_sampler, 0

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with Lightning's ``state_dict`` / ``load_state_dict`` protocol:
    the state is ``{"epoch", "batches"}`` (batches yielded so far in that epoch); a loaded
    state makes the next iteration of that same epoch start after those batches. Lightning
    saves the state with every checkpoint and loads it only on a mid-epoch restart."""

    @property
    def _index_sampler(self):
        index_sampler = super()._index_sampler
        skipper = self.__dict__.get("_skipper")
        if skipper is None or skipper.batch_sampler is not index_sampler:
            skipper = _SkipFirst(index_sampler)
            self.__dict__["_skipper"] = skipper
        return skipper

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self):
        epoch = self._epoch()
        resume = self.__dict__.get("_resume")
        skip = resume["batches"] if resume and resume["epoch"] == epoch else 0
        self._index_sampler.skip = skip  # read when the iterator draws its sampler iterator
        inner = super().__iter__()
        position = {"epoch": epoch, "batches": skip}
        if self.__dict__.get("_position") is None:
            self.__dict__["_position"] = position
        return self._counted(inner, position)

    def _counted(self, inner, position: dict):
        for batch in inner:
            self.__dict__["_resume"] = None  # this epoch's iteration has started
            # the position of the iterator that yielded last (a callback may iterate the
            # train loader on the side, e.g. a Hessian analysis before training)
            self.__dict__["_position"] = position
            position["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        pos = self.__dict__.get("_position") or {"epoch": self._epoch(), "batches": 0}
        return {"epoch": int(pos["epoch"]), "batches": int(pos["batches"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__["_resume"] = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
        _set_sampler_epoch(self, int(state["epoch"]))  # Lightning sets it after iter()
