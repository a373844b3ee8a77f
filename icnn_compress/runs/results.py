"""What each stage returns (and writes into the run folder), as ``TypedDict`` s: the keys a caller may rely on.

Every accuracy is a fraction in [0, 1]; a measure that is undefined (no landmarks, a silent filter) is None.
The dicts may hold more keys than listed (per-layer details, settings); these are the stable ones.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["AnalysisResult", "CompareResult", "EpochRecord", "EvaluateResult", "ExportRecord", "PruningRecord"]


class EpochRecord(TypedDict, total=False):
    """One line of ``metrics.jsonl``; :func:`~icnn_compress.train.finetune` returns the last epoch's."""

    stage: str
    arm: str
    epoch: int
    kappa: float
    kappa0: float
    lr: float
    train_loss: float
    train_acc: float
    val_acc: float
    layers: dict[str, dict[str, Any]]
    seconds: float


class EvaluateResult(TypedDict, total=False):
    """``evaluate.json`` (:func:`~icnn_compress.evaluate.evaluate_run`)."""

    accuracy: float | None
    location_instability: float | None
    num_images: int
    protocol: str
    landmarks: list[str]
    layers: dict[str, dict[str, Any]]
    split: str
    data_root: str | None
    run: str
    arm: str | None
    kappa0: float | None
    task: dict[str, Any]


class AnalysisResult(TypedDict, total=False):
    """:func:`~icnn_compress.analyze.analyze_run`'s result; ``analysis.json`` is it without the tensors."""

    summary: dict[str, Any]
    filters: list[dict[str, Any]]
    matrices: dict[str, Any]
    top: dict[str, Any]


class PruningRecord(TypedDict, total=False):
    """``pruning.json`` (:func:`~icnn_compress.prune.prune_run`)."""

    criterion: str
    target_macs: float | str
    macs_ratio: float
    base_macs: int
    macs: int
    base_params: int
    params: int
    accuracy_unpruned: float
    accuracy_pruned: float
    accuracy_recovered: float | None
    recover_epochs: int
    steps: int
    history: dict[str, Any]


class ExportRecord(TypedDict, total=False):
    """``parity.json`` (:func:`~icnn_compress.export.export_onnx`)."""

    onnx: str
    sha256: str
    passed: bool
    int8: dict[str, Any]
    seconds: float


class CompareResult(TypedDict, total=False):
    """``compare.json`` (:func:`~icnn_compress.compare.compare_run`)."""

    models: dict[str, dict[str, Any]]
    methods: list[str]
    split: str
    layer: str
    settings: dict[str, Any]
    drift: dict[str, dict[str, Any]]
