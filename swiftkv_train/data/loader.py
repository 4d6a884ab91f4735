"""Deterministic, rank-sharded, resumable batching of a TokenizedDataset."""

import math

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import SwiftKVInputError
from .tokenization import IGNORE_INDEX


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's index batches for one epoch.

    Every rank draws the same seeded permutation; global step ``s`` takes the block
    ``perm[s*B*W : (s+1)*B*W]`` and rank ``r`` gets its ``r``-th slice of ``B`` indices, so ranks never
    overlap and the global batch is the same for any rank. Resuming at ``start_step`` just starts the
    loop there: no data is read for the skipped steps.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise SwiftKVInputError(f"bad batching: batch_size={batch_size}, rank={rank}, world_size={world_size}.")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.shuffle, self.drop_last = shuffle, drop_last
        global_batch = batch_size * world_size
        if drop_last:
            self.steps_per_epoch = num_samples // global_batch
        else:
            self.steps_per_epoch = math.ceil(num_samples / global_batch)
        if self.steps_per_epoch == 0:
            raise SwiftKVInputError(
                f"the dataset has {num_samples} rows, fewer than one global batch "
                f"(batch_size {batch_size} x {world_size} ranks): use more data or a smaller batch."
            )
        if not 0 <= start_step <= self.steps_per_epoch:
            raise SwiftKVInputError(f"start_step={start_step} is outside the epoch's {self.steps_per_epoch} steps.")
        self.start_step = start_step

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        # Tuples of ints hash identically in every process (no hash salting for ints), unlike seed + epoch
        # this does not make (seed 0, epoch 1) repeat (seed 1, epoch 0).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & (2**63 - 1))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self):
        order = self._order()
        needed = self.steps_per_epoch * self.batch_size * self.world_size
        if needed > len(order):  # drop_last=False: wrap around so every rank gets full batches
            order = order.repeat(math.ceil(needed / len(order)))
        for step in range(self.start_step, self.steps_per_epoch):
            start = (step * self.world_size + self.rank) * self.batch_size
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def collate(items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack equal-length rows (packed data); right-pad unequal ones (labels -100, attention_mask 0)."""
    if len({len(item["input_ids"]) for item in items}) == 1:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
    length = max(len(item["input_ids"]) for item in items)
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0, "attention_mask": 0}
    batch = {}
    for key in items[0]:
        out = torch.full((len(items), length), fill[key], dtype=torch.long)
        for row, item in enumerate(items):
            out[row, : len(item[key])] = item[key]
        batch[key] = out
    return batch


class _Collator:
    """Picklable collate_fn (DataLoader workers may be spawned processes)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        return collate(items, self.pad_token_id)


def make_dataloader(dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
                    epoch: int = 0, shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                    pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard, in a seeded order, starting at ``start_step`` of ``epoch``.

    ``len(loader)`` is the number of batches left in the epoch; ``loader.batch_sampler.steps_per_epoch``
    the full count (for resume: epoch = step // steps_per_epoch, start_step = step % steps_per_epoch).
    """
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank=rank, world_size=world_size,
                                  start_step=start_step, epoch=epoch, shuffle=shuffle, drop_last=drop_last)
    pad_token_id = getattr(dataset, "pad_token_id", 0)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_Collator(pad_token_id), num_workers=num_workers,
                      pin_memory=pin_memory)
