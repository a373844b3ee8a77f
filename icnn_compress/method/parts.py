"""Part interpretability (METHOD.md section 6): the IoU of a filter's top-0.5 % region with each part mask.

A filter hits a part on an image when the region where its map is in the top ``quantile`` of all its values
over the images overlaps that part's mask with IoU > 0.2 (:func:`part_hits`, fed by
:func:`top_quantile_threshold`); per part and filter category, the hit rate is the part interpretability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from icnn_compress.method.metrics import _nanmean_or_nan

__all__ = ["PartInterpretability", "part_hits", "part_interpretability", "part_scores", "top_quantile_threshold"]


def top_quantile_threshold(maps: Tensor, quantile: float = 0.005) -> Tensor:
    """Return each filter's top-``quantile`` activation over all cells of all images, ``(D,)``.

    ``maps`` is ``(N, D, P)`` (P cells per map). The threshold is the ``⌈quantile·N·P⌉``-th largest
    value of the filter (METHOD.md section 6: "its top 0.5 % quantile over all positions of all images").
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, D, P), got shape {tuple(maps.shape)}")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n, d, p = maps.shape
    if n * p == 0:
        return torch.full((d,), float("nan"), dtype=torch.float64)
    k = max(1, math.ceil(quantile * n * p))
    flat = maps.transpose(0, 1).reshape(d, n * p)  # (D, N·P)
    return flat.float().topk(k, dim=1).values[:, -1].double()


def part_hits(
    maps: Tensor, threshold: Tensor, part_fraction: Tensor, *, iou_threshold: float = 0.2
) -> Tensor:
    """Return whether each filter's region overlaps each part with IoU above ``iou_threshold``, ``(B, D, K)``.

    The region is ``maps ≥ threshold`` where the map is positive, up-sampled to the image by nearest
    neighbour; IoU is computed exactly on the map grid with the part masks area-pooled onto the cells
    (``part_fraction``: the share of each cell the part covers), which is the same thing. A part absent
    from an image never counts.

    Args:
        maps: ``(B, D, P)`` maps on a grid of ``P`` equal cells.
        threshold: ``(D,)`` per-filter threshold (:func:`top_quantile_threshold`).
        part_fraction: ``(B, K, P)`` in ``[0, 1]``, e.g. ``adaptive_avg_pool2d(masks, (h, w)).flatten(2)``.
        iou_threshold: 0.2 in METHOD.md section 6.
    """
    b, d, p = maps.shape
    if part_fraction.shape[0] != b or part_fraction.shape[2] != p:
        raise ValueError(f"part_fraction must be (B, K, P) = ({b}, K, {p}), got {tuple(part_fraction.shape)}")
    if threshold.shape != (d,):
        raise ValueError(f"threshold must be (D,) = ({d},), got {tuple(threshold.shape)}")
    thr = threshold.to(maps.device, torch.float32)[None, :, None]
    region = ((maps.float() >= thr) & (maps > 0)).float()  # (B, D, P)
    frac = part_fraction.to(maps.device).float()
    inter = torch.bmm(region, frac.transpose(1, 2))  # (B, D, K), in cells
    area_r = region.sum(-1)  # (B, D)
    area_p = frac.sum(-1)  # (B, K)
    union = area_r[:, :, None] + area_p[:, None, :] - inter
    iou = inter / union.clamp(min=1e-12)
    return (iou > iou_threshold) & (area_p > 0)[:, None, :]


@dataclass
class PartInterpretability:
    """Part interpretability of METHOD.md section 6 for ``D`` filters and ``K`` parts.

    Attributes:
        per_filter_part: ``(D, K)`` float64, the fraction of the images of the filter's category that
            contain part ``k`` on which the filter's region has IoU > 0.2 with it (NaN: no such image).
        per_filter: ``(D,)`` ``P_f`` = max over parts (NaN when no part is present on its images).
        best_part: ``(D,)`` long, the part reaching ``P_f`` (``-1``: none).
        per_part: ``(K,)`` float64, mean over filters of ``per_filter_part[:, k]``: how well the layer
            as a whole finds part ``k``.

    The tensors live on the device of the counts; :attr:`mean` reads a number back to the host.
    """

    per_filter_part: Tensor
    per_filter: Tensor
    best_part: Tensor
    per_part: Tensor

    @property
    def mean(self) -> float:
        """The NaN-aware mean of ``per_filter`` (the paper's number), computed when read."""
        return _nanmean_or_nan(self.per_filter)


def part_interpretability(hits: Tensor, present: Tensor, labels: Tensor, filter_category: Tensor | None = None
                          ) -> PartInterpretability:
    """Return the part interpretability of each filter from per-image hits.

    Args:
        hits: ``(N, D, K)`` bool, from :func:`part_hits`.
        present: ``(N, K)`` bool, the part is in the image (its mask is not empty).
        labels: ``(N,)`` long image labels.
        filter_category: ``(D,)`` long; each filter is scored on the images of its category. ``None``:
            on every image.
    """
    n, d, k = hits.shape
    if present.shape != (n, k) or labels.shape != (n,):
        raise ValueError(f"present must be (N, K) = {(n, k)} and labels (N,), got {tuple(present.shape)} "
                         f"and {tuple(labels.shape)}")
    hits = hits.bool().cpu()
    present = present.bool().cpu()
    if filter_category is None:
        own = torch.ones(n, d, dtype=torch.bool)
    else:
        own = labels.cpu()[:, None] == filter_category.cpu()[None, :]  # (N, D)
    eligible = own[:, :, None] & present[:, None, :]  # (N, D, K)
    return part_scores((hits & eligible).sum(0), eligible.sum(0))


def part_scores(hit: Tensor, count: Tensor) -> PartInterpretability:
    """Return the part interpretability from counts: ``hit`` ``(D, K)`` images where filter d counts on part k,
    out of ``count`` ``(D, K)`` images of its category that contain the part (streaming callers sum these).

    Computed on the counts' device (the analysis pass calls it on the GPU's running sums)."""
    if hit.shape != count.shape or hit.dim() != 2:
        raise ValueError(f"hit and count must both be (D, K), got {tuple(hit.shape)} and {tuple(count.shape)}")
    d, k = hit.shape
    f64, dev = torch.float64, hit.device
    hit, count = hit.to(dtype=f64), count.to(dtype=f64)
    frac = torch.where(count > 0, hit / count.clamp(min=1), float("nan"))  # (D, K)
    filled = frac.nan_to_num(-1.0)
    best_value, best = filled.max(dim=1) if k else (torch.full((d,), -1.0, dtype=f64, device=dev),
                                                     torch.full((d,), -1, dtype=torch.long, device=hit.device))
    per_filter = torch.where(best_value >= 0, best_value, float("nan"))
    best = torch.where(best_value >= 0, best, -1)
    per_part = torch.nanmean(frac, dim=0) if d else torch.full((k,), float("nan"), dtype=f64, device=dev)
    return PartInterpretability(per_filter_part=frac, per_filter=per_filter, best_part=best, per_part=per_part)
