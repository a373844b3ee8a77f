"""The streaming per-filter statistics: one dict of running sums per layer, updated batch by batch,
and merged across processes (:func:`merge_states`)."""

from __future__ import annotations
import math
from collections.abc import Mapping
from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["merge_states"]


_EPS = 1e-12


# Merge rule of each running statistic (see merge_states): these combine by logaddexp, the top-k and
# histogram keys have their own rule, everything else is a sum.
_LSE_KEYS = ("lse_T",)


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


def _paper_templates(h: int, w: int, *, device: torch.device) -> Tensor:
    """Positive templates with τ, ``(h·w, h·w)``: row µ is t⁺(µ) flattened, τ = 0.5/n², β = 4, n = max(h, w)."""
    n = max(h, w)
    tau = 0.5 / n**2
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    dist = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()  # (µ, cell)
    return tau * torch.clamp(1.0 - 4.0 * dist / n, min=-1.0)


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
