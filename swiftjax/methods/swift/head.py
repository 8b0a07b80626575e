"""SWIFT: a linear (optionally gated) reward head over an LM's own token features.

Pure numeric core (no model forward, no data pipeline). Spec: docs/swift.md.

Head parameters are a dict ``{'kernel': [F, C], 'bias': [C]}``:

* gated (default), ``C = 2``: column 0 is the gate logit ``u``, column 1 the reward ``r``::

      (u_t, r_t) = h_t W + b;  g_t = sigmoid(u_t)
      score = sum_t g_t r_t m_t / max(sum_t g_t m_t, 1e-8)

* ungated, ``C = 1``::

      r_t = h_t w + b;  score = sum_t r_t m_t / max(sum_t m_t, 1)

Gated vs ungated is always inferred from the kernel's last axis (or the projection's).

Three ways to reach a score share one formula (:func:`score_from_projections`):

* from stored features ``[B, T, F]``: :func:`score` (= project, then the formula);
* fused into the model: each selected layer ``l`` contributes ``h_l @ W_l`` with
  ``W_l = split_kernel(params, dims)[l]``; the caller sums them, adds ``params['bias']``
  (or calls :func:`project_layers`) and passes the ``[B, T, C]`` result;
* while decoding: :func:`running_score_init` / :func:`running_score_update` /
  :func:`running_score_value` accumulate the numerator and denominator token by token.

Losses (spec "Training losses"), each a scalar mean: :func:`loss_ce`, :func:`loss_hinge`,
:func:`loss_dpo`, :func:`loss_infonca`, :func:`loss_nca`; :data:`LOSSES` / :func:`loss_fn` give
them one uniform signature over a ``[P, K]`` batch (P prompts x K candidates).

Masked-out tokens (mask 0) contribute exactly nothing, even when their features or
projections hold NaN/inf: they are selected away with ``jnp.where`` before any arithmetic
(a product ``x * 0`` is NaN for x = NaN, and so is its gradient).

Validation note: public functions check shapes and dtypes (works on tracers too); value checks
(finite, label range) run only on concrete, small arrays (scores, labels), never on features,
which can be gigabytes.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._checks import (
    check_finite,
    check_float,
    check_int,
    check_leading,
    check_rank,
    check_same_shape,
)

GATE_EPS = 1e-8  # floor of the gated denominator sum_t g_t m_t
UNGATED_FLOOR = 1.0  # floor of the ungated denominator sum_t m_t

__all__ = [
    "GATE_EPS",
    "UNGATED_FLOOR",
    "init_params",
    "num_params",
    "is_gated",
    "project",
    "token_scores",
    "score_from_projections",
    "prefix_scores_from_projections",
    "score",
    "pooled_features",
    "split_kernel",
    "project_layers",
    "RunningScore",
    "running_score_init",
    "running_score_update",
    "running_score_value",
    "loss_ce",
    "loss_hinge",
    "loss_dpo",
    "loss_dpo_grouped",
    "loss_infonca",
    "loss_nca",
    "LOSSES",
    "loss_fn",
    "LOGITS_MODES",
    "logits_features",
]


# ----------------------------------------------------------------------------- validation


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _check_params(params) -> int:
    """Validate a head pytree; return its number of output columns C (2 gated, 1 ungated)."""
    if not isinstance(params, dict) or "kernel" not in params or "bias" not in params:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: expected a dict with 'kernel' [F, C] and 'bias' [C], got {got}")
    k, b = params["kernel"], params["bias"]
    check_rank(k, "params['kernel']", 2, "[F, C]")
    check_rank(b, "params['bias']", 1, "[C]")
    check_float(k, "params['kernel']")
    check_float(b, "params['bias']")
    c = _shape(k)[1]
    if c not in (1, 2):
        raise ValueError(
            f"params['kernel']: expected [F, 2] (gated) or [F, 1] (ungated), got {_shape(k)}"
        )
    if _shape(b) != (c,):
        raise ValueError(f"params['bias']: expected shape ({c},) to match the kernel, got {_shape(b)}")
    return c


def _check_features(params, features) -> None:
    check_rank(features, "features", 3, "[B, T, F]")
    check_float(features, "features")
    f = _shape(params["kernel"])[0]
    if _shape(features)[2] != f:
        raise ValueError(
            f"features: expected feature dim F={f} (kernel rows), got shape {_shape(features)}"
        )


def _check_mask(mask, leading: Sequence[int], name: str = "mask") -> None:
    check_rank(mask, name, len(leading), "[B, T]" if len(leading) == 2 else "[B]")
    check_leading(mask, name, leading, "[B, T]" if len(leading) == 2 else "[B]")
    dt = np.dtype(mask.dtype) if hasattr(mask, "dtype") else np.asarray(mask).dtype
    if not (dt == np.bool_ or np.issubdtype(dt, np.number) or dt.name == "bfloat16"):
        raise ValueError(f"{name}: expected a bool, int or float 0/1 mask, got dtype {dt}")


def _check_proj(proj, name: str = "proj") -> int:
    check_rank(proj, name, 3, "[B, T, C]")
    check_float(proj, name)
    c = _shape(proj)[2]
    if c not in (1, 2):
        raise ValueError(
            f"{name}: expected last axis 2 (gate logit, reward) or 1 (reward), got {_shape(proj)}"
        )
    return c


def _check_labels(labels, name: str = "labels", binary: bool = False) -> None:
    """Labels are correctness in [0, 1] (exactly {0, 1} when ``binary``); checked if concrete."""
    try:
        arr = np.asarray(labels, dtype=np.float64)
    except Exception:  # traced: nothing to check
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    if binary:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name}: expected correctness labels in {{0, 1}}, got {np.unique(arr)[:8]}")
    elif np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(
            f"{name}: expected correctness labels in [0, 1], got range [{arr.min()}, {arr.max()}]"
        )


def _check_scores_labels(scores, labels, ranks=(1, 2), binary=False) -> None:
    r = len(_shape(scores))
    if r not in ranks:
        want = " or ".join({1: "[B]", 2: "[P, K]"}[x] for x in ranks)
        raise ValueError(f"scores: expected shape {want}, got shape {_shape(scores)}")
    if 0 in _shape(scores):
        raise ValueError(f"scores: expected a non-empty batch, got shape {_shape(scores)}")
    check_float(scores, "scores")
    check_same_shape(scores, labels, "scores", "labels")
    check_finite(scores, "scores")
    _check_labels(labels, binary=binary)


# ----------------------------------------------------------------------------- params


def init_params(key: jax.Array, feature_dim: int, gated: bool = True) -> dict:
    """PyTorch ``nn.Linear`` default init: kernel and bias ~ U(-1/sqrt(F), 1/sqrt(F)).

    Returns ``{'kernel': [F, 2], 'bias': [2]}`` (gated: column 0 gate logit, column 1 reward)
    or ``{'kernel': [F, 1], 'bias': [1]}`` (ungated), float32.
    """
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, (int, np.integer)) or feature_dim < 1:
        raise ValueError(f"feature_dim: expected a positive int, got {feature_dim!r}")
    c = 2 if gated else 1
    bound = 1.0 / float(np.sqrt(feature_dim))
    kk, kb = jax.random.split(key)
    kernel = jax.random.uniform(kk, (int(feature_dim), c), jnp.float32, -bound, bound)
    bias = jax.random.uniform(kb, (c,), jnp.float32, -bound, bound)
    return {"kernel": kernel, "bias": bias}


def num_params(params) -> int:
    """Number of scalars in the head (2F + 2 gated, F + 1 ungated)."""
    _check_params(params)
    return int(np.prod(_shape(params["kernel"]))) + int(np.prod(_shape(params["bias"])))


def is_gated(params) -> bool:
    """True for a ``[F, 2]`` kernel, False for ``[F, 1]``."""
    return _check_params(params) == 2


# ----------------------------------------------------------------------------- scoring


@jax.jit
def _project(params, features):
    x = features.astype(jnp.float32)
    # Contract against the kernel laid out [C, F]: XLA:CPU computes the kernel gradient of the
    # [F, C] layout ~10x slower for wide F, and would undo a plain transpose without the barrier.
    kt = jax.lax.optimization_barrier(params["kernel"].astype(jnp.float32).T)
    return jnp.einsum("btf,cf->btc", x, kt) + params["bias"].astype(jnp.float32)


def project(params, features) -> jax.Array:
    """Per-token projections ``h_t W + b``: features [B, T, F] -> [B, T, C] float32."""
    _check_params(params)
    _check_features(params, features)
    return _project(params, features)


def token_scores(params, features):
    """Per-token gate and reward.

    features: [B, T, F] (any float dtype; cast to float32).
    Returns ``(gate [B, T] in (0, 1), reward [B, T])`` for a gated head and
    ``(None, reward [B, T])`` for an ungated one.
    """
    c = _check_params(params)
    _check_features(params, features)
    proj = _project(params, features)
    if c == 2:
        return jax.nn.sigmoid(proj[..., 0]), proj[..., 1]
    return None, proj[..., 0]


def _keep(mask):
    """[B, T] bool: the positions a mask selects (nonzero)."""
    return mask.astype(jnp.float32) != 0


def _zero_masked(x, mask):
    """x [B, T, ...] with the masked-out positions replaced by exact zeros (NaN/inf included)."""
    keep = _keep(mask).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _pooling_terms(proj, mask):
    """Per-token numerator and denominator terms of the SWIFT pooling, and the denominator's
    floor: gated ``(g r m, g m, GATE_EPS)``, ungated ``(r m, m, UNGATED_FLOOR)``; [B, T] each."""
    proj = _zero_masked(proj.astype(jnp.float32), mask)
    m = jnp.where(_keep(mask), mask.astype(jnp.float32), 0.0)
    if proj.shape[-1] == 2:
        g = jax.nn.sigmoid(proj[..., 0])
        return g * proj[..., 1] * m, g * m, GATE_EPS
    return proj[..., 0] * m, m, UNGATED_FLOOR


@jax.jit
def _score_from_projections(proj, mask):
    num, den, floor = _pooling_terms(proj, mask)
    return jnp.sum(num, axis=-1) / jnp.maximum(jnp.sum(den, axis=-1), floor)


def score_from_projections(proj, mask) -> jax.Array:
    """The SWIFT pooling formula on already-projected tokens (bias included).

    proj: [B, T, 2] (gate logit u, reward r) or [B, T, 1] (reward only), i.e. ``h_t W + b``;
      in the fused path ``sum_l h_{l,t} W_l + b`` (see :func:`split_kernel`).
    mask: [B, T], 1 on response tokens (bool/int/float).
    Returns [B] float32. A row with an all-zero mask scores 0 (no NaN).
    """
    _check_proj(proj)
    _check_mask(mask, _shape(proj)[:2])
    return _score_from_projections(proj, mask)


@jax.jit
def _prefix_scores(proj, mask):
    num, den, floor = _pooling_terms(proj, mask)
    return jnp.cumsum(num, axis=-1) / jnp.maximum(jnp.cumsum(den, axis=-1), floor)


def prefix_scores_from_projections(proj, mask) -> jax.Array:
    """[B, T] the score of every prefix: entry t is :func:`score_from_projections` with the mask
    cut after position t (what the running score of decoding reads after that token)."""
    _check_proj(proj)
    _check_mask(mask, _shape(proj)[:2])
    return _prefix_scores(proj, mask)


def score(params, features, mask) -> jax.Array:
    """Sequence score of each response: features [B, T, F], mask [B, T] -> [B] float32.

    Gated: ``sum g r m / max(sum g m, 1e-8)``; ungated: ``sum r m / max(sum m, 1)``.
    """
    _check_params(params)
    _check_features(params, features)
    _check_mask(mask, _shape(features)[:2])
    return _score(params, features, mask)


@jax.jit
def _score(params, features, mask):
    # zero the masked-out features first: their gradient w.r.t. the kernel is x * 0
    return _score_from_projections(_project(params, _zero_masked(features, mask)), mask)


@jax.jit
def _pooled(params, features, mask):
    x = _zero_masked(features.astype(jnp.float32), mask)
    m = jnp.where(_keep(mask), mask.astype(jnp.float32), 0.0)
    if params["kernel"].shape[-1] == 2:
        u = jnp.einsum("btf,f->bt", x, params["kernel"][:, 0].astype(jnp.float32)) + params["bias"][0]
        w = jax.nn.sigmoid(u) * m
        den = jnp.maximum(jnp.sum(w, axis=-1), GATE_EPS)
    else:
        w = m
        den = jnp.maximum(jnp.sum(w, axis=-1), UNGATED_FLOOR)
    return jnp.einsum("bt,btf->bf", w, x) / den[:, None]


def pooled_features(params, features, mask) -> jax.Array:
    """Gate-weighted mean of token features (the EBRM-over-SWIFT embedding e): [B, F].

    Gated: ``sum_t g_t m_t h_t / max(sum_t g_t m_t, 1e-8)``; ungated: masked mean with the
    denominator floored at 1. For a row with a non-empty mask,
    ``score == pooled @ kernel[:, -1] + bias[-1]`` (the reward is linear in h).
    """
    _check_params(params)
    _check_features(params, features)
    _check_mask(mask, _shape(features)[:2])
    return _pooled(params, features, mask)


# ----------------------------------------------------------------------------- fused path


def _layer_dims(params, layer_dims) -> tuple[int, ...]:
    f = _shape(params["kernel"])[0]
    if isinstance(layer_dims, (int, np.integer)) and not isinstance(layer_dims, bool):
        d = int(layer_dims)
        if d < 1 or f % d:
            raise ValueError(
                f"layer_dims: expected a per-layer width dividing F={f}, got {layer_dims}"
            )
        return (d,) * (f // d)
    try:
        dims = tuple(int(d) for d in layer_dims)
    except TypeError:
        raise ValueError(f"layer_dims: expected an int or a sequence of ints, got {layer_dims!r}")
    if not dims or any(d < 1 for d in dims) or sum(dims) != f:
        raise ValueError(
            f"layer_dims: expected positive widths summing to F={f} (kernel rows), got {dims}"
        )
    return dims


def split_kernel(params, layer_dims) -> tuple[jax.Array, ...]:
    """Split the kernel's rows into per-layer blocks for the fused path.

    Features are the concatenation over the selected layers in index order, so block ``l`` holds
    rows ``[sum(dims[:l]), sum(dims[:l+1]))``. ``layer_dims``: a sequence of widths summing to F,
    or one int d (then F / d equal blocks). Returns a tuple of ``[D_l, C]`` arrays such that
    ``sum_l h_l @ W_l + bias == concat(h_l) @ kernel + bias``.
    """
    _check_params(params)
    dims = _layer_dims(params, layer_dims)
    offsets = np.cumsum((0,) + dims)
    k = params["kernel"]
    return tuple(k[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:]))


@jax.jit
def _project_layers(blocks, bias, states):
    acc = bias.astype(jnp.float32)
    for w, h in zip(blocks, states):
        acc = acc + jnp.einsum("btd,dc->btc", h.astype(jnp.float32), w.astype(jnp.float32))
    return acc


def project_layers(params, states: Sequence) -> jax.Array:
    """Fused projection ``sum_l h_l @ W_l + b`` from per-layer states (no concatenation).

    states: a sequence of [B, T, D_l] arrays in layer-index order, widths summing to F.
    Returns [B, T, C] float32, equal to :func:`project` on the concatenated features; feed it to
    :func:`score_from_projections`. A model that accumulates ``h_l @ W_l`` inside its forward
    does the same with the blocks of :func:`split_kernel`.
    """
    _check_params(params)
    states = tuple(states)
    if not states:
        raise ValueError("states: expected at least one [B, T, D] array, got none")
    for i, h in enumerate(states):
        check_rank(h, f"states[{i}]", 3, "[B, T, D]")
        check_float(h, f"states[{i}]")
        check_leading(h, f"states[{i}]", _shape(states[0])[:2], "[B, T]")
    blocks = split_kernel(params, [_shape(h)[2] for h in states])
    return _project_layers(blocks, params["bias"], states)


# ----------------------------------------------------------------------------- decoding


class RunningScore(NamedTuple):
    """Running numerator / denominator of the score of a partial response.

    num: [B] sum g r m (ungated: sum r m); den: [B] sum g m (ungated: sum m);
    floor: [B] the denominator's floor (1e-8 gated, 1 ungated).
    """

    num: jax.Array
    den: jax.Array
    floor: jax.Array


def running_score_init(batch: int, gated: bool = True) -> RunningScore:
    """Empty running score for ``batch`` responses (value 0 until a masked token arrives)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    z = jnp.zeros((int(batch),), jnp.float32)
    floor = jnp.full((int(batch),), GATE_EPS if gated else UNGATED_FLOOR, jnp.float32)
    return RunningScore(z, z, floor)


@jax.jit
def _running_update(state, u_r_t, m_t):
    num, den, _ = _pooling_terms(u_r_t, m_t)
    return RunningScore(state.num + num, state.den + den, state.floor)


def running_score_update(state: RunningScore, u_r_t, m_t) -> RunningScore:
    """Add one decoding step: u_r_t [B, 2] (gate logit, reward; bias included) or [B, 1]; m_t [B]."""
    if not isinstance(state, RunningScore):
        raise ValueError(f"state: expected a RunningScore, got {type(state).__name__}")
    check_rank(u_r_t, "u_r_t", 2, "[B, C]")
    check_float(u_r_t, "u_r_t")
    b, c = _shape(u_r_t)
    if c not in (1, 2):
        raise ValueError(f"u_r_t: expected last axis 2 (gated) or 1 (ungated), got {_shape(u_r_t)}")
    check_leading(state.num, "state.num", (b,), "[B]")
    _check_mask(m_t, (b,), "m_t")
    try:  # concrete state: the head kind must match the state's kind
        gated_state = bool(np.asarray(state.floor)[0] < 0.5)
        if gated_state != (c == 2):
            raise ValueError(
                f"u_r_t: state was initialised {'gated' if gated_state else 'ungated'} "
                f"but u_r_t has {c} column(s)"
            )
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        pass
    return _running_update(state, u_r_t, m_t)


def running_score_value(state: RunningScore) -> jax.Array:
    """Score of the responses so far: ``num / max(den, floor)`` -> [B]."""
    if not isinstance(state, RunningScore):
        raise ValueError(f"state: expected a RunningScore, got {type(state).__name__}")
    return state.num / jnp.maximum(state.den, state.floor)


# ----------------------------------------------------------------------------- losses


@jax.jit
def _ce(scores, labels):
    s = scores.astype(jnp.float32)
    c = labels.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(s) - c * s)  # BCE with logits, stable


def loss_ce(scores, labels) -> jax.Array:
    """Binary cross-entropy with logits on the score vs correctness, mean over all entries.

    scores: [B] (or [P, K]); labels: same shape, correctness in [0, 1].
    """
    _check_scores_labels(scores, labels)
    return _ce(scores, labels)


@jax.jit
def _hinge(scores, labels):
    s = scores.astype(jnp.float32)
    y = 2.0 * labels.astype(jnp.float32) - 1.0
    return jnp.mean(jnp.maximum(0.0, 1.0 - y * s))


def loss_hinge(scores, labels) -> jax.Array:
    """``mean(max(0, 1 - (2c - 1) s))``; scores [B] (or [P, K]), labels in {0, 1}."""
    _check_scores_labels(scores, labels, binary=True)
    return _hinge(scores, labels)


@jax.jit
def _dpo(scores, labels, group_ids):
    s = scores.astype(jnp.float32)
    pos = labels.astype(jnp.float32) > 0.5
    same = group_ids[:, None] == group_ids[None, :]
    pair = same & pos[:, None] & (~pos)[None, :]  # pair[i, j]: i correct, j incorrect
    diff = s[:, None] - s[None, :]
    per = jax.nn.softplus(-diff)  # -log sigmoid(s+ - s-)
    n = jnp.sum(pair)
    return jnp.sum(jnp.where(pair, per, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)


def loss_dpo(scores, labels, group_ids) -> jax.Array:
    """Pairwise loss ``-log sigmoid(s+ - s-)`` over every (correct, incorrect) pair of a prompt.

    scores: [B]; labels: [B] in {0, 1}; group_ids: [B] int, the prompt each response answers.
    Returns the mean over all such pairs in the batch (each pair weighs the same, so prompts
    with more pairs weigh more). Convention: a batch with no pair (every group all-correct or
    all-incorrect) gives loss 0 with zero gradient, never NaN. Fixed-shape: a [B, B] pair mask.
    """
    _check_scores_labels(scores, labels, ranks=(1,), binary=True)
    check_rank(group_ids, "group_ids", 1, "[B]")
    check_int(group_ids, "group_ids")
    check_same_shape(scores, group_ids, "scores", "group_ids")
    return _dpo(scores, labels, group_ids)


def loss_dpo_grouped(scores, labels) -> jax.Array:
    """:func:`loss_dpo` for a [P, K] batch: each row is one prompt's K candidates."""
    _check_scores_labels(scores, labels, ranks=(2,), binary=True)
    p, k = _shape(scores)
    gid = jnp.repeat(jnp.arange(p, dtype=jnp.int32), k)
    return _dpo(jnp.reshape(scores, (-1,)), jnp.reshape(labels, (-1,)), gid)


@functools.partial(jax.jit, static_argnames=("alpha",))
def _infonca(scores, labels, alpha):
    w = jax.nn.softmax(labels.astype(jnp.float32) / alpha, axis=-1)
    logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(_weighted(w, logp), axis=-1))


def _weighted(w, x):
    """w * x, exactly 0 where the weight is 0 (a zero-weight -inf log-prob is not NaN)."""
    keep = w != 0
    return jnp.where(keep, w * jnp.where(keep, x, 0.0), 0.0)


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha: expected a positive float temperature, got {alpha!r}")
    if not (np.isfinite(a) and a > 0):
        raise ValueError(f"alpha: expected a positive float temperature, got {alpha!r}")
    return a


def loss_infonca(scores, labels, alpha: float = 0.01) -> jax.Array:
    """Listwise InfoNCA: ``-sum_i softmax(c / alpha)_i log_softmax(s)_i``, mean over prompts.

    scores, labels: [P, K] (P prompts, K candidates each). A prompt whose candidates are all
    equally labelled gets uniform targets.
    """
    _check_scores_labels(scores, labels, ranks=(2,))
    return _infonca(scores, labels, _check_alpha(alpha))


@functools.partial(jax.jit, static_argnames=("alpha",))
def _nca(scores, labels, alpha):
    s = scores.astype(jnp.float32)
    k = s.shape[-1]
    w = jax.nn.softmax(labels.astype(jnp.float32) / alpha, axis=-1)
    per = _weighted(w, jax.nn.log_sigmoid(s)) + jax.nn.log_sigmoid(-s) / k
    return jnp.mean(-jnp.sum(per, axis=-1))


def loss_nca(scores, labels, alpha: float = 0.01) -> jax.Array:
    """Listwise NCA: ``-sum_i [softmax(c/alpha)_i log sig(s_i) + (1/K) log sig(-s_i)]``,
    mean over prompts. scores, labels: [P, K]."""
    _check_scores_labels(scores, labels, ranks=(2,))
    return _nca(scores, labels, _check_alpha(alpha))


LOSSES: dict[str, Callable] = {
    "ce": loss_ce,
    "hinge": loss_hinge,
    "dpo": loss_dpo_grouped,
    "infonca": loss_infonca,
    "nca": loss_nca,
}
"""Uniform signature ``loss(scores [P, K], labels [P, K]) -> scalar`` (rows are prompts):
ce / hinge average over all P*K entries, dpo pairs candidates within a row, infonca / nca are
listwise per row (temperature via :func:`loss_fn`)."""


def loss_fn(name: str, alpha: float = 0.01) -> Callable:
    """The loss ``name`` from :data:`LOSSES` as ``f(scores [P, K], labels [P, K]) -> scalar``;
    ``alpha`` is the label temperature of infonca / nca (ignored by the others)."""
    if name not in LOSSES:
        raise ValueError(f"loss name: expected one of {sorted(LOSSES)}, got {name!r}")
    if name in ("infonca", "nca"):
        return functools.partial(LOSSES[name], alpha=_check_alpha(alpha))
    return LOSSES[name]


# ----------------------------------------------------------------------------- logits mode

LOGITS_MODES = ("full", "topk", "topk_logprobs")


@functools.partial(jax.jit, static_argnames=("mode", "k"))
def _logits_features(logits, mode, k):
    x = logits.astype(jnp.float32)
    if mode == "full":
        return x
    vals, _ = jax.lax.top_k(x, k)  # sorted, largest first
    if mode == "topk":
        return vals
    return vals - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def logits_features(logits, mode: str = "full", k: int | None = None) -> jax.Array:
    """Token features for models that expose only logits: logits [B, T, V] -> [B, T, F] float32.

    * ``'full'``: the logit vector itself (F = V).
    * ``'topk'``: the k largest logits, sorted descending (F = k).
    * ``'topk_logprobs'``: the k largest log-probabilities (logit - logsumexp), sorted
      descending (F = k). Preferred over ``'topk'``: log-probs do not depend on the arbitrary
      per-position offset of logits, and together they describe the shape of the predictive
      distribution (confidence, how many tokens compete).

    Token ids are not returned: an id is a category, so a linear head over it would read an
    arbitrary numbering. Sorting by rank makes column j mean "the j-th most likely token", a
    quantity with the same meaning at every position and across vocabularies.
    """
    check_rank(logits, "logits", 3, "[B, T, V]")
    check_float(logits, "logits")
    if mode not in LOGITS_MODES:
        raise ValueError(f"mode: expected one of {LOGITS_MODES}, got {mode!r}")
    v = _shape(logits)[2]
    if mode == "full":
        if k is not None:
            raise ValueError(f"k: expected None for mode 'full', got {k!r}")
        return _logits_features(logits, "full", 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= v:
        raise ValueError(f"k: expected an int in [1, V={v}] for mode {mode!r}, got {k!r}")
    return _logits_features(logits, mode, int(k))
