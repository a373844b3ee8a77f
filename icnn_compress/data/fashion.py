"""Real Fashion-MNIST objects placed on larger textured canvases, written in the CUB-200-2011 layout.

Xiao, Rasul, Vollgraf, "Fashion-MNIST", arXiv:1708.07747. The objects are real photographs (28×28 gray),
so this is the "real images" check of METHOD.md section 8: one small object at a random place per image.
Landmarks are box-relative (``top``, ``centre``, ``bottom``: the middle of the box's top edge, its centre,
the middle of its bottom edge); there are no part masks.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from tqdm import tqdm

from icnn_compress.data._layout import LayoutRecord, class_folder, finish_output_folder, new_output_folder, write_layout
from icnn_compress.data.generate import textured_background
from icnn_compress.errors import DatasetError

LANDMARK_NAMES: tuple[str, ...] = ("top", "centre", "bottom")
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchvision"


def _candidate_folders(source: Path) -> list[Path]:
    # Debian's folder holds the files directly; a torchvision root holds them under FashionMNIST/raw.
    return [source, source / "raw", source / "FashionMNIST" / "raw"]


def _find(folder: Path, name: str) -> Path | None:
    for file in (folder / name, folder / f"{name}.gz"):
        if file.is_file():
            return file
    return None


def _locate(source: str | Path | None) -> Path:
    """Return the folder that holds the four idx files (plain or .gz)."""
    if source is not None:
        roots = [Path(source).expanduser()]
    else:
        roots = [DEBIAN_FOLDER, _cache_root()]
    needed = [n for pair in _FILES.values() for n in pair]
    for root in roots:
        for folder in _candidate_folders(root):
            if all(_find(folder, n) for n in needed):
                return folder
    where = " or ".join(str(r) for r in roots)
    raise DatasetError(
        f"no Fashion-MNIST files ({', '.join(needed)}, plain or .gz) in {where} (nor in its raw/ or "
        f"FashionMNIST/raw/); install Debian's package with `apt-get install dataset-fashion-mnist` "
        f"(it fills {DEBIAN_FOLDER}), or download it with torchvision: "
        f"`torchvision.datasets.FashionMNIST('{_cache_root()}', download=True)`"
    )


def _read_idx(file: Path, reader) -> torch.Tensor:
    """Read an idx file with torchvision's reader, decompressing a .gz copy to a temporary file first."""
    try:
        if file.suffix != ".gz":
            return reader(str(file))
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / file.stem
            with gzip.open(file, "rb") as src, plain.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            return reader(str(plain))
    except (OSError, ValueError, RuntimeError, AssertionError, EOFError) as err:
        raise DatasetError(f"cannot read Fashion-MNIST file {file}: {err}") from err


def load_fashion_mnist(source: str | Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{"train": (images, labels), "test": ...}``: uint8 (N, 28, 28) images and int64 (N,) labels."""
    folder = _locate(source)
    out = {}
    for split, (images_name, labels_name) in _FILES.items():
        images = _read_idx(_find(folder, images_name), read_image_file)
        labels = _read_idx(_find(folder, labels_name), read_label_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{folder}: {images_name} holds {tuple(images.shape)} but {labels_name} holds {tuple(labels.shape)}"
            )
        out[split] = (images, labels.long())
    return out


def _place(
    rng: np.random.Generator, obj: np.ndarray, canvas_size: int, scale: tuple[float, float]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Composite one 28×28 gray object, colourised, on a textured canvas; return it and the object's tight box."""
    side = max(2, int(round(rng.uniform(*scale) * canvas_size)))
    alpha = np.asarray(Image.fromarray(obj).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64)
    # Fashion-MNIST objects are mostly mid-gray: stretch so the brightest tenth is opaque, keeping the shading.
    lit = alpha[alpha > 0]
    alpha = np.clip(alpha / max(float(np.percentile(lit, 90)) if lit.size else 1.0, 1.0), 0.0, 1.0)
    x0, y0 = (int(v) for v in rng.integers(0, canvas_size - side + 1, size=2))
    canvas = np.asarray(textured_background(rng, canvas_size), dtype=np.float64)
    patch = canvas[y0 : y0 + side, x0 : x0 + side]
    weight = alpha.reshape(-1, 1) / max(float(alpha.sum()), 1e-6)
    backdrop = (patch.reshape(-1, 3) * weight).sum(axis=0)  # the background under the object
    for _ in range(20):  # a colour that stands out from the backdrop, so that the object can be seen
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        if np.linalg.norm(colour - backdrop) >= 150.0:
            break
    a = alpha[..., None]  # (side, side, 1)
    canvas[y0 : y0 + side, x0 : x0 + side] = patch * (1.0 - a) + colour * a
    canvas += rng.normal(0.0, rng.uniform(2.0, 8.0), size=canvas.shape)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    rows, cols = np.nonzero(alpha > 0)
    if len(rows) == 0:  # an all-black object: keep the square it was placed in
        return image, (float(x0), float(y0), float(side), float(side))
    left, top = x0 + cols.min(), y0 + rows.min()
    box = (float(left), float(top), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1))
    return image, box


def generate_fashion_canvas(
    out: str | Path,
    *,
    source: str | Path | None = None,
    seed: int = 0,
    train_count: int = 3000,
    test_count: int = 1000,
    canvas_size: int = 128,
    scale: tuple[float, float] = (0.3, 0.6),
    progress: bool = True,
) -> Path:
    """Write Fashion-MNIST objects on textured canvases in the CUB-200-2011 layout and return its folder.

    Train images come from Fashion-MNIST's train split, test images from its test split (a random subset
    of each, fixed by ``seed``). The files are byte-identical for the same arguments and source.

    Args:
        out: the folder to create (it must not exist, or be empty).
        source: Debian's folder (``/usr/share/datasets/fashion-mnist``), a torchvision root (with
            ``FashionMNIST/raw``) or a folder holding the idx files; None tries Debian's folder, then
            ``~/.cache/torchvision``.
        seed: the random seed.
        train_count, test_count: images in each split.
        canvas_size: side of the square canvases in pixels.
        scale: range of the object's side as a fraction of the canvas side.
        progress: show a tqdm progress bar (only on a terminal).
    """
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise DatasetError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if canvas_size < 16:
        raise DatasetError(f"canvas_size must be at least 16 pixels, got {canvas_size}")
    data = load_fashion_mnist(source)
    for split, count in (("train", train_count), ("test", test_count)):
        if not 0 <= count <= len(data[split][0]):
            raise DatasetError(f"{split}_count must be between 0 and {len(data[split][0])}, got {count}")
    out = Path(out).expanduser()
    tmp = new_output_folder(out)
    try:
        class_names = list(FashionMNIST.classes)
        folders = [class_folder(c + 1, n) for c, n in enumerate(class_names)]
        for folder in folders:
            (tmp / "images" / folder).mkdir(parents=True)
        records = []
        for split, count in (("train", train_count), ("test", test_count)):
            images, labels = data[split]
            picks = np.random.default_rng([seed, 0 if split == "train" else 1]).permutation(len(images))[:count]
            for j, src in enumerate(tqdm(picks, desc=f"fashion {split}", disable=None if progress else True)):
                rng = np.random.default_rng([seed, 2 if split == "train" else 3, j])
                image, (x, y, w, h) = _place(rng, images[src].numpy(), canvas_size, scale)
                c = int(labels[src])
                rel = f"{folders[c]}/{split}_{j:05d}.png"
                image.save(tmp / "images" / rel)
                cx = x + w / 2
                parts = [(cx, y, True), (cx, y + h / 2, True), (cx, y + h, True)]
                records.append(
                    LayoutRecord(image=rel, class_id=c + 1, is_train=split == "train", box=(x, y, w, h), parts=parts)
                )
        write_layout(tmp, class_names=class_names, landmark_names=LANDMARK_NAMES, records=records)
        meta = {
            "generator": "icnn_compress.data.generate_fashion_canvas",
            "seed": seed,
            "train_count": train_count,
            "test_count": test_count,
            "canvas_size": canvas_size,
            "scale": list(scale),
            "landmarks": list(LANDMARK_NAMES),
        }
        (tmp / "generated.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        finish_output_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
