"""GenARM guided decoding over KV caches, and the ARGS baseline it is benchmarked against.

* :func:`guided_generate` samples from GenARM's guided distribution
  ``softmax((log_softmax(base) + sum_i alpha_i log_softmax(arm_i)[:V]) / T)`` at every step
  (:func:`swiftjax.methods.genarm.arm.guided_logits`). It runs :func:`swiftjax.sampling.generate` with the ARMs
  as ``extra_models``: one jitted loop, every model with its own KV cache, all consuming the
  same sampled ids. The weights ``alphas`` are traced ``combine_args``: a new weight vector
  (a point on a Pareto front) reuses the compiled loop. Each ARM may be prefilled with its
  own prompt ids (``arm_inputs``, e.g. its own template); a smaller ARM guiding a larger
  base (weak-to-strong) is fine as long as the token-id spaces agree.
* :func:`args_generate` is ARGS (Khanov et al., 2024): at each step the base's top-k next
  tokens are each scored by a *full-sequence* reward model on prompt + response so far +
  candidate (one uncached forward per candidate, fixed [B*k, T+N] shapes), and the token
  maximising ``log pi_base(c) + w * reward(c)`` is taken (or sampled from the softmax of
  that score when ``cfg.temperature > 0``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swiftjax.methods.genarm import arm as _arm
from swiftjax._checks import check_finite, check_int, check_rank, check_same_shape
from swiftjax.sampling import GenerateOutput, LMDecoder, SamplingConfig, generate, run_sampler
from swiftjax.logprobs import token_logprobs

__all__ = ["guided_combine", "guided_generate", "arm_sequence_reward", "args_generate"]


# ----------------------------------------------------------------------------- GenARM


def guided_combine(logits_list, alphas):
    """``combine`` for :func:`swiftjax.sampling.generate`: logits_list = [base [B, V], arm_1
    [B, V_1], ...], alphas [K] (traced) -> guided scores [B, V] float32."""
    return _arm.guided_logits(logits_list[0], tuple(logits_list[1:]), alphas)


def _check_prompt(ids, mask, where: str):
    ids = jnp.asarray(ids)
    check_rank(ids, f"{where} ids", 2, "[B, T]")
    check_int(ids, f"{where} ids")
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    check_same_shape(ids, mask, f"{where} ids", f"{where} mask")
    return ids, mask


def _vocab_size(m, name: str) -> int:
    cfg = getattr(m, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise ValueError(f"{name}: expected a swiftjax causal LM with a .config, got {type(m).__name__}")
    return int(cfg.vocab_size)


def guided_generate(base, arms: Sequence, alphas, ids, mask=None, *, key=None, cfg: SamplingConfig,
                    temperature: float | None = None, arm_inputs: Sequence | None = None,
                    base_tokenizer=None, arm_tokenizers: Sequence | None = None,
                    cache_dtype=jnp.float32) -> GenerateOutput:
    """Sample from GenARM's guided distribution ``∝ pi_base * prod_i pi_arm_i^alpha_i`` (T = 1).

    Args:
      base: the base causal LM (vocabulary V).
      arms: K >= 1 ARMs (causal LMs with vocabulary >= V; any depth / width).
      alphas: [K] finite weights (traced: changing them never recompiles).
      ids, mask: [B, T] left-padded prompt of the base (mask defaults to all ones).
      key: a ``jax.random`` key (required unless greedy).
      cfg: max_new_tokens, eos_ids, pad_id, top_k / top_p (applied to the guided scores).
      temperature: overrides ``cfg.temperature`` when given (0 = greedy arg-max of the
        guided scores); it is a static setting: a new temperature compiles anew.
      arm_inputs: optional, one per ARM: None (prefill with ``ids``/``mask``) or that ARM's
        own left-padded ``(ids [B, T_i], mask [B, T_i])``.
      base_tokenizer, arm_tokenizers: optional; when given, every ARM's tokenizer must agree
        with the base's on every base id (:func:`swiftjax.methods.genarm.arm.check_vocab_compatible`).
    Returns:
      :class:`swiftjax.sampling.GenerateOutput`; ``logprobs`` are log-probs of the sampled
      tokens under the guided distribution at T = 1 (before top-k / top-p).
    """
    arms = list(arms) if not isinstance(arms, nnx.Module) else [arms]
    if not arms:
        raise ValueError("arms: expected at least one ARM, got none "
                         "(use swiftjax.sampling.generate for plain sampling)")
    k = len(arms)
    a = np.asarray(alphas, dtype=np.float64) if not isinstance(alphas, jax.Array) else alphas
    if np.shape(a) != (k,):
        raise ValueError(f"alphas: expected shape [K]=({k},), one weight per ARM, got {np.shape(a)}")
    check_finite(a, "alphas")
    ids, mask = _check_prompt(ids, mask, "prompt")
    v = _vocab_size(base, "base")
    for i, m in enumerate(arms):
        va = _vocab_size(m, f"arms[{i}]")
        if va < v:
            raise ValueError(f"arms[{i}]: vocabulary size {va} is smaller than the base's {v}; the "
                             "token-id spaces cannot agree")
    if arm_tokenizers is not None or base_tokenizer is not None:
        if base_tokenizer is None or arm_tokenizers is None or len(arm_tokenizers) != k:
            raise ValueError("base_tokenizer, arm_tokenizers: expected both, one tokenizer per ARM "
                             f"({k}), to check vocabularies")
        for i, t in enumerate(arm_tokenizers):
            try:
                _arm.check_vocab_compatible(base_tokenizer, t)
            except ValueError as e:
                raise ValueError(f"arms[{i}]: {e}") from None
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        cfg = dataclasses.replace(cfg, temperature=float(temperature))
    extra = None
    if arm_inputs is not None:
        if len(arm_inputs) != k:
            raise ValueError(f"arm_inputs: expected one entry per ARM ({k}), got {len(arm_inputs)}")
        extra = [None if p is None else _check_prompt(p[0], p[1], f"arm_inputs[{i}]")
                 for i, p in enumerate(arm_inputs)]
    return generate(base, ids, mask, key=key, cfg=cfg, extra_models=arms, combine=guided_combine,
                    combine_args=jnp.asarray(a, jnp.float32), cache_dtype=cache_dtype,
                    extra_inputs=extra)


# ----------------------------------------------------------------------------- ARGS


def arm_sequence_reward(rm, ids, attention_mask, response_mask):
    """Full-sequence reward of an ARM: ``sum_t log pi_rm(ids[t] | ids[<t])`` over response
    tokens. ids / masks [N, S] (right padding allowed) -> [N] float32. Module-level (a static
    argument of :func:`args_generate`); multiply by beta_r to get the ARM's reward."""
    logits = rm(ids, attention_mask).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:])
    return jnp.sum(lp * response_mask[:, 1:].astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class _ArgsDecoder(LMDecoder):
    """The base decodes over its KV cache; each step its top-k tokens are re-ranked by
    ``log pi_base(c) + w * reward_fn(rm, prompt + response so far + c)`` (fixed [B*k, T+N])."""

    k: int = 10
    reward_fn: Callable | None = None
    max_new_tokens: int = 1

    def prefill(self, models, ctx, prompts, cfg):
        ids, mask = prompts[0]
        caches, logits = super().prefill(lambda: models()[:1], None, prompts[:1], cfg)
        b, n = ids.shape[0], cfg.max_new_tokens
        seq = jnp.concatenate([ids, jnp.full((b, n), cfg.pad_id, jnp.int32)], 1)
        seq_mask = jnp.concatenate([mask, jnp.zeros((b, n), jnp.int32)], 1)
        return {"cache": caches[0], "seq": seq, "seq_mask": seq_mask}, logits

    def choose(self, models, ctx, key, state, cfg):
        rm = models()[1]
        b, size = state.aux["seq"].shape
        t = size - cfg.max_new_tokens
        col = jnp.arange(size)[None, :]
        lp_base = jax.nn.log_softmax(state.logits.astype(jnp.float32), axis=-1)   # [B, V]
        top_lp, top_ids = jax.lax.top_k(lp_base, self.k)                          # [B, k]
        here = col == t + state.step                                               # [1, S]
        cand = jnp.where(here, top_ids.reshape(b * self.k, 1), jnp.repeat(state.aux["seq"], self.k, 0))
        cmask = jnp.where(here, 1, jnp.repeat(state.aux["seq_mask"], self.k, 0))
        resp = ((col >= t) & (col <= t + state.step)).astype(jnp.int32) * cmask
        reward = self.reward_fn(rm, cand, cmask, resp).reshape(b, self.k).astype(jnp.float32)
        score = top_lp + ctx * reward
        if cfg.temperature == 0:
            j = jnp.argmax(score, axis=-1)
        else:
            j = jax.random.categorical(key, score / cfg.temperature, axis=-1)
        tok = jnp.take_along_axis(top_ids, j[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return tok, jnp.take_along_axis(lp_base, tok[:, None], axis=-1)[:, 0]

    def advance(self, models, ctx, aux, tok, live, step):
        size = aux["seq"].shape[1]
        here = jnp.arange(size)[None, :] == (size - self.max_new_tokens) + step
        cache, logits = super().advance(lambda: models()[:1], None, [aux["cache"]], tok, live, step)
        return {"cache": cache[0], "seq": jnp.where(here, tok[:, None], aux["seq"]),
                "seq_mask": jnp.where(here, 1, aux["seq_mask"])}, logits


def args_generate(base, reward_model, ids, mask=None, *, k: int = 10, w: float = 1.0, key=None,
                  cfg: SamplingConfig, reward_fn: Callable = arm_sequence_reward,
                  cache_dtype=jnp.float32) -> GenerateOutput:
    """ARGS decoding: top-k candidates of the base re-ranked by a full-sequence reward model.

    Args:
      base: the base causal LM (uses its KV cache).
      reward_model: the model handed to ``reward_fn`` (e.g. an ARM, or a scalar-head RM).
      ids, mask: [B, T] left-padded prompts.
      k: candidates per step (ARGS default 10). w: reward weight (traced).
      key: needed when ``cfg.temperature > 0`` (then the token is sampled from
        ``softmax(score / T)`` over the k candidates; 0 = ARGS-greedy arg-max).
      cfg: max_new_tokens, eos_ids, pad_id, temperature; top_k / top_p must be off.
      reward_fn: module-level ``fn(reward_model, ids [N, S], mask [N, S], response_mask [N, S])
        -> [N]``; it sees S = T + max_new_tokens columns, right-padded after the candidate.
    Returns:
      :class:`swiftjax.sampling.GenerateOutput` (``logprobs`` under the base at T = 1).
    """
    ids, mask = _check_prompt(ids, mask, "prompt")
    if np.any(np.asarray(mask)[:, -1] == 0):
        raise ValueError("mask: expected left padding (every row's last token real)")
    v = _vocab_size(base, "base")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= v:
        raise ValueError(f"k: expected an int in [1, {v}] (the base vocabulary), got {k!r}")
    check_finite(np.asarray(w, np.float64), "w")
    if np.ndim(w) != 0:
        raise ValueError(f"w: expected a scalar, got shape {np.shape(w)}")
    if cfg.top_k or cfg.top_p < 1.0:
        raise ValueError(f"cfg: ARGS picks among its own top-k; expected top_k=0 and top_p=1, got "
                         f"top_k={cfg.top_k}, top_p={cfg.top_p}")
    if key is None:
        if cfg.temperature != 0:
            raise ValueError("args_generate: a jax.random key is required when temperature > 0")
        key = jax.random.key(0)
    if _vocab_size(reward_model, "reward_model") < v:
        raise ValueError(f"reward_model: vocabulary size {reward_model.config.vocab_size} is smaller than "
                         f"the base's {v}")
    decoder = _ArgsDecoder(cache_dtype=cache_dtype, k=int(k), reward_fn=reward_fn,
                           max_new_tokens=cfg.max_new_tokens)
    out, _ = run_sampler(decoder, [base, reward_model], [(ids, mask), (ids[:, -1:], mask[:, -1:])], key=key, cfg=cfg,
                         args=jnp.float32(w))
    return out
