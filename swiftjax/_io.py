"""Atomic file writes (nothing half-written is ever left at the destination) and the disk-space
check made before writing something large."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", suffix: str = ".tmp", **open_kw):
    """``with atomic_file(p, "wb") as f: ...`` writes a temp file beside ``p`` and renames it
    over ``p`` only when the block succeeds (fsync'd first); on any error the temp file is
    removed and an existing ``p`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() honours the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in chunks (memory: one chunk)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dir_bytes(path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    path = Path(path)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_free_space(directory, need: int, what: str) -> None:
    """Raise ValueError when the file system of ``directory`` (or its nearest existing parent)
    has fewer than ``need`` bytes free: a store of tens of GB refused before the forward that
    would fill it, not when the disk is full hours later."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    free = shutil.disk_usage(d).free
    if need > free:
        raise ValueError(f"{what}: expected {need / 1e9:.2f} GB free under {directory}, "
                         f"{free / 1e9:.2f} GB free")

