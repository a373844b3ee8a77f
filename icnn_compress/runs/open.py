"""Open a run: its model file rebuilt into a model (pruned shapes replayed), and a split of its dataset.

Every stage that reads a run (evaluate, analyze, compare, export, prune) goes through :func:`open_run` or,
for the model alone, :func:`load_run_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icnn_compress.config import recipe_from_dict
from icnn_compress.data.recipe import open_split, relocate, task_object
from icnn_compress.errors import DatasetError, ModelError
from icnn_compress.models.state_dict import load_state_dict_checked
from icnn_compress.models.surgery import build_model
from icnn_compress.runs.model_file import load_model_file
from icnn_compress.runs.plain import PlainCheckpoint

__all__ = ["default_layers", "load_run_model", "open_run", "say_what_needs_landmarks"]

log = logging.getLogger(__name__)


def load_run_model(
    run: str | Path | PlainCheckpoint, *, device: str | torch.device = "cpu", trust_code: bool = False
) -> tuple[nn.Module, dict]:
    """Load a run's ``model.pt`` (or a model file path) into a fresh model; return it and the saved record.

    A pruned model file (``icnn prune``) also holds ``"pruning"``, the pruning history: the model is
    rebuilt from its architecture record, the history replayed on torch-pruning's dependency graph to
    give it the pruned shapes, then the weights loaded.

    ``trust_code`` lets the file's ``"module:builder"`` arch be imported when no installed package registers it
    (:func:`~icnn_compress.models.surgery.build_model`); a file from elsewhere runs code only so.
    """
    if isinstance(run, PlainCheckpoint):  # a model no icnn run made: its weights, no model file
        model, saved = run.load()
        return model.to(device).eval(), saved
    path = Path(run)
    path = path / "model.pt" if path.is_dir() else path
    saved = load_model_file(path)
    model = build_model(saved["architecture"], trust_code=trust_code, source=str(path))
    if saved.get("pruning"):
        # Imported here: replaying a history needs torch-pruning, which a run never pruned loads without.
        from icnn_compress.models.pruned import apply_pruning_history

        apply_pruning_history(model, saved["pruning"])
    load_state_dict_checked(model, saved["state_dict"], source=str(path))
    return model.to(device).eval(), saved


def say_what_needs_landmarks(dataset: Any, command: str) -> None:
    """Warn, in one line, which measures ``command`` skips on a dataset without landmarks (plain class folders)."""
    if not list(dataset.landmark_names):
        log.warning("%s: %s has no landmarks, so location instability (and part interpretability) were skipped; "
                    "data.keypoints adds landmarks to class folders", command, dataset.root)


def default_layers(architecture: Mapping[str, Any], run: Any) -> list[str]:
    """The layers a run is measured at: its masks; a plain model's (:mod:`icnn_compress.runs.plain`) top conv."""
    if architecture["masks"]:
        return list(architecture["masks"])
    if architecture.get("top_layer"):
        return [architecture["top_layer"]]
    raise ModelError(f"{run} has no masked layer and no known top conv ({architecture['arch']}): pass the module "
                     "names to analyse with --layers, or the top conv with --top-layer")


def open_run(
    run: str | Path,
    *,
    data_root: str | Path | None,
    split: str,
    device: torch.device,
    progress: bool = False,
    trust_code: bool = False,
) -> tuple[nn.Module, dict[str, Any], Any, Any]:
    """Load a run's model on ``device`` and open a split of its dataset (or of ``data_root``).

    Returns (model in eval mode, the saved model file, its recipe, the dataset); the dataset's classes
    must be the model's. The recipe's ``limit_train``/``limit_test`` cap its own dataset; a folder given
    as ``data_root`` is read whole (a larger held-out set is usually why it is given). ``trust_code``: see
    :func:`~icnn_compress.runs.open.load_run_model`.
    """
    model, saved = load_run_model(run, device=device, trust_code=trust_code)
    recipe = recipe_from_dict(saved["recipe"], source=f"{run}/model.pt")
    dataset = open_split(relocate(recipe.data, data_root, whole=True), split, progress=progress,
                         single_object=task_object(recipe.icnn))
    if list(dataset.classes) != list(saved["classes"]):
        raise DatasetError(f"the dataset's classes {list(dataset.classes)[:5]}... are not the model's "
                           f"{list(saved['classes'])[:5]}...; pass the dataset the run was trained on (--data)")
    return model, saved, recipe, dataset
