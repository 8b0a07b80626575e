"""KV cache: an explicit, fixed-length pytree that jitted decoding donates and returns."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from swiftjax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys/values [B, Hkv, S, Dh] (heads first: attention reads each head's slots
    contiguously and a decode step writes one [B, Hkv, 1, Dh] slice in place, with no
    transpose of the whole cache), which slots hold real tokens [B, S], the next slot to
    write (scalar) and each row's next position id [B]."""

    k: tuple
    v: tuple
    key_valid: jax.Array
    cursor: jax.Array
    next_pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]

    @property
    def batch(self) -> int:
        return self.key_valid.shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    kshape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    vshape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(kshape, dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(vshape, dtype) for _ in range(cfg.num_layers)),
        key_valid=jnp.zeros((batch, max_len), jnp.bool_),
        cursor=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )


def write(buf, new, cursor):
    """Write new [B, T, ...] into buf [B, S, ...] at slot ``cursor``."""
    idx = (0, cursor) + (0,) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), idx)


def keys_layout(k):
    """Keys [B, T, Hkv, Dh] -> [B, Hkv, Dh, T] (the cache's key layout)."""
    return jnp.transpose(k, (0, 2, 3, 1))


def values_layout(v):
    """Values [B, T, Hkv, Dh] -> [B, Hkv, T, Dh] (the cache's value layout)."""
    return jnp.swapaxes(v, 1, 2)


def write_keys(buf, new, cursor):
    """Write keys [B, Hkv, Dh, T] into buf [B, Hkv, Dh, S] at slot ``cursor``."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, 0, cursor))


def write_values(buf, new, cursor):
    """Write values [B, Hkv, T, Dh] into buf [B, Hkv, S, Dh] at slot ``cursor``."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, cursor, 0))
