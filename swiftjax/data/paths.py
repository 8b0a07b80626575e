"""Where the real data lives: ``../shared/data`` beside the repo, or ``$SWIFTJAX_DATA``."""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    """The shared data folder, or None when it is absent (tests then skip)."""
    env = os.environ.get("SWIFTJAX_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None
