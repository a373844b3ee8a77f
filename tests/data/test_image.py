"""open_image on files saved in PIL's wider grey modes and over the decompression-bomb limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icnn_compress.data._image import open_image
from icnn_compress.errors import DatasetError


def test_sixteen_bit_grey_is_scaled_not_saturated(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 257, 65535, 32896]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL's convert("RGB") would make every non-zero pixel 255
    assert np.asarray(open_image(path, "RGB"))[0, :, 0].tolist() == [0, 1, 255, 128]
    assert np.asarray(open_image(path, "L")).tolist() == [[0, 1, 255, 128]]


def test_float_grey_in_unit_range_is_scaled_and_other_floats_clipped(tmp_path: Path) -> None:
    unit, wide = tmp_path / "unit.tiff", tmp_path / "wide.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(unit)
    Image.fromarray(np.array([[-3.0, 100.4, 300.0]], dtype=np.float32)).save(wide)
    assert np.asarray(open_image(unit, "L")).tolist() == [[0, 128, 255]]
    assert np.asarray(open_image(wide, "L")).tolist() == [[0, 100, 255]]


def test_thirty_two_bit_grey_is_scaled_from_its_positive_range(tmp_path: Path) -> None:
    path = tmp_path / "i32.tiff"
    Image.fromarray(np.array([[-5, 70000, 2**31 - 1]], dtype=np.int32)).save(path)
    assert np.asarray(open_image(path, "L")).tolist() == [[0, 0, 255]]


def test_decompression_bomb_is_refused_with_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over the limit, under twice it
    with pytest.raises(DatasetError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        open_image(path, "RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL's own error
    with pytest.raises(DatasetError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        open_image(path, "RGB")
