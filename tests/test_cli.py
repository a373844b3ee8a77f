"""The `icnn` command: bad input exits 2 with a message that says what to do."""

from __future__ import annotations

import json

import pytest

from pathlib import Path

from conftest import BUILDER, name_builder

from icnn_compress.cli import main

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


def run(capsys, *argv):
    code = main(["-q", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_recipe_key_is_an_error_with_a_suggestion(capsys, tmp_path):
    code, _, err = run(capsys, "finetune", str(QUICKSTART), "--out", str(tmp_path / "r"), "--set", "train.epoch=3")
    assert code == 2
    assert "unknown key 'train.epoch'; did you mean 'train.epochs'?" in err


def test_missing_recipe_file(capsys, tmp_path):
    code, _, err = run(capsys, "finetune", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r"))
    assert code == 2 and "nope.toml" in err


def test_wrong_data_path_names_the_folder_and_the_fix(capsys, tmp_path):
    missing = tmp_path / "no-such-data"
    code, _, err = run(capsys, "finetune", str(QUICKSTART), "--out", str(tmp_path / "r"),
                       "--set", f"data.root={missing}", "--set", "data.generate=none")
    assert code == 2
    assert str(missing) in err and "icnn make-dataset parts" in err


def test_corrupt_image_names_the_file(capsys, tmp_path, tiny_parts):
    import shutil

    data = tmp_path / "parts"
    shutil.copytree(tiny_parts, data)
    first = (data / "images.txt").read_text().split()[1]
    (data / "images" / first).write_bytes(b"not a png")
    code, _, err = run(capsys, "finetune", str(QUICKSTART), "--out", str(tmp_path / "r"),
                       "--set", f"data.root={data}", "--set", "pretrain.epochs=0", "--set", "train.epochs=1",
                       "--set", "icnn.kappa=2e-5")
    assert code == 2 and first.split("/")[-1] in err


def test_evaluate_a_missing_run(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", str(tmp_path / "nothing"), "--json", str(tmp_path / "e.json"))
    assert code == 2 and "not found" in err


@pytest.fixture(scope="module")
def masks_only_run(tiny_parts, tmp_path_factory):
    """A masks-only run fine-tuned through the command, with a [prune] section unlike any recipe's."""
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(["-q", "finetune", str(QUICKSTART), "--out", str(out), "--masks-only",
                 "--set", f"data.root={tiny_parts}", "--set", "train.epochs=1", "--set", "pretrain.epochs=0",
                 "--set", "prune.criterion=l1", "--set", "prune.target_macs=0.8", "--set", "prune.round_to=4",
                 "--set", "prune.floor=0.5", "--set", "prune.recover_epochs=0"])
    assert code == 0
    return out


def test_finetune_and_evaluate_through_the_command(capsys, tmp_path, tiny_parts, masks_only_run):
    code, printed, _ = run(capsys, "evaluate", str(masks_only_run), "--data", str(tiny_parts),
                           "--json", str(tmp_path / "e.json"))
    assert code == 0
    assert json.loads(printed)["num_images"] == 32
    layer = next(iter(json.loads(printed)["layers"].values()))  # the generated parts carry part masks
    assert {"landmark_entropy", "landmark_coverage", "part_interpretability"} <= set(layer)
    assert json.loads((tmp_path / "e.json").read_text())["arm"] == "masks-only"


# Every command that reads a run's model file, with its other arguments (quick ones).
RUN_COMMANDS = {
    "evaluate": [],
    "analyze": ["--out", "{tmp}/analysis"],
    "compare": ["--out", "{tmp}/compare", "--methods", "icnn", "--limit", "2"],
    "prune": ["--out", "{tmp}/pruned"],
    "export": ["--out", "{tmp}/model.onnx"],
}


@pytest.mark.parametrize("command", list(RUN_COMMANDS))
def test_a_run_naming_a_builder_imports_it_only_with_trust_code(capsys, tmp_path, masks_only_run, user_builder,
                                                                 command):
    downloaded = name_builder(masks_only_run / "model.pt", BUILDER, tmp_path / "downloaded")
    argv = [command, str(downloaded), *(a.format(tmp=tmp_path) for a in RUN_COMMANDS[command])]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"icnn: error: {downloaded / 'model.pt'} names the model builder {BUILDER!r}: its module "
                          "'icnn_test_builder' was not imported")
    assert not user_builder.exists()
    code, _, err = run(capsys, *argv, "--trust-code")
    assert code == 0 and user_builder.exists()


def _pruning(folder: Path) -> dict:
    """The settings a pruned run was made with, from its pruning.json."""
    record = json.loads((folder / "pruning.json").read_text())
    return {"criterion": record["criterion"], "target_macs": record["target_macs"],
            "round_to": record["history"]["round_to"], "floor": record["history"]["floor"],
            "recover_epochs": record["recover_epochs"], "recovered": record["accuracy_recovered"] is not None}


def test_prune_takes_the_run_recipe_and_the_flags_override_it(capsys, tmp_path, masks_only_run):
    code, _, _ = run(capsys, "prune", str(masks_only_run), "--out", str(tmp_path / "recipe"))
    assert code == 0
    assert _pruning(tmp_path / "recipe") == {"criterion": "l1", "target_macs": 0.8, "round_to": 4, "floor": 0.5,
                                             "recover_epochs": 0, "recovered": False}
    code, _, _ = run(capsys, "prune", str(masks_only_run), "--out", str(tmp_path / "flags"), "--criterion", "random",
                     "--target-macs", "0.6", "--round-to", "2", "--floor", "0.3", "--recover-epochs", "1")
    assert code == 0
    assert _pruning(tmp_path / "flags") == {"criterion": "random", "target_macs": 0.6, "round_to": 2, "floor": 0.3,
                                            "recover_epochs": 1, "recovered": True}


@pytest.mark.parametrize(("flags", "message"), [
    (["--criterion", "icnn-l1"], "the icnn-l1 criterion needs the analysis of the run (--analysis analysis.json)"),
    (["--floor", "1.5"], "'prune.floor' must be in (0, 1), got 1.5"),
    (["--round-to", "0"], "'prune.round_to' must be >= 1, got 0"),
    (["--steps", "0"], "'prune.steps' must be >= 1, got 0"),
    (["--steps", "3", "--recover-epochs", "2"],
     "steps = 3 rounds of prune + recovery need at least one recovery epoch"),
    (["--target-macs", "auto", "--criterion", "l1"], "target_macs='auto' removes the filters the analysis flags"),
])
def test_prune_flags_are_checked(capsys, tmp_path, masks_only_run, flags, message):
    code, _, err = run(capsys, "prune", str(masks_only_run), "--out", str(tmp_path / "p"), *flags)
    assert code == 2 and message in err and not (tmp_path / "p" / "model.pt").exists()


def test_prune_target_macs_is_a_number_or_auto(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, before any run is read
        run(capsys, "prune", str(tmp_path), "--out", str(tmp_path / "p"), "--target-macs", "half")
    assert exc.value.code == 2
    assert "expected a fraction such as 0.5, or 'auto'; got 'half'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "high"])
def test_analyze_redundancy_threshold_is_a_correlation(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as exc:
        run(capsys, "analyze", str(tmp_path), "--out", str(tmp_path / "a"), "--redundancy-threshold", value)
    assert exc.value.code == 2
    assert f"expected a correlation in [-1, 1]; got '{value}'" in capsys.readouterr().err


def test_make_dataset(capsys, tmp_path):
    code, printed, _ = run(capsys, "make-dataset", "parts", "--out", str(tmp_path / "d"), "--seed", "3")
    assert code == 0 and (tmp_path / "d" / "images.txt").is_file()


def test_every_flag_a_message_names_exists():
    # an error once told users to pass --reset-head, which no command has
    import argparse
    import re

    from icnn_compress.cli import build_parser

    flags: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    package = Path(__file__).resolve().parent.parent / "icnn_compress"
    named = {m for f in package.rglob("*.py") for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", f.read_text())}
    assert named - flags == {"--nproc-per-node"}  # torchrun's, in the distributed module's advice


def _class_folders(root: Path, classes: int, train: int, test: int, size: int = 32) -> Path:
    """``train/<class>/*.png`` and ``test/<class>/*.png``: each class a colour plus noise, torchvision's layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            colour = np.array([255 * (c % 2), 255 * (c // 2 % 2), 128], dtype=np.float64)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def test_every_stage_runs_on_a_plain_image_folder(capsys, caplog, tmp_path):
    """finetune -> evaluate -> analyze -> prune -> export -> compare on class folders with no landmarks: the
    landmark measures say they were skipped, the landmark-free ones are reported."""
    data = _class_folders(tmp_path / "folders", classes=3, train=12, test=4)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(QUICKSTART.read_text())
    settings = ["--set", f"data.root={data}", "--set", "data.generate=none", "--set", "data.format=imagefolder",
                "--set", "data.image_size=32", "--set", "data.hflip=false", "--set", "train.epochs=1",
                "--set", "train.batch_size=12", "--set", "icnn.kappa=1e-4", "--set", "icnn.pilot_batches=1"]
    run_dir = tmp_path / "icnn"
    assert run(capsys, "finetune", str(recipe), *settings, "--out", str(run_dir))[0] == 0

    code, out, _ = run(capsys, "evaluate", str(run_dir))
    result = json.loads(out)
    assert code == 0 and result["num_images"] == 12 and result["location_instability"] is None
    assert "has no landmarks, so location instability (and part interpretability) were skipped" in caplog.text

    code, out, _ = run(capsys, "analyze", str(run_dir), "--out", str(tmp_path / "analysis"),
                       "--redundancy-threshold", "0.9")
    doc = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    summary = doc["summary"]
    assert code == 0 and summary["landmark_names"] == [] and summary["num_images"] == 12
    assert summary["settings"]["redundancy_threshold"] == 0.9
    assert all(layer["location_instability"] is None for layer in summary["layers"].values())

    code, out, _ = run(capsys, "prune", str(run_dir), "--analysis", str(tmp_path / "analysis"), "--recover-epochs",
                       "0", "--round-to", "1", "--out", str(tmp_path / "pruned"))
    assert code == 0 and json.loads(out)["macs_ratio"] <= 0.5

    code, out, _ = run(capsys, "export", str(tmp_path / "pruned"), "--out", str(tmp_path / "onnx" / "model.onnx"))
    assert code == 0 and json.loads(out)["passed"] is True

    code, out, _ = run(capsys, "compare", str(run_dir), "--methods", "icnn,gradcam", "--limit", "4",
                       "--out", str(tmp_path / "compare"))
    assert code == 0
    assert "the data has no landmarks: the pointing game and the distance spread were skipped" in out
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert compared["models"]["icnn"]["explainers"]["gradcam"]["deletion_auc"] is not None
