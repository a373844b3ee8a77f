"""ONNX export: parity for every registered architecture with its masks, a pruned run end to end, int8."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from icnn_compress.config import load_recipe
from icnn_compress.export import ExportError, ParityError, export_onnx, ort_session
from icnn_compress.mask import InterpretableMask
from icnn_compress.prune import prune_run
from icnn_compress.surgery import ARCHITECTURES, build_base_model, make_interpretable
from icnn_compress.train import finetune

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"

# One export takes 10-40 s on two CPU cores. One member of each family runs by default; the others are
# marked slow (still run in CI; `-m "not slow"` skips them locally).
_QUICK = {"alexnet", "mobilenet_v2", "resnet18", "vgg11_bn"}


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # the exporter prints its progress


@pytest.mark.parametrize("arch", [a if a in _QUICK else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(ARCHITECTURES)])
def test_every_architecture_exports_with_its_masks_at_parity(arch, tmp_path):
    size = 64 if arch == "alexnet" else 32  # the smallest input each family accepts
    torch.manual_seed(0)
    model = build_base_model(arch, num_classes=3)
    make_interpretable(model, arch=arch, num_classes=3, image_size=size, head_width=32)
    model.eval()
    x = torch.rand(8, 3, size, size)
    # Random deep networks put out logits anywhere from 1e-11 to 1e4; scale the head so that the 1e-4
    # tolerance means the same (about 1e-4 relative) for every architecture.
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        scale = float(model(x).abs().max())
        head.weight /= scale
        head.bias /= scale
    with _quiet():
        record = export_onnx(model, tmp_path / "m.onnx", inputs=x)
    assert record["passed"] and set(record["parity"]) == {"1", "8"}
    for r in record["parity"].values():
        assert r["max_abs_diff"] <= 1e-4 and r["argmax_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    ops = {n.op_type for n in graph.node}
    # the masks are in the graph: centroid sums, rounding, the template lookup on the coordinate grid
    assert {"ReduceSum", "Floor"} <= ops and any(op.startswith("Gather") for op in ops)
    assert not list(tmp_path.glob("*.data"))  # one file, weights inside
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is True


def test_argmax_masks_export_too(tmp_path):
    torch.manual_seed(0)
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=3)
    make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=3, image_size=64,
                       top_layer="features.14", peak="argmax", beta=4.0)
    with _quiet():
        record = export_onnx(model.eval(), tmp_path / "m.onnx", inputs=torch.rand(8, 3, 64, 64))
    assert record["passed"]
    assert "ArgMax" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}


def test_a_parity_failure_is_an_error_naming_the_difference(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), InterpretableMask(4, num_classes=2), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.rand(1, 3, 8, 8))
    with _quiet(), pytest.raises(ParityError, match=r"differs from PyTorch by .* at batch"):
        export_onnx(model.eval(), tmp_path / "m.onnx", inputs=torch.rand(8, 3, 8, 8), tolerance=-1.0)
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is False
    with pytest.raises(ExportError, match="needs inputs"):
        export_onnx(model, tmp_path / "n.onnx")
    with pytest.raises(ExportError, match="quantize"):
        export_onnx(model, tmp_path / "n.onnx", quantize="int4")


@pytest.fixture(scope="module")
def pruned_run(tiny_parts, tmp_path_factory):
    recipe = load_recipe(QUICKSTART, [
        f"data.root={tiny_parts}", "data.generate=none", "pretrain.epochs=0", "train.epochs=1",
        "train.batch_size=16", "train.eval_batch_size=64", "icnn.kappa=2e-5", "model.arch=icnn_compress.zoo:small_cnn",
    ])
    root = tmp_path_factory.mktemp("runs")
    finetune(recipe, root / "icnn", arm="icnn", progress=False)
    prune_run(root / "icnn", out=root / "pruned", target_macs=0.5, criterion="l1", recover_epochs=0, steps=8,
              device="cpu", progress=False)
    return root / "pruned"


def test_pruned_run_exports_on_real_images_and_quantises(pruned_run, tmp_path):
    out = tmp_path / "model.onnx"
    with _quiet():
        record = export_onnx(pruned_run, out, quantize="int8", calibration=32)
    assert record["passed"] and record["inputs"].startswith("test split")
    assert record["pruned_macs_ratio"] <= 0.5
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert record["providers"][0] == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    assert json.loads((tmp_path / "parity.json").read_text()) == json.loads(json.dumps(record))
    q = record["int8"]
    assert Path(q["onnx"]).is_file() and q["calibration_images"] == 32 and q["bytes"] < record["bytes"]
    assert {"accuracy_fp32", "accuracy_int8", "accuracy_change"} <= set(q)
    assert q["accuracy_change"] == pytest.approx(q["accuracy_int8"] - q["accuracy_fp32"])
    qops = {n.op_type for n in onnx.load(q["onnx"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= qops
    # the batch axis is dynamic: any batch size runs
    session = ort_session(out)
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert logits.shape == (3, 4)
