"""The analysis pass over a loader (:func:`analyze`) and the ``icnn analyze`` stage on a run (:func:`analyze_run`)."""

from __future__ import annotations
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.method.protocol import class_rule_for, learned_classes, measure_points, read_map
from icnn_compress.method.receptive_field import layer_geometry
from icnn_compress.runs.folder import check_output
from icnn_compress.runs.open import default_layers, open_run, say_what_needs_landmarks
from icnn_compress.runtime.device import eval_mode, resolve_device
from icnn_compress.runtime.distributed import gather_objects, init_distributed, is_distributed, is_main, shard_indices
from icnn_compress.runtime.threads import cpu_threads

from ._outputs import write_analysis, write_gallery
from ._statistics import _LayerAnalyzer, _part_context, merge_states
from ._summaries import _finish_layer

__all__ = ["analyze", "analyze_run"]


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
    model.to(device)
    labels_all, landmarks_all, visible_all = [], [], []
    # Nothing in the loop waits for a GPU (no .item(), no blocking copy back): the host queues the next
    # batch while the device still works on this one. The count stays on the device until the end.
    correct_t = torch.zeros((), dtype=torch.long, device=device)
    try:
        with eval_mode(model), torch.inference_mode():
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
        "num_images": int(label.numel()), "accuracy": correct / label.numel(),
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
