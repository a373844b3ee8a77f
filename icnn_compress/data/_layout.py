"""Writer of the CUB-200-2011 folder layout, shared by the dataset generators.

The layout (all ids 1-based, one record per line, fields separated by single spaces)::

    classes.txt               <class_id> <NNN.name>
    images.txt                <image_id> <NNN.name/file.png>      (relative to images/)
    image_class_labels.txt    <image_id> <class_id>
    train_test_split.txt      <image_id> <1 if train else 0>
    bounding_boxes.txt        <image_id> <x> <y> <w> <h>
    parts/parts.txt           <part_id> <part name>
    parts/part_locs.txt       <image_id> <part_id> <x> <y> <visible>
    parts/part_masks.txt      <image_id> <part_id> <mask.png>     (our extension, relative to the root)
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from icnn_compress.errors import DatasetError

ANNOTATION_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "classes.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
)
PART_MASKS_FILE = "parts/part_masks.txt"


def class_folder(class_id: int, name: str) -> str:
    """Return the CUB folder name of a class, e.g. ``001.T-shirt_top`` (no spaces or slashes)."""
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")
    return f"{class_id:03d}.{safe}"


@dataclass
class LayoutRecord:
    """One image of a generated dataset, in original pixel coordinates."""

    image: str  # relative to images/
    class_id: int  # 1-based
    is_train: bool
    box: tuple[float, float, float, float]  # x, y, w, h
    # one (x, y, visible) per landmark, in the order of the landmark name list
    parts: list[tuple[float, float, bool]]
    # part index (0-based, landmark order) -> mask PNG relative to the root; parts without a mask are absent
    masks: dict[int, str] = field(default_factory=dict)


def _fmt(v: float) -> str:
    # Fixed precision keeps the files byte-identical across runs and platforms.
    return f"{v:.2f}"


def write_layout(
    root: Path,
    *,
    class_names: Sequence[str],
    landmark_names: Sequence[str],
    records: Sequence[LayoutRecord],
) -> None:
    """Write every annotation file of the layout for ``records`` (images and masks are written by the caller)."""
    (root / "parts").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {name: [] for name in (*ANNOTATION_FILES, PART_MASKS_FILE)}
    lines["classes.txt"] = [f"{c} {class_folder(c, n)}" for c, n in enumerate(class_names, start=1)]
    lines["parts/parts.txt"] = [f"{p} {n}" for p, n in enumerate(landmark_names, start=1)]
    any_masks = False
    for image_id, rec in enumerate(records, start=1):
        lines["images.txt"].append(f"{image_id} {rec.image}")
        lines["image_class_labels.txt"].append(f"{image_id} {rec.class_id}")
        lines["train_test_split.txt"].append(f"{image_id} {int(rec.is_train)}")
        lines["bounding_boxes.txt"].append(f"{image_id} " + " ".join(_fmt(v) for v in rec.box))
        for part_id, (x, y, vis) in enumerate(rec.parts, start=1):
            if not vis:
                x = y = 0.0  # CUB writes 0 0 for parts that are not visible
            lines["parts/part_locs.txt"].append(f"{image_id} {part_id} {_fmt(x)} {_fmt(y)} {int(vis)}")
        for part, mask in sorted(rec.masks.items()):
            any_masks = True
            lines["parts/part_masks.txt"].append(f"{image_id} {part + 1} {mask}")
    if not any_masks:
        del lines[PART_MASKS_FILE]
    for name, content in lines.items():
        (root / name).write_text("".join(line + "\n" for line in content), encoding="utf-8")


def new_output_folder(out: Path) -> Path:
    """Check ``out`` is free and return a temporary sibling folder to write into (renamed at the end)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} already exists and is not empty; choose another --out or delete it first")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_output_folder(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by new_output_folder
    tmp.rename(out)
