"""Shared fixtures: a tiny generated parts dataset and a tiny recipe on it (made once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from icnn_compress.config import load_recipe
from icnn_compress.data.generate import generate_parts_dataset
from icnn_compress.train import pretrain

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"


def require_system_package(present: bool, package: str, why: str) -> None:
    """Stop a test that needs Debian's ``package``: fail under CI (``CI=true``, where ``make test`` installed
    it, so its absence is a broken set-up), skip elsewhere; both say the one command that installs it."""
    if present:
        return
    message = f"{why} needs Debian's {package}: `sudo apt-get install {package}` (`make test` installs it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> Path:
    """4 classes × 24 train / 8 test images at 64 px, with landmarks and part masks."""
    root = tmp_path_factory.mktemp("data") / "parts"
    generate_parts_dataset(root, seed=1, train_per_class=24, test_per_class=8, progress=False)
    return root


@pytest.fixture
def tiny_recipe(tiny_parts):
    """The quickstart recipe shrunk to seconds: no plain epoch, 2 fine-tuning epochs, SGD and a fixed κ."""
    def make(*extra: str):
        return load_recipe(QUICKSTART, [
            f"data.root={tiny_parts}", "data.generate=none", "pretrain.epochs=0", "train.epochs=2",
            "train.batch_size=16", "train.eval_batch_size=64", "train.optimizer=sgd", "train.lr=0.01",
            "train.lr_end=0.001", "icnn.kappa=3e-4", "model.arch=icnn_compress.zoo:small_cnn",
            *extra,
        ])
    return make


@pytest.fixture(scope="session")
def learned_plain(tmp_path_factory):
    """Recipe maker on a 2-category, 32-px parts set whose plain small CNN has learned something (20 epochs)."""
    base = tmp_path_factory.mktemp("learned")
    root = generate_parts_dataset(base / "parts", seed=1, num_classes=2, train_per_class=200, test_per_class=50,
                                  image_size=32, progress=False)
    overrides = [f"data.root={root}", "data.generate=none", "data.image_size=32", "train.batch_size=16",
                 "train.eval_batch_size=64", "train.epochs=3"]
    plain = pretrain(load_recipe(QUICKSTART, [*overrides, "pretrain.epochs=20"]), base / "plain", progress=False)

    def make(*extra: str):
        return load_recipe(QUICKSTART, [*overrides, f"model.checkpoint={plain}", *extra])
    return make
