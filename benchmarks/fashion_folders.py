"""Write real Fashion-MNIST images as class folders (train/<class>/*.png, test/<class>/*.png): an ImageFolder.

The data of the README's ImageFolder run (recipes/mobilenet_v2_imagefolder.toml): the first ``--train`` /
``--test`` images of each class of Debian's dataset-fashion-mnist, as 28x28 grey PNGs in torchvision's
``ImageFolder`` layout, nothing else (no landmarks, no annotation files).

    python benchmarks/fashion_folders.py --out runs/data/fashion-folders --train 60 --test 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from torchvision.datasets import FashionMNIST

from icnn_compress.data.fashion import load_fashion_mnist


def write_folders(out: Path, *, train: int, test: int) -> Path:
    """Write ``train``/``test`` images per class under ``out``; return ``out``."""
    data = load_fashion_mnist()
    names = [n.replace("/", "_").replace(" ", "_") for n in FashionMNIST.classes]
    for split, per_class in (("train", train), ("test", test)):
        images, labels = data[split]
        for c, name in enumerate(names):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            picks = (labels == c).nonzero().flatten()[:per_class].tolist()
            for i in picks:
                Image.fromarray(images[i].numpy(), mode="L").save(folder / f"{i:05d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=60, help="training images per class")
    parser.add_argument("--test", type=int, default=20, help="test images per class")
    args = parser.parse_args()
    print(f"wrote {write_folders(args.out, train=args.train, test=args.test)}")


if __name__ == "__main__":
    main()
