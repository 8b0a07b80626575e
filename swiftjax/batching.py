"""Fixed-shape batching: every jitted function sees one batch shape, so one compilation
serves any number of rows.

* :func:`padded_batches` cuts ``n`` rows into ``ceil(n / B)`` index vectors of length ``B``;
  the last one is padded with ``-1`` (a row computed on a copy of the batch's last real row
  and thrown away; rows never see each other, so padding changes no real row's output).
  :func:`take` gathers those rows from an array and :func:`map_batches` runs a function over
  every batch and keeps the real rows' outputs.
* :func:`epoch_batches` is the training side: a fresh seeded permutation per epoch, so a
  resumed run sees the same data order.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["padded_batches", "take", "map_batches", "epoch_batches", "check_batch_size"]


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return int(batch_size)


def padded_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index vectors [batch_size] covering rows 0..n-1 in order; -1 pads the last one."""
    batch_size = check_batch_size(batch_size)
    for s in range(0, n, batch_size):
        rows = np.arange(s, s + batch_size)
        yield np.where(rows < n, rows, -1)


def take(arr, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` with padding rows (-1) reading the batch's last real row."""
    rows = np.asarray(rows)
    real = rows[rows >= 0]
    return np.asarray(arr)[np.where(rows >= 0, rows, real.max() if real.size else 0)]


def map_batches(fn: Callable[..., Sequence], arrays: Sequence, batch_size: int, *,
                progress: Callable[[Iterator, int], Iterator] | None = None) -> list[np.ndarray]:
    """Run ``fn(*batch_arrays) -> tuple of [B, ...] outputs`` over fixed-shape batches of
    ``arrays`` (each [N, ...]); returns the outputs stacked over the N real rows."""
    n = len(arrays[0])
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"map_batches: expected every array to have {n} rows, got {len(a)}")
    it = padded_batches(n, batch_size)
    if progress is not None:
        it = progress(it, -(-n // batch_size))
    outs: list[list[np.ndarray]] | None = None
    for rows in it:
        res = fn(*(jnp.asarray(take(a, rows)) for a in arrays))
        res = res if isinstance(res, (tuple, list)) else (res,)
        keep = rows >= 0
        if outs is None:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(np.asarray(r)[keep])
    if outs is None:
        return []
    return [np.concatenate(o) for o in outs]


def epoch_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, *, shuffle: bool = True,
                  drop_last: bool = True):
    """``epoch -> iterator of dict batches``: a fresh permutation per epoch from (seed, epoch),
    so a resumed run sees the same data order."""
    n = len(next(iter(arrays.values())))
    for k, v in arrays.items():
        if len(v) != n:
            raise ValueError(f"epoch_batches: array {k!r} has {len(v)} rows, expected {n}")
    if n < batch_size and drop_last:
        raise ValueError(f"epoch_batches: expected at least batch_size={batch_size} rows, got {n}")

    def batches(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s: s + batch_size]
            yield {k: jnp.asarray(v[idx]) for k, v in arrays.items()}

    batches.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    return batches
