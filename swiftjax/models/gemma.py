"""Gemma 2 and Gemma 3 (text-only, ``Gemma3ForCausalLM``) as one Flax NNX module.

What differs from Llama, all config-driven: token embeddings scaled by sqrt(hidden_size)
(in the compute dtype, as transformers scales them in the weights' dtype); RMSNorm weights
applied as ``1 + w``; four norms per block (before and after attention, before and after
the MLP, the "after" ones on the branch before the residual add); a GeLU-tanh gated MLP;
queries scaled by ``query_pre_attn_scalar ** -0.5``; sliding-window and full blocks
alternating per ``layer_types``; tied embeddings. Gemma 2 soft-caps attention scores and the
final logits; Gemma 3 adds a per-head q/k RMSNorm and gives sliding blocks their own RoPE
base (``rope_local_base_freq``), and, like transformers, never soft-caps attention scores
(its final logits are soft-capped only when the config sets ``final_logit_softcapping``).

Attribute names mirror transformers' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``, so a
parameter's path in the NNX state is its safetensors key.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from swiftjax.models.config import ModelConfig
from swiftjax.models.layers import RMSNorm
from swiftjax.models.llama import MLP, Attention, LlamaBody, LlamaForCausalLM


class GemmaDecoderLayer(nnx.Module):
    """Pre- and post-norm around both the attention and the MLP branch."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(param_dtype=param_dtype, unit_offset=True)
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.input_layernorm = RMSNorm(d, eps, **nkw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(d, eps, **nkw)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, **nkw)
        self.mlp = MLP(cfg, **kw)
        self.post_feedforward_layernorm = RMSNorm(d, eps, **nkw)

    def __call__(self, h, tables, allowed, layer_kv, cursor):
        a, new_kv = self.self_attn(self.input_layernorm(h), tables, allowed, layer_kv, cursor)
        h = h + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h, new_kv


class GemmaBody(LlamaBody):
    layer_cls = GemmaDecoderLayer  # its final norm is (1 + w) through cfg.norm_unit_offset


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text causal LM (transformers' ``Gemma2ForCausalLM`` /
    ``Gemma3ForCausalLM`` layout; ``lm_head`` only when the embeddings are untied). Its own
    body and scaled embeddings; RoPE, blocks, final norm and unembedding as Llama's."""

    body_cls = GemmaBody

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if not (cfg.norm_unit_offset and cfg.scale_embeddings):
            raise ValueError(f"{cfg.model_type}: expected a Gemma config (norm_unit_offset and "
                             "scale_embeddings set, as ModelConfig.from_hf_dict makes them)")
        super().__init__(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_scale = math.sqrt(cfg.hidden_size)

    def embed(self, input_ids, positions):
        x = self.model.embed_tokens(input_ids)  # [B, T, D] in the compute dtype
        return x * jnp.asarray(self.embed_scale, x.dtype)
