"""Landmark anchors for µ̂ in training (icnn.anchor, icnn_compress/method/anchor.py) on hand-computed maps."""

from __future__ import annotations

import pytest
import torch

from icnn_compress.method.anchor import anchored, part_assignment
from icnn_compress.method.mask import InterpretableMask, landmark_cells, masked_maps


def test_part_assignment_is_round_robin_and_balanced():
    assert part_assignment(6, [0, 1, 2, 3]).tolist() == [0, 1, 2, 3, 0, 1]
    assert part_assignment(3, [2, 0]).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="at least one landmark"):
        part_assignment(3, [])


def test_landmark_cells_tile_the_image_and_clamp_the_far_edge():
    # a 64 px image over a 4x4 map: 16 px cells; (x, y) = (0, 0), (15.9, 16), (63, 40), (64, 64)
    xy = torch.tensor([[0.0, 0.0], [15.9, 16.0], [63.0, 40.0], [64.0, 64.0]])
    rows, cols = landmark_cells(xy, 64, 4, 4)
    assert rows.tolist() == [0, 1, 2, 3] and cols.tolist() == [0, 0, 3, 3]


def test_anchor_routes_the_gradient_not_the_value_and_only_where_the_landmark_is_visible():
    x = torch.zeros(1, 2, 3, 3)
    x[0, :, 0, 0] = 1.0  # both maps peak at (0, 0)
    x[0, :, 1, 2] = 0.5
    x.requires_grad_(True)
    xy = torch.tensor([[[50.0, 20.0], [50.0, 20.0]]])  # 60 px image, 20 px cells: cell (row 1, col 2)
    valid = torch.tensor([[True, False]])
    beta = torch.tensor([1.0, 1.0])
    out, m, rows, cols = masked_maps(x, beta, "argmax", True, (xy, valid, 60))
    plain, _, _, _ = masked_maps(x.detach(), beta, "argmax", True)
    assert torch.equal(out.detach(), plain)  # the value is the peak rule's: no landmark reaches the output
    assert rows.tolist() == [[1, 0]] and cols.tolist() == [[2, 0]]
    # filter 0: template at (1, 2) on the (-1, 0, 1) grid, β = 1: m_ij = max(1 − (|u_i| + |v_j − 1|), −1)
    assert m[0, 0].tolist() == [[-1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [-1.0, -1.0, 0.0]]
    out.sum().backward()
    # filter 0's gradient flows only where x ∘ anchored m > 0: the cell (1, 2); filter 1's through the peak
    # rule's template at (0, 0) (m = 1 there, 0 on (1, 2) with β = 1: 1 − (1 + 1) < 0 → −1)
    assert x.grad[0, 0].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert x.grad[0, 1].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_anchored_sets_the_masks_in_training_only_and_clears_them():
    model = torch.nn.Sequential(InterpretableMask(3, num_classes=1, peak="argmax", beta=4.0))
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = 1.0
    landmarks = torch.tensor([[[30.0, 30.0], [1.0, 1.0]]])  # K = 2 on a 32 px image: cells (1, 1) and (0, 0)
    visible = torch.tensor([[True, True]])
    seen = []
    model[0].hook = lambda mask, x, m, cells: seen.append(m)
    with anchored(model, landmarks, visible, image_size=32, parts=[0, 1]):
        # filters 0, 1, 2 -> landmarks 0, 1, 0; β = 4 paper units = 1 on a 2-cell grid: m(0, 0) = −1 at (1, 1)
        assert model[0].anchor[0].tolist() == [[[30.0, 30.0], [1.0, 1.0], [30.0, 30.0]]]
        assert model(x)[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # the value: the peak rule's
        assert seen[-1][0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0]  # the filter loss: the anchored templates
        model.eval()
        model(x)
        assert seen[-1][0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # evaluation: the peak rule
    assert model[0].anchor is None
