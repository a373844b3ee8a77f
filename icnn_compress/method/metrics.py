"""Accuracy, location instability and landmark diversity: pure functions on tensors.

Location instability is the measure of Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks"
(CVPR 2018, https://arxiv.org/abs/1710.00935), section 4.2 / METHOD.md section 6: a filter that
describes one part should put its peak at a constant distance from that part's landmark, so the spread
of that distance over the images where the filter fires most is small. The two references of METHOD.md
section 8 (a random peak and a landmark oracle) put a measured value between its ceiling and its floor.

Instability alone rewards filters that all fire on the object's centre (stable and redundant, METHOD.md
section 8), so two measures of how the filters spread over the parts sit beside it:
:func:`landmark_diversity` (the tracked-landmark histogram, its normalised entropy and the fraction of
landmarks that at least 10 % of the filters track) and part interpretability
(:mod:`icnn_compress.method.parts`).

Conventions: pixel coordinates are continuous ``(x, y)`` with the image spanning ``[0, S]``; ``N``
images, ``D`` filters, ``K`` landmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from icnn_compress.method.receptive_field import LayerGeometry

__all__ = [
    "InstabilityResult",
    "LandmarkDiversity",
    "accuracy",
    "category_histogram",
    "landmark_diversity",
    "landmark_histogram",
    "location_instability",
    "min_instability_classes",
    "oracle_reference",
    "random_peak_reference",
]

# Bound on N·d·K elements materialised at once; filters are processed in chunks of this size.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class InstabilityResult:
    """Location instability of ``D`` filters against ``K`` landmarks.

    Attributes:
        per_filter_landmark: ``(D, K)`` float64, ``D_{f,k}``: sample standard deviation of the normalised
            distance over the filter's top-k images containing landmark ``k``; NaN with fewer than 2.
        per_filter: ``(D,)`` float64, NaN-aware mean over landmarks (NaN when every pair is NaN).
        tracked_landmark: ``(D,)`` long, the landmark with the smallest MEAN normalised distance over
            the same images (the part the filter tracks); ``-1`` for a filter measured on no image.
        num_images: ``(D, K)`` long, how many images entered each ``D_{f,k}``.

    The tensors live on the device of the peaks; :attr:`mean` reads a number back to the host.
    """

    per_filter_landmark: Tensor
    per_filter: Tensor
    tracked_landmark: Tensor
    num_images: Tensor

    @property
    def mean(self) -> float:
        """NaN-aware mean over filters of ``per_filter`` (the reported instability).

        Computed when read, not by :func:`location_instability`: a caller that loops over classes on a
        GPU (:func:`min_instability_classes`) would otherwise wait for the device once per call.
        """
        return _nanmean_or_nan(self.per_filter)


def accuracy(logits_or_preds: Tensor, labels: Tensor) -> float:
    """Return the fraction of correct predictions, from ``(N, C)`` logits or ``(N,)`` class indices.

    Returns NaN for an empty batch.
    """
    preds = logits_or_preds.argmax(dim=-1) if logits_or_preds.dim() == labels.dim() + 1 else logits_or_preds
    if preds.shape != labels.shape:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match labels {tuple(labels.shape)}")
    if labels.numel() == 0:
        return float("nan")
    return (preds.to(labels.device) == labels).double().mean().item()


def location_instability(
    peak_value: Tensor,
    peak_xy: Tensor,
    landmarks: Tensor,
    visible: Tensor,
    *,
    image_diagonal: float,
    top_k: int = 100,
    filter_category: Tensor | None = None,
    labels: Tensor | None = None,
    filter_mask: Tensor | None = None,
    drop_sparse: bool = False,
) -> InstabilityResult:
    """Return the location instability of each filter against each landmark (METHOD.md section 6).

    For filter ``f`` and landmark ``k``: take the images where ``k`` is visible (and, with
    ``filter_category`` and ``labels``, that are of the filter's category: the "cls" rule of METHOD.md
    section 8), rank them by the filter's peak activation (ties: lower image index first), keep the top
    ``top_k``; ``d = ‖landmark − peak_xy‖ / image_diagonal``; ``D_{f,k}`` is the sample (unbiased)
    standard deviation of ``d``. Pairs with fewer than 2 images are NaN and left out of the means.

    Args:
        peak_value: ``(N, D)`` each filter's peak activation (max over cells) on each image.
        peak_xy: ``(N, D, 2)`` pixel ``(x, y)`` of the peak cell's receptive-field centre.
        landmarks: ``(N, K, 2)`` pixel ``(x, y)`` of each landmark (any value where invisible).
        visible: ``(N, K)`` bool.
        image_diagonal: the normaliser, ``sqrt(2)·S`` for ``S × S`` images.
        top_k: images kept per (filter, landmark); the paper uses 100.
        filter_category: ``(D,)`` long, each filter's category (``-1``: none); needs ``labels``.
        labels: ``(N,)`` long image labels, used only with ``filter_category``.
        filter_mask: ``(N, D)`` bool, images each filter may be measured on at all (the oracle
            reference uses it for "landmark j is visible"); ``None``: every image.
        drop_sparse: drop a filter (``per_filter`` NaN) when any landmark was seen on fewer than 2 of its
            images, as the released code does. A landmark visible on none of the images the filter may be
            measured on (with ``filter_category``: none of its category's) is not one of that category's
            parts and drops nothing: on PASCAL-Part and the generated data each category has its own parts.
            ``False`` averages the landmarks that have 2 or more.
    """
    n, d = _check_2d("peak_value", peak_value)
    device = peak_value.device
    k = landmarks.shape[1] if landmarks.dim() == 3 else -1
    if peak_xy.shape != (n, d, 2):
        raise ValueError(f"peak_xy must be (N, D, 2) = {(n, d, 2)}, got {tuple(peak_xy.shape)}")
    if landmarks.shape != (n, k, 2) or visible.shape != (n, k):
        raise ValueError(f"landmarks must be (N, K, 2) and visible (N, K) with N = {n}, "
                         f"got {tuple(landmarks.shape)} and {tuple(visible.shape)}")
    if (filter_category is None) != (labels is None):
        raise ValueError("the 'cls' rule needs both filter_category and labels; pass both or neither")
    if filter_category is not None and labels is not None and (filter_category.shape != (d,) or labels.shape != (n,)):
        raise ValueError(f"filter_category must be (D,) = ({d},) and labels (N,) = ({n},), "
                         f"got {tuple(filter_category.shape)} and {tuple(labels.shape)}")
    if filter_mask is not None and filter_mask.shape != (n, d):
        raise ValueError(f"filter_mask must be (N, D) = {(n, d)}, got {tuple(filter_mask.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not image_diagonal > 0:
        raise ValueError(f"image_diagonal must be positive, got {image_diagonal}")

    landmarks = landmarks.to(device, torch.float64)
    visible = visible.to(device, torch.bool)
    peak_xy = peak_xy.to(device, torch.float64)
    if labels is not None and filter_category is not None:
        labels = labels.to(device)
        filter_category = filter_category.to(device)
    if filter_mask is not None:
        filter_mask = filter_mask.to(device, torch.bool)

    std = torch.full((d, k), float("nan"), dtype=torch.float64, device=device)
    mean_dist = torch.full((d, k), float("nan"), dtype=torch.float64, device=device)
    count = torch.zeros((d, k), dtype=torch.long, device=device)
    present = torch.zeros((d, k), dtype=torch.bool, device=device)  # the landmark is one of the filter's parts
    # Stable sort: equal peaks (e.g. all-zero maps) are ranked by image index, deterministically.
    order = torch.sort(peak_value, dim=0, descending=True, stable=True).indices  # (N, D)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * k))
    for s in range(0, d, chunk):
        e = min(d, s + chunk)
        o = order[:, s:e]  # (N, d): image indices of each filter, best first
        eligible = visible[o]  # (N, d, K)
        if filter_category is not None and labels is not None:
            eligible = eligible & (labels[o] == filter_category[s:e])[..., None]
        if filter_mask is not None:
            eligible = eligible & filter_mask[:, s:e].gather(0, o)[..., None]
        keep = eligible & (eligible.cumsum(dim=0) <= top_k)  # (N, d, K): the top-k eligible images
        xy = peak_xy[:, s:e].gather(0, o[..., None].expand(-1, -1, 2))  # (N, d, 2)
        dist = (landmarks[o] - xy[:, :, None, :]).norm(dim=-1) / image_diagonal  # (N, d, K)
        dist = dist.masked_fill(~keep, 0.0)  # also clears NaN landmarks of invisible parts
        c = keep.sum(dim=0)  # (d, K)
        mu = dist.sum(dim=0) / c.clamp(min=1)
        var = ((dist - mu) ** 2).masked_fill(~keep, 0.0).sum(dim=0) / (c - 1).clamp(min=1)
        std[s:e] = torch.where(c >= 2, var.sqrt(), float("nan"))
        mean_dist[s:e] = torch.where(c >= 1, mu, float("nan"))
        count[s:e] = c
        present[s:e] = eligible.any(dim=0)

    per_filter = (torch.nanmean(std, dim=1) if k
                  else torch.full((d,), float("nan"), dtype=torch.float64, device=device))
    if drop_sparse and k:
        enough = ((count >= 2) | ~present).all(dim=1)
        per_filter = torch.where(enough, per_filter, float("nan"))
    scored = mean_dist.nan_to_num(nan=float("inf"))
    if k:
        tracked = torch.where(torch.isfinite(scored).any(dim=1), scored.argmin(dim=1), -1)
    else:
        tracked = torch.full((d,), -1, dtype=torch.long, device=device)
    return InstabilityResult(per_filter_landmark=std, per_filter=per_filter, tracked_landmark=tracked,
                             num_images=count)


def random_peak_reference(
    landmarks: Tensor,
    visible: Tensor,
    *,
    geometry: LayerGeometry,
    map_size: int | tuple[int, int],
    image_diagonal: float,
    top_k: int = 100,
    labels: Tensor | None = None,
    num_filters: int = 128,
    seed: int = 0,
    drop_sparse: bool = False,
) -> InstabilityResult:
    """Return the instability of ``num_filters`` filters that peak at a uniformly random cell (the ceiling).

    Each virtual filter's peak cell and peak value (which sets the top-k ranking) are drawn
    independently per image from a generator seeded with ``seed``. With ``labels``, filters are dealt
    round-robin to the classes present and measured by the "cls" rule, as the real filters are when
    they have categories.

    Args:
        landmarks, visible, image_diagonal, top_k, labels: as in :func:`location_instability`.
        geometry: the measured layer's :class:`LayerGeometry`.
        map_size: the layer's output grid ``n`` or ``(h, w)`` on the evaluated images.
        num_filters: virtual filters to average over (more: less sampling noise).
        seed: seed of the CPU generator.
        drop_sparse: as in :func:`location_instability` (the same rule as the measured filters).
    """
    n = landmarks.shape[0]
    h, w = _pair(map_size)
    gen = torch.Generator().manual_seed(seed)
    cell = torch.randint(h * w, (n, num_filters), generator=gen)
    idx = torch.stack((cell // w, cell % w), dim=-1)  # (N, F, 2) as (row, col)
    peak_xy = geometry.cell_centres(idx.double())
    peak_value = torch.rand(n, num_filters, generator=gen, dtype=torch.float64)
    device = landmarks.device
    filter_category = None
    if labels is not None and labels.numel():
        classes = labels.unique().cpu()
        filter_category = classes[torch.arange(num_filters) % len(classes)].to(device)
    return location_instability(peak_value.to(device), peak_xy.to(device), landmarks, visible,
                                image_diagonal=image_diagonal, top_k=top_k, filter_category=filter_category,
                                labels=labels if filter_category is not None else None, drop_sparse=drop_sparse)


def oracle_reference(
    landmarks: Tensor,
    visible: Tensor,
    *,
    geometry: LayerGeometry,
    map_size: int | tuple[int, int],
    image_diagonal: float,
    top_k: int = 100,
    labels: Tensor | None = None,
    seed: int = 0,
    drop_sparse: bool = False,
) -> InstabilityResult:
    """Return the instability of virtual filters that always peak at the cell containing one landmark (the floor).

    Virtual filter ``j`` peaks, on every image where landmark ``j`` is visible, at the centre of the cell
    that contains it (nearest cell centre, per ``geometry``), and is measured on those images only,
    against every landmark; ``.mean`` averages over ``j``. Its peak value, which sets the top-k ranking,
    is drawn from a generator seeded with ``seed`` so that the top-k is a random sample rather than
    the first images of a class-sorted dataset. With ``labels``, there is one virtual filter per
    (class, landmark), measured by the "cls" rule.

    Args: as in :func:`random_peak_reference`.
    """
    n, k = visible.shape
    device = landmarks.device
    cells = geometry.containing_cell(landmarks, map_size)  # (N, K, 2)
    cell_xy = geometry.cell_centres(cells.double()).to(device)  # (N, K, 2)
    gen = torch.Generator().manual_seed(seed)
    filter_category = None
    copies = 1
    if labels is not None and labels.numel():
        classes = labels.unique().cpu()
        copies = len(classes)
        filter_category = classes.repeat_interleave(k).to(device)  # filter (c, j) at c·K + j
    peak_xy = cell_xy.repeat(1, copies, 1)  # (N, C·K, 2)
    mask = visible.to(device, torch.bool).repeat(1, copies)  # (N, C·K)
    peak_value = torch.rand(n, copies * k, generator=gen, dtype=torch.float64).to(device)
    return location_instability(peak_value, peak_xy, landmarks, visible, image_diagonal=image_diagonal,
                                top_k=top_k, filter_category=filter_category,
                                labels=labels if filter_category is not None else None, filter_mask=mask,
                                drop_sparse=drop_sparse)


def min_instability_classes(
    peak_value: Tensor,
    peak_xy: Tensor,
    landmarks: Tensor,
    visible: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    image_diagonal: float,
    top_k: int = 100,
    drop_sparse: bool = False,
) -> Tensor:
    """Return each filter's class by the paper's rule: the class whose images give it the lowest instability.

    For every class ``c`` each filter is measured on the images of ``c`` alone (the "cls" rule with
    category ``c``); the class with the smallest mean over landmarks wins, ties to the lower class, and a
    filter measurable on no class gets class 0. Returns ``(D,)`` long on the device of ``peak_value``
    (nothing here waits for a GPU).
    """
    d = peak_value.shape[1]
    device = peak_value.device
    scores = torch.full((num_classes, d), float("inf"), dtype=torch.float64, device=device)
    for c in range(num_classes):
        res = location_instability(peak_value, peak_xy, landmarks, visible, image_diagonal=image_diagonal,
                                   top_k=top_k, filter_category=torch.full((d,), c, dtype=torch.long, device=device),
                                   labels=labels, drop_sparse=drop_sparse)
        scores[c] = res.per_filter.nan_to_num(nan=float("inf"))
    return scores.argmin(dim=0)


def landmark_histogram(tracked: Tensor, names: Sequence[str]) -> dict[str, int]:
    """Return how many filters track each landmark, from ``tracked`` ``(D,)`` (``-1``: none, not counted)."""
    return _histogram(tracked, names, "landmark")


def category_histogram(filter_category: Tensor, classes: Sequence[str]) -> dict[str, int]:
    """Return how many filters belong to each class, from ``filter_category`` ``(D,)`` (``-1``: none)."""
    return _histogram(filter_category, classes, "category")


def _histogram(values: Tensor, names: Sequence[str], what: str) -> dict[str, int]:
    values = values.reshape(-1).long().cpu()
    values = values[values >= 0]
    if values.numel() and int(values.max()) >= len(names):
        raise ValueError(f"{what} index {int(values.max())} is out of range for {len(names)} names; "
                         f"pass the full list of {what} names")
    counts = torch.bincount(values, minlength=len(names))
    return {str(name): int(c) for name, c in zip(names, counts.tolist())}


def _check_2d(name: str, t: Tensor) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ---------------------------------------------------------------------------------------------------------
# Diversity over landmarks and part interpretability


@dataclass
class LandmarkDiversity:
    """How a layer's filters spread over the landmarks they track.

    Attributes:
        counts: ``(K,)`` long, filters tracking each landmark (:attr:`InstabilityResult.tracked_landmark`).
        entropy: the histogram's entropy divided by ``log K``: 1 = the filters spread evenly over the
            landmarks, 0 = all on one; NaN when no filter tracks any landmark (0 with a single landmark;
            NaN, like ``coverage``, for data without landmarks, ``K = 0``).
        coverage: the fraction of the ``K`` landmarks tracked by at least ``min_fraction`` of the layer's
            ``D`` filters (every filter counts in ``D``, also one that tracks nothing).
        min_fraction: the share of filters that makes a landmark covered (0.1).
    """

    counts: Tensor
    entropy: float
    coverage: float
    min_fraction: float


def landmark_diversity(tracked: Tensor, num_landmarks: int, *, min_fraction: float = 0.1) -> LandmarkDiversity:
    """Return the tracked-landmark histogram, its normalised entropy and coverage, from ``tracked`` ``(D,)``.

    ``tracked`` holds each filter's landmark index (``-1``: none, counted in ``D`` but in no bin).
    """
    if num_landmarks < 0:
        raise ValueError(f"num_landmarks must be at least 0, got {num_landmarks}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    tracked = tracked.reshape(-1).long().cpu()
    d = tracked.numel()
    if tracked.numel() and int(tracked.max()) >= num_landmarks:
        raise ValueError(f"landmark index {int(tracked.max())} is out of range for {num_landmarks} landmarks")
    counts = torch.bincount(tracked[tracked >= 0], minlength=num_landmarks)
    total = int(counts.sum())
    if total == 0:
        entropy = float("nan")
    elif num_landmarks == 1:
        entropy = 0.0
    else:
        p = counts.double() / total
        entropy = float(-torch.special.xlogy(p, p).sum() / math.log(num_landmarks))
    coverage = float((counts >= min_fraction * d).double().mean()) if d else float("nan")
    return LandmarkDiversity(counts=counts, entropy=entropy, coverage=coverage, min_fraction=min_fraction)


def _nanmean_or_nan(t: Tensor) -> float:
    """``nanmean`` of ``t`` as a float; NaN for an empty tensor."""
    return float(torch.nanmean(t)) if t.numel() else float("nan")
