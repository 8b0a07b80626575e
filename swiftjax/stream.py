"""Continuous batching: many rows decoded through a fixed number of slots.

The lock-step loop of :mod:`swiftjax.sampling` decodes a batch until its longest row ends;
with sampled answers of very different lengths, a third or more of its row-steps decode rows
that have already finished (the Best-of-8 GSM8K study: 58-75% of them useful). Here ``slots``
rows are in flight at once: one jitted loop decodes ``segment`` tokens, then, on the host,
finished rows are handed back and the next rows of the queue take their slots. Rows of the
same prompt (Best-of-N) share one prefill.

Cache layout: every slot's row lies contiguously in its cache row and ends at the shared
cursor (the left-padded layout the models read). Before a segment, the columns are rolled so
that the longest row in flight (or the prompt width W) ends at the new cursor, and admitted
rows' prefilled prompts are written to ``[cursor - W, cursor)``; the cache holds
``W + max_new_tokens + segment`` columns.

Each segment runs the one decoding loop (:func:`swiftjax.sampling.decode_loop`) with the
plain :class:`~swiftjax.sampling.LMDecoder`. Random stream: row ``r`` draws its ``t``-th token
with ``fold_in(row_keys[r], t)`` (:func:`swiftjax.sampling.sample_token_rows`), so a row's sample does not depend on the slot
it ran in nor on the rows beside it, up to the float rounding of the batched arithmetic.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.models.cache import KVCache, init_cache
from swiftjax.sampling import (GenerateOutput, LMDecoder, SamplerState, SamplingConfig, _has_end, check_prompt,
                               constrain_cache, decode_loop, init_state)

__all__ = ["stream_generate"]


def _rows_take(mask, new, old):
    """Rows of ``new`` where ``mask`` [B], else ``old`` (any trailing shape)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (old.ndim - 1)), new, old)


@functools.partial(jax.jit, static_argnames=("graphdef", "decoder", "cfg", "segment"), donate_argnames=("s",))
def _segment(params, s: SamplerState, *, graphdef, decoder, cfg: SamplingConfig, segment: int):
    """Decode up to ``segment`` tokens in every live slot (the one loop,
    :func:`swiftjax.sampling.decode_loop`; it stops early when all slots are done)."""
    def models():
        return [nnx.merge(graphdef, params)]

    return decode_loop(models, None, decoder, dataclasses.replace(s, step=jnp.zeros((), jnp.int32)), cfg, segment)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype"))
def _prefill(params, ids, mask, *, graphdef, cache_dtype):
    """Prefill prompts [U, W] into a W-column cache; returns (cache, last logits [U, V])."""
    model = nnx.merge(graphdef, params)
    c = init_cache(model.config, ids.shape[0], ids.shape[1], cache_dtype)
    out = model(ids, mask, cache=constrain_cache(c), last_only=True)
    return out.cache, out.logits[:, -1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("s",))
def _admit(s: SamplerState, shift, cursor, take, src, keys, prompts: KVCache, first_logits, *, cfg: SamplingConfig):
    """Roll every slot's cache columns by ``shift`` (the cursor moves to ``cursor``) and start
    the rows marked by ``take`` [B]: prompt ``src[b]`` of ``prompts`` (a [U, ..., W] prefill),
    placed at columns ``[cursor - W, cursor)``, drawing with ``keys[b]``."""
    (c,) = s.aux
    width, cols = prompts.key_valid.shape[1], c.key_valid.shape[1]

    def place(old, new, axis):
        rolled = jnp.roll(old, shift, axis=axis)
        start = [0] * new.ndim
        start[axis] = cursor - width
        grown = jax.lax.dynamic_update_slice(jnp.zeros(new.shape[:axis] + (cols,) + new.shape[axis + 1:], old.dtype),
                                             new.astype(old.dtype), start)
        return _rows_take(take, grown[src], rolled)

    key_valid = place(c.key_valid, prompts.key_valid, 1) & (jnp.arange(cols) < cursor)[None, :]
    cache = KVCache(k=tuple(place(o, p, 3) for o, p in zip(c.k, prompts.k)),
                    v=tuple(place(o, p, 2) for o, p in zip(c.v, prompts.v)),
                    key_valid=key_valid, cursor=jnp.asarray(cursor, jnp.int32),
                    next_pos=jnp.where(take, prompts.next_pos[src], c.next_pos))
    start = init_state(cfg, first_logits[src], s.aux, s.key, row_keys=keys)   # what an admitted row starts from
    per_row = ("logits", "tokens", "logprobs", "done", "length", "topk", "mean_lp", "row_keys")
    return dataclasses.replace(s, aux=[constrain_cache(cache)],
                               **{f: _rows_take(take, getattr(start, f), getattr(s, f)) for f in per_row})


def _bucket(u: int) -> int:
    """Prefill batches are padded to a power of two (few shapes, few compilations)."""
    return 1 << max(u - 1, 0).bit_length()


def _check_keys(row_keys, rows: int):
    keys = row_keys if isinstance(row_keys, jax.Array) else np.asarray(row_keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(f"row_keys: expected typed jax.random keys (jax.random.key), got dtype {keys.dtype}")
    if keys.shape != (rows,):
        raise ValueError(f"row_keys: expected one key per row, shape ({rows},), got {keys.shape}")
    return keys


def stream_generate(model, input_ids, attention_mask=None, *, row_keys=None, cfg: SamplingConfig, slots: int,
                    segment: int = 32, cache_dtype=jnp.float32,
                    on_finished: Callable[[np.ndarray, GenerateOutput], None] | None = None,
                    stats: dict | None = None) -> GenerateOutput:
    """Sample a continuation of every row of ``input_ids`` [R, W] (left-padded) with ``slots``
    rows in flight (see the module doc). ``row_keys`` [R]: one key per row (required unless
    greedy); identical prompt rows are prefilled once.

    ``on_finished(rows, out)``: called after each segment with the indices of the rows that
    ended in it (in no particular order) and the output filled so far (NumPy arrays: rows not
    yet finished hold padding). ``stats``: a dict filled with ``steps`` (decode steps of the
    slots), ``slots``, ``segments``, ``prefill_rows`` (prompts prefilled, padding included) and
    ``live_fraction`` (generated tokens / (steps x slots)). Returns the
    :class:`GenerateOutput` of all rows as NumPy arrays.
    """
    if not isinstance(cfg, SamplingConfig):
        raise ValueError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    for name, v in (("slots", slots), ("segment", segment)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    ids, mask = check_prompt(input_ids, attention_mask, "input_ids", int(model.config.vocab_size))
    ids, mask = np.asarray(ids), np.asarray(mask)
    r, w = ids.shape
    n, k = cfg.max_new_tokens, cfg.record_topk
    if model.config.is_gpt2 and w + n > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens: expected <= {model.config.max_position_embeddings} positions "
                         f"for gpt2")
    if row_keys is None:
        if cfg.temperature != 0:
            raise ValueError("stream_generate: row_keys are required when temperature > 0")
        row_keys = jax.random.split(jax.random.key(0), max(r, 1))[:r]  # unused by greedy decoding
    keys = _check_keys(row_keys, r)
    b = int(min(slots, r)) if r else 1
    graphdef, params = nnx.split(model)
    decoder = LMDecoder(cache_dtype=cache_dtype)
    vocab = int(model.config.vocab_size)
    s = init_state(cfg, jnp.zeros((b, vocab), jnp.float32),
                   [constrain_cache(init_cache(model.config, b, w + n + segment, cache_dtype))], jax.random.key(0),
                   done=jnp.ones((b,), bool), row_keys=jax.random.split(jax.random.key(0), b))  # all slots empty
    out = GenerateOutput(tokens=np.full((r, n), cfg.pad_id, np.int32), logprobs=np.zeros((r, n), np.float32),
                         lengths=np.zeros((r,), np.int32), finished=np.zeros((r,), bool),
                         topk_logprobs=np.zeros((r, n, k), np.float32) if k else None,
                         mean_logprob=np.zeros((r, n), np.float32) if k else None)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
    sig = [ids[i].tobytes() + mask[i].tobytes() for i in range(r)]
    first_row = {}
    for i, x in enumerate(sig):
        first_row.setdefault(x, i)
    held: dict[bytes, tuple] = {}   # prefilled prompts queued rows still need: (cache [1, ...], logits [1, V])
    queue = deque(range(r))
    slot_row = np.full(b, -1)
    cursor = 0
    count = {"steps": 0, "segments": 0, "prefill_rows": 0}
    while queue or (slot_row >= 0).any():
        free = np.nonzero(slot_row < 0)[0][: len(queue)]
        take = np.zeros(b, bool)
        take[free] = True
        src = np.zeros(b, np.int32)
        key_rows = np.zeros(b, np.int64)   # which row's key each admitted slot draws with
        if free.size:
            new_rows = [queue.popleft() for _ in free]
            need = list(dict.fromkeys(sig[i] for i in new_rows))
            fresh = [x for x in need if x not in held]
            if fresh:
                first = [first_row[x] for x in fresh]
                pad = first + [first[0]] * (_bucket(len(first)) - len(first))
                count["prefill_rows"] += len(pad)
                pc, pl = jax.device_get(_prefill(params, jnp.asarray(ids[pad]), jnp.asarray(mask[pad]),
                                                 graphdef=graphdef, cache_dtype=cache_dtype))
                for j, x in enumerate(fresh):
                    held[x] = (jax.tree.map(lambda a: a[j:j + 1] if np.ndim(a) else a, pc), pl[j:j + 1])
            stack = [held[x] for x in need] + [held[need[0]]] * (_bucket(len(need)) - len(need))
            prompts = jax.tree.map(lambda *a: np.concatenate(a) if np.ndim(a[0]) else a[0], *[c for c, _ in stack])
            first_logits = np.concatenate([lg for _, lg in stack])
            src[free] = [need.index(sig[i]) for i in new_rows]
            key_rows[free] = new_rows
            slot_row[free] = new_rows
            wanted = {sig[i] for i in list(queue)[: 4 * b]}
            held = {x: v for x, v in held.items() if x in wanted}
        # the new cursor: the longest row in flight (prompt included), at least the prompt width
        valid = np.asarray(s.aux[0].key_valid)
        flying = np.nonzero((slot_row >= 0) & ~take)[0]
        new_cursor = max([w] + [cursor - int(np.argmax(valid[j])) for j in flying if valid[j].any()])
        if take.any() or new_cursor != cursor:
            if not take.any():
                prompts, first_logits = _empty_prompts(s.aux[0], w), np.zeros((1, vocab), np.float32)
            s = _admit(s, jnp.asarray(new_cursor - cursor, jnp.int32), jnp.asarray(new_cursor, jnp.int32),
                       jnp.asarray(take), jnp.asarray(src), keys[jnp.asarray(key_rows)], prompts, jnp.asarray(first_logits),
                       cfg=cfg)
            cursor = new_cursor
        s = _segment(params, s, graphdef=graphdef, decoder=decoder, cfg=cfg, segment=segment)
        count["steps"] += int(s.step)
        count["segments"] += 1
        cursor = int(s.aux[0].cursor)
        done = np.asarray(s.done)
        ended = np.nonzero(done & (slot_row >= 0))[0]
        if ended.size:
            rows_done = slot_row[ended]
            got = jax.device_get((s.tokens, s.logprobs, s.length) + ((s.topk, s.mean_lp) if k else ()))
            out.tokens[rows_done], out.logprobs[rows_done], out.lengths[rows_done] = (
                got[0][ended], got[1][ended], got[2][ended])
            if k:
                out.topk_logprobs[rows_done], out.mean_logprob[rows_done] = got[3][ended], got[4][ended]
            out.finished[rows_done] = np.asarray(_has_end(out.tokens[rows_done], out.lengths[rows_done], eos))
            slot_row[ended] = -1
            if on_finished is not None:
                on_finished(rows_done, out)
    if stats is not None:
        stats.update(count, slots=b, live_fraction=float(out.lengths.sum()) / max(count["steps"] * b, 1))
    return out


def _empty_prompts(c: KVCache, width: int) -> KVCache:
    """A one-row, all-zero W-column prompt (for a roll that admits no row)."""
    return KVCache(k=tuple(np.zeros((1,) + x.shape[1:3] + (width,), x.dtype) for x in c.k),
                   v=tuple(np.zeros((1,) + x.shape[1:2] + (width,) + x.shape[3:], x.dtype) for x in c.v),
                   key_valid=np.zeros((1, width), bool), cursor=np.zeros((), np.int32),
                   next_pos=np.zeros((1,), np.int32))
