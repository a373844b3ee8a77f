"""compare: each measure on constructed maps with known answers, every explainer on a tiny ICNN, a run end to end."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from icnn_compress.compare import (
    EXPLAINERS,
    CompareSettings,
    IcnnMaps,
    compare,
    compare_html_section,
    compare_run,
    conductance_exclusivity,
    curve_auc,
    format_compare_table,
    map_rank_correlation,
    map_peaks,
    peak_distance_spread,
    perturbation_curves,
    pixel_ranks,
    pointing_game,
    upsample_to_input,
)
from icnn_compress.compare._compare import _robustness
from icnn_compress.method.receptive_field import LayerGeometry, layer_geometry
from icnn_compress.models.surgery import make_interpretable
from icnn_compress.zoo import small_cnn

FAST = dict(batch_size=4, ig_steps=4, conductance_steps=4, smoothgrad_samples=2, infidelity_samples=2,
            sensitivity_samples=2, steps=4, internal_batch_size=64, occlusion_window=0.25, occlusion_stride=0.25)


# ------------------------------------------------------------------------------------------------
# Up-sampling through the receptive fields


def test_upsample_places_cells_at_their_receptive_field_centres_and_interpolates_linearly():
    g = LayerGeometry(offset=(4.0, 4.0), stride=(8.0, 8.0))
    cells = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # (1, 2, 2): 0 in column 0, 1 in column 1
    up = upsample_to_input(cells, g, 16)
    px = torch.arange(16, dtype=torch.float64) + 0.5
    # Column centres at x = 4 and 12 px: linear in between, the border value beyond.
    expected = ((px - 4.0) / 8.0).clamp(0, 1)
    torch.testing.assert_close(up[0].double(), expected.expand(16, 16), atol=1e-6, rtol=0)


def test_upsample_one_hot_cell_peaks_at_the_cell_centre_and_constant_stays_constant():
    g = LayerGeometry(offset=(3.5, 2.5), stride=(4.0, 4.0))
    cells = torch.zeros(1, 4, 4)
    cells[0, 2, 1] = 1.0
    up = upsample_to_input(cells, g, 16)
    row, col = divmod(int(up[0].argmax()), 16)
    assert [col + 0.5, row + 0.5] == g.cell_centres(torch.tensor([2, 1])).tolist() == [6.5, 11.5]
    assert float(up[0, row, col]) == pytest.approx(1.0)
    torch.testing.assert_close(upsample_to_input(torch.full((2, 4, 4), 3.0), g, 16), torch.full((2, 16, 16), 3.0))


# ------------------------------------------------------------------------------------------------
# Peaks and the pointing game


def test_map_peaks_unique_ties_and_flat_maps():
    maps = torch.zeros(3, 8, 8)
    maps[0, 2, 5] = 1.0  # unique peak at (x, y) = (5.5, 2.5)
    maps[1, 1, 1] = maps[1, 6, 6] = 2.0  # a tie between two pixels
    # maps[2] is flat
    xy, flat = map_peaks(maps, generator=torch.Generator().manual_seed(0))
    assert xy[0].tolist() == [5.5, 2.5]
    assert xy[1].tolist() in ([1.5, 1.5], [6.5, 6.5])
    assert flat.tolist() == [False, False, True]
    # The tie is broken at random, but reproducibly with the same seed.
    chosen = {tuple(map_peaks(maps, generator=torch.Generator().manual_seed(s))[0][1].tolist()) for s in range(20)}
    assert chosen == {(1.5, 1.5), (6.5, 6.5)}
    again, _ = map_peaks(maps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, xy)


def test_pointing_game_counts_hits_within_radius_of_a_visible_landmark():
    peak = torch.tensor([[10.0, 10.0], [10.0, 10.0], [10.0, 10.0], [0.0, 0.0]])
    landmarks = torch.tensor([
        [[13.0, 14.0], [50.0, 50.0]],  # landmark 0 at distance exactly 5: a hit (<= r)
        [[16.0, 10.0], [10.0, 12.0]],  # landmark 1 at 2, landmark 0 at 6
        [[10.0, 10.0], [40.0, 40.0]],  # on landmark 0, but it is invisible: a miss
        [[1.0, 1.0], [2.0, 2.0]],      # no visible landmark: not counted
    ])
    visible = torch.tensor([[True, True], [True, True], [False, True], [False, False]])
    out = pointing_game(peak, landmarks, visible, radius=5.0)
    assert out["hit"].tolist()[:3] == [True, True, False]
    assert out["valid"].tolist() == [True, True, True, False]
    assert out["hit_by_landmark"].tolist() == [[True, False], [False, True], [False, False], [False, False]]
    assert out["nearest"].tolist() == [0, 1, 1, -1]


def test_peak_distance_spread_is_the_per_class_per_landmark_std_averaged():
    s = 10.0
    diag = s * math.sqrt(2)
    # Two classes x 3 images, two landmarks; peaks at x = 0 so the distance to a landmark at (x, 0) is x.
    peak = torch.zeros(6, 2)
    lm_x = [[1, 2], [2, 2], [4, 2], [0, 3], [3, 9], [3, 5]]
    landmarks = torch.tensor([[[a, 0.0], [b, 0.0]] for a, b in lm_x])
    visible = torch.ones(6, 2, dtype=torch.bool)
    visible[5, 1] = False
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    mean, per_landmark = peak_distance_spread(peak, landmarks, visible, classes, image_diagonal=diag)
    sd = {
        (0, 0): statistics.stdev([1, 2, 4]), (0, 1): statistics.stdev([2, 2, 2]),
        (1, 0): statistics.stdev([0, 3, 3]), (1, 1): statistics.stdev([3, 9]),
    }
    sd = {k: v / diag for k, v in sd.items()}
    expected = statistics.mean([(sd[c, 0] + sd[c, 1]) / 2 for c in (0, 1)])
    assert mean == pytest.approx(expected, rel=1e-12)
    assert per_landmark.tolist() == pytest.approx([(sd[0, 0] + sd[1, 0]) / 2, (sd[0, 1] + sd[1, 1]) / 2])


# ------------------------------------------------------------------------------------------------
# Deletion and insertion


class _MeanModel(nn.Module):
    """Softmax probability of class 0 is exactly the mean pixel value m (in (0, 1)): logits (log m, log 1-m)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.double().mean(dim=(1, 2, 3)).clamp(1e-12, 1 - 1e-12)
        return torch.stack((m.log(), (1 - m).log()), dim=1)


def _half_image() -> torch.Tensor:
    img = torch.zeros(1, 3, 4, 4)
    img[..., :2, :] = 1.0  # the top half (8 of 16 pixels) is 1: m = 0.5
    return img


def test_deletion_and_insertion_auc_on_a_model_whose_output_is_the_mean_pixel():
    img, target = _half_image(), torch.tensor([0])
    good = torch.zeros(1, 4, 4)
    good[0, :2, :] = torch.arange(8, 0, -1.0).reshape(2, 4) + 10  # ranks the bright half first
    bad = -good  # ranks it last
    gen = torch.Generator().manual_seed(0)
    deletion, insertion = perturbation_curves(_MeanModel(), img, good, target, steps=4, generator=gen)
    # Deleting 4 bright pixels per step: m = 0.5, 0.25, 0, 0, 0; inserting them: 0, 0.25, 0.5, 0.5, 0.5.
    torch.testing.assert_close(deletion.double(), torch.tensor([[0.5, 0.25, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(insertion.double(), torch.tensor([[0, 0.25, 0.5, 0.5, 0.5]], dtype=torch.float64))
    assert curve_auc(deletion).item() == pytest.approx(0.125)
    assert curve_auc(insertion).item() == pytest.approx(0.375)
    deletion, insertion = perturbation_curves(_MeanModel(), img, bad, target, steps=4, generator=gen)
    assert curve_auc(deletion).item() == pytest.approx(0.375)
    assert curve_auc(insertion).item() == pytest.approx(0.125)


def test_pixel_ranks_break_ties_at_random_reproducibly():
    flat = torch.zeros(2, 3, 3)
    r1 = pixel_ranks(flat, generator=torch.Generator().manual_seed(1))
    r2 = pixel_ranks(flat, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2)
    assert sorted(r1[0].tolist()) == list(range(9))
    assert not torch.equal(r1[0], torch.arange(9))  # not the row-major order
    ordered = torch.arange(9.0).reshape(1, 3, 3)
    assert pixel_ranks(ordered).tolist() == [list(range(8, -1, -1))]


def test_map_rank_correlation_is_spearman_with_average_ranks_for_ties():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None]
    assert map_rank_correlation(a, a).tolist() == [1.0]
    assert map_rank_correlation(a, a ** 3 + 5).tolist() == [1.0]  # a ranking: any increasing map of it agrees
    assert map_rank_correlation(a, -a).tolist() == [-1.0]
    # ties share their mean rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    tied = torch.tensor([[1.0, 1.0], [2.0, 3.0]])[None]
    ra, rb = torch.tensor([1.5, 1.5, 3, 4], dtype=torch.float64), torch.arange(1.0, 5, dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    expected = float((ra * rb).sum() / (ra.square().sum() * rb.square().sum()).sqrt())
    assert map_rank_correlation(tied, a).tolist() == pytest.approx([expected], abs=1e-12)
    assert expected == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    flat = torch.zeros(1, 2, 2)  # no ranking at all: undefined, not 0
    assert map_rank_correlation(flat, a).isnan().all()
    with pytest.raises(ValueError, match="same shape"):
        map_rank_correlation(a, torch.zeros(1, 3, 3))


def test_curve_auc_trapezoids():
    curves = torch.tensor([[0.3] * 5, [0.0, 0.25, 0.5, 0.75, 1.0]])
    assert curve_auc(curves).tolist() == pytest.approx([0.3, 0.5])


# ------------------------------------------------------------------------------------------------
# Category exclusivity from conductance


def test_conductance_exclusivity_known_shares():
    # S[c, d] for C = 2 classes, D = 4 filters (counts scale the sums).
    s = torch.tensor([[3.0, 0.0, -1.0, 1.0], [1.0, 2.0, -1.0, 3.0]])
    counts = torch.tensor([2.0, 4.0])
    category = torch.tensor([0, 1, 0, 0])
    out = conductance_exclusivity(s * counts[:, None], counts, category)
    # Filter 0: 3/4 own; filter 1: 2/2; filter 2 has no positive conductance (left out); filter 3: 1/4.
    assert out["exclusivity"] == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    assert out["category_agreement"] == pytest.approx(2 / 3)
    assert out["chance"] == 0.5 and out["filters"] == 3


# ------------------------------------------------------------------------------------------------
# Captum's infidelity and sensitivity on a linear model


class _Linear(nn.Module):
    """logit_0 = Σ_p w_p · mean_c x_cp, logit_1 = -logit_0; the colour mean is a 1x1 conv (the 'layer')."""

    def __init__(self, s: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 3)
        self.register_buffer("w", torch.rand(s, s, generator=torch.Generator().manual_seed(0)) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l0 = (self.conv(x)[:, 0] * self.w).sum(dim=(1, 2))
        return torch.stack((l0, -l0), dim=1)


def _fake_loader(n: int, s: int, k: int = 2, batch: int = 4, classes: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, s, s, generator=gen)
    landmarks = torch.rand(n, k, 2, generator=gen) * s
    labels = torch.arange(n) % classes
    return [{"image": images[i:i + batch], "label": labels[i:i + batch], "landmarks": landmarks[i:i + batch],
             "visible": torch.ones(min(batch, n - i), k, dtype=torch.bool), "index": torch.arange(i, min(n, i + batch))}
            for i in range(0, n, batch)]


def test_infidelity_of_the_exact_gradient_of_a_linear_model_is_zero():
    s = 8
    model = _Linear(s).eval()
    x = torch.randn(3, 3, s, s)
    settings = CompareSettings(**{**FAST, "infidelity_samples": 8})
    gradient_map = model.w.expand(3, s, s)  # ∂logit_0/∂x_cp = w_p / 3 for every channel: the map up to scale

    def constant(images, target):
        return torch.ones(images.shape[0], s, s)

    inf, _ = _robustness(model, constant, x, gradient_map, torch.zeros(3, dtype=torch.long), settings)
    assert inf.abs().max().item() < 1e-6
    inf_flat, sens = _robustness(model, constant, x, torch.ones(3, s, s), torch.zeros(3, dtype=torch.long), settings)
    assert inf_flat.min().item() > 1e-3  # a flat map does not predict the output change
    assert sens.abs().max().item() == 0.0  # an input-independent explanation is perfectly stable


def test_compare_wires_infidelity_and_sensitivity_through_captum():
    s = 8
    settings = CompareSettings(**{**FAST, "robust_images": 6})
    result = compare(_Linear(s), _fake_loader(8, s), layer="conv", image_size=s, landmark_names=["a", "b"],
                     classes=["x", "y"], methods=["smoothgrad", "centre", "random"], settings=settings)
    ex = result.summary["explainers"]
    # SmoothGrad of a linear model is its (constant) gradient: exactly faithful; centre never moves.
    assert ex["smoothgrad"]["infidelity"] < 1e-6
    assert ex["centre"]["sensitivity_max"] == 0.0
    assert ex["random"]["sensitivity_max"] > 0.5
    assert all(e["robust_images"] == 6 for e in ex.values())
    json.dumps(result.summary, allow_nan=False)


# ------------------------------------------------------------------------------------------------
# Every explainer on a tiny interpretable model


def _tiny_icnn(variant: str = "icnn") -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn(num_classes=4, width=8)
    make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=4, image_size=64,
                       top_layer="features.14", variant=variant)
    for name in ("features.14.mask", "features.14.new_mask"):
        mask = model.get_submodule(name)
        mask.class_peak.copy_(torch.rand(4, mask.num_filters))  # some filters for each class
    return model.eval()


@pytest.mark.parametrize("variant", ["icnn", "baseline"])
def test_every_explainer_runs_on_a_tiny_interpretable_small_cnn(variant):
    model = _tiny_icnn(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = CompareSettings(**{**FAST, "robust_images": 1})
    loader = _fake_loader(4, 64, k=3, classes=4, batch=2)
    result = compare(model, loader, layer="features.14.mask", image_size=64, landmark_names=["h", "b", "t"],
                     classes=list("abcd"), methods=list(EXPLAINERS), settings=settings, keep=[1, 2])
    summary = result.summary
    assert list(summary["explainers"]) == list(EXPLAINERS)
    for name, ex in summary["explainers"].items():
        assert ex["seconds_per_image"] >= 0
        assert 0 <= ex["pointing_game"] <= 1 and 0 <= ex["deletion_auc"] <= 1 and 0 <= ex["insertion_auc"] <= 1
        assert ex["robust_images"] == 1, name
    assert summary["exclusivity"]["filters"] > 0
    assert sum(summary["filters_per_class"].values()) == 32
    json.dumps(summary, allow_nan=False)
    assert [e["index"] for e in result.examples] == [1, 2]
    for e in result.examples:
        assert set(e["maps"]) == set(EXPLAINERS)
        assert all(m.shape == (64, 64) and torch.isfinite(m).all() for m in e["maps"].values())
    # Explaining changes nothing in the model (Guided Grad-CAM works on a copy).
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # the model's own ReLUs untouched


def test_icnn_map_is_the_mean_of_the_class_filters_from_the_same_forward():
    model = _tiny_icnn()
    layer = model.get_submodule("features.14.mask")
    geometry = layer_geometry(model, "features.14.mask", image_size=64)
    icnn = IcnnMaps(model, layer, geometry, 64, layer.category)
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 3])
    with torch.no_grad(), icnn.capture():
        logits = model(x)
    maps = icnn.from_activation(icnn.activation, target)
    torch.testing.assert_close(logits, model(x).detach())
    act = icnn.activation
    for i in range(2):
        chosen = layer.category == target[i]
        cell = act[i, chosen].mean(dim=0)[None]
        torch.testing.assert_close(maps[i], upsample_to_input(cell, geometry, 64)[0])
    torch.testing.assert_close(icnn(x, target), maps)
    # A class without filters gets a flat zero map.
    nobody = IcnnMaps(model, layer, geometry, 64, torch.zeros_like(layer.category))
    assert nobody(x, torch.tensor([2, 2])).abs().max() == 0


def test_unknown_explainer_and_missing_categories_are_errors():
    model = _Linear(8)
    with pytest.raises(ValueError, match="unknown explainer.*choose from"):
        compare(model, _fake_loader(4, 8), layer="conv", image_size=8, landmark_names=["a", "b"], classes=["x", "y"],
                methods=["lime"])
    with pytest.raises(ValueError, match="icnn explainer needs each filter's category"):
        compare(model, _fake_loader(4, 8), layer="conv", image_size=8, landmark_names=["a", "b"], classes=["x", "y"],
                methods=["icnn"])
    with pytest.raises(ValueError, match="target must be one of"):
        CompareSettings(target="top1")


# ------------------------------------------------------------------------------------------------
# A run end to end: compare.json, the table, the figure and the report section


def _untrained_run(recipe, out, arm: str) -> None:
    """A run directory as finetune leaves it, with untrained weights (training is tested elsewhere)."""
    from icnn_compress.runs.model_file import save_model_file
    from icnn_compress.config import recipe_to_dict
    from icnn_compress.data.recipe import open_split
    from icnn_compress.train import build_for_recipe

    classes = list(open_split(recipe.data, "test", progress=False).classes)
    torch.manual_seed(0)
    model, architecture = build_for_recipe(recipe, arm=arm, classes=classes, image_size=recipe.data.image_size)
    for name in architecture["masks"]:
        mask = model.get_submodule(name)
        mask.class_peak.copy_(torch.rand(mask.class_peak.shape))
    save_model_file(out / "model.pt", state_dict=model.state_dict(), architecture=architecture, classes=classes,
                    extra={"arm": arm, "recipe": recipe_to_dict(recipe)})


def test_compare_run_writes_json_table_figure_and_a_self_contained_html_section(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    _untrained_run(recipe, tmp_path / "icnn", "icnn")
    _untrained_run(recipe, tmp_path / "baseline", "baseline")
    settings = CompareSettings(**{**FAST, "robust_images": 1, "steps": 2})
    out = tmp_path / "compare"
    result = compare_run(tmp_path / "icnn", baseline_run=tmp_path / "baseline", out=out, limit=4,
                         methods=["icnn", "gradcam", "random"], settings=settings, device="cpu", figure_images=2)
    assert set(result["models"]) == {"icnn", "baseline"}
    assert result["num_images"] == 4 and result["layer"] == "features.14.mask"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["models"]["icnn"]["explainers"]["gradcam"] == result["models"]["icnn"]["explainers"]["gradcam"]
    table = (out / "compare.md").read_text()
    assert table.count("\n| icnn |") == 3 and table.count("\n| baseline |") == 3
    assert (out / "compare.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
    section = compare_html_section(out)
    assert section.startswith("<section") and section.rstrip().endswith("</section>")
    assert "data:image/jpeg;base64," in section and "<table>" in section
    assert 'src="' not in section.replace('src="data:', "")  # nothing to fetch: self-contained
    assert format_compare_table(result) == result["table"]
    with pytest.raises(FileNotFoundError, match="icnn compare"):
        compare_html_section(tmp_path / "nowhere")


def test_data_without_landmarks_gets_the_landmark_free_measures_and_says_why(tmp_path, tiny_recipe, tiny_parts):
    import shutil

    plain = tmp_path / "plain"  # the CUB layout with no parts: what a folder of class images gives
    shutil.copytree(tiny_parts, plain)
    (plain / "parts" / "parts.txt").write_text("")
    (plain / "parts" / "part_locs.txt").write_text("")
    (plain / "parts" / "part_masks.txt").unlink()
    _untrained_run(tiny_recipe(), tmp_path / "icnn", "icnn")
    settings = CompareSettings(**{**FAST, "robust_images": 1, "steps": 2})
    result = compare_run(tmp_path / "icnn", out=tmp_path / "compare", data_root=plain, limit=4,
                         methods=["icnn", "gradcam"], settings=settings, device="cpu", figure_images=1)
    gradcam = result["models"]["icnn"]["explainers"]["gradcam"]
    assert result["landmarks"] == [] and gradcam["deletion_auc"] is not None
    assert "the data has no landmarks: the pointing game and the distance spread were skipped" in result["table"]


def test_pointing_game_with_no_landmark_counts_no_image():
    out = pointing_game(torch.zeros(3, 2), torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.bool), radius=5.0)
    assert out["valid"].tolist() == [False] * 3 and out["nearest"].tolist() == [-1] * 3


def test_compare_run_with_a_parent_reports_how_far_each_explanation_moved(tmp_path, tiny_recipe):
    from icnn_compress.prune import prune_run

    recipe = tiny_recipe()
    _untrained_run(recipe, tmp_path / "icnn", "icnn")
    settings = CompareSettings(**{**FAST, "robust_images": 0, "steps": 2})
    kw = dict(limit=4, methods=["icnn", "gradcam"], settings=settings, device="cpu", figure_images=1)
    # a model against itself: every map the same, every measure unchanged
    same = compare_run(tmp_path / "icnn", parent_run=tmp_path / "icnn", out=tmp_path / "self", **kw)
    assert set(same["models"]) == {"icnn", "parent"} and same["drift_of"] == "icnn"
    for name in ("icnn", "gradcam"):
        drift = same["drift"][name]
        assert drift["rank_correlation"] == pytest.approx(1.0) and drift["images"] == 4
        assert drift["pointing_game"] == drift["pointing_game_parent"]
        assert drift["peak_distance_std"] == drift["peak_distance_std_parent"]
    # a pruned child (half its MACs, no recovery): the maps move, the rank correlation says by how much
    prune_run(tmp_path / "icnn", out=tmp_path / "pruned", criterion="l1", target_macs=0.5, recover_epochs=0,
              schedule_steps=4, device="cpu", progress=False)
    result = compare_run(tmp_path / "pruned", parent_run=tmp_path / "icnn", out=tmp_path / "drift", **kw)
    for name in ("icnn", "gradcam"):
        drift = result["drift"][name]
        assert -1.0 <= drift["rank_correlation"] < 1.0 and drift["rank_correlation_se"] is not None
        assert drift["pointing_game_parent"] == same["drift"][name]["pointing_game_parent"]  # same parent, images
    table = (tmp_path / "drift" / "compare.md").read_text()
    assert "Explanation drift, parent → icnn" in table and "| gradcam |" in table
    assert json.loads((tmp_path / "drift" / "compare.json").read_text())["drift"] == result["drift"]
