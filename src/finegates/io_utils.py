"""Atomic writes: a file on disk is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename the temporary file onto `path` (flushed to disk first, with the
    permissions a plain new file gets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_new_folder(path: str | Path, overwrite: bool = False, hint: str = "") -> None:
    """Refuse a file at `path`, and a non-empty folder unless `overwrite`; a writer calls it before its long
    work too, so a refusal comes first. `hint` ends the message (e.g. the option that replaces)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; give a new or empty folder{hint}.")


def write_folder(path: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `fill(tmp_folder)`, then rename the folder onto `path`: on disk there is the old folder or the
    complete new one, never a mix. A non-empty folder at `path` is replaced only with `overwrite`."""
    path = Path(path)
    check_new_folder(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)  # the old folder back where it was
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def cache_dir() -> Path:
    """Where converted models and fetched corpora are kept: $FINEGATES_CACHE, else ~/.cache/finegates."""
    root = (
        os.environ.get("FINEGATES_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finegates"
    )
    return Path(root)
