"""read_keypoints, and class folders with a keypoints JSON measured exactly like the same data in the CUB layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from icnn_compress.data import CubDataset, ImageFolderDataset, read_keypoints
from icnn_compress.errors import DatasetError
from icnn_compress.evaluate import evaluate
from icnn_compress.models.registry import build_base_model
from icnn_compress.models.surgery import make_interpretable


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    return path


def test_categories_with_their_own_keypoints_share_one_name_list(tmp_path):
    files = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png")]
    doc = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
           "annotations": [{"image_id": 1, "category_id": 7, "keypoints": [1, 2, 2, 3, 4, 1]},
                           {"image_id": 2, "category_id": 8, "keypoints": [5, 6, 2, 7, 8, 0]}],
           "categories": [{"id": 7, "keypoints": ["head", "tail"]}, {"id": 8, "keypoints": ["tail", "wing"]}]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    kp = read_keypoints(tmp_path / "k.json", root=tmp_path, files=files)
    assert kp.names == ["head", "tail", "wing"] and kp.boxes is None
    assert kp.points.tolist() == [[[1, 2], [3, 4], [0, 0]], [[0, 0], [5, 6], [7, 8]]]
    assert kp.visible.tolist() == [[True, True, False], [False, True, False]]


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not a readable JSON file"),
    ("[]", "expected a COCO-style object"),
    ('{"images": {}}', "'images' must be a list"),
    ('{"categories": [{"id": 1, "keypoints": "head"}]}', "needs 'keypoints': a list of landmark names"),
    ('{"images": [{"file_name": "a.png"}]}', "needs an 'id' and a 'file_name'"),
])
def test_a_malformed_file_is_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "k.json").write_text(text)
    with pytest.raises(DatasetError, match=message) as err:
        read_keypoints(tmp_path / "k.json", root=tmp_path, files=[_png(tmp_path / "a.png")])
    assert str(err.value).startswith(str(tmp_path / "k.json")) and "\n" not in str(err.value)


def _as_class_folders(cub: Path, out: Path) -> Path:
    """The CUB folder ``cub`` re-laid as train/<class>/, test/<class>/ plus a COCO keypoints JSON."""
    table = {name: [line.split() for line in (cub / name).read_text().splitlines()]
             for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt")}
    # the CUB folder names ("001.glider"): sorted as torchvision sorts class folders, they keep the class ids' order
    classes = {int(c): n for c, n in (line.split() for line in (cub / "classes.txt").read_text().splitlines())}
    names = [line.split(maxsplit=1)[1] for line in (cub / "parts" / "parts.txt").read_text().splitlines()]
    labels = dict(table["image_class_labels.txt"])
    train = dict(table["train_test_split.txt"])
    images, files = [], {}
    for image_id, rel in table["images.txt"]:
        target = f"{'train' if train[image_id] == '1' else 'test'}/{classes[int(labels[image_id])]}/{Path(rel).name}"
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cub / "images" / rel, out / target)
        images.append({"id": int(image_id), "file_name": target})
        files[int(image_id)] = [0.0] * (3 * len(names))
    for line in (cub / "parts" / "part_locs.txt").read_text().splitlines():
        image_id, part, x, y, vis = line.split()
        k = 3 * (int(part) - 1)
        files[int(image_id)][k:k + 3] = [float(x), float(y), 2 * int(vis)]
    doc = {"images": images, "categories": [{"id": 1, "keypoints": names}],
           "annotations": [{"image_id": i, "category_id": 1, "keypoints": kps} for i, kps in files.items()]}
    (out / "keypoints.json").write_text(json.dumps(doc))
    return out


def test_class_folders_with_keypoints_measure_what_the_cub_layout_measures(tiny_parts, tmp_path):
    folders = _as_class_folders(tiny_parts, tmp_path / "folders")
    cub = CubDataset(tiny_parts, split="test", image_size=64, crop_to_box=False)
    imf = ImageFolderDataset(folders, split="test", image_size=64, keypoints="keypoints.json")
    assert [c.split(".", 1)[1] for c in imf.classes] == cub.classes
    assert imf.landmark_names == cub.landmark_names and len(imf) == len(cub)
    torch.manual_seed(0)
    model = build_base_model("icnn_compress.zoo:small_cnn", num_classes=len(cub.classes))
    layout = make_interpretable(model, arch="icnn_compress.zoo:small_cnn", num_classes=len(cub.classes),
                                image_size=64, top_layer="features.14")
    results = [evaluate(model, DataLoader(ds, batch_size=16), layers=layout["masks"], classes=ds.classes,
                        landmark_names=ds.landmark_names, image_size=64) for ds in (cub, imf)]
    assert results[0]["layers"].keys() == results[1]["layers"].keys()
    for name, layer in results[0]["layers"].items():
        assert layer["location_instability"] is not None
        assert results[1]["layers"][name]["location_instability"] == pytest.approx(layer["location_instability"],
                                                                                   abs=1e-12)
    assert results[1]["accuracy"] == results[0]["accuracy"]
