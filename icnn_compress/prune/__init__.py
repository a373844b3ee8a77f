"""Interpretability-guided structured pruning on torch-pruning's dependency graph (stage: prune)."""

from icnn_compress.errors import PruningError
from icnn_compress.models.pruned import HISTORY_FORMAT, MaskPruner, apply_pruning_history

from ._graph import classifier_layer, count_macs, prune_model, round_targets
from ._importance import CRITERIA, ICNNImportance, RawFPGMImportance, make_importance, register_criterion
from ._run import prune_run
from ._scores import FilterScores, analysis_settings, flag_counts, icnn_layer_scores, load_filter_scores

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
    "register_criterion",
    "round_targets",
]
