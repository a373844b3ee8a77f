"""One evaluation pass: accuracy, and per layer the location instability with its two references, the
spread of the filters over the landmarks and, on data with part masks, the part interpretability.

The measures are those of Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks" (CVPR 2018,
https://arxiv.org/abs/1710.00935), section 4.2; METHOD.md sections 6 and 8 give the exact rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from icnn_compress.method.metrics import (
    accuracy,
    category_histogram,
    landmark_diversity,
    landmark_histogram,
    location_instability,
    min_instability_classes,
    oracle_reference,
    random_peak_reference,
)
from icnn_compress.method.parts import part_hits, part_interpretability, top_quantile_threshold
from icnn_compress.method.protocol import drops_sparse, fixed_classes, measure_points, read_map, released_classes
from icnn_compress.method.receptive_field import layer_geometry
from icnn_compress.runtime.device import eval_mode
from icnn_compress.runtime.jsonable import finite_or_none

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    *,
    layers: Sequence[str],
    filter_category: Mapping[str, Tensor] | None = None,
    classes: Sequence[str],
    landmark_names: Sequence[str],
    image_size: int,
    protocol: str = "official",
    class_rule: str | None = None,
    architecture: Mapping[str, Any] | None = None,
    single_category: int | None = None,
    device: str | torch.device = "cpu",
    top_k: int = 100,
    parts: bool = True,
    part_quantile: float = 0.005,
    iou_threshold: float = 0.2,
    coverage_fraction: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """Return accuracy and, for each layer in ``layers``, the location instability, as a JSON-ready dict.

    One pass over ``loader`` in eval mode under ``torch.inference_mode``. Forward hooks read each layer's
    map where ``protocol`` says (:mod:`icnn_compress.method.protocol`: a mask's input, the new conv's raw output,
    or the mask's output) and keep, per image and filter, only the peak value (max over cells) and the
    centre of the peak cell (argmax, first on ties) in pixels, via
    :func:`~icnn_compress.method.receptive_field.layer_geometry` of the module read: memory is ``N × D`` per
    layer, never the maps. The model is moved to ``device``; its train/eval mode is restored afterwards.

    Args:
        model: the classifier; its forward returns ``(B, C)`` logits.
        loader: yields dict batches with ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)``, ``landmarks``
            ``(B, K, 2)`` pixel ``(x, y)`` and ``visible`` ``(B, K)``.
        layers: module names (``model.named_modules()``), masks or plain ``(B, D, n, n)`` layers; the
            first one gives the top-level ``"location_instability"``.
        filter_category: per layer, ``(D,)`` long category of each filter (``-1``: none), used as given
            (every layer must have one). Otherwise ``class_rule`` decides.
        classes: class names, indexed by label.
        landmark_names: landmark names, indexed like ``landmarks``.
        image_size: ``S``; the distance normaliser is the diagonal ``S·√2``.
        protocol: one of :data:`~icnn_compress.method.protocol.PROTOCOLS`; ``official`` also drops a filter with
            a landmark seen on fewer than 2 of its images (the count is ``dropped_filters``).
        class_rule: ``"released"`` (largest mean peak), ``"paper"`` (smallest instability) or ``None``
            (no class: every image counts), when ``filter_category`` is not given.
        architecture: the run's architecture record, which names the new conv (see
            :func:`~icnn_compress.method.protocol.measure_points`).
        single_category: the object's label in a single-category task: every filter is the object's and
            is measured on the object's images.
        device: where the forward pass runs.
        top_k: images per (filter, landmark), 100 in the paper.
        parts: when batches carry ``part_masks`` ``(B, K, S, S)`` (mask k of landmark k), also measure the
            part interpretability (METHOD.md section 6) on the same maps, clamped at 0. Its threshold is a
            quantile over all images, so these maps are kept (float16, ``N × D × h × w`` per layer).
        part_quantile, iou_threshold: METHOD.md section 6 (0.5 %, 0.2).
        coverage_fraction: a landmark is covered when at least this share of the filters tracks it.
        progress: show a tqdm bar.

    Returns:
        ``{"accuracy", "location_instability", "num_images", "protocol", "landmarks", "layers": {name:
        {"location_instability", "random_reference", "oracle_reference", "num_filters", "dropped_filters",
        "measured_at", "class_rule", "landmark_tracking", "landmark_entropy", "landmark_coverage",
        "coverage_fraction", "category_histogram" and "filter_category" (with classes), "part_interpretability"
        and "part_interpretability_per_part" ({part: v}) (data with part masks), "per_filter", "geometry"}}}``. Undefined values (NaN: e.g. no visible landmark) are ``None`` so
        that the dict is strict JSON.
    """
    if not layers:
        raise ValueError("layers is empty; pass the names of the conv layers to measure")
    if filter_category is not None:
        missing = [name for name in layers if name not in filter_category]
        if missing:
            raise ValueError(f"filter_category has no entry for layers {missing}; "
                             "pass categories for every measured layer or none")
    if class_rule not in (None, "released", "paper"):
        raise ValueError(f"class_rule must be 'released', 'paper' or None, got {class_rule!r}")
    device = torch.device(device)
    modules = dict(model.named_modules())
    points = measure_points(model, layers, protocol, architecture=architecture)
    # Measured before the collecting hooks exist (the probe clones the model without hooks anyway).
    geometry = {name: layer_geometry(model, p.module, image_size=image_size) for name, p in points.items()}

    peaks: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    stored: dict[str, list[Tensor]] = {name: [] for name in layers}  # (B, D, P) maps, for the part IoU
    fractions: dict[str, list[Tensor]] = {name: [] for name in layers}  # (B, K, P) part share of each cell
    current: dict[str, Tensor | None] = {}
    presence: list[Tensor] = []
    map_size: dict[str, tuple[int, int]] = {}

    def collector(name: str):
        point = points[name]

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            x = read_map(point, module, inputs, output)
            b, d, h, w = x.shape
            map_size[name] = (h, w)
            # torch.max over a dim returns the first maximal index on ties (all-zero maps: cell 0).
            value, flat = x.reshape(b, d, h * w).max(dim=-1)  # (B, D)
            idx = torch.stack((flat // w, flat % w), dim=-1)  # (B, D, 2) as (row, col)
            xy = geometry[name].cell_centres(idx.float())  # (B, D, 2) as (x, y)
            peaks[name].append((value.float().cpu(), xy.cpu()))
            part_masks = current.get("part_masks")
            if part_masks is not None:
                # What the following ReLU passes (a raw conv output can be negative); float16 halves the copy.
                stored[name].append(x.reshape(b, d, h * w).clamp(min=0).half().cpu())
                pooled = torch.nn.functional.adaptive_avg_pool2d(part_masks, (h, w))  # (B, K, h, w)
                fractions[name].append(pooled.flatten(2).half().cpu())
        return hook

    handles = [modules[points[name].module].register_forward_hook(collector(name)) for name in layers]
    model.to(device)
    preds, labels, landmarks, visible = [], [], [], []
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
                masks = batch.get("part_masks") if parts else None
                if masks is not None:
                    masks = torch.as_tensor(masks).to(device).float()
                    presence.append(masks.flatten(2).amax(-1).bool().cpu())  # (B, K)
                current["part_masks"] = masks
                logits = model(batch["image"].to(device, non_blocking=True))
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                preds.append(logits.argmax(dim=1).cpu())
                labels.append(torch.as_tensor(batch["label"]).long().cpu())
                landmarks.append(torch.as_tensor(batch["landmarks"]).float().cpu())
                visible.append(torch.as_tensor(batch["visible"]).bool().cpu())
    finally:
        for handle in handles:
            handle.remove()

    if not preds:
        raise ValueError("the loader yielded no batch; check the dataset split")
    label = torch.cat(labels)
    lm = torch.cat(landmarks)
    vis = torch.cat(visible)
    if lm.shape[1] != len(landmark_names):
        raise ValueError(f"batches have {lm.shape[1]} landmarks but {len(landmark_names)} landmark names were given")
    diagonal = image_size * math.sqrt(2.0)
    drop = drops_sparse(protocol)
    rule = "given" if filter_category is not None else class_rule
    if single_category is not None:
        rule = "single-category"

    result_layers: dict[str, dict[str, Any]] = {}
    for name in layers:
        if not peaks[name]:
            raise ValueError(f"layer {name!r} is never called by the model's forward pass")
        value = torch.cat([v for v, _ in peaks[name]])  # (N, D)
        xy = torch.cat([p for _, p in peaks[name]])  # (N, D, 2)
        categories = _categories(name, rule, value, xy, lm, vis, label, filter_category=filter_category,
                                 num_classes=len(classes), single_category=single_category,
                                 image_diagonal=diagonal, top_k=top_k, drop_sparse=drop)
        cls_labels = label if categories is not None else None
        measured = location_instability(value, xy, lm, vis, image_diagonal=diagonal, top_k=top_k,
                                        filter_category=categories, labels=cls_labels, drop_sparse=drop)
        ref_lm, ref_vis, ref_labels = lm, vis, cls_labels
        if single_category is not None:  # the references are measured on the object's images too
            keep = label == single_category
            ref_lm, ref_vis, ref_labels = lm[keep], vis[keep], None
        reference: dict[str, Any] = dict(geometry=geometry[name], map_size=map_size[name], image_diagonal=diagonal,
                                         top_k=top_k, labels=ref_labels, drop_sparse=drop)
        per_filter = measured.per_filter
        spread = landmark_diversity(measured.tracked_landmark, len(landmark_names), min_fraction=coverage_fraction)
        entry: dict[str, Any] = {
            "location_instability": finite_or_none(measured.mean),
            "random_reference": finite_or_none(random_peak_reference(ref_lm, ref_vis, **reference).mean),
            "oracle_reference": finite_or_none(oracle_reference(ref_lm, ref_vis, **reference).mean),
            "num_filters": int(value.shape[1]),
            "dropped_filters": int(torch.isnan(per_filter).sum()),
            "measured_at": points[name].describe(),
            "class_rule": rule,
            "landmark_tracking": landmark_histogram(measured.tracked_landmark, landmark_names),
            "landmark_entropy": finite_or_none(spread.entropy),
            "landmark_coverage": finite_or_none(spread.coverage),
            "coverage_fraction": coverage_fraction,
        }
        if stored[name]:
            maps = torch.cat(stored[name])  # (N, D, P)
            threshold = top_quantile_threshold(maps, part_quantile)
            frac = torch.cat(fractions[name])
            hits = torch.cat([part_hits(maps[s:s + 256], threshold, frac[s:s + 256], iou_threshold=iou_threshold)
                              for s in range(0, maps.shape[0], 256)])  # (N, D, K), in chunks of float32 maps
            scored = part_interpretability(hits, torch.cat(presence), label, categories)
            entry["part_interpretability"] = finite_or_none(scored.mean)
            entry["part_interpretability_per_part"] = {
                n: finite_or_none(v) for n, v in zip(landmark_names, scored.per_part.tolist())}
        if categories is not None:
            entry["category_histogram"] = category_histogram(categories, classes)
            entry["filter_category"] = [int(c) for c in categories.tolist()]
        entry["per_filter"] = [finite_or_none(v) for v in per_filter.tolist()]
        entry["geometry"] = geometry[name].to_json(map_size[name])
        result_layers[name] = entry

    return {
        "accuracy": finite_or_none(accuracy(torch.cat(preds), label)),
        "location_instability": result_layers[layers[0]]["location_instability"],
        "num_images": int(label.numel()),
        "protocol": protocol,
        "landmarks": list(landmark_names),
        "layers": result_layers,
    }


def _categories(
    name: str, rule: str | None, value: Tensor, xy: Tensor, lm: Tensor, vis: Tensor, label: Tensor, *,
    filter_category: Mapping[str, Tensor] | None, num_classes: int, single_category: int | None,
    image_diagonal: float, top_k: int, drop_sparse: bool,
) -> Tensor | None:
    """Each filter's class under ``rule``, ``(D,)`` long, or None (no class rule)."""
    d = value.shape[1]
    if rule == "single-category":
        assert single_category is not None, "the single-category rule needs the object's label"
        return fixed_classes(d, single_category)
    if rule == "given":
        assert filter_category is not None, "the given rule needs filter_category"
        return torch.as_tensor(filter_category[name]).long().cpu()
    if rule == "released":
        return released_classes(value, label, num_classes)
    if rule == "paper":
        return min_instability_classes(value, xy, lm, vis, label, num_classes=num_classes,
                                       image_diagonal=image_diagonal, top_k=top_k, drop_sparse=drop_sparse)
    return None


