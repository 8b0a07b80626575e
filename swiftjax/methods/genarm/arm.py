"""GenARM: autoregressive reward model (ARM) loss and reward-guided next-token distributions.

Xu et al., "GenARM: Reward Guided Generation with Autoregressive Reward Model for
Test-Time Alignment" (arXiv 2410.08193).

* An ARM is a causal LM ``pi_r`` whose reward is ``r(x, y) = beta_r * sum_t log pi_r(y_t | x, y_<t)``
  (:func:`arm_reward`; the sum comes from :func:`swiftjax.logprobs.sequence_logprob`).
* Training on preference pairs, no reference model (:func:`arm_loss`):
  ``-log sigmoid(beta_r*(lp_w - lp_l) - gamma)`` or the hinge ``relu(1 - beta_r*(lp_w - lp_l))``.
* Guided decoding (:func:`guided_logits`, :func:`guided_logprobs`, :func:`sample_guided`):
  ``s(v) = log_softmax(base)[v] + sum_i alpha_i * log_softmax(arm_i)[v]`` over the base
  vocabulary V, sampled from ``softmax(s / T)``. An ARM whose vocabulary is longer than
  V is normalised over its own vocabulary and then truncated to the first V entries
  (normalising after truncation would only shift ``s`` by a per-row constant, which
  leaves ``softmax(s / T)`` unchanged). The weights ``alphas`` and the temperature are
  traced arguments: changing them does not recompile.
* :func:`check_vocab_compatible` refuses ARMs whose token-id space differs from the base's.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._checks import check_finite, check_float, check_rank, check_scalar, check_vector, concrete

__all__ = [
    "arm_loss",
    "arm_reward",
    "guided_logits",
    "guided_logprobs",
    "sample_guided",
    "check_vocab_compatible",
]

_sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------- ARM training


@functools.partial(jax.jit, static_argnames=("kind",))
def _arm_loss(arm_w, arm_l, beta_r, gamma, kind):
    z = beta_r * (arm_w.astype(jnp.float32) - arm_l.astype(jnp.float32))
    if kind == "sigmoid":
        losses = -jax.nn.log_sigmoid(z - gamma)
    else:
        losses = jax.nn.relu(1.0 - z)
    loss = jnp.mean(losses)
    r_w = _sg(beta_r * arm_w.astype(jnp.float32))
    r_l = _sg(beta_r * arm_l.astype(jnp.float32))
    metrics = {
        "loss": _sg(loss),
        "reward_chosen": jnp.mean(r_w),
        "reward_rejected": jnp.mean(r_l),
        "reward_margin": jnp.mean(r_w - r_l),
        "accuracy": jnp.mean((r_w > r_l).astype(jnp.float32)),
    }
    return loss, metrics


def arm_loss(arm_w, arm_l, beta_r=0.05, gamma=0.0, kind: str = "sigmoid",
             length_normalize: bool = False, len_w=None, len_l=None):
    """Preference loss for an autoregressive reward model.

    Args:
      arm_w, arm_l: [B] float32 sums of the ARM's response-token log-probs on the
        chosen / rejected response (EOS included, prompt masked).
      beta_r: positive scalar (traced).
      gamma: target margin, sigmoid loss only (traced; must be 0 for the hinge).
      kind: ``'sigmoid'``: ``-log sigmoid(beta_r*(w - l) - gamma)``;
        ``'hinge'``: ``relu(1 - beta_r*(w - l))``.
      length_normalize: if True, ``w`` and ``l`` are divided by ``len_w`` / ``len_l``
        ([B] response lengths in tokens, required then) before the loss.
    Returns:
      ``(loss, metrics)``: mean loss; metrics ``loss``, ``reward_chosen`` /
      ``reward_rejected`` (means of ``beta_r * lp``), ``reward_margin``, ``accuracy``
      (chosen reward strictly above rejected).
    """
    B = check_vector(arm_w, "arm_w")
    check_vector(arm_l, "arm_l", B)
    check_scalar(beta_r, "beta_r", positive=True)
    check_scalar(gamma, "gamma")
    if kind not in ("sigmoid", "hinge"):
        raise ValueError(f"kind: expected 'sigmoid' or 'hinge', got {kind!r}")
    g = concrete(gamma)
    if kind == "hinge" and (g is None or float(g) != 0.0):
        raise ValueError(f"gamma: the hinge loss has no target margin; expected gamma=0, got {gamma!r}")
    if length_normalize:
        if len_w is None or len_l is None:
            raise ValueError("len_w, len_l: expected [B] response lengths with length_normalize=True, got None")
        for x, n in ((len_w, "len_w"), (len_l, "len_l")):
            check_rank(x, n, 1, "[B]")
            if x.shape[0] != B:
                raise ValueError(f"{n}: expected shape [B]=({B},), got {tuple(x.shape)}")
            v = concrete(x)
            if v is not None and np.any(v <= 0):
                raise ValueError(f"{n}: expected positive lengths, got min {v.min()}")
        arm_w = jnp.asarray(arm_w, jnp.float32) / jnp.asarray(len_w, jnp.float32)
        arm_l = jnp.asarray(arm_l, jnp.float32) / jnp.asarray(len_l, jnp.float32)
    elif len_w is not None or len_l is not None:
        raise ValueError("len_w, len_l: only used with length_normalize=True")
    return _arm_loss(arm_w, arm_l, jnp.float32(beta_r), jnp.float32(gamma), kind)


def arm_reward(seq_logprob, beta_r=0.05):
    """ARM reward ``beta_r * sum_t log pi_r(y_t | x, y_<t)``: [B] -> [B] float32."""
    check_float(seq_logprob, "seq_logprob")
    check_scalar(beta_r, "beta_r", positive=True)
    return jnp.float32(beta_r) * jnp.asarray(seq_logprob, jnp.float32)


# ----------------------------------------------------------------------------- guided decoding


def _scores(base_logits, arm_logits, alphas):
    """base [B, V]; arm_logits: [K, B, V'] array or tuple of [B, V_i]; alphas [K]."""
    V = base_logits.shape[-1]
    s = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    alphas = alphas.astype(jnp.float32)
    if isinstance(arm_logits, tuple):
        for i, a in enumerate(arm_logits):
            s = s + alphas[i] * jax.nn.log_softmax(a.astype(jnp.float32), axis=-1)[:, :V]
    else:
        arm_lp = jax.nn.log_softmax(arm_logits.astype(jnp.float32), axis=-1)[..., :V]
        s = s + jnp.einsum("k,kbv->bv", alphas, arm_lp)
    return s


_scores_jit = jax.jit(_scores)


@jax.jit
def _guided_logprobs(base_logits, arm_logits, alphas, temperature):
    return jax.nn.log_softmax(_scores(base_logits, arm_logits, alphas) / temperature, axis=-1)


@jax.jit
def _sample(key, base_logits, arm_logits, alphas, temperature):
    s = _scores(base_logits, arm_logits, alphas) / temperature
    return jax.random.categorical(key, s, axis=-1).astype(jnp.int32)


def _check_arm_logits(a, name: str, rank: int, layout: str, B: int, V: int) -> None:
    """An ARM's logits: float, ``layout``, batch B on the second-to-last axis and a vocabulary
    at least the base's V on the last (a longer one is padding; a shorter one cannot agree)."""
    check_rank(a, name, rank, layout)
    check_float(a, name)
    if a.shape[-2] != B:
        raise ValueError(f"{name}: expected batch B={B}, got shape {tuple(a.shape)}")
    if a.shape[-1] < V:
        raise ValueError(f"{name}: ARM vocabulary ({a.shape[-1]}) is shorter than the base "
                         f"vocabulary ({V}); the token-id spaces cannot agree")


def _prepare(base_logits, arm_logits, alphas):
    check_rank(base_logits, "base_logits", 2, "[B, V]")
    check_float(base_logits, "base_logits")
    B, V = base_logits.shape
    if isinstance(arm_logits, (list, tuple)):
        arms = tuple(arm_logits)
        if not arms:
            raise ValueError("arm_logits: expected at least one ARM's logits, got an empty sequence")
        for i, a in enumerate(arms):
            _check_arm_logits(a, f"arm_logits[{i}]", 2, "[B, V_i]", B, V)
        K = len(arms)
        packed = arms
    else:
        _check_arm_logits(arm_logits, "arm_logits", 3, "[K, B, V']", B, V)
        K = arm_logits.shape[0]
        if K < 1:
            raise ValueError("arm_logits: expected at least one ARM (K >= 1), got K = 0")
        packed = arm_logits
    if np.shape(alphas) != (K,):
        raise ValueError(f"alphas: expected shape [K]=({K},), one weight per ARM, got {np.shape(alphas)}")
    check_finite(alphas, "alphas")
    return packed, jnp.asarray(alphas, jnp.float32)


def guided_logits(base_logits, arm_logits, alphas):
    """GenARM's guided scores ``s = log_softmax(base) + sum_i alpha_i log_softmax(arm_i)[:V]``.

    Args:
      base_logits: [B, V] the base model's next-token logits.
      arm_logits: [K, B, V'] (V' >= V) or a list of K arrays [B, V_i] (V_i >= V): the
        ARMs' next-token logits at the same step. Longer vocabularies are truncated to
        the first V entries after normalisation; shorter ones raise ValueError.
      alphas: [K] float weights (traced: new values do not recompile).
    Returns:
      [B, V] float32 scores ``s``; sample from ``softmax(s / T)``.
    """
    packed, alphas = _prepare(base_logits, arm_logits, alphas)
    return _scores_jit(base_logits, packed, alphas)


def guided_logprobs(base_logits, arm_logits, alphas, temperature=1.0):
    """``log_softmax(guided_logits(...) / temperature)``: [B, V] float32 log-probs of the
    guided next-token distribution (``∝ pi_base * prod_i pi_arm_i^alpha_i`` at T = 1)."""
    packed, alphas = _prepare(base_logits, arm_logits, alphas)
    check_scalar(temperature, "temperature", positive=True)
    return _guided_logprobs(base_logits, packed, alphas, jnp.float32(temperature))


def sample_guided(key, base_logits, arm_logits, alphas, temperature=1.0):
    """Draw one token per row from ``softmax(guided_logits(...) / temperature)``.

    Args:
      key: a ``jax.random`` key. Other arguments as :func:`guided_logprobs`.
    Returns:
      [B] int32 token ids in [0, V).
    """
    packed, alphas = _prepare(base_logits, arm_logits, alphas)
    check_scalar(temperature, "temperature", positive=True)
    return _sample(key, base_logits, packed, alphas, jnp.float32(temperature))


# ----------------------------------------------------------------------------- vocabularies


def _vocab_of(obj, name: str) -> dict:
    if hasattr(obj, "get_vocab"):
        vocab = obj.get_vocab()
    elif isinstance(obj, Mapping):
        vocab = obj
    else:
        raise ValueError(
            f"{name}: expected a tokenizer with get_vocab() or a dict token -> id, got {type(obj).__name__}"
        )
    if not isinstance(vocab, Mapping) or not vocab:
        raise ValueError(f"{name}: expected a non-empty token -> id mapping, got {type(vocab).__name__} "
                         f"of size {len(vocab) if hasattr(vocab, '__len__') else '?'}")
    inv: dict[int, object] = {}
    for tok, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"{name}: expected non-negative int ids, got {tok!r} -> {i!r}")
        i = int(i)
        if i in inv and inv[i] != tok:
            raise ValueError(f"{name}: id {i} is assigned to two tokens, {inv[i]!r} and {tok!r}")
        inv[i] = tok
    return inv


def check_vocab_compatible(base, arm) -> int:
    """Refuse an ARM whose token-id space differs from the base model's.

    Every id below the base vocabulary size ``V = max base id + 1`` must name the same
    token in both (an id missing from both is fine); ARM ids at or above ``V`` are
    allowed (guided decoding truncates them).

    Args:
      base, arm: tokenizers with ``get_vocab()`` or dicts token -> id.
    Returns:
      V, the base vocabulary size.
    Raises:
      ValueError naming the first differing id and both tokens, and how many ids differ.
    """
    inv_b = _vocab_of(base, "base")
    inv_a = _vocab_of(arm, "arm")
    V = max(inv_b) + 1
    V_arm = max(inv_a) + 1
    if V_arm < V:
        raise ValueError(
            f"arm: vocabulary covers ids [0, {V_arm}) but the base's covers [0, {V}); "
            "the ARM cannot score the base's tokens"
        )
    diff = [i for i in range(V) if inv_b.get(i) != inv_a.get(i)]
    if diff:
        i = diff[0]
        raise ValueError(
            f"arm: token-id spaces differ from the base's at {len(diff)} of {V} ids; first at id {i}: "
            f"base {inv_b.get(i, '<missing>')!r} vs arm {inv_a.get(i, '<missing>')!r}. Guided "
            "decoding needs the same tokenizer (same ids for the same tokens)"
        )
    return V

