"""Location instability, its references and accuracy: hand-computed values and a float64 loop reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import icnn_compress.method.metrics as metrics
import icnn_compress.method.parts as part_measures
from icnn_compress.method.metrics import (
    accuracy,
    category_histogram,
    landmark_histogram,
    location_instability,
    oracle_reference,
    random_peak_reference,
)
from icnn_compress.method.receptive_field import LayerGeometry

NAN = float("nan")


def _reference(peak_value, peak_xy, landmarks, visible, *, diag, top_k, filter_category=None, labels=None):
    """Straightforward per-(filter, landmark) loops in float64: the definition of METHOD.md section 6."""
    n, d = peak_value.shape
    k = landmarks.shape[1]
    out = torch.full((d, k), NAN, dtype=torch.float64)
    for f in range(d):
        for j in range(k):
            imgs = [i for i in range(n) if visible[i, j]
                    and (filter_category is None or labels[i] == filter_category[f])]
            imgs.sort(key=lambda i: (-float(peak_value[i, f]), i))
            dists = [math.dist(landmarks[i, j].tolist(), peak_xy[i, f].tolist()) / diag for i in imgs[:top_k]]
            if len(dists) >= 2:
                out[f, j] = statistics.stdev(dists)
    return out


def test_filter_on_landmark_is_perfectly_stable() -> None:
    lm = torch.tensor([[[3.0, 4.0], [10.0, 1.0]], [[7.0, 2.0], [1.0, 1.0]], [[5.0, 5.0], [0.0, 9.0]]])
    vis = torch.ones(3, 2, dtype=torch.bool)
    peak_xy = lm[:, :1, :].clone()  # one filter, always exactly on landmark 0
    res = location_instability(torch.ones(3, 1), peak_xy, lm, vis, image_diagonal=10.0)
    assert res.per_filter_landmark[0, 0].item() == 0.0
    assert res.tracked_landmark.tolist() == [0]
    assert res.num_images.tolist() == [[3, 3]]


def test_known_sample_std() -> None:
    # Distances 0, 3, 6 px: mean 3, unbiased variance (9 + 0 + 9) / 2 = 9, std 3 px = 0.3 diagonals.
    lm = torch.zeros(3, 1, 2)
    peak_xy = torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]], [[0.0, 6.0]]])
    res = location_instability(torch.rand(3, 1), peak_xy, lm, torch.ones(3, 1, dtype=torch.bool),
                               image_diagonal=10.0)
    assert res.per_filter_landmark.item() == pytest.approx(0.3, abs=1e-12)
    assert res.per_filter.item() == pytest.approx(0.3, abs=1e-12)
    assert res.mean == pytest.approx(0.3, abs=1e-12)


def test_top_k_keeps_the_strongest_images() -> None:
    # Peaks 5, 1, 3, 4: top-2 are images 0 and 3, at distances 2 and 4 -> std sqrt(2).
    lm = torch.zeros(4, 1, 2)
    peak_xy = torch.tensor([[[2.0, 0.0]], [[100.0, 0.0]], [[0.0, 50.0]], [[0.0, 4.0]]])
    value = torch.tensor([[5.0], [1.0], [3.0], [4.0]])
    res = location_instability(value, peak_xy, lm, torch.ones(4, 1, dtype=torch.bool), image_diagonal=1.0,
                               top_k=2)
    assert res.per_filter_landmark.item() == pytest.approx(math.sqrt(2.0), abs=1e-12)
    assert res.num_images.item() == 2


def test_cls_rule_restricts_to_the_filter_category() -> None:
    # Filter 0 belongs to class 1: images 1 and 2 only (distances 1 and 3 -> std sqrt(2));
    # filter 1 belongs to class 0: images 0 and 3 (distances 2 and 2 -> std 0).
    lm = torch.zeros(4, 1, 2)
    peak_xy = torch.tensor([[[9.0, 0.0], [2.0, 0.0]],
                            [[1.0, 0.0], [7.0, 0.0]],
                            [[3.0, 0.0], [5.0, 0.0]],
                            [[0.0, 9.0], [0.0, 2.0]]])
    labels = torch.tensor([0, 1, 1, 0])
    res = location_instability(torch.rand(4, 2), peak_xy, lm, torch.ones(4, 1, dtype=torch.bool),
                               image_diagonal=1.0, filter_category=torch.tensor([1, 0]), labels=labels)
    torch.testing.assert_close(res.per_filter_landmark, torch.tensor([[math.sqrt(2.0)], [0.0]],
                                                                     dtype=torch.float64))
    with pytest.raises(ValueError, match="both"):
        location_instability(torch.rand(4, 2), peak_xy, lm, torch.ones(4, 1, dtype=torch.bool),
                             image_diagonal=1.0, filter_category=torch.tensor([1, 0]))


def test_invisible_landmark_is_nan_and_excluded() -> None:
    lm = torch.zeros(3, 2, 2)
    lm[:, 1] = float("nan")  # garbage where invisible must not leak
    vis = torch.tensor([[True, False]] * 3)
    peak_xy = torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]], [[0.0, 6.0]]])
    res = location_instability(torch.rand(3, 1), peak_xy, lm, vis, image_diagonal=10.0)
    assert math.isnan(res.per_filter_landmark[0, 1].item())
    assert res.per_filter.item() == pytest.approx(0.3)
    assert res.mean == pytest.approx(0.3)
    assert res.tracked_landmark.tolist() == [0]
    assert res.num_images.tolist() == [[3, 0]]


def test_single_image_pair_is_nan_and_filter_without_images_is_untracked() -> None:
    lm = torch.zeros(2, 1, 2)
    peak_xy = torch.ones(2, 2, 2)
    res = location_instability(torch.rand(2, 2), peak_xy, lm, torch.ones(2, 1, dtype=torch.bool),
                               image_diagonal=1.0, filter_category=torch.tensor([0, 5]),
                               labels=torch.tensor([0, 1]))
    assert torch.isnan(res.per_filter_landmark).all()
    assert math.isnan(res.mean)
    assert res.tracked_landmark.tolist() == [0, -1]


def test_all_zero_activations_rank_by_image_index() -> None:
    # Every peak is 0 (a dead filter): the top-2 are the first two images, deterministically.
    lm = torch.zeros(4, 1, 2)
    peak_xy = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[50.0, 0.0]], [[90.0, 0.0]]])
    res = location_instability(torch.zeros(4, 1), peak_xy, lm, torch.ones(4, 1, dtype=torch.bool),
                               image_diagonal=1.0, top_k=2)
    assert res.per_filter_landmark.item() == pytest.approx(math.sqrt(2.0))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 5), k=st.integers(1, 3), top_k=st.integers(1, 6),
       cls=st.booleans(), seed=st.integers(0, 2**16), chunk=st.sampled_from([1, 7, 1 << 22]))
def test_matches_loop_reference(n, d, k, top_k, cls, seed, chunk) -> None:
    g = torch.Generator().manual_seed(seed)
    # Few distinct peak values, so that ties are exercised.
    value = torch.randint(0, 3, (n, d), generator=g).float()
    peak_xy = torch.rand(n, d, 2, generator=g) * 64
    lm = torch.rand(n, k, 2, generator=g) * 64
    vis = torch.rand(n, k, generator=g) > 0.3
    labels = torch.randint(0, 2, (n,), generator=g) if cls else None
    cats = torch.randint(-1, 2, (d,), generator=g) if cls else None
    old = metrics._CHUNK_ELEMENTS
    metrics._CHUNK_ELEMENTS = chunk
    try:
        res = location_instability(value, peak_xy, lm, vis, image_diagonal=64 * math.sqrt(2), top_k=top_k,
                                   filter_category=cats, labels=labels)
    finally:
        metrics._CHUNK_ELEMENTS = old
    want = _reference(value, peak_xy, lm, vis, diag=64 * math.sqrt(2), top_k=top_k, filter_category=cats,
                      labels=labels)
    torch.testing.assert_close(res.per_filter_landmark, want, equal_nan=True)
    assert res.per_filter.shape == (d,) and res.tracked_landmark.shape == (d,)
    assert res.tracked_landmark.dtype == torch.long
    assert ((res.tracked_landmark >= -1) & (res.tracked_landmark < k)).all()


def test_tracked_landmark_is_the_nearest_on_average() -> None:
    # The filter sits 1 px from landmark 1 and 10 px from landmark 0 on every image.
    lm = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]] * 3)
    res = location_instability(torch.rand(3, 1), torch.zeros(3, 1, 2), lm, torch.ones(3, 2, dtype=torch.bool),
                               image_diagonal=1.0)
    assert res.tracked_landmark.tolist() == [1]


GEOM = LayerGeometry(offset=(5.0, 5.0), stride=(10.0, 10.0))


def test_oracle_quantisation_error() -> None:
    # Landmarks at x = 7 and 5 both fall in cell (0, 0), centred at (5, 5): distances 2 and 0 px,
    # sample std sqrt(2) px.
    lm = torch.tensor([[[7.0, 5.0]], [[5.0, 5.0]]])
    res = oracle_reference(lm, torch.ones(2, 1, dtype=torch.bool), geometry=GEOM, map_size=4, image_diagonal=1.0)
    assert res.mean == pytest.approx(math.sqrt(2.0))


def test_oracle_is_zero_for_rigid_landmarks_on_cell_centres() -> None:
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 3, (20, 1, 2), generator=g).double()
    lm0 = GEOM.cell_centres(cells)  # (20, 1, 2) on cell centres
    lm = torch.cat((lm0, lm0 + 10.0), dim=1)  # landmark 1 always one cell down-right
    vis = torch.ones(20, 2, dtype=torch.bool)
    res = oracle_reference(lm, vis, geometry=GEOM, map_size=4, image_diagonal=1.0)
    assert res.mean == pytest.approx(0.0, abs=1e-12)
    labels = torch.arange(20) % 3
    res_cls = oracle_reference(lm, vis, geometry=GEOM, map_size=4, image_diagonal=1.0, labels=labels)
    assert res_cls.per_filter.shape == (3 * 2,)
    assert res_cls.mean == pytest.approx(0.0, abs=1e-12)


def test_oracle_measures_only_images_with_its_landmark() -> None:
    # Virtual filter 1 follows landmark 1, which is invisible on image 2: it is measured on images 0, 1.
    lm = torch.tensor([[[5.0, 5.0], [15.0, 5.0]], [[5.0, 5.0], [25.0, 5.0]], [[5.0, 5.0], [0.0, 0.0]]])
    vis = torch.tensor([[True, True], [True, True], [True, False]])
    res = oracle_reference(lm, vis, geometry=GEOM, map_size=4, image_diagonal=1.0)
    assert res.num_images.tolist() == [[3, 2], [2, 2]]
    # Filter 1 vs landmark 0 and filter 0 vs landmark 1: distances 10 and 20 -> std sqrt(50);
    # each filter against its own landmark: 0.
    want = torch.tensor([[0.0, math.sqrt(50.0)], [math.sqrt(50.0), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(res.per_filter_landmark, want)
    assert res.mean == pytest.approx(math.sqrt(50.0) / 2)


def test_random_reference_is_seeded_and_above_the_oracle() -> None:
    g = torch.Generator().manual_seed(1)
    lm = torch.rand(200, 3, 2, generator=g) * 40
    vis = torch.rand(200, 3, generator=g) > 0.2
    labels = torch.randint(0, 4, (200,), generator=g)
    kw = dict(geometry=GEOM, map_size=4, image_diagonal=40 * math.sqrt(2), labels=labels)
    a = random_peak_reference(lm, vis, **kw, seed=3)
    b = random_peak_reference(lm, vis, **kw, seed=3)
    assert a.mean == b.mean
    assert a.per_filter.shape == (128,)
    oracle = oracle_reference(lm, vis, **kw)
    assert oracle.mean < a.mean


def test_accuracy() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert accuracy(logits, labels) == 0.5
    assert accuracy(torch.tensor([0, 1, 2, 0]), labels) == 0.75
    assert math.isnan(accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))


def test_histograms() -> None:
    assert landmark_histogram(torch.tensor([0, 2, 2, -1]), ["head", "back", "tail"]) == {
        "head": 1, "back": 0, "tail": 2}
    assert category_histogram(torch.tensor([1, 1, 0]), ["cat", "dog"]) == {"cat": 1, "dog": 2}
    with pytest.raises(ValueError, match="out of range"):
        category_histogram(torch.tensor([3]), ["cat", "dog"])


# ---------------------------------------------------------------------------------------------------------
# Landmark diversity and part interpretability


def test_landmark_diversity_hand_computed() -> None:
    out = metrics.landmark_diversity(torch.tensor([0, 0, 1, -1]), 4)
    assert out.counts.tolist() == [2, 1, 0, 0]
    # p = (2/3, 1/3): H = -(2/3 ln 2/3 + 1/3 ln 1/3), over ln 4
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert out.entropy == pytest.approx(h / math.log(4))
    # 10 % of D = 4 filters is 0.4: head (2) and body (1) are covered, the other two are not
    assert out.coverage == 0.5


def test_landmark_diversity_extremes() -> None:
    assert metrics.landmark_diversity(torch.tensor([2, 2, 2]), 3).entropy == 0.0
    even = metrics.landmark_diversity(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert even.entropy == pytest.approx(1.0) and even.coverage == 1.0
    none = metrics.landmark_diversity(torch.tensor([-1, -1]), 3)
    assert math.isnan(none.entropy) and none.coverage == 0.0
    # 10 of 100 filters is exactly 10 %: covered; 9 is not
    tracked = torch.tensor([0] * 81 + [1] * 10 + [2] * 9)
    assert metrics.landmark_diversity(tracked, 3).coverage == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="out of range"):
        metrics.landmark_diversity(torch.tensor([3]), 3)
    empty = metrics.landmark_diversity(torch.tensor([-1, -1]), 0)  # data without landmarks
    assert empty.counts.numel() == 0 and math.isnan(empty.entropy) and math.isnan(empty.coverage)
    with pytest.raises(ValueError, match="min_fraction"):
        metrics.landmark_diversity(torch.tensor([0]), 3, min_fraction=0.0)


def test_top_quantile_threshold_is_the_kth_largest() -> None:
    maps = torch.arange(8.0).reshape(2, 1, 4)  # one filter, values 0..7 over 2 images x 4 cells
    assert part_measures.top_quantile_threshold(maps, 0.25).tolist() == [6.0]  # ceil(0.25 * 8) = 2nd largest
    assert part_measures.top_quantile_threshold(maps, 0.005).tolist() == [7.0]  # at least one value
    two = torch.stack((torch.arange(8.0).reshape(2, 4), -torch.arange(8.0).reshape(2, 4)), dim=1)  # (2, 2, 4)
    assert part_measures.top_quantile_threshold(two, 0.25).tolist() == [6.0, -1.0]


def test_part_hits_hand_computed() -> None:
    maps = torch.tensor([[[5.0, 1.0, 0.0, 0.0]]])  # (B=1, D=1, P=4): threshold 5 keeps cell 0
    parts = torch.tensor([[[1.0, 0.0, 0.0, 0.0],  # the same cell: IoU 1
                           [1.0, 1.0, 1.0, 1.0],  # the whole image: IoU 1/4 > 0.2
                           [0.0, 0.5, 0.0, 0.0],  # elsewhere: IoU 0
                           [0.0, 0.0, 0.0, 0.0],  # absent: never counts
                           [1.0, 1.0, 1.0, 1.0]]])  # IoU 1/4, but the bar is raised to 0.3 below
    hits = part_measures.part_hits(maps, torch.tensor([5.0]), parts)
    assert hits.tolist() == [[[True, True, False, False, True]]]
    assert part_measures.part_hits(maps, torch.tensor([5.0]), parts, iou_threshold=0.3).tolist() == [
        [[True, False, False, False, False]]]
    # a silent map (all zeros, threshold 0) has no region: nothing counts
    assert not part_measures.part_hits(torch.zeros(1, 1, 4), torch.zeros(1), parts).any()


def test_part_interpretability_hand_computed() -> None:
    # 3 images (labels 0, 0, 1), 2 filters (categories 0 and 1), 2 parts; part 1 absent from image 1
    hits = torch.tensor([[[True, False], [True, True]],
                         [[False, False], [True, False]],
                         [[True, True], [False, True]]])
    present = torch.tensor([[True, True], [True, False], [True, True]])
    labels = torch.tensor([0, 0, 1])
    out = part_measures.part_interpretability(hits, present, labels, torch.tensor([0, 1]))
    # filter 0 on images 0, 1: part 0 hit 1 of 2, part 1 hit 0 of 1 (image 1 lacks it)
    # filter 1 on image 2: part 0 hit 0 of 1, part 1 hit 1 of 1
    assert out.per_filter_part.tolist() == [[0.5, 0.0], [0.0, 1.0]]
    assert out.per_filter.tolist() == [0.5, 1.0] and out.best_part.tolist() == [0, 1]
    assert out.per_part.tolist() == [0.25, 0.5]
    assert out.mean == 0.75
    # without categories every image counts: filter 0 hits part 0 on 2 of 3, part 1 on 1 of 2
    every = part_measures.part_interpretability(hits, present, labels)
    assert every.per_filter_part[0].tolist() == [pytest.approx(2 / 3), 0.5]


def test_part_interpretability_no_eligible_image_is_nan() -> None:
    out = part_measures.part_interpretability(torch.zeros(1, 1, 2, dtype=torch.bool), torch.tensor([[True, True]]),
                                        torch.tensor([0]), torch.tensor([1]))
    assert math.isnan(out.per_filter[0]) and out.best_part.tolist() == [-1] and math.isnan(out.mean)
