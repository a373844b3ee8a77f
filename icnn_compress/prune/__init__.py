"""Interpretability-guided structured pruning on torch-pruning's dependency graph (stage: prune)."""

from ._graph import HISTORY_FORMAT, apply_pruning_history, classifier_layer, count_macs, prune_model, round_targets
from ._importance import CRITERIA, ICNNImportance, MaskPruner, RawFPGMImportance, make_importance
from ._run import prune_run
from ._scores import (
    FilterScores,
    PruningError,
    analysis_settings,
    flag_counts,
    icnn_layer_scores,
    load_filter_scores,
)

__all__ = [
    "CRITERIA",
    "HISTORY_FORMAT",
    "FilterScores",
    "ICNNImportance",
    "MaskPruner",
    "PruningError",
    "RawFPGMImportance",
    "analysis_settings",
    "apply_pruning_history",
    "classifier_layer",
    "count_macs",
    "flag_counts",
    "icnn_layer_scores",
    "load_filter_scores",
    "make_importance",
    "prune_model",
    "prune_run",
    "round_targets",
]
