"""Where a run's first masked layer peaks under ``official``, and how often that peak is a tie (issue 17).

``official`` takes each map's argmax, and ``torch.max`` returns the first maximal cell on ties, so a map
whose maximum covers several cells (a ReLU6 saturated at 6, as in MobileNetV2) is read at the tied region's
top-left cell. This script prints, on a run's split, the share of all-zero maps, the share of the other
maps whose maximum is tied, and the histogram of the argmax rows next to the rows of each landmark, to tell
a layer whose filters fire high in the image from one whose ties are read there.

    python benchmarks/peak_ties.py runs/m/options/paper/icnn-s0 runs/m/options/baseline/baseline-s0 [--split val]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from icnn_compress.method.mask import landmark_cells
from icnn_compress.runs.open import open_run


def peak_statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Count, over (B, D, h, w) post-ReLU maps: all-zero maps, tied maxima among the rest, argmax rows (h,)."""
    b, d, h, w = x.shape
    flat = x.reshape(b, d, h * w)
    top, index = flat.max(dim=-1)
    live = top > 0
    tied = ((flat == top[..., None]).sum(dim=-1) > 1) & live
    return {"maps": torch.tensor(b * d), "zero": (~live).sum(), "tied": tied.sum(),
            "rows": torch.bincount((index // w)[live], minlength=h)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--split", default="val", help="the runs' split to read (default: val)")
    args = parser.parse_args()
    for run in args.runs:
        model, saved, recipe, dataset = open_run(run, data_root=None, split=args.split, device=torch.device("cpu"))
        layer = saved["architecture"]["masks"][0]
        seen: dict[str, torch.Tensor] = {}
        model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.__setitem__("x", torch.relu(i[0])))
        total: dict[str, torch.Tensor] = {}
        landmark_rows: torch.Tensor | None = None
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=32):
                model(batch["image"])
                h, w = seen["x"].shape[-2:]
                for key, value in peak_statistics(seen["x"]).items():
                    total[key] = total.get(key, 0) + value
                rows, _ = landmark_cells(batch["landmarks"], recipe.data.image_size, h, w)  # (B, K)
                counts = torch.stack([torch.bincount(r[v], minlength=h)
                                      for r, v in zip(rows.T, batch["visible"].T)])  # (K, h)
                landmark_rows = counts if landmark_rows is None else landmark_rows + counts
        live = int(total["maps"] - total["zero"])
        share = " / ".join(f"{v:.3f}" for v in (total["rows"] / total["rows"].sum()).tolist())
        print(f"{run} ({args.split}, {layer} input): all-zero {int(total['zero']) / int(total['maps']):.3f} of maps, "
              f"tied maximum {int(total['tied']) / max(1, live):.3f} of the others")
        print(f"  argmax rows, top to bottom: {share}")
        assert landmark_rows is not None
        for name, counts in zip(dataset.landmark_names, landmark_rows):
            print(f"  rows of landmark {name}: " + " / ".join(f"{v:.3f}" for v in (counts / counts.sum()).tolist()))


if __name__ == "__main__":
    main()
