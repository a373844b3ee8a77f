"""Pruning: the mask's custom pruner, the criteria, the driver on registered architectures, saving and reloading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from conftest import interrupted_at_call
from torch import nn

import icnn_compress.train._finetune
from icnn_compress.analyze import analyze_run
from icnn_compress.config import load_recipe
from icnn_compress.method.mask import InterpretableMask
from icnn_compress.prune import (
    FilterScores,
    ICNNImportance,
    MaskPruner,
    PruningError,
    RawFPGMImportance,
    apply_pruning_history,
    count_macs,
    icnn_layer_scores,
    load_filter_scores,
    make_importance,
    prune_model,
    prune_run,
    round_targets,
)
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.surgery import make_interpretable
from icnn_compress.runs.open import load_run_model
from icnn_compress.train import finetune

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


class _Tiny(nn.Module):
    """conv(3→8) → ReLU → mask_a → maxpool → mask_b → conv(8→4) → ReLU → GAP → Linear(4→3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.mask_a = InterpretableMask(8, num_classes=2)
        self.pool = nn.MaxPool2d(2)
        self.mask_b = InterpretableMask(8, num_classes=2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.mask_b(self.pool(self.mask_a(self.relu(self.conv(x)))))
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


def _tiny() -> _Tiny:
    torch.manual_seed(0)
    model = _Tiny().eval()
    for m in (model.mask_a, model.mask_b):
        m.beta.copy_(torch.linspace(1.5, 3.0, 8))
        m.class_peak.copy_(torch.arange(16.0).reshape(2, 8))
        m.class_freq.copy_(torch.tensor([0.25, 0.75]))
    return model


def _graph(model: nn.Module, pruner: MaskPruner, size: int = 8) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, size, size),
                                                 customized_pruners={InterpretableMask: pruner}, verbose=False)


# --------------------------------------------------------------------------------------------------
# the mask's pruner


def test_mask_state_is_pruned_with_its_channels():
    model = _tiny()
    x = torch.rand(2, 3, 8, 8)
    keep = [0, 2, 3, 5, 7]
    ref = _tiny_reference(model, keep)  # the same network with the kept channels sliced out by hand
    pruner = MaskPruner()
    graph = _graph(model, pruner)
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=[1, 4, 6])
    assert model.mask_a in [item.dep.target.module for item in group]
    assert model.mask_b in [item.dep.target.module for item in group]
    group.prune()
    for m in (model.mask_a, model.mask_b):
        assert m.num_filters == 5
        assert torch.equal(m.beta, torch.linspace(1.5, 3.0, 8)[keep])
        assert torch.equal(m.class_peak, torch.arange(16.0).reshape(2, 8)[:, keep])
        assert torch.equal(m.class_freq, torch.tensor([0.25, 0.75]))  # per class: untouched
        assert m.class_seen.shape == (2,)
        assert pruner.original_index(m).tolist() == keep
    assert model.conv2.in_channels == 5
    assert torch.equal(model(x), ref(x))


# --------------------------------------------------------------------------------------------------
# criteria


def _rec(i, *, silent=False, cluster=-1, best=False, excl=0.5, ent=0.5, rate=1.0):
    return FilterScores(layer="m", index=i, silent=silent, cluster=cluster, is_cluster_best=best,
                        exclusivity=None if silent else excl, spatial_entropy=None if silent else ent,
                        activation_rate=rate)


def test_icnn_scores_rank_silent_then_redundant_then_least_exclusive():
    recs = [
        _rec(0, excl=0.9, ent=0.1),  # singleton, very exclusive: last to go
        _rec(1, silent=True, rate=0.005),  # silent, fires sometimes
        _rec(2, cluster=0, best=True, excl=0.8, ent=0.2),  # its cluster's best: kept like a singleton
        _rec(3, cluster=0, excl=0.7, ent=0.3),  # redundant, better quality
        _rec(4, cluster=0, excl=0.3, ent=0.6),  # redundant, worse quality
        _rec(5, silent=True, rate=0.0),  # silent, never fires
        _rec(6, excl=0.4, ent=0.2),  # singleton, least exclusive
    ]
    score = icnn_layer_scores(recs)
    assert torch.argsort(score).tolist() == [5, 1, 4, 3, 6, 2, 0]
    # tiers are the integer parts, ranks the fractions (rank + 1) / (n + 1)
    assert score.tolist() == pytest.approx([2 + 3 / 4, 2 / 3, 2 + 2 / 4, 1 + 2 / 3, 1 + 1 / 3, 1 / 3, 2 + 1 / 4])


def test_icnn_importance_takes_the_max_over_coupled_masks_and_follows_pruned_channels():
    model = _tiny()
    scores = {
        "mask_a": [_rec(i, silent=i in (1, 2)) for i in range(8)],
        "mask_b": [_rec(i, silent=i in (2, 3)) for i in range(8)],
    }
    pruner = MaskPruner()
    imp = ICNNImportance(scores, pruner)
    graph = _graph(model, pruner)
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=list(range(8)))
    got = imp(group)
    a, b = icnn_layer_scores(scores["mask_a"]), icnn_layer_scores(scores["mask_b"])
    assert torch.allclose(got, torch.maximum(a, b).float())
    assert int(torch.argmin(got)) == 2  # the only filter silent in BOTH coupled masks
    # after pruning channel 2, current channel 2 is original channel 3
    graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=[2]).prune()
    group = graph.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=list(range(7)))
    keep = [0, 1, 3, 4, 5, 6, 7]
    assert torch.allclose(imp(group), torch.maximum(a, b)[keep].float())
    # a group without an analysed mask falls back to group L1 magnitude
    fc_group = graph.get_pruning_group(model.conv2, tp.prune_conv_out_channels, idxs=list(range(4)))
    assert torch.allclose(imp(fc_group), tp.importance.MagnitudeImportance(p=1)(fc_group))


def test_icnn_rest_by_magnitude_orders_the_unflagged_filters_by_the_fallback():
    model = _tiny()
    scores = {"mask_a": [_rec(i, silent=i == 3, cluster=0 if i in (5, 6) else -1, best=i == 6) for i in range(8)]}
    pruner = MaskPruner()
    group = _graph(model, pruner).get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=list(range(8)))
    got = ICNNImportance(scores, pruner, rest="magnitude")(group)
    magnitude = tp.importance.MagnitudeImportance(p=1)(group)
    assert torch.argsort(got)[:2].tolist() == [3, 5]  # silent, then the redundant twin
    others = torch.tensor([0, 1, 2, 4, 6, 7])
    assert (got[others] > 2).all()
    assert torch.equal(others[torch.argsort(got[others])], others[torch.argsort(magnitude[others])])
    with pytest.raises(PruningError, match="rest must be"):
        ICNNImportance(scores, pruner, rest="size")


def test_raw_fpgm_is_the_sum_of_distances_between_raw_filters():
    conv = nn.Conv2d(1, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, -1.0, 3.0]).reshape(3, 1, 1, 1))  # |w| would make 1 and 0 closer
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3, 2)).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 1, 1), verbose=False)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 1, 2])
    raw = torch.tensor([1.0 + 3.0, 1.0 + 4.0, 3.0 + 4.0])
    assert torch.allclose(RawFPGMImportance(normalizer=None)(group), raw)
    assert torch.allclose(RawFPGMImportance()(group), raw / raw.mean())


def test_unknown_criterion_and_missing_analysis_are_errors():
    with pytest.raises(PruningError, match="unknown criterion"):
        make_importance("l2", mask_pruner=MaskPruner())
    with pytest.raises(PruningError, match="needs the analysis"):
        make_importance("icnn", mask_pruner=MaskPruner())


def test_load_filter_scores_reads_the_analysis_schema(tmp_path):
    rows = [{"layer": "L", "filter": i, "silent": i == 0, "cluster": 0 if i else -1, "cluster_best": i == 1,
             "exclusivity": None if i == 0 else 0.5, "location_instability": 0.1, "spatial_entropy": 0.2,
             "activation_rate": 0.0 if i == 0 else 1.0, "top_images": []} for i in (2, 0, 1)]
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({"summary": {}, "filters": rows}))
    scores = load_filter_scores(tmp_path)  # the folder works too
    assert [s.index for s in scores["L"]] == [0, 1, 2]
    assert scores["L"][0].silent and scores["L"][1].is_cluster_best and scores["L"][2].cluster == 0
    assert scores["L"][2].instability == 0.1 and scores["L"][0].exclusivity is None
    with pytest.raises(PruningError, match="does not exist"):
        load_filter_scores(tmp_path / "nope.json")
    path.write_text(json.dumps({"filters": rows[:2]}))  # filters 2 and 0: 1 is missing
    with pytest.raises(PruningError, match="exactly once"):
        load_filter_scores(path)


# --------------------------------------------------------------------------------------------------
# the driver on registered architectures


def _interpretable(arch: str, size: int, variant: str = "icnn"):
    torch.manual_seed(0)
    if arch == "small_cnn":
        model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=3)
        layout = make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=3, image_size=size,
                                    top_layer="features.14", variant=variant)
        record = {"arch": "icnn_compress.zoo:small_cnn", "top_layer": "features.14"}
    else:
        model = build_base_model(arch, num_classes=3)
        layout = make_interpretable(model, arch=arch, num_classes=3, image_size=size, head_width=32, variant=variant)
        record = {"arch": arch}
    record.update(num_classes=3, image_size=size, variant=variant, new_conv=True, head_width=32, peak="centroid",
                  beta="learned", **layout)
    return model.eval(), record


def _synthetic_scores(model: nn.Module, masks: list[str]) -> dict[str, list[FilterScores]]:
    """Every 4th filter silent, filters 1 mod 4 redundant twins of the next one."""
    out = {}
    for name in masks:
        d = model.get_submodule(name).num_filters
        out[name] = [FilterScores(layer=name, index=i, silent=i % 4 == 0, cluster=i // 4 if i % 4 in (1, 2) else -1,
                                  is_cluster_best=i % 4 == 2, exclusivity=(i % 7) / 7, spatial_entropy=0.5)
                     for i in range(d)]
    return out


@pytest.mark.parametrize("arch,size,criterion,variant", [
    ("small_cnn", 64, "icnn", "icnn"), ("small_cnn", 64, "icnn-l1", "icnn"), ("small_cnn", 64, "l1", "icnn"),
    ("small_cnn", 64, "fpgm", "icnn"), ("small_cnn", 64, "taylor", "icnn"), ("small_cnn", 64, "random", "icnn"),
    ("resnet18", 32, "icnn", "icnn"), ("vgg11", 32, "icnn", "icnn"), ("mobilenet_v2", 32, "icnn", "icnn"),
    ("resnet18", 32, "l1", "baseline"),
])
def test_prune_model_meets_the_target_and_replays(arch, size, criterion, variant):
    from icnn_compress.models.surgery import build_model

    model, record = _interpretable(arch, size, variant)
    masks = record["masks"]
    x = torch.rand(2, 3, size, size)
    pruner = MaskPruner()
    scores = _synthetic_scores(model, masks) if criterion.startswith("icnn") else None
    imp = make_importance(criterion, mask_pruner=pruner, scores=scores)

    def backward(m):
        m.zero_grad()
        nn.functional.cross_entropy(m(x), torch.tensor([0, 2])).backward()

    head_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    target = 0.7 if arch == "mobilenet_v2" or variant == "baseline" else 0.5
    history = prune_model(model, example_inputs=torch.zeros(1, 3, size, size), importance=imp, mask_pruner=pruner,
                          target_macs=target, steps=8, before_step=backward if criterion == "taylor" else None)
    assert history["macs_ratio"] <= target and history["macs"] < history["base_macs"]
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == head_out == 3
    for name, (before, after) in history["channels"].items():
        assert after >= min(before, 8), name  # nothing collapses
        assert after >= before * 0.25 - 4, name  # the floor, up to rounding to the nearest multiple of 8
    for name in masks:  # each mask keeps exactly the channels of the conv it follows
        mask = model.get_submodule(name)
        assert mask.beta.shape == (mask.num_filters,) and mask.class_peak.shape == (3, mask.num_filters)
        assert len(history["kept"][name]) == mask.num_filters
        if criterion.startswith("icnn") and arch == "small_cnn":
            kept = set(history["kept"][name])
            silent = {i for i in range(128) if i % 4 == 0}
            assert not kept & silent and len(kept) < 128  # silent filters went first
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    # replaying the plain-data history on a fresh build gives the same shapes; the weights then load
    json.dumps(history)
    fresh = apply_pruning_history(build_model(record), history)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y)


def test_unreachable_target_is_an_error():
    model, _ = _interpretable("small_cnn", 64)
    pruner = MaskPruner()
    with pytest.raises(PruningError, match="lower floor"):
        prune_model(model, example_inputs=torch.zeros(1, 3, 64, 64), mask_pruner=pruner,
                    importance=make_importance("l1", mask_pruner=pruner), target_macs=0.2, floor=0.8, steps=4)


def test_ignored_layers_keep_their_channels_and_unknown_names_are_errors():
    model, _ = _interpretable("small_cnn", 64)
    pruner = MaskPruner()
    imp = make_importance("l1", mask_pruner=pruner)
    with pytest.raises(PruningError, match=r"prune.ignore names \['features.99'\], which the model does not have"):
        prune_model(model, example_inputs=torch.zeros(1, 3, 64, 64), mask_pruner=pruner, importance=imp,
                    ignored_layers=["features.99"])
    history = prune_model(model, example_inputs=torch.zeros(1, 3, 64, 64), mask_pruner=pruner, importance=imp,
                          target_macs=0.6, steps=4, ignored_layers=["features.0"])
    assert history["channels"]["features.0"] == [32, 32] and history["channels"]["features.4"][1] < 64


# --------------------------------------------------------------------------------------------------
# target_macs = "auto" and iterative rounds


def _tiny_reference(model: _Tiny, keep: list[int]) -> _Tiny:
    """``model`` with only the ``keep`` channels of ``conv`` (and of both masks and ``conv2``'s inputs)."""
    ref = _Tiny().eval()
    ref.conv = nn.Conv2d(3, len(keep), 3, padding=1)
    ref.mask_a, ref.mask_b = InterpretableMask(len(keep), num_classes=2), InterpretableMask(len(keep), num_classes=2)
    ref.conv2 = nn.Conv2d(len(keep), 4, 3, padding=1)
    with torch.no_grad():
        ref.conv.weight.copy_(model.conv.weight[keep])
        ref.conv.bias.copy_(model.conv.bias[keep])
        ref.conv2.weight.copy_(model.conv2.weight[:, keep])
        ref.conv2.bias.copy_(model.conv2.bias)
        ref.fc.load_state_dict(model.fc.state_dict())
        for r, m in ((ref.mask_a, model.mask_a), (ref.mask_b, model.mask_b)):
            r.beta.copy_(m.beta[keep])
            r.class_peak.copy_(m.class_peak[:, keep])
    return ref


def test_auto_removes_exactly_the_filters_flagged_in_every_coupled_mask():
    model = _tiny()
    x = torch.rand(2, 3, 8, 8)
    # mask_a flags 1, 2 (silent) and 5 (its cluster's best is 6); mask_b flags 2, 5 (silent) and 7 (twin of 0)
    scores = {
        "mask_a": [_rec(i, silent=i in (1, 2), cluster=0 if i in (5, 6) else -1, best=i == 6) for i in range(8)],
        "mask_b": [_rec(i, silent=i in (2, 5), cluster=0 if i in (0, 7) else -1, best=i == 0) for i in range(8)],
    }
    scores = {k: [FilterScores(**{**r.__dict__, "layer": k}) for r in v] for k, v in scores.items()}
    ref = _tiny_reference(model, [0, 1, 3, 4, 6, 7])
    pruner = MaskPruner()
    history = prune_model(model, example_inputs=torch.zeros(1, 3, 8, 8), mask_pruner=pruner,
                          importance=ICNNImportance(scores, pruner), target_macs="auto")
    assert history["removed"] == {"mask_a": [2, 5], "mask_b": [2, 5]}  # flagged in both masks: 2 and 5 only
    assert history["kept"] == {"mask_a": [0, 1, 3, 4, 6, 7], "mask_b": [0, 1, 3, 4, 6, 7]}
    assert history["target_macs"] == "auto" and history["round_to"] is None and history["floor"] is None
    assert history["macs"] == count_macs(ref, torch.zeros(1, 3, 8, 8))[0]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    fresh = apply_pruning_history(_Tiny().eval(), history)  # the history replays like any other
    fresh.load_state_dict(model.state_dict())


def test_auto_keeps_the_best_channel_of_a_group_it_would_empty_and_needs_the_icnn_criterion():
    model = _tiny()
    rates = [0.001 * (i + 1) for i in range(8)]  # every filter silent; filter 7 fires the most
    scores = {name: [FilterScores(layer=name, index=i, silent=True, activation_rate=rates[i]) for i in range(8)]
              for name in ("mask_a", "mask_b")}
    pruner = MaskPruner()
    history = prune_model(model, example_inputs=torch.zeros(1, 3, 8, 8), mask_pruner=pruner,
                          importance=ICNNImportance(scores, pruner), target_macs="auto")
    assert history["kept"]["mask_a"] == [7] and model.conv.out_channels == 1
    pruner = MaskPruner()
    with pytest.raises(PruningError, match="icnn or icnn-l1"):
        prune_model(_tiny(), example_inputs=torch.zeros(1, 3, 8, 8), mask_pruner=pruner,
                    importance=make_importance("l1", mask_pruner=pruner), target_macs="auto")
    with pytest.raises(PruningError, match="steps = 1"):
        prune_model(_tiny(), example_inputs=torch.zeros(1, 3, 8, 8), mask_pruner=pruner,
                    importance=ICNNImportance(scores, pruner), target_macs="auto", rounds=2)
    with pytest.raises(PruningError, match="or 'auto'"):
        prune_model(_tiny(), example_inputs=torch.zeros(1, 3, 8, 8), mask_pruner=pruner,
                    importance=ICNNImportance(scores, pruner), target_macs="half")


def test_round_targets_share_the_macs_to_remove_equally():
    assert round_targets(0.4, 3) == [0.8, 0.6, 0.4]
    assert round_targets(0.5, 1) == [0.5]
    with pytest.raises(PruningError, match="at least 1"):
        round_targets(0.5, 0)


def test_rounds_stop_at_each_round_target_and_recover_in_between():
    model, _ = _interpretable("small_cnn", 64)
    example = torch.zeros(1, 3, 64, 64)
    base = count_macs(model, example)[0]
    pruner = MaskPruner()
    seen = []

    def recover(m, k):
        seen.append((k, count_macs(m, example)[0] / base, m.training))
        m.train()  # a recovery leaves the model in training mode: pruning must not mind

    history = prune_model(model, example_inputs=example, importance=make_importance("l1", mask_pruner=pruner),
                          mask_pruner=pruner, target_macs=0.4, steps=16, rounds=3, after_round=recover)
    assert [k for k, _, _ in seen] == [1, 2]  # not after the last round: the caller's own recovery follows
    assert seen[0][1] <= 0.8 and seen[1][1] <= 0.6 and history["macs_ratio"] <= 0.4
    assert seen[0][1] > 0.6  # round 1 stopped at its own target, not at the final one
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert [r["target"] for r in history["rounds"]] == [0.8, 0.6, 0.4]
    assert sum(r["iterations"] for r in history["rounds"]) == history["iterations"]


# --------------------------------------------------------------------------------------------------
# a run: prune, recover, save, reload in a fresh process, re-analyse


@pytest.fixture(scope="module")
def trained_run(tiny_parts, tmp_path_factory):
    recipe = load_recipe(QUICKSTART, [
        f"data.root={tiny_parts}", "data.generate=none", "pretrain.epochs=0", "train.epochs=1",
        "train.batch_size=16", "train.eval_batch_size=64", "icnn.kappa=2e-5", "model.arch=icnn_compress.zoo:small_cnn",
    ])
    run = tmp_path_factory.mktemp("runs") / "icnn"
    finetune(recipe, run, arm="icnn", progress=False)
    return run


def test_prune_run_recovers_saves_and_reloads_in_a_fresh_process(trained_run, tmp_path):
    analysis = tmp_path / "analysis"
    analyze_run(trained_run, out=analysis, split="train", gallery=False, device="cpu")
    out = tmp_path / "pruned"
    record = prune_run(trained_run, out=out, analysis=analysis / "analysis.json", target_macs=0.5, criterion="icnn",
                       recover_epochs=1, schedule_steps=8, device="cpu", progress=False)
    assert record["macs_ratio"] <= 0.5 and record["accuracy_recovered"] is not None
    assert record["history"]["round_to"] == 16 and record["history"]["floor"] == 0.25  # the quickstart's [prune]
    written = json.loads((out / "pruning.json").read_text())
    assert written["criterion"] == "icnn" and written["history"]["steps"]

    model, saved = load_run_model(out)
    source = load_run_model(trained_run)[1]
    assert saved["pruning"]["macs_ratio"] == record["macs_ratio"]
    assert saved["kappa0"] == pytest.approx(source["kappa0"])  # recovery reused the run's κ₀, no new pilot
    assert saved["recipe"]["icnn"]["kappa"] == pytest.approx(source["kappa0"])
    assert saved["recipe"]["train"]["epochs"] == 1
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        from icnn_compress.runs.open import load_run_model
        torch.load({str(out / 'model.pt')!r}, weights_only=True)  # plain data only
        model, saved = load_run_model({str(out)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(io["x"]), io["y"]), (model(io["x"]) - io["y"]).abs().max()
        print("ok", sum(p.numel() for p in model.parameters()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "ok" and int(done.stdout.split()[1]) == sum(p.numel() for p in model.parameters())

    # the pruned model still has its masks: its analysis runs and sees the pruned filter counts
    again = analyze_run(out, out=tmp_path / "analysis2", split="test", gallery=False, device="cpu")
    layers = again["summary"]["layers"]
    assert layers["features.14.mask"]["num_filters"] == model.get_submodule("features.14.mask").num_filters < 128


def test_prune_run_without_recovery_keeps_the_run_record(trained_run, tmp_path):
    record = prune_run(trained_run, out=tmp_path / "l1", target_macs=0.7, criterion="l1", recover_epochs=0,
                       schedule_steps=8, device="cpu", progress=False)
    assert record["accuracy_recovered"] is None and record["macs_ratio"] <= 0.7
    model, saved = load_run_model(tmp_path / "l1")
    assert saved["arm"] == "icnn" and saved["pruning"]["criterion"] == "l1"
    with pytest.raises(PruningError, match="already holds a run"):
        prune_run(trained_run, out=tmp_path / "l1", criterion="l1", device="cpu", progress=False)
    with pytest.raises(PruningError, match="already pruned"):
        prune_run(tmp_path / "l1", out=tmp_path / "again", criterion="l1", device="cpu", progress=False)


def test_resume_needs_an_interrupted_recovery_with_the_same_pruning(trained_run, tmp_path):
    out = tmp_path / "p"
    with pytest.raises(PruningError, match="no interrupted recovery"):  # never started
        prune_run(trained_run, out=out, criterion="l1", recover_epochs=1, resume=True, device="cpu", progress=False)
    out.mkdir()
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(PruningError, match="pass --resume"):
        prune_run(trained_run, out=out, criterion="l1", recover_epochs=1, device="cpu", progress=False)
    (out / "history.json").write_text(json.dumps({"steps": [["features.0", True, [0]]]}))
    with pytest.raises(PruningError, match="another result"):
        prune_run(trained_run, out=out, criterion="l1", target_macs=0.9, schedule_steps=4, recover_epochs=1,
                  resume=True, device="cpu", progress=False)


def test_a_run_made_on_a_gpu_recovers_on_the_device_prune_is_given(trained_run, tmp_path):
    gpu_run = tmp_path / "gpu"
    gpu_run.mkdir()
    saved = torch.load(trained_run / "model.pt", weights_only=True)
    saved["recipe"]["train"]["device"] = "cuda:7"  # as fine-tuned on a GPU machine
    torch.save(saved, gpu_run / "model.pt")
    record = prune_run(gpu_run, out=tmp_path / "r", criterion="l1", target_macs=0.7, schedule_steps=4, recover_epochs=1,
                       device="cpu", progress=False)
    assert record["accuracy_recovered"] is not None


def test_an_interrupted_recovery_resumes(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "r"
    settings = dict(criterion="l1", target_macs=0.7, schedule_steps=4, device="cpu", progress=False)
    with interrupted_at_call(monkeypatch, icnn_compress.train._finetune, "_train_epoch"):  # in recovery epoch 2
        prune_run(trained_run, out=out, recover_epochs=2, **settings)
    assert not (out / "pruning.json").exists() and not (out / "model.pt").exists()
    record = prune_run(trained_run, out=out, recover_epochs=2, resume=True, **settings)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and record["accuracy_recovered"] is not None
    assert load_run_model(out)[1]["pruning"]["macs_ratio"] == record["macs_ratio"]


def _without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def test_a_run_stopped_before_its_record_is_finished_again(trained_run, tmp_path):
    settings = dict(criterion="l1", target_macs=0.7, schedule_steps=4, device="cpu", progress=False)
    recovered = prune_run(trained_run, out=tmp_path / "r", recover_epochs=1, **settings)
    (tmp_path / "r" / "pruning.json").unlink()  # stopped between the recovery's model.pt and the record
    with pytest.raises(PruningError, match="pass --resume"):
        prune_run(trained_run, out=tmp_path / "r", recover_epochs=1, **settings)
    again = prune_run(trained_run, out=tmp_path / "r", recover_epochs=1, resume=True, **settings)
    assert _without_time(again) == _without_time(recovered)  # no epoch ran again: the same recovered accuracy
    assert [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1]
    written = json.loads((tmp_path / "r" / "pruning.json").read_text())
    assert written["accuracy_recovered"] == again["accuracy_recovered"]

    saved = prune_run(trained_run, out=tmp_path / "s", recover_epochs=0, **settings)
    (tmp_path / "s" / "pruning.json").unlink()  # stopped between model.pt and the record: done again
    assert _without_time(prune_run(trained_run, out=tmp_path / "s", recover_epochs=0, **settings)) == \
        _without_time(saved)


def test_auto_prune_run_states_the_thresholds_and_removes_what_the_analysis_flags(trained_run, tmp_path):
    analysis = tmp_path / "analysis"
    analyze_run(trained_run, out=analysis, split="train", gallery=False, device="cpu")
    record = prune_run(trained_run, out=tmp_path / "auto", analysis=analysis, target_macs="auto", criterion="icnn",
                       recover_epochs=0, device="cpu", progress=False)
    settings = json.loads((analysis / "analysis.json").read_text())["summary"]["settings"]
    thresholds = record["auto"]["thresholds"]
    assert thresholds["silent_fraction"] == settings["silent_fraction"] and thresholds["split"] == "train"
    assert thresholds["redundancy_threshold"] == settings["redundancy_threshold"]
    layers = json.loads((analysis / "analysis.json").read_text())["summary"]["layers"]
    for name, counts in record["auto"]["layers"].items():
        assert counts["silent"] == layers[name]["num_silent"]
        assert counts["removed"] == counts["flagged"] == counts["silent"] + counts["redundant"]
        assert counts["kept"] + counts["removed"] == counts["num_filters"] == layers[name]["num_filters"]
    assert record["target_macs"] == "auto" and record["macs_ratio"] <= 1.0
    assert json.loads((tmp_path / "auto" / "pruning.json").read_text())["auto"] == record["auto"]


def test_iterative_prune_run_shares_the_recovery_over_its_rounds(trained_run, tmp_path):
    out = tmp_path / "it"
    record = prune_run(trained_run, out=out, criterion="l1", target_macs=0.6, steps=2, recover_epochs=2,
                       schedule_steps=8, device="cpu", progress=False)
    assert record["steps"] == 2 and record["recover_epochs_per_round"] == [1, 1] and record["macs_ratio"] <= 0.6
    assert [r["target"] for r in record["history"]["rounds"]] == [0.8, 0.6]
    for metrics in (out / "round-1" / "metrics.jsonl", out / "metrics.jsonl"):
        assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]
    model, saved = load_run_model(out)  # the final model reloads from its history like a one-shot one
    assert saved["pruning"]["macs_ratio"] == record["macs_ratio"]
    with pytest.raises(PruningError, match="at least one recovery epoch each"):
        prune_run(trained_run, out=tmp_path / "x", criterion="l1", target_macs=0.6, steps=3, recover_epochs=2,
                  device="cpu", progress=False)
