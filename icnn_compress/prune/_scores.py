"""The per-filter analysis records the ``icnn`` criterion reads, and their ranking into pruning scores."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icnn_compress.errors import PruningError

__all__ = [
    "FilterScores", "analysis_settings", "flag_counts", "icnn_layer_scores", "load_filter_scores",
]


@dataclass(frozen=True)
class FilterScores:
    """What the analysis (``analyze.py``, ``analysis.json`` → ``filters``) says about one filter.

    Args:
        layer: the mask module's name (``features.14.mask``): the analysis measures that mask's maps.
        index: the filter's channel index in that layer, in the analysed model's numbering.
        silent: the filter's activation rate is below the analysis' silent fraction.
        cluster: redundancy cluster id, ``-1`` when the filter has no near-copy.
        is_cluster_best: the cluster member the analysis keeps (most exclusive, best localised).
        exclusivity: share of the peak activation on the filter's category (``None`` when silent).
        instability: the filter's location instability (``None`` without landmarks).
        spatial_entropy: normalised entropy of the map (0 = one cell), ``None`` when silent.
        activation_rate: fraction of images on which the filter fires.
    """

    layer: str
    index: int
    silent: bool
    cluster: int = -1
    is_cluster_best: bool = False
    exclusivity: float | None = None
    instability: float | None = None
    spatial_entropy: float | None = None
    activation_rate: float | None = None


def _record(row: Mapping[str, Any], where: str) -> FilterScores:
    try:
        return FilterScores(
            layer=str(row["layer"]),
            index=int(row["filter"] if "filter" in row else row["index"]),
            silent=bool(row["silent"]),
            cluster=int(row.get("cluster", -1) if row.get("cluster") is not None else -1),
            is_cluster_best=bool(row.get("cluster_best", row.get("is_cluster_best", False))),
            exclusivity=row.get("exclusivity"),
            instability=row.get("location_instability", row.get("instability")),
            spatial_entropy=row.get("spatial_entropy"),
            activation_rate=row.get("activation_rate"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PruningError(f"{where}: a filter record lacks {exc}; expected analyze.py's analysis.json "
                           "('filters': [{'layer', 'filter', 'silent', 'cluster', 'cluster_best', ...}])") from None


def load_filter_scores(analysis: str | Path | Mapping[str, Any]) -> dict[str, list[FilterScores]]:
    """Return ``{layer: [FilterScores, ...] in filter order}`` from an ``analysis.json`` (or its folder, or its dict).

    Reads the schema of :func:`icnn_compress.analyze.write_analysis`: a ``filters`` list of records keyed
    by ``layer`` and ``filter``.
    """
    where = "analysis"
    if not isinstance(analysis, Mapping):
        path = Path(analysis)
        path = path / "analysis.json" if path.is_dir() else path
        where = str(path)
        if not path.is_file():
            raise PruningError(f"{path} does not exist: run the analysis first (icnn analyze RUN --out DIR) "
                               "and pass its analysis.json, or choose --criterion l1")
        analysis = json.loads(path.read_text(encoding="utf-8"))
    rows = analysis.get("filters")
    if not isinstance(rows, list) or not rows:
        raise PruningError(f"{where} has no 'filters' list: is it an analysis.json written by icnn analyze?")
    layers: dict[str, list[FilterScores]] = {}
    for row in rows:
        rec = _record(row, where)
        layers.setdefault(rec.layer, []).append(rec)
    for name, recs in layers.items():
        recs.sort(key=lambda r: r.index)
        if [r.index for r in recs] != list(range(len(recs))):
            raise PruningError(f"{where}: layer {name!r} does not list filters 0..{len(recs) - 1} exactly once")
    return layers


def _read(analysis: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(analysis, Mapping):
        return analysis
    path = Path(analysis)
    path = path / "analysis.json" if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))


def analysis_settings(analysis: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The thresholds an ``analysis.json`` flagged filters with: ``silent_threshold``, ``silent_fraction``,
    ``redundancy_threshold`` (``None`` where the file does not state one), and the ``split`` it was run on."""
    summary = _read(analysis).get("summary") or {}
    settings = summary.get("settings") or {}
    out = {k: settings.get(k) for k in ("silent_threshold", "silent_fraction", "redundancy_threshold")}
    return out | {"split": summary.get("split")}


def flag_counts(scores: Mapping[str, Iterable[FilterScores]]) -> dict[str, dict[str, int]]:
    """Per analysed layer: ``num_filters``, ``silent`` and ``redundant`` (cluster members other than the best,
    not silent), the filters ``target_macs = "auto"`` removes (``flagged`` = silent + redundant)."""
    out = {}
    for layer, recs in scores.items():
        recs = list(recs)
        silent = sum(r.silent for r in recs)
        redundant = sum(not r.silent and r.cluster >= 0 and not r.is_cluster_best for r in recs)
        out[layer] = {"num_filters": len(recs), "silent": silent, "redundant": redundant, "flagged": silent + redundant}
    return out


def _num(v: float | None, default: float) -> float:
    return default if v is None or not math.isfinite(float(v)) else float(v)


def icnn_layer_scores(records: Iterable[FilterScores]) -> Tensor:
    """Importance of each filter of one analysed layer, ``(D,)`` float: low is pruned first.

    The ranking is lexicographic, in tiers that the score's integer part encodes:

    * ``[0, 1)`` silent filters, the rarest-firing first;
    * ``[1, 2)`` redundant filters (cluster members other than the cluster's best), the worst quality
      ``exclusivity − spatial_entropy`` first (the analysis picks each cluster's best by the same rule);
    * ``[2, 3)`` the rest (singletons and cluster bests), the least exclusive first, ties broken by the
      worse localisation (higher spatial entropy, then higher location instability).

    Within a tier the fractional part is ``(rank + 1) / (n + 1)``, so scores of one layer are comparable
    with each other and with another analysed layer's (the per-group maximum, see ICNNImportance).
    """
    recs = list(records)
    d = len(recs)
    score = torch.zeros(d, dtype=torch.float64)
    tiers: dict[int, list[tuple[tuple[float, ...], int]]] = {0: [], 1: [], 2: []}
    for r in recs:
        excl = _num(r.exclusivity, 0.0)
        ent = _num(r.spatial_entropy, 1.0)
        inst = _num(r.instability, math.inf)
        if r.silent:
            tiers[0].append(((_num(r.activation_rate, 0.0),), r.index))
        elif r.cluster >= 0 and not r.is_cluster_best:
            tiers[1].append(((excl - ent, -inst), r.index))
        else:
            tiers[2].append(((excl, -ent, -inst), r.index))
    for tier, members in tiers.items():
        members.sort()  # ascending key, then index: deterministic
        n = len(members)
        for rank, (_, i) in enumerate(members):
            score[i] = tier + (rank + 1) / (n + 1)
    return score
