"""The resumable cells the studies are made of, shared by arm_seeds.py, prune_tradeoff.py and compress_study.py.

A cell is a folder that holds one finished piece of work (a fine-tuned run, an analysis, a pruned run) and is
reused when a study runs again; an interrupted cell resumes or restarts. Also the paired statistics over
training seeds every study reports.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("cells")

# the headline measures of one masked layer that the studies tabulate (analysis.json → summary.layers)
MEASURES = ("mean_exclusivity", "location_instability", "part_interpretability", "num_silent", "num_redundant")


def icnn(*args: str) -> None:
    """Run one ``icnn`` command in its own process (a failed run names its log and stops the study)."""
    done = subprocess.run([sys.executable, "-m", "icnn_compress.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"icnn {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def finetune_cell(recipe: Path, run: Path, arm: str, seed: int, sets: Sequence[str] = ()) -> Path:
    """Fine-tune ``arm`` with training seed ``seed`` into ``run`` (resuming an interrupted run); return ``run``."""
    if not (run / "model.pt").is_file():
        args = ["finetune", str(recipe), "--out", str(run), "--set", f"train.seed={seed}"]
        args += [a for s in sets for a in ("--set", s)]
        args += [] if arm == "icnn" else [f"--{arm}"]
        args += ["--resume"] if (run / "last.pt").is_file() else []
        log.info("fine-tune %s seed %d into %s", arm, seed, run)
        icnn(*args)
    return run


def analysis_cell(run: Path, out: Path, *, split: str, trust_code: bool = False) -> Path:
    """``run``'s ``analysis.json`` on ``split``, computed once into ``out``; return its path.

    Pruning decisions read a training-side split (``train`` or ``val``), never the test split a table reports.
    """
    path = out / "analysis.json"
    if not path.is_file():
        from icnn_compress.analyze import analyze_run

        log.info("analysing %s on the %s split", run, split)
        analyze_run(run, out=out, split=split, gallery=False, device="cpu", trust_code=trust_code)
    return path


def interpretability(run: Path, folder: Path, trust_code: bool = False) -> dict:
    """Per masked layer: the analysis' headline measures (:data:`MEASURES`) of ``run`` on the test split
    (cached in ``folder``)."""
    path = analysis_cell(run, folder, split="test", trust_code=trust_code)
    layers = json.loads(path.read_text())["summary"]["layers"]
    return {name: {k: layer.get(k) for k in ("num_filters", *MEASURES)} for name, layer in layers.items()}


def prune_cell(run: Path, cell: Path, **settings) -> dict:
    """``icnn_compress.prune.prune_run(run, out=cell, **settings)`` once: the finished ``pruning.json`` is reused,
    an interrupted recovery resumes."""
    done = cell / "pruning.json"
    if done.is_file():
        return json.loads(done.read_text())
    from icnn_compress.prune import prune_run

    log.info("prune %s -> %s (%s)", run, cell, {k: v for k, v in settings.items() if k != "analysis"})
    return prune_run(run, out=cell, resume=(cell / "last.pt").exists(), **settings)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN with fewer than two values)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """``a − b`` paired by seed: ``{"seeds", "mean", "se", "worst"}`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, se = mean_se(diffs)
    return {"seeds": seeds, "mean": mean, "se": se, "worst": min(diffs) if diffs else math.nan}
