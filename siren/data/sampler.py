"""The one data order of the project: epochs of seeded permutations, cut into DDP-split batches,
resumable mid-epoch. Every loader (stage-1 training and validation, the probes) reads through it.

Batches are lists of dataset keys (epoch, index): the dataset draws an item's random crop from
(seed, epoch, index), so a resumed job that rebuilds the epoch from (seed, epoch) and skips what
was consumed sees exactly the batches and crops the uninterrupted job would have seen.
"""
from __future__ import annotations

import signal
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from siren.runtime import derive_seed


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of one epoch: a permutation seeded by (seed, epoch), cut into global batches of
    ``batch_size * world`` (rank r takes its slice of each), the first ``skip`` examples left out.
    Each pass over the sampler is the next epoch; ``set_epoch`` positions it (exact resume)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, skip: int = 0, drop_last: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is ``epoch``, starting after its first ``skip`` examples (global count)."""
        self.epoch, self.skip = epoch, skip

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n,
                              generator=torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        order, step = self.order(epoch), self.batch_size * self.world
        for start in range(skip, self.n, step):
            if self.drop_last and start + step > self.n:
                return
            part = order[start: start + step][self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
            if part:
                yield [(epoch, i) for i in part]

    def __len__(self) -> int:
        """This rank's batches (``__iter__``'s count: the last global batch may leave a rank nothing)."""
        step = self.batch_size * self.world
        if self.drop_last:
            return max(0, self.n - self.skip) // step
        last = (self.n - self.skip) % step  # examples of the last, short global batch
        return (self.n - self.skip) // step + (last > self.rank * self.batch_size)


def epoch_loader(dataset: Dataset, collate: Callable, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, drop_last: bool = False, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """``dataset`` (indexed by (epoch, index)) read in ``EpochBatches`` order; ``pin_memory`` for a run on a GPU
    (it followed whether CUDA existed: a CPU run on a GPU node pinned every batch for nothing).

    The DataLoader gets its own generator so iterating never draws from the global torch RNG
    (which the model's dropout uses): a resumed run stays on the uninterrupted run's stream."""
    sampler = EpochBatches(len(dataset), batch_size, seed, shuffle=shuffle, rank=rank, world=world,
                           drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                      persistent_workers=False, worker_init_fn=signals_to_the_main_process)


def signals_to_the_main_process(_: int) -> None:
    """In each loader worker: SLURM (scancel, preemption, a time limit) and a terminal's Ctrl-C signal every process
    of the job, and torch's handler ended a worker on SIGTERM, so the main process failed inside its step, without
    the checkpoint it was about to write. The main process stops at the step boundary and ends its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
