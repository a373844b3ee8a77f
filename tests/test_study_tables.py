"""The study scripts' summaries and tables (benchmarks/arm_seeds.py, benchmarks/parts_options.py,
benchmarks/spread_placement.py, benchmarks/peak_ties.py) on made-up cells."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import arm_seeds  # noqa: E402
import parts_options  # noqa: E402
import peak_ties  # noqa: E402
import spread_placement  # noqa: E402


def _cell(arm: str, seed: int, acc: float, inst: float, entropy: float | None, part: float | None) -> dict:
    layer = {"location_instability": inst, "oracle_reference": 0.03, "random_reference": 0.14,
             "landmark_tracking": {"head": 1, "body": 2}, "landmark_entropy": entropy, "landmark_coverage": 0.5,
             "coverage_fraction": 0.1, "part_interpretability": part, "part_interpretability_per_part": None,
             "dropped_filters": 0, "num_filters": 3, "measured_at": "x output"}
    return {"arm": arm, "seed": seed, "accuracy": acc, "num_images": 10, "kappa0": None, "protocol": "official",
            "layers": {"new": layer}}


def test_summary_pairs_diversity_and_part_iou_by_seed() -> None:
    cells = [_cell("baseline", 0, 0.90, 0.10, 0.8, 0.20), _cell("baseline", 1, 0.80, 0.20, 0.6, 0.30),
             _cell("icnn", 0, 0.91, 0.05, 0.4, 0.25), _cell("icnn", 1, 0.79, 0.10, 0.2, 0.40)]
    s = arm_seeds.summarise(cells, ["baseline", "icnn"])["icnn"]
    assert s["gap_mean"] == pytest.approx(0.0)
    assert s["instability_ratio"]["new"] == pytest.approx(0.5)
    assert s["landmark_entropy"]["new"] == pytest.approx(0.3)
    assert s["part_interpretability"]["new"] == pytest.approx(0.325)
    assert s["part_gap"]["new"] == pytest.approx(0.075)  # (0.05 + 0.10) / 2
    md = arm_seeds.table(cells, arm_seeds.summarise(cells, ["baseline", "icnn"]), ["baseline", "icnn"])
    assert "| new | icnn | 85.00 | 0.0750 (0.50) | 0.30 | 0.50 | 0.325 (+0.075) |" in md


def test_tables_without_part_masks_or_older_records() -> None:
    cells = [_cell("baseline", 0, 0.9, 0.1, None, None), _cell("icnn", 0, 0.9, 0.05, None, None)]
    summary = arm_seeds.summarise(cells, ["baseline", "icnn"])
    assert summary["icnn"]["part_gap"]["new"] is None
    assert "| new | icnn | 90.00 | 0.0500 (0.50) | – | 0.50 | – (–) |" in arm_seeds.diversity_table(summary, ["new"])
    md = parts_options.combined_table({"released": {"cells": cells, "summary": summary}})
    assert "| released | icnn | 1 | 90.00 | +0.00 ± nan | 0.50 | – | 0.50 | – (–) |" in md


def test_options_share_masks_only_runs_by_mask() -> None:
    assert parts_options.mask_folder(parts_options.OPTIONS["released"]) == "masks-centroid-learned"
    assert parts_options.mask_folder(parts_options.OPTIONS["crowding"]) == "masks-centroid-learned"
    assert parts_options.mask_folder(parts_options.OPTIONS["paper"]) == "masks-argmax-4"
    for option in ("anchored", "anchored-k3e-4"):  # κ is 0 in masks only: they share one mask
        assert parts_options.mask_folder(parts_options.OPTIONS[option]) == "masks-local-mass-learned-anchor-landmarks"


def test_nearest_landmark_skips_invisible_ones() -> None:
    rows, cols = torch.tensor([[0, 3]]), torch.tensor([[0, 3]])  # one image, two filters' cells
    lm_rows, lm_cols = torch.tensor([[0, 2, 3]]), torch.tensor([[1, 2, 3]])  # three landmarks' cells
    visible = torch.tensor([[True, True, False]])
    # (0, 0): landmark 0 at distance 1; (3, 3): landmark 2 (distance 0) is invisible, so landmark 1 (distance 2)
    assert spread_placement.nearest_landmark(rows, cols, lm_rows, lm_cols, visible).tolist() == [[0, 1]]


def test_peak_statistics_counts_zero_maps_ties_and_rows() -> None:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1, 1, 0] = 2.0  # one peak, bottom row
    x[0, 2, 0, 1] = x[0, 2, 1, 1] = 6.0  # a tie, read at its first cell (top row)
    stats = peak_ties.peak_statistics(x)
    assert int(stats["maps"]) == 3 and int(stats["zero"]) == 1 and int(stats["tied"]) == 1
    assert stats["rows"].tolist() == [1, 1]
