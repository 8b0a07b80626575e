"""GPT-2 as a Flax NNX module with transformers' ``GPT2LMHeadModel`` names and layouts
(``Conv1D`` weights are [in, out]; learned absolute positions; tied output embedding)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from swiftjax.models import cache as kv
from swiftjax.models.config import ModelConfig
from swiftjax.models.layers import Embedding, LayerNorm, Linear, activation, attend
from swiftjax.models.transformer import DecoderLM


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, layout="in_out", bias=True)
        self.c_attn = Linear(d, 3 * d, **kw)
        self.c_proj = Linear(d, d, **kw)
        self.shape = (cfg.num_heads, cfg.head_dim)
        self.dtype = dtype

    def __call__(self, x, tables, allowed, layer_kv, cursor):
        b, t, d = x.shape
        h, dh = self.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, dh) for a in (q, k, v))
        k, v = kv.keys_layout(k), kv.values_layout(v)
        if layer_kv is not None:
            k = kv.write_keys(layer_kv[0], k, cursor)
            v = kv.write_values(layer_kv[1], v, cursor)
        out = attend(q, k, v, allowed, self.dtype)
        return self.c_proj(out.reshape(b, t, d)), (k, v)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, layout="in_out", bias=True)
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.attn = GPT2Attention(cfg, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = GPT2MLP(cfg, **kw)

    def __call__(self, h, tables, allowed, layer_kv, cursor):
        a, new_kv = self.attn(self.ln_1(h), tables, allowed, layer_kv, cursor)
        h = h + a
        h = h + self.mlp(self.ln_2(h))
        return h, new_kv


class GPT2Body(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.h = nnx.List([GPT2Block(cfg, **kw) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)


class GPT2LMHeadModel(DecoderLM):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if not cfg.tie_word_embeddings:
            raise ValueError("gpt2: expected tie_word_embeddings=true (untied GPT-2 is not supported)")
        self.config = cfg
        self.transformer = GPT2Body(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def embed(self, input_ids, positions):
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    def blocks(self):
        return self.transformer.h

    def final_norm(self, h):
        return self.transformer.ln_f(h)

    def unembed(self, h):
        return self.transformer.wte.attend(h)
