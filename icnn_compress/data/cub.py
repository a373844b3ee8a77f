"""The CUB-200-2011 folder layout as a map-style dataset with landmarks and optional part masks.

Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", CNS-TR-2011-001. The generated datasets of
:mod:`icnn_compress.data.generate` and :mod:`icnn_compress.data.fashion` use the same layout, plus an
optional ``parts/part_masks.txt`` (``<image_id> <part_id> <mask.png relative to the root>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from icnn_compress.config import IMAGENET_MEAN, IMAGENET_STD
from icnn_compress.data._layout import ANNOTATION_FILES, PART_MASKS_FILE
from icnn_compress.data._samples import LandmarkImages
from icnn_compress.errors import DatasetError

_HOW_TO_MAKE = "generate one with `icnn make-dataset parts --out DIR`"


def _read_table(path: Path, columns: Sequence[type], *, rest: bool = False) -> list[tuple]:
    """Parse a whitespace-separated annotation file; ``rest`` keeps the last column's spaces (part names)."""
    rows: list[tuple] = []
    n = len(columns)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=n - 1) if rest else line.split()
            if len(fields) != n or (rest and not fields[-1].strip()):
                raise DatasetError(
                    f"{path}:{lineno}: expected {n} fields, got {len(fields)} in line {line.rstrip()!r}"
                )
            try:
                rows.append(tuple(kind(f.strip()) for kind, f in zip(columns, fields, strict=True)))
            except ValueError as err:
                raise DatasetError(f"{path}:{lineno}: cannot parse line {line.rstrip()!r}: {err}") from err
    return rows


def _by_id(rows: list[tuple], path: Path) -> dict:
    out: dict = {}
    for row in rows:
        if row[0] in out:
            raise DatasetError(f"{path}: id {row[0]} appears twice")
        out[row[0]] = row[1:] if len(row) > 2 else row[1]
    return out


def _need(table: dict, image_id: int, path: Path) -> object:
    try:
        return table[image_id]
    except KeyError:
        raise DatasetError(f"{path}: no line for image id {image_id} (listed in images.txt)") from None


def _validation_ids(ids: Sequence[int], labels: dict, fraction: float, seed: int) -> set[int]:
    """The validation images: ``round(fraction · n_c)`` of each class's ``n_c`` images, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in ids:
        by_class.setdefault(labels.get(i), []).append(i)
    held: set[int] = set()
    for c in sorted(by_class, key=lambda v: (v is None, v)):
        members = by_class[c]
        take = round(fraction * len(members))
        order = torch.randperm(len(members), generator=gen)[:take].tolist()
        held.update(members[j] for j in order)
    return held


class CubDataset(LandmarkImages):
    """Return samples of a CUB-200-2011 folder as dicts of tensors, cropped to the box and resized to S×S.

    Each sample holds ``image`` float32 (3, S, S) normalised by ``mean``/``std``; ``label`` int64 (0-based);
    ``landmarks`` float32 (K, 2) as (x, y) in the frame of the returned image, where the image spans the
    continuous square [0, S]² (an original x maps to (x - box_x0) * S / box_w); ``visible`` bool (K,),
    False for parts not annotated as visible or outside the crop, whose coordinates are set to 0;
    ``index`` int64, the position in this dataset; and ``part_masks`` bool (K, S, S), mask k of landmark k
    (all False where the image has no mask for it), only when the folder has ``parts/part_masks.txt``.

    The box is widened to whole pixels (floor of the corner, ceil of the far corner, clipped to the image)
    before cropping, and the landmarks use that same box, so the two stay consistent.

    Args:
        root: the folder that holds ``images.txt`` and ``images/``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (from ``train_test_split.txt``); ``"val"`` is
            the ``val_fraction`` of each class's training images chosen with ``val_seed``, and ``"train"``
            the rest of them.
        image_size: S, the side of the returned square images.
        crop_to_box: crop to the bounding box (as the paper does for CUB) before resizing; else use the
            whole image.
        mean, std: per-channel normalisation of images scaled to [0, 1].
        landmarks: the part names to keep, in this order; None keeps all parts of ``parts/parts.txt``.
        limit: keep only the first ``limit`` images of the split (for ``"train"`` and ``"val"``: of the
            training images, before the validation split is carved from them).
        val_fraction, val_seed: the validation split (0: none, ``"train"`` is every training image).
        single_object: a class name: the single-category task, whose classes are ``["other", object]``
            (label 1 for the object's images, 0 for all others).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        image_size: int = 224,
        crop_to_box: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        landmarks: Sequence[str] | None = None,
        limit: int | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        single_object: str | None = None,
    ) -> None:
        self._settings(root, split=split, image_size=image_size, crop_to_box=crop_to_box, mean=mean, std=std)
        self._box_file = str(self.root / "bounding_boxes.txt")
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root} does not exist or is not a folder; expected a CUB-200-2011 folder there "
                f"(images.txt, images/, parts/ ...); {_HOW_TO_MAKE}"
            )
        for name in ANNOTATION_FILES:
            if not (self.root / name).is_file():
                raise DatasetError(
                    f"{self.root} is not a CUB-200-2011 folder: missing {name}; {_HOW_TO_MAKE}"
                )

        def path(name: str) -> Path:
            return self.root / name

        images = _by_id(_read_table(path("images.txt"), (int, str)), path("images.txt"))
        labels = _by_id(_read_table(path("image_class_labels.txt"), (int, int)), path("image_class_labels.txt"))
        is_train = _by_id(_read_table(path("train_test_split.txt"), (int, int)), path("train_test_split.txt"))
        boxes = _by_id(
            _read_table(path("bounding_boxes.txt"), (int, float, float, float, float)), path("bounding_boxes.txt")
        )
        class_rows = _read_table(path("classes.txt"), (int, str), rest=True)
        part_rows = _read_table(path("parts/parts.txt"), (int, str), rest=True)

        class_ids = [c for c, _ in class_rows]
        if class_ids != list(range(1, len(class_ids) + 1)):
            raise DatasetError(f"{path('classes.txt')}: class ids must be 1, 2, ... in order, got {class_ids[:10]}")
        # CUB names look like "001.Black_footed_Albatross"; the number is the class id again.
        self.classes: list[str] = [n.split(".", 1)[1] if n[:3].isdigit() and "." in n else n for _, n in class_rows]

        all_parts = {name: pid for pid, name in part_rows}
        if landmarks is None:
            self.landmark_names: list[str] = [name for _, name in part_rows]
        else:
            unknown = [n for n in landmarks if n not in all_parts]
            if unknown:
                raise DatasetError(
                    f"{path('parts/parts.txt')} has no part named {unknown}; the parts are {list(all_parts)}"
                )
            self.landmark_names = list(landmarks)
        part_index = {all_parts[n]: k for k, n in enumerate(self.landmark_names)}  # part id -> k

        # Keep the split, in image-id order.
        want = {"train": (1,), "val": (1,), "test": (0,), "all": (0, 1)}[split]
        ids = []
        for image_id in sorted(images):
            flag = _need(is_train, image_id, path("train_test_split.txt"))
            if flag not in (0, 1):
                raise DatasetError(f"{path('train_test_split.txt')}: image {image_id} has flag {flag}, expected 0 or 1")
            if flag in want:
                ids.append(image_id)
        if limit is not None:
            ids = ids[:limit]
        if split in ("train", "val") and val_fraction > 0:
            held = _validation_ids(ids, labels, val_fraction, val_seed)
            ids = [i for i in ids if (i in held) == (split == "val")]
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        n, k = len(ids), len(self.landmark_names)

        self.image_ids: list[int] = ids
        self.image_paths: list[Path] = [self.root / "images" / images[i] for i in ids]
        label_list = []
        for i in ids:
            c = _need(labels, i, path("image_class_labels.txt"))
            if not 1 <= c <= len(self.classes):
                raise DatasetError(
                    f"{path('image_class_labels.txt')}: image {i} has class {c}, classes.txt has {len(self.classes)}"
                )
            label_list.append(c - 1)
        self.labels = torch.tensor(label_list, dtype=torch.int64)  # (N,)
        if single_object is not None:
            if single_object not in self.classes:
                raise DatasetError(f"icnn.object {single_object!r} is not a class of {self.root}; its classes "
                                   f"are {self.classes[:20]}")
            self.labels = (self.labels == self.classes.index(single_object)).long()
            self.classes = ["other", single_object]
        self.boxes = torch.tensor(
            [_need(boxes, i, path("bounding_boxes.txt")) for i in ids], dtype=torch.float64
        ).reshape(n, 4)  # (N, 4) x, y, w, h in original pixels

        # Parts a file does not list for an image count as not visible.
        self._points = np.zeros((n, k, 2), dtype=np.float64)
        self._visible = np.zeros((n, k), dtype=bool)
        locs_path = path("parts/part_locs.txt")
        for image_id, part_id, x, y, vis in _read_table(locs_path, (int, int, float, float, int)):
            if part_id not in all_parts.values():
                raise DatasetError(f"{locs_path}: part id {part_id} is not in parts/parts.txt")
            r, kk = row_of.get(image_id), part_index.get(part_id)
            if r is not None and kk is not None:
                self._points[r, kk] = (x, y)
                self._visible[r, kk] = vis != 0

        self.has_part_masks = (self.root / PART_MASKS_FILE).is_file()
        self._masks: list[dict[int, Path]] = [{} for _ in range(n)]
        if self.has_part_masks:
            masks_path = path(PART_MASKS_FILE)
            for image_id, part_id, rel in _read_table(masks_path, (int, int, str)):
                if part_id not in all_parts.values():
                    raise DatasetError(f"{masks_path}: part id {part_id} is not in parts/parts.txt")
                r, kk = row_of.get(image_id), part_index.get(part_id)
                if r is not None and kk is not None:
                    self._masks[r][kk] = self.root / rel
