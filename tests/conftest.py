"""Shared fixtures: a tiny generated parts dataset and a tiny recipe on it (made once per session)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from icnn_compress.runs.model_file import load_model_file, save_model_file
from icnn_compress.config import load_recipe
from icnn_compress.data.generate import generate_parts_dataset
from icnn_compress.train import pretrain

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"
BUILDER = "icnn_test_builder:build"  # the user_builder fixture's module; no installed package registers it


def require_system_package(present: bool, package: str, why: str) -> None:
    """Stop a test that needs Debian's ``package``: fail under CI (``CI=true``, where ``make test`` installed
    it, so its absence is a broken set-up), skip elsewhere; both say the one command that installs it."""
    if present:
        return
    message = f"{why} needs Debian's {package}: `sudo apt-get install {package}` (`make test` installs it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def user_builder(tmp_path, monkeypatch) -> Path:
    """Put the module of :data:`BUILDER` on sys.path (``build``: the quickstart's small CNN); return the file that
    importing it writes. It is dropped from sys.modules at both ends, so the file shows every import in the test."""
    module = BUILDER.partition(":")[0]
    folder = tmp_path / "user_code"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / f"{module}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                         "from icnn_compress.zoo import small_cnn as build\n")
    monkeypatch.syspath_prepend(folder)
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield marker
    sys.modules.pop(module, None)


@contextmanager
def interrupted_at_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int = 2) -> Iterator[None]:
    """Within the block, ``owner.name`` raises KeyboardInterrupt (a Ctrl-C) on its ``call``-th call, and the
    block must end in that interrupt: a run stopped for real midway, to test what it leaves and how it resumes."""
    real, calls = getattr(owner, name), []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, name, stop)
        with pytest.raises(KeyboardInterrupt):
            yield


def name_builder(model_file: Path, arch: str, out: Path) -> Path:
    """Write ``model_file`` to ``out/model.pt`` with its architecture record naming the builder ``arch``; return
    ``out``, a run as it may arrive from elsewhere."""
    saved = load_model_file(model_file)
    reserved = ("format", "state_dict", "architecture", "classes")
    save_model_file(out / "model.pt", state_dict=saved["state_dict"],
                    architecture={**saved["architecture"], "arch": arch}, classes=saved["classes"],
                    extra={k: v for k, v in saved.items() if k not in reserved})
    return out


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
