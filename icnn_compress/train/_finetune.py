"""The fine-tuning command: the κ pilot, the epoch loop with its collapse guard and κ correction, ``model.pt``."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icnn_compress.config import Recipe, recipe_to_dict, recipe_to_toml
from icnn_compress.data.recipe import task_object
from icnn_compress.errors import DatasetError, TrainingError
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.kappa import R_BANDS, R_COLLAPSE, CollapseGuard, calibrate_kappa
from icnn_compress.models.registry import PLAIN, with_model_normalization
from icnn_compress.runs.model_file import RunDir, save_model_file
from icnn_compress.runs.results import EpochRecord
from icnn_compress.runtime.device import rng_states
from icnn_compress.runtime.distributed import barrier, broadcast_object, is_main
from icnn_compress.runtime.files import append_jsonl, atomic_save, atomic_write_text

from ._loop import (
    _check_diverged,
    _compiled,
    _epoch_stats,
    _prepare,
    _restore,
    _snapshot,
    _train_epoch,
    _wrap_ddp,
    make_optimizer,
    validate_filters,
)
from ._resume import _RUN_FILES, _resume, _settings, _writing
from ._setup import _check_beta_step, _filter_loss, _set_class_frequency, _Setup, _setup, build_for_recipe

log = logging.getLogger(__name__)

ARMS = ("icnn", "masks-only", "baseline")


def calibrate(recipe: Recipe, *, progress: bool = True) -> dict:
    """Run the κ pilot alone on the recipe's ICNN model (what ``kappa = "auto"`` does at the start)."""
    recipe = with_model_normalization(recipe)
    setup = _setup(recipe, progress)
    model, architecture = build_for_recipe(recipe, arm="icnn", classes=setup.train_data.classes,
                                           image_size=recipe.data.image_size)
    _prepare(model, setup)
    _set_class_frequency(model, setup.train_data.labels.to(setup.device), architecture["num_classes"])
    filter_loss = _filter_loss(model, recipe)
    train_data, _ = setup.loaders(recipe.train.seed)
    return calibrate_kappa(model, filter_loss, train_data, setup.device, optimizer=recipe.train.optimizer,
                           batches=recipe.icnn.pilot_batches, amp=setup.amp, channels_last=setup.channels_last)


def finetune(
    recipe: Recipe,
    out: str | Path,
    *,
    arm: str = "icnn",
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    model: nn.Module | None = None,
    architecture: dict | None = None,
    extra: dict | None = None,
) -> EpochRecord:
    """Fine-tune the recipe's model as ``arm`` into run directory ``out``; return the final epoch's record.

    Writes ``recipe.toml`` (resolved), ``metrics.jsonl`` (one record per epoch), ``last.pt`` after each
    complete epoch (atomic; ``resume=True`` continues from it, with the arm, data and schedule that wrote it
    unless ``force``) and ``model.pt`` at the end. The folder is locked while the run writes; one that holds
    another run's files is refused unless ``force`` replaces them.

    Args:
        model, architecture: fine-tune this already built model (e.g. a pruned one, for recovery)
            instead of building the recipe's; ``architecture`` is its saved record.
        extra: more entries for ``model.pt`` (e.g. a pruning history).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    recipe = with_model_normalization(recipe)
    run = RunDir(Path(out))
    with _writing(run, f"finetune {arm}", _RUN_FILES, resume=resume, force=force, what="run"):
        return _finetune(recipe, run, arm, resume, force, progress, model, architecture, extra)


def _finetune(recipe: Recipe, run: RunDir, arm: str, resume: bool, force: bool, progress: bool,
              model: nn.Module | None, architecture: dict | None, extra: dict | None) -> dict:
    _check_beta_step(recipe, arm)
    _warn_mi_without_paper_mask(recipe, arm)
    setup = _setup(recipe, progress)
    # Under torchrun only rank 0 writes (run directory, metrics, checkpoints); every rank reads last.pt.
    main = is_main()
    if main:
        run.ensure()
    classes = setup.train_data.classes
    if model is None:
        model, architecture = build_for_recipe(recipe, arm=arm, classes=classes, image_size=recipe.data.image_size)
    elif architecture is None:
        raise ValueError("finetune(model=...) needs the model's architecture record too")
    _prepare(model, setup)
    # A plain model (a pruned PlainCheckpoint recovering, arm "baseline") has no mask: no filter loss, no
    # per-filter statistics, the task loss alone.
    plain = architecture.get("variant") == PLAIN
    if not plain:
        _set_class_frequency(model, setup.train_data.labels.to(setup.device), architecture["num_classes"])
    t = recipe.train
    optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
    filter_loss = None if plain else _filter_loss(model, recipe)
    masks = {} if filter_loss is None else filter_loss.masks
    anchor_parts = _anchor_parts(recipe, setup) if masks and arm != "baseline" else None
    settings = _settings(recipe, arm, t)
    start, kappa0, calibration, record = _starting_point(recipe, run, arm, setup, model, optimizer, filter_loss,
                                                         settings, resume=resume, force=force)
    if main:
        atomic_write_text(run.recipe_path, recipe_to_toml(recipe))
    guard = _collapse_guard(recipe, arm, setup, model, masks, calibration, start)
    good = _snapshot(model, optimizer)
    epoch, diverged = start, 0  # diverged: epochs in a row that ended non-finite or exploded
    with _compiled(_wrap_ddp(model, setup.device), t.compile or t.cuda_graphs, cuda_graphs=t.cuda_graphs) as runner:
        while epoch <= t.epochs:
            record, diverged = _epoch(runner, model, filter_loss, optimizer, setup, run, arm, epoch=epoch,
                                      kappa0=kappa0, diverged=diverged, guard=guard, masks=masks,
                                      anchor_parts=anchor_parts)
            verdict = guard.check(record)
            if verdict is not None:
                if main:
                    append_jsonl(run.metrics_path, {**record, "collapse": verdict})
                _restore(model, optimizer, good)
                kappa0 = guard.back_off(kappa0)
                log.warning("epoch %d: %s; restored epoch %d and lowered kappa0 to %.3g", epoch, verdict,
                            epoch - 1, kappa0)
                continue
            if calibration is not None and epoch == 1 and "correction" not in calibration:
                kappa0 = _correct_kappa(calibration, record, kappa0)
            good = _snapshot(model, optimizer)
            if main:
                append_jsonl(run.metrics_path, record)
                log.info("epoch %d: loss %.4f acc %.2f%% val %.2f%%", epoch, record["train_loss"], 100 * record["train_acc"],
                         100 * record["val_acc"])
                atomic_save({"model": good[0], "optimizer": good[1], "epoch": epoch, "kappa": kappa0,
                             "calibration": calibration, "record": record, "settings": settings,
                             **rng_states(setup.device)}, run.last_path)
            epoch += 1
    guard.final_check(record)
    if not main:
        barrier()  # wait for rank 0's model.pt, so that every rank returns with the run complete
        return record
    _save_model(recipe, run, setup, model, architecture, arm, kappa0, calibration, masks, record, extra)
    barrier()
    return record


def _warn_mi_without_paper_mask(recipe: Recipe, arm: str) -> None:
    if arm == "icnn" and recipe.icnn.loss == "mutual-information" and (
            recipe.icnn.peak != "argmax" or recipe.icnn.beta == "learned"):
        log.warning("icnn.loss = 'mutual-information' is the paper's loss only with the paper's mask: set "
                    "icnn.peak = 'argmax' and a fixed icnn.beta (4.0); this run uses peak %r, beta %r",
                    recipe.icnn.peak, recipe.icnn.beta)


def _starting_point(recipe: Recipe, run: RunDir, arm: str, setup: _Setup, model: nn.Module,
                    optimizer: torch.optim.Optimizer, filter_loss: FilterLoss | None, settings: dict[str, Any], *,
                    resume: bool, force: bool) -> tuple[int, float, dict | None, dict]:
    """(first epoch, κ₀, the pilot's calibration or None, the record kept so far): from ``last.pt`` on resume,
    0 for an arm without the filter loss, the pilot's κ₀ for ``kappa = "auto"``, else the recipe's κ₀."""
    t = recipe.train
    if resume:
        state = _resume(run, model, optimizer, setup.device, "finetune", settings, force)
        start = state["epoch"] + 1
        if start > t.epochs:
            log.info("%s had finished epoch %d of %d: writing model.pt from last.pt", run.path, state["epoch"],
                     t.epochs)
        # "record": what model.pt keeps as "final" when every epoch had finished
        return start, state["kappa"], state.get("calibration"), state.get("record", {})
    if arm != "icnn":
        return 1, 0.0, None, {}
    if recipe.icnn.kappa != "auto":
        return 1, float(recipe.icnn.kappa), None, {}
    train_data, _ = setup.loaders(t.seed)
    calibration = calibrate_kappa(model, filter_loss, train_data, setup.device, optimizer=t.optimizer,
                                  batches=recipe.icnn.pilot_batches, amp=setup.amp,
                                  channels_last=setup.channels_last)
    # The pilot ran on every rank on the same (unsharded) data; rank 0's verdict is the one.
    calibration = broadcast_object(calibration)
    log.info("kappa auto: %s", calibration["reason"])
    return 1, calibration["kappa"], calibration, {}


def _collapse_guard(recipe: Recipe, arm: str, setup: _Setup, model: nn.Module, masks: dict[str, nn.Module],
                    calibration: dict | None, start: int) -> CollapseGuard:
    """The collapse guard of the ICNN arm, primed with the pilot's loss and the dead filters before epoch 1."""
    t = recipe.train
    initial = None
    if calibration is not None and start == 1:
        initial = {"train_loss": calibration["task_loss"],
                   "layers": {n: {"dead": d} for n, d in calibration["dead"].items()}}
    guard = CollapseGuard(enabled=recipe.icnn.collapse_guard and arm == "icnn", initial=initial,
                          r_collapse=R_COLLAPSE[t.optimizer], r_target=R_BANDS[t.optimizer][0])
    if guard.enabled and start == 1:
        _, val_data = setup.loaders(t.seed)
        _, dead = validate_filters(model, val_data, setup.device, masks, amp=setup.amp,
                                   channels_last=setup.channels_last)
        guard.last = {**(initial or {}), "layers": {n: {"dead": d} for n, d in dead.items()}}
    return guard


def _epoch(runner: nn.Module, model: nn.Module, filter_loss: FilterLoss | None, optimizer: torch.optim.Optimizer,
           setup: _Setup, run: RunDir, arm: str, *, epoch: int, kappa0: float, diverged: int, guard: CollapseGuard,
           masks: dict[str, nn.Module], anchor_parts: list[int] | None = None) -> tuple[dict, int]:
    """Train and validate one epoch; return its record (the same on every rank) and the diverged count."""
    t = setup.recipe.train
    kappa = kappa0 / epoch
    train_data, val_data = setup.loaders(t.seed + epoch)
    if filter_loss is not None:
        filter_loss.reset_stats()
    began = time.perf_counter()
    try:
        stats = _train_epoch(runner, filter_loss, optimizer, train_data, setup, epoch=epoch, epochs=t.epochs,
                             kappa=kappa, lr=(t.lr, t.lr_end, t.schedule, t.schedule_epochs),
                             desc=f"{arm} {epoch}/{t.epochs}", anchor_parts=anchor_parts)
        _check_diverged(model, stats, epoch)
        diverged = 0
    except TrainingError as exc:
        diverged += 1
        if not guard.enabled or diverged > 1:
            raise TrainingError(f"{exc}; {_divergence_cause(arm, kappa0, t.lr, diverged)}; the last good "
                                f"checkpoint is {run.last_path} (epoch {epoch - 1}): run again with "
                                "--resume --force and the new setting") from None
        stats = {"train_loss": math.inf, "train_acc": 0.0}
    layers = {} if filter_loss is None else _epoch_stats(filter_loss)
    # The bare, eager module: under DDP each rank runs a different number of eval batches and DDP's
    # forward may hold collectives; a compiled runner would recompile for validation's recording
    # hooks, new closures every epoch.
    val_acc, dead = validate_filters(model, val_data, setup.device,
                                     masks, amp=setup.amp, channels_last=setup.channels_last)
    for name, count in dead.items():
        layers[name]["dead"] = count
    record = {"stage": "finetune", "arm": arm, "epoch": epoch, "kappa": kappa, "kappa0": kappa0,
              "lr": optimizer.param_groups[0]["lr"], **stats, "val_acc": val_acc, "layers": layers,
              "seconds": time.perf_counter() - began}
    # Loss and accuracy are all-reduced; the per-layer filter statistics are rank 0's share of the
    # data. Rank 0's record decides the collapse guard and the κ correction on every rank, so that
    # no rank restores or rescales alone.
    return broadcast_object(record), diverged


def _save_model(recipe: Recipe, run: RunDir, setup: _Setup, model: nn.Module, architecture: dict, arm: str,
                kappa0: float, calibration: dict | None, masks: dict[str, nn.Module], record: dict,
                extra: dict | None) -> None:
    """Write the run's ``model.pt``: the weights, the architecture record and what the run chose and measured."""
    save_model_file(
        run.model_path,
        state_dict=model.state_dict(),
        architecture=architecture,
        classes=list(setup.train_data.classes),
        extra={
            "arm": arm,
            "kappa0": kappa0,
            "calibration": calibration,
            "recipe": recipe_to_dict(recipe),
            "choices": {"peak": recipe.icnn.peak, "beta": recipe.icnn.beta, "loss": recipe.icnn.loss,
                        "anchor": recipe.icnn.anchor,
                        "baseline": "same architecture, masks inactive, no filter loss"},
            "filter_categories": {n: m.category.tolist() for n, m in masks.items()},
            "task": {"task": recipe.icnn.task, "object": task_object(recipe.icnn)},
            "splits": {"train": len(setup.train_data), "val": len(setup.val_data) if setup.val_data is not
                       setup.train_data else 0, "val_fraction": recipe.data.val_fraction,
                       "val_seed": recipe.data.val_seed, "test": "read only by icnn evaluate"},
            "final": record,
            **(extra or {}),
        },
    )


def _anchor_parts(recipe: Recipe, setup: _Setup) -> list[int] | None:
    """The landmark indices ``icnn.anchor = "landmarks"`` assigns the filters over (all the data's), or None."""
    if recipe.icnn.anchor == "none":
        return None
    names = setup.train_data.landmark_names
    if not names:
        raise DatasetError(f"icnn.anchor = 'landmarks' places each filter's template on its assigned landmark in "
                           f"training, and {setup.train_data.root} has no landmarks: set icnn.anchor = 'none' or "
                           "give the data landmarks (data.keypoints for an image folder)")
    log.info("icnn.anchor = 'landmarks': the masks' templates sit on the training images' landmarks (%s, "
             "round robin over the filters): weak part supervision, which the paper does not use", ", ".join(names))
    return list(range(len(names)))


def _divergence_cause(arm: str, kappa0: float, lr: float, diverged: int) -> str:
    """What to lower after a diverged epoch: the learning rate when the filter loss is off or lowering κ did
    not help (the guard already backed it off once), else either."""
    if arm != "icnn" or kappa0 == 0:
        return f"the filter loss is off in this arm, so the learning rate is the cause: lower train.lr (now {lr:g})"
    if diverged > 1:
        return (f"it diverged again after the collapse guard lowered kappa0 to {kappa0:.3g}, so the learning rate is "
                f"the likely cause: lower train.lr (now {lr:g})")
    return f"lower train.lr (now {lr:g}) or icnn.kappa (kappa0 {kappa0:.3g})"


def _correct_kappa(calibration: dict, record: dict, kappa0: float) -> float:
    """Close the loop once after epoch 1: rescale κ₀ so that the measured R_top lands on the target.

    METHOD.md §8's bands are for R over the first epoch; the pilot measures before any step, when the
    task gradient is not yet what training sees. R is linear in κ, so one rescaling suffices.
    """
    top = next(iter(record["layers"].values()))
    measured = top.get("R")
    low, high = calibration["band"]
    if measured is None or low <= measured <= high:
        calibration["correction"] = {"R_epoch1": measured, "factor": 1.0}
        return kappa0
    factor = calibration["target_R"] / measured
    calibration["correction"] = {"R_epoch1": measured, "factor": factor}
    log.info("kappa auto: R_top over epoch 1 was %.3g, outside %s: kappa0 %.3g -> %.3g", measured,
             calibration["band"], kappa0, kappa0 * factor)
    return kappa0 * factor
