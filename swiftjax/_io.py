"""Atomic file writes: nothing half-written is ever left at the destination."""
from __future__ import annotations

import contextlib
import hashlib
import os
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
