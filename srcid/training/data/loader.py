"""Batching: `collate` ITEMs into tensors, and `make_loader` with seeded, resumable shuffling."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from srcid.training.data.errors import DataError
from srcid.training.data.items import Item


def collate(items: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Stack ITEMs into a batch: each modality float32 [B, T, *shape], each "<m>_mask" bool [B, T],
    "labels" int64 [B, T] (per step) or [B] (per clip; a per-clip [1] becomes [])."""
    if not items:
        raise DataError("collate: empty batch")
    keys = set(items[0])
    batch: dict[str, torch.Tensor] = {}
    for b, item in enumerate(items):
        if set(item) != keys:
            raise DataError(f"collate: item {b} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    for key in sorted(keys):
        if key == "labels":
            arrays = [np.asarray(it[key], dtype=np.int64).reshape(() if np.size(it[key]) == 1 else -1) for it in items]
        elif key.endswith("_mask"):
            arrays = [np.asarray(it[key], dtype=bool) for it in items]
        else:
            arrays = [np.asarray(it[key], dtype=np.float32) for it in items]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"collate: {key} has different shapes in one batch: {sorted(map(list, shapes))}")
        batch[key] = torch.from_numpy(np.stack(arrays))
    return batch


class SeededSampler(Sampler[int]):
    """Indices of one epoch: a permutation that depends only on (seed, epoch), split across ranks.

    Each `iter()` serves the current epoch and then advances it, so consecutive epochs differ without any
    call; `set_epoch(e, offset)` jumps to epoch e, skipping its first `offset` indices of this rank, which is
    how a resumed run continues with exactly the batches an uninterrupted run would have seen.
    With world_size > 1, rank r takes positions r, r + world_size, ... of the permutation (padded by wrapping,
    or cut with drop_last, so that every rank gets the same count, as torch's DistributedSampler does).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.offset = 0, 0

    def __len__(self) -> int:
        return self.n // self.world_size if self.drop_last else -(-self.n // self.world_size)

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order."""
        if self.shuffle:
            # (seed, epoch) through SeedSequence, not seed + epoch: seed 1 epoch 0 must not replay seed 0 epoch 1.
            state = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(state)).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        if order and total > len(order):
            order = (order * -(-total // len(order)))[:total]
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.indices(self.epoch)[self.offset :]
        self.epoch, self.offset = self.epoch + 1, 0
        return iter(order)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker as base_seed + worker_id (base_seed drawn from the loader's generator);
    # numpy and random follow it so that any augmentation in a reader is reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` that yields `collate` batches in an order fixed by `seed`.

    The sampler (`loader.sampler`, a SeededSampler) advances one epoch per pass; call
    `loader.sampler.set_epoch(epoch, offset)` to resume. Pass rank/world_size under DistributedDataParallel.
    pin_memory defaults to CUDA availability.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = SeededSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )
