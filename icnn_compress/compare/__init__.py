"""Attribution baselines: the ICNN's own filter maps and Captum's methods on the same measures.

Users choosing between "make the filters interpretable" (Zhang, Wu, Zhu, CVPR 2018,
https://arxiv.org/abs/1710.00935) and "explain the unchanged model after the fact" (Captum,
https://captum.ai) need both judged on the same images: part localisation against landmarks (pointing
game, peak-distance spread), faithfulness (deletion / insertion AUC, Captum's ``infidelity`` and
``sensitivity_max``), and time per image. :func:`compare_run` does it for a run and its baseline (or, for a
pruned model, its unpruned parent: :func:`explanation_drift` says how far each explainer's maps moved) and
writes ``compare.json``, ``compare.md`` and ``compare.jpg``; :func:`compare_html_section` puts them in a
report.
"""

from icnn_compress.errors import CompareError

from ._compare import DEFAULT_METHODS, Comparison, compare, explanation_drift
from ._explainers import EXPLAINERS, REFERENCE_EXPLAINERS, Explainer, IcnnMaps, build_explainers
from ._measures import (
    conductance_exclusivity,
    curve_auc,
    map_peaks,
    map_rank_correlation,
    peak_distance_spread,
    perturbation_curves,
    pixel_ranks,
    pointing_game,
    upsample_to_input,
)
from ._present import compare_html_section, format_compare_table, format_drift_table, plot_grid
from ._run import compare_run
from ._settings import TARGETS, CompareSettings

__all__ = [
    "DEFAULT_METHODS",
    "EXPLAINERS",
    "REFERENCE_EXPLAINERS",
    "TARGETS",
    "CompareError",
    "CompareSettings",
    "Comparison",
    "Explainer",
    "IcnnMaps",
    "build_explainers",
    "compare",
    "compare_html_section",
    "compare_run",
    "conductance_exclusivity",
    "curve_auc",
    "explanation_drift",
    "format_compare_table",
    "format_drift_table",
    "map_peaks",
    "map_rank_correlation",
    "peak_distance_spread",
    "perturbation_curves",
    "pixel_ranks",
    "plot_grid",
    "pointing_game",
    "upsample_to_input",
]
