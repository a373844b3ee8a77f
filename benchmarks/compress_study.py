"""Two pipelines from one checkpoint, same epoch budget: plain fine-tune + L1/Taylor/FPGM/random pruning against
fine-tune with the filter loss + pruning of the silent and redundant filters, over training seeds.

    python benchmarks/compress_study.py recipes/quickstart.toml --out runs/q/study --seeds 0 1 2
        [--checkpoint runs/q/plain/model.pth] [--targets 0.7 0.5 0.3]
        [--baseline-criteria l1 taylor fpgm random] [--icnn-criteria icnn icnn-l1] [--steps 1 3]
        [--steps-targets 0.5] [--steps-criteria l1 icnn]
        [--auto] [--count-arms baseline masks-only icnn] [--recover-epochs R] [--drift-images 32]
        [--no-latency] [--no-drift] [--no-interpretability] [--set SECTION.KEY=VALUE ...]

Per training seed ``s`` (``train.seed``), from the same checkpoint (the recipe's, or ``--checkpoint``):

* the **baseline pipeline** fine-tunes plainly (``icnn finetune --baseline``: the same architecture with its
  masks inactive and no filter loss) and prunes with each of ``--baseline-criteria``;
* the **ICNN pipeline** fine-tunes with the filter loss and prunes with each of ``--icnn-criteria`` (the
  silent filters, then the non-best members of each redundancy cluster, then by exclusivity or L1), reading the
  run's analysis on the validation split (never the test split the tables report).

Both pipelines fine-tune ``train.epochs`` and recover ``--recover-epochs`` (default: the recipe's
``prune.recover_epochs``) after pruning: the same total epoch budget. ``--steps N`` adds iterative pruning (N
rounds of prune + recovery sharing the same recovery epochs) beside one-shot, at every target and criterion or
only at ``--steps-targets`` / for ``--steps-criteria``. ``--auto`` adds ``icnn prune
--target-macs auto`` on the ICNN arm (exactly the flagged filters, then the same recovery).

For every pruned model: test accuracy after recovery, MACs ratio, ONNX Runtime CPU latency against its
unpruned parent (interleaved in one process, batch 32), the top masked layer's exclusivity, location
instability and silent / redundant counts (analysis on the test split), and the explanation drift against the
parent (``icnn compare --parent``: rank correlation of the icnn maps and of Grad-CAM, pointing game before and
after) on ``--drift-images`` test images. For every arm of ``--count-arms`` (default baseline and icnn): how
many filters its analysis marks silent or redundant per masked layer, and the MACs that removing exactly
those saves (``target_macs = "auto"`` without recovery).

Writes into ``--out``: ``<arm>-s<seed>/`` (each fine-tuned run, its ``analysis-val/`` and its pruned cells
``prune/<criterion>_<target>[_k<steps>]/`` with ``measures.json``), ``compress_study.json``,
``compress_study.md`` and ``compress_study.png`` (accuracy vs MACs with standard-error bars, one line per
pipeline). Every finished cell is reused, so the study resumes where it stopped and a later call with more
seeds, targets or criteria only runs what is missing; the tables are rewritten from every finished cell.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
from pathlib import Path

from _cells import analysis_cell, finetune_cell, interpretability, mean_se, paired, prune_cell
from _timing import interleaved

from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.config import load_recipe
from icnn_compress.data.recipe import ensure_dataset

log = logging.getLogger("compress_study")

BASELINE_CRITERIA = ("l1", "taylor", "fpgm", "random")
ICNN_CRITERIA = ("icnn", "icnn-l1")
PIPELINE_ARM = {"baseline": "baseline", "icnn": "icnn"}
DRIFT_METHODS = ("icnn", "gradcam")


def _cell_name(criterion: str, target: float | str, steps: int) -> str:
    return f"{criterion}_{target if isinstance(target, str) else f'{target:g}'}" + (f"_k{steps}" if steps > 1 else "")


# ------------------------------------------------------------------------------------------------
# measurements of one pruned cell (each cached in the cell's measures.json)


def _latency(parent: Path, pruned: Path, cell: Path, batch: int, rounds: int) -> dict:
    """ONNX Runtime CPU latency of the pruned model and its parent, interleaved in this process (batch ``batch``)."""
    import numpy as np

    from icnn_compress.export import export_onnx, ort_session

    files = {}
    for name, run, where in (("parent", parent, parent / "onnx"), ("pruned", pruned, cell / "onnx")):
        onnx = where / "model.onnx"
        if not onnx.is_file():
            with contextlib.redirect_stdout(io.StringIO()):
                export_onnx(run, onnx, parity_json=where / "parity.json", trust_code=True)
        files[name] = onnx
    sessions = {n: ort_session(p, provider=["CPUExecutionProvider"]) for n, p in files.items()}
    size = sessions["parent"].get_inputs()[0].shape[-1]
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    fns = {n: (lambda s=s: s.run(None, {s.get_inputs()[0].name: images})) for n, s in sessions.items()}
    import torch

    median = interleaved(fns, rounds, torch.device("cpu"))
    return {"batch": batch, "rounds": rounds, "parent_ms": 1e3 * median["parent"],
            "pruned_ms": 1e3 * median["pruned"], "speedup": median["parent"] / median["pruned"]}


def _drift(parent: Path, pruned: Path, cell: Path, images: int) -> dict:
    from icnn_compress.compare import CompareSettings, compare_run

    path = cell / "drift" / "compare.json"
    if not path.is_file():
        compare_run(pruned, parent_run=parent, out=cell / "drift", limit=images, methods=DRIFT_METHODS,
                    settings=CompareSettings(robust_images=0, steps=4), device="cpu", figure_images=2,
                    trust_code=True)
    return json.loads(path.read_text())["drift"]


def measure(parent: Path, cell: Path, args: argparse.Namespace) -> dict:
    """Everything the tables report about one pruned cell, computed once into ``cell/measures.json``."""
    path = cell / "measures.json"
    got = json.loads(path.read_text()) if path.is_file() else {}
    record = json.loads((cell / "pruning.json").read_text())
    changed = False
    if "accuracy" not in got:  # measures.json keeps percent; pruning.json holds fractions
        acc = record["accuracy_recovered"] if record["accuracy_recovered"] is not None else record["accuracy_pruned"]
        got.update(accuracy=100 * acc, accuracy_pruned=100 * record["accuracy_pruned"],
                   accuracy_unpruned=100 * record["accuracy_unpruned"], macs_ratio=record["macs_ratio"],
                   params_ratio=record["params"] / record["base_params"], auto=record.get("auto"),
                   recover_epochs=record["recover_epochs"], steps=record.get("steps", 1))
        changed = True
    if args.interpretability and "layers" not in got:
        got["layers"] = interpretability(cell, cell / "analysis-test", trust_code=True)
        changed = True
    if args.latency and "latency" not in got:
        got["latency"] = _latency(parent, cell, cell, args.latency_batch, args.latency_rounds)
        changed = True
    if args.drift and "drift" not in got:
        got["drift"] = _drift(parent, cell, cell, args.drift_images)
        changed = True
    if changed:
        atomic_write_text(path, json.dumps(got, indent=1))
    return got


# ------------------------------------------------------------------------------------------------
# the study


def _counts(run: Path, analysis: Path, seed: int) -> dict:
    """Silent / redundant filters per masked layer of ``run`` and the MACs ratio without exactly those."""
    record = prune_cell(run, run / "prune" / "auto_count", analysis=analysis, target_macs="auto", criterion="icnn",
                        recover_epochs=0, steps=1, seed=seed, device="cpu", progress=False, trust_code=True)
    return {"macs_ratio": record["macs_ratio"], "accuracy_unpruned": 100 * record["accuracy_unpruned"],
            "accuracy_pruned": 100 * record["accuracy_pruned"], "layers": record["auto"]["layers"],
            "thresholds": record["auto"]["thresholds"]}


def run_study(args: argparse.Namespace) -> dict:
    """Run (or reuse) every cell the arguments ask for; return ``{"cells", "counts", "recover", "epochs"}``."""
    sets = list(args.set) + ([f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    recipe = load_recipe(args.recipe, sets)
    ensure_dataset(recipe.data)  # once, before runs that would each generate it at the same time
    recover = recipe.prune.recover_epochs if args.recover_epochs is None else args.recover_epochs
    cells: list[dict] = []
    counts: list[dict] = []
    plan = [(p, c) for p, crits in (("baseline", args.baseline_criteria), ("icnn", args.icnn_criteria)) for c in crits]
    arms = list(dict.fromkeys(["baseline", "icnn", *args.count_arms]))
    for seed in args.seeds:  # all of one seed first: a study stopped early still pairs its finished seeds
        runs = {arm: finetune_cell(args.recipe, args.out / f"{arm}-s{seed}", arm, seed, sets) for arm in arms}
        analyses = {arm: analysis_cell(run, run / "analysis-val", split="val", trust_code=True)
                    for arm, run in runs.items()}
        for arm in args.count_arms:
            counts.append({"arm": arm, "seed": seed, **_counts(runs[arm], analyses[arm], seed)})
        jobs = [(p, c, t, k) for t in args.targets for k in args.steps for p, c in plan
                if k == 1 or ((args.steps_targets is None or t in args.steps_targets)
                              and (args.steps_criteria is None or c in args.steps_criteria))]
        jobs += [("icnn", "icnn", "auto", 1)] if args.auto else []
        for pipeline, criterion, target, steps in jobs:
            parent = runs[PIPELINE_ARM[pipeline]]
            cell = parent / "prune" / _cell_name(criterion, target, steps)
            prune_cell(parent, cell, analysis=analyses[pipeline] if criterion.startswith("icnn") else None,
                       target_macs=target, criterion=criterion, recover_epochs=recover, steps=steps, seed=seed,
                       device="cpu", progress=False, trust_code=True)
            got = measure(parent, cell, args)
            cells.append({"pipeline": pipeline, "criterion": criterion, "target": target, "steps": steps,
                          "seed": seed, "dir": str(cell), **got})
            log.info("%s %s @ %s (steps %d, seed %d): MACs %.3f, accuracy %.2f", pipeline, criterion, target, steps,
                     seed, got["macs_ratio"], got["accuracy"])
            write_outputs(args, cells, counts, recover, recipe.train.epochs)  # partial tables as cells finish
    return {"cells": cells, "counts": counts, "recover": recover, "epochs": recipe.train.epochs}


# ------------------------------------------------------------------------------------------------
# tables and the plot


def _pm(mean: float, se: float, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _by_seed(cells: list[dict], pipeline: str, criterion: str, target, steps: int, key=lambda c: c["accuracy"]):
    return {c["seed"]: key(c) for c in cells if (c["pipeline"], c["criterion"], c["target"], c["steps"])
            == (pipeline, criterion, target, steps)}


def accuracy_table(cells: list[dict], targets: list, steps_list: list[int]) -> tuple[str, dict]:
    """Mean accuracy ± s.e. per pipeline and target, and the ICNN pipelines against the best baseline, paired."""
    pipes = list(dict.fromkeys((c["pipeline"], c["criterion"], c["steps"]) for c in cells if c["target"] != "auto"))
    lines = ["| pipeline | criterion | steps | " + " | ".join(f"MACs {t:g}" for t in targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    for p, c, k in pipes:
        row = []
        for t in targets:
            acc = _by_seed(cells, p, c, t, k)
            macs = _by_seed(cells, p, c, t, k, key=lambda x: x["macs_ratio"])
            m, se = mean_se(list(acc.values()))
            row.append("-" if not acc else f"{_pm(m, se)} (n={len(acc)}, MACs {mean_se(list(macs.values()))[0]:.3f})")
        lines.append(f"| {p} | {c} | {k} | " + " | ".join(row) + " |")
    verdicts: dict = {}
    lines += ["", "ICNN pipeline minus the best baseline pipeline at the same target (the baseline criterion with "
                  "the highest mean; accuracy points, paired by seed, mean ± s.e., worst seed):", "",
              "| target | steps | best baseline | ICNN criterion | Δ accuracy | seeds |", "|---|---|---|---|---|---|"]
    for t in targets:
        for k in steps_list:
            base = {c: _by_seed(cells, "baseline", c, t, k) for p, c, kk in pipes if p == "baseline" and kk == k}
            base = {c: v for c, v in base.items() if v}
            if not base:
                continue
            best = max(base, key=lambda c: mean_se(list(base[c].values()))[0])
            for p, c, kk in pipes:
                if p != "icnn" or kk != k:
                    continue
                d = paired(_by_seed(cells, "icnn", c, t, k), base[best])
                if not d["seeds"]:
                    continue
                verdicts[f"{t:g}/{c}/k{k}"] = {"best_baseline": best, **d}
                lines.append(f"| {t:g} | {k} | {best} | {c} | {d['mean']:+.2f} ± {d['se']:.2f} "
                             f"(worst {d['worst']:+.2f}) | {len(d['seeds'])} |")
    return "\n".join(lines), verdicts


def _layer_mean(cs: list[dict], key: str) -> tuple[float, float]:
    values = []
    for c in cs:
        if c.get("layers"):
            layer = next(iter(c["layers"].values()))  # the top masked layer
            values.append(layer.get(key))
    return mean_se([v for v in values if v is not None])


def measures_table(cells: list[dict]) -> str:
    """Per pipeline, criterion, target and steps: MACs, latency, interpretability and drift, means over seeds."""
    groups = list(dict.fromkeys((c["pipeline"], c["criterion"], c["target"], c["steps"]) for c in cells))
    head = ["pipeline", "criterion", "target", "steps", "n", "accuracy %", "MACs", "ORT speedup",
            "exclusivity", "instability", "silent", "redundant", "icnn maps ρ", "Grad-CAM ρ",
            "pointing (icnn) parent → pruned", "pointing (Grad-CAM) parent → pruned"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cs = [c for c in cells if (c["pipeline"], c["criterion"], c["target"], c["steps"]) == g]
        acc = mean_se([c["accuracy"] for c in cs])
        macs = mean_se([c["macs_ratio"] for c in cs])[0]
        speed = mean_se([c["latency"]["speedup"] for c in cs if c.get("latency")])
        drift = {m: mean_se([c["drift"][m].get("rank_correlation") for c in cs if m in (c.get("drift") or {})])
                 for m in DRIFT_METHODS}

        def pointing(m: str) -> str:
            rows = [c["drift"][m] for c in cs if c.get("drift") and m in c["drift"]]
            before = mean_se([r.get("pointing_game_parent") for r in rows])[0]
            after = mean_se([r.get("pointing_game") for r in rows])[0]
            return "-" if not rows or not math.isfinite(before) else f"{before:.2f} → {after:.2f}"

        lines.append("| " + " | ".join([
            g[0], g[1], g[2] if isinstance(g[2], str) else f"{g[2]:g}", str(g[3]), str(len(cs)), _pm(*acc),
            f"{macs:.3f}", _pm(*speed), _pm(*_layer_mean(cs, "mean_exclusivity"), 3),
            _pm(*_layer_mean(cs, "location_instability"), 4), _pm(*_layer_mean(cs, "num_silent"), 1),
            _pm(*_layer_mean(cs, "num_redundant"), 1), _pm(*drift["icnn"], 3), _pm(*drift["gradcam"], 3),
            pointing("icnn"), pointing("gradcam")]) + " |")
    return "\n".join(lines)


def counts_table(counts: list[dict]) -> str:
    """Per arm and masked layer: filters flagged silent / redundant (mean over seeds) and the MACs saved."""
    lines = ["| arm | layer | filters | silent | redundant | flagged | MACs without them | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(c["arm"] for c in counts):
        cs = [c for c in counts if c["arm"] == arm]
        for layer in cs[0]["layers"]:
            f = {k: mean_se([c["layers"][layer][k] for c in cs]) for k in ("silent", "redundant", "flagged")}
            lines.append(f"| {arm} | {layer} | {cs[0]['layers'][layer]['num_filters']} | {_pm(*f['silent'], 1)} | "
                         f"{_pm(*f['redundant'], 1)} | {_pm(*f['flagged'], 1)} | "
                         f"{_pm(*mean_se([c['macs_ratio'] for c in cs]), 3)} | {len(cs)} |")
    t = counts[0]["thresholds"] if counts else {}
    lines += ["", f"Thresholds (analysis on the {t.get('split')} split): silent = fires (peak > "
                  f"{t.get('silent_threshold')}) on fewer than {t.get('silent_fraction')} of the images; redundant ="
                  f" min(peak, map correlation) ≥ {t.get('redundancy_threshold')} with a filter of the same cluster "
                  "that is kept (the cluster's best). MACs: the model with exactly those filters removed, over the "
                  "unpruned one."]
    return "\n".join(lines)


def auto_table(cells: list[dict]) -> str:
    """``--target-macs auto`` on the ICNN arm: the MACs reached and the accuracy change after recovery, per seed."""
    rows = [c for c in cells if c["target"] == "auto"]
    lines = ["| seed | MACs | removed filters (per layer) | unpruned % | pruned % | recovered % | Δ |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(rows, key=lambda c: c["seed"]):
        removed = ", ".join(f"{n}: {v['removed']}/{v['num_filters']}" for n, v in (c.get("auto") or {}).get(
            "layers", {}).items())
        change = c["accuracy"] - c["accuracy_unpruned"]
        lines.append(f"| {c['seed']} | {c['macs_ratio']:.3f} | {removed} | {c['accuracy_unpruned']:.2f} | "
                     f"{c['accuracy_pruned']:.2f} | {c['accuracy']:.2f} | {change:+.2f} |")
    if rows:
        d = mean_se([c["accuracy"] - c["accuracy_unpruned"] for c in rows])
        m = mean_se([c["macs_ratio"] for c in rows])
        lines += ["", f"Mean over {len(rows)} seed(s): MACs {_pm(*m, 3)}, accuracy change {_pm(*d)} points (recovered "
                      "minus unpruned: the recovery epochs also train, so 'pruned %' is the removal's own cost)."]
    return "\n".join(lines)


def plot(cells: list[dict], unpruned: dict, path: Path) -> None:
    """Accuracy vs MACs ratio, mean ± s.e. over seeds, one line per pipeline (arm, criterion, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pipes = list(dict.fromkeys((c["pipeline"], c["criterion"], c["steps"]) for c in cells if c["target"] != "auto"))
    for p, crit, k in pipes:
        targets = sorted({c["target"] for c in cells if (c["pipeline"], c["criterion"], c["steps"]) == (p, crit, k)
                          and c["target"] != "auto"})
        xs, ys, es = [], [], []
        for t in targets:
            cs = [c for c in cells if (c["pipeline"], c["criterion"], c["steps"], c["target"]) == (p, crit, k, t)]
            xs.append(mean_se([c["macs_ratio"] for c in cs])[0])
            m, se = mean_se([c["accuracy"] for c in cs])
            ys.append(m)
            es.append(se if math.isfinite(se) else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o" if p == "icnn" else "s", capsize=3,
                    linestyle="-" if p == "icnn" else "--", label=f"{p}: {crit}" + (f" ×{k}" if k > 1 else ""))
    auto = [c for c in cells if c["target"] == "auto"]
    if auto:
        m, se = mean_se([c["accuracy"] for c in auto])
        ax.errorbar([mean_se([c["macs_ratio"] for c in auto])[0]], [m], yerr=[se if math.isfinite(se) else 0.0],
                    marker="*", markersize=12, linestyle="none", capsize=3, label="icnn: auto")
    for arm, acc in unpruned.items():
        ax.axhline(acc, linestyle=":", linewidth=1, color="k" if arm == "icnn" else "grey",
                   label=f"unpruned {arm} (mean)")
    ax.set_xlabel("MACs (fraction of the unpruned model)")
    ax.set_ylabel("test accuracy after recovery (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, cells: list[dict], counts: list[dict], recover: int, epochs: int) -> str:
    """Rewrite compress_study.{md,json,png} from the finished cells; return the markdown."""
    targets = [t for t in args.targets if any(c["target"] == t for c in cells)]
    acc_md, verdicts = accuracy_table(cells, targets, args.steps)
    unpruned = {arm: mean_se([c["accuracy_unpruned"] for c in cells if PIPELINE_ARM[c["pipeline"]] == arm])[0]
                for arm in dict.fromkeys(PIPELINE_ARM[c["pipeline"]] for c in cells)}
    seeds = sorted({c["seed"] for c in cells})
    md = [f"# Compression study: {args.recipe}", "",
          f"Both pipelines fine-tune {epochs} epochs from the same checkpoint, then recover {recover} epoch(s) after "
          f"pruning. Training seeds {seeds}. Test accuracy (%) after recovery, mean ± s.e. over seeds; unpruned: "
          + ", ".join(f"{a} {v:.2f}" for a, v in unpruned.items()) + ".", "", acc_md, "",
          "## Every pruned model (means over seeds)", "",
          "ORT speedup: ONNX Runtime CPU latency of the unpruned parent over the pruned model's, batch "
          f"{args.latency_batch}, interleaved in one process on this (shared) machine. exclusivity, instability, "
          "silent, redundant: the top masked layer after recovery, analysed on the test split. ρ: Spearman rank "
          "correlation between the parent's and the pruned model's map of the same test image "
          f"({args.drift_images} images); pointing: the pointing game of those maps.", "",
          measures_table(cells)]
    if counts:
        md += ["", "## Silent and redundant filters per arm (the seed's hypothesis)", "", counts_table(counts)]
    if any(c["target"] == "auto" for c in cells):
        md += ["", "## `--target-macs auto` on the ICNN arm", "", auto_table(cells)]
    text = "\n".join(md) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "compress_study.md", text)
    atomic_write_text(args.out / "compress_study.json", json.dumps(
        {"recipe": str(args.recipe), "recover_epochs": recover, "finetune_epochs": epochs, "cells": cells,
         "counts": counts, "paired": verdicts, "unpruned": unpruned}, indent=1, default=str))
    if cells:
        plot(cells, unpruned, args.out / "compress_study.png")
    return text


def _target(text: str) -> float | str:
    return text if text == "auto" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (train.seed)")
    parser.add_argument("--checkpoint", default=None, help="the plain checkpoint both pipelines start from "
                                                           "(model.checkpoint; e.g. icnn pretrain's model.pth)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--baseline-criteria", nargs="*", default=list(BASELINE_CRITERIA), choices=BASELINE_CRITERIA)
    parser.add_argument("--icnn-criteria", nargs="*", default=list(ICNN_CRITERIA), choices=ICNN_CRITERIA)
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="prune.steps values: 1 = one-shot")
    parser.add_argument("--steps-targets", type=float, nargs="+", default=None,
                        help="run the iterative (steps > 1) cells only at these targets (default: every target)")
    parser.add_argument("--steps-criteria", nargs="+", default=None,
                        help="run the iterative cells only for these criteria (default: every criterion)")
    parser.add_argument("--auto", action="store_true", help="also --target-macs auto on the ICNN arm")
    parser.add_argument("--count-arms", nargs="*", default=["baseline", "icnn"],
                        choices=["baseline", "masks-only", "icnn"],
                        help="arms whose silent / redundant filters are counted (masks-only costs a fine-tune)")
    parser.add_argument("--recover-epochs", type=int, default=None, help="default: the recipe's prune.recover_epochs")
    parser.add_argument("--drift-images", type=int, default=32)
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--latency-rounds", type=int, default=20)
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--no-drift", dest="drift", action="store_false")
    parser.add_argument("--no-interpretability", dest="interpretability", action="store_false")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key in every fine-tune")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("icnn_compress.prune._graph", "icnn_compress.train", "icnn_compress.compare._compare"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.baseline_criteria or not args.icnn_criteria:
        parser.error("each pipeline needs at least one criterion")
    result = run_study(args)
    print(write_outputs(args, result["cells"], result["counts"], result["recover"], result["epochs"]))
    print(f"wrote {args.out / 'compress_study.md'}, {args.out / 'compress_study.png'}")


if __name__ == "__main__":
    main()
