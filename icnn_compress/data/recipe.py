"""Open the dataset a recipe names, generating it first when the recipe says how."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from ..config import GENERATORS, IMAGENET_MEAN, IMAGENET_STD, DataConfig, ICNNConfig
from ..errors import DatasetError
from ._samples import LandmarkImages
from .cub import CubDataset
from .fashion import generate_fashion_canvas
from .generate import generate_parts_dataset
from .imagefolder import ImageFolderDataset, is_image_folder

__all__ = ["dataset_format", "ensure_dataset", "open_split", "relocate", "task_object"]

log = logging.getLogger(__name__)

_GENERATORS = {"parts": generate_parts_dataset, "fashion-canvas": generate_fashion_canvas}
assert tuple(_GENERATORS) == GENERATORS, "config.GENERATORS names the generators"


def relocate(cfg: DataConfig, root: str | Path | None, *, whole: bool = False) -> DataConfig:
    """``cfg`` read from the folder ``root`` instead (``None``: ``cfg`` unchanged), never generated there.

    ``whole`` drops the recipe's ``limit_train``/``limit_test``: a held-out folder given to measure on is
    read whole, while a training folder that merely moved keeps the limits the run was trained with.
    """
    if root is None:
        return cfg
    limits = {"limit_train": None, "limit_test": None} if whole else {}
    return replace(cfg, root=str(root), generate=None, **limits)


def dataset_format(cfg: DataConfig) -> str:
    """``cfg.format``, with ``"auto"`` resolved: ``"imagefolder"`` for a folder of folders without images.txt."""
    if cfg.format != "auto":
        return cfg.format
    return "imagefolder" if cfg.generate is None and is_image_folder(cfg.root) else "cub"


def ensure_dataset(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Return ``cfg.root``, generating it with ``cfg.generate`` when it does not exist yet."""
    root = Path(cfg.root)
    fmt = dataset_format(cfg)
    if fmt == "imagefolder" and cfg.generate is not None:
        raise DatasetError(f"data.generate = {cfg.generate!r} writes the CUB layout, not class folders; remove "
                           "data.generate or set data.format = \"cub\"")
    if fmt == "cub" and cfg.keypoints is not None:
        raise DatasetError("data.keypoints is for class folders (data.format = \"imagefolder\"); the CUB layout "
                           "has its landmarks in parts/part_locs.txt")
    if (root / "images.txt").is_file() or cfg.generate is None:
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists but is not a dataset (no images.txt); remove it or set data.root")
    log.info("generating the %s dataset at %s (seed %d)", cfg.generate, root, cfg.generate_seed)
    _GENERATORS[cfg.generate](root, seed=cfg.generate_seed, progress=progress)
    return root


def open_split(
    cfg: DataConfig, split: str, *, progress: bool = True, single_object: str | None = None
) -> LandmarkImages:
    """Open one split ("train", "val", "test" or "all") of the recipe's dataset at the recipe's image size.

    ``single_object`` (the recipe's ``icnn.object`` in a single-category task, see :func:`task_object`)
    relabels the images as object / other. ``data.format`` picks the reader
    (:class:`~icnn_compress.data.CubDataset` or :class:`~icnn_compress.data.ImageFolderDataset`); both yield
    the same samples.
    """
    root = ensure_dataset(cfg, progress=progress)
    limit = cfg.limit_train if split in ("train", "val") else cfg.limit_test
    # unset: ImageNet's (a run fills in its model's own before it opens the data, see train.py)
    mean = cfg.mean if cfg.mean is not None else list(IMAGENET_MEAN)
    std = cfg.std if cfg.std is not None else list(IMAGENET_STD)
    # what both readers take
    common = dict(split=split, image_size=cfg.image_size, crop_to_box=cfg.crop_to_box, mean=mean, std=std,
                  landmarks=cfg.landmarks, limit=limit, val_fraction=cfg.val_fraction, val_seed=cfg.val_seed,
                  single_object=single_object)
    if dataset_format(cfg) == "imagefolder":
        return ImageFolderDataset(root, keypoints=cfg.keypoints, test_fraction=cfg.test_fraction,
                                  split_seed=cfg.split_seed, **common)
    return CubDataset(root, **common)


def task_object(icnn: ICNNConfig) -> str | None:
    """The object class of a single-category recipe, else None."""
    return icnn.object if icnn.task == "single-category" else None
