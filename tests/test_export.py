"""ONNX export: parity for every registered architecture with its masks, a pruned run end to end, int8, and the
faults: an interrupted export, a file changed after its check (icnn verify), a broken int8 model, bad flags."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import icnn_compress.export
from icnn_compress.cli import main
from icnn_compress.config import load_recipe
from icnn_compress.export import ExportError, ParityError, export_onnx, ort_session
from icnn_compress.pipeline import _exported
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.prune import prune_run
from icnn_compress.models.registry import ARCHITECTURES, build_base_model
from icnn_compress.models.surgery import make_interpretable
from icnn_compress.train import finetune

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"

# One export takes 10-40 s on two CPU cores. One member of each family runs by default; the others are
# marked slow (still run in CI; `-m "not slow"` skips them locally).
_QUICK = {"alexnet", "mobilenet_v2", "resnet18", "vgg11_bn"}


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # the exporter prints its progress


@pytest.mark.parametrize("arch", [a if a in _QUICK else pytest.param(a, marks=pytest.mark.slow)
                                  # the fixed layouts; the found ones export in test_architectures.py
                                  for a in sorted(n for n, spec in ARCHITECTURES.items() if spec.top_layer)])
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


@pytest.mark.parametrize("peak", ["argmax", "local-mass", "spread"])
def test_the_other_peak_rules_export_too(peak, tmp_path):
    torch.manual_seed(0)
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=3)
    make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=3, image_size=64,
                       top_layer="features.14", peak=peak, beta=4.0 if peak == "argmax" else "learned")
    for mask in (m for m in model.modules() if isinstance(m, InterpretableMask)):
        mask.class_peak.copy_(torch.rand_like(mask.class_peak))  # filters of all three categories (spread ranks within)
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
    prune_run(root / "icnn", out=root / "pruned", target_macs=0.5, criterion="l1", recover_epochs=0, schedule_steps=8,
              device="cpu", progress=False)
    return root / "pruned"


def test_pruned_run_exports_on_real_images_and_quantises(pruned_run, tmp_path):
    out = tmp_path / "model.onnx"
    with _quiet():
        # a 1-epoch model has near-tied logits: a gate of 0.9 (3 flips of 32) keeps the check off a knife edge
        record = export_onnx(pruned_run, out, quantize="int8", calibration=32, int8_agreement=0.9)
    assert record["passed"] and record["inputs"].startswith("test split")
    assert record["pruned_macs_ratio"] <= 0.5
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert record["providers"][0] == ("CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
    assert json.loads((tmp_path / "parity.json").read_text()) == json.loads(json.dumps(record))
    q = record["int8"]
    assert Path(q["onnx"]).is_file() and q["calibration_images"] == 32 and q["bytes"] < record["bytes"]
    assert {"accuracy_fp32", "accuracy_int8", "accuracy_change"} <= set(q)
    assert q["accuracy_change"] == pytest.approx(q["accuracy_int8"] - q["accuracy_fp32"])
    # the int8 gate: its top-1 class is PyTorch's on the whole test split (4 classes x 8 images)
    assert q["agreement_inputs"] == "test split" and q["agreement_images"] == 32
    assert q["min_top1_agreement"] == 0.9 and q["top1_agreement"] >= 0.9 and q["passed"] is True
    assert 0 < q["max_abs_diff"] < 1
    assert [_sha256(out), _sha256(Path(q["onnx"]))] == [record["sha256"], q["sha256"]]
    qops = {n.op_type for n in onnx.load(q["onnx"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= qops
    # the batch axis is dynamic: any batch size runs
    session = ort_session(out)
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert logits.shape == (3, 4)


def test_calibration_0_is_refused_before_any_work(pruned_run, tmp_path, capsys):
    out = tmp_path / "export" / "model.onnx"
    code = main(["-q", "export", str(pruned_run), "--out", str(out), "--quantize", "int8", "--calibration", "0"])
    assert code == 2
    message = "--calibration must be at least 1 image for int8 quantisation, got 0"
    assert capsys.readouterr().err == f"icnn: error: {message}\n"
    assert not out.parent.exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (temp files included: their names start with a dot) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(folder with model.onnx and its parity.json, the model, its inputs): a tiny masked CNN at parity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), InterpretableMask(4, num_classes=2), nn.Flatten(),
                          nn.LazyLinear(2))
    x = torch.rand(8, 3, 8, 8)
    model(x)
    folder = tmp_path_factory.mktemp("exported")
    with _quiet():
        export_onnx(model.eval(), folder / "model.onnx", inputs=x)
    return folder, model, x


def _copy(exported, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "export"))


def test_verify_accepts_the_file_that_passed(exported, tmp_path, capsys):
    folder = _copy(exported, tmp_path)
    model = folder / "model.onnx"
    record = json.loads((folder / "parity.json").read_text())
    assert record["sha256"] == _sha256(model) and record["bytes"] == model.stat().st_size
    assert main(["-q", "verify", str(model)]) == 0
    assert capsys.readouterr().out == (f"{model}: sha256 {record['sha256']} is the file its parity record checked, "
                                       "and the check passed\n")
    assert _exported(model, folder / "parity.json") is True  # the pipeline's export stage is done


def test_a_tampered_model_of_the_same_size_fails_verify_and_is_exported_again(exported, tmp_path, capsys):
    folder = _copy(exported, tmp_path)
    model, parity = folder / "model.onnx", folder / "parity.json"
    size, recorded = model.stat().st_size, json.loads(parity.read_text())["sha256"]
    graph = onnx.load(str(model))
    weight = next(t for t in graph.graph.initializer if t.name.endswith("weight"))
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), weight.name))
    onnx.save(graph, str(model))
    tampered = _sha256(model)
    assert model.stat().st_size == size  # the old record's "bytes" cannot tell
    assert main(["-q", "verify", str(model)]) == 2
    assert capsys.readouterr().err == (
        f"icnn: error: {model} has sha256 {tampered[:12]}... but {parity} records {recorded[:12]}...: "
        "the file changed after its parity check; export the run again (icnn export RUN --out MODEL.onnx)\n")
    assert _exported(model, parity) is False  # the pipeline's export stage runs again
    _, net, x = exported
    with _quiet():
        export_onnx(net, model, inputs=x, parity_json=parity)
    assert _exported(model, parity) is True and _sha256(model) != tampered


@pytest.mark.parametrize(("change", "message"), [
    ("no model", "{model} does not exist"),
    ("no record", "{model} has no parity record {parity}"),
    ("no sha256", "{parity} holds no sha256 of model.onnx (an older icnn-compress wrote it)"),
    ("failed", "{parity} records a failed parity check of model.onnx"),
    ("other file", "{parity} records no check of model.onnx (it records other.onnx)"),
    ("not json", "cannot read the parity record {parity} (Expecting value: line 1 column 1 (char 0))"),
])
def test_verify_names_what_is_missing(exported, tmp_path, capsys, change, message):
    folder = _copy(exported, tmp_path)
    model, parity = folder / "model.onnx", folder / "parity.json"
    record = json.loads(parity.read_text())
    if change == "no model":
        model.unlink()
    elif change == "no record":
        parity.unlink()
    elif change == "not json":
        parity.write_text("")
    else:
        edits = {"no sha256": {"sha256": None}, "failed": {"passed": False}, "other file": {"onnx": "other.onnx"}}
        edited = {**record, **edits[change]}
        parity.write_text(json.dumps({k: v for k, v in edited.items() if v is not None}))
    assert main(["-q", "verify", str(model), "--parity", str(parity)]) == 2
    again = "; export the run again (icnn export RUN --out MODEL.onnx)\n"
    assert capsys.readouterr().err == "icnn: error: " + message.format(model=model, parity=parity) + again
    assert _exported(model, parity) is False


def test_an_interrupted_export_leaves_the_old_files_whole(exported, tmp_path, monkeypatch):
    folder = _copy(exported, tmp_path)
    before = _listing(folder)
    real = torch.onnx.export

    def killed_while_saving(*args, **kwargs):
        program = real(*args, **kwargs)

        class HalfSaved:
            def save(self, path, **options):
                program.save(path, **options)
                written = Path(path).read_bytes()
                Path(path).write_bytes(written[: len(written) // 2])
                raise KeyboardInterrupt

        return HalfSaved()

    monkeypatch.setattr(torch.onnx, "export", killed_while_saving)
    _, net, x = exported
    with _quiet(), pytest.raises(KeyboardInterrupt):
        export_onnx(net, folder / "model.onnx", inputs=x)
    assert _listing(folder) == before  # the old model.onnx and parity.json, byte for byte, and no temp file
    assert _exported(folder / "model.onnx", folder / "parity.json") is True


def _colour_classifier() -> tuple[nn.Module, torch.Tensor]:
    """A CNN whose class is the brighter of red and green, and 4 red then 4 green images (8 x 8 px)."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2, 3)[:, :, None, None])
        model[0].bias.zero_()
        model[4].weight.copy_(torch.eye(2))
        model[4].bias.zero_()
    x = torch.full((8, 3, 8, 8), 0.5)
    x[:4, 0], x[:4, 1] = 0.75, 0.25  # logits (0.75, 0.25), exact in float32
    x[4:, 0], x[4:, 1] = 0.25, 0.75
    return model.eval(), x


def test_int8_with_zeroed_weights_is_refused_by_the_gate(tmp_path, monkeypatch, capsys):
    real = icnn_compress.export._quantize_int8

    def zeroed(fp32, int8, images):
        real(fp32, int8, images)
        quantised = onnx.load(str(int8))
        for t in quantised.graph.initializer:  # the int8 weights; the zero points are scalars or vectors
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2:
                t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        onnx.save(quantised, str(int8))

    monkeypatch.setattr(icnn_compress.export, "_quantize_int8", zeroed)
    model, x = _colour_classifier()
    out = tmp_path / "m.onnx"
    with _quiet(), pytest.raises(ParityError) as raised:
        export_onnx(model, out, inputs=x, quantize="int8")
    parity = tmp_path / "parity.json"
    # every int8 logit is 0, so the int8 model calls every image red: it agrees on the 4 red ones
    assert str(raised.value) == (
        f"the int8 model {tmp_path / 'm.int8.onnx'} gives PyTorch's top-1 class on 50.0% of 8 images (given inputs), "
        f"under the 98.0% required (max abs logit difference 0.75); see {parity}; calibrate on more images "
        "(--calibration), or ship the fp32 model")
    record = json.loads(parity.read_text())
    q = record["int8"]
    assert record["passed"] is True and record["sha256"] == _sha256(out)
    assert {k: q[k] for k in ("top1_agreement", "max_abs_diff", "agreement_images", "min_top1_agreement", "passed")} \
        == {"top1_agreement": 0.5, "max_abs_diff": 0.75, "agreement_images": 8, "min_top1_agreement": 0.98,
            "passed": False}
    assert q["sha256"] == _sha256(tmp_path / "m.int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx", "parity.json"]  # no temp files
    assert main(["-q", "verify", str(tmp_path / "m.int8.onnx")]) == 2
    assert f"{parity} records a failed parity check of m.int8.onnx" in capsys.readouterr().err
    assert main(["-q", "verify", str(out)]) == 0  # the fp32 model passed its own check


def test_int8_of_a_sound_model_passes_the_gate(tmp_path):
    model, x = _colour_classifier()
    with _quiet():
        q = export_onnx(model, tmp_path / "m.onnx", inputs=x, quantize="int8")["int8"]
    assert (q["top1_agreement"], q["agreement_images"], q["passed"]) == (1.0, 8, True)
    assert q["max_abs_diff"] < 0.01


def test_calibration_and_agreement_are_checked_before_any_work(tmp_path):
    model, x = _colour_classifier()
    with pytest.raises(ExportError, match=r"^--calibration must be at least 1 image for int8 quantisation, got 0$"):
        export_onnx(model, tmp_path / "m.onnx", inputs=x, quantize="int8", calibration=0)
    with pytest.raises(ExportError, match=r"^--int8-agreement must be a fraction in \[0, 1\], got 1.5$"):
        export_onnx(model, tmp_path / "m.onnx", inputs=x, quantize="int8", int8_agreement=1.5)
    assert list(tmp_path.iterdir()) == []
