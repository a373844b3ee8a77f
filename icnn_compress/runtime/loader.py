"""The one DataLoader factory: a seeded shuffle, pinned memory on CUDA, sharding under torchrun."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from icnn_compress.runtime.distributed import is_distributed, shard_indices, world_size


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device,
                distributed: bool = False):
    """A DataLoader with a seeded shuffle; pinned memory and persistent workers on CUDA.

    ``distributed`` (under torchrun): the training split goes through a ``DistributedSampler`` (seeded
    with ``seed``, which changes every epoch, so the shards reshuffle; it pads every rank to the same
    number of batches, which DDP's lock-step needs); an evaluation split is sharded without padding, so
    that the all-reduced accuracy counts every image once.
    """
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed and is_distributed():
        if shuffle:
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
            sampler.set_epoch(seed)
            shuffle = False
        else:
            dataset = Subset(dataset, shard_indices(len(dataset)))
    per_rank = len(dataset) // world_size() if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=gen,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=(shuffle or sampler is not None) and per_rank > batch_size,
    )
