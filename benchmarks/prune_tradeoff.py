"""Accuracy vs MACs: the ``icnn`` pruning criteria against L1, FPGM, Taylor and random, same recovery budget.

    .venv/bin/python benchmarks/prune_tradeoff.py runs/demo [--arm icnn] [--targets 0.7 0.5 0.3]
        [--criteria icnn icnn-l1 l1 fpgm taylor random] [--recover-epochs 2] [--round-to 8] [--out DIR]

For a pipeline output folder (``icnn pipeline`` / ``make demo``), prunes ``<folder>/<arm>/model.pt`` to
each MACs ratio with each criterion (``icnn_compress.prune.prune_run``: local iterative pruning,
round_to 8, floor 25%), recovers every pruned model for the same number of epochs (the run's recipe, its
arm, κ fixed to the run's κ₀), and writes into ``--out`` (default ``<folder>/prune_tradeoff``):

* ``<criterion>_<target>[_s<seed>]/``: each pruned run (``model.pt``, ``pruning.json``, metrics);
* ``prune_tradeoff.md``: test accuracy after recovery (and right after pruning) per criterion and target,
  and the interpretability of the top masked layer (exclusivity, location instability, part
  interpretability, redundancy) of every pruned run, analysed on the test split (``--no-interpretability``
  skips it);
* ``prune_tradeoff.json``: every record; ``prune_tradeoff.png``: accuracy vs measured MACs ratio.

The ``icnn`` and ``icnn-l1`` criteria need the run's analysis: ``--analysis analysis.json``, else one
computed here (once, into ``<out>/analysis``) on the TRAINING split, so that pruning decisions never look
at the test images the table reports (the pipeline's ``<run>/analysis`` is on the test split).
Finished cells are reused, so an interrupted study resumes; small budgets: ``--targets 0.5 --criteria icnn l1 --recover-epochs 1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from _cells import analysis_cell, interpretability, prune_cell

from icnn_compress.prune import CRITERIA


def _analysis(run: Path, given: str | None, out: Path, trust_code: bool) -> Path:
    # Not the pipeline's <run>/analysis: that one is on the test split the table reports.
    return Path(given) if given else analysis_cell(run, out / "analysis", split="train", trust_code=trust_code)


_MEASURES = ("mean_exclusivity", "location_instability", "part_interpretability", "num_redundant")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _interpretability_table(records: list[dict], base: dict) -> str:
    layer = next(iter(base))
    head = ["criterion", "MACs", *(m.replace("_", " ") for m in _MEASURES)]
    lines = [f"Interpretability of `{layer}` after recovery (test split; exclusivity and part interpretability: "
             "higher is better, instability lower; redundant = filters with a near-copy).", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
             "| unpruned | 1.000 | " + " | ".join(_fmt(base[layer].get(m)) for m in _MEASURES) + " |"]
    for r in sorted(records, key=lambda r: (-r["target_macs"], r["criterion"])):
        if r.get("interpretability") and layer in r["interpretability"]:
            cells = [_fmt(r["interpretability"][layer].get(m)) for m in _MEASURES]
            lines.append(f"| {r['criterion']} | {r['macs_ratio']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table(records: list[dict], targets: list[float], criteria: list[str], unpruned: float, epochs: int) -> str:
    targets = sorted(targets, reverse=True)
    lines = [
        f"Test accuracy (%) after {epochs} recovery epoch(s); in brackets: right after pruning, and the measured "
        f"MACs ratio. Unpruned: {unpruned:.2f}%.",
        "",
        "| criterion | " + " | ".join(f"MACs {t:g}" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for crit in criteria:
        cells = []
        for t in targets:
            rs = [r for r in records if r["criterion"] == crit and r["target_macs"] == t]
            if not rs:
                cells.append("-")
                continue
            rec = [r["accuracy_recovered"] if r["accuracy_recovered"] is not None else r["accuracy_pruned"] for r in rs]
            pruned = statistics.mean(r["accuracy_pruned"] for r in rs)
            macs = statistics.mean(r["macs_ratio"] for r in rs)
            spread = f" ± {statistics.stdev(rec):.2f}" if len(rec) > 1 else ""
            cells.append(f"{statistics.mean(rec):.2f}{spread} ({pruned:.1f}, {macs:.3f})")
        lines.append(f"| {crit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(records: list[dict], criteria: list[str], unpruned: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for crit in criteria:
        rs = sorted((r for r in records if r["criterion"] == crit), key=lambda r: r["macs_ratio"])
        if rs:
            acc = [r["accuracy_recovered"] if r["accuracy_recovered"] is not None else r["accuracy_pruned"] for r in rs]
            ax.plot([r["macs_ratio"] for r in rs], acc, marker="o", label=crit)
    ax.axhline(unpruned, color="k", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("MACs (fraction of the unpruned model)")
    ax.set_ylabel("test accuracy after recovery (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="pipeline output folder (e.g. runs/demo)")
    parser.add_argument("--arm", default="icnn", help="which run of the folder to prune")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--recover-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="pruning seeds (random, Taylor batches)")
    parser.add_argument("--round-to", type=int, default=8, help="channel multiple (16 suits AVX-512 ONNX Runtime)")
    parser.add_argument("--floor", type=float, default=0.25, help="fraction of each layer's channels always kept")
    parser.add_argument("--analysis", default=None, help="the run's analysis.json (icnn criterion)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-interpretability", action="store_true",
                        help="skip the analysis of every pruned run (accuracy only)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the builder the run's model file names, as icnn --trust-code")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("icnn_compress.prune._graph", "icnn_compress.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    run = args.folder / args.arm
    out = args.out or args.folder / "prune_tradeoff"
    out.mkdir(parents=True, exist_ok=True)
    analysis = (_analysis(run, args.analysis, out, args.trust_code) if any(c.startswith("icnn") for c in args.criteria)
                else None)
    records = []
    for target in args.targets:
        for crit in args.criteria:
            for seed in args.seeds:
                cell = out / (f"{crit}_{target:g}" + (f"_r{args.round_to}" if args.round_to != 8 else "")
                              + (f"_s{seed}" if len(args.seeds) > 1 or seed else ""))
                rec = prune_cell(run, cell, analysis=analysis, target_macs=target, criterion=crit,
                                 recover_epochs=args.recover_epochs, seed=seed, device="cpu",
                                 round_to=args.round_to, floor=args.floor, progress=not args.quiet,
                                 trust_code=args.trust_code)
                rec = {k: v for k, v in rec.items() if k != "history"} | {"seed": seed, "dir": str(cell)}
                for key in ("accuracy_unpruned", "accuracy_pruned", "accuracy_recovered"):  # the tables print percent
                    rec[key] = None if rec[key] is None else 100 * rec[key]
                if not args.no_interpretability:
                    rec["interpretability"] = interpretability(cell, cell / "analysis", args.trust_code)
                logging.info("%s @ %.2f (seed %d): MACs %.3f, accuracy %.2f -> %.2f -> %s", crit, target, seed,
                             rec["macs_ratio"], rec["accuracy_unpruned"], rec["accuracy_pruned"],
                             rec["accuracy_recovered"])
                records.append(rec)
    unpruned = records[0]["accuracy_unpruned"]
    table = _table(records, args.targets, args.criteria, unpruned, args.recover_epochs)
    if not args.no_interpretability:
        base = interpretability(run, out / "unpruned_analysis", args.trust_code)
        table += "\n" + _interpretability_table(records, base)
    stem = "prune_tradeoff" + (f"_r{args.round_to}" if args.round_to != 8 else "")
    (out / f"{stem}.md").write_text(f"# Pruning trade-off: {run}\n\n{table}", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps({"run": str(run), "analysis": str(analysis), "round_to": args.round_to,
                                                         "recover_epochs": args.recover_epochs,
                                                         "unpruned_accuracy": unpruned, "records": records},
                                                        indent=1), encoding="utf-8")
    _plot(records, args.criteria, unpruned, out / f"{stem}.png")
    print(table)
    print(f"wrote {out / (stem + '.md')}, {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
