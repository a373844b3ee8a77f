"""Every torchvision classification CNN family and a list of timm CNNs through the whole pipeline, on tiny inputs.

Stages, each on the real libraries (torchvision / timm builders, torch-pruning, torch.onnx, onnxruntime), random
weights: ``surgery`` (make_interpretable with no layout: the top block is found), ``finetune`` (the κ pilot, then
one SGD step with the filter loss at that κ), ``analyze`` (the per-filter analysis and its gallery), ``prune``
(to 0.5 of the MACs, icnn-l1 on that analysis) and ``export`` (ONNX, parity with PyTorch at batch 1 and 8).

A model that cannot pass a stage is listed in ``EXPECTED`` with the error the code raises and why; the test
then checks that it gets exactly that error at exactly that stage. With ``ICNN_ARCH_REPORT=<file.jsonl>`` each
model's outcome is appended to that file (``benchmarks/architecture_table.py`` turns it into the README table).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

from icnn_compress.analyze import analyze, write_gallery
from icnn_compress.errors import TrainingError
from icnn_compress.export import ParityError, export_onnx
from icnn_compress.method.kappa import calibrate_kappa
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.prune import MaskPruner, load_filter_scores, make_importance, prune_model
from icnn_compress.prune._scores import PruningError
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.surgery import make_interpretable

timm = pytest.importorskip("timm")

NUM_CLASSES = 3
STAGES = ("surgery", "finetune", "analyze", "prune", "export")

# (arch, image size): one member per torchvision family (the smallest), the timm families, a functional-forward
# user net. The size is the smallest of 64 / 96 at which the model has a map of at least 5x5 left to mask.
MODELS = [
    ("alexnet", 96), ("vgg11", 64), ("resnet18", 64), ("mobilenet_v2", 64),
    ("squeezenet1_1", 64), ("regnet_y_400mf", 64), ("googlenet", 64), ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64), ("mobilenet_v3_small", 64), ("efficientnet_b0", 64), ("densenet121", 64),
    ("convnext_tiny", 64), ("mnasnet0_5", 64),
    # at 96 px one SGD step at the piloted kappa (4.8e3 on random weights) left its maps NaN; at 128 px it passes
    # fine-tune, analyze and prune, and ONNX Runtime then differs by 0.088 in the logits: not resolved yet
    pytest.param("inception_v3", 128, marks=pytest.mark.xfail(
        raises=(ParityError, FloatingPointError), strict=False,
        reason="pruned Inception-v3 misses ONNX parity (0.088) at 128 px; non-finite after one step at 96 px")),
    ("shufflenet_v2_x0_5", 64),
    ("efficientnet_v2_s", 64), ("regnet_x_400mf", 64),
    ("timm:resnet18", 64), ("timm:efficientnet_b0", 64), ("timm:mobilenetv3_small_050", 64),
    ("timm:convnext_nano", 64), ("timm:regnety_002", 64), ("timm:densenet121", 64),
    ("icnn_compress.zoo:functional_cnn", 64),
]

# arch -> (stage, exception type, message regex, why): the outcomes the code states instead of a result.
EXPECTED: dict[str, tuple[str, type[Exception], str, str]] = {
    "timm:regnety_002": (
        "finetune", TrainingError, r"^the κ pilot measured no gradient at the masked layers",
        "at 64 px the found block is s3.b1.conv1, inside a residual branch whose last BatchNorm timm initialises "
        "to zero (zero_init_last), so with random weights no task gradient reaches it; trained weights have no "
        "zero scale there",
    ),
    "shufflenet_v2_x0_5": (
        "prune", PruningError,
        r"^torch-pruning cannot trace this model at the layers feeding the op that failed, stage\d.*ZeroDivisionError",
        "torch-pruning 1.6 cannot map channels through the channel shuffle's reshape (ZeroDivisionError building "
        "its dependency graph); prune.ignore does not help, the error says so",
    ),
}


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _stages(arch: str, size: int, tmp_path) -> dict:
    """Run the stages in order; return {stage: seconds} of those done and the layout. An exception carries
    the same dict as ``done`` (the stages it passed)."""
    done: dict = {}
    try:
        return _run_stages(arch, size, tmp_path, done)
    except Exception as exc:
        exc.done = done  # the stages passed, for the report
        raise


def _run_stages(arch: str, size: int, tmp_path, done: dict) -> dict:
    torch.manual_seed(0)
    t = time.perf_counter()

    def mark(stage: str) -> None:
        nonlocal t
        done[stage] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    model = build_base_model(arch, num_classes=NUM_CLASSES)
    layout = make_interpretable(model, arch=arch, num_classes=NUM_CLASSES, image_size=size, head_width=32)
    done["layout"] = layout
    images, labels = _images(2, size), torch.tensor([0, 2])
    model.train()
    assert model(images[:2]).shape == (2, NUM_CLASSES)
    mark("surgery")

    fl = FilterLoss(model)
    batch = {"image": images, "label": labels}
    pilot = calibrate_kappa(model, fl, [batch], torch.device("cpu"), optimizer="sgd", batches=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    with fl.batch(labels, pilot["kappa"]):
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        if not torch.isfinite(model(images)).all():
            raise FloatingPointError(f"one SGD step at the piloted kappa ({pilot['kappa']:.3g}) left the model "
                                     "non-finite")
    mark("finetune")

    loader = [{"image": images, "label": labels, "index": torch.arange(2)}]
    result = analyze(model, loader, classes=["a", "b", "c"], image_size=size, top_k=2, instability_top_k=2,
                     estimate_stride=1, architecture=layout)
    assert {f["layer"] for f in result["filters"]} == set(layout["masks"])

    class _Set:
        def __getitem__(self, i):
            return {"image": images[i]}

    write_gallery(result, _Set(), tmp_path, thumb=16)
    mark("analyze")

    pruner = MaskPruner()
    importance = make_importance("icnn-l1", mask_pruner=pruner, scores=load_filter_scores(result))
    history = prune_model(model, example_inputs=torch.zeros(1, 3, size, size), importance=importance,
                          mask_pruner=pruner, target_macs=0.5, steps=4)
    assert history["macs_ratio"] <= 0.5
    with torch.no_grad():
        assert model(images[:2]).shape == (2, NUM_CLASSES)
    mark("prune")

    record = export_onnx(model, tmp_path / "model.onnx", inputs=images, tolerance=1e-3)
    assert record["passed"]
    mark("export")
    return done


def _report(arch: str, size: int, outcome: dict) -> None:
    path = os.environ.get("ICNN_ARCH_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"arch": arch, "size": size, **outcome}, default=str) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", MODELS, ids=[m.values[0] if hasattr(m, "marks") else m[0] for m in MODELS])
def test_architecture_end_to_end(arch, size, tmp_path):
    began = time.perf_counter()
    expected = EXPECTED.get(arch)
    if expected is None:
        done = _stages(arch, size, tmp_path)
        _report(arch, size, {"stages": done, "seconds": round(time.perf_counter() - began, 1)})
        return
    stage, error, message, why = expected
    with pytest.raises(error, match=message) as raised:
        _stages(arch, size, tmp_path)
    done = raised.value.done
    failed = next(s for s in STAGES if s not in done)
    _report(arch, size, {"stages": done, "failed": failed, "why": why, "error": str(raised.value)[:300],
                         "seconds": round(time.perf_counter() - began, 1)})
    assert failed == stage, f"{arch} failed at {failed}, not at {stage} as expected"
