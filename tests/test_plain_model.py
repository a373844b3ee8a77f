"""PlainCheckpoint: a model no icnn run made, analysed, pruned and exported like a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icnn_compress.analyze import analyze_run
from icnn_compress.cli import main
from icnn_compress.errors import CheckpointError
from icnn_compress.export import export_onnx
from icnn_compress.runs.plain import PlainCheckpoint
from icnn_compress.prune import prune_run
from icnn_compress.runs.open import load_run_model
from icnn_compress.zoo import small_cnn

BUILDER = "icnn_compress.zoo:small_cnn"
SILENT = list(range(0, 128, 8))  # channels of features.12 whose BatchNorm is zeroed: silent after the ReLU


@pytest.fixture
def folders(tmp_path) -> Path:
    """Three class folders of 10 noisy 32-px images each (a seeded split holds 2 per class out as test)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folders"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A 3-class small CNN's state_dict in which the channels SILENT of the top conv never fire."""
    torch.manual_seed(0)
    model = small_cnn(num_classes=3)
    with torch.no_grad():
        model.features[13].weight[SILENT] = 0.0
        model.features[13].bias[SILENT] = 0.0
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    return path


def test_a_plain_checkpoint_loads_as_a_plain_record_of_its_data(folders, checkpoint):
    src = PlainCheckpoint.on_folder(BUILDER, checkpoint, folders, image_size=32, top_layer="features.14")
    model, saved = load_run_model(src)
    assert saved["architecture"] == {"arch": BUILDER, "num_classes": 3, "image_size": 32, "variant": "plain",
                                     "masks": [], "top_layer": "features.14", "new_conv": False}
    assert saved["classes"] == ["c0", "c1", "c2"] and saved["arm"] == "plain"
    assert torch.equal(model.state_dict()["features.13.weight"], torch.load(checkpoint)["features.13.weight"])
    assert str(src) == str(checkpoint)


def test_a_torchvision_architecture_is_analysed_at_its_top_conv(folders, tmp_path):
    from torchvision.models import mobilenet_v2

    torch.save(mobilenet_v2(num_classes=3).state_dict(), tmp_path / "mnv2.pth")
    _, saved = load_run_model(PlainCheckpoint.on_folder("mobilenet_v2", tmp_path / "mnv2.pth", folders))
    assert saved["architecture"]["top_layer"] == "features.18"


def test_errors_name_the_fix(folders, checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist or is not a file; pass the .pth"):
        PlainCheckpoint.on_folder(BUILDER, tmp_path / "none.pth", folders)
    torch.save(small_cnn(num_classes=5).state_dict(), tmp_path / "five.pth")
    with pytest.raises(CheckpointError, match="another class count than the 3 classes of"):
        load_run_model(PlainCheckpoint.on_folder(BUILDER, tmp_path / "five.pth", folders, image_size=32))
    with pytest.raises(CheckpointError, match=r"check the architecture \(mobilenet_v2, --model"):
        load_run_model(PlainCheckpoint.on_folder("mobilenet_v2", checkpoint, folders))


def test_analyze_finds_the_silent_filters_and_prune_drops_them_first(folders, checkpoint, tmp_path):
    src = PlainCheckpoint.on_folder(BUILDER, checkpoint, folders, image_size=32, top_layer="features.14")
    result = analyze_run(src, out=tmp_path / "analysis", device="cpu", gallery=False)
    silent = {f["filter"] for f in result["filters"] if f["silent"]}
    assert set(SILENT) <= silent and result["summary"]["arm"] == "plain"

    record = prune_run(src, out=tmp_path / "pruned", analysis=tmp_path / "analysis", criterion="icnn-l1",
                       target_macs=0.6, round_to=1, recover_epochs=1, device="cpu", progress=False)
    kept = record["history"]["kept"]["features.12"]
    assert len(kept) < 128 and not set(kept) & silent  # the silent ones went before any other
    model, saved = load_run_model(tmp_path / "pruned", trust_code=True)
    assert saved["arm"] == "plain" and saved["architecture"]["variant"] == "plain"
    assert model.features[12].out_channels == len(kept)

    parity = export_onnx(tmp_path / "pruned", tmp_path / "onnx" / "model.onnx", trust_code=True)
    assert parity["passed"] is True


def test_the_commands_take_model_checkpoint_and_data(capsys, folders, checkpoint, tmp_path):
    plain = ["--model", BUILDER, "--checkpoint", str(checkpoint), "--data", str(folders), "--image-size", "32",
             "--top-layer", "features.14"]
    assert main(["-q", "analyze", *plain, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())["summary"]
    assert summary["layers"]["features.14"]["num_silent"] >= len(SILENT)
    assert main(["-q", "evaluate", *plain]) == 0
    capsys.readouterr()
    assert main(["-q", "analyze", str(tmp_path), *plain, "--out", str(tmp_path / "b")]) == 2
    assert "is a run: --model and --checkpoint are for a model no icnn run made" in capsys.readouterr().err
    assert main(["-q", "prune", "--model", BUILDER, "--out", str(tmp_path / "p")]) == 2
    assert "--model ARCH --checkpoint FILE --data DIR" in capsys.readouterr().err
    no_top = ["--model", BUILDER, "--checkpoint", str(checkpoint), "--data", str(folders), "--image-size", "32"]
    assert main(["-q", "analyze", *no_top, "--out", str(tmp_path / "c")]) == 2
    assert "pass the module names to analyse with --layers, or the top conv with --top-layer" in capsys.readouterr().err
