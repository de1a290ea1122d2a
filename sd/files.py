"""Atomic writes: a file or folder appears complete under its name, or not at all.

Write to NAME.tmp beside the target, fsync it, rename it onto the target (os.replace is atomic on
one file system) and fsync the folder, where the rename itself lives (fsync(2)).
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def unwritable(path: Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or a folder), as a line to print; None if it can."""
    if path.is_dir() and not folder:
        return f"{path} is a folder; give a file name"
    if path.exists() and not path.is_dir() and folder:
        return f"{path} is a file; give a folder"
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created; pick another path"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable; pick another path"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # O_RDONLY works for folders too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:  # Ctrl-C too: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """The same for a folder: yield an empty NAME.tmp/ to fill; on success it replaces `path`."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in [*files, "."]:
                _fsync(Path(folder, name))
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():  # a folder cannot replace a non-empty one: swap, then delete
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
