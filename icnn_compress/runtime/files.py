"""Atomic files: saves, text, JSON lines, hashes; reading a torch file safely; a file as a data URI.

Everything written here replaces its target only once complete (readers see the old file or the new one),
and everything torch saves loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from icnn_compress.errors import CheckpointError

__all__ = [
    "append_jsonl",
    "atomic_open",
    "atomic_path",
    "atomic_save",
    "atomic_write_text",
    "data_uri",
    "load_torch_file",
    "sha256_file",
    "trim_jsonl",
]
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
def atomic_open(path: Path, mode: str) -> Iterator[IO[Any]]:
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
    with atomic_open(Path(path), "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(Path(path), "w") as f:
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


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file is a CheckpointError
    naming ``what`` ("model file", "checkpoint")."""
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


def data_uri(path: Path) -> str:
    """The image file as a ``data:`` URI, so that a page embeds it and fetches nothing."""
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
