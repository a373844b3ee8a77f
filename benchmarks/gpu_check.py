"""One GPU check (about 3 minutes on one H100): fine-tuning throughput, analysis vs inference, ONNX CUDA latency.

Every figure is a ratio measured side by side in this one process (interleaved steps, medians), so that
machine noise hits both sides alike:

* ``filter_loss``: ICNN step (masks + reference gradient) / baseline step (same model, masks off) — goal ≤ 1.05,
  eager and with the fused mask / filter-loss functions compiled (``FilterLoss(compile=True)``, issue 21);
* ``ops``: operator calls the masks and filter loss add per step (ResNet-50 style count of
  ``bench_filter_loss.py --count-ops``, batch 8), eager and fused: on a GPU about one kernel launch each;
* ``vs_plain``: ICNN step / plain torchvision training step of the same base model — goal ≤ 1.10;
* ``analysis``: analysis-pass throughput / plain inference throughput — goal ≥ 0.85;
* ``onnx`` (printed last): ONNX Runtime latency of the model pruned to half the MACs / unpruned (CUDA provider when
  available; skipped with the reason when export or pruning is not importable).

    python benchmarks/gpu_check.py                           # VGG-16 and ResNet-50, 224 px, batch 64, cuda
    python benchmarks/gpu_check.py --device cpu --quick      # tiny sizes: checks that the script runs
    python benchmarks/gpu_check.py --skip-onnx --profile     # timing rows, then where the time goes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import interleaved, interpretable_model, masked_arm, random_batch, timed, train_step

from icnn_compress.analyze import analyze
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.surgery import make_interpretable


def finetune_throughput(arch: str, *, batch: int, size: int, steps: int, classes: int, device: torch.device,
                        compile_: bool) -> dict:
    """Steps/s of plain torchvision training, the baseline arm and the ICNN arm of the same base model."""
    amp = device.type == "cuda"
    torch.manual_seed(0)
    plain = build_base_model(arch, num_classes=classes).to(device).train()
    if amp:
        plain.to(memory_format=torch.channels_last)
    icnn, masks = interpretable_model(arch, classes=classes, size=size, device=device)
    x, y = random_batch(batch=batch, size=size, classes=classes, device=device)
    fl = FilterLoss(icnn)
    fused = FilterLoss(icnn, compile=True)  # the same masks, their fused functions compiled (issue 21)
    run_plain = torch.compile(plain) if compile_ else plain
    run_icnn = torch.compile(icnn) if compile_ else icnn

    def arm(step, active: bool, compiled: bool):
        def go() -> None:
            for m in masks:
                m.compiled = compiled
            step()
        return masked_arm(go, masks, active)

    med = interleaved({"plain": train_step(run_plain, x, y, device, amp),
                       "baseline": arm(train_step(run_icnn, x, y, device, amp, fl, 0.0), False, False),
                       "icnn": arm(train_step(run_icnn, x, y, device, amp, fl, 1e-3), True, False),
                       "icnn_fused": arm(train_step(run_icnn, x, y, device, amp, fused, 1e-3), True, True)},
                      steps, device)
    return {"arch": arch, **{f"{k}_img_s": batch / v for k, v in med.items()},
            "filter_loss": med["icnn"] / med["baseline"], "vs_plain": med["icnn"] / med["plain"],
            "filter_loss_fused": med["icnn_fused"] / med["baseline"], "vs_plain_fused": med["icnn_fused"] / med["plain"]}


def operator_calls(arch: str, *, batch: int, size: int, classes: int, device: torch.device) -> dict:
    """Operator calls per training step that the masks and filter loss add, eager and fused (compiled):
    ``benchmarks/bench_filter_loss.py --count-ops`` on this device (on a GPU, about one kernel launch each)."""
    from bench_filter_loss import count_ops

    r = count_ops(arch, batch=batch, size=size, classes=classes, device=device, modes=["eager", "compiled"])
    return {"eager": r["eager"] - r["off"], "compiled": r["compiled"] - r["off"]}


def analysis_throughput(arch: str, *, batch: int, size: int, batches: int, classes: int, device: torch.device,
                        rounds: int, distinct: int = 8) -> dict:
    """Images/s of :func:`analyze` over ``batches`` random dict batches vs plain inference of the same model.

    The loader cycles ``distinct`` stored batches (pinned on a GPU, as the library's loaders pin them) so
    that a test-set-sized pass (6144 images by default) fits in memory. ``analysis`` is the median of
    repeated calls; ``first_call`` is the first call of the process, which also pays the receptive-field
    probe (cached per network structure afterwards, see ``icnn_compress.method.receptive_field``).
    """
    model, _ = interpretable_model(arch, classes=classes, size=size, device=device)
    model.eval()
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    stored = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
              for _ in range(min(distinct, batches))]
    if pin:
        stored = [(x.pin_memory(), y.pin_memory()) for x, y in stored]
    data = [{"image": stored[i % len(stored)][0], "label": stored[i % len(stored)][1],
             "index": torch.arange(i * batch, (i + 1) * batch)} for i in range(batches)]
    amp = device.type == "cuda"

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for b in data:
                model(b["image"].to(device, non_blocking=True))

    def analysis() -> None:
        analyze(model, data, classes=[str(c) for c in range(classes)], image_size=size, device=device, amp=amp)

    infer()  # CUDA/cuDNN warm-up, so that the first analysis below pays only its own first-call costs
    first = timed(analysis, device)  # the receptive-field probe runs here; later calls find it cached
    med = interleaved({"inference": infer, "analysis": analysis}, rounds, device)
    n = batch * batches
    return {"arch": arch, "images": n, "inference_img_s": n / med["inference"], "analysis_img_s": n / med["analysis"],
            "analysis": med["inference"] / med["analysis"], "first_call": med["inference"] / first,
            "first_call_s": first}


def onnx_latency(arch: str, *, size: int, classes: int, device: torch.device, runs: int) -> dict:
    """ONNX Runtime latency (batch 1) of the model pruned to half its MACs vs unpruned, or why it was skipped."""
    try:
        import onnxruntime as ort

        from icnn_compress.export import export_onnx, ort_session
        from icnn_compress.prune import MaskPruner, make_importance, prune_model
    except Exception as exc:  # noqa: BLE001 - any missing optional dependency skips this part
        return {"arch": arch, "skipped": f"{type(exc).__name__}: {exc}"}
    provider = ["CUDAExecutionProvider"] if (device.type == "cuda" and "CUDAExecutionProvider"
                                             in ort.get_available_providers()) else ["CPUExecutionProvider"]
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    out: dict = {"arch": arch, "provider": provider[0]}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {}
            for name in ("unpruned", "pruned"):
                model = build_base_model(arch, num_classes=classes)
                make_interpretable(model, arch=arch, num_classes=classes, image_size=size)
                model.eval()
                if name == "pruned":
                    mp = MaskPruner()
                    prune_model(model, example_inputs=x, importance=make_importance("l1", mask_pruner=mp),
                                mask_pruner=mp, target_macs=0.5, steps=4)
                path = Path(tmp) / f"{name}.onnx"
                export_onnx(model, path, inputs=torch.randn(2, 3, size, size), tolerance=1e-2)
                sessions[name] = ort_session(path, provider=provider)
            feed = x.numpy()

            def runner(sess):
                name = sess.get_inputs()[0].name
                return lambda: [sess.run(None, {name: feed}) for _ in range(runs)]

            med = interleaved({k: runner(s) for k, s in sessions.items()}, 3, torch.device("cpu"))
            out.update({f"{k}_ms": 1000 * v / runs for k, v in med.items()}, onnx=med["pruned"] / med["unpruned"])
    except Exception as exc:  # noqa: BLE001 - report and go on: the other figures still stand
        out["skipped"] = f"{type(exc).__name__}: {exc}"
    return out


def profile_tables(arch: str, *, batch: int, size: int, classes: int, device: torch.device) -> None:
    """Print torch.profiler tables (device time, host time) of three ICNN training steps and one analysis
    pass of six batches: where the time goes when a ratio misses its goal."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    amp = device.type == "cuda"

    def show(prof, title: str) -> None:
        averages = prof.key_averages()
        for key in (("self_device_time_total",) if device.type == "cuda" else ()) + ("self_cpu_time_total",):
            print(f"\n### {title}, by {key}\n" + averages.table(sort_by=key, row_limit=20, max_name_column_width=55))

    model, masks = interpretable_model(arch, classes=classes, size=size, device=device)
    x, y = random_batch(batch=batch, size=size, classes=classes, device=device)
    step = masked_arm(train_step(model, x, y, device, amp, FilterLoss(model), 1e-3), masks, True)
    for _ in range(3):
        step()
    with profile(activities=activities) as prof:
        timed(lambda: [step() for _ in range(3)], device)
    show(prof, f"{arch}: three ICNN training steps")
    model.eval()
    image, label = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    if device.type == "cuda":
        image, label = image.pin_memory(), label.pin_memory()
    data = [{"image": image, "label": label, "index": torch.arange(i * batch, (i + 1) * batch)} for i in range(6)]
    names = [str(c) for c in range(classes)]
    analyze(model, data, classes=names, image_size=size, device=device, amp=amp)  # warm-up, probe cached
    with profile(activities=activities) as prof:
        timed(lambda: analyze(model, data, classes=names, image_size=size, device=device, amp=amp), device)
    show(prof, f"{arch}: one analysis pass of {6 * batch} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--archs", default=None, help="default vgg16,resnet50 (--quick: resnet18)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training models")
    parser.add_argument("--skip-onnx", action="store_true", help="timing rows only")
    parser.add_argument("--profile", action="store_true",
                        help="then print torch.profiler tables of the first arch's ICNN step and analysis pass")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        archs, batch, size, steps, batches, rounds, runs = args.archs or "resnet18", 4, 64, 2, 2, 1, 2
    else:
        archs, batch, size, steps, batches, rounds, runs = args.archs or "vgg16,resnet50", 64, 224, 6, 96, 3, 20
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for arch in archs.split(","):  # the timing rows first: the ONNX part (CPU-heavy export) comes last
        ft = finetune_throughput(arch, batch=batch, size=size, steps=steps, classes=200, device=device,
                                 compile_=args.compile)
        an = analysis_throughput(arch, batch=batch, size=size, batches=batches, classes=200, device=device,
                                 rounds=rounds)
        ops = operator_calls(arch, batch=8, size=size, classes=200, device=device)
        rows.append((arch, ft, an, ops))
        print(f"{arch}: {ft}\n  {an}\n  operator calls added per step (batch 8): {ops}", flush=True)
    print(f"\n## gpu_check on {name}, batch {batch}, {size} px, torch {torch.__version__}"
          f"{', torch.compile' if args.compile else ''}")
    print("| arch | plain img/s | icnn img/s (eager / fused) | filter-loss ratio (≤1.05), eager / fused | "
          "vs plain (≤1.10), eager / fused | ops added per step (batch 8), eager / fused | "
          "analysis/inference (≥0.85) |")
    print("|---|---|---|---|---|---|---|")
    for arch, ft, an, ops in rows:
        print(f"| {arch} | {ft['plain_img_s']:.1f} | {ft['icnn_img_s']:.1f} / {ft['icnn_fused_img_s']:.1f} | "
              f"{ft['filter_loss']:.3f} / {ft['filter_loss_fused']:.3f} | {ft['vs_plain']:.3f} / "
              f"{ft['vs_plain_fused']:.3f} | {ops['eager']} / {ops['compiled']} "
              f"({ops['eager'] / max(ops['compiled'], 1):.1f}x fewer) | {an['analysis']:.3f} ({an['images']} images, "
              f"{an['inference_img_s']:.0f} vs {an['analysis_img_s']:.0f} img/s; first call of the process "
              f"{an['first_call']:.3f}) |", flush=True)
    if args.profile:
        profile_tables(archs.split(",")[0], batch=batch, size=size, classes=200, device=device)
    if args.skip_onnx:
        return
    print("\n| arch | ONNX Runtime batch 1: pruned to 0.5 MACs / unpruned | provider |\n|---|---|---|")
    for arch in archs.split(","):
        ox = onnx_latency(arch, size=size, classes=200, device=device, runs=runs)
        onnx = (f"{ox['onnx']:.2f} ({ox['pruned_ms']:.2f} vs {ox['unpruned_ms']:.2f} ms)" if "onnx" in ox
                else f"skipped: {ox.get('skipped', '?')[:80]}")
        print(f"| {arch} | {onnx} | {ox.get('provider', '-')} |", flush=True)

if __name__ == "__main__":
    main()
