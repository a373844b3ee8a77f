"""evaluate(): one pass over a fake loader with a hand-built model whose peaks are known."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from icnn_compress.evaluate import evaluate

S = 8
DIAG = S * math.sqrt(2.0)
# Landmark 0 ("head") sits on these pixels (row, col); filter 0 copies channel 0, which lights exactly
# there, filter 1 copies channel 1, which always lights pixel (1, 1).
HEAD_PIXELS = [(1, 1), (5, 4), (4, 5), (4, 1)]
A = [2.0, 1.0, 3.0, 1.0]  # channel-0 peak: logit of class 0
B = [1.0, 2.0, 1.0, 2.0]  # channel-1 peak: logit of class 1 -> predictions 0, 1, 0, 1
LABELS = [0, 1, 1, 1]  # accuracy 3/4
CLASSES = ["a", "b"]
LANDMARKS = ["head", "tail"]


def _model(pool: bool = False) -> nn.Module:
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = 1.0
    layers = [conv, nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else []) + [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _loader(batch_size: int = 2) -> list[dict]:
    n = len(HEAD_PIXELS)
    image = torch.zeros(n, 3, S, S)
    landmarks = torch.zeros(n, 2, 2)
    for i, (r, c) in enumerate(HEAD_PIXELS):
        image[i, 0, r, c] = A[i]
        image[i, 1, 1, 1] = B[i]
        landmarks[i, 0] = torch.tensor([c + 0.5, r + 0.5])  # (x, y) of the pixel centre
    visible = torch.tensor([[True, False]] * n)  # the tail is never visible
    labels = torch.tensor(LABELS)
    return [
        {"image": image[s:s + batch_size], "label": labels[s:s + batch_size],
         "landmarks": landmarks[s:s + batch_size], "visible": visible[s:s + batch_size],
         "index": torch.arange(s, min(n, s + batch_size))}
        for s in range(0, n, batch_size)
    ]


def _run(model: nn.Module, **kw) -> dict:
    args = dict(layers=["1"], classes=CLASSES, landmark_names=LANDMARKS, image_size=S)
    args.update(kw)
    return evaluate(model, _loader(), **args)


def test_accuracy_and_instability_exact() -> None:
    model = _model()
    model.train()
    out = _run(model, device="cpu")
    assert out["accuracy"] == 0.75
    assert out["num_images"] == 4
    layer = out["layers"]["1"]
    # Filter 0 peaks on the head (D = 0); filter 1 stays at pixel (1, 1): distances 0, 5, 5, 3 px.
    d1 = statistics.stdev([0.0, 5.0, 5.0, 3.0]) / DIAG
    assert layer["per_filter"] == [0.0, pytest.approx(d1)]
    assert out["location_instability"] == pytest.approx(d1 / 2)
    assert layer["location_instability"] == out["location_instability"]
    assert layer["num_filters"] == 2
    assert layer["landmark_tracking"] == {"head": 2, "tail": 0}
    assert "category_histogram" not in layer
    assert layer["geometry"]["offset"] == [0.5, 0.5] and layer["geometry"]["stride"] == [1.0, 1.0]
    assert layer["geometry"]["map_size"] == [S, S]
    # References on the same data: the oracle floor is exact here (landmarks on cell centres).
    assert layer["oracle_reference"] == 0.0
    assert layer["random_reference"] > 0.05
    json.dumps(out, allow_nan=False)
    # The caller's model is left as it was: training mode and no leftover hooks.
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_cls_rule_and_category_histogram() -> None:
    out = _run(_model(), filter_category={"1": torch.tensor([0, 1])})
    layer = out["layers"]["1"]
    # Filter 0 (class "a") has a single image of its class: undefined. Filter 1 (class "b"): images
    # 1, 2, 3 at distances 5, 5, 3 px.
    d1 = statistics.stdev([5.0, 5.0, 3.0]) / DIAG
    assert layer["per_filter"] == [None, pytest.approx(d1)]
    assert out["location_instability"] == pytest.approx(d1)
    assert layer["category_histogram"] == {"a": 1, "b": 1}
    json.dumps(out, allow_nan=False)


def test_pooled_layer_uses_its_own_geometry() -> None:
    # After a 2×2 max-pool, cell (i, j) is centred on pixel (2j + 1, 2i + 1): filter 0's cell centre
    # is always sqrt(0.5) px from the head, so D = 0; filter 1 sits at (1, 1).
    out = _run(_model(pool=True), layers=["2", "1"], progress=True)
    pooled = out["layers"]["2"]
    assert pooled["geometry"]["offset"] == [1.0, 1.0] and pooled["geometry"]["stride"] == [2.0, 2.0]
    assert pooled["geometry"]["map_size"] == [S // 2, S // 2]
    dists = [math.dist((1.0, 1.0), (c + 0.5, r + 0.5)) / DIAG for r, c in HEAD_PIXELS]
    assert pooled["per_filter"][0] == pytest.approx(0.0, abs=1e-7)
    assert pooled["per_filter"][1] == pytest.approx(statistics.stdev(dists), rel=1e-6)
    assert out["location_instability"] == pooled["location_instability"]  # the first layer listed
    assert set(out["layers"]) == {"1", "2"}


def test_all_zero_maps_are_measured() -> None:
    model = _model()
    with torch.no_grad():
        model[0].weight.zero_()  # every map is 0: every peak is cell (0, 0) at (0.5, 0.5)
    out = _run(model)
    d = statistics.stdev([math.dist((0.5, 0.5), (c + 0.5, r + 0.5)) / DIAG for r, c in HEAD_PIXELS])
    assert out["layers"]["1"]["per_filter"] == [pytest.approx(d), pytest.approx(d)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu = _run(_model(), device="cpu")
    cuda = _run(_model(), device="cuda")
    assert cuda["accuracy"] == cpu["accuracy"]
    assert cuda["location_instability"] == pytest.approx(cpu["location_instability"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no module named"):
        _run(_model(), layers=["conv9"])
    with pytest.raises(ValueError, match="every measured layer"):
        _run(_model(), layers=["1"], filter_category={"0": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="landmark names"):
        _run(_model(), landmark_names=["head"])


def test_a_run_reads_its_recipe_limits_but_a_given_folder_whole(tiny_recipe, tiny_parts, tmp_path) -> None:
    from icnn_compress.runs.model_file import save_model_file
    from icnn_compress.config import recipe_to_dict
    from icnn_compress.data.recipe import open_split
    from icnn_compress.evaluate import evaluate_run
    from icnn_compress.train import build_for_recipe

    recipe = tiny_recipe("data.limit_test=5")
    classes = open_split(recipe.data, "test", progress=False).classes
    model, architecture = build_for_recipe(recipe, arm="icnn", classes=list(classes), image_size=64)
    save_model_file(tmp_path / "run" / "model.pt", state_dict=model.state_dict(), architecture=architecture,
                    classes=classes, extra={"recipe": recipe_to_dict(recipe), "arm": "icnn"})
    own = evaluate_run(tmp_path / "run", device="cpu")
    assert own["num_images"] == 5 and own["data_root"] is None
    other = evaluate_run(tmp_path / "run", data_root=tiny_parts, device="cpu")
    assert other["num_images"] == 32 and other["data_root"] == str(tiny_parts)  # 4 × 8


def test_a_folder_of_other_classes_is_refused_with_a_hint(tiny_recipe, tmp_path, capsys) -> None:
    from icnn_compress.runs.model_file import save_model_file
    from icnn_compress.cli import main
    from icnn_compress.config import recipe_to_dict
    from icnn_compress.data import generate_parts_dataset
    from icnn_compress.errors import DatasetError
    from icnn_compress.evaluate import evaluate_run
    from icnn_compress.train import build_for_recipe

    recipe = tiny_recipe()
    classes = ["a", "b", "c", "d"]
    model, architecture = build_for_recipe(recipe, arm="icnn", classes=classes, image_size=64)
    save_model_file(tmp_path / "run" / "model.pt", state_dict=model.state_dict(), architecture=architecture,
                    classes=classes, extra={"recipe": recipe_to_dict(recipe), "arm": "icnn"})
    other = generate_parts_dataset(tmp_path / "two", seed=3, num_classes=2, train_per_class=1, test_per_class=2,
                                   progress=False)
    with pytest.raises(DatasetError, match=r"not the model's \['a', 'b', 'c', 'd'\].*--data"):
        evaluate_run(tmp_path / "run", data_root=other, device="cpu")
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(other)]) == 2
    assert "pass the dataset the run was trained on" in capsys.readouterr().err


def test_diversity_and_part_interpretability_exact() -> None:
    batches = _loader()
    for batch in batches:
        n = batch["image"].shape[0]
        masks = torch.zeros(n, 2, S, S, dtype=torch.bool)  # the tail's mask is empty on every image
        for j, i in enumerate(batch["index"].tolist()):
            r, c = HEAD_PIXELS[i]
            masks[j, 0, r, c] = True  # the head is the one pixel channel 0 lights
        batch["part_masks"] = masks
    args = dict(layers=["1"], classes=CLASSES, landmark_names=LANDMARKS, image_size=S)
    layer = evaluate(_model(), batches, **args)["layers"]["1"]
    # Both filters track the head (the tail is never visible): one landmark of two covered, entropy 0.
    assert layer["landmark_entropy"] == 0.0 and layer["landmark_coverage"] == 0.5
    assert layer["coverage_fraction"] == 0.1
    # Top 0.5 % of 4 x 64 cells = the 2nd largest value: filter 0's regions are its peaks 2 and 3 (images 0
    # and 2), each exactly the head pixel (IoU 1); filter 1's are pixel (1, 1) on images 1 and 3, off the head.
    assert layer["part_interpretability"] == 0.25
    assert layer["part_interpretability_per_part"] == {"head": 0.25, "tail": None}
    plain = evaluate(_model(), batches, parts=False, **args)["layers"]["1"]
    assert "part_interpretability" not in plain
