"""One evaluation pass: accuracy, and per layer the location instability with its two references.

The measures are those of Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks" (CVPR 2018,
https://arxiv.org/abs/1710.00935), section 4.2; METHOD.md sections 6 and 8 give the exact rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from icnn_compress.metrics import (
    accuracy,
    category_histogram,
    landmark_histogram,
    location_instability,
    oracle_reference,
    random_peak_reference,
)
from icnn_compress.receptive_field import LayerGeometry, layer_geometry

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    *,
    layers: Sequence[str],
    filter_category: Mapping[str, Tensor] | None = None,
    classes: Sequence[str],
    landmark_names: Sequence[str],
    image_size: int,
    device: str | torch.device = "cpu",
    top_k: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Return accuracy and, for each layer in ``layers``, the location instability, as a JSON-ready dict.

    One pass over ``loader`` in eval mode under ``torch.inference_mode``. Forward hooks on the named
    modules keep, per image and filter, only the peak value (max over cells) and the centre of the peak
    cell (argmax, first on ties) in pixels, via :func:`~icnn_compress.receptive_field.layer_geometry`:
    memory is ``N × D`` per layer, never the maps. The model is moved to ``device``; its train/eval
    mode is restored afterwards.

    Args:
        model: the classifier; its forward returns ``(B, C)`` logits.
        loader: yields dict batches with ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)``, ``landmarks``
            ``(B, K, 2)`` pixel ``(x, y)`` and ``visible`` ``(B, K)``.
        layers: module names (``model.named_modules()``) whose ``(B, D, n, n)`` outputs are measured;
            the first one gives the top-level ``"location_instability"``.
        filter_category: per layer, ``(D,)`` long category of each filter (``-1``: none). When given,
            every layer must have one, and instability uses the "cls" rule (METHOD.md section 8):
            only images of the filter's category.
        classes: class names, indexed by label.
        landmark_names: landmark names, indexed like ``landmarks``.
        image_size: ``S``; the distance normaliser is the diagonal ``S·√2``.
        device: where the forward pass runs.
        top_k: images per (filter, landmark), 100 in the paper.
        progress: show a tqdm bar.

    Returns:
        ``{"accuracy", "location_instability", "num_images", "layers": {name: {"location_instability",
        "random_reference", "oracle_reference", "num_filters", "landmark_tracking", "category_histogram"
        (with filter_category), "per_filter", "geometry"}}}``. Undefined values (NaN: e.g. no visible
        landmark) are ``None`` so that the dict is strict JSON.
    """
    if not layers:
        raise ValueError("layers is empty; pass the names of the conv layers to measure")
    if filter_category is not None:
        missing = [name for name in layers if name not in filter_category]
        if missing:
            raise ValueError(f"filter_category has no entry for layers {missing}; "
                             "pass categories for every measured layer or none")
    device = torch.device(device)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise ValueError(f"model has no module named {name!r}; pass names from model.named_modules()")
    # Measured before the collecting hooks exist (the probe clones the model without hooks anyway).
    geometry = {name: layer_geometry(model, name, image_size=image_size) for name in layers}

    peaks: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    map_size: dict[str, tuple[int, int]] = {}

    def collector(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layer {name!r} outputs {shape}, not a (B, D, n, n) map")
            b, d, h, w = output.shape
            map_size[name] = (h, w)
            # torch.max over a dim returns the first maximal index on ties (all-zero maps: cell 0).
            value, flat = output.reshape(b, d, h * w).max(dim=-1)  # (B, D)
            idx = torch.stack((flat // w, flat % w), dim=-1)  # (B, D, 2) as (row, col)
            xy = geometry[name].cell_centres(idx.float())  # (B, D, 2) as (x, y)
            peaks[name].append((value.float().cpu(), xy.cpu()))
        return hook

    handles = [modules[name].register_forward_hook(collector(name)) for name in layers]
    was_training = model.training
    model.to(device).eval()
    preds, labels, landmarks, visible = [], [], [], []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
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
        model.train(was_training)

    if not preds:
        raise ValueError("the loader yielded no batch; check the dataset split")
    label = torch.cat(labels)
    lm = torch.cat(landmarks)
    vis = torch.cat(visible)
    if lm.shape[1] != len(landmark_names):
        raise ValueError(f"batches have {lm.shape[1]} landmarks but {len(landmark_names)} landmark names were given")
    diagonal = image_size * math.sqrt(2.0)

    result_layers: dict[str, dict[str, Any]] = {}
    for name in layers:
        if not peaks[name]:
            raise ValueError(f"layer {name!r} is never called by the model's forward pass")
        value = torch.cat([v for v, _ in peaks[name]])  # (N, D)
        xy = torch.cat([p for _, p in peaks[name]])  # (N, D, 2)
        categories = None if filter_category is None else torch.as_tensor(filter_category[name]).long().cpu()
        cls_labels = label if categories is not None else None
        measured = location_instability(value, xy, lm, vis, image_diagonal=diagonal, top_k=top_k,
                                        filter_category=categories, labels=cls_labels)
        reference = dict(geometry=geometry[name], map_size=map_size[name], image_diagonal=diagonal,
                         top_k=top_k, labels=cls_labels)
        entry: dict[str, Any] = {
            "location_instability": _finite(measured.mean),
            "random_reference": _finite(random_peak_reference(lm, vis, **reference).mean),
            "oracle_reference": _finite(oracle_reference(lm, vis, **reference).mean),
            "num_filters": int(value.shape[1]),
            "landmark_tracking": landmark_histogram(measured.tracked_landmark, landmark_names),
        }
        if categories is not None:
            entry["category_histogram"] = category_histogram(categories, classes)
        entry["per_filter"] = [_finite(v) for v in measured.per_filter.tolist()]
        entry["geometry"] = _geometry_json(geometry[name], map_size[name])
        result_layers[name] = entry

    return {
        "accuracy": _finite(accuracy(torch.cat(preds), label)),
        "location_instability": result_layers[layers[0]]["location_instability"],
        "num_images": int(label.numel()),
        "layers": result_layers,
    }


def _finite(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _geometry_json(g: LayerGeometry, size: tuple[int, int]) -> dict[str, list]:
    out = {"offset": list(g.offset), "stride": list(g.stride), "map_size": list(size)}
    if g.size is not None:
        out["receptive_field"] = list(g.size)
    return out


def evaluate_run(
    run: str | Path,
    *,
    data_root: str | Path | None = None,
    split: str = "test",
    json_path: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a run directory's ``model.pt`` on a split of its dataset (or ``data_root``).

    Measures every masked layer of the model with the filter categories the model learned (the "cls"
    rule), adds what the run recorded (``arm``, ``kappa0``, dead filters per layer at the last epoch),
    the ``split`` and the ``data_root`` (None: the run's own data), and writes the result atomically to
    ``json_path`` when given.
    """
    from torch.utils.data import DataLoader

    from .checkpoint import atomic_write_text
    from .mask import InterpretableMask
    from .train import resolve_device

    dev = resolve_device(str(device))
    model, saved, recipe, dataset = open_run(run, data_root=data_root, split=split, device=dev, progress=progress)
    layers = saved["architecture"]["masks"]
    masks = {name: model.get_submodule(name) for name in layers}
    categories = {name: m.category for name, m in masks.items() if isinstance(m, InterpretableMask)}
    loader = DataLoader(dataset, batch_size=recipe.train.eval_batch_size, shuffle=False,
                        num_workers=recipe.data.num_workers)
    result = evaluate(model, loader, layers=layers, filter_category=categories, classes=dataset.classes,
                      landmark_names=dataset.landmark_names, image_size=dataset.image_size, device=dev,
                      progress=progress)
    final_layers = (saved.get("final") or {}).get("layers", {})
    for name, entry in result["layers"].items():
        if "dead" in final_layers.get(name, {}):
            entry["dead"] = final_layers[name]["dead"]
    result.update(split=split, data_root=None if data_root is None else str(data_root), run=str(run),
                  arm=saved.get("arm"), kappa0=saved.get("kappa0"))
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result


def open_run(
    run: str | Path, *, data_root: str | Path | None, split: str, device: torch.device, progress: bool = False
) -> tuple[nn.Module, dict[str, Any], Any, Any]:
    """Load a run's model on ``device`` and open a split of its dataset (or of ``data_root``).

    Returns (model in eval mode, the saved model file, its recipe, the dataset); the dataset's classes
    must be the model's. The recipe's ``limit_train``/``limit_test`` cap its own dataset; a folder given
    as ``data_root`` is read whole (a larger held-out set is usually why it is given).
    """
    from .config import recipe_from_dict
    from .data.recipe import open_split, relocate
    from .errors import DatasetError
    from .train import load_run_model

    model, saved = load_run_model(run, device=device)
    recipe = recipe_from_dict(saved["recipe"], source=f"{run}/model.pt")
    dataset = open_split(relocate(recipe.data, data_root, whole=True), split, progress=progress)
    if list(dataset.classes) != list(saved["classes"]):
        raise DatasetError(f"the dataset's classes {list(dataset.classes)[:5]}... are not the model's "
                           f"{list(saved['classes'])[:5]}...; pass the dataset the run was trained on (--data)")
    return model, saved, recipe, dataset
