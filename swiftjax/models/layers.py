"""Building blocks shared by the model ports: linear/embedding/norm modules that keep
Hugging Face's parameter names and layouts (so loading is a rename-free copy), RoPE,
masks from the attention mask and a grouped-query attention core.

Parameter layouts follow the checkpoints: ``Linear.weight`` is ``[out, in]`` like
``torch.nn.Linear`` (``layout="out_in"``) or ``[in, out]`` like GPT-2's ``Conv1D``
(``layout="in_out"``); XLA contracts either without a transpose.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from swiftjax.models.config import FULL, SLIDING, ModelConfig

INIT_STD = 0.02


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool, rngs: nnx.Rngs,
                 layout: str = "out_in", dtype=jnp.float32, param_dtype=jnp.float32):
        shape = (dout, din) if layout == "out_in" else (din, dout)
        self.layout = layout
        self.dtype = dtype
        self.weight = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype)) if bias else None

    def __call__(self, x):
        w = self.weight[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.layout == "out_in":
            y = dense(x, w)
        else:
            y = jnp.einsum("...i,io->...o", x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


# Decoding's products have a few rows (batch x 1 token) against a large [out, in] weight. On
# the CPU, XLA's matmul runs such a product faster computed as W @ x^T (the weight as the left
# operand, output [out, rows]) than as x @ W^T: up to ~2x at 2-32 rows, ~1.3x at 48 (measured
# on the decoding step of Qwen2.5-0.5B); a plain transpose of the result is folded back into
# the slow form, so the fast form is kept behind an optimisation barrier.
# ``SWIFTJAX_CPU_WEIGHT_LEFT_ROWS`` overrides the largest row count it is used for (benchmarks).
_WEIGHT_LEFT_ROWS = (2, int(os.environ.get("SWIFTJAX_CPU_WEIGHT_LEFT_ROWS", "64")))


def weight_left(rows: int) -> bool:
    """Whether a product with ``rows`` rows runs as ``(W @ x^T)^T`` (CPU, few rows)."""
    lo, hi = _WEIGHT_LEFT_ROWS
    return lo <= rows <= hi and jax.default_backend() == "cpu"


def dense(x, w, preferred_element_type=None):
    """``x @ w.T`` for x [..., in] and an ``out_in`` weight w [out, in] -> [..., out]."""
    rows = math.prod(x.shape[:-1])
    if not weight_left(rows):
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=preferred_element_type)
    y = jnp.einsum("oi,mi->om", w, x.reshape(rows, x.shape[-1]), preferred_element_type=preferred_element_type)
    return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])


def fuse_projections() -> bool:
    """Whether sibling projections of one input (q/k/v, gate/up) run as one matmul.

    On the CPU one wide matmul runs up to 1.5x faster than several narrow ones at decoding's
    small batches, and XLA hoists the weight concatenation out of a decoding loop (one copy of
    those weights per jitted call). On accelerators the separate matmuls are already fast and
    the copy would cost device memory, so they stay separate.
    """
    return jax.default_backend() == "cpu"


def project(x, linears):
    """``[lin(x) for lin in linears]`` for ``out_in`` Linears that share their input, computed
    as one matmul over the concatenated weights when :func:`fuse_projections` says so."""
    plain = all(type(lin) is Linear and lin.layout == "out_in" for lin in linears)  # not LoRA-wrapped
    if len(linears) == 1 or not plain or not fuse_projections():
        return [lin(x) for lin in linears]
    first = linears[0]
    w = jnp.concatenate([lin.weight[...] for lin in linears], axis=0).astype(first.dtype)
    y = dense(x.astype(first.dtype), w)
    if first.bias is not None:
        y = y + jnp.concatenate([lin.bias[...] for lin in linears]).astype(first.dtype)
    sizes = [lin.weight.shape[0] for lin in linears]
    cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return jnp.split(y, cuts, axis=-1)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.dtype = dtype
        self.weight = nnx.Param(INIT_STD * jax.random.normal(rngs.params(), (num, dim), param_dtype))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, h):
        """Tied output projection: ``h @ weight.T`` with float32 accumulation."""
        w = self.weight[...].astype(self.dtype)
        return dense(h.astype(self.dtype), w, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis, accumulated in float32 (as transformers does).

    Llama style (default): ``w * x_hat`` with ``x_hat`` cast back to the input dtype first.
    ``unit_offset`` (Gemma): weights stored as offsets from one (initialised to 0) and the
    product ``x_hat * (1 + w)`` taken in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, unit_offset: bool = False):
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nnx.Param((jnp.zeros if unit_offset else jnp.ones)((dim,), param_dtype))

    def __call__(self, x):
        dt = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(dt)
        return self.weight[...].astype(dt) * x32.astype(dt)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        dt = x.dtype
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dt)


def activation(name: str):
    fns = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "relu": jax.nn.relu,
    }
    if name not in fns:
        raise ValueError(f"unsupported activation {name!r}: expected one of {sorted(fns)}")
    return fns[name]


def softcap(x, cap: float | None):
    """``cap * tanh(x / cap)`` (Gemma's soft capping of attention scores / logits); x if None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# ---------------------------------------------------------------------------- RoPE
def _plain_inv_freq(theta: float, dim: int):
    """1 / theta^(2i / dim) for i < dim / 2, float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_inv_freq(cfg: ModelConfig, layer_type: str = FULL):
    """Inverse frequencies [rotary_dim/2] in float32 of blocks of ``layer_type``: the scaling
    types Llama uses; Gemma 3's sliding blocks use their own plain base. (``longrope``, whose
    frequencies depend on the sequence length, is handled in :func:`rope_tables`.)"""
    dim = cfg.rotary_dim
    if layer_type == SLIDING and cfg.rope_local_theta is not None:
        return _plain_inv_freq(cfg.rope_local_theta, dim)
    inv = _plain_inv_freq(cfg.rope_theta, dim)
    s = cfg.rope_scaling_dict()
    if cfg.rope_type == "linear":
        inv = inv / float(s["factor"])
    elif cfg.rope_type == "llama3":
        factor = float(s["factor"])
        low = float(s.get("low_freq_factor", 1.0))
        high = float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / low, old / high
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def longrope_attention_factor(cfg: ModelConfig) -> float:
    """LongRoPE's cos/sin multiplier: ``attention_factor`` if given, else
    sqrt(1 + ln(f) / ln(original max)) with f = ``factor`` or max / original max (1 if f <= 1)."""
    s = cfg.rope_scaling_dict()
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    orig = s["original_max_position_embeddings"]
    factor = float(s["factor"]) if s.get("factor") is not None else cfg.max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def rope_tables(cfg: ModelConfig, positions, layer_type: str = FULL):
    """cos, sin [B, T, rotary_dim/2] float32 for integer ``positions`` [B, T], for blocks of
    ``layer_type``.

    ``longrope`` (Phi-3) divides the frequencies by its ``long_factor`` when the forward's
    largest position + 1 exceeds ``original_max_position_embeddings``, else by its
    ``short_factor`` (one choice for the whole call, as transformers makes it), and scales
    cos and sin by :func:`longrope_attention_factor`.
    """
    pos = positions.astype(jnp.float32)[..., None]
    if cfg.rope_type != "longrope" or (layer_type == SLIDING and cfg.rope_local_theta is not None):
        ang = pos * rope_inv_freq(cfg, layer_type)
        return jnp.cos(ang), jnp.sin(ang)
    s = cfg.rope_scaling_dict()
    base = _plain_inv_freq(cfg.rope_theta, cfg.rotary_dim)
    long = jnp.max(positions) + 1 > s["original_max_position_embeddings"]
    ext = jnp.where(long, jnp.asarray(s["long_factor"], jnp.float32), jnp.asarray(s["short_factor"], jnp.float32))
    ang = pos * (base / ext)
    a = longrope_attention_factor(cfg)
    return jnp.cos(ang) * a, jnp.sin(ang) * a


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, T, H, Dh] (HF convention), computed in float32. With tables of
    rotary_dim/2 < Dh/2 (partial rotary) only the first rotary_dim channels rotate."""
    dt = x.dtype
    x = x.astype(jnp.float32)
    half = cos.shape[-1]
    rest = x[..., 2 * half:]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    parts = [x1 * c - x2 * s, x2 * c + x1 * s] + ([rest] if rest.shape[-1] else [])
    return jnp.concatenate(parts, axis=-1).astype(dt)


# ---------------------------------------------------------------------------- attention
def attend(q, k, v, allowed, dtype, *, scale: float | None = None, logit_cap: float | None = None):
    """Grouped-query attention. q [B,T,H,Dh], k [B,Hkv,Dh,S] and v [B,Hkv,S,Dh] (heads first,
    the KV cache's layouts), allowed [B,T,S] bool. Query heads are grouped over their KV head
    (no repetition of keys/values).

    Scores are ``q.k * scale`` (default ``1/sqrt(Dh)``), soft-capped at ``logit_cap`` when
    given (Gemma 2). Scores and softmax run in float32; rows with no allowed key get a uniform
    (finite) distribution instead of NaN (they are padding and never read).
    """
    b, t, h, dh = q.shape
    hkv = k.shape[1]
    g = h // hkv
    # query rows of one KV head side by side: [B, Hkv, T*G, Dh]; both products then have
    # (batch, KV head) leading and the contracted/summed axis where XLA's CPU dot wants it
    qg = jnp.swapaxes(q.reshape(b, t, hkv, g, dh), 1, 2).reshape(b, hkv, t * g, dh).astype(dtype)
    scores = jnp.einsum("bkqd,bkds->bkqs", qg, k.astype(dtype), preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(dh) if scale is None else scores * scale
    scores = softcap(scores, logit_cap)
    ok = jnp.broadcast_to(allowed[:, None, :, None, :], (b, 1, t, g, allowed.shape[-1]))
    scores = jnp.where(ok.reshape(b, 1, t * g, -1), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dtype))
    return jnp.swapaxes(out.reshape(b, hkv, t, g, dh), 1, 2).reshape(b, t, h, dh)


def allowed_mask(key_valid, cursor, t: int, sliding_window: int | None):
    """[B, T, S] bool: query i (at slot cursor+i) may see key slot j.

    ``key_valid`` [B, S]: which slots hold real tokens. Causality is by slot; under left
    padding, slot differences between real tokens equal position differences, so the
    sliding window is exact too.
    """
    s = key_valid.shape[1]
    q_slot = cursor + jnp.arange(t)[:, None]
    k_slot = jnp.arange(s)[None, :]
    ok = k_slot <= q_slot
    if sliding_window is not None:
        ok = ok & (q_slot - k_slot < sliding_window)
    return ok[None] & key_valid[:, None, :].astype(bool)
