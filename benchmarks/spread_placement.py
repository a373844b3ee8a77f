"""Where the ``spread`` peak rule puts a run's templates, against where the filters themselves peak (issue 17).

``icnn.peak = "spread"`` moves a crowded filter's template onto its next bump; whether the filter then learns
to fire there is what ``official`` measures (the peak of the mask's input). This script separates the two: on
the images of each filter's category it counts how often the template was moved off the filter's own
local-mass peak, and which landmark (the nearest visible one, in cells) each of the two cells is closest to.

    python benchmarks/spread_placement.py runs/q/options/spread/icnn-s0 [--split val] [--layers L ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from icnn_compress.method.mask import InterpretableMask, landmark_cells, local_mass_cells, spread_cells
from icnn_compress.runs.open import open_run


def nearest_landmark(rows: torch.Tensor, cols: torch.Tensor, lm_rows: torch.Tensor, lm_cols: torch.Tensor,
                     visible: torch.Tensor) -> torch.Tensor:
    """The index of the visible landmark nearest (L1, in cells) to each cell, (B, D)."""
    dist = (rows[..., None] - lm_rows[:, None, :]).abs() + (cols[..., None] - lm_cols[:, None, :]).abs()
    return dist.float().masked_fill(~visible[:, None, :], float("inf")).argmin(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--split", default="val", help="the run's split to read (default: val, a training-side split)")
    parser.add_argument("--layers", nargs="*", default=None, help="masked layers (default: every mask)")
    args = parser.parse_args()
    model, saved, recipe, dataset = open_run(args.run, data_root=None, split=args.split, device=torch.device("cpu"))
    layers = args.layers or list(saved["architecture"]["masks"])
    inputs: dict[str, torch.Tensor] = {}
    for name in layers:
        module = model.get_submodule(name)
        if not isinstance(module, InterpretableMask):
            raise SystemExit(f"{name} is not a mask layer of {args.run}")
        module.register_forward_hook(lambda m, i, o, name=name: inputs.__setitem__(name, torch.relu(i[0].detach())))
    names = list(dataset.landmark_names)
    k = len(names)
    counts = {name: {"moved": 0, "pairs": 0, "own": torch.zeros(k), "template": torch.zeros(k)} for name in layers}
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    with torch.no_grad():
        for batch in loader:
            model(batch["image"])
            for name in layers:
                x, category = inputs[name], model.get_submodule(name).category
                h, w = x.shape[-2:]
                lm_rows, lm_cols = landmark_cells(batch["landmarks"], recipe.data.image_size, h, w)
                own, moved = local_mass_cells(x), spread_cells(x, category)
                positive = batch["label"][:, None] == category[None, :]  # (B, D): images of the filter's category
                c = counts[name]
                for cells, key in ((own, "own"), (moved, "template")):
                    near = nearest_landmark(*cells, lm_rows, lm_cols, batch["visible"])
                    c[key] += (torch.nn.functional.one_hot(near, k).float() * positive[..., None]).sum(dim=(0, 1))
                c["moved"] += int((((own[0] != moved[0]) | (own[1] != moved[1])) & positive).sum())
                c["pairs"] += int(positive.sum())
    print(f"{args.run}, {args.split} split, filter-image pairs of the filter's category")
    print("| layer | template moved | nearest landmark of the filter's own peak (" + " / ".join(names)
          + ") | of its template's cell |")
    print("|---|---|---|---|")
    for name, c in counts.items():
        own = " / ".join(f"{v:.2f}" for v in (c["own"] / c["own"].sum()).tolist())
        tpl = " / ".join(f"{v:.2f}" for v in (c["template"] / c["template"].sum()).tolist())
        print(f"| {name} | {c['moved'] / max(1, c['pairs']):.2f} | {own} | {tpl} |")


if __name__ == "__main__":
    main()
