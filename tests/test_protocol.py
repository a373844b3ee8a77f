"""The measurement protocols: an independent float64 version of the released evaluation, where each protocol
reads the maps, the class rules, the validation split and the single-category task."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import icnn_compress.data._samples
from icnn_compress.data.cub import CubDataset
from icnn_compress.data.recipe import open_split
from icnn_compress.evaluate import evaluate, evaluate_run
from icnn_compress.method.metrics import min_instability_classes
from icnn_compress.method.protocol import measure_points, read_map, released_classes
from icnn_compress.models.surgery import make_interpretable
from icnn_compress.train import finetune
from icnn_compress.zoo import small_cnn

S = 6  # identity layer: filter d's map is image channel d, cell (r, c) centred at pixel (c + .5, r + .5)


def _identity_model() -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.AdaptiveMaxPool2d(1), nn.Flatten())


def _released_reference(maps, labels, landmarks, visible, num_classes, top_k):
    """The released code's evaluation, written out in plain Python floats (float64)."""
    n, d = maps.shape[:2]
    diag = S * math.sqrt(2.0)
    per_filter = []
    for f in range(d):
        peak, where = [], []
        for i in range(n):
            flat = [float(v) for v in maps[i, f].flatten()]
            best = max(flat)
            cell = flat.index(best)  # first cell in row-major order on ties
            peak.append(best)
            where.append(((cell % S) + 0.5, (cell // S) + 0.5))
        means = []
        for c in range(num_classes):
            own = [peak[i] for i in range(n) if labels[i] == c]
            means.append(sum(own) / len(own) if own else -math.inf)
        cls = means.index(max(means))
        stds = []
        for k in range(len(landmarks[0])):
            eligible = [i for i in range(n) if labels[i] == cls and visible[i][k]]
            if not eligible:
                continue  # the filter's class never shows this part: not one of its landmarks
            eligible.sort(key=lambda i: (-peak[i], i))
            top = eligible[:top_k]
            if len(top) < 2:
                stds = None  # the whole filter is dropped
                break
            stds.append(statistics.stdev(
                math.dist(landmarks[i][k], where[i]) / diag for i in top))
        per_filter.append(None if stds is None else sum(stds) / len(stds))
    kept = [v for v in per_filter if v is not None]
    return per_filter, (sum(kept) / len(kept) if kept else None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_protocol_matches_an_independent_released_evaluation(seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, k, c = 40, 3, 3, 3
    maps = torch.randint(0, 3, (n, d, S, S), generator=gen).double()  # small integers: many ties
    labels = torch.randint(0, c, (n,), generator=gen)
    landmarks = torch.rand(n, k, 2, generator=gen, dtype=torch.float64) * S
    visible = torch.rand(n, k, generator=gen) < torch.tensor([0.9, 0.15, 0.0])  # one sparse, one never seen
    batches = [{"image": maps[s:s + 16].float(), "label": labels[s:s + 16], "landmarks": landmarks[s:s + 16].float(),
                "visible": visible[s:s + 16], "index": torch.arange(s, min(n, s + 16))} for s in range(0, n, 16)]
    out = evaluate(_identity_model(), batches, layers=["0"], classes=list("abc"), landmark_names=list("xyz"),
                   image_size=S, protocol="official", class_rule="released", top_k=5)
    per_filter, mean = _released_reference(maps, labels.tolist(), landmarks.float().double().tolist(),
                                           visible.tolist(), c, top_k=5)
    layer = out["layers"]["0"]
    assert layer["per_filter"] == [None if v is None else pytest.approx(v, rel=1e-6) for v in per_filter]
    assert layer["dropped_filters"] == sum(v is None for v in per_filter)
    assert out["location_instability"] == (None if mean is None else pytest.approx(mean, rel=1e-6))
    assert out["protocol"] == "official" and layer["class_rule"] == "released"


def test_sparse_landmark_drops_the_filter_only_under_official():
    maps = torch.zeros(4, 1, S, S)
    maps[:, 0, 1, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    maps[2, 0, 4, 4] = 5.0  # image 2 peaks elsewhere
    landmarks = torch.full((4, 2, 2), 1.5)
    visible = torch.tensor([[True, True], [True, False], [True, False], [True, False]])  # landmark 1: one image
    batch = [{"image": maps, "label": torch.zeros(4, dtype=torch.long), "landmarks": landmarks, "visible": visible,
              "index": torch.arange(4)}]
    args = dict(layers=["0"], classes=["a"], landmark_names=["p", "q"], image_size=S, class_rule="released")
    official = evaluate(_identity_model(), batch, protocol="official", **args)["layers"]["0"]
    kept = evaluate(_identity_model(), batch, protocol="paper", **args)["layers"]["0"]
    assert official["per_filter"] == [None] and official["dropped_filters"] == 1
    assert kept["per_filter"][0] > 0 and kept["dropped_filters"] == 0


def test_a_part_the_filters_class_never_shows_drops_nothing():
    # class 0 shows both parts; class 1 has no part 1 at all (a glider has no leg): its filter is kept
    maps = torch.zeros(4, 2, S, S)
    maps[:2, 0, 1, 1] = torch.tensor([4.0, 3.0])  # filter 0 fires on class 0
    maps[2:, 1, 2, 2] = torch.tensor([4.0, 3.0])  # filter 1 fires on class 1
    maps[3, 1, 4, 4] = 5.0
    landmarks = torch.full((4, 2, 2), 1.5)
    visible = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    batch = [{"image": maps, "label": torch.tensor([0, 0, 1, 1]), "landmarks": landmarks, "visible": visible,
              "index": torch.arange(4)}]
    out = evaluate(_identity_model(), batch, layers=["0"], classes=["a", "b"], landmark_names=["p", "q"],
                   image_size=S, protocol="official", class_rule="released")["layers"]["0"]
    assert out["filter_category"] == [0, 1] and out["dropped_filters"] == 0
    # filter 1 is measured on part 0 alone: peaks at cell (2, 2) and (4, 4), the part at (1.5, 1.5)
    near, far = math.dist((1.5, 1.5), (2.5, 2.5)), math.dist((1.5, 1.5), (4.5, 4.5))
    assert out["per_filter"][1] == pytest.approx(statistics.stdev([near, far]) / (S * math.sqrt(2.0)))


def test_class_rules_on_a_constructed_case():
    # filter 0: class 0 images give the larger peaks, but its peak wanders there; on class 1 it sits still.
    n = 8
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    peak = torch.tensor([[9.0], [8.0], [7.0], [6.0], [2.0], [2.0], [1.0], [1.0]], dtype=torch.float64)
    xy = torch.tensor([[[0.5, 0.5]], [[3.0, 3.0]], [[5.5, 3.0]], [[3.0, 2.5]]] + [[[2.5, 2.5]]] * 4,
                      dtype=torch.float64)
    landmarks = torch.full((n, 1, 2), 3.0, dtype=torch.float64)
    visible = torch.ones(n, 1, dtype=torch.bool)
    assert released_classes(peak, labels, 2).tolist() == [0]
    paper = min_instability_classes(peak, xy, landmarks, visible, labels, num_classes=2, image_diagonal=S * 2 ** 0.5)
    assert paper.tolist() == [1]
    # a class without images never wins the released rule, even against all-negative means
    assert released_classes(-peak, labels.clamp(max=0), 3).tolist() == [0]


def _tiny_icnn(peak: str = "centroid") -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = small_cnn(num_classes=3)
    layout = make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=3, image_size=32,
                                top_layer="features.14", peak=peak)
    return model.eval(), {**layout, "new_filters": layout["new_filters"]}


def _read(model, layout, protocol, images):
    points = measure_points(model, layout["masks"], protocol, architecture=layout)
    seen = {}
    handles = []
    for name, point in points.items():
        module = model.get_submodule(point.module)

        def hook(mod, inputs, output, name=name, point=point):
            seen[name] = read_map(point, mod, inputs, output).clone()
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return points, seen


def test_official_reads_each_filter_before_its_own_mask():
    model, layout = _tiny_icnn()
    top, second = layout["masks"]
    points = measure_points(model, layout["masks"], "official", architecture=layout)
    assert (points[top].module, points[top].where) == (top, "input")
    assert (points[second].module, points[second].where) == ("features.14.conv", "output")
    images = torch.randn(6, 3, 32, 32)
    masks = [model.get_submodule(n) for n in layout["masks"]]
    for m in masks:
        m.active = False
    _, off = _read(model, layout, "official", images)
    model.get_submodule(second).active = True  # the new conv's own mask: its raw output does not move
    _, on = _read(model, layout, "official", images)
    assert torch.equal(off[second], on[second]) and torch.equal(off[top], on[top])
    model.get_submodule(top).active = True  # the top mask: its input does not move
    _, on_top = _read(model, layout, "official", images)
    assert torch.equal(off[top], on_top[top])
    # the mask's own output (the measure before the fix) is what the mask changes
    _, masked = _read(model, layout, "masked-output", images)
    assert not torch.equal(masked[top], off[top])


def test_paper_protocol_keeps_the_argmax_where_it_was():
    model, layout = _tiny_icnn()
    images = torch.randn(6, 3, 32, 32)
    _, raw = _read(model, layout, "official", images)
    _, paper = _read(model, layout, "paper", images)
    top = layout["masks"][0]
    b, d, h, w = raw[top].shape
    assert torch.equal(paper[top].reshape(b, d, -1).amax(-1), raw[top].reshape(b, d, -1).amax(-1))
    moved = raw[top].reshape(b, d, -1).argmax(-1) != paper[top].reshape(b, d, -1).argmax(-1)
    alive = raw[top].reshape(b, d, -1).amax(-1) > 0
    assert not (moved & alive).any()


def test_validation_split_is_seeded_stratified_and_disjoint_from_test(tiny_parts):
    full = CubDataset(tiny_parts, split="train", image_size=16)
    train = CubDataset(tiny_parts, split="train", image_size=16, val_fraction=0.25, val_seed=3)
    val = CubDataset(tiny_parts, split="val", image_size=16, val_fraction=0.25, val_seed=3)
    test = CubDataset(tiny_parts, split="test", image_size=16, val_fraction=0.25, val_seed=3)
    assert set(train.image_ids).isdisjoint(val.image_ids)
    assert set(train.image_ids) | set(val.image_ids) == set(full.image_ids)
    assert set(test.image_ids).isdisjoint(set(train.image_ids) | set(val.image_ids))
    assert torch.bincount(val.labels).tolist() == [6, 6, 6, 6]  # 25 % of each class's 24
    again = CubDataset(tiny_parts, split="val", image_size=16, val_fraction=0.25, val_seed=3)
    other = CubDataset(tiny_parts, split="val", image_size=16, val_fraction=0.25, val_seed=4)
    assert again.image_ids == val.image_ids and other.image_ids != val.image_ids


def test_training_never_reads_a_test_image(tiny_recipe, tiny_parts, tmp_path, monkeypatch):
    opened = []
    real_open = icnn_compress.data._samples.open_image  # every reader opens its images there

    def recording_open(file, mode):
        opened.append(str(file))
        return real_open(file, mode)

    monkeypatch.setattr(icnn_compress.data._samples, "open_image", recording_open)
    recipe = tiny_recipe("train.epochs=1")
    test_paths = {str(p) for p in open_split(recipe.data, "test", progress=False).image_paths}
    opened.clear()
    finetune(recipe, tmp_path / "run", arm="icnn", progress=False)  # the κ guard reads its split too
    assert opened and not test_paths & set(opened)
    opened.clear()
    evaluate_run(tmp_path / "run", device="cpu")
    assert test_paths <= set(opened)  # only evaluation reads the test split


def test_single_category_task_measures_the_object(tiny_recipe, tmp_path):
    recipe = tiny_recipe("train.epochs=1", "icnn.task=single-category", "icnn.object=glider",
                         "model.reset_head=true")
    run = tmp_path / "single"
    finetune(recipe, run, arm="icnn", progress=False)
    result = evaluate_run(run, device="cpu")
    assert result["task"] == {"task": "single-category", "object": "glider"}
    top = result["layers"]["features.14.mask"]
    assert top["class_rule"] == "single-category"
    assert top["category_histogram"] == {"other": 0, "glider": 128}
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_images"] == 32
