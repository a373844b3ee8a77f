"""One streamed pass per model: every explainer's maps, judged by the same measures, per-image scalars only."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn
from tqdm.auto import tqdm

from icnn_compress.method.evaluation import evaluate
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.method.protocol import class_rule_for, measure_points
from icnn_compress.method.receptive_field import layer_geometry
from icnn_compress.runtime.jsonable import finite_json

from ._explainers import EXPLAINERS, IcnnMaps, _Conductance, build_explainers, input_range_of
from ._measures import (
    blur,
    conductance_exclusivity,
    curve_auc,
    map_peaks,
    map_rank_correlation,
    peak_distance_spread,
    perturbation_curves,
    pointing_game,
)
from ._settings import CompareError, CompareSettings

__all__ = ["DEFAULT_METHODS", "Comparison", "compare", "explanation_drift"]

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = tuple(EXPLAINERS)


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        summary: the JSON-ready measures (see :func:`compare`).
        examples: the images asked for with ``keep``, in stream order: ``{"index", "image" (3, S, S),
            "label", "target", "landmarks" (K, 2), "visible" (K,), "maps": {explainer: (S, S)},
            "peaks": {explainer: (2,) the measured peak (x, y)}}`` on the CPU.
        maps: with ``keep_maps``, every image's map per explainer, ``{explainer: (N, S, S)}`` float32 on the
            CPU in stream order (what :func:`explanation_drift` correlates); else empty.
    """

    summary: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    maps: dict[str, Tensor] = field(default_factory=dict)


class _Tally:
    """Per-image scalars of one explainer, gathered batch by batch."""

    def __init__(self) -> None:
        self.peak_xy: list[Tensor] = []
        self.flat: list[Tensor] = []
        self.deletion: list[Tensor] = []
        self.insertion: list[Tensor] = []
        self.infidelity: list[Tensor] = []
        self.sensitivity: list[Tensor] = []
        self.maps: list[Tensor] = []
        self.seconds = 0.0


def compare(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    layer: str,
    image_size: int,
    landmark_names: Sequence[str],
    classes: Sequence[str],
    methods: Sequence[str] = DEFAULT_METHODS,
    filter_category: Tensor | None = None,
    settings: CompareSettings | None = None,
    device: str | torch.device = "cpu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    keep: Iterable[int] = (),
    protocol: str = "official",
    architecture: Mapping[str, Any] | None = None,
    keep_maps: bool = False,
    progress: bool = False,
) -> Comparison:
    """Explain every image of ``loader`` with each of ``methods`` and measure the maps the same way.

    One pass over ``loader``; per batch: one forward (logits, and the ICNN maps from the same pass), each
    explainer's ``(B, S, S)`` map for the target class (``settings.target``), then its peak, the
    pointing game, deletion and insertion curves and, on the first ``settings.robust_images`` images,
    Captum's ``infidelity`` (normalised, Gaussian perturbations) and ``sensitivity_max``. Only per-image
    scalars are kept (and the maps of the ``keep`` images), so memory does not grow with the maps.
    Randomness (tie-breaks, noise) is seeded by ``settings.seed`` without touching the caller's RNG.

    Args:
        model: the classifier; ``(B, 3, S, S) -> (B, C)`` logits. Put in eval mode (restored after).
        loader: dict batches with ``image``, ``label``, ``landmarks`` ``(B, K, 2)``, ``visible`` and
            ``index`` (as :class:`~icnn_compress.data.CubDataset` yields).
        layer: module name of the ICNN maps and of the layer methods (Grad-CAM, conductance).
        image_size: ``S``.
        landmark_names, classes: names indexed like the landmarks and the labels.
        methods: names from :data:`~icnn_compress.compare.EXPLAINERS`.
        filter_category: ``(D,)`` long category of each of ``layer``'s filters; default: the class
            ``protocol`` gives each filter on these images (the learned ``category`` of a mask under
            ``masked-output``).
        settings: :class:`CompareSettings` (defaults when ``None``).
        device: where everything runs.
        mean, std: the input normalisation (SmoothGrad's noise scale; the figure's colours).
        keep: dataset indices (``batch["index"]``) whose maps are returned in ``Comparison.examples``.
        protocol, architecture: where the ``icnn`` maps are read (:mod:`icnn_compress.method.protocol`; under
            ``official`` a mask's input, or the new conv's raw output) and the run's architecture record.
        keep_maps: return every image's map of every explainer (``Comparison.maps``; ``N·S²`` floats each).
        progress: a tqdm bar over batches.

    Returns:
        A :class:`Comparison` whose ``summary`` is ``{"num_images", "accuracy", "mean_target_prob",
        "layer", "geometry", "target", "filters_per_class", "explainers": {name: {"pointing_game",
        "pointing_game_se", "pointing_by_landmark", "points_at", "peak_distance_std",
        "peak_distance_std_by_landmark", "deletion_auc", "deletion_auc_se", "insertion_auc",
        "insertion_auc_se", "deletion_curve", "insertion_curve", "infidelity", "sensitivity_max",
        "robust_images", "seconds_per_image", "empty_fraction"}}, "exclusivity"}`` (exclusivity from
        conductance, when it ran); undefined values are ``None``.
    """
    settings = settings or CompareSettings()
    device = torch.device(device)
    methods = list(methods)
    if not methods:
        raise CompareError(f"no explainer asked for; choose from {', '.join(EXPLAINERS)}")
    module = model.get_submodule(layer) if layer in dict(model.named_modules()) else None
    if module is None:
        raise CompareError(f"model has no module named {layer!r}; pass a name from model.named_modules()")
    point = measure_points(model, [layer], protocol, architecture=architecture)[layer]
    rule = class_rule_for(protocol)
    if filter_category is None and rule == "learned" and hasattr(module, "category"):
        filter_category = module.category
    elif filter_category is None and isinstance(module, InterpretableMask):
        # The protocol's class of each filter on these images: one more forward pass over them.
        measured = evaluate(model, loader, layers=[layer], classes=classes, landmark_names=landmark_names,
                            image_size=image_size, protocol=protocol, class_rule=rule, architecture=architecture,
                            device=device)
        filter_category = torch.tensor(measured["layers"][layer]["filter_category"])
    geometry = layer_geometry(model, layer, image_size=image_size)
    point_geometry = layer_geometry(model, point.module, image_size=image_size)
    keep = set(int(i) for i in keep)
    was_training = model.training
    model.to(device).eval()
    explainers = build_explainers(model, methods, layer=layer, image_size=image_size, geometry=geometry,
                                  filter_category=filter_category, settings=settings, point=point,
                                  point_geometry=point_geometry,
                                  input_range=input_range_of(list(mean) if mean else None,
                                                             list(std) if std else None))
    icnn = explainers.get("icnn")
    tallies = {name: _Tally() for name in explainers}
    sigma = settings.blur_sigma if settings.blur_sigma is not None else image_size / 32
    radius = settings.radius * image_size
    gen = torch.Generator().manual_seed(settings.seed)
    targets, correct, target_prob, lms, viss = [], [], [], [], []
    cond_sum: Tensor | None = None
    cond_count = torch.zeros(len(classes), dtype=torch.float64)
    examples: list[dict[str, Any]] = []
    seen = 0
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(settings.seed)
            for batch in tqdm(loader, desc="compare", disable=not progress, leave=False):
                x = batch["image"].to(device)
                label = torch.as_tensor(batch["label"]).long().to(device)
                index = torch.as_tensor(batch["index"]).long().cpu()
                b = x.shape[0]
                if not seen:
                    with torch.no_grad():
                        model(x)  # warm-up, untimed: the first call pays for allocations of every layer
                start = time.perf_counter()
                with torch.no_grad(), (icnn.capture() if icnn else contextlib.nullcontext()):
                    logits = model(x)
                forward_seconds = time.perf_counter() - start
                target = label if settings.target == "label" else logits.argmax(dim=1)
                targets.append(target.cpu())
                correct.append((logits.argmax(dim=1) == label).cpu())
                target_prob.append(logits.float().softmax(dim=1).gather(1, target[:, None])[:, 0].cpu())
                lms.append(torch.as_tensor(batch["landmarks"]).float().cpu())
                viss.append(torch.as_tensor(batch["visible"]).bool().cpu())
                n_robust = max(0, min(b, settings.robust_images - seen))
                start_image = blur(x, sigma)
                kept = [i for i in range(b) if int(index[i]) in keep]
                kept_maps: dict[int, dict[str, Tensor]] = {i: {} for i in kept}
                kept_peaks: dict[int, dict[str, Tensor]] = {i: {} for i in kept}

                for name, explainer in explainers.items():
                    tally = tallies[name]
                    start = time.perf_counter()
                    if isinstance(explainer, IcnnMaps):
                        maps = explainer.from_activation(explainer.activation, target)
                        tally.seconds += forward_seconds  # its share: the forward the model runs anyway
                    else:
                        maps = explainer(x, target)
                    tally.seconds += time.perf_counter() - start
                    maps = maps.detach().float()  # (B, S, S)
                    if isinstance(explainer, _Conductance) and explainer.filter_totals is not None:
                        totals = explainer.filter_totals.double().cpu()  # (B, D)
                        if cond_sum is None:
                            cond_sum = torch.zeros(len(classes), totals.shape[1], dtype=torch.float64)
                        cond_sum.index_add_(0, target.cpu(), totals)
                        cond_count.index_add_(0, target.cpu(), torch.ones(b, dtype=torch.float64))
                    xy, flat = map_peaks(maps, generator=gen)
                    if keep_maps:
                        tally.maps.append(maps.cpu())
                    tally.peak_xy.append(xy.cpu())
                    tally.flat.append(flat.cpu())
                    deletion, insertion = perturbation_curves(
                        model, x, maps, target, steps=settings.steps, deletion_fill=0.0,
                        insertion_start=start_image, chunk=settings.internal_batch_size, generator=gen)
                    tally.deletion.append(deletion.cpu())
                    tally.insertion.append(insertion.cpu())
                    if n_robust:
                        inf, sens = _robustness(model, explainer, x[:n_robust], maps[:n_robust],
                                                target[:n_robust], settings)
                        tally.infidelity.append(inf.cpu())
                        tally.sensitivity.append(sens.cpu())
                    for i in kept:
                        kept_maps[i][name] = maps[i].cpu()
                        kept_peaks[i][name] = xy[i].cpu()
                for i in kept:
                    examples.append({
                        "index": int(index[i]), "image": x[i].cpu(), "label": int(label[i]),
                        "target": int(target[i]), "landmarks": lms[-1][i], "visible": viss[-1][i],
                        "maps": kept_maps[i], "peaks": kept_peaks[i],
                    })
                seen += b
    finally:
        model.train(was_training)
    if not seen:
        raise CompareError("the loader yielded no batch; check the dataset split and the limit")

    target_all = torch.cat(targets)
    lm, vis = torch.cat(lms), torch.cat(viss)
    if lm.shape[1] != len(landmark_names):
        raise CompareError(f"batches have {lm.shape[1]} landmarks but {len(landmark_names)} landmark names were given")
    diagonal = image_size * math.sqrt(2.0)
    summary: dict[str, Any] = {
        "num_images": seen,
        "accuracy": float(torch.cat(correct).double().mean()),
        "mean_target_prob": float(torch.cat(target_prob).double().mean()),
        "layer": layer,
        "protocol": protocol,
        "icnn_maps_at": point.describe(),
        "geometry": geometry.to_json(),
        "target": settings.target,
        "radius_px": radius,
        "filters_per_class": (None if filter_category is None else
                              {str(c): int((filter_category.cpu() == i).sum()) for i, c in enumerate(classes)}),
        "explainers": {name: _summarise(t, lm, vis, target_all, radius, diagonal, landmark_names)
                       for name, t in tallies.items()},
    }
    if cond_sum is not None and filter_category is not None:
        summary["exclusivity"] = finite_json(conductance_exclusivity(cond_sum, cond_count, filter_category.cpu()))
    maps = {name: torch.cat(t.maps) for name, t in tallies.items() if t.maps}
    return Comparison(summary=summary, examples=examples, maps=maps)


_DRIFT_MEASURES = ("pointing_game", "peak_distance_std", "deletion_auc", "insertion_auc")


def explanation_drift(parent: Comparison, pruned: Comparison) -> dict[str, dict[str, Any]]:
    """How each explainer's maps moved from a parent model to its pruned child on the same images.

    Both comparisons must come from :func:`compare` on the same images in the same order with ``keep_maps``.
    Per explainer: ``rank_correlation`` (mean over images of Spearman's correlation between the parent's and
    the pruned model's map of the same image and class; 1 = the same pixel ranking), its standard error
    ``rank_correlation_se``, ``images`` (pairs where both maps have a ranking), and each of the pointing game,
    distance spread and deletion / insertion AUC before (``<measure>_parent``) and after (``<measure>``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, before in parent.maps.items():
        after = pruned.maps.get(name)
        if after is None:
            continue
        if after.shape != before.shape:
            raise CompareError(f"the {name} maps of the two models have shapes {tuple(before.shape)} and "
                               f"{tuple(after.shape)}: compare them on the same images")
        rho = map_rank_correlation(before, after)
        rho = rho[torch.isfinite(rho)]
        row: dict[str, Any] = {"rank_correlation": float(rho.mean()) if rho.numel() else float("nan"),
                               "rank_correlation_se": _se(rho), "images": int(rho.numel())}
        for key in _DRIFT_MEASURES:
            row[f"{key}_parent"] = parent.summary["explainers"][name].get(key)
            row[key] = pruned.summary["explainers"][name].get(key)
        out[name] = finite_json(row)
    return out


def _robustness(model: nn.Module, explainer, x: Tensor, maps: Tensor, target: Tensor,
                settings: CompareSettings) -> tuple[Tensor, Tensor]:
    """Captum's infidelity and max-sensitivity of ``maps`` ``(b, S, S)`` on images ``x``."""
    noise = settings.infidelity_noise

    def perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
        i = torch.randn_like(inputs) * noise
        return i, inputs - i

    # The map is one value per pixel; against per-channel perturbations it counts for every channel.
    attributions = maps[:, None].expand(-1, x.shape[1], -1, -1).contiguous()
    b = x.shape[0]
    with torch.no_grad():
        # Captum wants a sub-batch of at least the batch and at most every perturbation of it.
        per_batch = min(max(settings.internal_batch_size, b), b * settings.infidelity_samples)
        inf = infidelity(model, perturb, x, attributions, target=target,
                         n_perturb_samples=settings.infidelity_samples,
                         max_examples_per_batch=per_batch, normalize=True)

    def explain(inputs: Tensor | tuple[Tensor, ...], target: Tensor) -> tuple[Tensor]:
        # sensitivity_max passes the inputs as a 1-tuple and iterates over what comes back: a tuple too.
        return (explainer(inputs[0] if isinstance(inputs, tuple) else inputs, target),)

    per_batch = min(max(settings.batch_size, b), b * settings.sensitivity_samples)
    sens = sensitivity_max(explain, x, target=target, perturb_radius=settings.sensitivity_radius,
                           n_perturb_samples=settings.sensitivity_samples, max_examples_per_batch=per_batch)
    return inf.detach().float(), sens.detach().float()


def _summarise(t: _Tally, lm: Tensor, vis: Tensor, target: Tensor, radius: float, diagonal: float,
               landmark_names: Sequence[str]) -> dict[str, Any]:
    xy = torch.cat(t.peak_xy)
    n = xy.shape[0]
    pg = pointing_game(xy, lm, vis, radius)
    valid = pg["valid"]
    hits = pg["hit"][valid].double()
    p = float(hits.mean()) if hits.numel() else float("nan")
    by_landmark = {}
    for k, name in enumerate(landmark_names):
        v = vis[:, k]
        by_landmark[name] = float(pg["hit_by_landmark"][v, k].double().mean()) if bool(v.any()) else None
    nearest = pg["nearest"][valid]
    points_at = {name: float((nearest == k).double().mean()) if nearest.numel() else None
                 for k, name in enumerate(landmark_names)}
    spread, spread_k = peak_distance_spread(xy, lm, vis, target, image_diagonal=diagonal)
    deletion, insertion = torch.cat(t.deletion), torch.cat(t.insertion)
    del_auc, ins_auc = curve_auc(deletion).double(), curve_auc(insertion).double()
    inf = torch.cat(t.infidelity).double() if t.infidelity else None
    sens = torch.cat(t.sensitivity).double() if t.sensitivity else None
    out = {
        "pointing_game": p,
        "pointing_game_se": math.sqrt(p * (1 - p) / max(hits.numel(), 1)) if hits.numel() else float("nan"),
        "pointing_by_landmark": by_landmark,
        "points_at": points_at,
        "peak_distance_std": spread,
        "peak_distance_std_by_landmark": {name: float(v) for name, v in zip(landmark_names, spread_k.tolist())},
        "deletion_auc": float(del_auc.mean()),
        "deletion_auc_se": _se(del_auc),
        "insertion_auc": float(ins_auc.mean()),
        "insertion_auc_se": _se(ins_auc),
        "deletion_curve": [round(v, 5) for v in deletion.double().mean(dim=0).tolist()],
        "insertion_curve": [round(v, 5) for v in insertion.double().mean(dim=0).tolist()],
        "infidelity": float(inf.mean()) if inf is not None else float("nan"),
        "sensitivity_max": float(sens.mean()) if sens is not None else float("nan"),
        "robust_images": 0 if inf is None else int(inf.numel()),
        "seconds_per_image": t.seconds / max(n, 1),
        "empty_fraction": float(torch.cat(t.flat).double().mean()),
    }
    return finite_json(out)


def _se(v: Tensor) -> float:
    return float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")

