"""torch.distributed plumbing for ``torchrun``: process group set-up, rank helpers, state all-reduces.

Fine-tuning and analysis call these so that one code path serves one process and ``torchrun
--nproc-per-node N``. Under one process (no ``WORLD_SIZE`` in the environment, or 1) every helper is a
no-op, so nothing here costs a single-process user anything.

What is kept identical across ranks (see README "Distributed"):

* the mask state: ``class_peak`` (mean over the ranks that have seen the class), ``class_seen``
  (logical or), ``beta`` and its momentum ``beta_velocity`` (mean), all-reduced after every training batch by
  :func:`all_reduce_mask_state`;
* the analysis running sums, combined with :func:`icnn_compress.analyze.merge_states` by
  :func:`gather_objects`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_reduce_mask_state",
    "all_reduce_state",
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


@torch.no_grad()
def all_reduce_mask_state(model: nn.Module) -> None:
    """Make every rank's :class:`~icnn_compress.mask.InterpretableMask` state identical (one all-reduce).

    ``class_peak`` becomes the mean over the ranks that have seen the class (a rank that has not seen it
    holds 0, which must not pull the mean down), ``class_seen`` the logical or, ``beta`` the mean. All
    masks travel in one flat float32 buffer; every rank computes the same division from the same sums, so
    the results are bitwise identical. No-op in one process.
    """
    if not is_distributed():
        return
    from .mask import InterpretableMask

    masks = [m for m in model.modules() if isinstance(m, InterpretableMask)]
    if not masks:
        return
    parts = []
    for m in masks:
        seen = m.class_seen.float()  # (C,)
        parts += [(m.class_peak.float() * seen[:, None]).flatten(), seen, m.beta.float(), m.beta_velocity.float()]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    world = float(dist.get_world_size())
    offset = 0
    for m in masks:
        c, d = m.class_peak.shape
        peak_sum = flat[offset:offset + c * d].view(c, d)
        offset += c * d
        seen_count = flat[offset:offset + c]
        offset += c
        beta_sum = flat[offset:offset + d]
        offset += d
        velocity_sum = flat[offset:offset + d]
        offset += d
        seen = seen_count > 0
        mean_peak = peak_sum / seen_count.clamp(min=1)[:, None]
        m.class_peak.copy_(torch.where(seen[:, None], mean_peak, m.class_peak).to(m.class_peak.dtype))
        m.class_seen.copy_(seen)
        m.beta.copy_((beta_sum / world).to(m.beta.dtype))
        m.beta_velocity.copy_((velocity_sum / world).to(m.beta_velocity.dtype))


def all_reduce_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sum a dict of running-sum tensors over ranks; return the summed copies (the input is left alone).

    For states whose every entry combines by addition (counts, sums, cross products). The analysis state
    also holds log-sum-exps, top-k lists and range-doubling histograms; it goes through
    :func:`gather_objects` and :func:`icnn_compress.analyze.merge_states` instead.
    """
    out = {k: v.clone() for k, v in state.items()}
    if not is_distributed():
        return out
    for v in out.values():
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return out
