"""ImageFolderDataset on hand-written class folders: the layouts, the splits, the samples, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icnn_compress.config import DataConfig
from icnn_compress.data import CubDataset, ImageFolderDataset
from icnn_compress.data.imagefolder import is_image_folder
from icnn_compress.data.recipe import dataset_format, open_split
from icnn_compress.errors import DatasetError

PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _png(path: Path, value: int, size: tuple[int, int] = (8, 4)) -> Path:
    """A grey PNG of ``size`` (W, H) whose pixels are all ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _classes(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            _png(root / name / f"{i:02d}.png", 10 * i)
    return root


def test_class_folders_give_torchvision_classes_labels_and_dict_samples(tmp_path):
    root = _classes(tmp_path / "set", {"cat": 5, "dog": 5})
    (root / "cat" / "notes.txt").write_text("not an image")  # not in IMG_EXTENSIONS: ignored
    ds = ImageFolderDataset(root, split="all", image_size=4, **PLAIN)
    assert ds.classes == ["cat", "dog"] and len(ds) == 10 and ds.landmark_names == []
    s = ds[7]
    assert set(s) == {"image", "label", "landmarks", "visible", "index"}
    assert s["image"].shape == (3, 4, 4) and s["label"].item() == 1 and s["index"].item() == 7
    assert s["landmarks"].shape == (0, 2) and s["visible"].shape == (0,)
    assert torch.allclose(s["image"], torch.full((3, 4, 4), 20 / 255))  # dog/02.png, value 20


def test_seeded_split_holds_out_test_fraction_per_class_and_carves_val_from_train(tmp_path):
    root = _classes(tmp_path / "set", {"cat": 10, "dog": 5})
    kw = dict(image_size=4, test_fraction=0.2, split_seed=3, val_fraction=0.25, val_seed=1)
    train, val, test = (ImageFolderDataset(root, split=s, **kw) for s in ("train", "val", "test"))
    assert torch.bincount(test.labels).tolist() == [2, 1]  # round(0.2 * 10), round(0.2 * 5)
    assert torch.bincount(val.labels).tolist() == [2, 1]  # round(0.25 * 8), round(0.25 * 4)
    assert len(train) == 15 - 3 - 3
    ids = [set(d.image_ids) for d in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ImageFolderDataset(root, split="test", **kw).image_ids == test.image_ids  # the seed fixes it
    assert ImageFolderDataset(root, split="test", **{**kw, "split_seed": 4}).image_ids != test.image_ids


def test_train_and_test_folders_are_the_splits_and_val_is_the_test_split_without_test(tmp_path):
    root = tmp_path / "set"
    _classes(root / "train", {"a": 4, "b": 4})
    _classes(root / "val", {"a": 1, "b": 2})
    assert is_image_folder(root)
    test = ImageFolderDataset(root, split="test", image_size=4)
    assert test.image_ids == ["val/a/00.png", "val/b/00.png", "val/b/01.png"]
    assert len(ImageFolderDataset(root, split="train", image_size=4)) == 8
    _classes(root / "test", {"b": 1})  # with test/, val/ is the validation split
    assert ImageFolderDataset(root, split="test", image_size=4).image_ids == ["test/b/00.png"]
    assert len(ImageFolderDataset(root, split="val", image_size=4, val_fraction=0.5)) == 3
    assert len(ImageFolderDataset(root, split="all", image_size=4)) == 12


def test_limit_takes_every_class_round_robin(tmp_path):
    root = _classes(tmp_path / "set", {"a": 4, "b": 4, "c": 4})
    ds = ImageFolderDataset(root, split="train", image_size=4, test_fraction=0.25, limit=6)
    assert torch.bincount(ds.labels).tolist() == [2, 2, 2]


def test_single_object_relabels_object_against_other(tmp_path):
    root = _classes(tmp_path / "set", {"a": 2, "b": 2, "c": 2})
    ds = ImageFolderDataset(root, split="all", image_size=4, single_object="b")
    assert ds.classes == ["other", "b"] and ds.labels.tolist() == [0, 0, 1, 1, 0, 0]


def _keypoints(root: Path, images: list[str], **extra) -> Path:
    doc = {
        "images": [{"id": 10 + i, "file_name": f} for i, f in enumerate(images)],
        "annotations": [
            {"image_id": 10, "category_id": 1, "keypoints": [2, 1, 2, 7, 3, 0, 4, 2, 1], "bbox": [2, 0, 4, 4]},
            {"image_id": 10, "category_id": 1, "keypoints": [1, 1, 2, 0, 0, 0, 0, 0, 0]},  # fewer labelled
        ],
        "categories": [{"id": 1, "name": "animal", "keypoints": ["head", "tail", "paw"]}],
        **extra,
    }
    path = root / "keypoints.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_keypoints_give_landmarks_in_the_resized_frame(tmp_path):
    root = _classes(tmp_path / "set", {"cat": 2, "dog": 2})
    _keypoints(root, ["cat/00.png", "dog/01.png"])
    ds = ImageFolderDataset(root, split="all", image_size=4, keypoints="keypoints.json")
    assert ds.landmark_names == ["head", "tail", "paw"]
    s = ds[0]  # cat/00.png, 8x4 -> 4x4: x halves, y stays
    assert s["landmarks"].tolist() == [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
    assert s["visible"].tolist() == [True, False, True]  # v = 0 is unlabelled; v = 1 (occluded) counts
    assert ds[3]["visible"].tolist() == [False] * 3  # dog/01.png is listed but has no annotation
    paw = ImageFolderDataset(root, split="all", image_size=4, keypoints=root / "keypoints.json", landmarks=["paw"])
    assert paw.landmark_names == ["paw"] and paw[0]["landmarks"].tolist() == [[2.0, 2.0]]


def test_crop_to_box_uses_the_coco_bbox_and_needs_one_per_image(tmp_path):
    root = _classes(tmp_path / "set", {"cat": 1})
    _keypoints(root, ["cat/00.png"])
    ds = ImageFolderDataset(root, split="all", image_size=4, keypoints="keypoints.json", crop_to_box=True)
    assert ds[0]["landmarks"].tolist() == [[0.0, 1.0], [0.0, 0.0], [2.0, 2.0]]  # box x 2..6, 4 px -> 4 px
    _png(root / "cat" / "01.png", 0)
    with pytest.raises(DatasetError, match=r"needs a bbox for every image.*\(first: cat/01.png\)"):
        ImageFolderDataset(root, split="all", image_size=4, keypoints="keypoints.json", crop_to_box=True)


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        (["cat/00.png", "cat/99.png"], {}, r"1 image\(s\) are not images of .* \(first: 'cat/99.png'\)"),
        (["cat/00.png"], {"annotations": [{"image_id": 5, "keypoints": []}]}, r"names image id 5, which 'images'"),
        (["cat/00.png"], {"annotations": [{"image_id": 10, "keypoints": [1, 2]}]}, r"has 2 keypoint values; .* 3"),
    ],
)
def test_a_keypoints_file_that_names_unknown_images_or_bad_values_is_one_line(tmp_path, images, extra, message):
    root = _classes(tmp_path / "set", {"cat": 1})
    _keypoints(root, images, **extra)
    with pytest.raises(DatasetError, match=message) as err:
        ImageFolderDataset(root, split="all", keypoints="keypoints.json")
    assert "\n" not in str(err.value)


def test_errors_tell_the_user_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="does not exist or is not a folder; expected class folders"):
        ImageFolderDataset(tmp_path / "nowhere")
    root = _classes(tmp_path / "set", {"cat": 1})
    with pytest.raises(DatasetError, match="keypoints file .* does not exist; fix data.keypoints"):
        ImageFolderDataset(root, keypoints="missing.json")
    with pytest.raises(DatasetError, match="set data.keypoints"):
        ImageFolderDataset(root, landmarks=["head"])
    with pytest.raises(DatasetError, match="plain class folders have none"):
        ImageFolderDataset(root, crop_to_box=True)
    (root / "cat" / "00.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*00.png"):
        ImageFolderDataset(root, split="all")[0]
    split = tmp_path / "split"
    _classes(split / "train", {"cat": 1})
    with pytest.raises(DatasetError, match="has train/ but no test/ or val/ folder"):
        ImageFolderDataset(split)
    _classes(split / "test", {"cow": 1})
    with pytest.raises(DatasetError, match="has class folders that .* lacks \\(cow\\)"):
        ImageFolderDataset(split)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no image file"):
        ImageFolderDataset(empty)


def test_recipe_format_auto_picks_the_reader_and_explicit_formats_are_checked(tmp_path, tiny_parts):
    root = _classes(tmp_path / "set", {"cat": 5, "dog": 5})
    cfg = DataConfig(root=str(root), image_size=8, val_fraction=0.0)
    assert dataset_format(cfg) == "imagefolder" and isinstance(open_split(cfg, "test"), ImageFolderDataset)
    cub = DataConfig(root=str(tiny_parts), image_size=8)
    assert dataset_format(cub) == "cub" and isinstance(open_split(cub, "test"), CubDataset)
    assert dataset_format(DataConfig(root=str(tmp_path / "new"), generate="parts")) == "cub"
    with pytest.raises(DatasetError, match="data.keypoints is for class folders"):
        open_split(DataConfig(root=str(tiny_parts), keypoints="k.json"), "test")
    with pytest.raises(DatasetError, match="writes the CUB layout, not class folders"):
        open_split(DataConfig(root=str(root), format="imagefolder", generate="parts"), "test")
