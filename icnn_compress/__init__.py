"""icnn-compress: interpretable CNN fine-tuning (Zhang, Wu, Zhu, CVPR 2018), filter analysis, pruning, export.

The public API, stage by stage (data → surgery → fine-tune → evaluate → analyse → prune → export → compare).
"""

from .checkpoint import load_model_file, read_state_dict, save_model_file
from .config import Recipe, load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_toml
from .data import CubDataset, ImageFolderDataset, generate_fashion_canvas, generate_parts_dataset
from .errors import (
    CheckpointError,
    DatasetError,
    ICNNError,
    ModelError,
    RecipeError,
    TrainingError,
    UntrustedCodeError,
)
from .evaluate import evaluate, evaluate_run
from .kappa import CollapseGuard, calibrate_kappa
from .loss import FilterLoss, mutual_information_loss, reference_gradient
from .mask import InterpretableMask
from .metrics import location_instability
from .pipeline import run_pipeline
from .protocol import PROTOCOLS, MeasurePoint, measure_points
from .receptive_field import LayerGeometry, layer_geometry
from .surgery import (
    ARCHITECTURES,
    BUILDER_ENTRY_POINTS,
    build_base_model,
    build_model,
    interpretable_layers,
    make_interpretable,
)
from .train import calibrate, finetune, load_run_model, pretrain

__all__ = [
    "ARCHITECTURES",
    "BUILDER_ENTRY_POINTS",
    "CheckpointError",
    "CollapseGuard",
    "CubDataset",
    "DatasetError",
    "FilterLoss",
    "ICNNError",
    "ImageFolderDataset",
    "InterpretableMask",
    "LayerGeometry",
    "MeasurePoint",
    "ModelError",
    "PROTOCOLS",
    "Recipe",
    "RecipeError",
    "TrainingError",
    "UntrustedCodeError",
    "build_base_model",
    "build_model",
    "calibrate",
    "calibrate_kappa",
    "evaluate",
    "evaluate_run",
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
    "pretrain",
    "read_state_dict",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "reference_gradient",
    "run_pipeline",
    "save_model_file",
]
