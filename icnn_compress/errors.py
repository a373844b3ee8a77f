"""Every exception raised for bad input, in one place: each message says what went wrong and what to do.

``ModelError`` and ``CompareError`` are also ``ValueError``s (they reject an argument); the others are not."""

from __future__ import annotations

class ICNNError(Exception):
    """Base class of every error this package raises on purpose; the CLI prints it without a traceback."""


class DatasetError(ICNNError):
    """A dataset folder, annotation file or image that cannot be read."""


class RecipeError(ICNNError):
    """A recipe (TOML) or a --set override that does not match the config dataclasses."""


class CheckpointError(ICNNError):
    """A checkpoint that is missing, unreadable or made for another architecture."""


class UntrustedCodeError(CheckpointError):
    """A model file names a ``module:builder`` to import that neither ``--trust-code`` nor an entry point allows."""


class TrainingError(ICNNError):
    """Training stopped on purpose: a NaN loss, a collapsed model, an interrupted resume."""


class RunFolderError(ICNNError):
    """A run folder in use by another process, holding another run's files, or not writable."""


class ModelError(ICNNError, ValueError):
    """A model that cannot be built or made interpretable as asked (unknown architecture, layer, head)."""


class PruningError(ICNNError):
    """Pruning cannot proceed as asked (missing analysis, an unreachable MACs target, a foreign history)."""


class CompareError(ICNNError, ValueError):
    """A comparison that cannot run as asked (unknown explainer, layer, setting or mismatched runs)."""


class ExportError(ICNNError):
    """The model could not be exported, checked or quantised."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance (int8: agree too rarely)."""


class VerifyError(ExportError):
    """An ONNX file that is not the one its parity.json passed: missing, changed since, or never passed."""


def user_message(exc: ICNNError) -> str:
    """The message of ``exc`` for the command line, without the worker traceback that torch's DataLoader puts
    before it when the error was raised in a worker process (some 25 lines that say nothing to a user)."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    _, found, original = text.rpartition(f"{type(exc).__module__}.{type(exc).__qualname__}: ")
    return f"{original.strip()} (raised in a DataLoader worker)" if found else text
