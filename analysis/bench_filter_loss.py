"""Training-step time with and without the filter loss, measured side by side in one run.

For each architecture the same interpretable model is timed as the baseline arm (masks inactive, no
filter loss) and as the ICNN arm (masks and the reference gradient), alternating steps so that machine
noise hits both alike. Prints the median step times and their ratio (goal: ≤ 1.05).

    python analysis/bench_filter_loss.py                       # VGG-16 and ResNet-18, batch 32, 224 px
    python analysis/bench_filter_loss.py --archs resnet18 --steps 5 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icnn_compress.loss import FilterLoss
from icnn_compress.mask import InterpretableMask
from icnn_compress.surgery import build_base_model, make_interpretable
from icnn_compress.train import resolve_device


def step_timer(model, filter_loss, x, y, kappa, device, amp):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with filter_loss.batch(y, kappa):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def bench(arch: str, *, batch: int, size: int, steps: int, device: torch.device, classes: int) -> dict:
    torch.manual_seed(0)
    model = build_base_model(arch, num_classes=classes)
    make_interpretable(model, arch=arch, num_classes=classes, image_size=size)
    model.to(device).train()
    amp = device.type == "cuda"
    if amp:
        model.to(memory_format=torch.channels_last)
    masks = [m for m in model.modules() if isinstance(m, InterpretableMask)]
    x = torch.randn(batch, 3, size, size, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    filter_loss = FilterLoss(model)
    steps_by_arm = {"baseline": step_timer(model, filter_loss, x, y, 0.0, device, amp),
                    "icnn": step_timer(model, filter_loss, x, y, 1e-3, device, amp)}
    times: dict[str, list[float]] = {"baseline": [], "icnn": []}
    for i in range(steps + 1):  # the first pair warms up
        for arm in ("baseline", "icnn") if i % 2 == 0 else ("icnn", "baseline"):
            for m in masks:
                m.active = arm == "icnn"
            t = steps_by_arm[arm]()
            if i > 0:
                times[arm].append(t)
    base, icnn = statistics.median(times["baseline"]), statistics.median(times["icnn"])
    return {"arch": arch, "baseline_s": base, "icnn_s": icnn, "ratio": icnn / base}


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
