"""Input validation shared by every public entry point.

Public functions call these before tracing so that a bad shape or dtype raises a
``ValueError`` that names the argument, what was expected and what came, instead
of an XLA error deep inside a jitted function.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_rank(x, name: str, rank: int, dims: str = "") -> None:
    """Raise unless ``x`` has exactly ``rank`` axes; ``dims`` names them, e.g. '[B, T]'."""
    shape = _shape(x)
    if len(shape) != rank:
        want = dims or f"{rank} axes"
        raise ValueError(f"{name}: expected shape {want} ({rank}-D), got shape {shape}")


def check_int(x, name: str) -> None:
    """Raise unless ``x`` holds integers (token ids, indices)."""
    dt = _dtype(x)
    if not np.issubdtype(dt, np.integer):
        raise ValueError(f"{name}: expected an integer array (token ids), got dtype {dt}")


def check_float(x, name: str) -> None:
    dt = _dtype(x)
    if not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {dt}")


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if _shape(a) != _shape(b):
        raise ValueError(
            f"{name_b}: expected the same shape as {name_a} {_shape(a)}, got {_shape(b)}"
        )


def check_leading(x, name: str, leading: Sequence[int], dims: str) -> None:
    """Raise unless the first axes of ``x`` equal ``leading``."""
    shape = _shape(x)
    if tuple(shape[: len(leading)]) != tuple(leading):
        raise ValueError(f"{name}: expected leading shape {dims}={tuple(leading)}, got {shape}")


def check_finite(x, name: str) -> None:
    """Raise if a concrete (non-traced) array holds NaN or inf."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except Exception:  # traced values cannot be checked eagerly
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def concrete(x):
    """``x`` as a numpy array, or None when it is a tracer (inside jit)."""
    try:
        return np.asarray(x)
    except Exception:  # tracer
        return None


def check_scalar(x, name: str, positive: bool = False, nonneg: bool = False) -> None:
    """Raise unless ``x`` is a scalar; when concrete, also unless finite (and > 0 / >= 0)."""
    if np.ndim(x) != 0:
        raise ValueError(f"{name}: expected a scalar, got shape {np.shape(x)}")
    v = concrete(x)
    if v is None:
        return
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name}: expected a positive number, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name}: expected a non-negative number, got {v}")


def check_vector(x, name: str, B: int | None = None) -> int:
    """A finite float [B] array (sequence log-probs, rewards); returns B."""
    check_rank(x, name, 1, "[B]")
    check_float(x, name)
    check_finite(x, name)
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name}: expected shape [B]=({B},), got {tuple(x.shape)}")
    return int(x.shape[0])
