"""Phi-3 / Phi-3.5 / Phi-4-mini (``model_type: phi3``) as a Flax NNX module.

A Llama-style decoder whose q/k/v and gate/up projections are single fused weights, kept
under transformers' names and layouts (``self_attn.qkv_proj.weight`` [(H + 2 Hkv) Dh, D]:
query rows, then key rows, then value rows; ``mlp.gate_up_proj.weight`` [2 I, D]: gate rows,
then up rows), so a parameter's path in the NNX state is its safetensors key. RoPE may be
partial (``partial_rotary_factor``) and ``longrope``-scaled; a ``sliding_window``, when set,
applies to every block.

LongRoPE and the KV cache: transformers picks the short or long factors from the largest
position of each forward and, while generating, re-encodes the whole sequence once it
crosses ``original_max_position_embeddings``. A fixed cache cannot re-encode, so a cache
longer than that (where the factors could switch mid-sequence) is refused.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from swiftjax.models import cache as kv
from swiftjax.models.config import ModelConfig
from swiftjax.models.layers import Linear, activation
from swiftjax.models.llama import Attention, DecoderLayer, LlamaBody, LlamaForCausalLM


class Phi3Attention(Attention):
    """:class:`~swiftjax.models.llama.Attention` with one fused ``qkv_proj``."""

    def init_projections(self, cfg: ModelConfig, **kw):
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(d, (h + 2 * hkv) * dh, bias=False, **kw)
        self.splits = (h * dh, (h + hkv) * dh)

    def qkv(self, x):
        return jnp.split(self.qkv_proj(x), self.splits, axis=-1)


class Phi3MLP(nnx.Module):
    """Gated MLP with one fused ``gate_up_proj`` (gate half first)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


class Phi3DecoderLayer(DecoderLayer):
    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP


class Phi3Body(LlamaBody):
    layer_cls = Phi3DecoderLayer


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 causal LM (transformers' ``Phi3ForCausalLM`` layout); embed / rope / unembed as Llama's."""

    body_cls = Phi3Body

    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False, *,
                 cache: kv.KVCache | None = None, **kw):
        cfg = self.config
        if cache is not None and cfg.rope_type == "longrope":
            s = cfg.rope_scaling_dict()
            orig = s["original_max_position_embeddings"]
            if cache.max_len > orig and s["short_factor"] != s["long_factor"]:
                raise ValueError(
                    f"cache: expected at most {orig} slots (original_max_position_embeddings) for phi3 "
                    f"longrope, got {cache.max_len} (its RoPE factors would switch mid-sequence)")
        return super().__call__(input_ids, attention_mask, output_hidden_states, cache=cache, **kw)
