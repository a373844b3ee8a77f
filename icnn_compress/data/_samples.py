"""The one sample interface of every dataset reader: images with landmarks (and part masks) as dicts of tensors.

A reader (:class:`~icnn_compress.data.CubDataset`, :class:`~icnn_compress.data.ImageFolderDataset`) fills
the per-image tables in its ``__init__``; :class:`LandmarkImages` turns one row into a sample the same way
for both, so training, evaluation, analysis, pruning, export and the comparison never ask which reader
gave them their data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from icnn_compress.data._image import open_image
from icnn_compress.errors import DatasetError


SPLITS = ("train", "val", "test", "all")


class LandmarkImages(torch.utils.data.Dataset):
    """Samples as dicts: ``image`` (3, S, S) normalised, ``label``, ``landmarks`` (K, 2), ``visible`` (K,), ``index``.

    The image is cropped to its box (when ``crop_to_box`` and the reader has boxes) and resized to S×S;
    landmarks are (x, y) in the frame of the returned image, which spans the continuous square [0, S]²;
    parts not visible or outside the crop are False in ``visible`` with coordinates 0. ``part_masks`` bool
    (K, S, S) is added when the reader has part masks (``has_part_masks``).

    Readers set: ``root``, ``image_size``, ``crop_to_box``, ``mean``, ``std``, ``classes``, ``landmark_names``,
    ``image_ids`` (what the reader's error messages call an image), ``image_paths``, ``labels`` (N,) int64,
    ``boxes`` (N, 4) float64 x, y, w, h or None, ``_points`` (N, K, 2) float64 and ``_visible`` (N, K) bool in
    original pixels, ``has_part_masks`` and ``_masks`` (per image: landmark index -> mask file).
    """

    root: Path
    image_size: int
    crop_to_box: bool
    mean: list[float]
    std: list[float]
    classes: list[str]
    landmark_names: list[str]
    image_ids: list
    image_paths: list[Path]
    labels: torch.Tensor
    boxes: torch.Tensor | None
    _points: np.ndarray
    _visible: np.ndarray
    has_part_masks: bool = False
    _masks: list[dict[int, Path]]
    _box_file: str = "the bounding boxes"

    def __len__(self) -> int:
        return len(self.image_paths)

    def _settings(self, root: str | Path, *, split: str, image_size: int, crop_to_box: bool,
                  mean: Sequence[float], std: Sequence[float]) -> None:
        """Check and keep the settings every reader takes, before it reads anything."""
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        if image_size < 1:
            raise DatasetError(f"image_size must be positive, got {image_size}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.crop_to_box = crop_to_box
        self.mean, self.std = list(mean), list(std)

    def _crop(self, i: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Return the crop (left, top, w, h) in whole pixels."""
        if not self.crop_to_box or self.boxes is None:
            return 0, 0, width, height
        x, y, w, h = self.boxes[i].tolist()
        x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
        x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
        if x1 <= x0 or y1 <= y0:
            raise DatasetError(
                f"{self._box_file}: image {self.image_ids[i]} has box {(x, y, w, h)}, "
                f"which is empty inside its {width}x{height} image"
            )
        return x0, y0, x1 - x0, y1 - y0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        s = self.image_size
        img = open_image(self.image_paths[i], "RGB")
        left, top, cw, ch = self._crop(i, img.width, img.height)
        image = F.pil_to_tensor(img)  # (3, H, W) uint8
        image = F.resized_crop(image, top, left, ch, cw, [s, s], antialias=True)
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)

        scale = np.array([s / cw, s / ch])
        points = (self._points[i] - np.array([left, top])) * scale  # (K, 2)
        inside = np.all((points >= 0) & (points <= s), axis=1)
        visible = self._visible[i] & inside
        points[~visible] = 0.0
        sample = {
            "image": image,
            "label": self.labels[i].clone(),
            "landmarks": torch.from_numpy(points.astype(np.float32)),
            "visible": torch.from_numpy(visible),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        if self.has_part_masks:
            masks = torch.zeros(len(self.landmark_names), s, s, dtype=torch.bool)  # (K, S, S)
            for kk, file in self._masks[i].items():
                mask = F.pil_to_tensor(open_image(file, "L"))  # (1, H, W)
                if mask.shape[-2:] != (img.height, img.width):
                    raise DatasetError(
                        f"mask {file} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
                        f"{self.image_paths[i]} is {img.width}x{img.height}"
                    )
                mask = F.resized_crop(mask, top, left, ch, cw, [s, s], interpolation=InterpolationMode.NEAREST)
                masks[kk] = mask[0] > 0
            sample["part_masks"] = masks
        return sample
