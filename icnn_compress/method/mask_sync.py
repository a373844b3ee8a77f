"""Keeping every rank's mask state identical under ``torchrun`` (one all-reduce after each training step)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from icnn_compress.method.mask import InterpretableMask
from icnn_compress.runtime.distributed import is_distributed

__all__ = ["all_reduce_mask_state"]


@torch.no_grad()
def all_reduce_mask_state(model: nn.Module) -> None:
    """Make every rank's :class:`~icnn_compress.method.mask.InterpretableMask` state identical (one all-reduce).

    ``class_peak`` becomes the mean over the ranks that have seen the class (a rank that has not seen it
    holds 0, which must not pull the mean down), ``class_seen`` the logical or, ``beta`` the mean. All
    masks travel in one flat float32 buffer; every rank computes the same division from the same sums, so
    the results are bitwise identical. No-op in one process.
    """
    if not is_distributed():
        return

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
