"""Run directories: a run resumes only itself, and one writer at a time.

Each run directory (an expert's training, the demo, a composition or sequential evaluation) holds `run.json`: the
run's key, i.e. what its result depends on (the edits, the base model, the settings that change the outcome). A later
run in the same directory with another key is refused with one line naming what differs. `run.lock` holds the PID of
the process writing there; a second writer is refused while that process lives.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from t2edit.files import atomic_write_json

KEY_NAME = "run.json"
LOCK_NAME = "run.lock"


class RunConflictError(ValueError):
    """A directory holds another run, or another process is writing there."""


def digest(values) -> str:
    """A short, stable fingerprint of JSON-able values (e.g. the edits' prompts and targets)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def edits_digest(records) -> str:
    """The fingerprint of a set of edits in order: their prompts and new targets."""
    return digest([(r.prompt, list(r.target_new)) for r in records])


def check_run_key(directory: str | Path, key: dict, what: str = "run") -> None:
    """Write `key` to directory/run.json, or refuse (RunConflictError) if the directory holds a run with another
    key. The message names each setting that differs."""
    directory = Path(directory)
    path = directory / KEY_NAME
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            raise RunConflictError(f"{path} is damaged; remove the directory {directory} or choose another output "
                                   f"directory")
        differ = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        if differ:
            shown = ", ".join(f"{k} {stored.get(k)!r} → {key.get(k)!r}" for k in differ[:4])
            raise RunConflictError(f"{directory} holds a {what} with other settings ({shown}"
                                   f"{' ...' if len(differ) > 4 else ''}); choose another output directory, or "
                                   f"remove this one to start over")
        return
    atomic_write_json(path, key)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[None]:
    """Hold directory/run.lock for the block: a second process writing to the same directory is refused with the
    first one's PID; a lock left by a process that died is taken over."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder == os.getpid():  # this process holds it already (an outer block): nothing to take
                yield
                return
            if holder and _alive(holder):
                raise RunConflictError(f"{directory} is in use by process {holder} (its {LOCK_NAME}); wait for it to "
                                       f"finish or choose another output directory") from None
            path.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


__all__ = ["KEY_NAME", "LOCK_NAME", "RunConflictError", "check_run_key", "digest", "edits_digest", "run_lock"]
