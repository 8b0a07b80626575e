"""model_type -> NNX class, and construction from a config."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from swiftjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from swiftjax.models.gemma import GemmaForCausalLM
from swiftjax.models.gpt2 import GPT2LMHeadModel
from swiftjax.models.llama import LlamaForCausalLM
from swiftjax.models.phi3 import Phi3ForCausalLM

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "qwen3": LlamaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3_text": GemmaForCausalLM,
    "phi3": Phi3ForCausalLM,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_MODEL_TYPES)


def model_class(model_type: str):
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"unsupported model_type {model_type!r}: expected one of {', '.join(MODEL_CLASSES)}"
        )
    return MODEL_CLASSES[model_type]


def create_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32):
    """A randomly initialised model (normal(0, 0.02) weights, unit norms: weights 1, or 0 for
    Gemma's ``1 + w`` norms)."""
    return model_class(cfg.model_type)(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """The model's structure with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: create_model(cfg, dtype=dtype, param_dtype=param_dtype))
