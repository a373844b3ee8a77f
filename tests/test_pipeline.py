"""`icnn pipeline` end to end on the tiny parts dataset: every stage, its outputs, and the resume on a rerun."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from conftest import BUILDER, name_builder

import icnn_compress.analyze
import icnn_compress.compare
import icnn_compress.export
import icnn_compress.pipeline
import icnn_compress.prune
from icnn_compress.cli import main
from icnn_compress.errors import UntrustedCodeError
from icnn_compress.pipeline import format_table, run_pipeline

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"
ARMS = ["baseline", "masks-only", "icnn"]
ROWS = [*ARMS, "pruned"]  # summary.json and the table: the three arms, then the pruned ICNN
COMPARE_IMAGES = 4  # the demo's 16 take ~30 s on one thread here: the comparison costs ~1 s per image and model


def _pipeline(capsys, tiny_parts: Path, out: Path) -> tuple[int, str, str]:
    """``icnn -q pipeline quickstart.toml --out OUT`` shrunk to seconds; returns (exit code, stdout, stderr)."""
    overrides = [
        f"data.root={tiny_parts}", "data.generate=none", "pretrain.epochs=1", "train.epochs=1",
        "train.batch_size=16", "train.eval_batch_size=64", "icnn.kappa=2e-5", "prune.recover_epochs=1",
    ]
    code = main(["-q", "pipeline", str(QUICKSTART), "--out", str(out), *(a for o in overrides for a in ("--set", o))])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _spy(monkeypatch, calls: list[str], module, name: str) -> None:
    """Count the calls of ``module.name`` in ``calls`` and still run it."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def _forbid(monkeypatch, module, name: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"the rerun ran {name} again, though its result was on disk")

    monkeypatch.setattr(module, name, refuse)


# Where the pipeline looks each stage up at call time (module-level imports in pipeline.py, lazy ones elsewhere).
_STAGES = [
    (icnn_compress.pipeline, "pretrain"),
    (icnn_compress.pipeline, "finetune"),
    (icnn_compress.pipeline, "evaluate_run"),
    (icnn_compress.analyze, "analyze_run"),
    (icnn_compress.compare, "compare_run"),
    (icnn_compress.prune, "prune_run"),
    (icnn_compress.export, "export_onnx"),
]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/(?:png|jpeg);base64,([^"]+)"', page)]


def _spied_pipeline(monkeypatch, capsys, data, out):
    """Run the pipeline with every stage spied on; return the stages called, the exit code, stdout, stderr."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        for module, name in _STAGES:
            _spy(m, calls, module, name)
        return (calls, *_pipeline(capsys, data, out))


@pytest.mark.slow
def test_pipeline_end_to_end_resumes_after_an_interrupt_and_skips_finished_stages(tiny_parts, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(icnn_compress.pipeline, "DEMO_COMPARE_IMAGES", COMPARE_IMAGES)
    out = tmp_path / "demo"

    # 1. Ctrl-C in the Captum comparison, after training and analysis: the CLI says how to continue.
    calls: list[str] = []
    with monkeypatch.context() as m:
        for module, name in _STAGES:
            _spy(m, calls, module, name)
        m.setattr(icnn_compress.compare, "compare_run", _interrupt)
        code, stdout, stderr = _pipeline(capsys, tiny_parts, out)
    assert code == 130 and "same command (pipeline)" in stderr and stdout == ""
    assert calls == ["pretrain", *["finetune", "evaluate_run"] * 3, "analyze_run", "analyze_run"]
    assert (out / "plain" / "model.pth").is_file()
    assert all((out / arm / "model.pt").is_file() for arm in ARMS)
    assert not (out / "summary.json").exists() and not (out / "pruned").exists()

    # 2. The same command resumes: finished stages are not redone, the rest runs.
    calls, code, stdout, stderr = _spied_pipeline(monkeypatch, capsys, tiny_parts, out)
    assert code == 0, stderr
    assert calls == ["compare_run", "analyze_run", "prune_run", "export_onnx", "evaluate_run"]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ROWS
    for row, res in summary.items():
        assert 0.0 <= res["accuracy"] <= 1.0
        assert isinstance(res["location_instability"], float) and math.isfinite(res["location_instability"])
        assert res["num_images"] == 4 * 8 and res["split"] == "test"
        assert res["arm"] == ("icnn" if row == "pruned" else row)
        assert (out / row / "model.pt").is_file()
        assert json.loads((out / row / "evaluate.json").read_text()) == res
    assert summary["baseline"]["kappa0"] == summary["masks-only"]["kappa0"] == 0.0
    # the collapse guard may lower the fixed κ₀ of 2e-5, never raise it; the recovery keeps the run's κ₀
    assert 0.0 < summary["icnn"]["kappa0"] <= 2e-5
    assert summary["pruned"]["kappa0"] == summary["icnn"]["kappa0"]

    # the printed table: header, rule, one row per arm (in order, with its accuracy), the references line
    lines = stdout.rstrip("\n").splitlines()
    assert len(lines) == 2 + len(ROWS) + 1
    assert lines[0].split()[0] == "arm" and set(lines[1].replace(" ", "")) == {"-"}
    for line, row in zip(lines[2:-1], ROWS):
        assert line.split()[:2] == [row, f"{summary[row]['accuracy'] * 100:.2f}"]
    assert lines[-1].startswith("references at ")
    assert stdout.rstrip("\n") == format_table(summary)

    # pruning: the recipe's target reached, fewer parameters, recovery run; its accuracies are the evaluations'
    pruning = json.loads((out / "pruned" / "pruning.json").read_text())
    assert pruning["criterion"] == "icnn" and pruning["target_macs"] == 0.5
    # the filters to remove were chosen on the validation split, not on the test split the table reports
    assert pruning["history"]["analysis"] == str(out / "icnn" / "analysis-val")
    assert json.loads((out / "icnn" / "analysis-val" / "analysis.json").read_text())["summary"]["split"] == "val"
    assert pruning["macs_ratio"] <= pruning["target_macs"]
    assert pruning["macs"] <= pruning["target_macs"] * pruning["base_macs"]
    assert pruning["params"] < pruning["base_params"]
    assert pruning["recover_epochs"] == 1
    assert pruning["accuracy_unpruned"] == pytest.approx(summary["icnn"]["accuracy"])
    assert pruning["accuracy_recovered"] == pytest.approx(summary["pruned"]["accuracy"])

    # ONNX export of the pruned model, parity with PyTorch at batch 1 and 8
    parity = json.loads((out / "pruned" / "parity.json").read_text())
    assert parity["passed"] is True and (out / "pruned" / "model.onnx").is_file()
    assert parity["pruned_macs_ratio"] == pruning["macs_ratio"]
    assert sorted(parity["parity"]) == ["1", "8"]
    for batch in parity["parity"].values():
        assert batch["max_abs_diff"] <= 1e-4 and batch["argmax_agreement"] == 1.0

    # the Captum comparison, at the size asked for, on both models
    comparison = json.loads((out / "compare" / "compare.json").read_text())
    assert comparison["limit"] == COMPARE_IMAGES
    assert {name: s["num_images"] for name, s in comparison["models"].items()} == {"icnn": 4, "baseline": 4}

    # report.html embeds every plot, gallery and the comparison figure, and links to nothing outside itself
    page = (out / "report" / "report.html").read_text()
    on_disk = sorted(p.read_bytes() for p in out.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(on_disk) >= 1 + 2 * 2  # compare.jpg, and per analysed arm at least a distribution plot and a gallery
    assert sorted(_embedded_images(page)) == on_disk
    assert not re.findall(r'(?:src|href)="(?!data:)', page)
    assert "icnn: summary" in page and "baseline: summary" in page and 'id="compare"' in page

    # 3. A rerun of the finished pipeline redoes no stage and gives the same summary and table.
    with monkeypatch.context() as m:
        for module, name in _STAGES:
            _forbid(m, module, name)
        code, again, stderr = _pipeline(capsys, tiny_parts, out)
    assert code == 0, stderr
    assert again == stdout
    assert json.loads((out / "summary.json").read_text()) == summary

    # 4. A parity check that failed (its parity.json says so) is not a finished stage: a rerun exports again.
    #    An evaluation made on other data (icnn evaluate --data ... --json into the same file) is done again.
    (out / "pruned" / "parity.json").write_text(json.dumps({**parity, "passed": False}))
    evaluated = json.loads((out / "baseline" / "evaluate.json").read_text())
    (out / "baseline" / "evaluate.json").write_text(json.dumps({**evaluated, "data_root": "elsewhere"}))
    calls, code, _, stderr = _spied_pipeline(monkeypatch, capsys, tiny_parts, out)
    assert code == 0, stderr
    assert calls == ["evaluate_run", "export_onnx"]
    assert json.loads((out / "baseline" / "evaluate.json").read_text()) == evaluated
    assert json.loads((out / "pruned" / "parity.json").read_text())["passed"] is True

    # 5. A model.onnx changed after its check, at the same size, is not the file parity.json passed: exported again.
    onnx_file = out / "pruned" / "model.onnx"
    tampered = bytearray(onnx_file.read_bytes())
    tampered[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(tampered))
    calls, code, _, stderr = _spied_pipeline(monkeypatch, capsys, tiny_parts, out)
    assert code == 0, stderr
    assert calls == ["export_onnx"]
    record = json.loads((out / "pruned" / "parity.json").read_text())
    assert record["passed"] is True and record["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()


def test_the_stages_trust_the_recipe_builder_and_no_other(tmp_path, tiny_recipe, user_builder):
    recipe = tiny_recipe(f"model.arch={BUILDER}", "train.epochs=1")
    results = run_pipeline(recipe, tmp_path / "out", arms=("baseline",), progress=False)
    assert results["baseline"]["num_images"] == 32  # evaluated: the run's model file was read back
    # A model file already in out is not the pipeline's own: the stage that finds it skips its run.
    run = name_builder(tmp_path / "out" / "baseline" / "model.pt", "icnn_other_builder:build",
                       tmp_path / "out" / "baseline")
    (run / "evaluate.json").unlink()
    with pytest.raises(UntrustedCodeError, match=r"names the model builder 'icnn_other_builder:build'"):
        run_pipeline(recipe, tmp_path / "out", arms=("baseline",), progress=False)


def test_format_table_exact_text():
    results = {
        "baseline": {"accuracy": 0.5, "kappa0": 0.0, "layers": {"conv": {
            "location_instability": 0.2, "random_reference": 0.3, "oracle_reference": 0.05, "dead": 3}}},
        "icnn": {"accuracy": 0.625, "kappa0": 1e-3, "layers": {"conv": {"location_instability": 0.1, "dead": 0}}},
        # no kappa0, an instability that was not finite (None), no dead count
        "pruned": {"accuracy": 0.6, "layers": {"conv": {"location_instability": None}}},
    }
    assert format_table(results) == "\n".join([
        "arm       acc %  kappa0  instab. conv   dead",
        "--------  -----  ------  -------------  ----",
        "baseline  50.00  0       0.2000 (1.00)  3   ",
        "icnn      62.50  0.001   0.1000 (0.50)  0   ",
        "pruned    60.00  0       -              -   ",
        "references at conv: random peak 0.3000, oracle landmark 0.0500 (lower is better; ratios × baseline)",
    ])


def test_format_table_on_data_without_landmarks_says_instability_was_skipped():
    results = {"icnn": {"accuracy": 0.5, "kappa0": 1e-3, "layers": {"conv": {
        "location_instability": None, "random_reference": None, "oracle_reference": None, "dead": 0}}}}
    assert format_table(results).splitlines()[-1] == (
        "the data has no landmarks: location instability was skipped (-); data.keypoints adds them to class folders")
