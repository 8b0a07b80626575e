"""Llama 2/3, Mistral, Qwen2/2.5 and Qwen3 as one Flax NNX module; the differences are
config flags (qkv bias, rope scaling, tied embeddings, sliding window, Qwen3's per-head
q/k RMSNorm). The attention and MLP here are shared by the Gemma and Phi-3 ports.

Attribute names mirror transformers' ``LlamaForCausalLM`` so that a parameter's path in
the NNX state is its safetensors key (``model.layers.3.self_attn.q_proj.weight``).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from swiftjax.models import cache as kv
from swiftjax.models.config import ModelConfig
from swiftjax.models.layers import (Embedding, Linear, RMSNorm, activation, apply_rope, attend,
                                    project, rope_tables)
from swiftjax.models.transformer import DecoderLM


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, writing its keys/values into the KV cache.

    Options from the config: q/k/v and o biases; ``qk_norm`` (an RMSNorm over each query /
    key head, before RoPE: Qwen3, Gemma 3); ``query_pre_attn_scalar`` and
    ``attn_logit_softcapping`` (Gemma). Subclasses with other projection weights override
    :meth:`qkv`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.init_projections(cfg, **kw)
        self.o_proj = Linear(h * dh, d, bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            nkw = dict(param_dtype=param_dtype, unit_offset=cfg.norm_unit_offset)
            self.q_norm = RMSNorm(dh, cfg.norm_eps, **nkw)
            self.k_norm = RMSNorm(dh, cfg.norm_eps, **nkw)
        else:
            self.q_norm = self.k_norm = None
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.logit_cap = cfg.attn_logit_softcapping
        self.shape = (h, hkv, dh)
        self.dtype = dtype

    def init_projections(self, cfg: ModelConfig, **kw):
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, h * dh, bias=cfg.qkv_bias, **kw)
        self.k_proj = Linear(d, hkv * dh, bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, hkv * dh, bias=cfg.qkv_bias, **kw)

    def qkv(self, x):
        """x [B, T, D] -> q [B, T, H*Dh], k, v [B, T, Hkv*Dh]."""
        return project(x, [self.q_proj, self.k_proj, self.v_proj])

    def __call__(self, x, tables, allowed, layer_kv, cursor):
        b, t, _ = x.shape
        h, hkv, dh = self.shape
        q, k, v = self.qkv(x)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, hkv, dh), v.reshape(b, t, hkv, dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = tables
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv.keys_layout(k), kv.values_layout(v)
        if layer_kv is not None:
            k = kv.write_keys(layer_kv[0], k, cursor)
            v = kv.write_values(layer_kv[1], v, cursor)
        out = attend(q, k, v, allowed, self.dtype, scale=self.scale, logit_cap=self.logit_cap)
        return self.o_proj(out.reshape(b, t, h * dh)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        gate, up = project(x, [self.gate_proj, self.up_proj])
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nnx.Module):
    attention_cls = Attention  # subclasses swap the attention / MLP modules (Phi-3's fused ones)
    mlp_cls = MLP

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.self_attn = self.attention_cls(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = self.mlp_cls(cfg, **kw)

    def __call__(self, h, tables, allowed, layer_kv, cursor):
        a, new_kv = self.self_attn(self.input_layernorm(h), tables, allowed, layer_kv, cursor)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, new_kv


class LlamaBody(nnx.Module):
    layer_cls = DecoderLayer  # subclasses swap the block (Phi-3, Gemma)

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype,
                                      param_dtype=param_dtype)
        self.layers = nnx.List([self.layer_cls(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype,
                            unit_offset=cfg.norm_unit_offset)


class LlamaForCausalLM(DecoderLM):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM (transformers' ``*ForCausalLM`` layout)."""

    body_cls = LlamaBody  # subclasses swap the body (Phi-3, Gemma)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = cfg
        self.model = self.body_cls(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs, dtype=dtype,
            param_dtype=param_dtype)

    def embed(self, input_ids, positions):
        return self.model.embed_tokens(input_ids)

    def rope(self, positions, layer_type):
        return rope_tables(self.config, positions, layer_type)

    def blocks(self):
        return self.model.layers

    def final_norm(self, h):
        return self.model.norm(h)

    def unembed(self, h):
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)
