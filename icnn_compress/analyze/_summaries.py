"""From a layer's running sums to its per-filter measures and layer summary (clusters, MIS, instability)."""

from __future__ import annotations
import math
from collections.abc import Mapping, Sequence
import torch
from torch import Tensor
from icnn_compress.method.metrics import (
    category_histogram,
    landmark_diversity,
    landmark_histogram,
    location_instability,
    min_instability_classes,
)
from icnn_compress.method.parts import part_scores
from icnn_compress.method.protocol import drops_sparse, largest_mean_class
from icnn_compress.method.receptive_field import LayerGeometry

from icnn_compress.runtime.jsonable import finite_or_none

from ._statistics import _EPS, _LayerAnalyzer, _top_quantile

__all__: list[str] = []


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
        part_score=part_score, best_part=best_part, redundancy=redundancy, top_index=st["top_index"],
        top_value=st["top_value"], top_xy=top_xy, threshold=threshold, peak_corr=peak_corr, map_corr=map_corr,
    )
    if per_part is not None:
        columns["per_part"] = per_part
    host = _to_host(columns)

    # On the host from here: Python lists once, not a tensor index per filter and field.
    score = host["exclusivity"].nan_to_num(0.0) - host["spatial"].nan_to_num(1.0)
    cluster_id, clusters = _leader_clusters(host["redundancy"], score, settings["redundancy_threshold"])
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
            "exclusivity": finite_or_none(cols["exclusivity"][f]),
            "inter_category_entropy": finite_or_none(cols["inter"][f]),
            "mi_spatial_entropy": finite_or_none(cols["mi_spatial"][f]),
            "spatial_entropy": finite_or_none(cols["spatial"][f]),
            "mis": finite_or_none(cols["mis"][f]), "mis_class": cols["mis_class"][f],
            "cluster": cluster_id[f], "cluster_best": f in best,
            "max_redundancy": finite_or_none(cols["closest_value"][f]) if d > 1 else None,
            "redundant_with": cols["closest"][f] if d > 1 else None,
            "location_instability": finite_or_none(cols["inst_f"][f]),
            "instability_per_landmark": {names[k]: finite_or_none(v) for k, v in enumerate(cols["inst_fk"][f])},
            "tracked_landmark": names[tracked_f] if tracked_f >= 0 else None,
            "part_interpretability": finite_or_none(cols["part_score"][f]),
            "best_part": names[best_part_f] if 0 <= best_part_f < len(names) else None,
            "top_images": tops,
        })

    alive = ~host["silent"]
    summary = {
        "num_filters": d, "map_size": [h, w],
        "geometry": geometry.to_json(),
        "num_silent": int(host["silent"].sum()),
        "mean_activation_rate": finite_or_none(host["rate"].mean()),
        "mean_exclusivity": _nanmean(host["exclusivity"][alive]),
        "mean_spatial_entropy": _nanmean(host["spatial"][alive]),
        "mean_inter_category_entropy": _nanmean(host["inter"][alive]),
        "mean_mi_spatial_entropy": _nanmean(host["mi_spatial"][alive]),
        "mean_mis": _nanmean(host["mis"][alive]),
        "location_instability": finite_or_none(torch.nanmean(host["inst_f"])) if peak_xy is not None and d else None,
        "instability_per_landmark": {names[k]: _nanmean(host["inst_fk"][:, k]) for k in range(len(names))},
        "part_interpretability": _nanmean(host["part_score"][alive]) if k_parts else None,
        "part_threshold_quantile": settings["part_quantile"],
        "category_histogram": category_histogram(host["category"], classes),
        "part_interpretability_per_part": ({names[j] if j < len(names) else str(j): finite_or_none(v)
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
    return {"landmark_entropy": finite_or_none(spread.entropy), "landmark_coverage": finite_or_none(spread.coverage)}


def _pearson(s: Tensor, sq: Tensor, cross: Tensor, n: Tensor) -> Tensor:
    """Pearson correlation ``(D, D)`` from Σx, Σx², Σxxᵀ over ``n`` samples; NaN for a constant filter."""
    mean = s / n
    cov = cross / n - mean[:, None] * mean[None, :]
    var = (sq / n - mean**2).clamp(min=0)
    std = var.sqrt()
    denom = std[:, None] * std[None, :]
    ok = denom > 1e-12 * (mean.abs()[:, None] * mean.abs()[None, :]).clamp(min=1e-30) + 1e-30
    return torch.where(ok, (cov / denom.clamp(min=1e-300)).clamp(-1, 1), torch.full_like(cov, float("nan")))


def _leader_clusters(redundancy: Tensor, score: Tensor, threshold: float) -> tuple[list[int], list[dict]]:
    """Each filter's cluster id (-1: alone) and the clusters of two or more, each with its ``best`` member.

    Leader clustering, best ``score`` first: a filter whose ``redundancy`` with a leader already taken is at
    least ``threshold`` joins the leader it is most redundant with; otherwise it leads a cluster of its own.
    So every member other than the best is a near-copy of the best itself, and pruning them (what
    ``target_macs = "auto"`` removes) leaves a copy of each. The connected components of the
    ``redundancy ≥ threshold`` graph would chain (a ~ b ~ c with a and c unlike): on drifted ICNN layers they
    grew into clusters of most of the layer whose members did not resemble their best.

    On the host: ``redundancy`` ``(D, D)`` (diagonal and silent filters at -1) and ``score`` ``(D,)``.
    """
    scores = score.tolist()
    d = len(scores)
    order = sorted(range(d), key=lambda i: (-scores[i], i))
    leaders: list[int] = []
    members: dict[int, list[int]] = {}
    not_leader = torch.ones(d, dtype=torch.bool)
    for i in order:
        value, k = redundancy[i].masked_fill(not_leader, -math.inf).max(0) if leaders else (-math.inf, -1)
        if float(value) >= threshold:
            members[int(k)].append(i)
            continue
        leaders.append(i)
        members[i] = [i]
        not_leader[i] = False
    cluster_id = [-1] * d
    clusters = []
    for best in sorted((b for b in leaders if len(members[b]) > 1), key=lambda b: (-len(members[b]), min(members[b]))):
        group = sorted(members[best])
        for i in group:
            cluster_id[i] = len(clusters)
        clusters.append({"members": group, "best": best})
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


def _nanmean(t: Tensor) -> float | None:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else None
