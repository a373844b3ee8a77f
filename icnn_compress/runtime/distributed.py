"""torch.distributed plumbing for ``torchrun``: process group set-up, rank helpers, state all-reduces.

Fine-tuning and analysis call these so that one code path serves one process and ``torchrun
--nproc-per-node N``. Under one process (no ``WORLD_SIZE`` in the environment, or 1) every helper is a
no-op, so nothing here costs a single-process user anything.

What is kept identical across ranks (see README "Distributed"):

* the mask state: ``class_peak`` (mean over the ranks that have seen the class), ``class_seen``
  (logical or), ``beta`` and its momentum ``beta_velocity`` (mean), all-reduced after every training batch by
  :func:`icnn_compress.method.mask_sync.all_reduce_mask_state`;
* the analysis running sums, combined with :func:`icnn_compress.analyze.merge_states` by
  :func:`gather_objects`.
"""

from __future__ import annotations

import datetime
import logging
import os

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "shard_indices",
    "world_size",
]

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, shows progress and writes files."""
    return rank() == 0


def init_distributed(device: str | torch.device = "auto", *, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK); return the device.

    Backend ``nccl`` when the device is CUDA (each rank takes ``cuda:LOCAL_RANK``), else ``gloo``. Without
    ``WORLD_SIZE`` > 1 in the environment nothing is initialised and the device is resolved as usual.
    Calling it again once initialised is harmless.
    """
    want = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))
    if want.type == "cuda" and want.index is None:
        # One process: the current GPU. Under torchrun: the rank's own (set_device needs an index).
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        want = torch.device("cuda", local_rank() if distributed else torch.cuda.current_device())
    if want.type == "cuda":
        torch.cuda.set_device(want)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return want
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is set but {var} is not; launch with torchrun (it sets both)")
    backend = "nccl" if want.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined (%s on %s)", dist.get_rank(), dist.get_world_size(), backend, want)
    return want


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (no-op in one process); returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; host side)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n: int, *, shuffle: bool = False, seed: int = 0) -> list[int]:
    """This rank's share of ``range(n)``: every ``world``-th index of the (seeded) order, without padding.

    Unlike ``DistributedSampler`` nothing is repeated, so sums over ranks count each image once; the ranks
    may differ by one image, which is fine for passes that hold no collective inside their loop.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return order[rank()::world_size()]
