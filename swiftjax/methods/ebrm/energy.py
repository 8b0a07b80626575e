"""EBRM: an energy-based refinement of a frozen reward model's scalar reward.

Pure numeric core (no RM forward, no data pipeline). The method: docs/ebrm.md.

Given a response's embedding ``e`` (the input of the base RM's scalar head) and its reward
``r0``, a small network ``f(e, r)`` (``f = -energy``, so ``p(r | e) ∝ exp f``) is trained with
NCE+ (:func:`nce_plus_loss`), and the refined reward is ``argmax_r f(e, r)`` found by
gradient ascent from ``r0`` (:func:`refine`).

Network (sizes from :class:`EBRMConfig`)::

    r_emb = tanh-MLP(r): 1 -> r_hidden[0] -> ... -> r_hidden[-1]
            (dropout after every r layer but the last)
    x     = [e, r_emb] -> hidden[0] -> ... -> hidden[-1] -> 1
            (tanh + dropout after each hidden layer, the last layer linear)

Dropout (inverted, as PyTorch) is active only with ``train=True`` and a key.

Params pytree (all float32)::

    {'r_mlp':   [{'w': [1, R0], 'b': [R0]}, ...],                 # reward lift
     'head_in': {'w_e': [De, H0], 'w_r': [R, H0], 'b': [H0]},     # first head layer, split
     'head':    [{'w': [H0, H1], 'b': [H1]}, ..., {'w': [H_last, 1], 'b': [1]}]}

The first head layer is stored split so that ``e @ w_e + b`` (:func:`precompute_e`) is computed
once per example and reused for every r (the M+1 NCE samples, every refinement step).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._checks import (
    check_finite,
    check_float,
    check_leading,
    check_rank,
    check_same_shape,
)

__all__ = [
    "EBRMConfig",
    "init_params",
    "num_params",
    "precompute_e",
    "energy",
    "energy_pre",
    "log_mixture_density",
    "sample_nce_noise",
    "nce_plus_loss_from_samples",
    "nce_plus_loss",
    "fit_reward_stats",
    "normalize_rewards",
    "denormalize_rewards",
    "conflict_filter",
    "INIT_MODES",
    "init_rewards",
    "RefineResult",
    "refine_fn",
    "refine",
]


# ----------------------------------------------------------------------------- config


def _pos_int(x, name) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return int(x)


@dataclasses.dataclass(frozen=True)
class EBRMConfig:
    """Energy-network sizes (hashable: pass as a static arg).

    embed_dim: De, width of e. r_hidden: widths of the reward-lift MLP (reference (16, 32, 64);
    its large variant (64, 128, 256)). hidden: head widths after concatenation (reference
    (1024, 512); large (8192, 4096, 2048)). dropout: rate in [0, 1), training only.
    """

    embed_dim: int
    r_hidden: tuple[int, ...] = (16, 32, 64)
    hidden: tuple[int, ...] = (1024, 512)
    dropout: float = 0.5

    def __post_init__(self):
        _pos_int(self.embed_dim, "EBRMConfig.embed_dim")
        for name in ("r_hidden", "hidden"):
            val = getattr(self, name)
            try:
                tup = tuple(val)
            except TypeError:
                raise ValueError(f"EBRMConfig.{name}: expected a tuple of positive ints, got {val!r}")
            for i, w in enumerate(tup):
                _pos_int(w, f"EBRMConfig.{name}[{i}]")
            object.__setattr__(self, name, tuple(int(w) for w in tup))
        if not self.r_hidden:
            raise ValueError("EBRMConfig.r_hidden: expected at least one layer width, got ()")
        try:
            p = float(self.dropout)
        except (TypeError, ValueError):
            raise ValueError(f"EBRMConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"EBRMConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", p)


# ----------------------------------------------------------------------------- params


def _dense(key, fan_in, fan_out):
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    w = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
    b = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
    return w, b


def init_params(key: jax.Array, cfg: EBRMConfig) -> dict:
    """PyTorch-default init: every weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    The split first head layer uses fan_in = De + R for both of its parts, as the unsplit layer.
    Jitted as a whole (one compilation per config, not one per layer shape).
    """
    if not isinstance(cfg, EBRMConfig):
        raise ValueError(f"cfg: expected an EBRMConfig, got {type(cfg).__name__}")
    return _init_params(key, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _init_params(key, cfg: EBRMConfig) -> dict:
    r_dims = (1,) + cfg.r_hidden
    head_dims = (cfg.embed_dim + cfg.r_hidden[-1],) + cfg.hidden + (1,)
    keys = jax.random.split(key, len(r_dims) - 1 + len(head_dims) - 1)
    r_mlp = []
    for i in range(len(r_dims) - 1):
        w, b = _dense(keys[i], r_dims[i], r_dims[i + 1])
        r_mlp.append({"w": w, "b": b})
    off = len(r_dims) - 1
    w, b = _dense(keys[off], head_dims[0], head_dims[1])
    head_in = {"w_e": w[: cfg.embed_dim], "w_r": w[cfg.embed_dim :], "b": b}
    head = []
    for i in range(1, len(head_dims) - 1):
        w, b = _dense(keys[off + i], head_dims[i], head_dims[i + 1])
        head.append({"w": w, "b": b})
    return {"r_mlp": r_mlp, "head_in": head_in, "head": head}


def num_params(params) -> int:
    """Number of scalars in an EBRM params pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def _check_params(params, cfg: EBRMConfig) -> None:
    if not isinstance(cfg, EBRMConfig):
        raise ValueError(f"cfg: expected an EBRMConfig, got {type(cfg).__name__}")
    try:
        r_mlp, head_in, head = params["r_mlp"], params["head_in"], params["head"]
        w_e, w_r = head_in["w_e"], head_in["w_r"]
    except (KeyError, TypeError):
        raise ValueError("params: expected the pytree of ebrm.init_params ('r_mlp', 'head_in', 'head')")
    if len(r_mlp) != len(cfg.r_hidden) or len(head) != len(cfg.hidden):
        raise ValueError(
            f"params: expected {len(cfg.r_hidden)} reward layers and {len(cfg.hidden)} head layers "
            f"after the first (cfg), got {len(r_mlp)} and {len(head)}"
        )
    h0 = cfg.hidden[0] if cfg.hidden else 1
    if tuple(np.shape(w_e)) != (cfg.embed_dim, h0) or tuple(np.shape(w_r)) != (cfg.r_hidden[-1], h0):
        raise ValueError(
            f"params['head_in']: expected w_e {(cfg.embed_dim, h0)} and w_r {(cfg.r_hidden[-1], h0)} "
            f"(cfg), got {tuple(np.shape(w_e))} and {tuple(np.shape(w_r))}"
        )


def _check_r0(r0, e) -> None:
    """Base rewards: a finite float [B] matching e's batch."""
    check_rank(r0, "r0", 1, "[B]")
    check_float(r0, "r0")
    check_leading(r0, "r0", (np.shape(e)[0],), "[B]")
    check_finite(r0, "r0")


def _check_e(e, cfg: EBRMConfig) -> None:
    check_rank(e, "e", 2, "[B, De]")
    check_float(e, "e")
    if tuple(np.shape(e))[1] != cfg.embed_dim:
        raise ValueError(f"e: expected [B, De={cfg.embed_dim}] (cfg.embed_dim), got {tuple(np.shape(e))}")
    if np.shape(e)[0] == 0:
        raise ValueError("e: expected a non-empty batch, got B=0")


def _check_key(key, train: bool) -> None:
    if train and key is None:
        raise ValueError("key: expected a jax.random key when train=True (dropout), got None")


# ----------------------------------------------------------------------------- forward


def _dropout_masks(key, lead, widths, rate):
    """Keep-masks for every dropout site from one random draw (one RNG kernel to compile)."""
    n = int(np.prod(lead))
    sizes = [n * w for w in widths]
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    keep = u >= rate
    out, off = [], 0
    for w, size in zip(widths, sizes):
        out.append(keep[off : off + size].reshape(tuple(lead) + (w,)))
        off += size
    return out


def _drop(x, keep, rate):
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _precompute_e(params, e):
    hi = params["head_in"]
    return e.astype(jnp.float32) @ hi["w_e"] + hi["b"]


def _f_pre(params, pe, r, cfg: EBRMConfig, key, train: bool):
    """pe [B, H0], r [B, M] -> f [B, M]."""
    use_drop = bool(train) and cfg.dropout > 0.0
    n_r = len(cfg.r_hidden)
    widths = cfg.r_hidden[:-1] + cfg.hidden  # dropout sites, in order
    masks = _dropout_masks(key, r.shape, widths, cfg.dropout) if use_drop and widths else []
    rate = cfg.dropout
    site = 0
    x = r.astype(jnp.float32)[..., None]  # [B, M, 1]
    for i, layer in enumerate(params["r_mlp"]):
        x = jnp.tanh(x @ layer["w"] + layer["b"])
        if masks and i < n_r - 1:
            x = _drop(x, masks[site], rate)
            site += 1
    h = pe[:, None, :] + x @ params["head_in"]["w_r"]  # [B, M, H0]
    layers = params["head"]
    if not layers:  # no hidden layer: the first head layer is the output
        return h[..., 0]
    h = jnp.tanh(h)
    if masks:
        h = _drop(h, masks[site], rate)
        site += 1
    for j, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if j < len(layers) - 1:
            h = jnp.tanh(h)
            if masks:
                h = _drop(h, masks[site], rate)
                site += 1
    return h[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "train"))
def _energy_pre_jit(params, pe, r, key, cfg, train):
    if r.ndim == 1:
        return _f_pre(params, pe, r[:, None], cfg, key, train)[:, 0]
    return _f_pre(params, pe, r, cfg, key, train)


_precompute_e_jit = jax.jit(_precompute_e)


def precompute_e(params, e) -> jax.Array:
    """The e-part of the first head layer, ``e @ w_e + b``: e [B, De] -> [B, H0] float32."""
    if not isinstance(params, dict) or "head_in" not in params:
        raise ValueError("params: expected the pytree of ebrm.init_params")
    check_rank(e, "e", 2, "[B, De]")
    check_float(e, "e")
    de = tuple(np.shape(params["head_in"]["w_e"]))[0]
    if tuple(np.shape(e))[1] != de:
        raise ValueError(f"e: expected [B, De={de}] (params), got {tuple(np.shape(e))}")
    return _precompute_e_jit(params, e)


def _check_r(r, b: int, name: str = "r") -> None:
    rank = len(np.shape(r))
    if rank not in (1, 2):
        raise ValueError(f"{name}: expected shape [B] or [B, M], got {tuple(np.shape(r))}")
    check_float(r, name)
    check_leading(r, name, (b,), "[B]")


def energy_pre(params, pe, r, cfg: EBRMConfig, *, key=None, train: bool = False) -> jax.Array:
    """f(e, r) from the precomputed e-part ``pe = precompute_e(params, e)`` [B, H0].

    r: [B] (one reward per example) -> [B], or [B, M] (M rewards per example) -> [B, M].
    """
    _check_params(params, cfg)
    check_rank(pe, "pe", 2, "[B, H0]")
    h0 = cfg.hidden[0] if cfg.hidden else 1
    if tuple(np.shape(pe))[1] != h0:
        raise ValueError(f"pe: expected [B, H0={h0}], got {tuple(np.shape(pe))}")
    _check_r(r, np.shape(pe)[0])
    _check_key(key, train)
    return _energy_pre_jit(params, pe, r, key, cfg, bool(train))


def energy(params, e, r, cfg: EBRMConfig, *, key=None, train: bool = False) -> jax.Array:
    """The network's value ``f(e, r) = -energy`` (higher means r more likely given e).

    e: [B, De]; r: [B] -> [B], or [B, M] -> [B, M] (each row's M rewards share its e).
    Dropout only when ``train`` (then ``key`` is required).
    """
    _check_params(params, cfg)
    _check_e(e, cfg)
    _check_r(r, np.shape(e)[0])
    _check_key(key, train)
    return _energy_pre_jit(params, _precompute_e_jit(params, e), r, key, cfg, bool(train))


# ----------------------------------------------------------------------------- NCE+


def _check_stds(stds) -> tuple[float, ...]:
    try:
        s = tuple(float(x) for x in stds)
    except TypeError:
        raise ValueError(f"stds: expected a non-empty tuple of positive floats, got {stds!r}")
    if not s or not all(np.isfinite(x) and x > 0 for x in s):
        raise ValueError(f"stds: expected a non-empty tuple of positive floats, got {stds!r}")
    return s


def _check_pos_float(x, name, allow_zero=False) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} float, got {x!r}")
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} float, got {x!r}")
    return v


def _log_mix(y, center, stds):
    s = jnp.asarray(stds, jnp.float32)
    z = (y - center)[..., None] / s
    comp = -0.5 * z * z - jnp.log(s) - 0.5 * math.log(2.0 * math.pi)
    return jax.nn.logsumexp(comp, axis=-1) - math.log(len(stds))


def log_mixture_density(y, center, stds: Sequence[float]) -> jax.Array:
    """log p_N(y) for the uniform mixture ``(1/K) sum_k N(y; center, s_k^2)``.

    y and center broadcast together (e.g. y [B, M], center [B, 1]); stds: K positive floats.
    """
    stds = _check_stds(stds)
    check_float(y, "y")
    try:
        jnp.broadcast_shapes(np.shape(y), np.shape(center))
    except ValueError:
        raise ValueError(f"center: expected a shape broadcastable with y {np.shape(y)}, got {np.shape(center)}")
    return _log_mix(jnp.asarray(y, jnp.float32), jnp.asarray(center, jnp.float32), stds)


@functools.partial(jax.jit, static_argnames=("num_neg", "stds"))
def _sample_noise(key, r0, num_neg, stds, beta):
    s = jnp.asarray(stds, jnp.float32)
    kc, kz = jax.random.split(key)
    b = r0.shape[0]
    shape = (b, 1 + num_neg)  # column 0: the positive's noise, columns 1..M: negatives
    comp = jax.random.randint(kc, shape, 0, len(stds))  # uniform mixture component
    z = jax.random.normal(kz, shape, jnp.float32) * s[comp]
    y_pos = r0 + beta * z[:, 0]
    y_neg = r0[:, None] + z[:, 1:]
    return y_pos, y_neg


def sample_nce_noise(key, r0, num_neg: int = 768, stds: Sequence[float] = (3.5,), beta: float = 0.1):
    """Draw NCE+ samples around each r0 [B].

    Returns ``(y_pos [B], y_neg [B, M])``: ``y_pos = r0 + nu``, ``nu ~ (1/K) sum_k N(0, (beta s_k)^2)``;
    ``y_neg ~ p_N = (1/K) sum_k N(r0, s_k^2)`` (component drawn uniformly, then a normal).
    """
    stds = _check_stds(stds)
    num_neg = _pos_int(num_neg, "num_neg")
    beta = _check_pos_float(beta, "beta", allow_zero=True)
    check_rank(r0, "r0", 1, "[B]")
    check_float(r0, "r0")
    check_finite(r0, "r0")
    return _sample_noise(key, jnp.asarray(r0, jnp.float32), num_neg, stds, beta)


def _nce_terms(params, e, r0, y_pos, y_neg, cfg, stds, lam, key, train):
    pe = _precompute_e(params, e)
    y_all = jnp.concatenate([y_pos[:, None], y_neg], axis=1).astype(jnp.float32)  # [B, 1+M]
    f_all = _f_pre(params, pe, y_all, cfg, key, train)  # [B, 1+M]
    logq = _log_mix(y_all, r0.astype(jnp.float32)[:, None], stds)
    t = f_all - logq
    # log of the NCE+ softmax of the positive: (f - log pN)(y+) - logsumexp over {y+, y-}
    log_ratio = t[:, 0] - jax.nn.logsumexp(t, axis=1)
    return -jnp.mean(log_ratio) + lam * jnp.mean(f_all * f_all)


@functools.partial(jax.jit, static_argnames=("cfg", "stds", "train"))
def _nce_from_samples_jit(params, e, r0, y_pos, y_neg, key, lam, cfg, stds, train):
    return _nce_terms(params, e, r0, y_pos, y_neg, cfg, stds, lam, key, train)


def nce_plus_loss_from_samples(
    params,
    e,
    r0,
    y_pos,
    y_neg,
    cfg: EBRMConfig,
    stds: Sequence[float] = (3.5,),
    lam: float = 0.05,
    *,
    key=None,
    train: bool = False,
) -> jax.Array:
    """NCE+ loss for given noise samples (so a reference can reproduce it exactly).

    e [B, De]; r0 [B] (centres of p_N); y_pos [B]; y_neg [B, M]. With ``t = f(e, y) - log p_N(y)``::

        loss = -mean_b [ t(y+) - logsumexp_{y in {y+, y-_1..M}} t(y) ] + lam * mean(f^2 over all y)

    computed from log-differences (no exp/log round trip). ``train`` turns dropout on (key needed).
    """
    _check_params(params, cfg)
    _check_e(e, cfg)
    b = np.shape(e)[0]
    stds = _check_stds(stds)
    lam = _check_pos_float(lam, "lam", allow_zero=True)
    for name, x, rank, dims in (("r0", r0, 1, "[B]"), ("y_pos", y_pos, 1, "[B]"), ("y_neg", y_neg, 2, "[B, M]")):
        check_rank(x, name, rank, dims)
        check_float(x, name)
        check_leading(x, name, (b,), "[B]")
        check_finite(x, name)
    if np.shape(y_neg)[1] < 1:
        raise ValueError(f"y_neg: expected at least one negative per example, got {tuple(np.shape(y_neg))}")
    _check_key(key, train)
    return _nce_from_samples_jit(params, e, r0, y_pos, y_neg, key, lam, cfg, stds, bool(train))


@functools.partial(jax.jit, static_argnames=("cfg", "num_neg", "stds", "train"))
def _nce_jit(params, e, r0, key, beta, lam, cfg, num_neg, stds, train):
    k_noise, k_drop = jax.random.split(key)
    y_pos, y_neg = _sample_noise(k_noise, r0.astype(jnp.float32), num_neg, stds, beta)
    return _nce_terms(params, e, r0, y_pos, y_neg, cfg, stds, lam, k_drop, train)


def nce_plus_loss(
    params,
    e,
    r0,
    key,
    cfg: EBRMConfig,
    num_neg: int = 768,
    stds: Sequence[float] = (3.5,),
    beta: float = 0.1,
    lam: float = 0.05,
    train: bool = True,
) -> jax.Array:
    """NCE+ training loss with fresh noise: e [B, De], r0 [B] -> scalar (differentiable in params).

    ``key`` is split into a noise key (:func:`sample_nce_noise` with the same arguments) and a
    dropout key; the result equals :func:`nce_plus_loss_from_samples` on those samples.
    Reference: num_neg 768, stds (3.5,), beta 0.1, lam 0.05.
    """
    _check_params(params, cfg)
    _check_e(e, cfg)
    _check_r0(r0, e)
    stds = _check_stds(stds)
    num_neg = _pos_int(num_neg, "num_neg")
    beta = _check_pos_float(beta, "beta", allow_zero=True)
    lam = _check_pos_float(lam, "lam", allow_zero=True)
    if key is None:
        raise ValueError("key: expected a jax.random key (noise samples), got None")
    return _nce_jit(params, e, r0, key, beta, lam, cfg, num_neg, stds, bool(train))


# ----------------------------------------------------------------------------- rewards, filter


def fit_reward_stats(r, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation (``ddof`` 0: population) of training rewards r [N], float64."""
    check_rank(r, "r", 1, "[N]")
    check_finite(r, "r")
    arr = np.asarray(r, dtype=np.float64)
    if arr.size <= ddof:
        raise ValueError(f"r: expected more than ddof={ddof} rewards, got {arr.size}")
    return float(arr.mean()), float(arr.std(ddof=ddof))


def _check_stats(mean, std):
    m = float(mean)
    s = float(std)
    if not (np.isfinite(m) and np.isfinite(s) and s >= 0):
        raise ValueError(f"mean/std: expected a finite mean and a finite std >= 0, got {mean!r}, {std!r}")
    return m, s


def normalize_rewards(r, mean: float, std: float) -> jax.Array:
    """``r' = 4 (r - mean) / (std + 1e-8)`` (the reference's scaling for large-scale RMs)."""
    check_float(r, "r")
    m, s = _check_stats(mean, std)
    return 4.0 * (jnp.asarray(r, jnp.float32) - m) / (s + 1e-8)


def denormalize_rewards(r_norm, mean: float, std: float) -> jax.Array:
    """Inverse of :func:`normalize_rewards`."""
    check_float(r_norm, "r_norm")
    m, s = _check_stats(mean, std)
    return jnp.asarray(r_norm, jnp.float32) * (s + 1e-8) / 4.0 + m


def conflict_filter(r_chosen, r_rejected) -> np.ndarray:
    """Keep-mask of preference pairs the base RM agrees with: ``r0(chosen) > r0(rejected)``.

    r_chosen, r_rejected: [N]. Returns a bool numpy array [N]; ties and reversals are dropped.
    """
    check_rank(r_chosen, "r_chosen", 1, "[N]")
    check_same_shape(r_chosen, r_rejected, "r_chosen", "r_rejected")
    check_finite(r_chosen, "r_chosen")
    check_finite(r_rejected, "r_rejected")
    return np.asarray(r_chosen) > np.asarray(r_rejected)


# ----------------------------------------------------------------------------- refinement

INIT_MODES = ("hybrid", "base", "random")


def _init_rewards(key, r0, mode):
    r0 = r0.astype(jnp.float32)
    if mode == "base":
        return r0
    draw = jax.random.uniform(key, r0.shape, jnp.float32, -4.0, 4.0)
    if mode == "random":
        return draw
    return jnp.where((r0 >= -2.0) & (r0 <= 2.0), r0, draw)


def init_rewards(key, r0, mode: str = "hybrid") -> jax.Array:
    """Starting points of refinement, r0 [B] -> [B].

    'hybrid': r0 where -2 <= r0 <= 2, else a draw from U(-4, 4); 'base': r0; 'random': U(-4, 4).
    The [-2, 2] window assumes r0 on the normalised scale of :func:`normalize_rewards`.
    """
    if mode not in INIT_MODES:
        raise ValueError(f"init: expected one of {INIT_MODES}, got {mode!r}")
    check_rank(r0, "r0", 1, "[B]")
    check_float(r0, "r0")
    check_finite(r0, "r0")
    if mode != "base" and key is None:
        raise ValueError(f"key: expected a jax.random key for init {mode!r}, got None")
    return _init_rewards(key, jnp.asarray(r0), mode)


class RefineResult(NamedTuple):
    """Output of :func:`refine_fn` / :func:`refine`.

    reward [B]: the refined r; value [B]: f at it; lr [B]: each example's final step size;
    active [B] bool: still running when the loop stopped (hit ``steps``); steps []: iterations
    run; accepted [B] int32: accepted steps per example.
    """

    reward: jax.Array
    value: jax.Array
    lr: jax.Array
    active: jax.Array
    steps: jax.Array
    accepted: jax.Array


def _refine_loop(f, r_init, steps, lr0, eta, min_lr):
    r_init = r_init.astype(jnp.float32)
    b = r_init.shape[0]
    lr = jnp.full((b,), lr0, jnp.float32)
    state = (jnp.asarray(0, jnp.int32), r_init, lr, lr >= min_lr, jnp.zeros((b,), jnp.int32))

    def cond(s):
        t, _, _, active, _ = s
        return (t < steps) & jnp.any(active)

    def body(s):
        t, r, lr, active, acc = s
        f_r, pullback = jax.vjp(f, r)  # per-example f and df/dr (f is separable over examples)
        (g,) = pullback(jnp.ones_like(f_r))
        r_try = r + lr * g
        f_try = f(r_try)
        better = active & (f_try > f_r)
        r = jnp.where(better, r_try, r)
        lr = jnp.where(active & ~better, lr * eta, lr)
        active = active & (lr >= min_lr)
        return t + 1, r, lr, active, acc + better.astype(jnp.int32)

    t, r, lr, active, acc = jax.lax.while_loop(cond, body, state)
    return RefineResult(r, f(r), lr, active, t, acc)


def _check_refine_args(steps, lr0, eta, min_lr):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    lr0 = _check_pos_float(lr0, "lr0")
    eta = _check_pos_float(eta, "eta")
    if not eta < 1.0:
        raise ValueError(f"eta: expected a step-size decay in (0, 1), got {eta!r}")
    min_lr = _check_pos_float(min_lr, "min_lr")
    return int(steps), lr0, eta, min_lr


def refine_fn(
    f: Callable[[jax.Array], jax.Array],
    r_init,
    *,
    steps: int = 50,
    lr0: float = 0.5,
    eta: float = 0.2,
    min_lr: float = 1e-6,
) -> RefineResult:
    """Per-example gradient ascent with step-size halving (by ``eta``) on any scalar function.

    f: maps r [B] -> values [B], example b's value depending only on r[b] (then the gradient of
    ``sum f`` is each example's df/dr). r_init: [B]. Each step, for every active example:
    ``g = df/dr``, ``r~ = r + lr g``; accept where ``f(r~) > f(r)`` strictly, else ``lr *= eta``;
    an example stops once ``lr < min_lr``. The loop (one ``lax.while_loop``) ends when every
    example has stopped or after ``steps`` iterations. Cost per step: one forward + backward at
    r, one forward at r~. Traceable: call it under ``jax.jit`` with ``f`` closed over.
    """
    if not callable(f):
        raise ValueError(f"f: expected a callable r [B] -> [B], got {type(f).__name__}")
    check_rank(r_init, "r_init", 1, "[B]")
    check_float(r_init, "r_init")
    check_finite(r_init, "r_init")
    steps, lr0, eta, min_lr = _check_refine_args(steps, lr0, eta, min_lr)
    return _refine_loop(f, jnp.asarray(r_init), steps, lr0, eta, min_lr)


@functools.partial(jax.jit, static_argnames=("cfg", "init"))
def _refine_jit(params, e, r0, key, steps, lr0, eta, min_lr, cfg, init):
    pe = _precompute_e(params, e)  # once per example, reused by every step

    def f(r):
        return _f_pre(params, pe, r[:, None], cfg, None, False)[:, 0]

    r_init = _init_rewards(key, r0, init)
    return _refine_loop(f, r_init, steps, lr0, eta, min_lr)


def refine(
    params,
    e,
    r0,
    key,
    cfg: EBRMConfig,
    steps: int = 50,
    lr0: float = 0.5,
    eta: float = 0.2,
    min_lr: float = 1e-6,
    init: str = "hybrid",
) -> RefineResult:
    """EBRM inference: ``r* ≈ argmax_r f(e, r)`` for every example in one jitted loop.

    e: [B, De]; r0: [B] base-RM rewards (on the scale the network was trained on); key: for
    the random part of the init (may be None with init='base'). Starts from
    :func:`init_rewards` (``init``), then runs :func:`refine_fn` on ``f(e, .)`` with dropout off;
    the e-part of the first head layer is computed once. ``steps``, ``lr0``, ``eta`` and
    ``min_lr`` are traced, so changing them does not recompile. Returns a :class:`RefineResult`
    (``.reward`` is the refined reward).
    """
    _check_params(params, cfg)
    _check_e(e, cfg)
    _check_r0(r0, e)
    if init not in INIT_MODES:
        raise ValueError(f"init: expected one of {INIT_MODES}, got {init!r}")
    if key is None:
        if init != "base":
            raise ValueError(f"key: expected a jax.random key for init {init!r}, got None")
        key = jax.random.key(0)  # unused by 'base'
    steps, lr0, eta, min_lr = _check_refine_args(steps, lr0, eta, min_lr)
    return _refine_jit(
        params,
        e,
        jnp.asarray(r0, jnp.float32),
        key,
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(lr0, jnp.float32),
        jnp.asarray(eta, jnp.float32),
        jnp.asarray(min_lr, jnp.float32),
        cfg,
        init,
    )
