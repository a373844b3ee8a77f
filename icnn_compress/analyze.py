"""Per-filter analysis in one streaming pass: what each filter does, and which filters are dead weight.

The measures follow Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks" (CVPR 2018,
https://arxiv.org/abs/1710.00935); METHOD.md sections 3, 6 and 8 give the exact rules. Every measure is
accumulated as running sums (float64) in one dict of tensors per layer, so that memory does not grow
with the dataset (``O(D²)`` for the correlations) and so that the dicts of several processes can be
combined with :func:`merge_states` (sums add, log-sum-exps ``logaddexp``, top-k lists merge,
histograms are re-binned to the coarser scale and added); the ``N × D`` peaks are concatenated. The only per-image state is
``N × D`` peak values and peak positions (small scalars) for the location instability.

Definitions (``x`` is a filter's ``(h, w)`` map on one image, clamped at 0 like the post-ReLU maps the
method works on; the "peak" is ``max_ij x``):

* ``activation_rate``: fraction of images whose peak exceeds ``silent_threshold``; ``silent``: the rate
  is below ``silent_fraction``.
* ``category``: the given filter category (the mask's ``.category``), else the class with the largest
  mean peak. ``exclusivity``: the share of the peak activation mass on that category, class-balanced:
  ``m_c / Σ_c m_c`` with ``m_c`` the mean peak over images of class ``c`` (the raw mass share on
  balanced data; 1 = fires only on its category, ``1/C`` = indifferent).
* ``inter_category_entropy`` = H(T′|X) and ``mi_spatial_entropy`` = Σ_x p(T⁺,x)·H(T⁺|X=x), the two
  terms of METHOD.md section 3 with the paper's templates (τ = 0.5/n², β = 4, uniform prior over the
  n²+1 templates), in nats. ``Z_T`` is "estimated from many maps and updated gradually" as the paper
  says: each batch uses the running mean of ``exp(tr(x·T))`` over all images seen so far (this batch
  included), and ``p(x) ∝ Σ_T p(T)·exp(tr(x·T))/mean(exp(tr(x·T)))`` weights each image. In the paper's
  units (τ = 0.5/n²) maps of small magnitude make every template nearly equally likely, so these two
  terms sit close to their maxima for any filter on a small network; they are reported for fidelity.
* ``spatial_entropy`` (the headline spatial measure): the entropy of the map normalised to a
  distribution over cells, ``−Σ p log p`` with ``p = x / Σx``, divided by ``log(h·w)`` (0 = one cell,
  1 = uniform), averaged over images weighted by the peak (images where the filter is silent do not
  count). It is the spatial term with the posterior over positions taken proportional to the activation,
  which is scale-free.
* ``peak_correlation``: Pearson correlation over images of two filters' peaks. ``map_correlation``: the
  mean over images (where both maps are non-constant) of the Pearson correlation over cells of the two
  maps, i.e. the correlation of per-image standardised maps accumulated as sums. Two filters are
  redundant when ``min(peak_correlation, map_correlation) ≥ redundancy_threshold``: they fire on the same
  images at the same places. ``cluster``: the connected components of that graph; each cluster's
  ``best`` member has the highest ``exclusivity − spatial_entropy`` (most exclusive, best localised).
* ``mis``: the mutual information (nats) between the filter's spatially averaged activation and the
  one-vs-rest label of class ``c``, max over ``c`` (``mis_class``). Plug-in estimate on a streaming
  histogram of ``mis_bins`` equal-width bins over ``[0, hi]``, where ``hi`` doubles (merging bin pairs,
  exact) whenever a larger value arrives; its positive bias is about ``(bins − 1)/(2N)``.
* ``location_instability``: :func:`~icnn_compress.method.metrics.location_instability` per filter and landmark,
  "cls" rule (top images of the filter's category), from the per-image peak cells.
* ``part_interpretability`` (METHOD.md section 6): the region ``x > q`` with ``q`` the filter's top 0.5%
  quantile over all cells of all images, up-sampled to the image by nearest neighbour (exactly, on the map
  grid: part masks are area-pooled onto the cells); a filter counts on an image when the IoU with a part
  mask exceeds 0.2; ``P_f`` = max over parts of the fraction of images of the filter's category that
  contain the part on which it counts. ``q`` comes from a streaming doubling histogram of all cell values
  (``quantile_bins`` bins) and is the running estimate after the current batch: early batches use a
  quantile estimated on fewer images (shuffle the loader; :func:`analyze_run` does).
* ``estimate_stride`` (default 4): the map correlation, the spatial entropy, the two template terms and
  the part quantile's histogram are estimated on every 4th image of each batch (a fixed subsample of the
  data); every other measure (peaks, peak correlation, exclusivity, MIS, instability, the part IoU
  counts) uses every image. This keeps the pass near 0.85× of plain inference
  (``benchmarks/bench_analyze.py``).

On a GPU the whole pass stays on the device: the running statistics and the per-image peaks are summed
there, the end-of-pass reductions (correlations, cluster labels, MIS, location instability, part scores)
run there, and each layer's results come to the host in one copy; nothing waits for the device per batch
or per filter.

``analysis.json`` schema (written by :func:`analyze_run`, the dict :func:`analyze` returns minus the
tensors under ``"matrices"`` and ``"top"``)::

    {"summary": {"num_images", "classes", "landmark_names", "image_size", "settings": {...},
                 "run", "arm", "split", "accuracy" (when computed),
                 "layers": {layer: {"num_filters", "map_size", "geometry", "num_silent", "mean_activation_rate",
                     "mean_exclusivity", "mean_spatial_entropy", "mean_inter_category_entropy",
                     "mean_mi_spatial_entropy", "mean_mis", "location_instability",
                     "instability_per_landmark": {name: v}, "part_interpretability",
                     "part_threshold_quantile", "category_histogram": {class: n},
                     "part_interpretability_per_part": {part: v} (mean over live filters),
                     "landmark_tracking": {name: n}, "landmark_entropy", "landmark_coverage" (the histogram's
                     entropy / log K and the share of landmarks tracked by >= 10 % of the filters),
                     "clusters": [{"members": [i, ...], "best": i}]
                     (clusters of two or more), "num_redundant" (filters a pruner could drop: Σ (size − 1))}}},
     "filters": [{"layer", "filter", "category", "category_name", "activation_rate", "silent",
                  "mean_peak", "exclusivity", "inter_category_entropy", "mi_spatial_entropy",
                  "spatial_entropy", "mis", "mis_class", "cluster" (id, -1 = alone), "cluster_best" (bool),
                  "max_redundancy" (largest min-correlation with another filter), "redundant_with" (its
                  closest filter), "location_instability", "instability_per_landmark": {name: v},
                  "tracked_landmark", "part_interpretability", "best_part",
                  "top_images": [{"index", "value", "x", "y"}]}, ...]}

Undefined values (a silent filter's exclusivity, a measure without landmarks) are ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from icnn_compress.runtime.distributed import gather_objects, init_distributed, is_distributed, is_main, shard_indices
from icnn_compress.method.metrics import (
    category_histogram,
    landmark_diversity,
    landmark_histogram,
    location_instability,
    min_instability_classes,
)
from icnn_compress.method.parts import part_scores
from icnn_compress.method.protocol import (
    class_rule_for,
    drops_sparse,
    largest_mean_class,
    learned_classes,
    measure_points,
    read_map,
)
from icnn_compress.method.receptive_field import LayerGeometry, layer_geometry
from icnn_compress.runtime.threads import cpu_threads

__all__ = ["analyze", "analyze_run", "merge_states", "write_analysis", "write_gallery"]


_EPS = 1e-12
# Merge rule of each running statistic (see merge_states): these combine by logaddexp, the top-k and
# histogram keys have their own rule, everything else is a sum.
_LSE_KEYS = ("lse_T",)


# ------------------------------------------------------------------------------------------------
# Streaming histograms whose range doubles on demand


def _grow_histogram(hist: Tensor, hi: Tensor, need: Tensor) -> Tensor:
    """Re-bin ``hist`` ``(L, D, K)`` in place so that each filter's range ``[0, hi)`` covers ``need`` ``(D,)``.

    Returns the new ``hi``. A range that doubles ``s`` times moves bin ``i`` to ``i >> s`` (pairs merge),
    which is exact; the first non-zero value sets the initial range (all earlier values were 0 and sit in
    bin 0 at any range). On a GPU nothing here waits for the device: asking whether any range grows would
    stall the stream once per batch, so the re-binning runs every time (a no-op shift of 0 where nothing
    grows). On the CPU that question is free and skips the work.
    """
    k = hist.shape[-1]
    hi = torch.where((hi <= 0) & (need > 0), need * (1 + 1e-6), hi)
    grow = (need >= hi) & (hi > 0)
    if hist.device.type == "cpu" and not bool(grow.any()):
        return hi
    bits = int(math.log2(k))
    # In log space: need / hi can overflow for a subnormal first value.
    ratio = torch.where(grow, torch.log2(need) - torch.log2(hi), torch.zeros_like(hi)).clamp(max=bits + 1)
    steps = torch.where(grow, torch.ceil(ratio + 1e-9).clamp(min=1), torch.zeros_like(ratio)).long()
    target = torch.arange(k, device=hist.device) >> steps.clamp(max=bits)[:, None]  # (D, K)
    hist.copy_(torch.zeros_like(hist).scatter_add_(-1, target.expand_as(hist), hist))
    # More than log2(K) doublings put every old count in bin 0 at any larger range: restart the range.
    restart = steps > bits
    grown = hi * torch.pow(2.0, steps.to(hi.dtype))
    return torch.where(restart, need * (1 + 1e-6), grown)


def _count_into(hist: Tensor, index: Tensor) -> None:
    """Add one to ``hist.view(-1)[i]`` for each ``i`` in ``index`` (repeats add up), in place.

    ``bincount`` on the CPU; on a GPU ``index_add_`` of ones, because CUDA's ``bincount`` reads the
    largest index back to the host to size its output: a stall of the stream on every call.
    """
    flat = hist.view(-1)
    if hist.device.type == "cpu":
        flat += torch.bincount(index, minlength=flat.numel())
    else:
        flat.index_add_(0, index, torch.ones((), dtype=hist.dtype, device=hist.device).expand(index.numel()))


def _bin_index(values: Tensor, hi: Tensor, k: int) -> Tensor:
    """Bin of each value ``(..., D)`` for ranges ``hi`` ``(D,)`` with ``k`` bins."""
    return (values / hi.clamp(min=_EPS) * k).long().clamp_(0, k - 1)


def _top_quantile(hist: Tensor, hi: Tensor, q: float) -> Tensor:
    """Value above which a fraction ``q`` of each filter's histogram ``(D, K)`` lies, interpolated in-bin."""
    d, k = hist.shape
    total = hist.sum(-1)  # (D,)
    target = (q * total).clamp(min=1.0)
    above_incl = hist.flip(-1).cumsum(-1)  # (D, K): [j] = count in the top j + 1 bins
    # j: how many top bins it takes to reach the target; the threshold lies in bin b = K − 1 − j.
    j = (above_incl < target[:, None]).sum(-1).clamp(max=k - 1)  # (D,)
    above = torch.where(j > 0, above_incl.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(total))
    b = k - 1 - j
    inside = hist.gather(1, b[:, None])[:, 0]
    frac = ((target - above) / inside.clamp(min=1.0)).clamp(0, 1)
    return hi / k * (b.to(hi.dtype) + 1 - frac)


# ------------------------------------------------------------------------------------------------
# Templates of METHOD.md section 2 (paper form)


def _paper_templates(h: int, w: int, *, device: torch.device) -> Tensor:
    """Positive templates with τ, ``(h·w, h·w)``: row µ is t⁺(µ) flattened, τ = 0.5/n², β = 4, n = max(h, w)."""
    n = max(h, w)
    tau = 0.5 / n**2
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    dist = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()  # (µ, cell)
    return tau * torch.clamp(1.0 - 4.0 * dist / n, min=-1.0)


# ------------------------------------------------------------------------------------------------
# The running statistics of one layer


def _peaks(x: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x.max(dim=-1)`` of ``(B, D, P)`` maps: the peak and its first cell on ties, in vectorised passes.

    ``max`` with indices runs a scalar loop on the CPU; ``amax``, an equality written as floats and a
    weighted ``amax`` that picks the first equal cell cost a third of it (the analysis' largest pass).
    ``scratch``: a float tensor shaped like ``x`` to overwrite (saves a fresh allocation's page faults).
    """
    p = x.shape[-1]
    peak = x.amax(dim=-1)
    first = torch.eq(x, peak[..., None], out=torch.empty_like(x) if scratch is None else scratch)
    first.mul_(torch.arange(p, 0, -1, device=x.device, dtype=x.dtype))
    cell = (p - first.amax(dim=-1).long()).clamp_(max=p - 1)  # a NaN map equals nowhere: the last cell
    return peak, cell


def _new_state(d: int, c: int, k_parts: int, hw: int, *, top_k: int, quantile_bins: int, mis_bins: int,
               device: torch.device) -> dict[str, Tensor]:
    f64 = dict(dtype=torch.float64, device=device)
    return {
        "n": torch.zeros((), **f64),
        "class_count": torch.zeros(c, **f64),
        "active": torch.zeros(d, **f64),
        "class_peak_sum": torch.zeros(c, d, **f64),
        "peak_sum": torch.zeros(d, **f64),
        "peak_sq_sum": torch.zeros(d, **f64),
        "peak_cross": torch.zeros(d, d, **f64),
        "map_cross": torch.zeros(d, d, **f64),
        "map_pairs": torch.zeros(d, d, **f64),
        "spatial_entropy_sum": torch.zeros(d, **f64),  # Σ peak · H_norm over the estimate subsample
        "spatial_entropy_weight": torch.zeros(d, **f64),  # Σ peak over the same images
        "lse_T": torch.full((d, hw + 1), -math.inf, **f64),  # log Σ_x exp(tr(x·T))
        "lse_count": torch.zeros((), **f64),
        "w_sum": torch.zeros(d, **f64),
        "inter_entropy_sum": torch.zeros(d, **f64),
        "mi_spatial_sum": torch.zeros(d, **f64),
        "cell_hist": torch.zeros(1, d, quantile_bins, **f64),
        "cell_hi": torch.zeros(d, **f64),
        "mis_hist": torch.zeros(c, d, mis_bins, **f64),
        "mis_hi": torch.zeros(d, **f64),
        "part_hits": torch.zeros(c, d, k_parts, **f64),
        "part_present": torch.zeros(c, k_parts, **f64),
        "top_value": torch.full((d, top_k), -math.inf, **f64),
        "top_index": torch.full((d, top_k), -1, dtype=torch.long, device=device),
        "top_cell": torch.zeros(d, top_k, dtype=torch.long, device=device),
    }


class _LayerAnalyzer:
    """Folds one layer's ``(B, D, h, w)`` maps into its running statistics."""

    def __init__(self, *, num_classes: int, silent_threshold: float, top_k: int, quantile: float,
                 quantile_bins: int, mis_bins: int, iou_threshold: float, estimate_stride: int) -> None:
        self.c = num_classes
        self.estimate_stride = estimate_stride
        self.nonnegative = False  # set for modules whose output cannot be negative (masks, ReLU)
        self.silent_threshold = silent_threshold
        self.top_k = top_k
        self.quantile = quantile
        self.quantile_bins = quantile_bins
        self.mis_bins = mis_bins
        self.iou_threshold = iou_threshold
        self.state: dict[str, Tensor] | None = None
        self.templates: Tensor | None = None
        self.templates_f32: Tensor | None = None
        self.map_size: tuple[int, int] | None = None
        self.peaks: list[Tensor] = []  # (B, D) per batch, on the maps' device until the end of the pass
        self._scratch: Tensor | None = None  # reused (B, D, P) float buffer, see scratch()
        self.cells: list[Tensor] = []  # (B, D) flat peak cell per batch, on the same device

    @torch.no_grad()
    def update(self, out: Tensor, labels: Tensor, index: Tensor, part_masks: dict | None) -> None:
        b, d, h, w = out.shape
        hw = h * w
        dev = out.device
        if self.state is None:
            k_parts = 0 if part_masks is None else part_masks["area"].shape[1]
            self.state = _new_state(d, self.c, k_parts, hw, top_k=self.top_k, quantile_bins=self.quantile_bins,
                                    mis_bins=self.mis_bins, device=dev)
            self.templates = _paper_templates(h, w, device=dev)
            self.templates_f32 = self.templates.t().float().contiguous()  # (cell, µ)
            self.map_size = (h, w)
        st = self.state
        # Everything below is batched over (B, D, P) in float32 on the maps' device; only (D,)-, (C, D)- and
        # (D, D)-sized results are accumulated in float64. Kept to a few passes over the maps: the whole
        # analysis must cost little more than the forward pass (benchmarks/bench_analyze.py).
        x = out.detach().float()
        if not self.nonnegative:  # a conv's raw output: measure what the following ReLU passes
            x = x.clamp(min=0)
        x = x.reshape(b, d, hw)  # (B, D, P)
        peak, cell = _peaks(x, self.scratch(x))  # (B, D); first cell on ties
        # Kept where they are: the instability at the end of the pass reads them there (N × D, small).
        self.peaks.append(peak)
        self.cells.append(cell)
        peak64 = peak.double()
        onehot = F.one_hot(labels, self.c).double()  # (B, C)

        st["n"] += b
        st["class_count"] += onehot.sum(0)
        st["active"] += (peak > self.silent_threshold).sum(0)
        st["class_peak_sum"] += onehot.t() @ peak64
        st["peak_sum"] += peak64.sum(0)
        st["peak_sq_sum"] += (peak64**2).sum(0)
        # Raw products in float64: Pearson from raw sums cancels badly for a filter whose peak hardly
        # varies (float32 products put 0.99999 where two identical such filters have 1).
        st["peak_cross"] += peak64.t() @ peak64

        mass = x.sum(-1)  # (B, D)
        mean = mass / hw
        # The estimates below use every `estimate_stride`-th image of the batch (a fixed subsample):
        # the map correlation, the spatial entropy, the paper's template terms and the cell-value
        # histogram of the part quantile. Their (B, D, P)-sized passes would otherwise dominate the
        # hooks' cost.
        sub = slice(None, None, self.estimate_stride)
        xs, ms, ps = x[sub], mean[sub], peak[sub]
        # Spatial maps standardised per image: their cross products summed over images and cells give
        # Σ_images corr(map_i, map_j), counted only where both maps vary.
        var = (torch.linalg.vector_norm(xs, dim=-1) ** 2 - ms * ms * hw).clamp(min=0)  # Σ (x − mean)²
        varies = var > (1e-6 * ps) ** 2 * hw
        scale = torch.where(varies, var.clamp(min=1e-30).rsqrt(), torch.zeros_like(var))
        z = torch.addcmul((-ms * scale)[..., None], xs, scale[..., None])  # (b, D, P): unit norm per map, or 0
        st["map_cross"] += torch.einsum("bdp,bep->de", z, z)  # float32 into float64, no converted copy
        vf = varies.float()
        st["map_pairs"] += vf.t() @ vf

        # Entropy of p = x / Σx: log Σx − Σ x log x / Σx, normalised by log P.
        mss = mass[sub]
        xlogx = torch.special.xlogy(xs, xs).sum(-1)
        ent = torch.where(mss > 0, torch.log(mss.clamp(min=1e-30)) - xlogx / mss.clamp(min=1e-30),
                          torch.zeros_like(mss)) / max(math.log(hw), _EPS)
        st["spatial_entropy_sum"] += (ps * ent.clamp(0, 1)).sum(0)
        st["spatial_entropy_weight"] += ps.sum(0)

        self._mutual_information_terms(xs, mss)
        self._histograms(xs, ps, mean, labels)
        if part_masks is not None:
            self._parts(x, part_masks, onehot, h, w)

        # Streaming top-k of (peak, image index) per filter.
        vals = torch.cat((st["top_value"], peak64.t()), dim=1)  # (D, k + B)
        idx = torch.cat((st["top_index"], index[None, :].expand(d, b)), dim=1)
        cells = torch.cat((st["top_cell"], cell.t()), dim=1)
        top = vals.topk(min(self.top_k, vals.shape[1]), dim=1)
        st["top_value"] = top.values
        st["top_index"] = idx.gather(1, top.indices)
        st["top_cell"] = cells.gather(1, top.indices)

    def scratch(self, like: Tensor) -> Tensor:
        """A float buffer shaped like ``like``, reused across batches: a fresh map-sized tensor per batch
        costs its page faults every time (the CPU allocator returns large blocks to the system)."""
        n = like.numel()
        if self._scratch is None or self._scratch.numel() < n or self._scratch.device != like.device:
            self._scratch = torch.empty(n, dtype=like.dtype, device=like.device)
        return self._scratch[:n].view(like.shape)

    def _mutual_information_terms(self, x: Tensor, mass: Tensor) -> None:
        st = self.state
        b, d, hw = x.shape
        tau = 0.5 / max(self.map_size) ** 2
        s_pos = x @ self.templates_f32  # (B, D, P): tr(x·T_µ)
        s_neg = -tau * mass  # (B, D): tr(x·T⁻)
        # Running log Σ_x exp(tr(x·T)) over all images so far (max-shifted), T⁻ in the last column.
        m_pos = s_pos.amax(0)  # (D, P)
        lse_pos = m_pos + torch.log(torch.exp(s_pos - m_pos).sum(0))
        lse_neg = torch.logsumexp(s_neg, dim=0)
        st["lse_T"] = torch.logaddexp(st["lse_T"], torch.cat((lse_pos, lse_neg[:, None]), 1).double())
        st["lse_count"] += b
        log_mean = (st["lse_T"] - torch.log(st["lse_count"])).float()  # (D, P + 1): log E_x exp(tr(x·T))
        const = math.log(hw + 1)  # uniform prior over the n² + 1 templates
        logq = s_pos - (log_mean[:, :hw] + const)  # (B, D, P): log p(T_µ)·p(x|T_µ)·N
        top = logq.amax(-1)  # (B, D)
        e = torch.exp(logq - top[..., None])
        se = e.sum(-1)
        log_pos = top + torch.log(se)  # log p(T⁺, x)·N
        h_pos = log_pos - (e * logq).sum(-1) / se  # H(T⁺ | X = x) = log Σe^l − Σ q·l
        log_neg = s_neg - (log_mean[:, hw] + const)
        log_w = torch.logaddexp(log_pos, log_neg)  # log p(x)·N
        post_pos = torch.exp(log_pos - log_w)
        post_neg = torch.exp(log_neg - log_w)
        h_inter = -(torch.special.xlogy(post_pos, post_pos) + torch.special.xlogy(post_neg, post_neg))
        w = torch.exp(log_w).double()
        st["w_sum"] += w.sum(0)
        st["inter_entropy_sum"] += (w * h_inter.double()).sum(0)
        st["mi_spatial_sum"] += (w * (post_pos * h_pos).double()).sum(0)

    def _histograms(self, x: Tensor, peak: Tensor, mean_act: Tensor, labels: Tensor) -> None:
        st = self.state
        b, d, hw = x.shape
        ar = torch.arange(d, device=x.device)
        k = self.quantile_bins
        st["cell_hi"] = _grow_histogram(st["cell_hist"], st["cell_hi"], peak.amax(0).double())
        per_unit = (k / st["cell_hi"].clamp(min=_EPS)).float()  # (D,)
        bins = (x * per_unit[:, None]).long().clamp_(max=k - 1) + (ar * k)[:, None]  # (B, D, P), x ≥ 0
        _count_into(st["cell_hist"], bins.reshape(-1))

        km = self.mis_bins
        st["mis_hi"] = _grow_histogram(st["mis_hist"], st["mis_hi"], mean_act.amax(0).double())
        mb = _bin_index(mean_act.double(), st["mis_hi"], km)  # (B, D)
        flat = ((labels[:, None] * d + ar) * km + mb).reshape(-1)
        _count_into(st["mis_hist"], flat)

    def _parts(self, x: Tensor, parts: Mapping[str, Any], onehot: Tensor, h: int, w: int) -> None:
        st = self.state
        thr = _top_quantile(st["cell_hist"][0], st["cell_hi"], self.quantile).float()  # (D,)
        # Compared straight into a float tensor: a bool result and a conversion cost several times more.
        region = torch.gt(x, thr[None, :, None], out=self.scratch(x))  # (B, D, P)
        frac = parts["pooled"](h, w)  # (B, K, P): the part's share of each cell
        cell_area = parts["size"] / (h * w)
        inter = torch.bmm(region, frac.transpose(1, 2)) * cell_area  # (B, D, K)
        area_r = region.sum(-1) * cell_area  # (B, D)
        area_p = parts["area"]  # (B, K)
        union = area_r[:, :, None] + area_p[:, None, :] - inter
        present = area_p > 0
        hit = (inter / union.clamp(min=_EPS) > self.iou_threshold) & present[:, None, :]  # (B, D, K)
        st["part_hits"] += torch.einsum("bc,bdk->cdk", onehot, hit.double())
        st["part_present"] += onehot.t() @ present.double()


def _part_context(part_masks: Tensor | None, device: torch.device) -> dict[str, Any] | None:
    """Per batch, the part masks' areas and (lazily, once per grid size) their share of each map cell."""
    if part_masks is None or part_masks.shape[1] == 0:
        return None
    masks = part_masks.to(device, non_blocking=True).float()  # converted once: the (B, K, S, S) copy costs
    cache: dict[tuple[int, int], Tensor] = {}

    def pooled(h: int, w: int) -> Tensor:
        if (h, w) not in cache:
            cache[(h, w)] = F.adaptive_avg_pool2d(masks, (h, w)).flatten(2)  # (B, K, P)
        return cache[(h, w)]

    return {"pooled": pooled, "size": masks.shape[-2] * masks.shape[-1], "area": masks.sum((2, 3))}


def _rebin(hist: Tensor, hi_from: Tensor, hi_to: Tensor) -> Tensor:
    """Move the counts of ``hist`` ``(L, D, K)`` from ranges ``hi_from`` to ``hi_to`` ``(D,)`` by bin centre."""
    k = hist.shape[-1]
    ar = torch.arange(k, dtype=hi_from.dtype, device=hi_from.device)
    centre = (ar + 0.5)[None, :] * hi_from[:, None] / k  # (D, K)
    target = _bin_index(centre, hi_to[:, None].expand_as(centre), k)  # (D, K)
    out = torch.zeros_like(hist)
    out.scatter_add_(-1, target[None].expand_as(hist), hist)
    return out


def merge_states(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return the running statistics of two disjoint parts of a dataset, combined (for all-reduce)."""
    out = dict(a)
    for key in a:
        if key in ("top_index", "top_cell", "cell_hi", "mis_hi", "cell_hist", "mis_hist"):
            continue
        if key in _LSE_KEYS:
            out[key] = torch.logaddexp(a[key], b[key])
        elif key == "top_value":
            vals = torch.cat((a["top_value"], b["top_value"]), 1)
            top = vals.topk(a["top_value"].shape[1], dim=1)
            out["top_value"] = top.values
            out["top_index"] = torch.cat((a["top_index"], b["top_index"]), 1).gather(1, top.indices)
            out["top_cell"] = torch.cat((a["top_cell"], b["top_cell"]), 1).gather(1, top.indices)
        else:
            out[key] = a[key] + b[key]
    for hist, hi in (("cell_hist", "cell_hi"), ("mis_hist", "mis_hi")):
        # Both sides grow to the larger range; bins align exactly when both started from the same scale
        # (a power-of-two ratio), otherwise b's counts move to the bin of their centre (approximate).
        top = torch.maximum(a[hi], b[hi])
        ha, hb = a[hist].clone(), b[hist].clone()
        hia = _grow_histogram(ha, a[hi].clone(), top)
        hib = _grow_histogram(hb, b[hi].clone(), hia)
        out[hist], out[hi] = ha + _rebin(hb, hib, hia), hia
    return out


# ------------------------------------------------------------------------------------------------
# The pass


def analyze(
    model: nn.Module,
    loader: Iterable[dict],
    *,
    layers: Sequence[str] | None = None,
    filter_category: Mapping[str, Tensor] | None = None,
    classes: Sequence[str],
    landmark_names: Sequence[str] = (),
    image_size: int,
    device: str | torch.device = "cpu",
    silent_threshold: float = 1e-6,
    silent_fraction: float = 0.01,
    redundancy_threshold: float = 0.8,
    top_k: int = 8,
    instability_top_k: int = 100,
    part_quantile: float = 0.005,
    iou_threshold: float = 0.2,
    quantile_bins: int = 256,
    mis_bins: int = 32,
    estimate_stride: int = 4,
    stats_threads: int | None = 1,
    amp: bool = False,
    protocol: str = "official",
    architecture: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Return the per-filter analysis of ``layers`` over one pass of ``loader`` (see the module docstring).

    Args:
        model: the classifier; forward hooks read the analysed modules' ``(B, D, h, w)`` outputs.
        loader: yields dict batches with ``image``, ``label``, ``index`` (dataset indices, for the
            gallery), and optionally ``landmarks``/``visible`` (instability) and ``part_masks``.
        layers: module names; default: every ``InterpretableMask`` of the model (a baseline's masks pass
            the raw maps through, so ICNN and baseline are measured at the same place).
        filter_category: per layer ``(D,)`` long categories (the masks' ``.category``); missing layers
            use the class with the largest mean peak (the released code's rule), or under the ``paper``
            protocol the class with the smallest instability.
        classes: class names indexed by label. landmark_names: names indexed like ``landmarks``.
        image_size: ``S`` of the square inputs (geometry and the instability's diagonal ``S·√2``).
        device: where the forward pass and the statistics live.
        silent_threshold, silent_fraction: a filter is silent when its peak exceeds ``silent_threshold``
            on fewer than ``silent_fraction`` of the images.
        redundancy_threshold: edge of the redundancy graph on ``min(peak, map correlation)``.
        top_k: images kept per filter for the gallery. instability_top_k: the paper's 100.
        part_quantile, iou_threshold: METHOD.md section 6 (0.5%, 0.2).
        quantile_bins, mis_bins: resolution of the streaming histograms.
        estimate_stride: every ``estimate_stride``-th image of each batch enters the map correlation,
            the spatial entropy, the two template terms (H(T′|X), the spatial term) and the part
            quantile's histogram; 1: every image. Every other measure uses every image. A filter that
            fires only outside the subsample gets no spatial entropy (None).
        stats_threads: CPU threads for the hooks' statistics on CPU maps (``None``: the current
            setting). The ops are many and small, and their parallel regions cost more than they save:
            on the shared 2-core box one thread took the pass from 0.54× to 0.80× of plain inference
            with 2 threads under load, and from 0.81× to 0.86× on a quiet machine. The final reduction
            (larger ops: the instability of N × D peaks) keeps the current setting.
        amp: on CUDA, run the forward pass under bf16 autocast, as training and validation do
            (``train.amp``); the statistics stay float32/float64 (autocast is off inside the hooks).
        protocol, architecture: where each mask layer's maps are read (:mod:`icnn_compress.method.protocol`;
            ``official``: before the mask, the new conv's raw output) and the run's architecture record
            that names the new conv. Results stay keyed by the layer names.
        progress: show a tqdm bar.

    Returns:
        ``{"summary", "filters"}`` as in the schema, plus ``"matrices"`` (per layer ``peak_correlation``,
        ``map_correlation`` ``(D, D)`` float64 CPU tensors, ``order`` (filters ordered by cluster)) and
        ``"state"`` (the running statistics, for :func:`merge_states`, on the device they were summed on;
        on the CPU under torchrun).
    """
    from icnn_compress.method.mask import InterpretableMask

    device = torch.device(device)
    modules = dict(model.named_modules())
    if layers is None:
        layers = [name for name, m in modules.items() if isinstance(m, InterpretableMask)]
        if not layers:
            raise ValueError("the model has no InterpretableMask; pass layers=[...] with conv module names")
    layers = list(layers)
    for name in layers:
        if name not in modules:
            raise ValueError(f"model has no module named {name!r}; pass names from model.named_modules()")
    filter_category = dict(filter_category or {})
    points = measure_points(model, layers, protocol, architecture=architecture)
    geometry = {name: layer_geometry(model, p.module, image_size=image_size) for name, p in points.items()}
    analyzers = {
        name: _LayerAnalyzer(num_classes=len(classes), silent_threshold=silent_threshold, top_k=top_k,
                             quantile=part_quantile, quantile_bins=quantile_bins, mis_bins=mis_bins,
                             iou_threshold=iou_threshold, estimate_stride=estimate_stride)
        for name in layers
    }
    current: dict[str, Any] = {}

    def hook_for(name: str):
        point = points[name]

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            x = read_map(point, module, inputs, output)
            with torch.autocast(x.device.type, enabled=False), \
                    cpu_threads(stats_threads if x.device.type == "cpu" else None):
                analyzers[name].update(x, current["labels"], current["index"], current["part_masks"])
        return hook

    for name, point in points.items():
        # A mask's input and output are post-ReLU maps; the new conv's raw output is not, nor is the input of a
        # mask that rectifies its map (a GELU or BatchNorm output): both are measured as the mask sees them.
        module = modules[point.module]
        analyzers[name].nonnegative = isinstance(module, (InterpretableMask, nn.ReLU)) and not (
            point.where == "input" and getattr(module, "rectify", False))
    handles = [modules[points[name].module].register_forward_hook(hook_for(name)) for name in layers]
    was_training = model.training
    model.to(device).eval()
    labels_all, landmarks_all, visible_all = [], [], []
    # Nothing in the loop waits for a GPU (no .item(), no blocking copy back): the host queues the next
    # batch while the device still works on this one. The count stays on the device until the end.
    correct_t = torch.zeros((), dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="analyze", disable=not progress, leave=False):
                label_cpu = torch.as_tensor(batch["label"]).long()
                labels = label_cpu.to(device, non_blocking=True)
                current["labels"] = labels
                current["index"] = torch.as_tensor(batch["index"]).long().to(device, non_blocking=True)
                current["part_masks"] = _part_context(batch.get("part_masks"), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                    logits = model(batch["image"].to(device, non_blocking=True))
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                correct_t += (logits.argmax(1) == labels).sum()
                labels_all.append(label_cpu)
                if "landmarks" in batch:
                    landmarks_all.append(torch.as_tensor(batch["landmarks"]).float())
                    visible_all.append(torch.as_tensor(batch["visible"]).bool())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # The statistics stay where they were summed: _finish_layer reduces them there and copies each layer's
    # results to the host once.
    correct = int(correct_t)
    home = device
    if is_distributed():
        correct = _gather_ranks(analyzers, labels_all, landmarks_all, visible_all, correct)
        home = torch.device("cpu")  # the merged states and peaks came through the host
    if not labels_all:
        raise ValueError("the loader yielded no batch; check the dataset split")
    # Each once to the statistics' device, not once per layer.
    label = torch.cat(labels_all).to(home)
    lm = torch.cat(landmarks_all).to(home) if landmarks_all else None
    vis = torch.cat(visible_all).to(home) if visible_all else None

    settings = dict(silent_threshold=silent_threshold, silent_fraction=silent_fraction,
                    redundancy_threshold=redundancy_threshold, top_k=top_k, instability_top_k=instability_top_k,
                    part_quantile=part_quantile, iou_threshold=iou_threshold, quantile_bins=quantile_bins,
                    mis_bins=mis_bins, estimate_stride=estimate_stride, protocol=protocol,
                    measured_at={name: p.describe() for name, p in points.items()})
    summary: dict[str, Any] = {
        "num_images": int(label.numel()), "accuracy": 100.0 * correct / label.numel(),
        "classes": list(classes), "landmark_names": list(landmark_names), "image_size": image_size,
        "settings": settings, "layers": {},
    }
    filters: list[dict[str, Any]] = []
    matrices: dict[str, dict[str, Any]] = {}
    states: dict[str, dict[str, Tensor]] = {}
    for name in layers:
        an = analyzers[name]
        if an.state is None:
            raise ValueError(f"layer {name!r} is never called by the model's forward pass")
        cat = filter_category.get(name)
        layer_summary, layer_filters, mats = _finish_layer(
            name, an, geometry[name], category=None if cat is None else torch.as_tensor(cat).long().to(home),
            label=label, landmarks=lm, visible=vis, classes=classes, landmark_names=landmark_names,
            image_size=image_size, settings=settings)
        summary["layers"][name] = layer_summary
        filters += layer_filters
        matrices[name] = mats
        states[name] = an.state
    return {"summary": summary, "filters": filters, "matrices": matrices, "state": states}


def _gather_ranks(analyzers: Mapping[str, _LayerAnalyzer], labels_all: list, landmarks_all: list,
                  visible_all: list, correct: int) -> int:
    """Under torchrun: combine every rank's running statistics and per-image peaks, in place; return ``correct``.

    Each rank analysed its own shard (:func:`analyze_run`). The states fold with :func:`merge_states` in
    rank order and the per-image lists concatenate in rank order, so every rank ends with the statistics
    of the whole split. One ``all_gather_object`` (host side; the states are ``O(D²)``, not ``O(N)``, apart
    from the ``N × D`` peaks the instability needs anyway). The merged statistics and peaks stay on the CPU
    (analyze reduces them there).
    """
    mine = {
        "states": {n: None if an.state is None else {k: v.cpu() for k, v in an.state.items()}
                   for n, an in analyzers.items()},
        "peaks": {n: [p.cpu() for p in an.peaks] for n, an in analyzers.items()},
        "cells": {n: [c.cpu() for c in an.cells] for n, an in analyzers.items()},
        "map_size": {n: an.map_size for n, an in analyzers.items()},
        "labels": labels_all, "landmarks": landmarks_all, "visible": visible_all, "correct": correct,
    }
    ranks = gather_objects(mine)
    for name, an in analyzers.items():
        merged = None
        for r in ranks:
            st = r["states"][name]
            if st is not None:
                merged = st if merged is None else merge_states(merged, st)
        if merged is not None:
            an.state = merged
            # A rank that saw no batch takes the map size from one that did.
            an.map_size = an.map_size or next(tuple(r["map_size"][name]) for r in ranks if r["map_size"][name])
        an.peaks = [p for r in ranks for p in r["peaks"][name]]
        an.cells = [c for r in ranks for c in r["cells"][name]]
    for target, key in ((labels_all, "labels"), (landmarks_all, "landmarks"), (visible_all, "visible")):
        target[:] = [t for r in ranks for t in r[key]]
    return sum(r["correct"] for r in ranks)


def _finish_layer(name: str, an: _LayerAnalyzer, geometry: LayerGeometry, *, category: Tensor | None,
                  label: Tensor, landmarks: Tensor | None, visible: Tensor | None, classes: Sequence[str],
                  landmark_names: Sequence[str], image_size: int, settings: dict) -> tuple[dict, list, dict]:
    """Return one layer's summary, per-filter records and matrices (``analysis.json``'s schema).

    Every reduction (correlations, cluster labels, MIS, location instability, part scores) runs on the device
    the statistics live on (the pass's GPU; the CPU under torchrun), and nothing there waits for it; the
    per-filter columns and the two ``(D, D)`` matrices come back to the host in one copy
    (:func:`_to_host`), where the records, the cluster lists and the layer means are built from them.
    ``category``, ``label``, ``landmarks`` and ``visible`` are on the statistics' device.
    """
    st = an.state
    dev = st["n"].device
    n = st["n"]
    d = st["active"].shape[0]
    h, w = an.map_size
    nan = float("nan")

    rate = st["active"] / n
    silent = rate < settings["silent_fraction"]
    class_mean = st["class_peak_sum"] / st["class_count"].clamp(min=1)[:, None]  # (C, D)
    class_mean = torch.where(st["class_count"][:, None] > 0, class_mean, torch.zeros_like(class_mean))
    drop = drops_sparse(settings["protocol"])
    peak_xy = peaks = None
    if landmarks is not None and len(landmark_names):
        cell = torch.cat(an.cells)  # (N, D)
        peak_xy = geometry.cell_centres(torch.stack((cell // w, cell % w), dim=-1).double())  # (N, D, 2)
        peaks = torch.cat(an.peaks).double()  # (N, D)
    if category is None and settings["protocol"] == "paper" and peak_xy is not None:
        category = min_instability_classes(peaks, peak_xy, landmarks, visible, label,
                                           num_classes=len(classes), image_diagonal=image_size * math.sqrt(2.0),
                                           top_k=settings["instability_top_k"])
    if category is None:
        category = largest_mean_class(st["class_peak_sum"], st["class_count"])
    if category.shape != (d,):
        raise ValueError(f"filter_category[{name!r}] has shape {tuple(category.shape)}, expected ({d},)")
    total = class_mean.sum(0)
    own = class_mean.gather(0, category.clamp(min=0)[None])[0]
    exclusivity = torch.where((total > 0) & (category >= 0), own / total.clamp(min=_EPS), torch.full_like(total, nan))
    weight = st["spatial_entropy_weight"]
    spatial = torch.where(weight > 0, st["spatial_entropy_sum"] / weight.clamp(min=_EPS), torch.full_like(total, nan))
    inter = st["inter_entropy_sum"] / st["w_sum"].clamp(min=_EPS)
    mi_spatial = st["mi_spatial_sum"] / st["w_sum"].clamp(min=_EPS)

    peak_corr = _pearson(st["peak_sum"], st["peak_sq_sum"], st["peak_cross"], n)
    map_corr = torch.where(st["map_pairs"] > 0, st["map_cross"] / st["map_pairs"].clamp(min=1), torch.full_like(peak_corr, nan))
    map_corr.fill_diagonal_(1.0)
    redundancy = torch.minimum(peak_corr, map_corr).nan_to_num(nan=-1.0)
    redundancy.fill_diagonal_(-1.0)
    redundancy.masked_fill_(silent[:, None] | silent[None, :], -1.0)  # no boolean indexing: no device sync
    component = _components(redundancy >= settings["redundancy_threshold"])
    closest_value, closest = redundancy.max(dim=1)

    mis, mis_class = _mis(st["mis_hist"], st["class_count"])

    inst_f = torch.full((d,), nan, dtype=torch.float64, device=dev)
    inst_fk = torch.full((d, len(landmark_names)), nan, dtype=torch.float64, device=dev)
    tracked = torch.full((d,), -1, dtype=torch.long, device=dev)
    if peak_xy is not None:
        measured = location_instability(peaks, peak_xy, landmarks, visible,
                                        image_diagonal=image_size * math.sqrt(2.0),
                                        top_k=settings["instability_top_k"], filter_category=category, labels=label,
                                        drop_sparse=drop)
        inst_f, inst_fk, tracked = measured.per_filter, measured.per_filter_landmark, measured.tracked_landmark

    k_parts = st["part_hits"].shape[-1]
    part_score = torch.full((d,), nan, dtype=torch.float64, device=dev)
    best_part = torch.full((d,), -1, dtype=torch.long, device=dev)
    threshold = _top_quantile(st["cell_hist"][0], st["cell_hi"], settings["part_quantile"])
    per_part = None
    if k_parts:
        cat_idx = category.clamp(min=0)
        hits, present = st["part_hits"][cat_idx, torch.arange(d, device=dev)], st["part_present"][cat_idx]  # (D, K)
        scored = part_scores(hits, present)
        part_score, best_part = scored.per_filter, scored.best_part
        # The live filters, as the mean below: a silent filter's row is NaN, which nanmean leaves out.
        per_part = torch.nanmean(scored.per_filter_part.masked_fill(silent[:, None], nan), dim=0)  # (K,)

    top_xy = geometry.cell_centres(torch.stack((st["top_cell"] // w, st["top_cell"] % w), -1).double())
    columns = dict(
        category=category, rate=rate, silent=silent, mean_peak=st["peak_sum"] / n, exclusivity=exclusivity,
        inter=inter, mi_spatial=mi_spatial, spatial=spatial, mis=mis, mis_class=mis_class,
        closest_value=closest_value, closest=closest, inst_f=inst_f, inst_fk=inst_fk, tracked=tracked,
        part_score=part_score, best_part=best_part, component=component, top_index=st["top_index"],
        top_value=st["top_value"], top_xy=top_xy, threshold=threshold, peak_corr=peak_corr, map_corr=map_corr,
    )
    if per_part is not None:
        columns["per_part"] = per_part
    host = _to_host(columns)

    # On the host from here: Python lists once, not a tensor index per filter and field.
    score = host["exclusivity"].nan_to_num(0.0) - host["spatial"].nan_to_num(1.0)
    cluster_id, clusters = _clusters(host["component"], score)
    best = {c["best"] for c in clusters}
    order = [i for c in clusters for i in c["members"]]
    order += [i for i in range(d) if cluster_id[i] < 0]
    names = list(landmark_names)
    cols = {k: host[k].tolist() for k in (
        "category", "rate", "silent", "mean_peak", "exclusivity", "inter", "mi_spatial", "spatial", "mis",
        "mis_class", "closest_value", "closest", "inst_f", "inst_fk", "tracked", "part_score", "best_part",
        "top_index", "top_value", "top_xy")}
    records = []
    for f in range(d):
        tops = [{"index": i, "value": v, "x": xy[0], "y": xy[1]}
                for i, v, xy in zip(cols["top_index"][f], cols["top_value"][f], cols["top_xy"][f]) if i >= 0]
        c = cols["category"][f]
        tracked_f, best_part_f = cols["tracked"][f], cols["best_part"][f]
        records.append({
            "layer": name, "filter": f, "category": c, "category_name": classes[c] if 0 <= c < len(classes) else None,
            "activation_rate": cols["rate"][f], "silent": cols["silent"][f],
            "mean_peak": cols["mean_peak"][f],
            "exclusivity": _finite(cols["exclusivity"][f]), "inter_category_entropy": _finite(cols["inter"][f]),
            "mi_spatial_entropy": _finite(cols["mi_spatial"][f]), "spatial_entropy": _finite(cols["spatial"][f]),
            "mis": _finite(cols["mis"][f]), "mis_class": cols["mis_class"][f],
            "cluster": cluster_id[f], "cluster_best": f in best,
            "max_redundancy": _finite(cols["closest_value"][f]) if d > 1 else None,
            "redundant_with": cols["closest"][f] if d > 1 else None,
            "location_instability": _finite(cols["inst_f"][f]),
            "instability_per_landmark": {names[k]: _finite(v) for k, v in enumerate(cols["inst_fk"][f])},
            "tracked_landmark": names[tracked_f] if tracked_f >= 0 else None,
            "part_interpretability": _finite(cols["part_score"][f]),
            "best_part": names[best_part_f] if 0 <= best_part_f < len(names) else None,
            "top_images": tops,
        })

    alive = ~host["silent"]
    summary = {
        "num_filters": d, "map_size": [h, w],
        "geometry": {"offset": list(geometry.offset), "stride": list(geometry.stride),
                     "receptive_field": list(geometry.size) if geometry.size else None},
        "num_silent": int(host["silent"].sum()),
        "mean_activation_rate": _finite(host["rate"].mean()),
        "mean_exclusivity": _nanmean(host["exclusivity"][alive]),
        "mean_spatial_entropy": _nanmean(host["spatial"][alive]),
        "mean_inter_category_entropy": _nanmean(host["inter"][alive]),
        "mean_mi_spatial_entropy": _nanmean(host["mi_spatial"][alive]),
        "mean_mis": _nanmean(host["mis"][alive]),
        "location_instability": _finite(torch.nanmean(host["inst_f"])) if peak_xy is not None and d else None,
        "instability_per_landmark": {names[k]: _nanmean(host["inst_fk"][:, k]) for k in range(len(names))},
        "part_interpretability": _nanmean(host["part_score"][alive]) if k_parts else None,
        "part_threshold_quantile": settings["part_quantile"],
        "category_histogram": category_histogram(host["category"], classes),
        "part_interpretability_per_part": ({names[j] if j < len(names) else str(j): _finite(v)
                                            for j, v in enumerate(host["per_part"].tolist())} if k_parts else None),
        "landmark_tracking": landmark_histogram(host["tracked"], names) if names else {},
        **_spread(host["tracked"], names),
        "clusters": [c for c in clusters if len(c["members"]) > 1],
        "num_redundant": sum(len(c["members"]) - 1 for c in clusters),
    }
    mats = {"peak_correlation": host["peak_corr"], "map_correlation": host["map_corr"],
            "order": torch.tensor(order, dtype=torch.long), "part_threshold": host["threshold"]}
    return summary, records, mats


def _to_host(columns: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``columns`` as CPU tensors of their own dtypes and shapes, moved to the host in one copy.

    On a GPU every ``.cpu()`` or ``.tolist()`` waits for the device and is a transfer of its own: the columns
    travel as one float64 buffer instead (booleans and integers below 2⁵³, the image indices included, make
    the round trip exactly), and each comes back as a tensor of its own (a matrix saved alone is not the
    whole buffer).
    """
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in columns.values()]).cpu()
    out, start = {}, 0
    for key, t in columns.items():
        out[key] = flat[start:start + t.numel()].view(t.shape).to(t.dtype, copy=True)
        start += t.numel()
    return out


def _spread(tracked: Tensor, names: Sequence[str]) -> dict[str, float | None]:
    """The tracked-landmark histogram's normalised entropy and 10 % coverage (metrics.landmark_diversity)."""
    if not names:
        return {"landmark_entropy": None, "landmark_coverage": None}
    spread = landmark_diversity(tracked, len(names))
    return {"landmark_entropy": _finite(spread.entropy), "landmark_coverage": _finite(spread.coverage)}


def _pearson(s: Tensor, sq: Tensor, cross: Tensor, n: Tensor) -> Tensor:
    """Pearson correlation ``(D, D)`` from Σx, Σx², Σxxᵀ over ``n`` samples; NaN for a constant filter."""
    mean = s / n
    cov = cross / n - mean[:, None] * mean[None, :]
    var = (sq / n - mean**2).clamp(min=0)
    std = var.sqrt()
    denom = std[:, None] * std[None, :]
    ok = denom > 1e-12 * (mean.abs()[:, None] * mean.abs()[None, :]).clamp(min=1e-30) + 1e-30
    return torch.where(ok, (cov / denom.clamp(min=1e-300)).clamp(-1, 1), torch.full_like(cov, float("nan")))


def _components(adjacent: Tensor) -> Tensor:
    """Connected-component label ``(D,)`` of each node of ``adjacent`` ``(D, D)``: its component's smallest index.

    Label propagation with pointer jumping on the dense matrix, on its device: a few ``(D, D)`` passes where a
    Python union-find over the edges took 0.3 s on MobileNetV2's 1280 drifted filters (about 60 000 edges).
    The only reads back from a GPU are the convergence tests, one bool per pass.
    """
    d = adjacent.shape[0]
    adj = adjacent | adjacent.t()
    label = torch.arange(d, device=adj.device)
    while True:
        new = torch.minimum(label, torch.where(adj, label[None, :], d).amin(1)) if d else label
        new = new[new]  # every label is a node of the same component: jump to its label
        if torch.equal(new, label):
            return label
        label = new


def _clusters(component: Tensor, score: Tensor) -> tuple[list[int], list[dict]]:
    """Each filter's cluster id (-1: alone) and the clusters of two or more, with their best member by ``score``.

    On the host, from :func:`_components`' labels and the scores ``(D,)`` as CPU tensors.
    """
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(component.tolist()):
        groups.setdefault(root, []).append(i)
    scores = score.tolist()
    cluster_id = [-1] * len(scores)
    clusters = []
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        if len(members) < 2:
            continue
        best = max(members, key=lambda i: (scores[i], -i))
        for i in members:
            cluster_id[i] = len(clusters)
        clusters.append({"members": members, "best": best})
    return cluster_id, clusters


def _mis(hist: Tensor, class_count: Tensor) -> tuple[Tensor, Tensor]:
    """Plug-in MI (nats) of the binned mean activation with each one-vs-rest label; max over classes.

    All classes at once, (C, D, K) (a loop over classes was host time at the end of the pass).
    """
    n = hist.sum(dim=(0, 2))[0].clamp(min=1) if hist.numel() else torch.ones(())
    total = hist.sum(0)  # (D, K)
    pb = total / n
    py1 = (class_count / n)[:, None, None]  # (C, 1, 1)
    mi_t = torch.zeros(hist.shape[:2], dtype=pb.dtype, device=hist.device)  # (C, D)
    for joint, py in ((hist / n, py1), ((total - hist) / n, 1 - py1)):
        ratio = joint / (pb * py).clamp(min=1e-300)
        mi_t = mi_t + torch.where(joint > 0, joint * torch.log(ratio.clamp(min=1e-300)), torch.zeros_like(joint)).sum(-1)
    value, cls = mi_t.max(0)
    return value, cls


def _finite(v: float | Tensor) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _nanmean(t: Tensor) -> float | None:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else None


# ------------------------------------------------------------------------------------------------
# Outputs

_CSV_FIELDS = ["layer", "filter", "category", "category_name", "activation_rate", "silent", "mean_peak",
               "exclusivity", "inter_category_entropy", "mi_spatial_entropy", "spatial_entropy", "mis",
               "mis_class", "cluster", "cluster_best", "max_redundancy", "redundant_with", "location_instability",
               "tracked_landmark", "part_interpretability", "best_part"]


def write_analysis(result: Mapping[str, Any], out: str | Path) -> Path:
    """Write ``analysis.json``, ``filters.csv`` and ``matrices.pt`` (correlations, cluster order) into ``out``."""
    from icnn_compress.runtime.files import atomic_save, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"summary": result["summary"], "filters": result["filters"]}
    atomic_write_text(out / "analysis.json", json.dumps(doc, indent=1, allow_nan=False))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in result["filters"]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _CSV_FIELDS})
    atomic_write_text(out / "filters.csv", buf.getvalue())
    atomic_save({"matrices": result["matrices"]}, out / "matrices.pt")
    return out / "analysis.json"


def write_gallery(result: Mapping[str, Any], dataset: Any, out: str | Path, *, thumb: int = 48) -> dict[str, Path]:
    """Write ``gallery/<layer>.jpg``: one row per filter of its top images, cropped to the peak's field, peak marked.

    The second pass reads only the top images (``dataset[index]``), un-normalised with the dataset's
    ``mean``/``std`` when it has them. Returns the written file per layer.
    """
    from PIL import Image, ImageDraw

    out = Path(out) / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
    cache: dict[int, Image.Image] = {}

    def image(i: int) -> Image.Image:
        if i not in cache:
            x = dataset[i]["image"].float() * std + mean  # (3, S, S) in [0, 1]
            arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            cache[i] = Image.fromarray(arr)
        return cache[i]

    written = {}
    k = result["summary"]["settings"]["top_k"]
    label_w = 40
    for name, layer in result["summary"]["layers"].items():
        rows = [f for f in result["filters"] if f["layer"] == name]
        rf = layer["geometry"].get("receptive_field") or [result["summary"]["image_size"]] * 2
        half = max(4, int(max(rf)) // 2)
        sheet = Image.new("RGB", (label_w + k * (thumb + 2), len(rows) * (thumb + 2)), "white")
        draw_sheet = ImageDraw.Draw(sheet)
        for r, f in enumerate(rows):
            y0 = r * (thumb + 2)
            draw_sheet.text((2, y0 + thumb // 2 - 5), str(f["filter"]), fill="black")
            for j, top in enumerate(f["top_images"][:k]):
                img = image(top["index"])
                cx, cy = top["x"], top["y"]
                box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
                crop = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (128, 128, 128))
                crop.paste(img, (-box[0], -box[1]))
                crop = crop.resize((thumb, thumb), Image.BILINEAR)
                dr = ImageDraw.Draw(crop)
                px = (cx - box[0]) * thumb / (box[2] - box[0])
                py = (cy - box[1]) * thumb / (box[3] - box[1])
                dr.ellipse((px - 3, py - 3, px + 3, py + 3), outline=(255, 0, 0), width=2)
                sheet.paste(crop, (label_w + j * (thumb + 2), y0))
        # JPEG: a sheet of photo crops is 10x smaller than as PNG, and the report embeds it.
        path = out / f"{_safe(name)}.jpg"
        sheet.save(path, quality=85)
        written[name] = path
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "model"


def analyze_run(
    run: str | Path | Any,
    *,
    out: str | Path,
    data_root: str | Path | None = None,
    split: str = "test",
    layers: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    gallery: bool = True,
    protocol: str | None = None,
    progress: bool = False,
    trust_code: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Analyse a run directory's ``model.pt`` on a split of its dataset; write the outputs into ``out``.

    ``run`` may also be a :class:`~icnn_compress.runs.plain.PlainCheckpoint`, a model no icnn run made:
    its top conv (or ``layers``) is analysed on its data.

    ``protocol`` (None: the recipe's ``eval.protocol``) says where each mask layer is read and which class
    each filter is measured for, as in ``icnn evaluate``. ``trust_code``: see
    :func:`~icnn_compress.runs.open.load_run_model`.

    Writes ``analysis.json``, ``filters.csv``, ``matrices.pt`` and (``gallery``) ``gallery/<layer>.jpg``.
    Plots and ``report.html`` are the report stage's (:func:`icnn_compress.report.render_analysis`).
    The loader is shuffled with ``seed`` so that the streaming estimates (``Z_T``, the part quantile)
    see every class from the first batches. ``options`` go to :func:`analyze`.
    """
    from torch.utils.data import DataLoader

    from icnn_compress.runs.open import default_layers, open_run, say_what_needs_landmarks
    from icnn_compress.runs.folder import check_output
    from icnn_compress.runtime.device import resolve_device

    check_output(out, folder=True)
    dev = init_distributed(resolve_device(str(device)))  # under torchrun: join the group, cuda:LOCAL_RANK
    model, saved, recipe, dataset = open_run(run, data_root=data_root, split=split, device=dev, progress=progress,
                                             trust_code=trust_code)
    if is_main():
        say_what_needs_landmarks(dataset, "icnn analyze")
    layers = list(layers) if layers else default_layers(saved["architecture"], run)
    protocol = protocol or recipe.eval.protocol
    categories = learned_classes(model, layers) if class_rule_for(protocol) == "learned" else {}
    if is_distributed():
        # Each rank takes every world-th image of the same seeded order (no padding: each image once);
        # analyze() merges the ranks' statistics at the end.
        from torch.utils.data import Subset

        loader = DataLoader(Subset(dataset, shard_indices(len(dataset), shuffle=True, seed=seed)),
                            batch_size=batch_size or recipe.train.eval_batch_size, shuffle=False,
                            num_workers=recipe.data.num_workers, pin_memory=dev.type == "cuda")
    else:
        loader = DataLoader(dataset, batch_size=batch_size or recipe.train.eval_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed), num_workers=recipe.data.num_workers,
                            pin_memory=dev.type == "cuda")
    options.setdefault("amp", recipe.train.amp)
    result = analyze(model, loader, layers=layers, filter_category=categories, classes=dataset.classes,
                     landmark_names=dataset.landmark_names, image_size=dataset.image_size, device=dev,
                     protocol=protocol, architecture=saved["architecture"], progress=progress and is_main(),
                     **options)
    result["summary"].update(run=str(run), arm=saved.get("arm"), split=split)
    if is_main():  # every rank holds the same result; one writes it
        write_analysis(result, out)
        if gallery:
            write_gallery(result, dataset, out)
    return result
