"""Sampling over a KV cache: prefill once, then one-token steps in ``lax.while_loop``.

Everything runs in one jitted function whose arguments are the model parameters (an
explicit pytree), the prompt batch and a PRNG key; the loop stops early once every row
has emitted an end token. Several models can decode in lock step, each with its own
cache, their next-token logits combined by a user function (GenARM's guided decoding
uses this with weights passed as traced arguments, so new weights never recompile).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax._checks import check_int, check_rank, check_same_shape
from swiftjax.models.cache import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
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


def filter_logits(logits, cfg: SamplingConfig):
    """Apply temperature, top-k and top-p to logits [B, V] (float32); masked = -inf."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < cfg.top_p              # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_token(key, logits, cfg: SamplingConfig):
    """Next ids [B] from logits [B, V]: arg-max when temperature is 0, else a draw."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)


def _single(logits_list, extra):
    return logits_list[0]


@functools.partial(jax.jit, static_argnames=("graphdefs", "cfg", "combine", "cache_dtype"),
                   donate_argnames=())
def _generate(states, extra, input_ids, attention_mask, key, extra_inputs=None, *, graphdefs, cfg,
              combine, cache_dtype):
    models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    b, t = input_ids.shape
    n = cfg.max_new_tokens
    prompts = [(input_ids, attention_mask)] + list(extra_inputs or [None] * (len(models) - 1))
    prompts = [(input_ids, attention_mask) if p is None else p for p in prompts]
    caches = [init_cache(m.config, b, p[0].shape[1] + n, cache_dtype) for m, p in zip(models, prompts)]
    outs = [m(p[0], p[1], cache=c, last_only=True) for m, p, c in zip(models, prompts, caches)]
    caches = [o.cache for o in outs]
    logits = combine([o.logits[:, -1] for o in outs], extra)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, _, done = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, caches, logits, key, tokens, logps, done = carry
        key, sub = jax.random.split(key)
        tok = sample_token(sub, logits, cfg)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                 tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, cfg.pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = tokens.at[:, i].set(tok)
        logps = logps.at[:, i].set(lp)
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        step_mask = jnp.ones((b, 1), jnp.int32)
        outs = [m(tok[:, None], step_mask, cache=c) for m, c in zip(models, caches)]
        logits = combine([o.logits[:, -1] for o in outs], extra)
        return i + 1, [o.cache for o in outs], logits, key, tokens, logps, done

    init = (jnp.zeros((), jnp.int32), caches, logits, key,
            jnp.full((b, n), cfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
            jnp.zeros((b,), bool))
    i, _, _, _, tokens, logps, done = jax.lax.while_loop(cond, body, init)
    # length: up to and including the end token (or n when unfinished)
    first_end = jnp.argmax(jnp.any(tokens[:, :, None] == eos[None, None, :], -1), axis=1)
    lengths = jnp.where(done, first_end + 1, jnp.minimum(i, n))
    return GenerateOutput(tokens=tokens, logprobs=logps, lengths=lengths.astype(jnp.int32),
                          finished=done)


def generate(model, input_ids, attention_mask=None, *, key=None, cfg: SamplingConfig,
             extra_models: Sequence = (), combine: Callable | None = None, combine_args=None,
             cache_dtype=jnp.float32, extra_inputs: Sequence | None = None) -> GenerateOutput:
    """Sample continuations of left-padded prompts.

    input_ids / attention_mask: [B, T] (left padding). ``key`` is required unless greedy.
    ``extra_models`` decode in lock step with ``model`` (same token ids, own caches);
    ``combine(list_of_logits [B, V], combine_args) -> logits [B, V]`` merges their
    next-token logits (``combine_args`` is a traced pytree, e.g. guidance weights).
    ``extra_inputs``: optional, one entry per extra model, ``None`` (prefill with the base's
    prompt) or that model's own left-padded ``(ids [B, T_i], mask [B, T_i])`` (e.g. its own
    prompt template); after the prefill every model consumes the same sampled ids.
    """
    input_ids = jnp.asarray(input_ids)
    check_rank(input_ids, "input_ids", 2, "[B, T]")
    check_int(input_ids, "input_ids")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    check_same_shape(input_ids, attention_mask, "input_ids", "attention_mask")
    if np.any(np.asarray(attention_mask)[:, -1] == 0):
        raise ValueError("attention_mask: expected left padding (every row's last token real)")
    if key is None:
        if cfg.temperature != 0:
            raise ValueError("generate: a jax.random key is required when temperature > 0")
        key = jax.random.key(0)
    models = [model, *extra_models]
    if len(models) > 1 and combine is None:
        raise ValueError("generate: extra_models need a combine function for their logits")
    if extra_inputs is not None:
        extra_inputs = _check_extra_inputs(extra_inputs, len(extra_models), input_ids.shape[0])
    lens = [input_ids.shape[1]] + [input_ids.shape[1] if p is None else p[0].shape[1]
                                   for p in (extra_inputs or [None] * len(extra_models))]
    for m, t in zip(models, lens):
        limit = m.config.max_position_embeddings
        if m.config.is_gpt2 and t + cfg.max_new_tokens > limit:
            raise ValueError(f"prompt + max_new_tokens: expected <= {limit} positions for gpt2")
    split = [nnx.split(m) for m in models]
    graphdefs = tuple(g for g, _ in split)
    states = [s for _, s in split]
    return _generate(states, combine_args, input_ids.astype(jnp.int32), attention_mask.astype(jnp.int32),
                     key, extra_inputs, graphdefs=graphdefs, cfg=cfg, combine=combine or _single,
                     cache_dtype=cache_dtype)


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
