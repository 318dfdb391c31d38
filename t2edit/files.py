"""Files t2edit writes: one atomic write and one cache directory for the whole package.

A write goes to a temporary file in the target's directory and is renamed over the target, so a run killed
mid-write leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/ (editable install)


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping (safe_load), or one clear error naming the file and the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; see configs/ for examples (t2edit reads its own "
                                f"settings from the repository's configs/: install it with pip install -e .)")
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not valid YAML ({str(error).splitlines()[0]}); fix the line "
                         f"it names") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings (key: value), not a "
                         f"{type(value).__name__}")
    return value


def cache_dir(*parts: str) -> Path:
    """t2edit's cache (dequantized models, SVD factors, fact worlds): `$T2EDIT_CACHE`, else ~/.cache/t2edit."""
    return Path(os.environ.get("T2EDIT_CACHE", Path.home() / ".cache" / "t2edit"), *parts)


class WriteError(RuntimeError):
    """A file could not be written (e.g. the disk is full); nothing half-written is left behind."""


LOW_SPACE_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without error,
    removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        # A full disk surfaces as OSError(ENOSPC) from Python, or as a RuntimeError from torch's C++ writer.
        if isinstance(error, (OSError, RuntimeError)) and _free_bytes(path.parent) < LOW_SPACE_BYTES:
            raise WriteError(f"no space left on the device to write {path}; free some space or choose another "
                             f"output directory") from None
        raise


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return LOW_SPACE_BYTES


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write bytes, text (UTF-8) or, given a callable, whatever it writes to the path it is handed
    (`lambda p: save_file(tensors, str(p))`), atomically."""
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


__all__ = ["CONFIGS_DIR", "WriteError", "read_yaml", "atomic_path", "atomic_write", "atomic_write_json", "cache_dir"]
