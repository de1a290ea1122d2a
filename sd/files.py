"""Atomic writes: a file appears complete under its name, or not at all (train/checkpoints.py
has the folder variant).

Write to a temporary file of its own beside the target (.NAME.RANDOM.tmp, 64 random bits:
writers of the same name at once never share one), give it the mode the user's umask gives new
files (safetensors creates 0600), fsync it, rename it onto the target (os.replace is atomic on one
file system; the last complete write wins) and fsync the folder, where the rename itself lives
(fsync(2)).
"""

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask_mode(folder: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def unwritable(path: Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or a folder), as a line to print; None if it can."""
    if path.is_dir() and not folder:
        return f"{path} is a folder; give a file name"
    if path.exists() and not path.is_dir() and folder:
        return f"{path} is a file; give a folder"
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created; pick another path"
    try:  # what the file system says, not os.access (root may write where nothing can be made)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        return f"{parent} is not writable ({e.strerror}); pick another path"
    return None


def fsync(path: Path) -> None:
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
    # Named before it is made, made inside the try: Ctrl-C at any point leaves nothing behind.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        tmp.touch(mode=0o600, exist_ok=False)
        yield tmp
        os.chmod(tmp, umask_mode())
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:  # Ctrl-C too: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise
