"""Per-token and per-sequence log-probabilities of a causal LM, in float32.

Conventions
-----------
* ``token_logprobs(logits, targets)[b, t] = log softmax(logits[b, t])[targets[b, t]]``,
  computed as ``take_along_axis(logits) - logsumexp(logits)`` after an upcast to
  float32 (bf16 logits are accepted; the reduction is always float32).
* Causal shift: the logits at position ``t`` predict the id at ``t + 1``. A
  ``response_mask`` is aligned to ``input_ids``: ``mask[b, t] = 1`` means
  ``ids[b, t]`` is a response token, scored by ``logits[b, t - 1]``. Position 0
  has no prefix, so it can never be a scored token.
* ``chunk_size`` splits the sequence axis into chunks that are processed one
  after the other (``lax.fori_loop``), so only one ``[B, chunk, V]`` float32
  block is live at a time; the result equals the unchunked computation. For the
  largest vocabularies use :func:`token_logprobs_from_hidden`, which never
  materialises the full ``[B, T, V]`` logits at all.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from swiftjax._checks import check_float, check_int, check_rank, check_same_shape
from swiftjax.batching import map_batches

__all__ = [
    "token_logprobs",
    "token_logprobs_from_hidden",
    "sequence_logprob",
    "masked_sum",
    "shift_for_lm",
    "response_token_logprobs",
    "sft_loss",
    "sequence_logprobs",
]


def _concrete(x):
    """``x`` as a numpy array, or None when it is a tracer (checks then skip)."""
    try:
        return np.asarray(x)
    except Exception:  # jax tracers refuse conversion
        return None


def _check_chunk(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")


def _check_ids_in_range(ids, vocab: int, name: str) -> None:
    arr = _concrete(ids)
    if arr is None or arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"{name}: expected token ids in [0, {vocab}) (the vocabulary size), got min {lo}, max {hi}"
        )


def _lp_block(logits, targets):
    """[B, c, V], [B, c] -> [B, c] float32 log-probs of ``targets``."""
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def _chunked(block_fn, T: int, chunk: int, out_shape):
    """Run ``block_fn(start) -> [B, chunk]`` over ``ceil(T / chunk)`` chunks.

    The last chunk's start is clamped to ``T - chunk`` (as ``dynamic_slice`` does), so
    it overlaps the previous one; the overlapping positions are recomputed with the
    same values, so no padding copy of the inputs is needed.
    """
    n = -(-T // chunk)
    body_fn = jax.checkpoint(block_fn)

    def body(i, out):
        start = jnp.minimum(i * chunk, T - chunk)
        return jax.lax.dynamic_update_slice_in_dim(out, body_fn(start), start, axis=1)

    return jax.lax.fori_loop(0, n, body, jnp.zeros(out_shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _token_logprobs(logits, targets, chunk_size):
    B, T, _ = logits.shape
    if chunk_size is None or chunk_size >= T:
        return _lp_block(logits, targets)

    def block(start):
        lg = jax.lax.dynamic_slice_in_dim(logits, start, chunk_size, axis=1)
        tg = jax.lax.dynamic_slice_in_dim(targets, start, chunk_size, axis=1)
        return _lp_block(lg, tg)

    return _chunked(block, T, chunk_size, (B, T))


def _check_targets(targets, bt, against: str) -> None:
    check_rank(targets, "targets", 2, "[B, T]")
    check_int(targets, "targets")
    if tuple(bt) != tuple(np.shape(targets)):
        raise ValueError(f"targets: expected shape [B, T]={tuple(bt)} matching {against}, "
                         f"got {tuple(np.shape(targets))}")


def token_logprobs(logits, targets, chunk_size: int | None = None):
    """Log-probability of each target under its logits row.

    Args:
      logits: [B, T, V] float (float32 or bf16; the reduction runs in float32).
      targets: [B, T] int token ids in [0, V).
      chunk_size: process the T axis in chunks of this many positions (None: all at once).
    Returns:
      [B, T] float32 ``logits[b, t, targets[b, t]] - logsumexp(logits[b, t])``.
    """
    check_rank(logits, "logits", 3, "[B, T, V]")
    check_float(logits, "logits")
    _check_targets(targets, logits.shape[:2], "logits")
    _check_chunk(chunk_size)
    _check_ids_in_range(targets, logits.shape[-1], "targets")
    return _token_logprobs(logits, jnp.asarray(targets), chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _token_logprobs_from_hidden(hidden, unembed, targets, bias, chunk_size):
    B, T, _ = hidden.shape

    def project(h):
        lg = jnp.einsum("bcd,vd->bcv", h, unembed, preferred_element_type=jnp.float32)
        return lg if bias is None else lg + bias.astype(jnp.float32)

    if chunk_size is None or chunk_size >= T:
        return _lp_block(project(hidden), targets)

    def block(start):
        h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk_size, axis=1)
        tg = jax.lax.dynamic_slice_in_dim(targets, start, chunk_size, axis=1)
        return _lp_block(project(h), tg)

    return _chunked(block, T, chunk_size, (B, T))


def token_logprobs_from_hidden(hidden, unembed, targets, bias=None, chunk_size: int | None = None):
    """Per-token log-probs straight from final hidden states, chunk by chunk.

    ``logits = hidden @ unembed.T (+ bias)`` is formed one chunk of positions at a
    time with float32 accumulation, so at most ``[B, chunk, V]`` logits exist at once
    (also in the backward pass: each chunk is rematerialised).

    Args:
      hidden: [B, T, D] float, the final (post-norm) hidden states.
      unembed: [V, D] float, the output projection in Hugging Face layout
        (``lm_head.weight``, or the tied token embedding).
      targets: [B, T] int token ids in [0, V).
      bias: optional [V] output bias.
      chunk_size: positions per chunk (None: all at once).
    Returns:
      [B, T] float32 log-probs, equal to ``token_logprobs(hidden @ unembed.T, targets)``.
    """
    check_rank(hidden, "hidden", 3, "[B, T, D]")
    check_float(hidden, "hidden")
    check_rank(unembed, "unembed", 2, "[V, D]")
    check_float(unembed, "unembed")
    if unembed.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"unembed: expected shape [V, D] with D={hidden.shape[2]} (hidden's last axis), "
            f"got {tuple(unembed.shape)}"
        )
    _check_targets(targets, hidden.shape[:2], "hidden")
    if bias is not None:
        check_rank(bias, "bias", 1, "[V]")
        if bias.shape[0] != unembed.shape[0]:
            raise ValueError(f"bias: expected shape [V]=({unembed.shape[0]},), got {tuple(bias.shape)}")
    _check_chunk(chunk_size)
    _check_ids_in_range(targets, unembed.shape[0], "targets")
    return _token_logprobs_from_hidden(hidden, unembed, jnp.asarray(targets), bias, chunk_size)


@jax.jit
def masked_sum(values, mask):
    """[B, T] values, [B, T] mask (bool/int/float) -> [B] float32 sum of masked values."""
    return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32), axis=-1)


def shift_for_lm(ids, mask):
    """Align a sequence with its next-token targets.

    Args:
      ids: [B, T] int token ids.
      mask: [B, T] loss mask aligned to ``ids`` (1 = this token is scored).
    Returns:
      ``(inputs, targets, target_mask)``, each [B, T-1]: ``inputs = ids[:, :-1]``,
      ``targets = ids[:, 1:]``, ``target_mask = mask[:, 1:]``. Feed the model ``ids``
      (or ``inputs``) and score ``logits[:, :T-1]`` against ``targets``; token
      ``ids[:, 0]`` is never scored.
    """
    check_rank(ids, "ids", 2, "[B, T]")
    check_int(ids, "ids")
    check_rank(mask, "mask", 2, "[B, T]")
    check_same_shape(ids, mask, "ids", "mask")
    if ids.shape[1] < 2:
        raise ValueError(f"ids: expected at least 2 positions to shift, got shape {tuple(ids.shape)}")
    ids = jnp.asarray(ids)
    mask = jnp.asarray(mask)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def sequence_logprob(logits, input_ids, response_mask, chunk_size: int | None = None,
                     allow_empty: bool = False):
    """Sum of response-token log-probs, ``sum_t mask[t] * log p(ids[t] | ids[<t])``.

    Args:
      logits: [B, T, V] the model's logits for ``input_ids`` (position t predicts t+1).
      input_ids: [B, T] int token ids.
      response_mask: [B, T] aligned to ``input_ids`` (1 = response token). Must be 0 at
        position 0 (nothing predicts the first token).
      chunk_size: see :func:`token_logprobs`.
      allow_empty: if False (default), a row without response tokens raises ValueError
        (checked when the mask is concrete).
    Returns:
      [B] float32 summed log-probs.
    """
    check_rank(logits, "logits", 3, "[B, T, V]")
    check_rank(input_ids, "input_ids", 2, "[B, T]")
    check_int(input_ids, "input_ids")
    check_rank(response_mask, "response_mask", 2, "[B, T]")
    check_same_shape(input_ids, response_mask, "input_ids", "response_mask")
    if tuple(logits.shape[:2]) != tuple(np.shape(input_ids)):
        raise ValueError(
            f"input_ids: expected shape [B, T]={tuple(logits.shape[:2])} matching logits, "
            f"got {tuple(np.shape(input_ids))}"
        )
    m = _concrete(response_mask)
    if m is not None:
        if m.shape[1] > 0 and np.any(m[:, 0] != 0):
            raise ValueError(
                "response_mask: expected 0 at position 0 (the first token has no prefix to "
                f"predict it), got nonzero in rows {np.nonzero(m[:, 0])[0].tolist()}"
            )
        if not allow_empty:
            empty = np.nonzero(~np.any(m != 0, axis=1))[0]
            if empty.size:
                raise ValueError(
                    "response_mask: expected at least one response token per row, rows "
                    f"{empty.tolist()} are empty (pass allow_empty=True to score them as 0)"
                )
    if logits.shape[1] < 2:
        raise ValueError(f"logits: expected T >= 2 positions, got shape {tuple(logits.shape)}")
    check_float(logits, "logits")
    _check_chunk(chunk_size)
    _check_ids_in_range(input_ids, logits.shape[-1], "input_ids")
    return _sequence_logprob(logits, jnp.asarray(input_ids), jnp.asarray(response_mask), chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _sequence_logprob(logits, input_ids, response_mask, chunk_size):
    lp = _token_logprobs(logits[:, :-1], input_ids[:, 1:], chunk_size)
    return masked_sum(lp, response_mask[:, 1:])


# ----------------------------------------------------------------------------- models


def response_token_logprobs(model, ids, attention_mask, response_mask):
    """Per-token log p(ids[t] | ids[<t]) [B, T-1] and the matching mask (response tokens only).

    ids / masks: [B, T]; ``response_mask[t] = 1`` marks ids[t] as a response token.
    """
    logits = model(ids, attention_mask).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:])
    return lp, response_mask[:, 1:].astype(jnp.float32)


def sft_loss(model, batch: Mapping, rng=None):
    """Mean NLL per response token; aux: token accuracy. ``batch``: ids, attention_mask, response_mask."""
    logits = model(batch["ids"], batch["attention_mask"]).logits
    lp = token_logprobs(logits[:, :-1], batch["ids"][:, 1:])
    m = batch["response_mask"][:, 1:].astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    loss = -(lp * m).sum() / n
    acc = ((jnp.argmax(logits[:, :-1], -1) == batch["ids"][:, 1:]) * m).sum() / n
    return loss, {"token_acc": acc}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _seq_logprob(graphdef, state, ids, attention_mask, response_mask):
    model = nnx.merge(graphdef, state)
    lp, m = response_token_logprobs(model, ids, attention_mask, response_mask)
    return (lp * m).sum(-1), m.sum(-1)


def sequence_logprobs(model, ids, attention_mask, response_mask, batch_size: int = 64):
    """Summed float32 response-token log-probs [N] of every row, in fixed-size jitted batches
    (:func:`swiftjax.batching.map_batches`: one compilation serves any N). Returns
    (logp [N], ntok [N])."""
    graphdef, state = nnx.split(model)
    lp, cnt = map_batches(lambda i, a, r: _seq_logprob(graphdef, state, i, a, r),
                          (ids, attention_mask, response_mask), batch_size)
    return lp, cnt
