"""ONNX Runtime latency of the unpruned, the pruned and the int8 pruned model, at batch 1 and 32, as ratios.

    .venv/bin/python benchmarks/bench_export.py runs/demo/icnn runs/demo/prune_tradeoff/icnn_0.5
        [--out DIR] [--batches 1 32] [--repeats 30] [--threads 0] [--provider cpu|cuda|auto]

Exports both runs with :func:`icnn_compress.export.export_onnx` (fp32, parity-checked on real test
images; int8 static QDQ of the pruned one), then times ``session.run`` on the same real test images
in ONE process: every round runs each model once per batch size, in a rotating order (interleaved, so
load from other processes hits all models alike), after warm-up. Reported: the median latency per
model and batch, and the speedups as the median over rounds of the per-round ratio (unpruned ÷ model).
Writes ``bench_export.md`` and ``bench_export.json`` into ``--out`` (default ``<pruned run>/bench_export``).
Goal: the 0.5-MACs model ≥ 1.7× faster than the unpruned one at batch 32 on this CPU.
``--provider cuda`` (or ``auto`` on a machine with a GPU and an onnxruntime build that has it) times the
ONNX Runtime CUDA execution provider instead; ``cuda`` stops with the reason when it is not available.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from icnn_compress.config import recipe_from_dict
from icnn_compress.data.recipe import open_split
from icnn_compress.export import export_onnx, ort_session, providers
from icnn_compress.runs.open import load_run_model


def _export(run: Path, out: Path, quantize: str | None, trust_code: bool) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return export_onnx(run, out / "model.onnx", quantize=quantize, calibration=256,
                           parity_json=out / "parity.json", trust_code=trust_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("unpruned", type=Path, help="run directory of the unpruned model")
    parser.add_argument("pruned", type=Path, help="run directory of the pruned model (icnn prune)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--inner", type=int, default=5, help="session.run calls timed together per round")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="ONNX Runtime execution provider (auto: CUDA when available, else CPU)")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the builder the runs' model files name, as icnn --trust-code")
    args = parser.parse_args()

    out = args.out or args.pruned / "bench_export"
    out.mkdir(parents=True, exist_ok=True)
    unpruned = _export(args.unpruned, out / "unpruned", None, args.trust_code)
    pruned = _export(args.pruned, out / "pruned", "int8", args.trust_code)
    files = {"unpruned": unpruned["onnx"], "pruned": pruned["onnx"], "pruned int8": pruned["int8"]["onnx"]}
    available = providers()  # CUDA first when a GPU is present and onnxruntime has it
    if args.provider == "cuda" and "CUDAExecutionProvider" not in available:
        parser.error("--provider cuda: no CUDAExecutionProvider here (no GPU, or an onnxruntime without CUDA: "
                     "install onnxruntime-gpu)")
    chosen = ["CPUExecutionProvider"] if args.provider == "cpu" else available
    sessions = {name: ort_session(path, provider=chosen, threads=args.threads or None) for name, path in files.items()}
    provider = sessions["unpruned"].get_providers()[0]

    _, saved = load_run_model(args.unpruned, trust_code=args.trust_code)
    test = open_split(recipe_from_dict(saved["recipe"]).data, "test", progress=False)
    images = np.stack([test[i % len(test)]["image"].numpy() for i in range(max(args.batches))]).astype(np.float32)

    def run(name: str, b: int) -> float:
        s = sessions[name]
        feed = {s.get_inputs()[0].name: images[:b]}
        t = time.perf_counter()
        for _ in range(args.inner):
            s.run(None, feed)
        return (time.perf_counter() - t) / args.inner

    names = list(sessions)
    for name in names:  # warm-up: allocations, kernel selection
        for b in args.batches:
            for _ in range(3):
                run(name, b)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batches} for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in args.batches:
            for name in order:
                times[name][b].append(run(name, b))

    result: dict = {"unpruned": str(args.unpruned), "pruned": str(args.pruned), "provider": provider,
                    "repeats": args.repeats,
                    "inner": args.inner, "threads": args.threads or "onnxruntime default", "cpu": platform.processor()
                    or platform.machine(), "cpus": os.cpu_count(), "macs_ratio": pruned.get("pruned_macs_ratio"),
                    "int8_accuracy": {k: pruned["int8"].get(k) for k in ("accuracy_fp32", "accuracy_int8",
                                                                          "accuracy_change")},
                    "latency_ms": {}, "speedup": {}}
    lines = [f"ONNX Runtime latency, {provider} (ms, median of {args.repeats} interleaved rounds × {args.inner} runs); "
             f"speedup = median per-round ratio vs unpruned. Pruned MACs ratio {result['macs_ratio']:.3f}.", "",
             "| model | " + " | ".join(f"batch {b}" for b in args.batches) + " | "
             + " | ".join(f"speedup @ {b}" for b in args.batches) + " |",
             "|---|" + "---|" * (2 * len(args.batches))]
    for name in names:
        lat = {b: 1e3 * statistics.median(times[name][b]) for b in args.batches}
        speed = {b: statistics.median(u / m for u, m in zip(times["unpruned"][b], times[name][b]))
                 for b in args.batches}
        result["latency_ms"][name] = lat
        result["speedup"][name] = speed
        lines.append(f"| {name} | " + " | ".join(f"{lat[b]:.2f}" for b in args.batches) + " | "
                     + " | ".join(f"{speed[b]:.2f}×" for b in args.batches) + " |")
    acc = result["int8_accuracy"]
    if acc.get("accuracy_fp32") is not None:
        lines += ["", f"int8 accuracy (test split, ONNX Runtime): {100 * acc['accuracy_int8']:.2f}% vs fp32 "
                      f"{100 * acc['accuracy_fp32']:.2f}% ({100 * acc['accuracy_change']:+.2f} points)."]
    table = "\n".join(lines) + "\n"
    (out / "bench_export.md").write_text(table, encoding="utf-8")
    (out / "bench_export.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
