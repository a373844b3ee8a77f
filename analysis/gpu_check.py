"""One GPU check (< 8 minutes on one H100): fine-tuning throughput, analysis vs inference, ONNX CUDA latency.

Every figure is a ratio measured side by side in this one process (interleaved steps, medians), so that
machine noise hits both sides alike:

* ``filter_loss``: ICNN step (masks + reference gradient) / baseline step (same model, masks off) — goal ≤ 1.05;
* ``vs_plain``: ICNN step / plain torchvision training step of the same base model — goal ≤ 1.10;
* ``analysis``: analysis-pass throughput / plain inference throughput — goal ≥ 0.85;
* ``onnx``: ONNX Runtime latency of the model pruned to half the MACs / unpruned (CUDA provider when
  available; skipped with the reason when export or pruning is not importable).

    python analysis/gpu_check.py                           # VGG-16 and ResNet-50, 224 px, batch 64, cuda
    python analysis/gpu_check.py --device cpu --quick      # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import interleaved, interpretable_model, masked_arm, random_batch, train_step

from icnn_compress.analyze import analyze
from icnn_compress.loss import FilterLoss
from icnn_compress.surgery import build_base_model, make_interpretable


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
    run_plain = torch.compile(plain) if compile_ else plain
    run_icnn = torch.compile(icnn) if compile_ else icnn
    med = interleaved({"plain": train_step(run_plain, x, y, device, amp),
                       "baseline": masked_arm(train_step(run_icnn, x, y, device, amp, fl, 0.0), masks, False),
                       "icnn": masked_arm(train_step(run_icnn, x, y, device, amp, fl, 1e-3), masks, True)},
                      steps, device)
    return {"arch": arch, **{f"{k}_img_s": batch / v for k, v in med.items()},
            "filter_loss": med["icnn"] / med["baseline"], "vs_plain": med["icnn"] / med["plain"]}


def analysis_throughput(arch: str, *, batch: int, size: int, batches: int, classes: int, device: torch.device,
                        rounds: int) -> dict:
    """Images/s of :func:`analyze` over a loader of random dict batches vs plain inference of the same model."""
    torch.manual_seed(0)
    model = build_base_model(arch, num_classes=classes)
    make_interpretable(model, arch=arch, num_classes=classes, image_size=size)
    model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(batch, 3, size, size, generator=g),
             "label": torch.randint(0, classes, (batch,), generator=g),
             "index": torch.arange(i * batch, (i + 1) * batch)} for i in range(batches)]
    amp = device.type == "cuda"

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for b in data:
                model(b["image"].to(device, non_blocking=True))

    def analysis() -> None:
        analyze(model, data, classes=[str(c) for c in range(classes)], image_size=size, device=device)

    med = interleaved({"inference": infer, "analysis": analysis}, rounds, device)
    n = batch * batches
    return {"arch": arch, "inference_img_s": n / med["inference"], "analysis_img_s": n / med["analysis"],
            "analysis": med["inference"] / med["analysis"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--archs", default=None, help="default vgg16,resnet50 (--quick: resnet18)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training models")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        archs, batch, size, steps, batches, rounds, runs = args.archs or "resnet18", 4, 64, 2, 2, 1, 2
    else:
        archs, batch, size, steps, batches, rounds, runs = args.archs or "vgg16,resnet50", 64, 224, 6, 8, 3, 20
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for arch in archs.split(","):
        ft = finetune_throughput(arch, batch=batch, size=size, steps=steps, classes=200, device=device,
                                 compile_=args.compile)
        an = analysis_throughput(arch, batch=batch, size=size, batches=batches, classes=200, device=device,
                                 rounds=rounds)
        ox = onnx_latency(arch, size=size, classes=200, device=device, runs=runs)
        rows.append((arch, ft, an, ox))
        print(f"{arch}: {ft}\n  {an}\n  {ox}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n## gpu_check on {name}, batch {batch}, {size} px, torch {torch.__version__}")
    print("| arch | plain img/s | icnn img/s | filter-loss ratio (≤1.05) | vs plain (≤1.10) | "
          "analysis/inference (≥0.85) | onnx pruned/unpruned |")
    print("|---|---|---|---|---|---|---|")
    for arch, ft, an, ox in rows:
        onnx = f"{ox['onnx']:.2f} ({ox['provider']})" if "onnx" in ox else f"skipped ({ox.get('skipped', '?')[:60]})"
        print(f"| {arch} | {ft['plain_img_s']:.1f} | {ft['icnn_img_s']:.1f} | {ft['filter_loss']:.3f} | "
              f"{ft['vs_plain']:.3f} | {an['analysis']:.3f} | {onnx} |")


if __name__ == "__main__":
    main()
