"""``icnn prune``: prune a run's model to a MACs target with one criterion, recover, save a run directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icnn_compress.config import PruneConfig, Recipe, recipe_from_dict, recipe_to_dict
from icnn_compress.data.recipe import open_split, relocate, task_object
from icnn_compress.errors import PruningError
from icnn_compress.models.pruned import MaskPruner
from icnn_compress.models.registry import PLAIN
from icnn_compress.runs.folder import check_output, locked
from icnn_compress.runs.model_file import RESERVED_KEYS, RunDir, save_model_file
from icnn_compress.runs.open import load_run_model
from icnn_compress.runs.results import PruningRecord
from icnn_compress.runtime.device import resolve_device
from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.runtime.loader import make_loader
from icnn_compress.train import finetune, validate

from ._graph import prune_model
from ._importance import make_importance
from ._scores import analysis_settings, flag_counts, load_filter_scores

__all__ = ["prune_run"]

log = logging.getLogger(__name__)


def _taylor_backward(train_data, device: torch.device, batches: int):
    """A ``before_step`` that accumulates ∂(cross-entropy)/∂w over ``batches`` training batches (eval mode)."""

    def run(model: nn.Module) -> None:
        model.eval()  # fixed BatchNorm statistics and no dropout: the gradient of the model being pruned
        model.zero_grad(set_to_none=True)
        seen = 0
        for batch in train_data:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            nn.functional.cross_entropy(model(images), labels).backward()
            seen += 1
            if seen >= batches:
                break

    return run


def _recovery_recipe(recipe: Recipe, saved: dict, epochs: int, device: str) -> Recipe:
    """The run's recipe with ``train.epochs = epochs``, κ fixed to the run's measured κ₀ (no new pilot) and the
    pruning's ``device`` (a run made on a GPU recovers on the CPU when asked to)."""
    kappa0 = float(saved.get("kappa0") or 0.0)
    icnn = replace(recipe.icnn, kappa=kappa0) if saved.get("arm", "icnn") == "icnn" else recipe.icnn
    return replace(recipe, train=replace(recipe.train, epochs=epochs, device=str(device)), icnn=icnn)


def _epoch_shares(epochs: int, rounds: int) -> list[int]:
    """``epochs`` split over ``rounds`` as evenly as possible, the extra epochs to the last rounds."""
    base, extra = divmod(epochs, rounds)
    return [base + (1 if k >= rounds - extra else 0) for k in range(rounds)]


def _settings(recipe: Recipe, run: str | Path, **given: Any) -> PruneConfig:
    """The recipe's ``[prune]`` section with the ``given`` values that are not None, checked like recipe keys."""
    given = {key: value for key, value in given.items() if value is not None}
    table = recipe_to_dict(recipe)["prune"] | given
    return recipe_from_dict({"prune": table}, source=f"pruning {run} with {given}").prune


def prune_run(
    run: str | Path,
    *,
    out: str | Path,
    analysis: str | Path | dict | None = None,
    target_macs: float | str | None = None,
    criterion: str | None = None,
    recover_epochs: int | None = None,
    round_to: int | None = None,
    floor: float | None = None,
    steps: int | None = None,
    schedule_steps: int = 32,
    taylor_batches: int = 4,
    seed: int = 0,
    data_root: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    trust_code: bool = False,
) -> PruningRecord:
    """Prune a run's ``model.pt`` to ``target_macs`` × its MACs, optionally recover, and write run directory ``out``.

    ``out`` becomes a run directory like any other (``model.pt`` loads with :func:`load_run_model`, so it
    can be evaluated, analysed and exported; not pruned a second time) plus ``pruning.json``: the criterion, MACs and
    parameters before and after, the accuracy of the unpruned, the pruned and the recovered model on the
    test split, and the pruning history. ``model.pt`` holds the same history under ``"pruning"``
    (``history.json``, written before a recovery, lets an interrupted recovery resume).

    ``target_macs``, ``criterion``, ``recover_epochs``, ``round_to``, ``floor`` and ``steps`` left at None take
    the value of the ``[prune]`` section of the run's recipe (stored in its ``model.pt``).

    Args:
        run: an unpruned run directory (or model file) from ``icnn finetune`` / ``icnn pipeline``, or a
            :class:`~icnn_compress.runs.plain.PlainCheckpoint` (a model no icnn run made; its analysis is
            of ordinary layers, scored through the convs that produce them).
        analysis: the run's ``analysis.json`` (or its folder); required by the ``icnn*`` criteria.
        target_macs: MACs of the pruned model as a fraction of the run's model's, or ``"auto"``: remove exactly
            the filters the analysis flags (silent, and redundancy-cluster members other than the best; the
            analysis' thresholds and the per-layer counts go into ``pruning.json`` under ``"auto"``).
        criterion: ``icnn`` | ``icnn-l1`` | ``l1`` | ``fpgm`` | ``taylor`` | ``random`` (see
            :func:`make_importance`).
        recover_epochs: fine-tuning epochs after pruning, with the run's arm (filter loss on for ``icnn``
            at the run's κ₀) and its recipe otherwise; 0 saves the pruned model as is.
        round_to, floor: see :func:`prune_model` (``round_to=1``: no rounding).
        steps: rounds of prune + recovery (iterative pruning, :func:`prune_model`'s ``rounds``); the
            ``recover_epochs`` are shared out over the rounds, the extra ones to the last rounds, so the
            budget equals one-shot's. Each intermediate round's recovery is a run folder ``out/round-K``.
        schedule_steps: torch-pruning's iterative steps that search for the MACs target (resolution).
        taylor_batches: training batches per Taylor gradient estimate.
        seed: seeds torch (the ``random`` criterion, the Taylor batches' order).
        resume: continue an interrupted recovery in ``out``: the pruning is redone (deterministic for a
            given seed) and must match ``history.json``, written before the recovery; the recovery goes on
            from ``last.pt`` (or restarts when no epoch had finished). ``pruning.json``, written last, marks
            the run complete. An iterative pruning (``steps > 1``) restarts from its first round.
        trust_code: see :func:`~icnn_compress.runs.open.load_run_model`.

    Returns:
        The ``pruning.json`` record.
    """
    out_dir = RunDir(check_output(out, folder=True, inputs=(run,)))
    # One writer at a time: the recovery's fine-tune takes the same lock again (held by this process)
    with locked(out_dir.path, "prune"):
        planned, done = out_dir.path / "history.json", out_dir.path / "pruning.json"
        _check_out_folder(out_dir, planned, done, resume)
        # Interrupted before the first recovery epoch ended: nothing to resume from, the recovery restarts.
        resume_recovery = resume and out_dir.last_path.exists()
        began = time.perf_counter()
        dev = resolve_device(device)
        model, saved = load_run_model(run, device=dev, trust_code=trust_code)
        if saved.get("pruning"):
            raise PruningError(f"{run} is already pruned; prune its unpruned parent run (pruning twice is not "
                               "supported)")
        recipe = recipe_from_dict(saved["recipe"], source=f"{run}/model.pt")
        settings = _settings(recipe, run, target_macs=target_macs, criterion=criterion, recover_epochs=recover_epochs,
                             round_to=round_to, floor=floor, steps=steps)
        rounds = settings.steps
        _check_rounds(settings)
        # an iterative pruning is not resumed: its later rounds depend on the recoveries between them
        resume_recovery = resume_recovery and rounds == 1
        data_cfg = relocate(recipe.data, data_root)
        test_set = open_split(data_cfg, "test", progress=progress, single_object=task_object(recipe.icnn))
        test = make_loader(test_set, batch_size=recipe.train.eval_batch_size, shuffle=False, seed=0, workers=0,
                           device=dev)
        acc_before = validate(model, test, dev, amp=False, channels_last=False)

        torch.manual_seed(seed)
        mask_pruner = MaskPruner()
        # without an analysis, make_importance raises the error that asks for --analysis
        read_scores = settings.criterion.startswith("icnn") and analysis is not None
        scores = load_filter_scores(analysis) if read_scores else None
        importance = make_importance(settings.criterion, mask_pruner=mask_pruner, scores=scores)
        before_step = None
        if settings.criterion == "taylor":
            train_set = open_split(data_cfg, "train", progress=progress, single_object=task_object(recipe.icnn))
            train = make_loader(train_set, batch_size=recipe.train.batch_size, shuffle=True, seed=seed, workers=0,
                                device=dev)
            before_step = _taylor_backward(train, dev, taylor_batches)
        size = saved["architecture"]["image_size"]
        data_recipe = replace(recipe, data=data_cfg)
        shares = _epoch_shares(settings.recover_epochs, rounds)

        def recover_round(pruned: nn.Module, k: int) -> None:
            log.info("round %d/%d: recovering %d epoch(s)", k, rounds, shares[k - 1])
            finetune(_recovery_recipe(data_recipe, saved, shares[k - 1], device), out_dir.path / f"round-{k}",
                     arm=saved.get("arm", "icnn"), force=True, progress=progress, model=pruned,
                     architecture=saved["architecture"], extra={"pruning_round": k})

        history = prune_model(model, example_inputs=torch.zeros(1, 3, size, size, device=dev), importance=importance,
                              mask_pruner=mask_pruner, target_macs=settings.target_macs,
                              round_to=settings.round_to, floor=settings.floor, steps=schedule_steps,
                              rounds=rounds, before_step=before_step, after_round=recover_round,
                              ignored_layers=settings.ignore)
        history.update(criterion=settings.criterion, source=str(run), seed=seed,
                       analysis=str(analysis) if isinstance(analysis, (str, Path)) else None)
        acc_pruned = validate(model, test, dev, amp=False, channels_last=False)
        log.info("pruned with %s to %.3f MACs: accuracy %.2f%% -> %.2f%%", settings.criterion, history["macs_ratio"],
                 100 * acc_before, 100 * acc_pruned)

        acc_recovered = None
        if settings.recover_epochs > 0:
            if resume and rounds == 1 and json.loads(planned.read_text())["steps"] != history["steps"]:
                raise PruningError(f"--resume: pruning {run} again gave another result than {planned}; "
                                   "resume with the same criterion, analysis, target and seed, or start afresh")
            atomic_write_text(planned, json.dumps(history))
            _recover(model, saved, history, _recovery_recipe(data_recipe, saved, shares[-1], device), out_dir,
                     resume_recovery=resume_recovery, progress=progress)
            # Recovery chose on its validation split; the reported accuracy is the test split's, as above.
            acc_recovered = validate(model, test, dev, amp=False, channels_last=False)
        record = {
            "criterion": settings.criterion,
            "target_macs": settings.target_macs,
            "macs_ratio": history["macs_ratio"],
            "base_macs": history["base_macs"],
            "macs": history["macs"],
            "base_params": history["base_params"],
            "params": history["params"],
            "accuracy_unpruned": acc_before,
            "accuracy_pruned": acc_pruned,
            "accuracy_recovered": acc_recovered,
            "recover_epochs": settings.recover_epochs,
            "steps": rounds,
            "recover_epochs_per_round": shares,
            "seconds": time.perf_counter() - began,
            "history": history,
        }
        if settings.target_macs == "auto":
            record["auto"] = _auto_counts(scores, history, analysis)
        if settings.recover_epochs == 0:
            extra = {k: v for k, v in saved.items() if k not in RESERVED_KEYS}
            save_model_file(out_dir.ensure().model_path, state_dict=model.state_dict(),
                            architecture=saved["architecture"],
                            classes=saved["classes"], extra={**extra, "pruning": history})
        atomic_write_text(done, json.dumps(record, indent=1))
        return record


def _check_out_folder(out_dir: RunDir, planned: Path, done: Path, resume: bool) -> None:
    """Refuse an ``out`` that holds a finished run, or a recovery to finish without ``resume``."""
    # pruning.json is written last. Without it, a model.pt beside last.pt is a recovery stopped before its
    # record (resumable); a lone model.pt is a save without recovery that stopped there: it is redone.
    if done.exists() or (out_dir.last_path.exists() and not resume):
        raise PruningError(f"{out_dir.path} already holds a run; choose another --out"
                           + ("" if done.exists() else " or pass --resume to finish its recovery"))
    if resume and not planned.exists():
        raise PruningError(f"--resume: {out_dir.path} has no interrupted recovery (history.json)")


def _check_rounds(settings: PruneConfig) -> None:
    """Iterative pruning needs a recovery epoch per round, and a MACs target (not "auto")."""
    rounds = settings.steps
    if rounds > 1 and settings.recover_epochs < rounds:
        raise PruningError(f"steps = {rounds} rounds of prune + recovery need at least one recovery epoch each; "
                           f"recover_epochs is {settings.recover_epochs} (raise it or lower steps)")
    if rounds > 1 and settings.target_macs == "auto":
        raise PruningError("target_macs = 'auto' removes the flagged filters at once: use steps = 1")


def _recover(model: nn.Module, saved: dict, history: dict, recipe: Recipe, out_dir: RunDir, *,
             resume_recovery: bool, progress: bool) -> None:
    """Fine-tune the pruned ``model`` into ``out_dir`` with the run's arm; its ``model.pt`` holds the history."""
    # The checks above decided this folder is this pruning's: a recovery that is not resumed starts afresh.
    arm = saved.get("arm", "icnn")
    # A plain model (a checkpoint no icnn run made) recovers as it is: no masks, no filter loss,
    # which is the baseline arm's training; its model.pt still says "plain".
    finetune(recipe, out_dir.path, arm="baseline" if arm == PLAIN else arm, resume=resume_recovery,
             force=not resume_recovery, progress=progress, model=model, architecture=saved["architecture"],
             extra={"pruning": history, **({"arm": arm} if arm == PLAIN else {})})


def _auto_counts(scores: Any, history: dict, analysis: Any) -> dict[str, Any]:
    """``pruning.json``'s ``"auto"``: the analysis' thresholds and, per layer, the flagged, removed and kept."""
    flags = flag_counts(scores or {})
    for layer, kept in history["kept"].items():
        if layer in flags:
            flags[layer]["removed"] = len(history["removed"].get(layer, []))
            flags[layer]["kept"] = len(kept)
    return {"thresholds": analysis_settings(analysis), "layers": flags}
