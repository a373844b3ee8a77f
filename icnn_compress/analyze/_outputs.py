"""The analysis on disk: ``analysis.json``, ``filters.csv`` and the per-filter image gallery."""

from __future__ import annotations
import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
import torch

__all__ = ["write_analysis", "write_gallery"]


_CSV_FIELDS = ["layer", "filter", "category", "category_name", "activation_rate", "silent", "mean_peak",
               "exclusivity", "inter_category_entropy", "mi_spatial_entropy", "spatial_entropy", "mis",
               "mis_class", "cluster", "cluster_best", "max_redundancy", "redundant_with", "location_instability",
               "tracked_landmark", "part_interpretability", "best_part"]


def write_analysis(result: Mapping[str, Any], out: str | Path) -> Path:
    """Write ``analysis.json``, ``filters.csv`` and ``matrices.pt`` (correlations, cluster order) into ``out``."""
    from icnn_compress.runtime.files import atomic_save, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"summary": result["summary"], "filters": result["filters"]}
    atomic_write_text(out / "analysis.json", json.dumps(doc, indent=1, allow_nan=False))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in result["filters"]:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _CSV_FIELDS})
    atomic_write_text(out / "filters.csv", buf.getvalue())
    atomic_save({"matrices": result["matrices"]}, out / "matrices.pt")
    return out / "analysis.json"


def write_gallery(result: Mapping[str, Any], dataset: Any, out: str | Path, *, thumb: int = 48) -> dict[str, Path]:
    """Write ``gallery/<layer>.jpg``: one row per filter of its top images, cropped to the peak's field, peak marked.

    The second pass reads only the top images (``dataset[index]``), un-normalised with the dataset's
    ``mean``/``std`` when it has them. Returns the written file per layer.
    """
    from PIL import Image, ImageDraw

    out = Path(out) / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
    cache: dict[int, Image.Image] = {}

    def image(i: int) -> Image.Image:
        if i not in cache:
            x = dataset[i]["image"].float() * std + mean  # (3, S, S) in [0, 1]
            arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            cache[i] = Image.fromarray(arr)
        return cache[i]

    written = {}
    k = result["summary"]["settings"]["top_k"]
    label_w = 40
    for name, layer in result["summary"]["layers"].items():
        rows = [f for f in result["filters"] if f["layer"] == name]
        rf = layer["geometry"].get("receptive_field") or [result["summary"]["image_size"]] * 2
        half = max(4, int(max(rf)) // 2)
        sheet = Image.new("RGB", (label_w + k * (thumb + 2), len(rows) * (thumb + 2)), "white")
        draw_sheet = ImageDraw.Draw(sheet)
        for r, f in enumerate(rows):
            y0 = r * (thumb + 2)
            draw_sheet.text((2, y0 + thumb // 2 - 5), str(f["filter"]), fill="black")
            for j, top in enumerate(f["top_images"][:k]):
                img = image(top["index"])
                cx, cy = top["x"], top["y"]
                box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
                crop = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), (128, 128, 128))
                crop.paste(img, (-box[0], -box[1]))
                crop = crop.resize((thumb, thumb), Image.BILINEAR)
                dr = ImageDraw.Draw(crop)
                px = (cx - box[0]) * thumb / (box[2] - box[0])
                py = (cy - box[1]) * thumb / (box[3] - box[1])
                dr.ellipse((px - 3, py - 3, px + 3, py + 3), outline=(255, 0, 0), width=2)
                sheet.paste(crop, (label_w + j * (thumb + 2), y0))
        # JPEG: a sheet of photo crops is 10x smaller than as PNG, and the report embeds it.
        path = out / f"{_safe(name)}.jpg"
        sheet.save(path, quality=85)
        written[name] = path
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "model"
