"""Landmarks from a COCO-style keypoints JSON, for image folders that have no part annotations of their own.

The file follows the COCO keypoint format (https://cocodataset.org/#format-data), the fields this reads::

    {"images": [{"id": 1, "file_name": "train/cat/001.png"}, ...],
     "annotations": [{"image_id": 1, "category_id": 1, "keypoints": [x1, y1, v1, x2, y2, v2, ...],
                      "bbox": [x, y, w, h]}, ...],            # bbox optional (data.crop_to_box)
     "categories": [{"id": 1, "keypoints": ["head", "back", "tail"]}, ...]}

``file_name`` is relative to the dataset folder; x, y are pixels of the original image; v is COCO's flag
(0 not labelled, 1 labelled but occluded, 2 visible): a landmark counts where v > 0, since its position is
known either way. The landmark names are the union of the categories' ``keypoints`` lists in the order they
first appear. An image with several annotations (COCO's several people) keeps the one with the most labelled
keypoints; an image with none has no visible landmark.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icnn_compress.errors import DatasetError

__all__ = ["Keypoints", "read_keypoints"]


@dataclass
class Keypoints:
    """Landmarks of some images: ``points`` (N, K, 2) and ``visible`` (N, K) in ``files`` order, boxes or None."""

    names: list[str]
    points: np.ndarray  # (N, K, 2) float64, original pixels
    visible: np.ndarray  # (N, K) bool
    boxes: np.ndarray | None  # (N, 4) float64 x, y, w, h; None when no annotation has a bbox


def _fail(path: Path, what: str) -> DatasetError:
    return DatasetError(f"{path}: {what}")


def _list(doc: dict, key: str, path: Path) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise _fail(path, f"'{key}' must be a list (COCO keypoint format), got {type(value).__name__}")
    return value


def read_keypoints(path: str | Path, *, root: Path, files: Sequence[Path]) -> Keypoints:
    """Read the keypoints of ``files`` (images under ``root``) from the COCO-style JSON at ``path``.

    Raises:
        DatasetError: the file is missing or not such a JSON, names an image that is not one of ``files``,
            or an annotation points at an image id the file does not list.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"the keypoints file {path} does not exist; fix data.keypoints (relative paths are "
                           "read from the dataset folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"not a readable JSON file ({err})") from err
    if not isinstance(doc, dict):
        raise _fail(path, "expected a COCO-style object with 'images', 'annotations' and 'categories'")

    names: list[str] = []
    per_category: dict[object, list[int]] = {}  # category id -> landmark index of each of its keypoints
    for cat in _list(doc, "categories", path):
        kps = cat.get("keypoints", []) if isinstance(cat, dict) else None
        if not isinstance(kps, list) or not all(isinstance(k, str) for k in kps):
            raise _fail(path, f"category {cat!r} needs 'keypoints': a list of landmark names")
        for k in kps:
            if k not in names:
                names.append(k)
        per_category[cat.get("id")] = [names.index(k) for k in kps]

    row_of = {f.resolve(): r for r, f in enumerate(files)}
    image_row: dict[object, int] = {}
    unknown: list[str] = []
    for entry in _list(doc, "images", path):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise _fail(path, f"image entry {entry!r} needs an 'id' and a 'file_name'")
        row = row_of.get((root / entry["file_name"]).resolve())
        if row is None:
            unknown.append(entry["file_name"])
        else:
            image_row[entry["id"]] = row
    if unknown:
        raise _fail(path, f"{len(unknown)} image(s) are not images of {root} (first: {unknown[0]!r}); "
                          "file_name must be relative to the dataset folder, e.g. 'train/cat/001.png'")

    n, k = len(files), len(names)
    points = np.zeros((n, k, 2), dtype=np.float64)
    visible = np.zeros((n, k), dtype=bool)
    boxes = np.full((n, 4), np.nan, dtype=np.float64)
    labelled = np.full(n, -1)
    for ann in _list(doc, "annotations", path):
        if not isinstance(ann, dict) or ann.get("image_id") not in image_row:
            image_id = ann.get("image_id") if isinstance(ann, dict) else ann
            raise _fail(path, f"an annotation names image id {image_id!r}, which 'images' does not list")
        row = image_row[ann["image_id"]]
        index = per_category.get(ann.get("category_id"))
        if index is None:
            if len(per_category) != 1:
                raise _fail(path, f"annotation of image {ann['image_id']!r} has category_id "
                                  f"{ann.get('category_id')!r}, which 'categories' does not list")
            index = next(iter(per_category.values()))
        flat = ann.get("keypoints", [])
        if not isinstance(flat, list) or len(flat) != 3 * len(index):
            raise _fail(path, f"annotation of image {ann['image_id']!r} has {len(flat) if isinstance(flat, list) else flat!r} "
                              f"keypoint values; its category names {len(index)} keypoints (x, y, v each)")
        try:
            xyv = np.asarray(flat, dtype=np.float64).reshape(-1, 3)  # (k, 3)
        except (TypeError, ValueError) as err:
            raise _fail(path, f"annotation of image {ann['image_id']!r}: keypoints are not numbers ({err})") from err
        count = int((xyv[:, 2] > 0).sum())
        if count <= labelled[row]:
            continue  # another annotation of this image labels more keypoints
        labelled[row] = count
        points[row] = 0.0
        visible[row] = False
        points[row, index] = xyv[:, :2]
        visible[row, index] = xyv[:, 2] > 0
        box = ann.get("bbox")
        if box is not None:
            if not (isinstance(box, list) and len(box) == 4):
                raise _fail(path, f"annotation of image {ann['image_id']!r}: bbox must be [x, y, w, h], got {box!r}")
            boxes[row] = box
    has_boxes = bool(np.isfinite(boxes).all(axis=1).any())
    return Keypoints(names=names, points=points, visible=visible, boxes=boxes if has_boxes else None)
