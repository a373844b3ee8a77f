"""Training-step time with and without the filter loss, measured side by side in one run.

For each architecture the same interpretable model is timed as the baseline arm (masks inactive, no
filter loss) and as the ICNN arm (masks and the reference gradient), alternating steps so that machine
noise hits both alike. Prints the median step times and their ratio (goal: ≤ 1.05).

    python analysis/bench_filter_loss.py                       # VGG-16 and ResNet-18, batch 32, 224 px
    python analysis/bench_filter_loss.py --archs resnet18 --steps 5 --device cuda
"""

from __future__ import annotations

import argparse

import torch
from _timing import interleaved, interpretable_model, masked_arm, random_batch, train_step

from icnn_compress.loss import FilterLoss
from icnn_compress.train import resolve_device


def bench(arch: str, *, batch: int, size: int, steps: int, device: torch.device, classes: int) -> dict:
    model, masks = interpretable_model(arch, classes=classes, size=size, device=device)
    x, y = random_batch(batch=batch, size=size, classes=classes, device=device)
    filter_loss = FilterLoss(model)
    amp = device.type == "cuda"
    med = interleaved({"baseline": masked_arm(train_step(model, x, y, device, amp, filter_loss, 0.0), masks, False),
                       "icnn": masked_arm(train_step(model, x, y, device, amp, filter_loss, 1e-3), masks, True)},
                      steps, device)
    return {"arch": arch, "baseline_s": med["baseline"], "icnn_s": med["icnn"], "ratio": med["icnn"] / med["baseline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vgg16,resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up pair)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch}, {args.size} px, {args.steps} timed steps per arm")
    print(f"{'arch':<10} {'baseline s/step':>16} {'icnn s/step':>12} {'ratio':>7}")
    for arch in args.archs.split(","):
        r = bench(arch, batch=args.batch, size=args.size, steps=args.steps, device=device, classes=args.classes)
        print(f"{r['arch']:<10} {r['baseline_s']:>16.3f} {r['icnn_s']:>12.3f} {r['ratio']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
