"""The κ pilot measures real gradient norms; the collapse guard backs off and refuses collapsed runs."""

from __future__ import annotations

import math

import pytest
import torch

from icnn_compress.errors import TrainingError
from icnn_compress.method.kappa import R_BANDS, R_COLLAPSE, CollapseGuard, calibrate_kappa
from icnn_compress.method.filter_loss import FilterLoss
from icnn_compress.method.loss import positive_pairs, reference_gradient, class_weights
from icnn_compress.method.mask import InterpretableMask


def tiny(scale: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), InterpretableMask(6, num_classes=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2),
    )
    with torch.no_grad():
        model[5].weight.mul_(scale)
    return model


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(8, 3, 6, 6, generator=g), "label": torch.arange(8) % 2} for _ in range(n)]


def independent_ratio(model, data):
    """R per unit κ recomputed by hand: hook the mask input, compute the injection, compare norms."""
    mask = model[2]
    task_sq = inj_sq = 0.0
    for batch in data:
        captured = {}
        handle = mask.register_forward_pre_hook(lambda mod, inp: captured.setdefault("x", inp[0]))
        logits = model(batch["image"])
        handle.remove()
        x = captured["x"]
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, batch["label"]), x)
        pos = positive_pairs(batch["label"], mask.category, None)
        w_pos, w_neg = class_weights(mask, None)
        inj, _ = reference_gradient(x.detach(), mask.masks_for(x.detach()), pos, w_pos=w_pos, w_neg=w_neg, kappa=1.0)
        task_sq += float(g.pow(2).sum())
        inj_sq += float(inj.pow(2).sum())
    return math.sqrt(inj_sq / task_sq)


def test_pilot_ratio_comes_from_real_gradient_norms_and_sets_kappa_on_target():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = calibrate_kappa(model, FilterLoss(model), batches(), torch.device("cpu"), optimizer="sgd", batches=3)
    r = result["R_per_unit"]["2"]
    # The pilot warms the categories up first; recompute with the same categories, by hand.
    assert r == pytest.approx(independent_ratio(model, batches()), rel=1e-5)
    assert result["kappa"] == pytest.approx(R_BANDS["sgd"][0] / r)
    for k, v in model.state_dict().items():  # weights untouched; only the categories were warmed up
        if not k.endswith(("class_peak", "class_seen")):
            assert torch.equal(v, before[k]), k
    # A head ten times larger makes the task gradient about ten times larger: R follows it.
    bigger = tiny(scale=10.0)
    r10 = calibrate_kappa(bigger, FilterLoss(bigger), batches(), torch.device("cpu"), optimizer="sgd",
                          batches=3)["R_per_unit"]["2"]
    assert r10 == pytest.approx(independent_ratio(bigger, batches()), rel=1e-5)
    assert 8 < r / r10 < 12


def record(loss=1.0, dead=0, acc=0.90, filters=100, r=None):
    top = {"dead": dead, "filters": filters} | ({} if r is None else {"R": r})
    return {"train_loss": loss, "val_acc": acc, "layers": {"top": top, "next": {"dead": 0, "filters": 10, "R": 99.0}}}


def test_guard_verdicts():
    guard = CollapseGuard(enabled=True)
    assert guard.check(record()) is None
    assert "more dead filters" in guard.check(record(dead=12))
    assert guard.check(record(dead=5)) is None  # below max(2, 10% of 100)
    assert "spiked" in guard.check(record(loss=2.5))
    assert "accuracy fell" in guard.check(record(acc=0.70))
    assert "not finite" in guard.check(record(loss=math.inf))
    assert CollapseGuard(enabled=False).check(record(loss=math.inf)) is None


def test_guard_backs_off_when_r_at_the_top_layer_reaches_the_collapse_edge():
    guard = CollapseGuard(enabled=True, r_collapse=R_COLLAPSE["adamw"], r_target=R_BANDS["adamw"][0])
    assert guard.check(record(r=2.9)) is None  # only the top layer's R counts (the next one has 99)
    assert "R at top reached 6" in guard.check(record(r=6.0))
    # the back-off puts R on the target: 0.6 / 6 = 0.1, more than the default factor 1/3
    assert guard.back_off(3e-3) == pytest.approx(3e-4)
    assert "R at top" in guard.check(record(r=3.0))
    assert guard.back_off(3e-4) == pytest.approx(6e-5)  # 0.6 / 3 = 0.2
    sgd = CollapseGuard(enabled=True, r_collapse=R_COLLAPSE["sgd"], r_target=R_BANDS["sgd"][0])
    assert sgd.check(record(r=13.0)) is None
    assert "R at top reached 15" in sgd.check(record(r=15.0))
    assert sgd.back_off(3e-3) == pytest.approx(1e-3)  # 6 / 15 = 0.4 is less than the default 1/3: 1/3 holds


def test_guard_backs_off_then_gives_up_and_refuses_a_collapsed_end():
    guard = CollapseGuard(enabled=True, max_backoffs=2)
    assert guard.back_off(9.0) == pytest.approx(3.0)
    assert guard.back_off(3.0) == pytest.approx(1.0)
    with pytest.raises(TrainingError, match="kept collapsing"):
        guard.back_off(1.0)
    with pytest.raises(TrainingError, match="60 of 100 filters dead"):
        guard.final_check(record(dead=60))
