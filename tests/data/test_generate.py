"""The generated parts dataset: determinism, layout, and landmarks consistent with boxes and masks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from icnn_compress.data import CubDataset, generate_parts_dataset
from icnn_compress.data.generate import CATEGORY_NAMES, LANDMARK_NAMES
from icnn_compress.errors import DatasetError

SIZE = 32


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "parts"
    return generate_parts_dataset(
        out, seed=3, num_classes=6, train_per_class=3, test_per_class=2, image_size=SIZE, progress=False
    )


def test_deterministic(parts: Path, tmp_path: Path) -> None:
    again = generate_parts_dataset(
        tmp_path / "again", seed=3, num_classes=6, train_per_class=3, test_per_class=2, image_size=SIZE, progress=False
    )
    assert _files(again) == _files(parts)
    other = generate_parts_dataset(
        tmp_path / "other", seed=4, num_classes=6, train_per_class=3, test_per_class=2, image_size=SIZE, progress=False
    )
    assert _files(other)["images.txt"] == _files(parts)["images.txt"]
    assert _files(other)["bounding_boxes.txt"] != _files(parts)["bounding_boxes.txt"]


def test_reader_reads_it(parts: Path) -> None:
    train = CubDataset(parts, split="train", image_size=SIZE)
    test = CubDataset(parts, split="test", image_size=SIZE)
    assert train.classes == list(CATEGORY_NAMES)
    assert train.landmark_names == list(LANDMARK_NAMES) == ["head", "body", "tail", "leg"]
    assert len(train) == 18 and len(test) == 12
    assert torch.bincount(train.labels).tolist() == [3] * 6
    assert torch.bincount(test.labels).tolist() == [2] * 6
    assert train.labels[:6].tolist() == list(range(6))  # classes interleaved: a limit keeps balance
    s = train[0]
    assert s["image"].shape == (3, SIZE, SIZE) and s["part_masks"].shape == (4, SIZE, SIZE)


def test_landmarks_in_box_and_mask(parts: Path) -> None:
    # Full image at its own size: the reader's transform is the identity, so we see the files' values.
    ds = CubDataset(parts, split="all", image_size=SIZE, crop_to_box=False)
    for i in range(len(ds)):
        s = ds[i]
        x0, y0, w, h = ds.boxes[i].tolist()
        assert 0 <= x0 and 0 <= y0 and x0 + w <= SIZE + 1e-6 and y0 + h <= SIZE + 1e-6 and w > 4 and h > 4
        assert s["visible"][:2].all(), "head and body are never occluded"
        for k in range(len(LANDMARK_NAMES)):
            mask = s["part_masks"][k]
            if not s["visible"][k]:
                continue
            x, y = s["landmarks"][k].tolist()
            assert x0 - 0.01 <= x <= x0 + w + 0.01 and y0 - 0.01 <= y <= y0 + h + 0.01
            assert mask[math.floor(y), math.floor(x)], (i, LANDMARK_NAMES[k])
        # a part its category lacks is invisible and has an empty mask
        has = {"glider": "hbt", "walker": "hbtl", "roller": "hbl", "spiker": "hbtl", "crawler": "hbl", "slither": "hbt"}
        present = has[ds.classes[int(s["label"])]]
        for k, name in enumerate(LANDMARK_NAMES):
            if name[0] not in present:
                assert not s["visible"][k] and not s["part_masks"][k].any()
            else:
                assert s["part_masks"][k].any()


def test_refuses_a_used_folder_and_bad_arguments(parts: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not empty"):
        generate_parts_dataset(parts, progress=False)
    with pytest.raises(DatasetError, match="num_classes"):
        generate_parts_dataset(tmp_path / "x", num_classes=7, progress=False)
    assert not (tmp_path / "x").exists()
