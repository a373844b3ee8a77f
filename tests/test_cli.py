"""The `icnn` command: bad input exits 2 with a message that says what to do."""

from __future__ import annotations

import json

import pytest

from pathlib import Path

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
                       "--set", "icnn.kappa=1e-3")
    assert code == 2 and first.split("/")[-1] in err


def test_evaluate_a_missing_run(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", str(tmp_path / "nothing"), "--json", str(tmp_path / "e.json"))
    assert code == 2 and "not found" in err


def test_finetune_and_evaluate_through_the_command(capsys, tmp_path, tiny_parts):
    out = tmp_path / "run"
    code, _, _ = run(capsys, "finetune", str(QUICKSTART), "--out", str(out), "--masks-only",
                     "--set", f"data.root={tiny_parts}", "--set", "train.epochs=1", "--set", "pretrain.epochs=0")
    assert code == 0
    code, printed, _ = run(capsys, "evaluate", str(out), "--data", str(tiny_parts), "--json", str(tmp_path / "e.json"))
    assert code == 0
    assert json.loads(printed)["num_images"] == 32
    assert json.loads((tmp_path / "e.json").read_text())["arm"] == "masks-only"


def test_make_dataset(capsys, tmp_path):
    code, printed, _ = run(capsys, "make-dataset", "parts", "--out", str(tmp_path / "d"), "--seed", "3")
    assert code == 0 and (tmp_path / "d" / "images.txt").is_file()
