"""One rule for every command that writes a run folder: one writer at a time, never over another run's files.

Two commands into one ``--out`` used to make a hybrid run (interleaved ``metrics.jsonl``, whichever
``model.pt`` wrote last), and a fresh run appended to a leftover ``metrics.jsonl``. Now the writer holds
``.icnn.lock`` (an exclusive file naming its pid and host) for as long as it writes; a lock left by a process
that is gone is taken over with a warning. A folder holding another run's files is refused unless the command
resumes exactly that run or ``--force`` replaces it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from icnn_compress.errors import RunFolderError

__all__ = ["LOCK_FILE", "RUN_INPUTS", "check_output", "check_same_run", "claim_folder", "locked"]

log = logging.getLogger(__name__)

LOCK_FILE = ".icnn.lock"
# The files of a run folder that later commands read: an output must never replace one of them.
RUN_INPUTS = ("model.pt", "last.pt", "model.pth", "recipe.toml", "metrics.jsonl", "pruning.json", "history.json")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as the lock of a process that is gone


def _take(lock: Path, command: str) -> bool:
    """Create ``lock`` exclusively with this process's pid; False when it already exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": command}, f)
    return True


@contextmanager
def locked(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold ``folder``'s lock while the block runs (the folder is created, and removed again if the block
    left it empty); yield the folder.

    Raises:
        RunFolderError: another live process on this host holds the lock, or the folder cannot be written.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {folder}: {exc.strerror or exc}") from None
    lock = folder / LOCK_FILE
    if _owner(lock).get("pid") == os.getpid():  # held by this process already (prune's recovery fine-tune)
        yield folder
        return
    for _ in range(2):  # a second try after removing a dead process's lock
        try:
            if _take(lock, command):
                break
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise RunFolderError(f"cannot write to the run folder {folder}: {exc.strerror}") from None
            raise
        owner = _owner(lock)
        pid, host = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and _alive(pid):
            raise RunFolderError(f"{folder} is in use by process {pid} ({owner.get('command', '?')}); wait for it "
                                 f"to finish or choose another --out")
        if host not in (None, socket.gethostname()):
            raise RunFolderError(f"{folder} is locked by process {pid} on host {host}; if that run is gone, "
                                 f"remove {lock}")
        log.warning("%s: taking over the lock of process %s, which is gone (%s)", folder, pid,
                    owner.get("command", "unreadable lock"))
        lock.unlink(missing_ok=True)
    else:
        raise RunFolderError(f"{folder}: another process took the lock at the same moment; try again")
    try:
        yield folder
    finally:
        if _owner(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):  # refused before writing anything: leave no empty folder
            folder.rmdir()


def claim_folder(folder: str | Path, files: Sequence[str], *, resume: bool, force: bool, what: str) -> None:
    """Refuse ``folder`` when it holds any of ``files`` (another run's) unless ``resume``; ``force`` removes them.

    ``resume`` means the caller continues the run those files belong to (and checks it is the same run).
    """
    folder = Path(folder)
    present = [name for name in files if (folder / name).exists()]
    if not present or resume:
        return
    if not force:
        raise RunFolderError(f"{folder} already holds a {what} ({', '.join(present)}); pass --resume to continue "
                             "it, --force to replace it, or choose another --out")
    log.warning("--force: removing %s from %s", ", ".join(present), folder)
    for name in present:
        (folder / name).unlink()


def check_same_run(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], folder: str | Path, *,
                   force: bool = False) -> None:
    """Refuse ``--resume`` when the run's recorded settings (arm, data, schedule) differ from this command's;
    with ``force``, continue with the new settings and say which changed (e.g. a lower lr after a divergence)."""
    if recorded is None:  # written before runs recorded their settings: nothing to compare
        return
    differ = [f"{key}: {recorded.get(key)!r} in the run, {value!r} now" for key, value in current.items()
              if recorded.get(key) != value]
    if differ and force:
        log.warning("--resume --force: %s continues with other settings (%s)", folder, "; ".join(differ))
    elif differ:
        raise RunFolderError(f"--resume: {folder} is another run than this command asks for ({'; '.join(differ)}); "
                             "resume it with its own settings, add --force to continue it with these, or choose "
                             "another --out")


def check_output(path: str | Path, *, folder: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Check, before any work, that ``path`` (a file, or a folder when ``folder``) can be written, and that it
    is not one of ``inputs`` nor a run's own file (:data:`RUN_INPUTS`, e.g. ``evaluate --json RUN/model.pt``).
    Creates nothing: the folder the path would be made in is probed with a temporary file.

    Commands used to fail here only after all their work (a path under a file, a read-only folder).

    Raises:
        RunFolderError: what is wrong with the path, in one line.
    """
    path = Path(path)
    target = path.resolve()
    if any(target == Path(i).resolve() for i in inputs) or (
            not folder and path.name in RUN_INPUTS and path.exists()):
        raise RunFolderError(f"the output {path} is one of this command's inputs or a run's own file; choose "
                             "another path")
    where = path if folder else path.parent
    existing = next(p for p in (where, *where.parents) if p.exists())  # nothing is created here
    if not existing.is_dir():
        raise RunFolderError(f"cannot write {path}: {existing} is a file, not a folder")
    probe = existing / f".icnn-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"cannot write to {existing}: {exc.strerror or exc}") from None
    return path
