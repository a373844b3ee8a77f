"""CubDataset on a hand-written three-image CUB folder, with hand-computed expected values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icnn_compress.data import IMAGENET_MEAN, IMAGENET_STD, CubDataset
from icnn_compress.errors import DatasetError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """A blue image of ``size`` (W, H) that is red inside ``box`` (x, y, w, h)."""
    a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    a[...] = BLUE
    x, y, w, h = box
    a[y : y + h, x : x + w] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    """Image 1: 100x50, box (10, 5, 40, 20), train, class 2. Image 2: 60x40, test, class 1. Image 3: train, class 1."""
    root = tmp_path / "cub"
    _image(root / "images/002.Laysan_Albatross/a.png", (100, 50), (10, 5, 40, 20))
    _image(root / "images/001.Black_footed_Albatross/b.png", (60, 40), (0, 0, 60, 40))
    _image(root / "images/001.Black_footed_Albatross/c.png", (30, 30), (5, 5, 20, 20))
    _write(
        root,
        "images.txt",
        "1 002.Laysan_Albatross/a.png\n2 001.Black_footed_Albatross/b.png\n3 001.Black_footed_Albatross/c.png\n",
    )
    _write(root, "classes.txt", "1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    _write(root, "image_class_labels.txt", "1 2\n2 1\n3 1\n")
    _write(root, "train_test_split.txt", "1 1\n2 0\n3 1\n")
    _write(root, "bounding_boxes.txt", "1 10.0 5.0 40.0 20.0\n2 0.0 0.0 60.0 40.0\n3 5.0 5.0 20.0 20.0\n")
    _write(root, "parts/parts.txt", "1 back\n2 beak\n3 left wing\n")
    _write(
        root,
        "parts/part_locs.txt",
        # image 1: back inside the box, beak right of it, left wing not visible
        "1 1 30.0 15.0 1\n1 2 60.0 10.0 1\n1 3 0.0 0.0 0\n"
        "2 1 15.0 10.0 1\n2 2 60.0 40.0 1\n2 3 30.0 20.0 1\n"
        "3 1 15.0 15.0 1\n3 2 0.0 0.0 0\n3 3 5.0 25.0 1\n",
    )
    return root


def _add_masks(root: Path) -> None:
    # The mask of "back" on image 1 covers x in [10, 30), y in [5, 15): the top-left quarter of the crop.
    m = np.zeros((50, 100), dtype=bool)
    m[5:15, 10:30] = True
    Image.fromarray(m).save(root / "m1.png")
    _write(root, "parts/part_masks.txt", "1 1 m1.png\n")


def test_classes_landmarks_and_splits(cub: Path) -> None:
    train = CubDataset(cub, split="train", image_size=20)
    assert train.classes == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert train.landmark_names == ["back", "beak", "left wing"]
    assert train.image_ids == [1, 3] and len(train) == 2
    assert train.labels.tolist() == [1, 0]
    assert [s.image_ids for s in (CubDataset(cub, split="test"), CubDataset(cub, split="all"))] == [[2], [1, 2, 3]]
    assert CubDataset(cub, split="all", limit=2).image_ids == [1, 2]


def test_sample_cropped_to_box(cub: Path) -> None:
    ds = CubDataset(cub, split="train", image_size=20, mean=(0, 0, 0), std=(1, 1, 1))
    s = ds[0]
    assert set(s) == {"image", "label", "landmarks", "visible", "index"}
    assert s["image"].shape == (3, 20, 20) and s["image"].dtype == torch.float32
    # the crop holds only the red box
    torch.testing.assert_close(s["image"], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 20, 20))
    assert s["label"].dtype == torch.int64 and s["label"].item() == 1 and s["label"].ndim == 0
    assert s["index"].item() == 0
    # back (30, 15) -> ((30 - 10) * 20 / 40, (15 - 5) * 20 / 20); beak (60, 10) lies outside the crop
    torch.testing.assert_close(s["landmarks"], torch.tensor([[10.0, 10.0], [0.0, 0.0], [0.0, 0.0]]))
    assert s["landmarks"].dtype == torch.float32
    assert s["visible"].tolist() == [True, False, False]
    s = ds[1]  # image 3: box (5, 5, 20, 20), scale 1; the wing at (5, 25) sits on the crop's edge
    torch.testing.assert_close(s["landmarks"], torch.tensor([[10.0, 10.0], [0.0, 0.0], [0.0, 20.0]]))
    assert s["visible"].tolist() == [True, False, True]


def test_sample_full_image_and_normalisation(cub: Path) -> None:
    ds = CubDataset(cub, split="test", image_size=20, crop_to_box=False)
    s = ds[0]  # 60x40 image, box = whole image
    torch.testing.assert_close(s["landmarks"], torch.tensor([[5.0, 5.0], [20.0, 20.0], [10.0, 10.0]]))
    assert s["visible"].tolist() == [True, True, True]
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(s["image"][:, 7, 7], expected)
    # a landmark subset, reordered
    sub = CubDataset(cub, split="test", image_size=20, crop_to_box=False, landmarks=["left wing", "back"])
    assert sub.landmark_names == ["left wing", "back"]
    torch.testing.assert_close(sub[0]["landmarks"], torch.tensor([[10.0, 10.0], [5.0, 5.0]]))


def test_part_masks(cub: Path) -> None:
    _add_masks(cub)
    ds = CubDataset(cub, split="train", image_size=20)
    masks = ds[0]["part_masks"]
    assert masks.shape == (3, 20, 20) and masks.dtype == torch.bool
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[:10, :10] = True
    assert torch.equal(masks[0], expected)
    assert not masks[1:].any()  # no mask files for beak and wing
    assert not ds[1]["part_masks"].any()
    sub = CubDataset(cub, split="train", image_size=20, landmarks=["beak", "back"])
    assert torch.equal(sub[0]["part_masks"][1], expected)


def test_batches_through_a_dataloader(cub: Path) -> None:
    _add_masks(cub)
    batch = next(iter(torch.utils.data.DataLoader(CubDataset(cub, split="all", image_size=16), batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["part_masks"].shape == (3, 3, 16, 16)
    assert batch["index"].tolist() == [0, 1, 2]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere.*make-dataset"):
        CubDataset(tmp_path / "nowhere")


def test_missing_annotation_file(cub: Path) -> None:
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetError, match=r"not a CUB-200-2011 folder: missing bounding_boxes\.txt"):
        CubDataset(cub)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bounding_boxes.txt", "1 10.0 5.0 40.0 20.0\n2 0.0 zero 60.0 40.0\n", r"bounding_boxes\.txt:2"),
        ("parts/part_locs.txt", "1 1 30.0 15.0\n", r"part_locs\.txt:1"),
        ("image_class_labels.txt", "1 2\n2 1\n", r"image_class_labels\.txt.*image id 3"),
        ("image_class_labels.txt", "1 2\n2 1\n3 7\n", r"image_class_labels\.txt.*class 7"),
    ],
)
def test_malformed_annotation(cub: Path, name: str, text: str, where: str) -> None:
    (cub / name).write_text(text)
    with pytest.raises(DatasetError, match=where):
        CubDataset(cub, split="all")


def test_unknown_landmark(cub: Path) -> None:
    with pytest.raises(DatasetError, match="no part named.*tail"):
        CubDataset(cub, landmarks=["back", "tail"])


def test_corrupt_and_missing_image(cub: Path) -> None:
    (cub / "images/002.Laysan_Albatross/a.png").write_bytes(b"\x89PNG garbage, not an image")
    ds = CubDataset(cub, split="train", image_size=8)
    with pytest.raises(DatasetError, match=r"a\.png") as info:
        ds[0]
    assert info.value.__cause__ is not None
    (cub / "images/001.Black_footed_Albatross/c.png").unlink()
    with pytest.raises(DatasetError, match=r"c\.png"):
        ds[1]
    with pytest.raises(IndexError):
        ds[2]
