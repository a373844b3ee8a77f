"""The fine-tuning loop on a tiny generated dataset: arms, run directory, resume, guards, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import interrupted_at_call

import icnn_compress.train._finetune
import icnn_compress.train._pretrain
from icnn_compress.runs.model_file import load_model_file
from icnn_compress.runtime.files import atomic_save
from icnn_compress.errors import CheckpointError, DatasetError, ModelError, RunFolderError, TrainingError
from icnn_compress.evaluate import evaluate_run
from icnn_compress.models.registry import build_base_model
from icnn_compress.runs.open import load_run_model
from icnn_compress.runtime.device import resolve_device
from icnn_compress.train import finetune, lr_at, pretrain


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_icnn_run_writes_a_complete_run_directory(tiny_recipe, tmp_path):
    run = tmp_path / "icnn"
    record = finetune(tiny_recipe(), run, arm="icnn", progress=False)
    assert {p.name for p in run.iterdir()} >= {"model.pt", "last.pt", "metrics.jsonl", "recipe.toml"}
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["kappa"] == pytest.approx(3e-4 / 2)
    top = records[0]["layers"]["features.14.mask"]
    assert top["filters"] == 128 and "R" in top and top["R"] > 0 and "neg_mi" in top
    assert record["epoch"] == 2
    model, saved = load_run_model(run)
    assert saved["arm"] == "icnn" and saved["architecture"]["masks"] == ["features.14.mask", "features.14.new_mask"]
    assert saved["choices"]["peak"] == "centroid"
    result = evaluate_run(run, json_path=tmp_path / "eval.json", device="cpu")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert set(written) >= {"accuracy", "location_instability", "split", "num_images"}
    assert written["split"] == "test" and written["num_images"] == 32
    assert 0.0 <= result["accuracy"] <= 1.0 and result["location_instability"] >= 0


def test_resume_continues_to_the_same_weights_as_one_run(tiny_recipe, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    finetune(tiny_recipe(), straight, arm="masks-only", progress=False)
    split = tmp_path / "split"
    with interrupted_at_call(monkeypatch, icnn_compress.train._finetune, "validate_filters"):  # in epoch 2
        finetune(tiny_recipe(), split, arm="masks-only", progress=False)
    assert not (split / "model.pt").exists() and [r["epoch"] for r in _records(split)] == [1]
    finetune(tiny_recipe(), split, arm="masks-only", resume=True, progress=False)
    assert [r["epoch"] for r in _records(split)] == [1, 2]
    a, _ = load_run_model(straight)
    b, _ = load_run_model(split)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_recipe("train.epochs=1"), run, arm="baseline", progress=False)
    with pytest.raises(RunFolderError, match="pass --resume"):
        finetune(tiny_recipe(), run, arm="baseline", progress=False)
    with pytest.raises(TrainingError, match="no last.pt to resume from"):
        finetune(tiny_recipe(), tmp_path / "empty", arm="baseline", resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path):
    run = tmp_path / "nan"
    finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", progress=False)
    good = torch.load(run / "last.pt", weights_only=True)
    (run / "model.pt").unlink()
    with pytest.raises(TrainingError, match=r"NaN or infinite in epoch 2.*last good checkpoint.*epoch 1"):
        finetune(tiny_recipe("train.lr=1e30", "train.schedule=constant", "icnn.collapse_guard=false"), run,
                 arm="icnn", resume=True, force=True, progress=False)
    kept = torch.load(run / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


def _with_split(tiny_parts, tmp_path, is_train):
    """A copy of the tiny parts set whose train/test flags are ``is_train(image_id, class_id)``."""
    root = tmp_path / "parts"
    shutil.copytree(tiny_parts, root)
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines())
    (root / "train_test_split.txt").write_text(
        "".join(f"{i} {int(is_train(int(i), int(c)))}\n" for i, c in labels.items()))
    return root


def test_an_empty_train_split_is_refused_before_any_model_is_built(tiny_recipe, tiny_parts, tmp_path):
    root = _with_split(tiny_parts, tmp_path, lambda i, c: False)
    with pytest.raises(DatasetError, match=r"train split of .*parts has no image"):
        finetune(tiny_recipe(f"data.root={root}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # the lock taken and given back, nothing left


def test_a_class_with_no_training_image_is_named_in_a_warning(tiny_recipe, tiny_parts, tmp_path, caplog):
    root = _with_split(tiny_parts, tmp_path, lambda i, c: c != 4)
    with caplog.at_level(logging.WARNING, logger="icnn_compress.train"):
        finetune(tiny_recipe(f"data.root={root}", "train.epochs=1"), tmp_path / "run", arm="baseline",
                 progress=False)
    assert "1 of 4 classes have no training image (spiker)" in caplog.text


def test_an_epoch_that_leaves_an_infinite_buffer_is_never_the_last_good_one(tiny_recipe, tmp_path, monkeypatch):
    run = tmp_path / "inf"
    real, calls = icnn_compress.train._finetune._train_epoch, []

    def corrupt_epoch_2(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # as a loss of 5e29 once left BatchNorm's running_var at inf
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return stats

    monkeypatch.setattr(icnn_compress.train._finetune, "_train_epoch", corrupt_epoch_2)
    with pytest.raises(TrainingError, match=r"running_var became NaN or infinite in epoch 2; the filter loss is off "
                                            r"in this arm, so the learning rate is the cause: lower train.lr"):
        finetune(tiny_recipe(), run, arm="baseline", progress=False)
    kept = torch.load(run / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_a_divergence_that_lowering_kappa_does_not_cure_names_the_learning_rate(tiny_recipe, tmp_path):
    run = tmp_path / "lr"
    finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", progress=False)
    (run / "model.pt").unlink()
    with pytest.raises(TrainingError, match=r"diverged again after the collapse guard lowered kappa0 to .*so the "
                                            r"learning rate is the likely cause: lower train.lr \(now 1e\+30\)"):
        finetune(tiny_recipe("train.lr=1e30", "train.schedule=constant"), run, arm="icnn", resume=True, force=True,
                 progress=False)
    verdicts = [r.get("collapse") for r in _records(run) if r["epoch"] == 2]
    assert verdicts == ["the loss is not finite"]  # one back-off, not five


def test_num_classes_that_is_not_the_datas_is_refused(tiny_recipe, tmp_path):
    with pytest.raises(ModelError, match=r"model.num_classes is 3 but the data has 4 classes \(glider, walker, "
                                         r"roller, spiker\)"):
        finetune(tiny_recipe("model.num_classes=3"), tmp_path / "run", progress=False)


def test_checkpoint_for_another_architecture_names_keys_and_fix(tiny_recipe, tmp_path):
    path = tmp_path / "resnet.pth"
    atomic_save(build_base_model("resnet18", num_classes=4).state_dict(), path)
    with pytest.raises(CheckpointError, match="another architecture: check model.arch"):
        finetune(tiny_recipe(f"model.checkpoint={path}"), tmp_path / "run", progress=False)


def test_checkpoint_with_other_class_count_asks_for_reset_head(tiny_recipe, tmp_path):
    path = tmp_path / "ten.pth"
    atomic_save(build_base_model("icnn_compress.zoo:small_cnn", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match="10 classes but the model has 4.*--set model.reset_head=true"):
        finetune(tiny_recipe(f"model.checkpoint={path}"), tmp_path / "run", progress=False)


def test_pretrain_writes_a_loadable_plain_state_dict(tiny_recipe, tmp_path):
    path = pretrain(tiny_recipe("pretrain.epochs=1"), tmp_path / "plain", progress=False)
    state = torch.load(path, weights_only=True)
    build_base_model("icnn_compress.zoo:small_cnn", num_classes=4).load_state_dict(state)


def test_an_interrupted_pretrain_resumes_to_the_same_weights(tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe("pretrain.epochs=2")
    straight = torch.load(pretrain(recipe, tmp_path / "straight", progress=False), weights_only=True)
    with interrupted_at_call(monkeypatch, icnn_compress.train._pretrain, "validate"):  # in epoch 2
        pretrain(recipe, tmp_path / "split", progress=False)
    assert not (tmp_path / "split" / "model.pth").exists()
    with pytest.raises(RunFolderError, match="pass --resume"):
        pretrain(recipe, tmp_path / "split", progress=False)
    resumed = torch.load(pretrain(recipe, tmp_path / "split", resume=True, progress=False), weights_only=True)
    assert [r["epoch"] for r in _records(tmp_path / "split")] == [1, 2]
    for key, value in straight.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key


def test_a_device_torch_does_not_know_is_a_clear_error():
    with pytest.raises(TrainingError, match=r"^train.device is 'banana', which is not a device torch knows"):
        resolve_device("banana")
    assert resolve_device("cpu") == torch.device("cpu")


def test_learning_rate_schedules():
    assert lr_at(1e-2, 1e-3, "constant", 10, 5, 0.5, 10) == 1e-2
    assert lr_at(1e-4, 1e-5, "paper", 10, 1, 0.0, 50) == pytest.approx(1e-4)
    assert lr_at(1e-4, 1e-5, "paper", 10, 10, 0.0, 50) == pytest.approx(1e-5)
    assert lr_at(1e-4, 1e-5, "paper", 10, 30, 0.0, 50) == pytest.approx(1e-5)
    assert lr_at(1e-4, 1e-5, "paper", 10, 4, 0.0, 50) == pytest.approx(1e-4 * 10 ** (-3 / 9))
    assert lr_at(1e-2, 1e-3, "cosine", 10, 1, 0.0, 4) == pytest.approx(1e-2)
    assert lr_at(1e-2, 1e-3, "cosine", 10, 3, 0.0, 4) == pytest.approx(5.5e-3)



def test_a_kappa_ten_times_too_large_is_backed_off_and_the_run_ends_alive(learned_plain, tmp_path):
    """METHOD.md §8: ten times the working κ ruins the model. The guard must see it at epoch 1 (R far
    above the collapse edge), restore, lower κ and finish with live filters and the auto run's accuracy."""
    auto = finetune(learned_plain(), tmp_path / "auto", progress=False)
    kappa0 = load_model_file(tmp_path / "auto" / "model.pt")["kappa0"]
    final = finetune(learned_plain(f"icnn.kappa={10 * kappa0}"), tmp_path / "x10", progress=False)

    records = _records(tmp_path / "x10")
    collapsed = [r for r in records if "collapse" in r]
    seen = [(r["epoch"], r["val_acc"], r["layers"]["features.14.mask"]["R"], r.get("collapse")) for r in records]
    assert collapsed and collapsed[0]["epoch"] == 1, seen
    assert "R at features.14.mask reached" in collapsed[0]["collapse"]
    assert collapsed[0]["kappa0"] == pytest.approx(10 * kappa0)
    good = [r for r in records if "collapse" not in r]
    assert [r["epoch"] for r in good] == [1, 2, 3]
    assert good[0]["kappa0"] < 10 * kappa0 / 3  # lowered at least by the guard's default factor
    for layer in final["layers"].values():
        assert layer["dead"] <= 0.1 * layer["filters"]
    assert final["val_acc"] >= auto["val_acc"] - 0.05, (seen, auto["val_acc"])
    assert auto["val_acc"] >= 0.65  # the plain model learned: the comparison means something


def test_resume_after_the_last_epoch_saves_the_last_epochs_record(tiny_recipe, tmp_path, caplog):
    run = tmp_path / "run"
    first = finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", progress=False)
    _, saved = load_run_model(run)
    (run / "model.pt").unlink()  # as if interrupted between the last last.pt and model.pt
    with open(run / "metrics.jsonl", "a") as f:  # and a record of an epoch that last.pt does not hold
        f.write(json.dumps({"stage": "finetune", "epoch": 2}) + "\n")
    with caplog.at_level("INFO", logger="icnn_compress.train"):
        again = finetune(tiny_recipe("train.epochs=1"), run, arm="icnn", resume=True, progress=False)
    assert "had finished epoch 1 of 1: writing model.pt from last.pt" in caplog.text
    assert again == first and again["epoch"] == 1 and "val_acc" in again
    _, resaved = load_run_model(run)
    assert resaved["final"] == saved["final"] and resaved["kappa0"] == saved["kappa0"]
    assert [r["epoch"] for r in _records(run)] == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_without_cuda_is_refused_with_the_fix(tiny_recipe, tmp_path):
    with pytest.raises(TrainingError, match="train.cuda_graphs needs a CUDA device.*train.compile = true"):
        finetune(tiny_recipe("train.cuda_graphs=true", "train.device=cpu"), tmp_path / "run", progress=False)


def test_compile_recipe_compiles_the_filter_loss(tiny_recipe):
    from icnn_compress.train import build_for_recipe
    from icnn_compress.train._setup import _filter_loss

    for flag in (False, True):
        recipe = tiny_recipe(f"train.compile={str(flag).lower()}")
        model, _ = build_for_recipe(recipe, arm="icnn", classes=list("abcd"), image_size=64)
        fl = _filter_loss(model, recipe)
        assert fl.compile is flag and all(m.compiled is flag for m in fl.masks.values())


def test_anchored_training_moves_the_masks_templates_and_evaluation_does_not(tiny_recipe, tmp_path, monkeypatch):
    from icnn_compress.method.mask import InterpretableMask

    seen = []  # (training, anchored) of every masked forward
    forward = InterpretableMask.forward

    def spy(self, x):
        seen.append((self.training, self.anchor is not None))
        return forward(self, x)

    monkeypatch.setattr(InterpretableMask, "forward", spy)
    run = tmp_path / "anchored"
    finetune(tiny_recipe("icnn.anchor=landmarks", "train.epochs=1", "icnn.kappa=0", "data.hflip=true"), run,
             arm="icnn", progress=False)
    assert {a for t, a in seen if t} == {True} and {a for t, a in seen if not t} == {False}
    assert load_run_model(run)[1]["choices"]["anchor"] == "landmarks"


def test_anchor_landmarks_flip_with_their_images_and_need_landmarks():
    from types import SimpleNamespace

    from icnn_compress.method.mask import InterpretableMask
    from icnn_compress.train._finetune import _anchor_parts
    from icnn_compress.train._loop import _maybe_anchored

    mask = InterpretableMask(2, num_classes=1)
    setup = SimpleNamespace(recipe=SimpleNamespace(data=SimpleNamespace(image_size=32), icnn=SimpleNamespace(
        anchor="landmarks")), device=torch.device("cpu"), train_data=SimpleNamespace(landmark_names=[], root="d"))
    batch = {"landmarks": torch.tensor([[[10.0, 5.0]], [[10.0, 5.0]]]), "visible": torch.tensor([[True], [False]])}
    with _maybe_anchored(mask, batch, torch.tensor([True, False]), setup, [0]):
        xy, valid, size = mask.anchor
        assert xy.tolist() == [[[22.0, 5.0], [22.0, 5.0]], [[10.0, 5.0], [10.0, 5.0]]] and size == 32
        assert valid.tolist() == [[True, True], [False, False]]
    assert mask.anchor is None
    with pytest.raises(DatasetError, match="has no landmarks: set icnn.anchor = 'none'"):
        _anchor_parts(setup.recipe, setup)
    setup.train_data.landmark_names = ["head", "body"]
    assert _anchor_parts(setup.recipe, setup) == [0, 1]
