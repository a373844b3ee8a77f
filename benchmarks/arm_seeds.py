"""The three arms over several training seeds: paired accuracy gaps and instability ratios, with standard errors.

One pair of runs cannot carry "accuracy within 1 point": on mobilenet_v2_fashion the gap between the ICNN and
the baseline of the same seed moves by about 1.5 points from one training seed to the next, more than the
difference being judged. This study fine-tunes every arm for every seed of a recipe, evaluates each run on a
held-out split (for fashion-canvas recipes the 4000-image split of ``heldout_eval.py``; else the recipe's test
split), and reports each arm against the baseline of the same seed: the mean paired accuracy difference with
its standard error over seeds, and the mean instability ratio per masked layer.

    python benchmarks/arm_seeds.py recipes/mobilenet_v2_fashion.toml --seeds 0 1 2 3 --out runs/arm-seeds
        [--arms baseline masks-only icnn] [--workers N] [--data DIR] [--set SECTION.KEY=VALUE ...]

``--workers`` runs that many fine-tunes at once (worth it on a GPU, where one MobileNetV2 run leaves it mostly
idle; add ``--set data.num_workers=3``). Writes ``<out>/<arm>-s<seed>/`` (each run and its ``heldout.json``),
``arm_seeds.json``, ``arm_seeds.md`` and ``arm_seeds.png``. Evaluated runs are reused and an interrupted run
resumes from its last complete epoch, so the study continues where it stopped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import statistics
from pathlib import Path

from _cells import finetune_cell, icnn, paired
from heldout_eval import heldout_split

from icnn_compress.runtime.files import atomic_write_text
from icnn_compress.config import load_recipe
from icnn_compress.data.recipe import ensure_dataset

log = logging.getLogger("arm_seeds")
ARMS = ("baseline", "masks-only", "icnn")
# What each cell keeps of a layer's evaluation: instability with its references, and how the filters spread
# over the landmarks and parts (instability alone rewards filters that all sit on the object's centre).
LAYER_KEYS = ("location_instability", "oracle_reference", "random_reference", "landmark_tracking", "landmark_entropy",
              "landmark_coverage", "coverage_fraction", "part_interpretability", "part_interpretability_per_part",
              "dropped_filters", "num_filters", "measured_at")


def run_cell(recipe: Path, out: Path, arm: str, seed: int, sets: list[str], data: Path | None) -> dict:
    """Fine-tune one arm with one seed (resuming an interrupted run) and evaluate it on the held-out data."""
    run = out / f"{arm}-s{seed}"
    result = run / "heldout.json"
    if not result.is_file():
        finetune_cell(recipe, run, arm, seed, sets)
        # --trust-code: the run is this study's own, fine-tuned above (or by its interrupted self) from the recipe
        # the user passed, so the builder its model file names is the recipe's
        icnn("evaluate", str(run), "--json", str(result), "--trust-code", *(["--data", str(data)] if data else []))
        log.info("%s-s%d evaluated", arm, seed)
    res = json.loads(result.read_text())
    return {
        "arm": arm,
        "seed": seed,
        "accuracy": res["accuracy"],
        "num_images": res["num_images"],
        "kappa0": res.get("kappa0"),
        "protocol": res.get("protocol"),
        "layers": {name: {k: layer.get(k) for k in LAYER_KEYS}
                   for name, layer in res["layers"].items()},
    }


def summarise(cells: list[dict], arms: list[str]) -> dict:
    """Per arm: mean accuracy, the paired difference to the same seed's baseline (mean, s.e.) and ratios."""
    by = {(c["arm"], c["seed"]): c for c in cells}
    seeds = sorted({c["seed"] for c in cells if ("baseline", c["seed"]) in by})
    out = {}
    for arm in arms:
        pairs = [(by[arm, s], by["baseline", s]) for s in seeds if (arm, s) in by]
        if not pairs:
            continue
        gap = paired({a["seed"]: 100 * a["accuracy"] for a, _ in pairs},
                     {a["seed"]: 100 * b["accuracy"] for a, b in pairs})
        ratios = {name: [a["layers"][name]["location_instability"] / b["layers"][name]["location_instability"]
                         for a, b in pairs] for name in pairs[0][1]["layers"]}
        out[arm] = {
            "seeds": [a["seed"] for a, _ in pairs],
            "accuracy_mean": statistics.fmean(100 * a["accuracy"] for a, _ in pairs),
            "gap_mean": gap["mean"],
            "gap_se": gap["se"],
            "gap_worst": gap["worst"],
            "instability_ratio": {n: statistics.fmean(r) for n, r in ratios.items()},
            "instability_ratio_max": {n: max(r) for n, r in ratios.items()},
            **{key: {n: _mean([a["layers"][n].get(key) for a, _ in pairs]) for n in ratios}
               for key in ("location_instability", "landmark_entropy", "landmark_coverage", "part_interpretability")},
            # paired: this arm's part IoU minus the same seed's baseline's
            "part_gap": {n: _mean([_diff(a["layers"][n].get("part_interpretability"),
                                         b["layers"][n].get("part_interpretability")) for a, b in pairs])
                         for n in ratios},
        }
    return out


def _mean(values: list) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def table(cells: list[dict], summary: dict, arms: list[str]) -> str:
    """The per-seed runs and the summary as Markdown."""
    by = {(c["arm"], c["seed"]): c for c in cells}
    layers = list(cells[0]["layers"])
    lines = ["| arm | seed | accuracy % | Δ vs baseline | κ₀ | " + " | ".join(layers) + " |",
             "|---|---|---|---|---|" + "---|" * len(layers)]
    for arm in arms:
        for c in sorted((c for c in cells if c["arm"] == arm), key=lambda c: c["seed"]):
            base = by.get(("baseline", c["seed"]))
            gap = f"{100 * (c['accuracy'] - base['accuracy']):+.2f}" if base and arm != "baseline" else "–"
            ratio = [f"{c['layers'][n]['location_instability']:.4f}"
                     + (f" ({c['layers'][n]['location_instability'] / base['layers'][n]['location_instability']:.2f})"
                        if base else "") for n in layers]
            lines.append(f"| {arm} | {c['seed']} | {100 * c['accuracy']:.2f} | {gap} | {c['kappa0'] or 0:.3g} | "
                         + " | ".join(ratio) + " |")
    lines += ["", "| arm | seeds | mean accuracy % | mean Δ ± s.e. (worst) | "
              + " | ".join(f"{n} ratio, mean (max)" for n in layers) + " |",
              "|---|---|---|---|" + "---|" * len(layers)]
    for arm, s in summary.items():
        gap = "–" if arm == "baseline" else f"{s['gap_mean']:+.2f} ± {s['gap_se']:.2f} ({s['gap_worst']:+.2f})"
        lines.append(f"| {arm} | {len(s['seeds'])} | {s['accuracy_mean']:.2f} | {gap} | "
                     + " | ".join(f"{s['instability_ratio'][n]:.2f} ({s['instability_ratio_max'][n]:.2f})"
                                  for n in layers) + " |")
    ref = cells[0]["layers"][layers[0]]
    lines += ["", f"References on {cells[0]['num_images']} images: oracle {ref['oracle_reference']:.4f}, "
                  f"random {ref['random_reference']:.4f}. Protocol `{cells[0].get('protocol')}`; measured at "
                  + ", ".join(f"{n}: {cells[0]['layers'][n]['measured_at']}" for n in layers) + "."]
    lines += ["", diversity_table(summary, layers), "", tracking_table(cells, arms, layers)]
    return "\n".join(lines) + "\n"


def diversity_table(summary: dict, layers: list[str]) -> str:
    """Per layer and arm, means over seeds: instability, its ratio, landmark entropy, coverage and part IoU."""
    lines = ["| layer | arm | accuracy % | instability (× baseline) | landmark entropy | coverage ≥10 % | part IoU "
             "(Δ vs baseline) |", "|---|---|---|---|---|---|---|"]
    for layer in layers:
        for arm, s in summary.items():
            lines.append(
                f"| {layer} | {arm} | {s['accuracy_mean']:.2f} | {_fmt(s['location_instability'][layer], '.4f')} "
                f"({s['instability_ratio'][layer]:.2f}) | {_fmt(s['landmark_entropy'][layer], '.2f')} | "
                f"{_fmt(s['landmark_coverage'][layer], '.2f')} | {_fmt(s['part_interpretability'][layer])}"
                + ("" if arm == "baseline" else f" ({_fmt(s['part_gap'][layer], '+.3f')})") + " |")
    return ("Diversity and parts (mean over seeds; entropy of the tracked-landmark histogram / log K; coverage: "
            "share of landmarks tracked by ≥ 10 % of the filters; part IoU: METHOD.md §6):\n\n" + "\n".join(lines))


def tracking_table(cells: list[dict], arms: list[str], layers: list[str]) -> str:
    """How many filters track each landmark (their nearest on average), mean over seeds, and how many were dropped."""
    names = list(cells[0]["layers"][layers[0]]["landmark_tracking"] or {})
    lines = ["| layer | arm | " + " | ".join(names) + " | dropped (sparse landmark) |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for layer in layers:
        for arm in arms:
            own = [c["layers"][layer] for c in cells if c["arm"] == arm]
            if not own:
                continue
            counts = [statistics.fmean((o["landmark_tracking"] or {}).get(n, 0) for o in own) for n in names]
            lines.append(f"| {layer} | {arm} | " + " | ".join(f"{v:.1f}" for v in counts)
                         + f" | {statistics.fmean(o['dropped_filters'] or 0 for o in own):.1f} of "
                           f"{own[0]['num_filters']} |")
    return "Filters tracking each landmark (mean over seeds):\n\n" + "\n".join(lines)


def plot(cells: list[dict], arms: list[str], path: Path) -> None:
    """Accuracy and top-layer instability of every run, one line per seed across the arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(cells[0]["layers"])
    fig, axes = plt.subplots(1, 1 + len(layers), figsize=(4 * (1 + len(layers)), 3.6))
    by = {(c["arm"], c["seed"]): c for c in cells}
    for seed in sorted({c["seed"] for c in cells}):
        xs = [i for i, a in enumerate(arms) if (a, seed) in by]
        row = [by[arms[i], seed] for i in xs]
        axes[0].plot(xs, [100 * c["accuracy"] for c in row], "o-", alpha=0.7, label=f"seed {seed}")
        for ax, name in zip(axes[1:], layers):
            ax.plot(xs, [c["layers"][name]["location_instability"] for c in row], "o-", alpha=0.7)
    axes[0].set_ylabel("accuracy % (evaluated split)")
    axes[0].legend(fontsize=7)
    for ax, name in zip(axes[1:], layers):
        ref = cells[0]["layers"][name]
        ax.axhline(ref["oracle_reference"], color="grey", ls="--", lw=1, label="oracle")
        ax.set_ylabel(f"location instability, {name}")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(range(len(arms)), arms)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("runs/arm-seeds"))
    parser.add_argument("--workers", type=int, default=1, help="fine-tunes run at once")
    parser.add_argument("--data", type=Path, default=None,
                        help="held-out folder, read whole (default for fashion-canvas recipes: heldout_eval.py's "
                             "4000-image split; else the recipe's test split)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key in every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if "baseline" not in args.arms:
        parser.error("--arms needs baseline: every arm is compared with the baseline of its seed")
    recipe = load_recipe(args.recipe, args.set)
    ensure_dataset(recipe.data)  # once, before runs that would each generate it at the same time
    data = args.data
    if data is None and recipe.data.generate == "fashion-canvas":
        data = heldout_split()
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with cf.ThreadPoolExecutor(args.workers) as pool:
        cells = list(pool.map(lambda job: run_cell(args.recipe, args.out, *job, args.set, data), jobs))
    summary = summarise(cells, args.arms)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "arm_seeds.json", json.dumps({"cells": cells, "summary": summary}, indent=2))
    md = table(cells, summary, args.arms)
    atomic_write_text(args.out / "arm_seeds.md", md)
    plot(cells, args.arms, args.out / "arm_seeds.png")
    print(md)
    print(f"wrote {args.out / 'arm_seeds.md'}, {args.out / 'arm_seeds.png'}")


if __name__ == "__main__":
    main()
