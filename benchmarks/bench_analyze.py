"""Throughput of the analysis pass relative to plain inference of the same model on the same data.

    .venv/bin/python benchmarks/bench_analyze.py runs/demo/icnn [--repeats 5] [--limit 600] [--batch-size 100]
        [--stats-threads 1]

Both passes run over the same batches, already collated in memory (so data loading, which both would
share, does not dilute the difference), in eval mode under ``torch.inference_mode``, interleaved
``repeats`` times; the ratio of the best runs (analysis images/s ÷ plain images/s) is printed, with the
median ratio of the interleaved pairs. The analysis
pass is the whole of :func:`icnn_compress.analyze.analyze` (hooks, running statistics and the final
reduction: correlations, clusters, MIS, location instability, part IoU). Goal: ≥ 0.85.
"""

from __future__ import annotations

import argparse
import statistics
import time
import torch
from torch.utils.data import DataLoader

from icnn_compress.analyze import analyze
from icnn_compress.config import recipe_from_dict
from icnn_compress.data.recipe import open_split
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.runs.open import load_run_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory with model.pt")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--stats-threads", type=int, default=1,
                        help="analyze(stats_threads=...): threads of the statistics (0: the same as inference)")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the builder the run's model file names, as icnn --trust-code")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, saved = load_run_model(args.run, device="cpu", trust_code=args.trust_code)
    recipe = recipe_from_dict(saved["recipe"], source=f"{args.run}/model.pt")
    dataset = open_split(recipe.data, args.split, progress=False)
    batches = list(DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0)))
    if args.limit:
        batches = batches[: max(1, args.limit // args.batch_size)]
    n = sum(len(b["label"]) for b in batches)
    layers = list(saved["architecture"]["masks"])
    cats = {k: m.category for k in layers if isinstance(m := model.get_submodule(k), InterpretableMask)}

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(b["image"])
        return n / (time.perf_counter() - t)

    def analysis() -> float:
        t = time.perf_counter()
        analyze(model, batches, layers=layers, filter_category=cats, classes=dataset.classes,
                landmark_names=dataset.landmark_names, image_size=dataset.image_size,
                stats_threads=args.stats_threads or None)
        return n / (time.perf_counter() - t)

    plain()  # warm-up (allocator, thread pool)
    analysis()
    p, a = [], []
    for _ in range(args.repeats):
        p.append(plain())
        a.append(analysis())
    # Best of the repeats: on a shared machine the slow runs measure the neighbours, not this code.
    ratio = max(a) / max(p)
    print(f"images {n}, layers {layers}, threads {torch.get_num_threads()}, "
          f"statistics threads {args.stats_threads or torch.get_num_threads()}")
    print(f"plain inference  {max(p):8.1f} img/s best  (runs {', '.join(f'{v:.0f}' for v in p)})")
    print(f"analysis pass    {max(a):8.1f} img/s best  (runs {', '.join(f'{v:.0f}' for v in a)})")
    pairs = statistics.median(x / y for x, y in zip(a, p))
    print(f"ratio {ratio:.3f} best/best, {pairs:.3f} median of pairs (goal >= 0.85)")


if __name__ == "__main__":
    main()
