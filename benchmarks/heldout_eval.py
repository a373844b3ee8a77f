"""Re-evaluate runs on a larger held-out test set drawn like their own: accuracy with its standard error,
location instability per masked layer, and each run against the first (the baseline).

A recipe's test split can be too small for the comparison it has to carry. MobileNetV2 on fashion-canvas
uses 600 test images: an accuracy near 78 % then has a standard error of about 1.7 points, larger than the
"within 1 point" the three-arm comparison is judged by. This script writes a fresh fashion-canvas test
split (Fashion-MNIST's own test images on new canvases: never seen in training) with ``--test-count``
images and evaluates every run on all of it.

    python benchmarks/heldout_eval.py runs/mnv2-224/baseline runs/mnv2-224/masks-only runs/mnv2-224/icnn
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from icnn_compress.data.fashion import generate_fashion_canvas
from icnn_compress.evaluate import evaluate_run


def heldout_split(out: Path | None = None, *, test_count: int = 4000, seed: int = 1) -> Path:
    """The held-out fashion-canvas folder (generated once; the files are byte-identical per arguments).

    ``out`` defaults to ``runs/data/fashion-canvas-heldout-<test_count>-s<seed>``, the folder every study shares.
    """
    out = out or Path(f"runs/data/fashion-canvas-heldout-{test_count}-s{seed}")
    if not (out / "generated.json").is_file():
        generate_fashion_canvas(out, seed=seed, train_count=0, test_count=test_count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--test-count", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1, help="canvas seed (the recipe's own split uses 0)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of the held-out split (default: runs/data/fashion-canvas-heldout-N-sSEED)")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the builder the runs' model files name, as icnn --trust-code")
    args = parser.parse_args()
    data = heldout_split(args.data, test_count=args.test_count, seed=args.seed)
    results = [evaluate_run(run, data_root=data, progress=True, trust_code=args.trust_code) for run in args.runs]
    ref = results[0]
    print(f"\nheld-out fashion-canvas test split: {data} ({ref['num_images']} images)")
    layers = list(ref["layers"])
    print("| run | arm | accuracy % (± s.e.) | " + " | ".join(f"{n} (× {args.runs[0].name})" for n in layers) + " |")
    print("|---|---|---|" + "---|" * len(layers))
    for run, res in zip(args.runs, results):
        p, n = res["accuracy"], res["num_images"]
        cells = []
        for name in layers:
            inst, base = res["layers"][name]["location_instability"], ref["layers"][name]["location_instability"]
            cells.append(f"{inst:.4f} ({inst / base:.2f})")
        print(f"| {run} | {res.get('arm')} | {100 * p:.2f} ± {100 * math.sqrt(p * (1 - p) / n):.2f} | "
              + " | ".join(cells) + " |")
    top = layers[0]
    print(f"{top}: oracle reference {ref['layers'][top]['oracle_reference']:.4f}, "
          f"random reference {ref['layers'][top]['random_reference']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
