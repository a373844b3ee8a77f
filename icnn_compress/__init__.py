"""icnn-compress: interpretable CNN fine-tuning (Zhang, Wu, Zhu, CVPR 2018), filter analysis, pruning, export.

The public API. The method's pieces (mask, filter loss, κ pilot, measures) and the model and run helpers are
imported here; the stages (``finetune``, ``evaluate_run``, ``analyze_run``, ``prune_run``, ``export_onnx``,
``compare_run``, ``run_pipeline``) are resolved on first use, so that ``import icnn_compress`` does not import
captum, torch-pruning or onnx. How the package is laid out: README, "How the code is laid out".
"""

from __future__ import annotations

import importlib
from typing import Any

from icnn_compress.config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_toml
from icnn_compress.data import CubDataset, ImageFolderDataset, generate_fashion_canvas, generate_parts_dataset
from icnn_compress.errors import (
    CheckpointError,
    CompareError,
    DatasetError,
    ExportError,
    ICNNError,
    ModelError,
    ParityError,
    PruningError,
    RecipeError,
    RunFolderError,
    TrainingError,
    UntrustedCodeError,
    VerifyError,
)
from icnn_compress.evaluate import evaluate_run  # before the next line: the name `evaluate` is the function
from icnn_compress.method.evaluation import evaluate
from icnn_compress.method.kappa import CollapseGuard, calibrate_kappa
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.loss import mutual_information_loss, reference_gradient
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.method.metrics import location_instability
from icnn_compress.method.protocol import PROTOCOLS, MeasurePoint, measure_points
from icnn_compress.method.receptive_field import LayerGeometry, layer_geometry
from icnn_compress.models.state_dict import read_state_dict
from icnn_compress.models.registry import ARCHITECTURES, BUILDER_ENTRY_POINTS, build_base_model
from icnn_compress.models.surgery import build_model, interpretable_layers, make_interpretable
from icnn_compress.runs.model_file import load_model_file, save_model_file
from icnn_compress.runs.open import load_run_model, open_run

# Stage functions, each imported from its module on first access (PEP 562).
_STAGES = {
    "analyze_run": "icnn_compress.analyze",
    "calibrate": "icnn_compress.train",
    "compare_run": "icnn_compress.compare",
    "export_onnx": "icnn_compress.export",
    "finetune": "icnn_compress.train",
    "pretrain": "icnn_compress.train",
    "prune_run": "icnn_compress.prune",
    "run_pipeline": "icnn_compress.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        value = getattr(importlib.import_module(_STAGES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'icnn_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ARCHITECTURES",
    "BUILDER_ENTRY_POINTS",
    "CheckpointError",
    "CollapseGuard",
    "CompareError",
    "CubDataset",
    "DatasetError",
    "ExportError",
    "FilterLoss",
    "ICNNError",
    "ImageFolderDataset",
    "InterpretableMask",
    "LayerGeometry",
    "MeasurePoint",
    "ModelError",
    "PROTOCOLS",
    "ParityError",
    "PruningError",
    "Recipe",
    "RecipeError",
    "RunFolderError",
    "TrainingError",
    "UntrustedCodeError",
    "VerifyError",
    "analyze_run",
    "build_base_model",
    "build_model",
    "calibrate",
    "calibrate_kappa",
    "compare_run",
    "evaluate",
    "evaluate_run",
    "export_onnx",
    "finetune",
    "generate_fashion_canvas",
    "generate_parts_dataset",
    "interpretable_layers",
    "layer_geometry",
    "load_model_file",
    "load_recipe",
    "load_run_model",
    "location_instability",
    "make_interpretable",
    "measure_points",
    "mutual_information_loss",
    "open_run",
    "pretrain",
    "prune_run",
    "read_state_dict",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "reference_gradient",
    "run_pipeline",
    "save_model_file",
]
