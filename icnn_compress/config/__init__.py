"""Recipe dataclasses, TOML loading and ``--set section.key=value`` overrides.

A recipe is data: every TOML section maps onto one dataclass (``_schema``) and every key onto one field; the
generic parser (``_parse``) maps dicts, TOML and overrides onto them, and a key that does not exist is an
error, never ignored.
"""

from ._parse import load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_toml
from ._schema import (
    CRITERIA,
    GENERATORS,
    OPTIMIZERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    EvalConfig,
    ICNNConfig,
    ModelConfig,
    PretrainConfig,
    PruneConfig,
    Recipe,
    TrainConfig,
)

__all__ = [
    "CRITERIA",
    "GENERATORS",
    "OPTIMIZERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataConfig",
    "EvalConfig",
    "ICNNConfig",
    "ModelConfig",
    "PretrainConfig",
    "PruneConfig",
    "Recipe",
    "TrainConfig",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
]
