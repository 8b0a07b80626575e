"""Fixed-shape batching: every jitted function sees one batch shape, so one compilation
serves any number of rows.

* :func:`padded_batches` cuts ``n`` rows into ``ceil(n / B)`` index vectors of length ``B``;
  the last one is padded with ``-1`` (a row computed on a copy of the batch's last real row
  and thrown away; rows never see each other, so padding changes no real row's output).
  :func:`take` gathers those rows from an array and :func:`map_batches` runs a function over
  every batch and keeps the real rows' outputs.
* :func:`length_batches` is the teacher-forced side: rows grouped by length and each batch cut
  to the columns its rows use (width rounded up to a bucket), so a set of short responses in
  a wide padded array is not computed at full width; a few shapes compile instead of one.
* :func:`prompt_batches` is the teacher-forced side for candidate sets, whose rows are runs of
  responses to one prompt: each batch is one prompt (prefilled once) and up to ``B`` of its
  responses, cut to the columns they use.
* :func:`epoch_batches` is the training side: a fresh seeded permutation per epoch, so a
  resumed run sees the same data order.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["padded_batches", "length_batches", "prompt_batches", "PromptBatch", "take", "map_batches",
           "epoch_batches", "check_batch_size", "round_up"]


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return int(batch_size)


def round_up(width: int, bucket: int | None, cap: int) -> int:
    """``width`` rounded up to a multiple of ``bucket`` (None: ``cap``), at least 1, at most ``cap``."""
    if bucket is None:
        return int(cap)
    return int(min(cap, max(1, -(-int(width) // bucket) * bucket)))


def padded_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index vectors [batch_size] covering rows 0..n-1 in order; -1 pads the last one."""
    batch_size = check_batch_size(batch_size)
    for s in range(0, n, batch_size):
        rows = np.arange(s, s + batch_size)
        yield np.where(rows < n, rows, -1)


def row_spans(attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) [N] int: row i's real tokens lie in columns [first[i], end[i]) (both 0 for a
    row without any)."""
    m = np.asarray(attention_mask) != 0
    if m.ndim != 2:
        raise ValueError(f"attention_mask: expected rank 2 [N, T], got shape {m.shape}")
    any_ = m.any(axis=1)
    first = np.where(any_, m.argmax(axis=1), 0)
    end = np.where(any_, m.shape[1] - m[:, ::-1].argmax(axis=1), 0)
    return first, end


def length_batches(attention_mask, batch_size: int, *, bucket: int | None = 64,
                   window: int | None = None) -> list[tuple[np.ndarray, int, int]]:
    """Batches of rows of similar length, each cut to the columns its rows use.

    attention_mask: [N, T] (nonzero = real token; left, right or no padding). Rows are taken in
    windows of ``window`` consecutive rows (None: all N; else a positive multiple of
    ``batch_size``), sorted inside a window by their span of real tokens (stable), and cut into
    index vectors of ``batch_size`` (``-1`` pads a window's last one, as :func:`padded_batches`).
    Returns ``[(rows [batch_size], start, width)]``: every real token of the batch's rows lies in
    columns ``[start, start + width)``; ``width`` is the batch's span rounded up to a multiple
    of ``bucket`` and capped at T, so at most ``ceil(T / bucket)`` widths occur (``bucket``
    None: every batch is ``(rows, 0, T)``, one shape). A consumer that needs the rows in order
    (a feature store) reorders one window at a time; positions come from the mask, so dropping
    columns without real tokens changes no row's output.
    """
    batch_size = check_batch_size(batch_size)
    first, end = row_spans(attention_mask)
    n, t = np.shape(attention_mask)
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1):
        raise ValueError(f"bucket: expected a positive int or None, got {bucket!r}")
    if window is None:
        window = max(n, 1)  # one window: the whole set
    elif isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % batch_size:
        raise ValueError(f"window: expected a positive multiple of batch_size={batch_size} or None, got {window!r}")
    out = []
    for w0 in range(0, n, window):
        idx = np.arange(w0, min(w0 + window, n))
        if bucket is not None:
            idx = idx[np.argsort(end[idx] - first[idx], kind="stable")]
        for s in range(0, len(idx), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            rows[: len(idx[s: s + batch_size])] = idx[s: s + batch_size]
            if bucket is None:
                out.append((rows, 0, t))
                continue
            real = rows[rows >= 0]
            real = real[end[real] > first[real]]  # rows without tokens need no columns
            lo, hi = (int(first[real].min()), int(end[real].max())) if real.size else (0, 0)
            width = round_up(hi - lo, bucket, t)
            out.append((rows, min(lo, t - width), width))
    return out


class PromptBatch(NamedTuple):
    """One batch of :func:`prompt_batches`: ``rows`` [batch_size] (-1 pads) share the prompt of
    row ``prompt_row`` (its real tokens before its response); each row's response, at most
    ``width`` tokens, is computed in a [batch_size, width] block starting at column 0."""

    rows: np.ndarray
    prompt_row: int
    width: int


def prompt_batches(input_ids, attention_mask, response_mask, batch_size: int, *,
                   bucket: int | None = 64) -> tuple[int, list[PromptBatch]] | None:
    """Batches that share a prompt: ``(prompt_width, [PromptBatch])``, or None when the rows do
    not have that shape.

    Rows qualify when every row's response (its ``response_mask`` tokens) is the non-empty
    tail of its real tokens and consecutive rows often repeat a prompt (the same ids before
    the response; runs of at least two on average): a candidate set in group order. Each run is
    sorted by response length and cut into batches of ``batch_size`` rows; a batch's width is
    its longest response rounded up to ``bucket`` (None: the longest response of the set), and
    ``prompt_width`` is the longest prompt rounded up the same way, so few shapes compile.
    Batches come in row order of their runs."""
    batch_size = check_batch_size(batch_size)
    ids = np.asarray(input_ids)
    attn = np.asarray(attention_mask) != 0
    resp = np.asarray(response_mask) != 0
    n, t = attn.shape
    if n == 0:
        return None
    first, end = row_spans(attn)
    r_first, r_end = row_spans(resp)
    r_len = r_end - r_first
    if np.any(r_len < 1) or np.any(r_end != end) or np.any(r_first <= first):
        return None
    if any(not resp[i, r_first[i]:r_end[i]].all() or not attn[i, first[i]:end[i]].all() for i in range(n)):
        return None
    runs, start = [], 0
    for i in range(1, n + 1):
        same = (i < n and r_first[i] - first[i] == r_first[start] - first[start]
                and np.array_equal(ids[i, first[i]:r_first[i]], ids[start, first[start]:r_first[start]]))
        if not same:
            runs.append(np.arange(start, i))
            start = i
    if n / len(runs) < 2:
        return None
    prompt_width = int((r_first - first).max())
    prompt_width = round_up(prompt_width, bucket, t) if bucket is not None else prompt_width
    longest = int(r_len.max())
    out = []
    for run in runs:
        head = int(run[0])
        run = run[np.argsort(r_len[run], kind="stable")]
        for s in range(0, len(run), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            real = run[s: s + batch_size]
            rows[: real.size] = real
            width = round_up(int(r_len[real].max()), bucket, t) if bucket is not None else longest
            out.append(PromptBatch(rows, head, width))
    return prompt_width, out


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
