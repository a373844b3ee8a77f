"""The whole job on one recipe: data, plain checkpoint, the three arms, evaluation, a side-by-side table.

Each stage writes into its own folder under ``out`` and is skipped when its result is already there,
so an interrupted pipeline is resumed by running it again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from icnn_compress.runs.model_file import load_model_file
from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.config import Recipe
from icnn_compress.data.recipe import ensure_dataset
from icnn_compress.evaluate import evaluate_run
from icnn_compress.train import ARMS, finetune, pretrain

__all__ = ["format_table", "run_pipeline"]

log = logging.getLogger(__name__)

# The pipeline's comparison is a small one (minutes on 2 cores); `icnn compare` runs the full set.
DEMO_COMPARE_IMAGES = 16
DEMO_COMPARE_METHODS = ("icnn", "gradcam", "guided_gradcam", "smoothgrad", "conductance")


def _with_checkpoint(recipe: Recipe, checkpoint: Path) -> Recipe:
    return replace(recipe, model=replace(recipe.model, checkpoint=str(checkpoint)))


def run_pipeline(recipe: Recipe, out: str | Path, *, arms: tuple[str, ...] = ("baseline", "masks-only", "icnn"),
                 progress: bool = True, trust_code: bool = False) -> dict:
    """Run every stage of ``recipe`` into ``out``; return ``{arm: evaluation}`` (also ``out/summary.json``).

    The stages read the runs' model files back trusting the builder the recipe names (the user chose it) while
    every model file already in ``out`` names it too; ``trust_code`` trusts any builder, as in
    :func:`~icnn_compress.runs.open.load_run_model`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trust = trust_code or _recipe_builder_only(recipe, out, (*arms, "pruned"))
    ensure_dataset(recipe.data, progress=progress)
    if recipe.pretrain.epochs > 0:
        plain = out / "plain" / "model.pth"
        if not plain.exists():
            log.info("stage: plain training (%d epochs)", recipe.pretrain.epochs)
            resume = (plain.parent / "last.pt").exists()  # else an unfinished stage of this pipeline: redone
            pretrain(recipe, plain.parent, resume=resume, force=not resume, progress=progress)
        recipe = _with_checkpoint(recipe, plain)
    results = {}
    for arm in arms:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
        run = out / arm
        if not (run / "model.pt").exists():
            log.info("stage: fine-tune %s", arm)
            resume = (run / "last.pt").exists()
            finetune(recipe, run, arm=arm, resume=resume, force=not resume, progress=progress)
        results[arm] = _evaluated(run, progress, trust)
    if {"icnn", "baseline"} <= set(results):
        _analyse(out, progress, trust)
        results["pruned"] = _prune_and_export(recipe, out, progress, trust)
    atomic_write_text(out / "summary.json", json.dumps(results, indent=2))
    return results


def _recipe_builder_only(recipe: Recipe, out: Path, runs: tuple[str, ...]) -> bool:
    """Whether the recipe names a ``"module:builder"`` and every model file of ``runs`` already in ``out`` names
    the same: a stage skips a run whose ``model.pt`` exists, so such a file may come from elsewhere."""
    arch = recipe.model.arch
    files = [out / run / "model.pt" for run in runs if (out / run / "model.pt").exists()]
    return ":" in arch and all(load_model_file(path)["architecture"].get("arch") == arch for path in files)


def _prune_and_export(recipe: Recipe, out: Path, progress: bool, trust: bool) -> dict:
    """Prune the ICNN run as the recipe's ``[prune]`` section says, recover, export and check parity."""
    from icnn_compress.export import export_onnx
    from icnn_compress.prune import prune_run

    from icnn_compress.analyze import analyze_run

    pruned = out / "pruned"
    if not (pruned / "pruning.json").exists():  # written last by prune_run
        # pruning chooses filters: it reads the validation split, never the test split the tables report
        chooser = out / "icnn" / "analysis-val"
        if not (chooser / "analysis.json").exists():
            log.info("stage: analyse icnn on the validation split (for pruning)")
            analyze_run(out / "icnn", out=chooser, split="val", gallery=False, progress=progress, trust_code=trust)
        settings = recipe.prune
        log.info("stage: prune to %s MACs (%s criterion, round_to %d) and recover %d epochs in %d round(s)",
                 settings.target_macs, settings.criterion, settings.round_to, settings.recover_epochs, settings.steps)
        # the settings are passed, not left to the icnn run's stored recipe: a rerun with --set prune.* uses them
        prune_run(out / "icnn", out=pruned, analysis=chooser, target_macs=settings.target_macs,
                  criterion=settings.criterion, round_to=settings.round_to, floor=settings.floor,
                  recover_epochs=settings.recover_epochs, steps=settings.steps,
                  resume=(pruned / "history.json").exists(),
                  progress=progress, trust_code=trust)
    if not _exported(pruned / "model.onnx", pruned / "parity.json"):
        log.info("stage: ONNX export and parity")
        export_onnx(pruned, pruned / "model.onnx", parity_json=pruned / "parity.json", trust_code=trust)
    return _evaluated(pruned, progress, trust)


def _exported(onnx: Path, parity: Path) -> bool:
    """Whether ``parity`` records a passed check of exactly the bytes of ``onnx`` (its sha256).

    A failed check writes parity.json too, and a kill or an edit can change model.onnx after a passed one:
    neither ends the export stage.
    """
    from icnn_compress.export import VerifyError, verify_export

    try:
        verify_export(onnx, parity_json=parity)
    except VerifyError as exc:
        log.info("the export is not done: %s", exc)
        return False
    return True


def _evaluated(run: Path, progress: bool, trust: bool) -> dict:
    """The run's test-split evaluation: the saved ``evaluate.json`` unless ``model.pt`` is newer or it was made
    on other data (``icnn evaluate --data ... --json`` into the same file)."""
    saved = run / "evaluate.json"
    if saved.exists() and saved.stat().st_mtime_ns >= (run / "model.pt").stat().st_mtime_ns:
        result = json.loads(saved.read_text())
        # a file from before evaluations named their data has no "data_root": evaluated again, once
        if result.get("split") == "test" and "data_root" in result and result["data_root"] is None:
            return result
    log.info("stage: evaluate %s", run.name)
    return evaluate_run(run, split="test", json_path=saved, progress=progress, trust_code=trust)


def _analyse(out: Path, progress: bool, trust: bool) -> None:
    """Per-filter analysis of the baseline and the ICNN run, and their side-by-side report."""
    from icnn_compress.analyze import analyze_run
    from icnn_compress.report import render_analysis, report

    for arm in ("baseline", "icnn"):
        folder = out / arm / "analysis"
        if not (folder / "report.html").exists():
            log.info("stage: analyse %s", arm)
            analyze_run(out / arm, out=folder, progress=progress, trust_code=trust)
            render_analysis(folder, baseline=None if arm == "baseline" else out / "baseline" / "analysis")
    from icnn_compress.compare import compare_html_section, compare_run

    if not (out / "compare" / "compare.json").exists():
        log.info("stage: compare explainers (small: %d images)", DEMO_COMPARE_IMAGES)
        compare_run(out / "icnn", baseline_run=out / "baseline", out=out / "compare", limit=DEMO_COMPARE_IMAGES,
                    methods=DEMO_COMPARE_METHODS, progress=progress, trust_code=trust)
    report([out / "icnn" / "analysis", out / "baseline" / "analysis"], out / "report",
           extra_sections=[("", compare_html_section(out / "compare"))])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value:.4f} ({value / base:.2f})"


def format_table(results: dict) -> str:
    """A plain-text table of the arms side by side: accuracy and per-layer instability (× baseline)."""
    base = results.get("baseline")
    layers = list(next(iter(results.values()))["layers"])
    head = ["arm", "acc %", "kappa0"] + [f"instab. {name}" for name in layers] + ["dead"]
    rows = [head]
    for arm, res in results.items():
        cells = [arm, f"{res['accuracy'] * 100:.2f}", f"{res.get('kappa0', 0.0):.3g}"]
        for name in layers:
            value = res["layers"][name]["location_instability"]
            ref = base["layers"][name]["location_instability"] if base else None
            cells.append(_ratio(value, ref))
        cells.append("/".join(str(res["layers"][n].get("dead", "-")) for n in layers))
        rows.append(cells)
    ref = results[next(iter(results))]["layers"][layers[0]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if ref.get("random_reference") is None and ref.get("location_instability") is None:
        lines.append("the data has no landmarks: location instability was skipped (-); data.keypoints adds them "
                     "to class folders")
    else:
        lines.append(
            f"references at {layers[0]}: random peak {_number(ref.get('random_reference'))}, "
            f"oracle landmark {_number(ref.get('oracle_reference'))} (lower is better; ratios × baseline)"
        )
    return "\n".join(lines)
