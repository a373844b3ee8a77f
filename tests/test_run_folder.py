"""The run-folder rule: one writer at a time (a real second process), no run over another's files, no hybrid resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from icnn_compress.runs.model_file import load_model_file
from icnn_compress.errors import CheckpointError, RunFolderError
from icnn_compress.runs.folder import LOCK_FILE, check_output, check_same_run, claim_folder, locked
from icnn_compress.train import finetune, pretrain

from conftest import QUICKSTART


def _epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_two_concurrent_finetunes_into_one_folder_one_is_refused(tiny_recipe, tiny_parts, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "icnn_compress.cli", "-q", "finetune", str(QUICKSTART), "--out", str(run),
         "--baseline", "--set", f"data.root={tiny_parts}", "--set", "data.generate=none",
         "--set", "pretrain.epochs=0", "--set", "train.epochs=2", "--set", "train.batch_size=16",
         "--set", "train.optimizer=sgd", "--set", "train.lr=0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunFolderError, match=rf"is in use by process {first.pid} \(finetune baseline\)"):
        finetune(tiny_recipe(), run, arm="icnn", progress=False)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert _epochs(run) == [1, 2]  # the first run's files alone, not interleaved
    assert load_model_file(run / "model.pt")["arm"] == "baseline"
    assert not (run / LOCK_FILE).exists()


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    pid = _dead_pid()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "command": "finetune"}))
    with caplog.at_level(logging.WARNING, logger="icnn_compress.runs.folder"), locked(folder, "evaluate"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {pid}, which is gone (finetune)" in caplog.text
    assert not (folder / LOCK_FILE).exists()


def test_a_folder_with_another_runs_files_needs_resume_or_force(tmp_path, caplog):
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"a finished run")
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(RunFolderError, match=r"copied already holds a run \(model.pt, metrics.jsonl\); pass "
                                             r"--resume to continue it, --force to replace it"):
        claim_folder(folder, ("model.pt", "last.pt", "metrics.jsonl"), resume=False, force=False, what="run")
    assert (folder / "model.pt").read_bytes() == b"a finished run"  # refused: nothing touched
    with caplog.at_level(logging.WARNING, logger="icnn_compress.runs.folder"):
        claim_folder(folder, ("model.pt", "last.pt", "metrics.jsonl"), resume=False, force=True, what="run")
    assert sorted(p.name for p in folder.iterdir()) == [] and "--force: removing model.pt, metrics.jsonl" in caplog.text


def test_check_same_run_names_every_difference(tmp_path):
    recorded = {"arm": "baseline", "schedule.lr": 0.001, "data.root": "d"}
    check_same_run(recorded, dict(recorded), tmp_path)
    check_same_run(None, recorded, tmp_path)  # a last.pt from before runs recorded their settings
    with pytest.raises(RunFolderError, match=r"another run than this command asks for \(arm: 'baseline' in the "
                                             r"run, 'icnn' now; schedule.lr: 0.001 in the run, 0.01 now\)"):
        check_same_run(recorded, {**recorded, "arm": "icnn", "schedule.lr": 0.01}, tmp_path)


def test_resume_with_another_arm_or_lr_is_refused_unless_forced(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_recipe("train.epochs=1"), run, arm="masks-only", progress=False)
    (run / "model.pt").unlink()  # as if interrupted
    kept = (run / "last.pt").read_bytes()
    with pytest.raises(RunFolderError, match=r"arm: 'masks-only' in the run, 'icnn' now"):
        finetune(tiny_recipe(), run, arm="icnn", resume=True, progress=False)
    with pytest.raises(RunFolderError, match=r"schedule.lr: 0.01 in the run, 0.02 now"):
        finetune(tiny_recipe("train.lr=0.02"), run, arm="masks-only", resume=True, progress=False)
    assert (run / "last.pt").read_bytes() == kept and _epochs(run) == [1]
    finetune(tiny_recipe("train.lr=0.02"), run, arm="masks-only", resume=True, force=True, progress=False)
    assert _epochs(run) == [1, 2]  # --resume --force: goes on with the new learning rate


def test_a_finished_run_is_not_overwritten_and_force_replaces_it(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_recipe("train.epochs=1"), run, arm="baseline", progress=False)
    (run / "last.pt").unlink()  # a copied run, or a prune saved without recovery: model.pt alone
    before = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    with pytest.raises(RunFolderError, match="already holds a run"):
        finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", progress=False)
    after = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", force=True, progress=False)
    assert _epochs(run) == [1] and load_model_file(run / "model.pt")["arm"] == "icnn"  # no leftover epoch


def test_a_truncated_last_pt_is_a_clear_error_on_resume(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_recipe("train.epochs=1"), run, arm="baseline", progress=False)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last.pt cannot be read .*start again with --force"):
        finetune(tiny_recipe(), run, arm="baseline", resume=True, progress=False)


def test_an_output_under_a_file_or_over_an_input_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunFolderError, match=r"cannot write .*a_file/sub/out.json: .*a_file is a file, not a folder"):
        check_output(tmp_path / "a_file" / "sub" / "out.json")
    with pytest.raises(RunFolderError, match=r"cannot write .*a_file: .*a_file is a file, not a folder"):
        check_output(tmp_path / "a_file", folder=True)
    with pytest.raises(RunFolderError, match=r"is one of this command's inputs"):
        check_output(tmp_path / "run", folder=True, inputs=(tmp_path / "run",))
    assert check_output(tmp_path / "new" / "deep" / "out.json") == tmp_path / "new" / "deep" / "out.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created, no probe left


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_command_cannot_write_over_the_runs_model(command, tiny_recipe, tmp_path, capsys):
    from icnn_compress.cli import main

    run = tmp_path / "run"
    finetune(tiny_recipe("train.epochs=1"), run, arm="baseline", progress=False)
    before = (run / "model.pt").read_bytes()
    flag = "--json" if command == "evaluate" else "--out"
    assert main(["-q", command, str(run), flag, str(run / "model.pt")]) == 2
    assert "is one of this command's inputs or a run's own file" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == before


def test_pretrain_over_a_finished_plain_checkpoint_is_refused(tiny_recipe, tmp_path):
    out = tmp_path / "plain"
    out.mkdir()
    (out / "model.pth").write_bytes(b"plain weights")
    with pytest.raises(RunFolderError, match=r"plain already holds a plain training \(model.pth\)"):
        pretrain(tiny_recipe("pretrain.epochs=1"), out, progress=False)
    assert (out / "model.pth").read_bytes() == b"plain weights"
