"""The measures every explainer is judged by: pure, batched functions on maps, peaks and landmarks.

Conventions (as in :mod:`icnn_compress.method.metrics`): a map is ``(B, S, S)`` at input resolution; pixel
coordinates are continuous ``(x, y)`` with the image spanning ``[0, S]``, so pixel ``(row, col)`` has its
centre at ``(col + 0.5, row + 0.5)``; ``K`` landmarks per image with a ``visible`` flag.

* Part localisation: the pointing game (Zhang et al., "Top-down Neural Attention by Excitation
  Backprop", ECCV 2016, https://arxiv.org/abs/1608.00507): a hit when the map's peak lies within ``r``
  pixels of a visible landmark; and the spread of the peak-to-landmark distance, the location
  instability of Zhang, Wu, Zhu (CVPR 2018, https://arxiv.org/abs/1710.00935) with the explainer of one
  class playing the part of one filter.
* Faithfulness: deletion and insertion AUC (Petsiuk et al., "RISE", BMVC 2018,
  https://arxiv.org/abs/1806.07421): the class probability as pixels are removed from (inserted into)
  the image in the map's order.
* Category exclusivity of filters, from per-filter layer conductance (Dhamdhere et al., "How Important
  Is a Neuron?", ICLR 2019, https://arxiv.org/abs/1805.12233) aggregated per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from icnn_compress.method.metrics import location_instability
from icnn_compress.method.receptive_field import LayerGeometry

__all__ = [
    "blur",
    "conductance_exclusivity",
    "curve_auc",
    "map_peaks",
    "map_rank_correlation",
    "peak_distance_spread",
    "perturbation_curves",
    "pixel_ranks",
    "pointing_game",
    "upsample_to_input",
]


def upsample_to_input(cell_map: Tensor, geometry: LayerGeometry, image_size: int) -> Tensor:
    """Return a layer's ``(B, h, w)`` map at input resolution ``(B, S, S)``, aligned to its receptive fields.

    Each cell's value is placed at its receptive-field centre (``geometry.cell_centres``) and pixels
    between centres are interpolated bilinearly; pixels outside the outermost centres take the nearest
    border cell's value. ``F.interpolate`` instead assumes cell ``i``'s centre at ``(i + 0.5)·S/n``,
    which holds for "same"-padded stacks whose side is a multiple of the stride (small_cnn, VGG) but
    not in general (AlexNet's unpadded first conv, odd sides).
    """
    if cell_map.dim() != 3:
        raise ValueError(f"cell_map must be (B, h, w), got shape {tuple(cell_map.shape)}")
    b, h, w = cell_map.shape
    px = torch.arange(image_size, device=cell_map.device, dtype=torch.float64) + 0.5
    fy = (px - geometry.offset[0]) / geometry.stride[0]  # fractional row of each pixel centre
    fx = (px - geometry.offset[1]) / geometry.stride[1]
    # grid_sample with align_corners=True maps -1 / +1 to the centres of the first / last cells.
    gy = 2.0 * fy / (h - 1) - 1.0 if h > 1 else torch.zeros_like(fy)
    gx = 2.0 * fx / (w - 1) - 1.0 if w > 1 else torch.zeros_like(fx)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (S, S, 2) as (x, y)
    grid = grid.to(cell_map.dtype if cell_map.is_floating_point() else torch.float32)
    src = cell_map[:, None].to(grid.dtype)  # (B, 1, h, w)
    out = F.grid_sample(src, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[:, 0]  # (B, S, S)


def map_peaks(maps: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Return each map's peak pixel centre ``(B, 2)`` as ``(x, y)``, and whether the map is flat ``(B,)``.

    Ties (several pixels at the maximum, e.g. a bilinear peak between four pixels, or a flat map) are
    broken uniformly at random with ``generator``: a fixed rule (the first pixel) would credit or
    penalise an explainer for where the top-left corner happens to lie. A flat map (max == min) says
    nothing; its peak is then a uniformly random pixel, i.e. chance level.
    """
    b, h, w = maps.shape
    flat = maps.reshape(b, h * w).float()
    top = flat.amax(dim=1, keepdim=True)
    is_max = flat >= top  # (B, S²)
    noise = torch.rand(b, h * w, generator=generator, dtype=torch.float32).to(maps.device)
    idx = torch.where(is_max, noise, -1.0).argmax(dim=1)  # (B,)
    xy = torch.stack(((idx % w).float() + 0.5, (idx // w).float() + 0.5), dim=-1)
    return xy, top[:, 0] <= flat.amin(dim=1)


def pointing_game(peak_xy: Tensor, landmarks: Tensor, visible: Tensor, radius: float) -> dict[str, Tensor]:
    """Return the pointing-game outcome of each peak against the image's visible landmarks.

    Args:
        peak_xy: ``(N, 2)`` pixel ``(x, y)`` of each map's peak.
        landmarks: ``(N, K, 2)`` pixel ``(x, y)``.
        visible: ``(N, K)`` bool.
        radius: tolerance ``r`` in pixels (a hit is ``distance <= r``).

    Returns:
        ``{"hit": (N,) bool`` (within ``r`` of any visible landmark), ``"valid": (N,) bool`` (the image
        has a visible landmark: only those count), ``"hit_by_landmark": (N, K) bool`` (within ``r`` of
        landmark ``k``, False where invisible), ``"nearest": (N,) long`` (index of the nearest visible
        landmark, ``-1`` when none)``}``.
    """
    dist = (landmarks.double() - peak_xy.double()[:, None, :]).norm(dim=-1)  # (N, K)
    dist = dist.masked_fill(~visible.bool(), float("inf"))
    hit_k = dist <= radius
    valid = visible.bool().any(dim=1)
    if dist.shape[1] == 0:  # data with no landmarks (a plain image folder): no image counts
        nearest = torch.full_like(valid, -1, dtype=torch.long)
    else:
        nearest = torch.where(valid, dist.argmin(dim=1), -1)
    return {"hit": hit_k.any(dim=1), "valid": valid, "hit_by_landmark": hit_k, "nearest": nearest}


def peak_distance_spread(
    peak_xy: Tensor,
    landmarks: Tensor,
    visible: Tensor,
    classes: Tensor,
    *,
    image_diagonal: float,
) -> tuple[float, Tensor]:
    """Return the std of the normalised peak-to-landmark distance: the mean and the ``(K,)`` per landmark.

    The explainer of class ``c`` is treated as one filter of category ``c`` and measured by the location
    instability of METHOD.md section 6 with the "cls" rule: for each class and landmark, the sample
    standard deviation over that class's images where the landmark is visible of ``‖landmark − peak‖ /
    diagonal``; then the mean over landmarks and over classes. All images count (no top-k: an explainer
    has no activation to rank by). Pairs with fewer than two images are left out (NaN).

    Args:
        peak_xy: ``(N, 2)``; landmarks: ``(N, K, 2)``; visible: ``(N, K)``.
        classes: ``(N,)`` long, the class each map explains.
        image_diagonal: ``S·√2``.
    """
    n = peak_xy.shape[0]
    present = classes.long().unique()
    d = len(present)
    result = location_instability(
        torch.zeros(n, d, dtype=torch.float64),
        peak_xy.double()[:, None, :].expand(n, d, 2),
        landmarks,
        visible,
        image_diagonal=image_diagonal,
        top_k=max(n, 1),
        filter_category=present,
        labels=classes.long(),
    )
    return result.mean, torch.nanmean(result.per_filter_landmark, dim=0)


def pixel_ranks(maps: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Return each pixel's rank in its map, highest value first, ``(B, S·S)`` long; ties in random order."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1).float()
    n = flat.shape[1]
    # Lexicographic (value desc, random key): shuffle, then a stable sort keeps the shuffle among ties.
    perm = torch.rand(b, n, generator=generator).argsort(dim=1).to(maps.device)  # (B, S²) random permutations
    order_in_perm = torch.sort(flat.gather(1, perm), dim=1, descending=True, stable=True).indices
    order = perm.gather(1, order_in_perm)  # pixel indices, best first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=maps.device).expand(b, n))
    return ranks


def _average_ranks(flat: Tensor) -> Tensor:
    """Each value's rank in its row, ``(B, N)`` float64 from 1, tied values sharing their mean rank."""
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)  # values strictly smaller
    upto = torch.searchsorted(ordered, flat, right=True)  # values smaller or equal
    return (below + upto + 1).double() / 2


def map_rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation over pixels of each pair of maps ``a``, ``b`` ``(B, S, S)``: ``(B,)`` float64.

    Ties take their average rank (Spearman's usual rule, which a random tie-break would blur: many maps are
    flat over large areas). A map that is flat everywhere has no ranking: its pair gives NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps to correlate must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    ra = _average_ranks(a.reshape(n, -1).double())
    rb = _average_ranks(b.reshape(n, -1).double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(dim=1) / denominator.clamp(min=1e-300),
                       torch.full_like(denominator, float("nan")))


def blur(images: Tensor, sigma: float) -> Tensor:
    """Return ``images`` ``(B, C, S, S)`` blurred by a Gaussian of ``sigma`` pixels (RISE's insertion start)."""
    from torchvision.transforms.functional import gaussian_blur

    if sigma <= 0:
        return images.clone()
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)
    return gaussian_blur(images, [k, k], [sigma, sigma])


def perturbation_curves(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    *,
    steps: int,
    deletion_fill: Tensor | float = 0.0,
    insertion_start: Tensor | float = 0.0,
    chunk: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return the deletion and insertion curves, each ``(B, steps + 1)``: softmax probability of ``target``.

    Pixels are taken in the order of ``maps`` (highest first, ties random). At step ``j`` the top
    ``round(j·S²/steps)`` pixels (all channels) are replaced by ``deletion_fill`` (deletion: starts at the
    image, ends at the fill) or taken from the image into ``insertion_start`` (insertion: starts at the
    start image, ends at the image). A faithful map makes deletion fall fast (low AUC) and insertion
    rise fast (high AUC).

    Args:
        forward: ``(n, C, S, S) -> (n, num_classes)`` logits; called under ``torch.no_grad`` on at most
            ``chunk`` images at a time.
        images: ``(B, C, S, S)``; maps: ``(B, S, S)``; target: ``(B,)`` long.
        steps: ``k``, the number of deletion/insertion steps.
        deletion_fill, insertion_start: a scalar or a tensor broadcastable to ``images``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    b, c, h, w = images.shape
    ranks = pixel_ranks(maps, generator=generator).reshape(b, 1, h, w)
    counts = torch.tensor([round(j * h * w / steps) for j in range(steps + 1)], device=images.device)
    # (B, k+1, 1, H, W): pixel already taken at step j
    taken = ranks[:, None] < counts[None, :, None, None, None]
    fill = torch.as_tensor(deletion_fill, dtype=images.dtype, device=images.device).expand_as(images)
    start = torch.as_tensor(insertion_start, dtype=images.dtype, device=images.device).expand_as(images)
    curves = []
    for base, other in ((images, fill), (start, images)):
        x = torch.where(taken, other[:, None], base[:, None]).reshape(b * (steps + 1), c, h, w)
        tgt = target.repeat_interleave(steps + 1)
        probs = []
        with torch.no_grad():
            for s in range(0, x.shape[0], chunk):
                logits = forward(x[s:s + chunk])
                probs.append(logits.float().softmax(dim=1).gather(1, tgt[s:s + chunk, None])[:, 0])
        curves.append(torch.cat(probs).reshape(b, steps + 1))
    return curves[0], curves[1]


def curve_auc(curve: Tensor) -> Tensor:
    """Return the area under ``(B, k + 1)`` curves sampled at fractions ``0, 1/k, ..., 1``: trapezoids, ``(B,)``."""
    k = curve.shape[1] - 1
    if k < 1:
        raise ValueError("a curve needs at least two points")
    return (curve.sum(dim=1) - 0.5 * (curve[:, 0] + curve[:, -1])) / k


def conductance_exclusivity(class_sum: Tensor, class_count: Tensor, category: Tensor) -> dict[str, float]:
    """Return how exclusively each filter's conductance goes to one class, and whether that is its category.

    ``S[c, d] = class_sum[c, d] / class_count[c]`` is filter ``d``'s mean total conductance toward the
    logit of class ``c`` over the images explained as ``c``. A filter of one category supports that
    class only, so ``exclusivity_d = S⁺[ĉ_d, d] / Σ_c S⁺[c, d]`` (``S⁺ = max(S, 0)``; ``ĉ_d`` =
    ``category``) is near 1; the chance level with ``C`` classes seen is ``1/C``. Filters with no positive
    conductance are left out.

    Args:
        class_sum: ``(C, D)`` summed per-image conductance totals, by explained class.
        class_count: ``(C,)`` images explained as each class.
        category: ``(D,)`` long, each filter's category (the mask's ``category``).

    Returns:
        ``{"exclusivity"`` (mean over filters), ``"category_agreement"`` (fraction of filters whose
        strongest class is their category), ``"chance"`` (1 / classes seen), ``"filters"`` (counted)``}``.
    """
    seen = class_count > 0
    s = (class_sum.double() / class_count.clamp(min=1)[:, None].double())[seen]  # (C', D)
    category = category.long()
    classes = torch.nonzero(seen)[:, 0]
    # Position of each filter's category among the classes seen (-1: its category was never explained).
    pos = torch.full_like(category, -1)
    for i, c in enumerate(classes.tolist()):
        pos[category == c] = i
    pos_s = s.clamp(min=0)
    total = pos_s.sum(dim=0)  # (D,)
    counted = (total > 0) & (pos >= 0)
    own = pos_s.gather(0, pos.clamp(min=0)[None])[0]
    excl = own / total.clamp(min=1e-30)
    agree = s.argmax(dim=0) == pos
    n = int(counted.sum())
    return {
        "exclusivity": float(excl[counted].mean()) if n else float("nan"),
        "category_agreement": float(agree[counted].double().mean()) if n else float("nan"),
        "chance": 1.0 / max(int(seen.sum()), 1),
        "filters": n,
    }
