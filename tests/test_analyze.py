"""analyze(): hand-built feature maps with known answers, read by a fake model from the batch's index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from icnn_compress.analyze import analyze, merge_states, write_analysis
from icnn_compress.analyze._statistics import _grow_histogram, _peaks, _top_quantile
from icnn_compress.analyze._summaries import _leader_clusters, _to_host

S, CELL, N, C = 16, 4, 8, 2  # 16-px images, 4x4 maps (cell = 4 px), 8 images, 2 classes
H = S // CELL
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
SPOT = (1, 2)  # (row, col) where filter 0 fires on class 0
SPOT_XY = (CELL * SPOT[1] + CELL / 2, CELL * SPOT[0] + CELL / 2)  # its cell centre (x, y) = (10, 6)


def _maps() -> torch.Tensor:
    """(N, 5, H, H): 0 one class one spot, 1 = 2 identical, 3 all zero, 4 uniform everywhere."""
    g = torch.Generator().manual_seed(0)
    maps = torch.zeros(N, 5, H, H)
    for i in range(4):
        maps[i, 0, SPOT[0], SPOT[1]] = 1.0 + i
    shared = torch.rand(N, H, H, generator=g)
    maps[:, 1] = shared
    maps[:, 2] = shared
    maps[:, 4] = (1.0 + torch.arange(N).float() / N)[:, None, None]
    return maps


class MapModel(nn.Module):
    """Outputs precomputed maps (through the named module ``layer``) picked by the index in pixel (0, 0, 0).

    Channel 1 of the image (zero in the data, one in the receptive-field probe) is average-pooled and
    added, so the layer has the geometry of a 4x4 / stride-4 pool: cell (r, c) is centred at 4c + 2, 4r + 2.
    """

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("maps", maps)
        self.pool = nn.AvgPool2d(CELL, stride=CELL)
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x[:, 0, 0, 0].round().long().clamp(0, self.maps.shape[0] - 1)
        out = self.layer(self.maps[idx] + self.pool(x[:, 1:2]))
        return out.amax(dim=(2, 3))[:, :C]


def _loader(part_masks: bool = True, order=(0, 4, 1, 5, 2, 6, 3, 7), batch_size: int = 4) -> list[dict]:
    order = torch.tensor(order)
    image = torch.zeros(N, 3, S, S)
    image[:, 0, 0, 0] = torch.arange(N).float()
    landmarks = torch.tensor(SPOT_XY).expand(N, 1, 2).clone()
    visible = torch.ones(N, 1, dtype=torch.bool)
    masks = torch.zeros(N, 1, S, S, dtype=torch.bool)
    masks[:, 0, SPOT[0] * CELL:(SPOT[0] + 1) * CELL, SPOT[1] * CELL:(SPOT[1] + 1) * CELL] = True
    batches = []
    for s in range(0, N, batch_size):
        i = order[s:s + batch_size]
        b = {"image": image[i], "label": LABELS[i], "index": i, "landmarks": landmarks[i], "visible": visible[i]}
        if part_masks:
            b["part_masks"] = masks[i]
        batches.append(b)
    return batches


def _analyze(loader=None, **kw) -> dict:
    args = dict(layers=["layer"], classes=["a", "b"], landmark_names=["head"], image_size=S,
                redundancy_threshold=0.95, part_quantile=0.25, estimate_stride=1)
    args.update(kw)
    return analyze(MapModel(_maps()), _loader() if loader is None else loader, **args)


@pytest.fixture(scope="module")
def result() -> dict:
    return _analyze()


def _f(result: dict, i: int) -> dict:
    return result["filters"][i]


def test_one_class_one_spot(result: dict) -> None:
    f = _f(result, 0)
    assert f["category"] == 0 and f["category_name"] == "a"
    assert f["exclusivity"] == pytest.approx(1.0)
    assert f["location_instability"] == pytest.approx(0.0)
    assert f["spatial_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert f["activation_rate"] == pytest.approx(0.5)
    assert not f["silent"]
    # Mean activation separates the classes perfectly: MI = H(one-vs-rest label) = log 2.
    assert f["mis"] == pytest.approx(math.log(2))
    assert f["part_interpretability"] == pytest.approx(1.0)
    assert f["best_part"] == "head" and f["tracked_landmark"] == "head"
    tops = f["top_images"]
    assert [t["index"] for t in tops[:4]] == [3, 2, 1, 0]
    assert (tops[0]["x"], tops[0]["y"]) == SPOT_XY


def test_identical_filters_form_one_cluster(result: dict) -> None:
    clusters = result["summary"]["layers"]["layer"]["clusters"]
    assert [c["members"] for c in clusters] == [[1, 2]]
    assert clusters[0]["best"] in (1, 2)
    assert result["summary"]["layers"]["layer"]["num_redundant"] == 1
    assert _f(result, 1)["cluster"] == _f(result, 2)["cluster"] == 0
    assert _f(result, 0)["cluster"] == -1
    mats = result["matrices"]["layer"]
    assert mats["peak_correlation"][1, 2] == pytest.approx(1.0)
    assert mats["map_correlation"][1, 2] == pytest.approx(1.0)
    assert torch.allclose(mats["map_correlation"].nan_to_num(), mats["map_correlation"].t().nan_to_num())
    assert sorted(mats["order"].tolist()) == list(range(5)) and mats["order"][:2].tolist() == [1, 2]


def test_all_zero_filter_is_silent(result: dict) -> None:
    f = _f(result, 3)
    assert f["silent"] and f["activation_rate"] == 0.0
    assert f["exclusivity"] is None and f["spatial_entropy"] is None
    assert f["mis"] == pytest.approx(0.0)
    assert f["cluster"] == -1
    assert result["summary"]["layers"]["layer"]["num_silent"] == 1


def test_uniform_filter_has_maximal_spatial_entropy(result: dict) -> None:
    f = _f(result, 4)
    assert f["spatial_entropy"] == pytest.approx(1.0)
    assert f["exclusivity"] < 0.6  # fires on both classes (class-balanced share ≈ 0.5)
    # The paper's spatial term is also largest for the uniform filter.
    assert f["mi_spatial_entropy"] >= max(_f(result, i)["mi_spatial_entropy"] for i in (0, 1))


def test_summary_and_json(tmp_path, result: dict) -> None:
    layer = result["summary"]["layers"]["layer"]
    assert layer["num_filters"] == 5 and layer["map_size"] == [H, H]
    assert layer["geometry"]["offset"] == [2.0, 2.0] and layer["geometry"]["stride"] == [4.0, 4.0]
    assert result["summary"]["num_images"] == N
    write_analysis(result, tmp_path)
    doc = json.loads((tmp_path / "analysis.json").read_text())
    assert [(f["layer"], f["filter"]) for f in doc["filters"]] == [("layer", i) for i in range(5)]
    assert (tmp_path / "filters.csv").read_text().count("\n") == 6


def test_given_categories_and_no_parts() -> None:
    out = _analyze(loader=_loader(part_masks=False), filter_category={"layer": torch.tensor([1, 0, 0, 0, 0])})
    f = out["filters"][0]
    assert f["category"] == 1 and f["exclusivity"] == pytest.approx(0.0)
    assert f["part_interpretability"] is None
    assert out["summary"]["layers"]["layer"]["part_interpretability"] is None


def test_batch_order_does_not_change_sums() -> None:
    a = _analyze()
    b = _analyze(loader=_loader(order=tuple(range(N)), batch_size=3))
    for key in ("exclusivity", "spatial_entropy", "mis", "location_instability", "activation_rate"):
        assert [f[key] for f in a["filters"]] == pytest.approx([f[key] for f in b["filters"]], nan_ok=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [{}, {"protocol": "paper", "estimate_stride": 3}])
def test_cuda_analysis_matches_cpu(kw: dict) -> None:
    """The reduction on the GPU (statistics, clusters, MIS, instability, parts) gives the CPU's analysis."""
    on_cpu, on_gpu = _analyze(**kw), _analyze(device="cuda", **kw)
    # The top-k order among equal values is the device's own: filter 3 (all zero) ties everywhere.
    for f in on_gpu["filters"] + on_cpu["filters"]:
        if f["filter"] == 3:
            f.pop("top_images")
    # float32 maps: exp/log and the reduction order differ between the devices in the last float32 bits
    _assert_same(_doc(on_gpu), _doc(on_cpu), "cuda", rel=1e-5, abs=1e-6)
    assert all(m.device.type == "cpu" for m in on_gpu["matrices"]["layer"].values())
    gpu_state, cpu_state = on_gpu["state"]["layer"], on_cpu["state"]["layer"]
    assert gpu_state["n"].device.type == "cuda"  # the statistics stayed where they were summed
    for key in ("cell_hist", "mis_hist", "cell_hi", "top_value"):
        assert torch.equal(gpu_state[key].cpu(), cpu_state[key]), key
    keep = [0, 1, 2, 4]
    assert torch.equal(gpu_state["top_index"][keep].cpu(), cpu_state["top_index"][keep])


# Written by the reduction on the host as it was before it moved to the statistics' device (commit
# c08de18): {name: _doc(result) for name, result in _reference_runs().items()}, as JSON.
REFERENCE = Path(__file__).with_name("golden") / "analyze_tiny.json"


def _reference_runs() -> dict[str, dict]:
    """The analyses the reference file holds: parts and landmarks; given categories and no parts; the
    ``paper`` protocol (categories by the smallest instability) on a subsample."""
    return {
        "official": _analyze(),
        "given_no_parts": _analyze(loader=_loader(part_masks=False),
                                   filter_category={"layer": torch.tensor([1, 0, 0, 0, 0])}),
        "paper_strided": _analyze(protocol="paper", estimate_stride=3),
    }


def _doc(result: dict) -> dict:
    """Summary, filters and matrices (as lists) after a round trip through JSON, as analysis.json stores them."""
    mats = {layer: {k: v.tolist() for k, v in m.items()} for layer, m in result["matrices"].items()}
    return json.loads(json.dumps({"summary": result["summary"], "filters": result["filters"], "matrices": mats}))


def _assert_same(actual, expected, where: str, *, rel: float = 1e-12, abs: float = 1e-15) -> None:
    """``actual`` has ``expected``'s structure, types and values; floats to ``rel``/``abs`` (NaN equals NaN)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}", rel=rel, abs=abs)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]", rel=rel, abs=abs)
    elif isinstance(expected, float):
        assert isinstance(actual, float) and actual == pytest.approx(expected, rel=rel, abs=abs, nan_ok=True), where
    else:
        assert type(actual) is type(expected) and actual == expected, where


def test_analysis_equals_the_host_reference() -> None:
    """Every summary, per-filter and matrix value is the one the reduction on the host gave, to float64 rounding."""
    expected, runs = json.loads(REFERENCE.read_text()), _reference_runs()
    assert list(runs) == list(expected)
    for name, result in runs.items():
        _assert_same(_doc(result), expected[name], name)


def test_to_host_round_trips_every_dtype() -> None:
    cols = {"flag": torch.tensor([True, False]), "index": torch.tensor([[2**53, -1]]),
            "value": torch.tensor([math.nan, -math.inf, 0.1], dtype=torch.float64), "empty": torch.zeros(0, 3)}
    host = _to_host(cols)
    for key, t in cols.items():
        assert host[key].dtype == t.dtype and host[key].shape == t.shape, key
        assert torch.equal(host[key].nan_to_num(), t.nan_to_num()), key
    assert host["value"].untyped_storage().nbytes() == 3 * 8  # its own storage, not the shared buffer


def test_merge_states_equals_one_pass() -> None:
    whole = _analyze()["state"]["layer"]
    first = _analyze(loader=_loader()[:1])["state"]["layer"]
    second = _analyze(loader=_loader()[1:])["state"]["layer"]
    merged = merge_states(first, second)
    for key in ("n", "class_peak_sum", "peak_cross", "map_cross", "spatial_entropy_sum", "part_present"):
        assert torch.allclose(merged[key], whole[key]), key
    assert torch.allclose(merged["top_value"], whole["top_value"])
    assert torch.equal(merged["mis_hist"].sum(-1), whole["mis_hist"].sum(-1))


def test_default_layers_are_the_masks() -> None:
    from icnn_compress.method.mask import InterpretableMask

    model = MapModel(_maps())
    model.layer = InterpretableMask(5, num_classes=C, active=False)
    out = analyze(model, _loader(), classes=["a", "b"], image_size=S)
    assert list(out["summary"]["layers"]) == ["layer"]
    with pytest.raises(ValueError, match="InterpretableMask"):
        analyze(MapModel(_maps()), _loader(), classes=["a", "b"], image_size=S)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60), st.integers(2, 6))
def test_doubling_histogram_keeps_counts_and_orders(values, chunks) -> None:
    k = 64
    hist = torch.zeros(1, 1, k, dtype=torch.float64)
    hi = torch.zeros(1, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    for part in v.chunk(chunks):
        hi = _grow_histogram(hist, hi, part.max()[None])
        assert float(part.max()) < float(hi) or float(hi) == 0.0
        idx = (part / hi.clamp(min=1e-12) * k).long().clamp(0, k - 1)
        hist[0, 0] += torch.bincount(idx, minlength=k).double()
    assert hist.sum() == len(values)
    q = float(_top_quantile(hist[0], hi, 0.0))
    assert q <= float(v.max()) + float(hi) / k + 1e-9


def test_growing_one_filter_merges_its_bins_and_leaves_the_others() -> None:
    hist = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]])
    hi = _grow_histogram(hist, torch.tensor([8.0, 8.0], dtype=torch.float64), torch.tensor([20.0, 3.0], dtype=torch.float64))
    assert hi.tolist() == [32.0, 8.0]  # two doublings for filter 0, none for filter 1
    assert hist[0, 0].tolist() == [10.0, 26.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert hist[0, 1].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]


def test_subsampled_estimates_leave_the_rest_exact() -> None:
    exact, strided = _analyze(), _analyze(estimate_stride=3)
    for key in ("exclusivity", "mis", "location_instability", "activation_rate", "cluster"):
        assert [f[key] for f in exact["filters"]] == pytest.approx([f[key] for f in strided["filters"]], nan_ok=True)
    # The spatial entropy is one of the estimates: on the subsample, a one-spot filter still has 0 and
    # a uniform one 1.
    assert strided["filters"][0]["spatial_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert strided["filters"][4]["spatial_entropy"] == pytest.approx(1.0)


@pytest.mark.slow
def test_analyze_run_on_a_generated_run(tiny_recipe, tmp_path) -> None:
    from icnn_compress.runs.model_file import save_model_file
    from icnn_compress.config import recipe_to_dict
    from icnn_compress.data.recipe import open_split
    from icnn_compress.train import build_for_recipe
    from icnn_compress.analyze import analyze_run

    recipe = tiny_recipe()
    classes = open_split(recipe.data, "test", progress=False).classes
    model, architecture = build_for_recipe(recipe, arm="icnn", classes=list(classes), image_size=64)
    save_model_file(tmp_path / "run" / "model.pt", state_dict=model.state_dict(), architecture=architecture,
                    classes=classes, extra={"recipe": recipe_to_dict(recipe), "arm": "icnn"})
    out = tmp_path / "analysis"
    result = analyze_run(tmp_path / "run", out=out, device="cpu", batch_size=8)
    assert list(result["summary"]["layers"]) == architecture["masks"]
    assert result["summary"]["num_images"] == 32 and result["summary"]["arm"] == "icnn"
    doc = json.loads((out / "analysis.json").read_text())
    assert len(doc["filters"]) == sum(s["num_filters"] for s in doc["summary"]["layers"].values())
    layer = doc["summary"]["layers"][architecture["masks"][0]]
    assert layer["part_interpretability"] is not None and layer["location_instability"] is not None
    assert all((out / "gallery" / f"{n.replace('.', '_')}.jpg").is_file() for n in architecture["masks"])


def test_leader_clusters_do_not_chain():
    """a ~ b and b ~ c but a and c unlike: b joins a (the better), c leads its own cluster with d."""
    red = torch.full((4, 4), -1.0, dtype=torch.float64)
    for i, j, v in ((0, 1, 0.9), (1, 2, 0.85), (0, 2, 0.3), (2, 3, 0.95), (1, 3, 0.1), (0, 3, 0.0)):
        red[i, j] = red[j, i] = v
    cluster_id, clusters = _leader_clusters(red, torch.tensor([0.9, 0.8, 0.7, 0.1]), 0.8)
    assert clusters == [{"members": [0, 1], "best": 0}, {"members": [2, 3], "best": 2}]
    assert cluster_id == [0, 0, 1, 1]
    # b's score above a's: b leads, and takes a and c (both ≥ 0.8 with b); d (0.95 with c, 0.1 with b) is alone
    cluster_id, clusters = _leader_clusters(red, torch.tensor([0.8, 0.9, 0.7, 0.1]), 0.8)
    assert clusters == [{"members": [0, 1, 2], "best": 1}] and cluster_id == [0, 0, 0, -1]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.floats(0.5, 0.95), st.integers(0, 2**31 - 1))
def test_leader_clusters_against_a_plain_loop(d, threshold, seed):
    """Every member is redundant with its best; no two bests are; the same partition as a list-based loop."""
    g = torch.Generator().manual_seed(seed)
    red = torch.rand(d, d, generator=g, dtype=torch.float64)
    red = (red + red.t()) / 2
    red.fill_diagonal_(-1.0)
    score = torch.rand(d, generator=g)
    cluster_id, clusters = _leader_clusters(red, score, threshold)

    leader_of: dict[int, int] = {}
    leaders: list[int] = []
    for i in sorted(range(d), key=lambda i: (-float(score[i]), i)):
        near = [(float(red[i, j]), -k, j) for k, j in enumerate(leaders) if float(red[i, j]) >= threshold]
        if near:
            leader_of[i] = max(near)[2]
        else:
            leaders.append(i)
            leader_of[i] = i
    expected = {b: sorted(i for i in range(d) if leader_of[i] == b) for b in leaders}
    assert {c["best"]: c["members"] for c in clusters} == {b: m for b, m in expected.items() if len(m) > 1}
    for k, c in enumerate(clusters):
        assert all(red[i, c["best"]] >= threshold for i in c["members"] if i != c["best"])
        assert all(cluster_id[i] == k for i in c["members"])
    assert all(float(red[a, b]) < threshold for a in leaders for b in leaders if a != b)
    assert sum(i >= 0 for i in cluster_id) == sum(len(c["members"]) for c in clusters)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_peaks_equal_max_with_the_first_cell_on_ties(b, d, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (b, d, p), generator=g).float()  # many ties, all-zero maps included
    peak, cell = _peaks(x)
    expected = x.max(dim=-1)
    assert torch.equal(peak, expected.values) and torch.equal(cell, expected.indices)
