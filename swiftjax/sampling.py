"""The one sampler: prefill once, then one token a step in a single jitted ``lax.while_loop``.

:func:`decode_loop` is the loop and :class:`SamplerState` its named carry;
:func:`run_sampler` prefills and runs it over one batch, :mod:`swiftjax.stream` runs it in
segments over slots it refills (continuous batching). What differs between uses is a
:class:`Decoder` of hooks: :class:`LMDecoder` decodes one or several models
in lock step (each with its own KV cache, their logits merged by a ``combine`` function:
GenARM's guided decoding passes its weights as traced arguments, so new weights never
recompile); SWIFT's running score (:mod:`swiftjax.methods.swift.features`) reads every step's
per-layer projections; ARGS (:mod:`swiftjax.methods.genarm.guided`) overrides how a token is
chosen. :func:`generate` is the plain entry point.

Random stream: one ``jax.random.split`` per step, the sub-key drawing that step's tokens for
the whole batch, so a batch's samples depend on its key and on which rows share it: callers
that need reproducible candidate sets fix the batch layout (it is part of their cache keys).
With per-row keys (``SamplerState.row_keys``, continuous batching) row b draws its token t
with ``fold_in(row_keys[b], t)``, independent of its neighbours.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax._checks import check_int, check_rank, check_same_shape
from swiftjax import parallel
from swiftjax.models.cache import KVCache, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    record_topk: int = 0   # > 0: also record each step's top-k log-probs and mean log-prob (confidence scores)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p):
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.record_topk < 0:
            raise ValueError(f"record_topk: expected >= 0, got {self.record_topk}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
    tokens: jax.Array     # [B, N] sampled ids, pad_id after a row finished
    logprobs: jax.Array   # [B, N] float32 log p(token) under the (combined) model at T = 1
    lengths: jax.Array    # [B] tokens generated, the end token included
    finished: jax.Array   # [B] bool: the row emitted an end token
    topk_logprobs: jax.Array | None = None  # [B, N, k] each step's k largest log-probs (cfg.record_topk = k)
    mean_logprob: jax.Array | None = None   # [B, N] each step's mean log-prob over the vocabulary


def _temper_top_k(logits, cfg: SamplingConfig):
    """Temperature and top-k of logits [B, V] (float32); masked = -inf."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def filter_logits(logits, cfg: SamplingConfig):
    """Apply temperature, top-k and top-p to logits [B, V] (float32); masked = -inf."""
    logits = _temper_top_k(logits, cfg)
    if cfg.top_p < 1.0:
        logits = _top_p_filter(logits, cfg.top_p)
    return logits


TOP_P_HEAD = 128  # candidates the nucleus is first looked for in (exact either way: see _top_p_filter)


def _head_keep(vals, lse, top_p):
    """Keep mask [B, k] over row-sorted values ``vals``: the mass strictly above each token is
    below ``top_p`` (always keeps the most likely token)."""
    probs = jnp.exp(vals - lse)
    return jnp.cumsum(probs, axis=-1) - probs < top_p


def _nucleus(logits, lse, vals, idx, top_p):
    """Keep mask of the nucleus, given the row-sorted head ``vals``/``idx`` [B, k] of ``logits``."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, bool).at[rows, idx].set(_head_keep(vals, lse, top_p))


def _head(logits, top_p):
    """``(lse [B, 1], vals [B, k], idx [B, k], covered [])``: each row's log-normaliser, its
    ``TOP_P_HEAD`` most likely tokens (sorted) and whether they hold ``top_p`` of every row's
    mass (then no token outside them is in the nucleus)."""
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    vals, idx = jax.lax.top_k(logits, TOP_P_HEAD)
    covered = jnp.all(jnp.sum(jnp.exp(vals - lse), axis=-1) >= top_p)
    return lse, vals, idx, covered


def _order_keys(x):
    """float32 -> uint32 keys with the same order (-inf lowest; no NaNs expected)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _nucleus_by_search(logits, lse, top_p):
    """Keep mask of the nucleus without sorting the vocabulary: the smallest kept logit is
    the largest value ``v`` whose mass ``P(logit >= v)`` reaches ``top_p``, found by a
    32-step bisection over the float's bit order (each step one pass over [B, V]); tokens
    above it are kept, and tokens tied with it are kept in index order (a stable sort's)
    while the mass before them is below ``top_p``."""
    probs = jnp.exp(logits - lse)
    keys = _order_keys(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)   # mass(>= lo) = 1 >= top_p
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2             # lo < mid <= hi while lo < hi
        ok = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    above = keys > lo
    tied = keys == lo
    mass_above = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True)
    rank = jnp.cumsum(tied, axis=-1) - tied                  # earlier ties (index order)
    return above | (tied & (mass_above + rank * probs < top_p))


def _top_p_filter(logits, top_p: float):
    """Nucleus filter of logits [B, V]: keep the most likely tokens up to and including the one
    whose mass above it first reaches ``top_p`` (ties in index order); the rest become -inf.

    Sorting the vocabulary each step costs more than the model's forward on a CPU (49k-151k
    entries per row: ~2.8 s a step for 48 rows of Qwen's vocabulary), so the nucleus is
    looked for among the ``TOP_P_HEAD`` most likely tokens first: when that head already
    holds ``top_p`` of every row's mass, no token outside it can be kept and the head decides
    exactly; otherwise (some row's distribution is flat) :func:`_nucleus_by_search` finds the
    cut by bisection. Both compute the same set up to float rounding of the cumulative mass.
    """
    if logits.shape[-1] <= TOP_P_HEAD:  # a small vocabulary: sort it
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        order = jnp.argsort(-logits, axis=-1)
        keep = _nucleus(logits, lse, jnp.take_along_axis(logits, order, axis=-1), order, top_p)
    else:
        lse, vals, idx, covered = _head(logits, top_p)
        keep = jax.lax.cond(covered, lambda: _nucleus(logits, lse, vals, idx, top_p),
                            lambda: _nucleus_by_search(logits, lse, top_p))
    return jnp.where(keep, logits, -jnp.inf)


ARGMAX_BLOCK = 128


def argmax_last(x):
    """``jnp.argmax(x, axis=-1)`` as int32, exactly (the first maximal index; a NaN counts as the
    maximum, its first occurrence wins), computed in blocks when the last axis is long.

    XLA:CPU lowers a variadic (value, index) reduction over a long axis to a slow scalar loop:
    ~8 ms for [64, 49152] and ~27 ms for [64, 151936], a tenth of a greedy decode step. Here the
    maxima of blocks of ``ARGMAX_BLOCK`` entries (plain reductions) pick the first block holding
    the row's maximum, and the arg-max runs over that block only: the first maximal index lies
    in the first block whose maximum equals the row's maximum. XLA:CPU's max reduction may drop
    NaN, so a row holding NaN takes its first block with a NaN instead. A vocabulary that is not
    a multiple of the block ends in a short tail compared at the end."""
    v = x.shape[-1]
    if v < 16 * ARGMAX_BLOCK:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    main = v - v % ARGMAX_BLOCK
    blocks = x[..., :main].reshape(*x.shape[:-1], main // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block_max = jnp.max(blocks, axis=-1)                                                 # [..., nb]
    block_nan = jnp.any(jnp.isnan(blocks), axis=-1)                                      # [..., nb]
    main_nan = jnp.any(block_nan, axis=-1)                                               # [...]
    j = jnp.where(main_nan, jnp.argmax(block_nan, axis=-1), jnp.argmax(block_max, axis=-1))  # first block
    inner = jnp.take_along_axis(blocks, j[..., None, None], axis=-2)[..., 0, :]          # [..., block]
    best = (j * ARGMAX_BLOCK + jnp.argmax(inner, axis=-1)).astype(jnp.int32)
    if main == v:
        return best
    tail = x[..., main:]                                       # fewer than ARGMAX_BLOCK last entries
    tail_nan = jnp.any(jnp.isnan(tail), axis=-1)
    in_main = main_nan | (~tail_nan & (jnp.max(block_max, axis=-1) >= jnp.max(tail, axis=-1)))  # ties: earlier
    return jnp.where(in_main, best, main + jnp.argmax(tail, axis=-1).astype(jnp.int32))


def sample_token(key, logits, cfg: SamplingConfig):
    """Next ids [B] from logits [B, V]: arg-max when temperature is 0, else a draw.

    A draw is ``jax.random.categorical`` of the filtered logits: the arg-max of logits plus the
    Gumbel noise ``jax.random.gumbel(key, logits.shape)`` (see :func:`draw_with_noise`). With
    top-p over a large vocabulary only the noise at the nucleus head's tokens is computed
    (:func:`gumbel_at`: the same values), unless the nucleus leaves the head.
    """
    if cfg.temperature == 0:
        return argmax_last(logits)
    b, v = logits.shape
    return _draw(logits, key, lambda: jax.random.gumbel(key, logits.shape, jnp.float32),
                 lambda idx: gumbel_at(key, jnp.arange(b)[:, None] * v + idx, b * v), cfg)


def sample_token_rows(keys, logits, cfg: SamplingConfig):
    """Like :func:`sample_token`, but row ``b`` draws with its own key ``keys[b]`` (the noise
    a single-row ``sample_token(keys[b], logits[b:b+1])`` would add): a row's draw does not
    depend on the rows beside it."""
    if cfg.temperature == 0:
        return argmax_last(logits)
    v = logits.shape[-1]
    return _draw(logits, keys, lambda: jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys),
                 lambda idx: jax.vmap(lambda k, i: gumbel_at(k, i, v))(keys, idx), cfg)


def _draw(logits, key, full_noise, noise_at, cfg: SamplingConfig):
    """The draw of :func:`sample_token`: ``full_noise()`` -> [B, V] Gumbels; ``noise_at(idx)``
    -> the same Gumbels at token ids ``idx`` [B, k] (used when it is exact, see :func:`gumbel_at`)."""
    v = logits.shape[-1]
    if cfg.top_p >= 1.0 or v <= TOP_P_HEAD or not _gumbel_at_is_exact(key):
        return draw_with_noise(logits, full_noise(), cfg)
    return _nucleus_draw(logits, cfg, noise_at, full_noise)


def _gumbel_at_is_exact(key=None) -> bool:
    """:func:`gumbel_at` reproduces ``jax.random.gumbel`` for ``key`` under these settings (the
    defaults): threefry keys, partitionable (each element's bits hash its own index), low-range
    Gumbels. Otherwise the draw computes the full noise (the same tokens, more work)."""
    if not jax.config.jax_threefry_partitionable or jax.config.jax_high_dynamic_range_gumbel:
        return False
    if key is not None and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return jax.config.jax_default_prng_impl == "threefry2x32"  # raw uint32 keys: the default impl


def gumbel_at(key, flat_index, size: int):
    """``jax.random.gumbel(key, shape, float32).ravel()[flat_index]`` without drawing the other
    elements (``size`` = the product of ``shape``): with partitionable threefry, element i's
    32 random bits are ``threefry2x32(key; hi(i), lo(i))`` xor-folded, and the Gumbel is
    ``-log(-log(u))`` of the uniform in [tiny, 1) those bits give. Exact only when
    :func:`_gumbel_at_is_exact` (tests check it against ``jax.random.gumbel``). ``key``: a typed
    threefry key or a raw uint32[2] one."""
    from jax.extend.random import threefry2x32_p

    if size >= 2 ** 31:
        raise ValueError(f"gumbel_at: expected fewer than 2^31 elements, got {size}")
    k1, k2 = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    lo = jnp.asarray(flat_index).astype(jnp.uint32)
    b1, b2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(lo), lo)
    bits = b1 ^ b2
    one = np.array(1.0, np.float32).view(np.uint32)
    floats = jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(bits, np.uint32(32 - 23)) | one,
                                          jnp.float32) - jnp.float32(1.0)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    u = jax.lax.max(tiny, floats * (jnp.float32(1.0) - tiny) + tiny)
    return -jnp.log(-jnp.log(u))


def draw_with_noise(logits, noise, cfg: SamplingConfig):
    """Ids [B]: the arg-max of the filtered logits plus Gumbel ``noise`` [B, V].

    With top-p over a large vocabulary the arg-max is taken over the ``TOP_P_HEAD`` head only
    whenever the nucleus lies in it (the same noise at the same tokens, so the same draw),
    sparing an arg-max over [B, V] each step.
    """
    if cfg.top_p >= 1.0 or logits.shape[-1] <= TOP_P_HEAD:
        return argmax_last(filter_logits(logits, cfg) + noise)
    return _nucleus_draw(logits, cfg, lambda idx: jnp.take_along_axis(noise, idx, axis=-1), lambda: noise)


def _nucleus_draw(logits, cfg: SamplingConfig, head_noise, full_noise):
    """Top-p draw over a large vocabulary: the arg-max over the head's kept tokens plus
    ``head_noise(idx)`` [B, TOP_P_HEAD] when the nucleus lies in the head, else over the whole
    nucleus plus ``full_noise()`` [B, V] (each is only computed in its branch)."""
    x = _temper_top_k(logits, cfg)
    lse, vals, idx, covered = _head(x, cfg.top_p)

    def in_head():
        keep = _head_keep(vals, lse, cfg.top_p)
        j = jnp.argmax(jnp.where(keep, vals, -jnp.inf) + head_noise(idx), axis=-1)
        return jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]

    def by_search():
        keep = _nucleus_by_search(x, lse, cfg.top_p)
        return argmax_last(jnp.where(keep, x, -jnp.inf) + full_noise())

    return jax.lax.cond(covered, in_head, by_search).astype(jnp.int32)


# ----------------------------------------------------------------------------- the one loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """The carry of the decoding loop (B rows, N = max_new_tokens, V = vocabulary)."""

    step: jax.Array       # [] int32: tokens generated so far (the column written next)
    key: jax.Array        # PRNG key, split once per step
    logits: jax.Array     # [B, V] next-token scores the decoder produced for this step
    tokens: jax.Array     # [B, N] int32 chosen ids; pad_id after a row finished
    logprobs: jax.Array   # [B, N] float32 log p(token) under the decoder's distribution, 0 after the end
    done: jax.Array       # [B] bool: the row has ended (an end token, or the decoder stopped it)
    length: jax.Array     # [B] int32: tokens the row generated (its end token included)
    topk: jax.Array       # [B, N, k] top-k log-probs of each step's distribution (k = cfg.record_topk, may be 0)
    mean_lp: jax.Array    # [B, N] mean log-prob over the vocabulary of each step's distribution
    aux: Any              # the decoder's own carry: KV caches, running scores, ...
    row_keys: jax.Array | None = None  # [B] keys: row b draws its token t with fold_in(row_keys[b], t)
    #                                   (continuous batching); None: one split of ``key`` per step


class Decoder:
    """Hooks of :func:`run_sampler`: how the loop prefills, feeds a chosen token back and picks
    the next one. A decoder is a frozen (hashable) dataclass: it is a static argument of the
    jitted loop; traced inputs reach it as ``args``. ``models()`` merges fresh modules from
    the loop's parameters (call it inside each hook).

    * ``setup(models, args) -> ctx``: once per call, outside the loop (e.g. fold a head);
    * ``prefill(models, ctx, prompts, cfg) -> (aux, logits [B, V])``;
    * ``choose(models, ctx, key, state, cfg) -> (tok [B] int32, logprob [B] float32)``:
      default: :func:`sample_token` (or :func:`sample_token_rows` when ``key`` holds one key
      per row) and the log-softmax of ``state.logits`` at that token;
    * ``advance(models, ctx, aux, tok [B], live [B] bool, step) -> (aux, logits [B, V])``:
      ``live`` marks rows whose token is part of the response (the end token included);
    * ``stop(ctx, aux, step, done) -> [B] bool | None``: rows to end after this step's token
      without an end token (e.g. pruned candidates); default None (none);
    * ``finish(ctx, state) -> dict`` of extra outputs.
    """

    def setup(self, models, args):
        return args

    def prefill(self, models, ctx, prompts, cfg):
        raise NotImplementedError

    def choose(self, models, ctx, key, state: SamplerState, cfg: SamplingConfig):
        tok = (sample_token_rows if key.ndim else sample_token)(key, state.logits, cfg)
        lp = jnp.take_along_axis(jax.nn.log_softmax(state.logits.astype(jnp.float32), -1), tok[:, None], -1)[:, 0]
        return tok, lp

    def advance(self, models, ctx, aux, tok, live, step):
        raise NotImplementedError

    def stop(self, ctx, aux, step, done):
        return None

    def finish(self, ctx, state: SamplerState) -> dict:
        return {}


def constrain_cache(c: KVCache) -> KVCache:
    """The cache split along batch (and KV heads) on the ambient mesh (no-op without one)."""
    return dataclasses.replace(
        c, k=tuple(parallel.constrain(k, "batch", "kv_heads", None, None) for k in c.k),
        v=tuple(parallel.constrain(v, "batch", "kv_heads", None, None) for v in c.v),
        key_valid=parallel.constrain(c.key_valid, "batch", None))


def _combine_first(logits_list, args):
    return logits_list[0]


@dataclasses.dataclass(frozen=True)
class LMDecoder(Decoder):
    """One or several causal LMs in lock step, each with its own KV cache (and its own prompt),
    their next-token logits merged by ``combine(list of [B, V_i], args) -> [B, V]``."""

    combine: Callable = _combine_first
    cache_dtype: Any = jnp.float32

    def prefill(self, models, ctx, prompts, cfg):
        caches, logits = [], []
        for m, (ids, mask) in zip(models(), prompts):
            c = init_cache(m.config, ids.shape[0], ids.shape[1] + cfg.max_new_tokens, self.cache_dtype)
            o = m(ids, mask, cache=constrain_cache(c), last_only=True)
            caches.append(constrain_cache(o.cache))
            logits.append(o.logits[:, -1])
        return caches, self.combine(logits, ctx)

    def advance(self, models, ctx, aux, tok, live, step):
        step_mask = jnp.ones((tok.shape[0], 1), jnp.int32)
        outs = [m(tok[:, None], step_mask, cache=c) for m, c in zip(models(), aux)]
        return [constrain_cache(o.cache) for o in outs], self.combine([o.logits[:, -1] for o in outs], ctx)


def _has_end(tokens, length, eos):
    """[B] bool: the row generated an end token (padding after its end may equal one)."""
    generated = jnp.arange(tokens.shape[1])[None, :] < length[:, None]
    return jnp.any((tokens[:, :, None] == eos[None, None, :]) & generated[:, :, None], axis=(1, 2))


def _repeat_rows(tree, groups: int):
    """Repeat every batch-leading leaf of ``tree`` ``groups`` times along axis 0 (row i of
    the result is row i // groups of the input); scalars (e.g. the cache cursor) are kept."""
    return jax.tree.map(lambda x: jnp.repeat(x, groups, axis=0) if x.ndim else x, tree)


def init_state(cfg: SamplingConfig, logits, aux, key, *, done=None, row_keys=None) -> SamplerState:
    """A loop carry with empty output buffers for ``logits.shape[0]`` rows (no token yet;
    ``done`` [B] marks rows that take no step, default none)."""
    b, n, k = logits.shape[0], cfg.max_new_tokens, cfg.record_topk
    return SamplerState(step=jnp.zeros((), jnp.int32), key=key, logits=logits,
                        tokens=jnp.full((b, n), cfg.pad_id, jnp.int32), logprobs=jnp.zeros((b, n), jnp.float32),
                        done=jnp.zeros((b,), bool) if done is None else done, length=jnp.zeros((b,), jnp.int32),
                        topk=jnp.zeros((b, n, k), jnp.float32), mean_lp=jnp.zeros((b, n if k else 0), jnp.float32),
                        aux=aux, row_keys=row_keys)


def decode_loop(models, ctx, decoder: Decoder, s: SamplerState, cfg: SamplingConfig, steps) -> SamplerState:
    """The decoding loop (traced; one ``lax.while_loop``): up to ``steps`` more tokens a row,
    stopping once every row is done. Row b writes its token t (t = ``s.length[b]``) to column
    t; a row ends at an end token, at ``cfg.max_new_tokens`` tokens or when the decoder stops
    it; ``s.step`` counts the loop's steps."""
    b, n = s.tokens.shape
    rows = jnp.arange(b)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def cond(s: SamplerState):
        return (s.step < steps) & ~jnp.all(s.done)

    def body(s: SamplerState):
        if s.row_keys is None:
            key, sub = jax.random.split(s.key)
        else:
            key, sub = s.key, jax.vmap(jax.random.fold_in)(s.row_keys, s.length)
        tok, lp = decoder.choose(models, ctx, sub, s, cfg)
        live = ~s.done
        col = jnp.minimum(s.length, n - 1)   # a live row's next column; finished rows write nothing
        tok = jnp.where(s.done, cfg.pad_id, tok).astype(jnp.int32)
        lp = jnp.where(s.done, 0.0, lp).astype(jnp.float32)

        def put(buf, new):
            return buf.at[rows, col].set(jnp.where(live.reshape((b,) + (1,) * (new.ndim - 1)), new, buf[rows, col]))

        ended = jnp.any(tok[:, None] == eos[None, :], axis=-1) | (s.length + 1 >= n)
        done = s.done | (live & ended)
        topk, mean_lp = s.topk, s.mean_lp
        if cfg.record_topk:  # the distribution this step's token came from (T = 1)
            lp_all = jax.nn.log_softmax(s.logits.astype(jnp.float32), -1)
            topk = put(topk, jax.lax.top_k(lp_all, cfg.record_topk)[0])
            mean_lp = put(mean_lp, lp_all.mean(-1))
        aux, logits = decoder.advance(models, ctx, s.aux, tok, live, s.step)
        stop = decoder.stop(ctx, aux, s.step, done)
        if stop is not None:
            done = done | stop
        return dataclasses.replace(s, step=s.step + 1, key=key, logits=logits, tokens=put(s.tokens, tok),
                                   logprobs=put(s.logprobs, lp), done=done, length=s.length + live.astype(jnp.int32),
                                   topk=topk, mean_lp=mean_lp, aux=aux)

    return jax.lax.while_loop(cond, body, s)


@functools.partial(jax.jit, static_argnames=("graphdefs", "decoder", "cfg", "prompt_groups"))
def _sample(states, args, prompts, key, *, graphdefs, decoder, cfg, prompt_groups=1):
    def models():
        return [nnx.merge(g, s) for g, s in zip(graphdefs, states)]

    ctx = decoder.setup(models, args)
    prompts = [(parallel.constrain(ids, "batch", None), parallel.constrain(mask, "batch", None))
               for ids, mask in prompts]  # rows split over the mesh's 'data' axis (no-op without one)
    if prompt_groups > 1:  # each group of identical prompts is prefilled once, its cache broadcast
        firsts = [(ids[::prompt_groups], mask[::prompt_groups]) for ids, mask in prompts]
        aux, logits = _repeat_rows(decoder.prefill(models, ctx, firsts, cfg), prompt_groups)
    else:
        aux, logits = decoder.prefill(models, ctx, prompts, cfg)
    s = decode_loop(models, ctx, decoder, init_state(cfg, logits, aux, key), cfg, cfg.max_new_tokens)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
    out = GenerateOutput(tokens=s.tokens, logprobs=s.logprobs, lengths=s.length,
                         finished=s.done & _has_end(s.tokens, s.length, eos), topk_logprobs=s.topk if cfg.record_topk else None,
                         mean_logprob=s.mean_lp if cfg.record_topk else None)
    return out, decoder.finish(ctx, s)


def check_prompt(ids, mask, where: str = "input_ids", vocab_size: int | None = None):
    """Validate a left-padded prompt batch; returns (ids, mask) as int32 jax arrays."""
    ids = jnp.asarray(ids)
    check_rank(ids, where, 2, "[B, T]")
    check_int(ids, where)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    check_same_shape(ids, mask, where, f"{where} mask")
    if ids.shape[1] and np.any(np.asarray(mask)[:, -1] == 0):
        raise ValueError(f"{where} attention_mask: expected left padding (every row's last token real)")
    if vocab_size is not None:
        check_ids_in_vocab(ids, mask, vocab_size, where)
    return ids.astype(jnp.int32), mask.astype(jnp.int32)


def check_ids_in_vocab(ids, mask, vocab_size: int, where: str = "input_ids") -> None:
    """Token ids under a nonzero mask must lie in [0, vocab_size)."""
    a = np.asarray(ids)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask) != 0
    bad = m & ((a < 0) | (a >= vocab_size))
    if bad.any():
        pos = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"{where}: expected token ids in [0, {vocab_size}), got {int(a[pos])} at {list(pos)}")


def check_prompt_groups(prompts: Sequence, groups) -> int:
    """``groups`` consecutive rows of every prompt batch must be identical (ids and mask)."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"prompt_groups: expected a positive int, got {groups!r}")
    groups = int(groups)
    for i, (ids, mask) in enumerate(prompts):
        b = ids.shape[0]
        if b % groups:
            raise ValueError(f"prompt_groups: expected the batch ({b} rows) to be a multiple of {groups}")
        for name, a in (("ids", ids), ("mask", mask)):
            g = np.asarray(a).reshape(b // groups, groups, -1)
            bad = np.nonzero(~(g == g[:, :1]).all(axis=(1, 2)))[0]
            if bad.size:
                r = int(bad[0]) * groups
                raise ValueError(f"prompt_groups={groups}: expected prompt {i} rows {r}..{r + groups - 1} "
                                 f"to be identical ({name} differ)")
    return groups


def run_sampler(decoder: Decoder, models: Sequence, prompts: Sequence, *, key=None, cfg: SamplingConfig,
                args=None, prompt_groups: int = 1):
    """The decoding loop every sampler in swiftjax runs: prefill, then one token a step in one
    jitted ``lax.while_loop`` (stopping once every row has ended), with ``decoder``'s hooks.

    models: the NNX modules the decoder uses (their parameters are traced arguments).
    prompts: one (ids [B, T_i], mask [B, T_i]) left-padded batch per model (validated here).
    prompt_groups: g > 1 says the rows come in consecutive groups of g identical prompts (as
    in Best-of-N): each group is prefilled once and its cache and first logits repeated, so
    prefill costs 1/g (checked on the host). The samples equal those of the ungrouped call
    up to floating-point rounding of the smaller prefill batch.
    Returns ``(GenerateOutput, decoder.finish(...) dict)``.
    """
    if not isinstance(cfg, SamplingConfig):
        raise ValueError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    if key is None:
        if cfg.temperature != 0:
            raise ValueError("sampling: a jax.random key is required when temperature > 0")
        key = jax.random.key(0)
    checked = []
    for i, (m, p) in enumerate(zip(models, prompts)):
        where = "input_ids" if i == 0 else f"extra_inputs[{i - 1}] ids"
        ids, mask = check_prompt(p[0], p[1], where, int(m.config.vocab_size))
        limit = m.config.max_position_embeddings
        if m.config.is_gpt2 and ids.shape[1] + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens: expected <= {limit} positions for gpt2")
        checked.append((ids, mask))
    prompt_groups = check_prompt_groups(checked, prompt_groups)
    split = [nnx.split(m) for m in models]
    return _sample([s for _, s in split], args, checked, key, graphdefs=tuple(g for g, _ in split),
                   decoder=decoder, cfg=cfg, prompt_groups=prompt_groups)


def generate(model, input_ids, attention_mask=None, *, key=None, cfg: SamplingConfig,
             extra_models: Sequence = (), combine: Callable | None = None, combine_args=None,
             cache_dtype=jnp.float32, extra_inputs: Sequence | None = None,
             prompt_groups: int = 1) -> GenerateOutput:
    """Sample continuations of left-padded prompts.

    input_ids / attention_mask: [B, T] (left padding). ``key`` is required unless greedy.
    ``extra_models`` decode in lock step with ``model`` (same token ids, own caches);
    ``combine(list_of_logits [B, V], combine_args) -> logits [B, V]`` merges their
    next-token logits (``combine_args`` is a traced pytree, e.g. guidance weights).
    ``extra_inputs``: optional, one entry per extra model, ``None`` (prefill with the base's
    prompt) or that model's own left-padded ``(ids [B, T_i], mask [B, T_i])`` (e.g. its own
    prompt template); after the prefill every model consumes the same sampled ids.
    """
    models = [model, *extra_models]
    if len(models) > 1 and combine is None:
        raise ValueError("generate: extra_models need a combine function for their logits")
    input_ids, attention_mask = check_prompt(input_ids, attention_mask)
    b = input_ids.shape[0]
    if extra_inputs is not None:
        extra_inputs = _check_extra_inputs(extra_inputs, len(extra_models), b)
    prompts = [(input_ids, attention_mask)] + [(input_ids, attention_mask) if p is None else p
                                               for p in (extra_inputs or [None] * len(extra_models))]
    decoder = LMDecoder(combine=combine or _combine_first, cache_dtype=cache_dtype)
    out, _ = run_sampler(decoder, models, prompts, key=key, cfg=cfg, args=combine_args, prompt_groups=prompt_groups)
    return out


def _check_extra_inputs(extra_inputs, k: int, b: int):
    """Validate per-extra-model prompts: a length-k sequence of None or (ids, mask) [B, T_i]."""
    if isinstance(extra_inputs, (str, bytes)) or len(extra_inputs) != k:
        raise ValueError(f"extra_inputs: expected one entry per extra model ({k}), got "
                         f"{len(extra_inputs) if hasattr(extra_inputs, '__len__') else extra_inputs!r}")
    out = []
    for i, item in enumerate(extra_inputs):
        if item is None:
            out.append(None)
            continue
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"extra_inputs[{i}]: expected None or a pair (ids, mask), got {type(item).__name__}")
        ids, mask = jnp.asarray(item[0]), jnp.asarray(item[1])
        check_rank(ids, f"extra_inputs[{i}] ids", 2, "[B, T_i]")
        check_int(ids, f"extra_inputs[{i}] ids")
        check_same_shape(ids, mask, f"extra_inputs[{i}] ids", f"extra_inputs[{i}] mask")
        if ids.shape[0] != b:
            raise ValueError(f"extra_inputs[{i}]: expected batch B={b} rows, got {ids.shape[0]}")
        if np.any(np.asarray(mask)[:, -1] == 0):
            raise ValueError(f"extra_inputs[{i}] mask: expected left padding (every row's last token real)")
        out.append((ids.astype(jnp.int32), mask.astype(jnp.int32)))
    return tuple(out)
