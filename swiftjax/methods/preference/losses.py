"""Losses for training a policy from demonstrations and preferences.

Everything here is a pure, jitted function of arrays of *sequence* log-probs
(float32 sums over response tokens, see :mod:`swiftjax.logprobs`) or of per-token
arrays. Every reference quantity (reference / frozen policy log-probs, virtual
references, weights, returns) is wrapped in ``jax.lax.stop_gradient``, so a caller
may pass arrays that still carry a graph without leaking gradient into them.

Losses that compare two responses return ``(loss, metrics)``: ``loss`` is a float32
scalar (mean over the batch) and ``metrics`` a dict of float32 scalars (no gradient).

Methods
-------
* SFT: :func:`sft_loss`.
* DPO: :func:`dpo_loss` (Rafailov et al. 2023).
* MRPO (Le et al., arXiv 2405.16388): :func:`mrpo_loss` and its parts
  :func:`virtual_reference`, :func:`ctro_clip`, :func:`ctro_eps`, :func:`arwc_weights`,
  :func:`uniform_weights`, :func:`validation_weights`. Conventions below.
* IRFT (Li et al., arXiv 2405.17888): :func:`irft_loss`.
* RFT: :func:`bt_reward_loss`, :func:`bt_token_reward_loss`, :func:`first_divergence`,
  :func:`kl_regularised_pg_loss`.

MRPO conventions (reference index 0 is the primary reference, the policy's
initialisation; indices 1..K-1 are the extra references)
---------------------------------------------------------------------------------
* Virtual reference, ``virtual='harmonic'`` (the paper's closed form):
  ``log pi~ = -logsumexp_k(log alpha_k - lp_k)``, i.e. ``pi~ = (sum_k alpha_k / pi_k)^-1``.
  ``virtual='geometric'`` (ablation): ``log pi~ = sum_k alpha_k lp_k``. The true
  geometric mixture also subtracts ``log Z(x)``, which is the same for y_w and y_l
  of one prompt (the weights are per example, shared by both responses) and cancels
  in the DPO margin, so it is left out.
* CTRO: each extra reference's log-prob is clipped into the band between
  ``(1+eps)*lp_pri`` and ``(1-eps)*lp_pri`` (lower/upper chosen by value, so it is
  right for negative log-probs), separately for chosen (``eps_w``) and rejected
  (``eps_l``). Adaptive split: with ``b = mean over the K references of the unclipped
  log-probs`` of a response, ``eps_w = eps*|b_w|/(|b_w|+|b_l|)``, ``eps_l = eps - eps_w``
  (an even split if both are 0); a negative ``eps`` means the fixed ``|eps|`` for both.
  ``eps=0`` collapses every extra reference onto the primary one (the loss is then
  DPO against the primary reference up to float rounding); ``eps=None`` disables CTRO.
* ARWC: per example, from each reference's *unclipped* margin
  ``m_k = lp_k(y_w) - lp_k(y_l)``.
  ``convention='paper'``: each reference is weighted by its own confidence,
  ``alpha_k = |m_k| / (sum_j |m_j| + 1e-6)`` for the extra references and
  ``alpha_0 = 1 - sum_{k>=1} alpha_k`` (so the weights sum to 1 exactly; with K = 2
  this is ``alpha_ext = |m_ext| / (|m_ext| + |m_pri| + 1e-6)``, weighting ``1/pi_ext``).
  ``convention='code'`` (K = 2 only) reproduces ``trainer_mref.py`` of the reference
  implementation: the same number ``|m_ext| / (|m_ext| + |m_pri| + 1e-6)`` multiplies
  ``1/pi_pri`` and its complement ``1/pi_ext``, i.e. each reference is weighted by the
  *other* reference's confidence. The paper's equation text was not available to
  check here; ``'paper'`` follows the spec's reading (a reference's weight grows with
  its own discriminative confidence). Per-example ARWC uses the example's label
  (label leakage, arXiv 2512.10040); ``weighting='uniform'`` and fixed weights from
  :func:`validation_weights` (``weighting='fixed'``) do not.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._checks import (
    check_finite,
    check_float,
    check_int,
    check_rank,
    check_same_shape,
    check_scalar,
    check_vector,
    concrete,
)

__all__ = [
    "sft_loss",
    "dpo_loss",
    "virtual_reference",
    "ctro_clip",
    "ctro_eps",
    "arwc_weights",
    "uniform_weights",
    "validation_weights",
    "mrpo_loss",
    "irft_loss",
    "bt_reward_loss",
    "first_divergence",
    "bt_token_reward_loss",
    "kl_regularised_pg_loss",
]

_sg = jax.lax.stop_gradient
ARWC_EPS = 1e-6


# ----------------------------------------------------------------------------- checks


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _check_tokens(x, name: str, shape=None, floating: bool = True) -> None:
    check_rank(x, name, 2, "[B, T]")
    if floating:
        check_float(x, name)
        check_finite(x, name)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape [B, T]={tuple(shape)}, got {tuple(x.shape)}")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- SFT


@functools.partial(jax.jit, static_argnames=("reduction",))
def _sft(token_logprobs, mask, reduction):
    m = mask.astype(jnp.float32)
    nll = -jnp.sum(token_logprobs.astype(jnp.float32) * m, axis=-1)  # [B]
    if reduction == "token":
        return jnp.sum(nll) / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.mean(nll)


def sft_loss(token_logprobs, mask, reduction: str = "token"):
    """Negative log-likelihood of the masked tokens.

    Args:
      token_logprobs: [B, T] float per-token log-probs (e.g. from
        ``token_logprobs(logits, targets)`` after :func:`swiftjax.logprobs.shift_for_lm`).
      mask: [B, T] aligned to ``token_logprobs`` (1 = token counts).
      reduction: ``'token'``: total NLL / number of masked tokens (mean NLL per token;
        0 if nothing is masked); ``'sequence'``: mean over B of each row's summed NLL.
    Returns:
      float32 scalar.
    """
    _check_tokens(token_logprobs, "token_logprobs")
    check_rank(mask, "mask", 2, "[B, T]")
    check_same_shape(token_logprobs, mask, "token_logprobs", "mask")
    _check_choice(reduction, "reduction", ("token", "sequence"))
    return _sft(token_logprobs, jnp.asarray(mask), reduction)


# ----------------------------------------------------------------------------- DPO


def _pair_metrics(r_w, r_l):
    r_w, r_l = _sg(r_w), _sg(r_l)
    return {
        "reward_chosen": jnp.mean(r_w),
        "reward_rejected": jnp.mean(r_l),
        "reward_margin": jnp.mean(r_w - r_l),
        "accuracy": jnp.mean((r_w > r_l).astype(jnp.float32)),
    }


def _dpo_core(pi_w, pi_l, ref_w, ref_l, beta):
    r_w = beta * (_f32(pi_w) - _sg(_f32(ref_w)))
    r_l = beta * (_f32(pi_l) - _sg(_f32(ref_l)))
    losses = -jax.nn.log_sigmoid(r_w - r_l)
    loss = jnp.mean(losses)
    metrics = {"loss": _sg(loss), **_pair_metrics(r_w, r_l)}
    return loss, metrics


_dpo_jit = jax.jit(_dpo_core)


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1):
    """DPO: ``mean_b -log sigmoid(beta*[(pi_w - ref_w) - (pi_l - ref_l)])``.

    Args:
      pi_w, pi_l: [B] policy sequence log-probs of the chosen / rejected responses.
      ref_w, ref_l: [B] reference sequence log-probs (stop_gradient inside).
      beta: positive scalar (traced: changing it does not recompile).
    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``reward_chosen``/``reward_rejected``
      (means of ``beta*(pi - ref)``), ``reward_margin`` (mean chosen minus rejected
      reward), ``accuracy`` (fraction with chosen reward strictly above rejected).
    """
    B = check_vector(pi_w, "pi_w")
    for x, n in ((pi_l, "pi_l"), (ref_w, "ref_w"), (ref_l, "ref_l")):
        check_vector(x, n, B)
    check_scalar(beta, "beta", positive=True)
    return _dpo_jit(pi_w, pi_l, ref_w, ref_l, _f32(beta))


# ----------------------------------------------------------------------------- MRPO parts


def _virtual(ref_lps, weights, kind):
    lp = _sg(_f32(ref_lps))
    w = _sg(jnp.broadcast_to(_f32(weights).reshape(weights.shape + (1,) * (lp.ndim - weights.ndim)),
                             lp.shape))
    if kind == "harmonic":
        # log of a zero weight is -inf: that reference drops out of the logsumexp.
        return -jax.nn.logsumexp(jnp.log(w) - lp, axis=0)
    return jnp.sum(w * lp, axis=0)


_virtual_jit = jax.jit(_virtual, static_argnames=("kind",))


def _check_weights(weights, K: int, B: int | None, name: str = "weights") -> None:
    check_float(weights, name)
    shape = tuple(np.shape(weights))
    ok = shape == (K,) or (B is not None and shape == (K, B))
    if not ok:
        want = f"[K]=({K},)" + (f" or [K, B]=({K}, {B})" if B is not None else "")
        raise ValueError(f"{name}: expected shape {want}, got {shape}")
    w = concrete(weights)
    if w is None:
        return
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name}: expected finite non-negative weights, got min {np.nanmin(w)}")
    s = w.sum(axis=0)
    if np.any(np.abs(s - 1.0) > 1e-4):
        raise ValueError(f"{name}: expected weights summing to 1 over the K references, got sums {s}")


def virtual_reference(ref_lps, weights, virtual: str = "harmonic"):
    """MRPO's virtual reference log-prob from K references' sequence log-probs.

    Args:
      ref_lps: [K, B] float sequence log-probs of one response under each reference.
      weights: [K] or [K, B] non-negative weights summing to 1 over K.
      virtual: ``'harmonic'``: ``-logsumexp_k(log w_k - lp_k)`` (weighted harmonic mean
        of the probabilities, computed in log space; stable for any magnitude);
        ``'geometric'``: ``sum_k w_k lp_k`` (unnormalised geometric mixture).
    Returns:
      [B] float32, under stop_gradient.
    """
    check_rank(ref_lps, "ref_lps", 2, "[K, B]")
    check_float(ref_lps, "ref_lps")
    check_finite(ref_lps, "ref_lps")
    K, B = ref_lps.shape
    if K < 1:
        raise ValueError("ref_lps: expected at least one reference (K >= 1), got K = 0")
    _check_weights(weights, K, B)
    _check_choice(virtual, "virtual", ("harmonic", "geometric"))
    return _virtual_jit(ref_lps, jnp.asarray(weights), virtual)


def _clip(lp_ext, lp_pri, eps):
    lp_ext, lp_pri = _sg(_f32(lp_ext)), _sg(_f32(lp_pri))
    a = lp_pri * (1.0 + eps)
    b = lp_pri * (1.0 - eps)
    return jnp.clip(lp_ext, jnp.minimum(a, b), jnp.maximum(a, b))


_clip_jit = jax.jit(_clip)


def ctro_clip(lp_ext, lp_pri, eps):
    """Clip an extra reference's log-prob into the CTRO band around the primary one.

    The band is ``[min(a, b), max(a, b)]`` with ``a = (1+eps)*lp_pri``,
    ``b = (1-eps)*lp_pri``; for negative log-probs and ``eps >= 0`` that is
    ``[(1+eps)*lp_pri, (1-eps)*lp_pri]``. Values inside the band are unchanged.

    Args:
      lp_ext: [...] float extra-reference log-probs.
      lp_pri: same shape, primary-reference log-probs.
      eps: scalar or an array broadcastable to ``lp_pri`` (e.g. per-example [B]).
    Returns:
      float32 array of ``lp_ext``'s shape, under stop_gradient.
    """
    check_float(lp_ext, "lp_ext")
    check_float(lp_pri, "lp_pri")
    check_same_shape(lp_ext, lp_pri, "lp_ext", "lp_pri")
    check_finite(lp_ext, "lp_ext")
    check_finite(lp_pri, "lp_pri")
    try:
        np.broadcast_shapes(np.shape(eps), np.shape(lp_pri))
    except ValueError:
        raise ValueError(
            f"eps: expected a scalar or a shape broadcastable to {np.shape(lp_pri)}, got {np.shape(eps)}"
        ) from None
    check_finite(eps, "eps")
    return _clip_jit(lp_ext, lp_pri, _f32(eps))


def _eps_split(ref_w, ref_l, eps):
    b_w = jnp.abs(jnp.mean(_sg(_f32(ref_w)), axis=0))
    b_l = jnp.abs(jnp.mean(_sg(_f32(ref_l)), axis=0))
    den = b_w + b_l
    scale = jnp.where(den > 0, b_w / jnp.where(den > 0, den, 1.0), 0.5)
    eps_w = jnp.where(eps < 0, -eps, eps * scale)
    eps_l = jnp.where(eps < 0, -eps, eps - eps_w)
    return eps_w, eps_l


_eps_jit = jax.jit(_eps_split)


def _check_refs(ref_w, ref_l, B: int | None = None) -> tuple[int, int]:
    for x, n in ((ref_w, "ref_w"), (ref_l, "ref_l")):
        check_rank(x, n, 2, "[K, B]")
        check_float(x, n)
        check_finite(x, n)
    check_same_shape(ref_w, ref_l, "ref_w", "ref_l")
    K, Bref = ref_w.shape
    if K < 1:
        raise ValueError("ref_w: expected at least one reference (K >= 1), got K = 0")
    if B is not None and Bref != B:
        raise ValueError(f"ref_w: expected shape [K, B] with B={B} (the policy batch), got {tuple(ref_w.shape)}")
    return K, Bref


def ctro_eps(ref_w, ref_l, eps=0.1):
    """CTRO's per-example clipping rates for chosen and rejected.

    Args:
      ref_w, ref_l: [K, B] unclipped reference log-probs of chosen / rejected.
      eps: scalar; negative means a fixed ``|eps|`` for both.
    Returns:
      ``(eps_w, eps_l)``, each [B] float32: ``eps_w = eps*|b_w|/(|b_w|+|b_l|)``,
      ``eps_l = eps - eps_w`` with ``b = mean_k ref[k]`` (even split when both are 0).
    """
    _check_refs(ref_w, ref_l)
    check_scalar(eps, "eps")
    return _eps_jit(ref_w, ref_l, _f32(eps))


def _arwc(ref_w, ref_l, convention):
    a = jnp.abs(_sg(_f32(ref_w)) - _sg(_f32(ref_l)))  # [K, B] unclipped |margins|
    K = a.shape[0]
    if K == 1:
        return jnp.ones_like(a)
    if convention == "code":  # K == 2, checked by the caller
        w_pri = a[1] / (a[0] + a[1] + ARWC_EPS)
        return jnp.stack([w_pri, 1.0 - w_pri])
    extra = a[1:] / (jnp.sum(a, axis=0) + ARWC_EPS)
    return jnp.concatenate([1.0 - jnp.sum(extra, axis=0, keepdims=True), extra], axis=0)


_arwc_jit = jax.jit(_arwc, static_argnames=("convention",))


def arwc_weights(ref_w, ref_l, convention: str = "paper"):
    """ARWC per-example reference weights from the references' unclipped margins.

    Args:
      ref_w, ref_l: [K, B] reference log-probs of chosen / rejected (index 0 = primary).
      convention: ``'paper'`` (weight of reference k grows with its own |margin|) or
        ``'code'`` (K = 2 only; the reference implementation's swapped assignment).
        See the module docstring for the formulas.
    Returns:
      [K, B] float32 weights, non-negative, summing to 1 over K (ones when K = 1).
    """
    K, _ = _check_refs(ref_w, ref_l)
    _check_choice(convention, "convention", ("paper", "code"))
    if convention == "code" and K != 2:
        raise ValueError(f"convention='code' is defined for K = 2 references (the reference code's case), got K = {K}")
    return _arwc_jit(ref_w, ref_l, convention)


def uniform_weights(K: int):
    """[K] float32 weights ``1/K``."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f"K: expected a positive int, got {K!r}")
    return jnp.full((K,), 1.0 / K, jnp.float32)


def validation_weights(ref_w, ref_l, method: str = "discrimination"):
    """Fixed reference weights from a held-out validation set (arXiv 2512.10040's offline strategies).

    Args:
      ref_w, ref_l: [K, N] the references' log-probs of the validation set's chosen /
        rejected responses.
      method: ``'discrimination'``: weight ∝ mean over N of ``|m_k|`` (ARWC's confidence,
        averaged); ``'accuracy'``: weight ∝ the fraction of pairs with ``m_k > 0``.
        ``m_k = ref_w[k] - ref_l[k]``. Uniform if every score is 0.
    Returns:
      [K] float32 weights summing to 1 (pass to :func:`mrpo_loss` with ``weighting='fixed'``).
    """
    K, _ = _check_refs(ref_w, ref_l)
    _check_choice(method, "method", ("discrimination", "accuracy"))
    m = _f32(ref_w) - _f32(ref_l)
    if method == "discrimination":
        s = jnp.mean(jnp.abs(m), axis=1)
    else:
        s = jnp.mean((m > 0).astype(jnp.float32), axis=1)
    tot = jnp.sum(s)
    return jnp.where(tot > 0, s / jnp.where(tot > 0, tot, 1.0), 1.0 / K)


# ----------------------------------------------------------------------------- MRPO loss


@functools.partial(jax.jit, static_argnames=("weighting", "convention", "virtual", "clip"))
def _mrpo(pi_w, pi_l, ref_w, ref_l, beta, eps, weights, weighting, convention, virtual, clip):
    ref_w, ref_l = _sg(_f32(ref_w)), _sg(_f32(ref_l))
    K = ref_w.shape[0]
    if K == 1:
        v_w, v_l = ref_w[0], ref_l[0]
        w = jnp.ones_like(ref_w)
        clip_frac = jnp.zeros((), jnp.float32)
    else:
        if weighting == "arwc":
            w = _arwc(ref_w, ref_l, convention)  # from the unclipped margins
        else:
            w = _sg(_f32(weights))
            w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (2 - w.ndim)), ref_w.shape)
        if clip:
            eps_w, eps_l = _eps_split(ref_w, ref_l, eps)
            cw = _clip(ref_w[1:], ref_w[0][None], eps_w[None])
            cl = _clip(ref_l[1:], ref_l[0][None], eps_l[None])
            clip_frac = 0.5 * (jnp.mean((cw != ref_w[1:]).astype(jnp.float32))
                               + jnp.mean((cl != ref_l[1:]).astype(jnp.float32)))
            ref_w = jnp.concatenate([ref_w[:1], cw], axis=0)
            ref_l = jnp.concatenate([ref_l[:1], cl], axis=0)
        else:
            clip_frac = jnp.zeros((), jnp.float32)
        v_w = _virtual(ref_w, w, virtual)
        v_l = _virtual(ref_l, w, virtual)
    loss, metrics = _dpo_core(pi_w, pi_l, v_w, v_l, beta)
    pri_r_w = _sg(_f32(pi_w)) - ref_w[0]
    pri_r_l = _sg(_f32(pi_l)) - ref_l[0]
    metrics["accuracy_primary"] = jnp.mean((pri_r_w > pri_r_l).astype(jnp.float32))
    metrics["weight_primary"] = jnp.mean(w[0])
    metrics["clip_frac"] = clip_frac
    return loss, metrics


def mrpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1, eps=0.1, weighting: str = "arwc",
              convention: str = "paper", virtual: str = "harmonic", weights=None):
    """MRPO: DPO against a virtual reference built from K reference models.

    Steps (per example, all reference quantities under stop_gradient):
    1. weights alpha [K, B]: ARWC from the unclipped margins (``weighting='arwc'``),
       ``1/K`` (``'uniform'``), or the given ``weights`` [K] / [K, B] (``'fixed'``, e.g.
       from :func:`validation_weights`);
    2. CTRO (unless ``eps is None``): clip every extra reference (k >= 1) into the band
       around the primary one with ``(eps_w, eps_l) = ctro_eps(ref_w, ref_l, eps)``;
    3. ``v = virtual_reference(ref, alpha, virtual)`` for chosen and rejected;
    4. ``dpo_loss(pi_w, pi_l, v_w, v_l, beta)``.
    With K = 1 the loss is exactly ``dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], beta)``.

    Args:
      pi_w, pi_l: [B] policy sequence log-probs.
      ref_w, ref_l: [K, B] reference sequence log-probs, index 0 = primary reference.
      beta: positive scalar; eps: scalar (negative: fixed |eps|) or None (no CTRO).
      weighting: ``'arwc' | 'uniform' | 'fixed'``; convention: ``'paper' | 'code'``
        (ARWC only); virtual: ``'harmonic' | 'geometric'``; weights: for ``'fixed'``.
    Returns:
      ``(loss, metrics)``: the DPO metrics against the virtual reference plus
      ``accuracy_primary`` (implicit-reward accuracy against reference 0, comparable
      across methods), ``weight_primary`` (mean alpha_0) and ``clip_frac`` (fraction of
      extra-reference log-probs changed by CTRO).
    """
    B = check_vector(pi_w, "pi_w")
    check_vector(pi_l, "pi_l", B)
    K, _ = _check_refs(ref_w, ref_l, B)
    check_scalar(beta, "beta", positive=True)
    clip = eps is not None
    if clip:
        check_scalar(eps, "eps")
    _check_choice(weighting, "weighting", ("arwc", "uniform", "fixed"))
    _check_choice(convention, "convention", ("paper", "code"))
    _check_choice(virtual, "virtual", ("harmonic", "geometric"))
    if weighting == "arwc" and convention == "code" and K not in (1, 2):
        raise ValueError(f"convention='code' is defined for K = 2 references, got K = {K}")
    if weighting == "fixed":
        if weights is None:
            raise ValueError("weights: expected [K] or [K, B] weights with weighting='fixed', got None")
        _check_weights(weights, K, B)
        weights = jnp.asarray(weights, jnp.float32)
    elif weights is not None:
        raise ValueError(f"weights: only used with weighting='fixed', got weights with weighting={weighting!r}")
    elif weighting == "uniform":
        weights = uniform_weights(K)
    else:
        weights = jnp.zeros((K,), jnp.float32)  # unused placeholder
    return _mrpo(pi_w, pi_l, ref_w, ref_l, _f32(beta), _f32(0.0 if eps is None else eps),
                 weights, weighting, convention, virtual, clip)


# ----------------------------------------------------------------------------- IRFT


def irft_loss(pi_demo, pi_gen, frozen_demo, frozen_gen, beta=0.1):
    """IRFT's implicit-reward loss for one stage.

    ``r_t(y) = beta*(log pi_theta(y) - log pi_t(y))`` with ``pi_t`` the policy frozen at
    the start of the stage; ``loss = mean -log sigmoid(r_t(y_demo) - r_t(y_gen))``. This
    is :func:`dpo_loss` with the frozen policy as the reference, the demonstration as
    the winner and the stage's generation as the loser. At ``theta = theta_t`` its
    gradient per example is ``-(beta/2)(grad lp(y_demo) - grad lp(y_gen))``.

    Args:
      pi_demo, pi_gen: [B] current-policy sequence log-probs of demo / generated response.
      frozen_demo, frozen_gen: [B] the frozen stage policy's log-probs (stop_gradient).
      beta: positive scalar.
    Returns:
      ``(loss, metrics)`` as :func:`dpo_loss` (chosen = demonstration).
    """
    return dpo_loss(pi_demo, pi_gen, frozen_demo, frozen_gen, beta)


# ----------------------------------------------------------------------------- RFT


@jax.jit
def _bt(r_demo, r_gen):
    r_demo, r_gen = _f32(r_demo), _f32(r_gen)
    loss = jnp.mean(-jax.nn.log_sigmoid(r_demo - r_gen))
    return loss, {"loss": _sg(loss), **_pair_metrics(r_demo, r_gen)}


def bt_reward_loss(r_demo, r_gen):
    """Bradley-Terry loss for an explicit reward model, demonstrations over generations.

    Args:
      r_demo, r_gen: [B] float rewards of the demonstration / generated response.
    Returns:
      ``(loss, metrics)``: ``loss = mean -log sigmoid(r_demo - r_gen)``; metrics as
      :func:`dpo_loss` (rewards are the inputs).
    """
    B = check_vector(r_demo, "r_demo")
    check_vector(r_gen, "r_gen", B)
    return _bt(r_demo, r_gen)


@jax.jit
def _first_div(ids_a, ids_b, mask_a, mask_b):
    va, vb = mask_a != 0, mask_b != 0
    differ = (va != vb) | (va & vb & (ids_a != ids_b))
    T = ids_a.shape[1]
    return jnp.where(jnp.any(differ, axis=1), jnp.argmax(differ, axis=1), T).astype(jnp.int32)


def _check_pair_ids(ids_a, ids_b, mask_a, mask_b, names):
    na, nb, nma, nmb = names
    for x, n in ((ids_a, na), (ids_b, nb)):
        check_rank(x, n, 2, "[B, T]")
        check_int(x, n)
    for x, n in ((mask_a, nma), (mask_b, nmb)):
        check_rank(x, n, 2, "[B, T]")
    check_same_shape(ids_a, ids_b, na, nb)
    check_same_shape(ids_a, mask_a, na, nma)
    check_same_shape(ids_a, mask_b, na, nmb)


def first_divergence(ids_a, ids_b, mask_a, mask_b):
    """First position where two right-padded sequences differ.

    Position t differs if exactly one of the two has a valid token there, or both do
    and the ids differ. The rows must be laid out alike (shared prompt at the same
    positions, padding on the right).

    Args:
      ids_a, ids_b: [B, T] int token ids; mask_a, mask_b: [B, T] validity masks.
    Returns:
      [B] int32 first differing position, or T where the sequences are identical.
    """
    _check_pair_ids(ids_a, ids_b, mask_a, mask_b, ("ids_a", "ids_b", "mask_a", "mask_b"))
    return _first_div(jnp.asarray(ids_a), jnp.asarray(ids_b), jnp.asarray(mask_a), jnp.asarray(mask_b))


@jax.jit
def _bt_token(r_demo, r_gen, ids_demo, ids_gen, mask_demo, mask_gen):
    div = _first_div(ids_demo, ids_gen, mask_demo, mask_gen)  # [B]
    T = ids_demo.shape[1]
    pos = jnp.arange(T)[None, :]
    span = ((pos >= div[:, None]) & ((mask_demo != 0) | (mask_gen != 0))).astype(jnp.float32)
    d = _f32(r_demo) - _f32(r_gen)
    per_tok = -jax.nn.log_sigmoid(d)
    n = jnp.sum(span, axis=1)
    has = n > 0
    per_row = jnp.sum(per_tok * span, axis=1) / jnp.maximum(n, 1.0)
    rows = jnp.sum(has.astype(jnp.float32))
    loss = jnp.sum(jnp.where(has, per_row, 0.0)) / jnp.maximum(rows, 1.0)
    # end scores: the reward at each row's last counted position
    last = jnp.clip(T - 1 - jnp.argmax(span[:, ::-1], axis=1), 0, T - 1)
    end_d = _sg(jnp.take_along_axis(_f32(r_demo), last[:, None], 1)[:, 0])
    end_g = _sg(jnp.take_along_axis(_f32(r_gen), last[:, None], 1)[:, 0])
    acc = jnp.sum(jnp.where(has, (end_d > end_g).astype(jnp.float32), 0.0)) / jnp.maximum(rows, 1.0)
    metrics = {"loss": _sg(loss), "accuracy": acc, "rows": rows,
               "tokens": jnp.sum(span)}
    return loss, metrics


def bt_token_reward_loss(r_demo, r_gen, ids_demo, ids_gen, mask_demo, mask_gen):
    """Per-token Bradley-Terry loss from the first position where demo and generation differ.

    For a per-token reward model (a value head read at every position, ``r[b, t]``
    aligned with ``ids[b, t]``), each row contributes the mean over positions
    ``t >= first_divergence`` where either sequence still has a valid token of
    ``-log sigmoid(r_demo[b, t] - r_gen[b, t])``; the loss is the mean over rows with a
    non-empty span (rows whose sequences are identical are skipped; 0 if all are).
    Past the end of the shorter sequence its reward at the padded position is used, as
    in the reference implementation.

    Args:
      r_demo, r_gen: [B, T] float per-token rewards of the demo / generated sequence.
      ids_demo, ids_gen: [B, T] int ids (prompt + response, right-padded, same layout).
      mask_demo, mask_gen: [B, T] validity masks (1 = real token).
    Returns:
      ``(loss, metrics)``: ``loss``, ``accuracy`` (end-of-span reward of the demo above
      the generation's), ``rows`` (rows counted), ``tokens`` (positions counted).
    """
    _check_pair_ids(ids_demo, ids_gen, mask_demo, mask_gen,
                    ("ids_demo", "ids_gen", "mask_demo", "mask_gen"))
    _check_tokens(r_demo, "r_demo", ids_demo.shape)
    _check_tokens(r_gen, "r_gen", ids_demo.shape)
    return _bt_token(r_demo, r_gen, jnp.asarray(ids_demo), jnp.asarray(ids_gen),
                     jnp.asarray(mask_demo), jnp.asarray(mask_gen))


@functools.partial(jax.jit, static_argnames=("baseline",))
def _pg(logp_tokens, ref_logp_tokens, rewards, mask, beta, baseline):
    m = mask.astype(jnp.float32)
    logp = _f32(logp_tokens)
    seq_logp = jnp.sum(logp * m, axis=1)  # [B], carries the gradient
    kl = _sg(jnp.sum((logp - _f32(ref_logp_tokens)) * m, axis=1))  # [B] sample KL estimate
    ret = _sg(_f32(rewards) - beta * kl)  # [B] sequence return
    B = ret.shape[0]
    if baseline == "mean":
        b = jnp.mean(ret)
    elif baseline == "loo":
        b = (jnp.sum(ret) - ret) / max(B - 1, 1)
    else:
        b = jnp.zeros_like(ret)
    adv = _sg(ret - b)
    loss = -jnp.mean(adv * seq_logp)
    metrics = {"loss": _sg(loss), "return": jnp.mean(ret), "reward": jnp.mean(_f32(rewards)),
               "kl": jnp.mean(kl), "advantage_std": jnp.std(adv)}
    return loss, metrics


def kl_regularised_pg_loss(logp_tokens, ref_logp_tokens, rewards, mask, beta=0.05,
                           baseline: str = "mean"):
    """REINFORCE on ``r - beta*KL(pi || pi_ref)`` with a baseline (RFT's policy step).

    For samples ``y_b ~ pi`` (the current policy):
      ``KL_b = sum_t mask * (logp - ref_logp)`` (the single-sample KL estimate),
      ``R_b = stop_gradient(r_b - beta * KL_b)`` (sequence return),
      ``A_b = R_b - baseline`` with baseline ``'mean'`` (batch mean of R), ``'loo'``
      (mean of the other rows' R) or ``'none'``,
      ``loss = -mean_b A_b * sum_t mask * logp[b, t]``.
    Its gradient is the score-function estimate of
    ``-grad E[r - beta*(log pi - log pi_ref)]`` (the extra ``-beta*E[grad log pi]`` term
    of the exact gradient has zero mean and is dropped; ``'loo'`` keeps it unbiased,
    ``'mean'`` has the usual O(1/B) bias).

    Args:
      logp_tokens: [B, T] float per-token log-probs under the policy (with gradient).
      ref_logp_tokens: [B, T] per-token log-probs under the reference (stop_gradient).
      rewards: [B] float sequence rewards (stop_gradient).
      mask: [B, T] response-token mask aligned to the log-prob arrays.
      beta: non-negative scalar KL coefficient.
      baseline: ``'mean' | 'loo' | 'none'``.
    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``return``, ``reward``, ``kl`` (batch
      means) and ``advantage_std``.
    """
    _check_tokens(logp_tokens, "logp_tokens")
    _check_tokens(ref_logp_tokens, "ref_logp_tokens", logp_tokens.shape)
    check_rank(mask, "mask", 2, "[B, T]")
    check_same_shape(logp_tokens, mask, "logp_tokens", "mask")
    check_vector(rewards, "rewards", logp_tokens.shape[0])
    check_scalar(beta, "beta", nonneg=True)
    _check_choice(baseline, "baseline", ("mean", "loo", "none"))
    return _pg(logp_tokens, ref_logp_tokens, rewards, jnp.asarray(mask), _f32(beta), baseline)
