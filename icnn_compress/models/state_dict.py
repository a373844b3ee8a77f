"""Reading user checkpoints (state dicts, safetensors) and loading them into a model with clear errors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from icnn_compress.errors import CheckpointError
from icnn_compress.runtime.files import load_torch_file

__all__ = ["load_state_dict_checked", "read_state_dict"]

# The wrappers DDP and torch.compile put around a model; their prefixes are not part of the weights.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_STATE_DICT_KEYS = ("state_dict", "model", "model_state")
_MAX_LISTED = 8


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
    obj = _safetensors_load(path) if path.suffix == ".safetensors" else load_torch_file(path, "checkpoint")
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
