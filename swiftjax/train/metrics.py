"""Metric writers: one JSON object a line (jsonl), read back with ``read_jsonl``.

Only the main process writes (``is_main_process``); on other hosts the writers are silent
no-ops, so multi-host scripts can call them unconditionally. Values may be Python numbers,
NumPy or JAX scalars; arrays of one element become floats, other arrays lists.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from swiftjax.train.distributed import is_main_process


def to_python(value: Any) -> Any:
    """A JSON-ready copy of ``value``: scalars to float/int/bool, arrays to (nested) lists."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, (str, bool, type(None))):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    arr = np.asarray(value)
    if arr.dtype == bool:
        return arr.tolist() if arr.ndim else bool(arr)
    if arr.size == 1:
        return to_python(arr.reshape(()).item())
    return to_python(arr.tolist())


class MetricsWriter(Protocol):
    def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """Appends ``{"step": step, **metrics}`` lines to ``path`` (flushed each write).

    ``process_index`` (default ``jax.process_index()``) decides whether this process writes:
    only process 0 does. Appending lets a resumed run continue the same file.
    """

    def __init__(self, path: str | os.PathLike, *, process_index: int | None = None):
        self.path = Path(path)
        self.active = is_main_process(process_index)
        self._fh = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        record = {"step": int(step), **to_python(dict(metrics))}
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EvalLogWriter:
    """One line per evaluation through ``log`` (``print`` by default): what a long run without a
    progress bar (a log file of a background job) shows of its progress. Train metrics are
    left out; only the main process logs."""

    def __init__(self, log=print, prefix: str = "", *, process_index: int | None = None):
        self.log, self.prefix = log, prefix
        self.active = is_main_process(process_index)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        m = to_python(dict(metrics))
        if not self.active or m.pop("split", None) != "eval":
            return
        vals = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
        self.log(f"{self.prefix}step {int(step)}: {vals}")

    def close(self) -> None:
        pass


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a jsonl metrics file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
