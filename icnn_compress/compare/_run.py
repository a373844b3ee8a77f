"""``icnn compare``: open the runs, choose the images, compare every model, write ``compare.json`` and the figure."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from icnn_compress.errors import CompareError
from icnn_compress.runs.folder import check_output
from icnn_compress.runs.open import open_run
from icnn_compress.runs.results import CompareResult
from icnn_compress.runtime.device import resolve_device
from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.runtime.loader import make_loader

from ._compare import DEFAULT_METHODS, Comparison, compare, explanation_drift
from ._settings import CompareSettings

__all__ = ["compare_run"]

log = logging.getLogger(__name__)


def _spread_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spread over ``range(n)`` (datasets are often sorted by class)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise CompareError(f"limit must be at least 1, got {limit}")
    return sorted({int(i) for i in torch.linspace(0, n - 1, limit).round().long().tolist()})


def _figure_indices(indices: Sequence[int], labels: Tensor, count: int) -> list[int]:
    """Up to ``count`` of ``indices``, dealt round-robin over the classes present (first images first)."""
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: count - len(chosen)]
        depth += 1
    return chosen


def compare_run(
    run: str | Path,
    *,
    out: str | Path,
    data_root: str | Path | None = None,
    split: str = "test",
    methods: Sequence[str] = DEFAULT_METHODS,
    limit: int | None = 100,
    baseline_run: str | Path | None = None,
    parent_run: str | Path | None = None,
    layer: str | None = None,
    protocol: str | None = None,
    settings: CompareSettings | None = None,
    device: str | torch.device = "auto",
    figure_images: int = 6,
    progress: bool = False,
    trust_code: bool = False,
) -> CompareResult:
    """Compare the explainers on a run's model (and on ``baseline_run``'s); write ``out/compare.{json,md,png}``.

    Both models see the same ``limit`` images, spread evenly over the split (``None``: all), with the
    same settings and seed, so the table reads row against row: the ICNN's own maps against Grad-CAM
    (and the rest) on the ICNN and on the baseline model.

    Args:
        run: a run directory (or its ``model.pt``), usually ``RUN/icnn``.
        out: folder for ``compare.json`` (the returned dict), ``compare.md`` (the table) and
            ``compare.jpg`` (images × explainers, landmarks drawn).
        data_root: dataset folder, read whole before ``limit`` (default: the run recipe's ``data.root``, with
            its limits).
        split: ``"train"``, ``"test"`` or ``"all"``.
        methods: explainer names (:data:`~icnn_compress.compare.EXPLAINERS`).
        limit: images compared.
        baseline_run: the non-interpretable run (``RUN/baseline``) explained the same way.
        parent_run: for a pruned ``run``, the unpruned run it was pruned from (``pruning.json``'s
            ``history.source``): explained the same way (as model ``parent``), and ``result["drift"]`` says
            how far each explainer's maps moved (:func:`explanation_drift`).
        layer: measured module; default: the model's first mask (the top conv's).
        protocol: where the ``icnn`` maps are read and which class each filter explains (None: the run
            recipe's ``eval.protocol``).
        settings: :class:`CompareSettings`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        figure_images: rows of the figure.
        trust_code: for both runs, see :func:`~icnn_compress.runs.open.load_run_model`.

    Returns:
        ``{"models": {name: summary}, "methods", "split", "limit", "layer", "settings", "landmarks",
        "classes", "figure", "table"}`` with one summary (see :func:`compare`) per model, keyed by the
        run's arm (``icnn``, ``baseline``...; ``parent`` for ``parent_run``), and ``"drift"`` with a parent.
    """
    from ._present import format_compare_table, plot_grid

    check_output(out, folder=True)
    settings = settings or CompareSettings()
    dev = resolve_device(str(device))
    out = Path(out)
    runs = [("model", run)] + ([("baseline", baseline_run)] if baseline_run is not None else [])
    runs += [("parent", parent_run)] if parent_run is not None else []
    model_key = None
    comparisons: dict[str, Comparison] = {}
    meta: dict[str, Any] = {}
    for role, path in runs:
        model, saved, recipe, dataset = open_run(path, data_root=data_root, split=split, device=dev,
                                                 trust_code=trust_code)
        masks = saved["architecture"].get("masks") or []
        name_layer = layer or (masks[0] if masks else None)
        if name_layer is None:
            raise CompareError(f"{path}: the model has no mask layer; pass the layer to measure (--layer)")
        indices = _spread_indices(len(dataset), limit)
        if not meta:
            meta = {"indices": indices, "figure": _figure_indices(indices, dataset.labels, figure_images),
                    "dataset": dataset, "layer": name_layer}
        elif len(dataset) != len(meta["dataset"]):
            raise CompareError(f"{path} opens a {split} split of {len(dataset)} images but {run} one of "
                             f"{len(meta['dataset'])}; compare models trained on the same data")
        loader = make_loader(torch.utils.data.Subset(dataset, meta["indices"]), batch_size=settings.batch_size,
                             shuffle=False, seed=0, workers=recipe.data.num_workers, device=dev)
        key = "parent" if role == "parent" else saved.get("arm") or role
        if key in comparisons:
            key = role if role not in comparisons else f"{role}-{len(comparisons)}"
        log.info("compare: %s (%s) on %d images, layer %s", key, path, len(meta["indices"]), name_layer)
        comparisons[key] = compare(
            model, loader, layer=name_layer, image_size=dataset.image_size,
            landmark_names=dataset.landmark_names, classes=dataset.classes, methods=methods,
            settings=settings, device=dev, mean=dataset.mean, std=dataset.std, keep=meta["figure"],
            protocol=protocol or recipe.eval.protocol, architecture=saved["architecture"],
            keep_maps=parent_run is not None and role in ("model", "parent"), progress=progress)
        comparisons[key].summary.update(run=str(path), arm=saved.get("arm"))
        model_key = model_key or key

    dataset = meta["dataset"]
    result: dict[str, Any] = {
        "models": {k: c.summary for k, c in comparisons.items()},
        "methods": list(methods),
        "split": split,
        "limit": limit,
        "num_images": len(meta["indices"]),
        "layer": meta["layer"],
        "protocol": protocol or recipe.eval.protocol,
        "settings": asdict(settings),
        "landmarks": list(dataset.landmark_names),
        "classes": list(dataset.classes),
        "figure": "compare.jpg",
    }
    if parent_run is not None:
        result["drift"] = explanation_drift(comparisons["parent"], comparisons[model_key])
        result["drift_of"] = model_key
    result["table"] = format_compare_table(result)
    out.mkdir(parents=True, exist_ok=True)
    plot_grid({k: c.examples for k, c in comparisons.items()}, out / "compare.jpg",
              landmark_names=dataset.landmark_names, classes=dataset.classes, mean=dataset.mean,
              std=dataset.std, methods=[m for m in methods])
    atomic_write_text(out / "compare.md", result["table"] + "\n")
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    return result
