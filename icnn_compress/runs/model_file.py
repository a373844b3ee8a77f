"""The model-file format (``model.pt``) and the files of a run directory.

A model file is a plain dict {"format", "state_dict", "architecture", "classes", **extra}: it loads with
``torch.load(weights_only=True)``, and its architecture record rebuilds the model
(:func:`icnn_compress.models.surgery.build_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from icnn_compress.errors import CheckpointError
from icnn_compress.runtime.files import atomic_save, load_torch_file

__all__ = ["MODEL_FILE_FORMAT", "RESERVED_KEYS", "RunDir", "load_model_file", "save_model_file"]

MODEL_FILE_FORMAT = "icnn-compress/1"
# The keys every model file holds; ``extra`` may not reuse them.
RESERVED_KEYS = ("format", "state_dict", "architecture", "classes")


@dataclass(frozen=True)
class RunDir:
    """The files of one run: the final model, the resumable last state, metrics and the recipe."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def last_path(self) -> Path:
        return self.path / "last.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.toml"

    def ensure(self) -> RunDir:
        """Create the folder (and parents) when missing; return self."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self


_PLAIN = (str, int, float, bool, type(None), Tensor)


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is made of what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is not a str/int, so weights_only loading would fail")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; model files hold only dicts, lists, str, numbers and tensors "
        "so that they load with weights_only=True"
    )


def save_model_file(
    path: str | Path,
    *,
    state_dict: Mapping[str, Tensor],
    architecture: Mapping[str, Any],
    classes: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write an icnn-compress model file {"format", "state_dict", "architecture", "classes", **extra}.

    Args:
        state_dict: the model's weights (moved to the CPU).
        architecture: plain data that rebuilds the model (arch, top layer, filter counts...).
        classes: the class names in label order.
        extra: more plain data (metrics, the recipe as a dict); may not reuse the four keys above.
    """
    extra = dict(extra or {})
    clash = sorted(set(RESERVED_KEYS) & set(extra))
    if clash:
        raise ValueError(f"extra may not set the reserved keys {clash}")
    payload: dict[str, Any] = {
        "format": MODEL_FILE_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "architecture": dict(architecture),
        "classes": list(classes),
        **extra,
    }
    _check_plain(payload, "model file")
    atomic_save(payload, path)


def load_model_file(path: str | Path) -> dict[str, Any]:
    """Return the dict of an icnn-compress model file written by :func:`save_model_file` (tensors on CPU)."""
    path = Path(path)
    obj = load_torch_file(path, "model file")
    if not isinstance(obj, dict) or "architecture" not in obj or "state_dict" not in obj:
        missing = "architecture" if not isinstance(obj, dict) or "architecture" not in obj else "state_dict"
        raise CheckpointError(
            f"{path} is not an icnn-compress model file (missing {missing!r}); "
            "did you mean to pass it as model.checkpoint?"
        )
    if obj.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(
            f"{path} has model file format {obj.get('format')!r}, but this icnn-compress reads "
            f"{MODEL_FILE_FORMAT!r}; use the icnn-compress version that wrote it"
        )
    return obj
