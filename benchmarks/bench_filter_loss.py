"""Training-step time with and without the filter loss, measured side by side in one run.

For each architecture the same interpretable model is timed as the baseline arm (masks inactive, no
filter loss) and as the ICNN arm (masks and the reference gradient), alternating steps so that machine
noise hits both alike. Prints the median step times and their ratio (goal: ≤ 1.05).

    python benchmarks/bench_filter_loss.py                       # VGG-16 and ResNet-18, batch 32, 224 px
    python benchmarks/bench_filter_loss.py --archs resnet18 --steps 5 --device cuda
    python benchmarks/bench_filter_loss.py --count-ops          # operator calls per step (CPU proxy of launches)
    python benchmarks/bench_filter_loss.py --compile            # the masks and filter loss compiled (torch.compile)

``--count-ops`` counts, with ``torch.profiler`` on the CPU, the operator calls (``aten::`` events) of one
training step of ResNet-50 (batch 8, 224 px) with the masks off and no filter loss, and of the ICNN step,
eager and with the mask and filter-loss functions compiled: the difference is what the masks and the filter
loss add per step. On a GPU nearly every one of those calls is a kernel launch, so this is the CPU-side proxy
of a launch-bound step (issue 21).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect

import torch
from _timing import interleaved, interpretable_model, masked_arm, random_batch, train_step

from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.runtime.device import resolve_device


def _filter_loss(model: torch.nn.Module, compile_: bool) -> FilterLoss:
    if compile_:
        return FilterLoss(model, compile=True)
    return FilterLoss(model)


def bench(arch: str, *, batch: int, size: int, steps: int, device: torch.device, classes: int,
          compile_: bool = False) -> dict:
    model, masks = interpretable_model(arch, classes=classes, size=size, device=device)
    x, y = random_batch(batch=batch, size=size, classes=classes, device=device)
    filter_loss = _filter_loss(model, compile_)
    amp = device.type == "cuda"
    med = interleaved({"baseline": masked_arm(train_step(model, x, y, device, amp, filter_loss, 0.0), masks, False),
                       "icnn": masked_arm(train_step(model, x, y, device, amp, filter_loss, 1e-3), masks, True)},
                      steps, device)
    return {"arch": arch, "baseline_s": med["baseline"], "icnn_s": med["icnn"], "ratio": med["icnn"] / med["baseline"]}


def _aten_calls(step, device: torch.device) -> int:
    """Operator calls (``aten::`` events, nested ones included) that one call of ``step`` makes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def count_ops(arch: str, *, batch: int, size: int, classes: int, device: torch.device, modes: list[str]) -> dict:
    """Operator calls of one training step: masks off without filter loss, and the ICNN step in each mode."""
    model, masks = interpretable_model(arch, classes=classes, size=size, device=device)
    x, y = random_batch(batch=batch, size=size, classes=classes, device=device)
    amp = device.type == "cuda"
    off = masked_arm(train_step(model, x, y, device, amp), masks, False)
    off()  # warm-up
    out = {"arch": arch, "off": _aten_calls(off, device)}
    for mode in modes:
        fl = _filter_loss(model, mode == "compiled")
        step = masked_arm(train_step(model, x, y, device, amp, fl, 1e-3), masks, True)
        for _ in range(2 if mode == "compiled" else 1):  # warm-up: compilation, first-call costs
            step()
        out[mode] = _aten_calls(step, device)
        for m in masks:  # the next mode starts from eager masks
            with contextlib.suppress(AttributeError):
                m.compiled = False
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vgg16,resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up pair)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="time the masks and filter loss compiled")
    parser.add_argument("--count-ops", action="store_true",
                        help="print operator calls per step instead of timing (default ResNet-50, batch 8, 224 px)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.count_ops:
        archs = args.archs if args.archs != parser.get_default("archs") else "resnet50"
        batch = args.batch if args.batch != parser.get_default("batch") else 8
        fused = "compile" in inspect.signature(FilterLoss).parameters  # False on the code before issue 21
        modes = ["eager", "compiled"] if fused else ["eager"]
        print(f"operator calls per training step (torch.profiler, aten:: events), batch {batch}, {args.size} px, "
              f"{device}")
        print(f"{'arch':<10} {'masks off':>10} " + " ".join(f"{'icnn ' + m:>14} {'added':>7}" for m in modes)
              + ("   added eager / added compiled" if fused else ""))
        for arch in archs.split(","):
            r = count_ops(arch, batch=batch, size=args.size, classes=args.classes, device=device, modes=modes)
            added = {m: r[m] - r["off"] for m in modes}
            line = f"{arch:<10} {r['off']:>10} " + " ".join(f"{r[m]:>14} {added[m]:>7}" for m in modes)
            if fused:
                line += f"   {added['eager'] / max(added['compiled'], 1):.1f}x"
            print(line, flush=True)
        return
    compile_ = args.compile
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch}, {args.size} px, {args.steps} timed steps per arm")
    print(f"{'arch':<10} {'baseline s/step':>16} {'icnn s/step':>12} {'ratio':>7}")
    for arch in args.archs.split(","):
        r = bench(arch, batch=args.batch, size=args.size, steps=args.steps, device=device, classes=args.classes,
                  compile_=compile_)
        print(f"{r['arch']:<10} {r['baseline_s']:>16.3f} {r['icnn_s']:>12.3f} {r['ratio']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
