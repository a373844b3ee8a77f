"""relocate(): a recipe's data section pointed at another folder."""

from __future__ import annotations

from icnn_compress.config import DataConfig
from icnn_compress.data.recipe import relocate


def test_relocate_keeps_limits_unless_read_whole(tmp_path) -> None:
    cfg = DataConfig(root="runs/data/parts", generate="parts", limit_train=200, limit_test=50, image_size=96)
    assert relocate(cfg, None) is cfg
    moved = relocate(cfg, tmp_path / "parts")
    assert (moved.root, moved.generate, moved.limit_train, moved.limit_test) == (str(tmp_path / "parts"), None, 200, 50)
    whole = relocate(cfg, tmp_path / "heldout", whole=True)
    assert (whole.root, whole.generate) == (str(tmp_path / "heldout"), None)
    assert (whole.limit_train, whole.limit_test) == (None, None)
    assert whole.image_size == moved.image_size == 96 and cfg.root == "runs/data/parts"
