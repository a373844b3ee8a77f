"""Templates, peaks and the mask layer (METHOD.md section 2) on hand-computed maps."""

from __future__ import annotations

import pytest
import torch

from icnn_compress.method.mask import (
    InterpretableMask,
    paper_beta_to_grid,
    peak_cells,
    spread_cells,
    template_masks,
)


def test_template_on_a_3x3_grid_has_hand_computed_values():
    m = template_masks(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([1.0]), 3, 3)
    # grid u = (-1, 0, 1); peak at row 1 (u=0), col 0 (u=-1); m = max(1 - (|du| + |dv|), -1)
    expected = torch.tensor([[0.0, -1.0, -1.0], [1.0, 0.0, -1.0], [0.0, -1.0, -1.0]])
    assert torch.equal(m[0, 0], expected)


def test_centroid_rounds_half_up_and_all_zero_gives_first_cell():
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 1, 1] = 1.0
    x[0, 0, 2, 2] = 1.0  # centroid (1.5, 1.5) -> (2, 2)
    rows, cols = peak_cells(x, "centroid")
    assert rows.tolist() == [[2, 0]] and cols.tolist() == [[2, 0]]
    rows, cols = peak_cells(x, "argmax")
    assert rows.tolist() == [[1, 0]] and cols.tolist() == [[1, 0]]


def test_paper_beta_conversion():
    assert paper_beta_to_grid(4.0, 14) == 4.0 * 13 / 28


def test_mask_is_active_in_eval_and_baseline_is_identity():
    x = torch.relu(torch.randn(2, 3, 5, 5))
    mask = InterpretableMask(3, num_classes=2).eval()
    out = mask(x)
    expected = torch.relu(x * mask.masks_for(x))
    assert torch.equal(out, expected)
    assert not torch.equal(out, x)
    base = InterpretableMask(3, num_classes=2, active=False).eval()
    assert torch.equal(base(x), x)


def test_gradient_through_the_mask_treats_it_as_constant():
    x = torch.relu(torch.randn(1, 1, 4, 4)).requires_grad_(True)
    mask = InterpretableMask(1, num_classes=1, peak="argmax")
    mask(x).sum().backward()
    m = mask.masks_for(x.detach())
    assert torch.equal(x.grad, m * (x.detach() * m > 0))


def test_category_ema_first_observation_replaces_then_damps():
    mask = InterpretableMask(2, num_classes=3, category_momentum=0.9)
    x = torch.zeros(2, 2, 2, 2)
    x[0, 0, 0, 0] = 2.0  # image of class 1, filter 0 peaks at 2
    x[1, 1, 1, 1] = 4.0  # image of class 2, filter 1 peaks at 4
    mask.update_categories(x, torch.tensor([1, 2]))
    assert mask.class_peak.tolist() == [[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]
    assert mask.category.tolist() == [1, 2]
    mask.update_categories(torch.zeros(1, 2, 2, 2), torch.tensor([1]))
    assert torch.allclose(mask.class_peak[1], torch.tensor([1.8, 0.0]))
    assert mask.class_seen.tolist() == [False, True, True]


def test_learned_beta_moves_as_the_released_code_through_momentum_sgd():
    mask = InterpretableMask(1, num_classes=1)  # beta 2, beta_lr 0.05, pseudo-gradient scale 1e4
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # a point: sigma = 0 -> 3/sigma = inf -> target clipped to 3
    mask.update_beta(x, mask.masks_for(x), torch.tensor([[True]]), lr=1e-4, momentum=0.9)
    # g = -1e4 (3 - 2); v = -0.05 * 1e-4 * g = 0.05
    assert torch.allclose(mask.beta, torch.tensor([2.05]))
    mask.update_beta(x, mask.masks_for(x), torch.tensor([[True]]), lr=1e-4, momentum=0.9)
    # v = 0.9 * 0.05 + 0.05 * 1e-4 * 1e4 * (3 - 2.05) = 0.0925
    assert torch.allclose(mask.beta, torch.tensor([2.1425]))
    assert torch.allclose(mask.beta_velocity, torch.tensor([0.0925]))


def test_learned_beta_without_positive_images_targets_three():
    mask = InterpretableMask(1, num_classes=1)
    x = torch.rand(2, 1, 5, 5)
    mask.update_beta(x, mask.masks_for(x), torch.tensor([[False], [False]]), lr=1e-4)
    assert torch.allclose(mask.beta, torch.tensor([2.05]))  # the step toward 3, as above


def test_learned_beta_uses_raw_strengths_that_can_be_negative():
    mask = InterpretableMask(1, num_classes=1)
    x = torch.zeros(2, 1, 5, 5)
    x[0, 0, 0, 0] = x[0, 0, 0, 4] = x[0, 0, 4, 0] = x[0, 0, 4, 4] = 1.0  # centroid at the centre, mask -1 at corners
    x[1, 0, 2, 2] = 1.0  # a point at the centre
    m = mask.masks_for(x)
    s = (x * m).mean(dim=(2, 3))[:, 0]
    assert s[0] == pytest.approx(-4 / 25) and s[1] == pytest.approx(1 / 25)
    # sigma-bar = (s0 * sqrt(8) + s1 * 0) / (s0 + s1) = 3.77 -> 3 / sigma-bar = 0.80 -> clipped to 1.5
    # (a rule that clamps strengths at 0 sees only the point, sigma-bar 0, and targets 3 instead)
    mask.update_beta(x, m, torch.tensor([[True], [True]]), lr=1e-4, momentum=0.9)
    assert torch.allclose(mask.beta, torch.tensor([2.0 - 0.05 * 1e-4 * 1e4 * 0.5]))


def test_local_mass_peak_differs_from_centroid_and_argmax_by_hand():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 0] = 3.0  # a single-cell spike
    x[0, 0, 3:5, 3:5] = 1.0  # a 2x2 bump of mass 4
    # 3x3 sums: at most 3 near the spike, 4 at (3, 3), (3, 4), (4, 3), (4, 4) (own values equal): the first wins
    assert [t.item() for t in peak_cells(x, "local-mass")] == [3, 3]
    assert [t.item() for t in peak_cells(x, "argmax")] == [0, 0]
    # centroid: (0·3 + 3·2 + 4·2) / 7 = 2 on both axes, between the two bumps
    assert [t.item() for t in peak_cells(x, "centroid")] == [2, 2]
    lone = torch.zeros(1, 1, 4, 4)
    lone[0, 0, 2, 1] = 1.0  # every window around it sums to 1: the spike's own cell wins
    assert [t.item() for t in peak_cells(lone, "local-mass")] == [2, 1]
    zero = peak_cells(torch.zeros(2, 3, 4, 4), "local-mass")
    assert zero[0].eq(0).all() and zero[1].eq(0).all()


def test_spread_peak_moves_crowded_filters_to_their_next_bump_by_hand():
    x = torch.zeros(1, 4, 7, 7)
    x[0, :, 1, 1] = 2.0  # every filter's strongest bump
    x[0, :, 5, 5] = 1.0  # and a weaker one, two cells beyond the first's 3x3 neighbourhood
    one = torch.zeros(4, dtype=torch.long)
    # quota 1/4 of a 4-filter category is 1 earlier filter: filter 0 keeps (1, 1), the later ones move
    assert [t.tolist() for t in spread_cells(x, one, 0.25)] == [[[1, 5, 5, 5]], [[1, 5, 5, 5]]]
    # two categories of 2 filters, quota 1/2: one earlier filter of the SAME category fills a place
    two = torch.tensor([0, 1, 0, 1])
    assert [t.tolist() for t in spread_cells(x, two, 0.5)] == [[[1, 1, 5, 5]], [[1, 1, 5, 5]]]
    # a quota no category fills gives the local-mass peak itself
    assert torch.equal(torch.stack(spread_cells(x, one, 1.0)), torch.stack(peak_cells(x, "local-mass")))
    # a filter with no other bump outside the crowded place keeps its own peak
    lone = torch.zeros(1, 2, 5, 5)
    lone[0, :, 2, 2] = 1.0
    assert [t.tolist() for t in spread_cells(lone, torch.zeros(2, dtype=torch.long), 0.25)] == [[[2, 2]], [[2, 2]]]


def test_spread_peak_reads_the_masks_categories():
    mask = InterpretableMask(4, num_classes=2, peak="spread")
    mask.class_peak.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))  # categories 0, 1, 0, 1
    x = torch.zeros(1, 4, 7, 7)
    x[0, :, 1, 1] = 2.0
    x[0, :, 5, 5] = 1.0
    out = mask(x)
    # the 0.25 quota of a 2-filter category is one earlier filter: filters 0 and 1 keep (1, 1), 2 and 3 move
    assert out[0, :2, 1, 1].gt(0).all() and out[0, :2, 5, 5].eq(0).all()
    assert out[0, 2:, 5, 5].gt(0).all() and out[0, 2:, 1, 1].eq(0).all()
    with pytest.raises(ValueError, match="categories"):
        peak_cells(x, "spread")


def test_mask_accepts_local_mass_and_rejects_unknown_peaks():
    mask = InterpretableMask(2, num_classes=1, peak="local-mass")
    x = torch.zeros(1, 2, 4, 4)
    x[0, :, 3, 3] = 1.0
    assert mask(x)[0, :, 3, 3].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="peak must be one of"):
        InterpretableMask(2, num_classes=1, peak="mode")
