"""The Fashion-MNIST canvas generator, on a tiny fake torchvision-style folder and on Debian's package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from icnn_compress.data import CubDataset, generate_fashion_canvas
from icnn_compress.data import fashion
from icnn_compress.errors import DatasetError
from conftest import require_system_package

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def _idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    """Write an idx file: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)


def _fake_fashion(folder: Path, *, gz: bool = False) -> None:
    """Train objects: a 12x20 block, labels 0-4. Test objects: a 20x8 block, labels 5-9."""
    train = np.zeros((10, 28, 28), dtype=np.uint8)
    train[:, 4:24, 8:20] = 200
    test = np.zeros((6, 28, 28), dtype=np.uint8)
    test[:, 10:18, 4:24] = 255
    _idx(folder / "train-images-idx3-ubyte", train, gz=gz)
    _idx(folder / "train-labels-idx1-ubyte", np.arange(10) % 5, gz=gz)
    _idx(folder / "t10k-images-idx3-ubyte", test, gz=gz)
    _idx(folder / "t10k-labels-idx1-ubyte", 5 + np.arange(6) % 5, gz=gz)


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tv")
    _fake_fashion(root / "FashionMNIST" / "raw")
    return root


def _check(root: Path, *, train: int, test: int, size: int) -> None:
    tr = CubDataset(root, split="train", image_size=size, crop_to_box=False)
    te = CubDataset(root, split="test", image_size=size, crop_to_box=False)
    assert tr.classes == CLASSES and tr.landmark_names == ["top", "centre", "bottom"]
    assert (len(tr), len(te)) == (train, test)
    for ds in (tr, te):
        for i in range(len(ds)):
            s = ds[i]
            assert "part_masks" not in s and s["visible"].all()
            x, y, w, h = ds.boxes[i].tolist()
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
            expected = torch.tensor([[x + w / 2, y], [x + w / 2, y + h / 2], [x + w / 2, y + h]])
            torch.testing.assert_close(s["landmarks"], expected, rtol=0, atol=0.01)


def test_fake_torchvision_root(torchvision_root: Path, tmp_path: Path) -> None:
    out = generate_fashion_canvas(
        tmp_path / "fc", source=torchvision_root, seed=1, train_count=8, test_count=4, canvas_size=40, progress=False
    )
    _check(out, train=8, test=4, size=40)
    assert set(CubDataset(out, split="train").labels.tolist()) <= {0, 1, 2, 3, 4}
    assert set(CubDataset(out, split="test").labels.tolist()) <= {5, 6, 7, 8, 9}
    # the box is tight: train objects are 12 wide and 20 tall, so taller than wide after scaling
    ds = CubDataset(out, split="train")
    assert (ds.boxes[:, 3] > ds.boxes[:, 2]).all()
    again = generate_fashion_canvas(
        tmp_path / "again", source=torchvision_root, seed=1, train_count=8, test_count=4, canvas_size=40, progress=False
    )
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_gz_folder(tmp_path: Path) -> None:
    _fake_fashion(tmp_path / "debian-like", gz=True)
    out = generate_fashion_canvas(
        tmp_path / "fc", source=tmp_path / "debian-like", train_count=3, test_count=2, canvas_size=32, progress=False
    )
    _check(out, train=3, test=2, size=32)


def test_missing_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion, "DEBIAN_FOLDER", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=r"debian.*cache.*apt-get install dataset-fashion-mnist"):
        generate_fashion_canvas(tmp_path / "fc", progress=False)
    with pytest.raises(DatasetError, match="elsewhere"):
        generate_fashion_canvas(tmp_path / "fc", source=tmp_path / "elsewhere", progress=False)
    assert not (tmp_path / "fc").exists()


def test_too_many_requested(torchvision_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train_count"):
        generate_fashion_canvas(tmp_path / "fc", source=torchvision_root, train_count=11, progress=False)


def test_debian_package(tmp_path: Path) -> None:
    require_system_package(DEBIAN.is_dir(), "dataset-fashion-mnist", "reading the real Fashion-MNIST files")
    out = generate_fashion_canvas(tmp_path / "fc", train_count=12, test_count=6, canvas_size=64, progress=False)
    _check(out, train=12, test=6, size=64)
    s = CubDataset(out, split="train", image_size=32)[0]
    assert s["image"].shape == (3, 32, 32)
    assert s["landmarks"][:, 1].tolist() == [0.0, 16.0, 32.0]  # top, centre, bottom of the crop
