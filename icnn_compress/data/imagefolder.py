"""Class folders as torchvision's ``ImageFolder`` reads them, as a dataset with the project's dict samples.

The layouts (class folders hold the images; the extensions are torchvision's ``IMG_EXTENSIONS``)::

    root/cat/001.png, root/dog/002.jpg, ...           one set: a seeded per-class split into train and test
    root/train/<class>/..., root/test/<class>/...     train/ and test/ as given
    root/train/<class>/..., root/val/<class>/...      val/ is the test split (ImageNet's convention)
    root/train/..., root/val/..., root/test/...       val/ is the validation split, test/ the test split

Without a ``val/`` beside ``test/``, the validation split is carved per class from the training images
(``val_fraction``, ``val_seed``) as for the CUB layout. Plain class folders have no landmarks: the
measures that need them are skipped (each says so). A COCO-style keypoints JSON
(:mod:`icnn_compress.data.keypoints`) adds landmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from icnn_compress.config import IMAGENET_MEAN, IMAGENET_STD
from icnn_compress.data._samples import LandmarkImages
from icnn_compress.data.keypoints import read_keypoints
from icnn_compress.errors import DatasetError

__all__ = ["ImageFolderDataset", "is_image_folder"]

_HELD_OUT = ("test", "val")


def is_image_folder(root: str | Path) -> bool:
    """Whether ``root`` looks like class folders (or ``train/`` of class folders) rather than another layout."""
    root = Path(root).expanduser()
    if not root.is_dir() or (root / "images.txt").exists():
        return False
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


def _balanced_order(labels: Sequence[int]) -> list[int]:
    """Positions ordered round-robin over classes (each class's first image, then each one's second...).

    ImageFolder lists images class by class; a ``limit`` taken from the front of that list would keep the
    first classes only, while the first ``limit`` of this order keeps every class.
    """
    rank: dict[int, int] = {}
    keys = []
    for pos, c in enumerate(labels):
        keys.append((rank.get(c, 0), c, pos))
        rank[c] = rank.get(c, 0) + 1
    return [pos for *_, pos in sorted(keys)]


def _per_class_draw(positions: Sequence[int], labels: Sequence[int], fraction: float, seed: int) -> set[int]:
    """``round(fraction · n_c)`` of each class's ``n_c`` positions, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for p in positions:
        by_class.setdefault(labels[p], []).append(p)
    held: set[int] = set()
    for c in sorted(by_class):
        members = by_class[c]
        take = round(fraction * len(members))
        held.update(members[j] for j in torch.randperm(len(members), generator=gen)[:take].tolist())
    return held


class ImageFolderDataset(LandmarkImages):
    """Return samples of class folders as dicts of tensors, resized to S×S (see :class:`LandmarkImages`).

    Args:
        root: the folder of class folders, or of ``train/`` (and ``val/``, ``test/``) folders of them.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (see the module docstring for the layouts).
        image_size: S, the side of the returned square images.
        crop_to_box: crop to each image's ``bbox`` from ``keypoints`` before resizing (every image needs one).
        mean, std: per-channel normalisation of images scaled to [0, 1].
        landmarks: the keypoint names to keep, in this order; None keeps all of ``keypoints``.
        keypoints: a COCO-style keypoints JSON; a relative path is read from ``root``. None: no landmarks.
        limit: keep only the first ``limit`` images of the split, taken round-robin over the classes (for
            ``"train"`` and ``"val"``: of the training images, before the validation split is carved).
        val_fraction, val_seed: the validation split carved per class from the training images.
        test_fraction, split_seed: for a folder without ``train/``: the share of each class held out as
            the test split, drawn with ``split_seed``.
        single_object: a class name: the single-category task (classes ``["other", object]``).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str = "train",
        image_size: int = 224,
        crop_to_box: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        landmarks: Sequence[str] | None = None,
        keypoints: str | Path | None = None,
        limit: int | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        single_object: str | None = None,
    ) -> None:
        self._settings(root, split=split, image_size=image_size, crop_to_box=crop_to_box, mean=mean, std=std)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root} does not exist or is not a folder; expected class folders of images "
                               "there (ROOT/<class>/<image>.png, or ROOT/train/<class>/... with test/ or val/)")
        self._box_file = str(keypoints or "the keypoints file")

        # Every image of every folder, so that a keypoints file may name any of them and the seeded split
        # does not depend on which split is opened.
        split_folders = (self.root / "train").is_dir()
        train_dir = self.root / "train" if split_folders else self.root
        try:
            self.classes, class_to_idx = find_classes(str(train_dir))
        except FileNotFoundError as err:
            raise DatasetError(f"{train_dir} holds no class folder: {err}") from None
        folders = {"train": train_dir}
        if split_folders:
            folders.update({h: self.root / h for h in _HELD_OUT if (self.root / h).is_dir()})
        files: dict[str, list[tuple[str, int]]] = {}
        for name, folder in folders.items():
            extra = sorted(set(find_classes(str(folder))[0]) - set(self.classes)) if name != "train" else []
            if extra:
                raise DatasetError(f"{folder} has class folders that {train_dir} lacks ({', '.join(extra[:5])}); "
                                   "every class needs training images")
            files[name] = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not files["train"]:
            raise DatasetError(f"{train_dir} has no image file ({', '.join(IMG_EXTENSIONS)}) in its class folders")

        # Which folder plays which split.
        if not split_folders:
            test_src, val_src = None, None
        elif "test" in files:
            test_src, val_src = "test", "val" if "val" in files else None
        else:
            test_src, val_src = ("val" if "val" in files else None), None
        if split_folders and test_src is None:
            raise DatasetError(f"{self.root} has train/ but no test/ or val/ folder: add one, or put the class "
                               "folders directly in the dataset folder for a seeded split")

        def rows(name: str) -> list[tuple[str, int]]:
            return files.get(name, [])

        train_rows = rows("train")
        every = rows("train") + rows("val") + rows("test")  # folder by folder, class by class, file by file
        if not split_folders:  # one set: a seeded per-class test split
            labels = [c for _, c in train_rows]
            held = _per_class_draw(range(len(train_rows)), labels, test_fraction, split_seed)
            test_rows = [r for p, r in enumerate(train_rows) if p in held]
            train_rows = [r for p, r in enumerate(train_rows) if p not in held]
        else:
            test_rows = rows(test_src)
        val_rows = rows(val_src) if val_src else None

        if split == "test":
            chosen = self._limited(test_rows, limit)
        elif split == "all":
            chosen = every
        elif val_rows is not None:  # a val/ folder: the validation split as given
            chosen = self._limited(train_rows if split == "train" else val_rows, limit)
        else:
            chosen = self._limited(train_rows, limit)
            if val_fraction > 0:
                held = _per_class_draw(range(len(chosen)), [c for _, c in chosen], val_fraction, val_seed)
                chosen = [r for p, r in enumerate(chosen) if (p in held) == (split == "val")]

        self.image_paths = [Path(p) for p, _ in chosen]
        self.image_ids = [str(p.relative_to(self.root)) for p in self.image_paths]
        self.labels = torch.tensor([c for _, c in chosen], dtype=torch.int64)  # (N,)
        if single_object is not None:
            if single_object not in self.classes:
                raise DatasetError(f"icnn.object {single_object!r} is not a class of {self.root}; its classes "
                                   f"are {self.classes[:20]}")
            self.labels = (self.labels == self.classes.index(single_object)).long()
            self.classes = ["other", single_object]

        n = len(chosen)
        self.boxes = None
        self.has_part_masks, self._masks = False, [{} for _ in range(n)]
        if keypoints is None:
            if landmarks:
                raise DatasetError(f"data.landmarks {list(landmarks)} needs landmarks, and {self.root} is plain class "
                                   "folders: set data.keypoints to a COCO-style keypoints JSON")
            self.landmark_names = []
            self._points, self._visible = np.zeros((n, 0, 2)), np.zeros((n, 0), dtype=bool)
            if crop_to_box:
                raise DatasetError("data.crop_to_box needs boxes, and plain class folders have none: set "
                                   "data.crop_to_box = false, or data.keypoints to a JSON with a bbox per image")
            return
        kp_path = Path(keypoints).expanduser()
        kp = read_keypoints(kp_path if kp_path.is_absolute() else self.root / kp_path, root=self.root,
                            files=[Path(p) for p, _ in every])
        row_of = {Path(p).resolve(): r for r, (p, _) in enumerate(every)}
        take = [row_of[p.resolve()] for p in self.image_paths]
        if landmarks is None:
            keep = list(range(len(kp.names)))
            self.landmark_names = list(kp.names)
        else:
            unknown = [name for name in landmarks if name not in kp.names]
            if unknown:
                raise DatasetError(f"{kp_path} has no keypoint named {unknown}; its keypoints are {kp.names}")
            keep = [kp.names.index(name) for name in landmarks]
            self.landmark_names = list(landmarks)
        self._points = kp.points[take][:, keep].reshape(n, len(keep), 2)
        self._visible = kp.visible[take][:, keep].reshape(n, len(keep))
        if crop_to_box:
            boxes = kp.boxes[take] if kp.boxes is not None else np.full((n, 4), np.nan)
            missing = [self.image_ids[i] for i in np.flatnonzero(~np.isfinite(boxes).all(axis=1))]
            if missing:
                raise DatasetError(f"data.crop_to_box needs a bbox for every image, and {kp_path} gives none for "
                                   f"{len(missing)} (first: {missing[0]}); add them or set data.crop_to_box = false")
            self.boxes = torch.from_numpy(boxes).reshape(n, 4)

    @staticmethod
    def _limited(rows: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
        if limit is None:
            return rows
        return [rows[p] for p in sorted(_balanced_order([c for _, c in rows])[:limit])]
