"""Run folders while training writes them: the lock and claim, the settings a resume must match, resuming from ``last.pt``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from icnn_compress.config import Recipe
from icnn_compress.errors import CheckpointError, TrainingError
from icnn_compress.runs.folder import check_same_run, claim_folder, locked
from icnn_compress.runs.model_file import RunDir
from icnn_compress.runtime.device import set_rng_states
from icnn_compress.runtime.distributed import is_main
from icnn_compress.runtime.files import trim_jsonl

log = logging.getLogger(__name__)


# A folder holding any of these holds another run: refused unless resumed (or replaced with --force).
_RUN_FILES = ("model.pt", "last.pt", "metrics.jsonl")
_PLAIN_FILES = ("model.pth", "last.pt", "metrics.jsonl")


@contextlib.contextmanager
def _writing(run: RunDir, command: str, files: tuple[str, ...], *, resume: bool, force: bool, what: str):
    """Hold the run folder's lock (the launching rank only) and claim the folder for this command."""
    def check() -> None:
        if resume and not run.last_path.exists():
            raise TrainingError(f"--resume: {run.path} has no last.pt to resume from")

    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 holds the lock and writes, but
        # every rank refuses what rank 0 refuses (read-only), so that none waits for a rank 0 that stopped
        if not force:
            claim_folder(run.path, files, resume=resume, force=False, what=what)
        check()
        yield
        return
    with locked(run.path, command):
        claim_folder(run.path, files, resume=resume, force=force, what=what)
        check()
        yield


def _settings(recipe: Recipe, arm: str, schedule: Any) -> dict[str, Any]:
    """What makes a run that run: a --resume must ask for the same arm, data and schedule."""
    d = recipe.data
    return {"arm": arm, "data.root": d.root, "data.image_size": d.image_size, "data.limit_train": d.limit_train,
            "data.val_fraction": d.val_fraction, "data.val_seed": d.val_seed, "data.crop_to_box": d.crop_to_box,
            "train.batch_size": recipe.train.batch_size, "train.seed": recipe.train.seed,
            **{f"schedule.{k}": v for k, v in dataclasses.asdict(schedule).items()
               if k in ("epochs", "optimizer", "lr", "lr_end", "schedule", "schedule_epochs")}}


def _resume(run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            stage: str, settings: dict[str, Any], force: bool) -> dict:
    """Load ``last.pt`` into the model, optimiser and generators; drop the metrics of epochs it does not hold.

    Refused when ``last.pt`` was written with other ``settings`` (another arm, data or schedule) unless ``force``.
    """
    try:
        state = torch.load(run.last_path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # a truncated or overwritten file
        raise CheckpointError(f"--resume: {run.last_path} cannot be read ({exc}); the run cannot continue from it: "
                              "start again with --force") from None
    check_same_run(state.get("settings"), settings, run.path, force=force)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state)
    if is_main():
        trim_jsonl(run.metrics_path, stage, state["epoch"])
    log.info("resuming %s from epoch %d", run.path, state["epoch"] + 1)
    return state
