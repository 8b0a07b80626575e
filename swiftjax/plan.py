"""``swiftjax plan``: per-device memory of sampling / scoring a model on a mesh, before any weight
is read.

    swiftjax plan model=llama-3.1-8b mesh.data=4 mesh.model=2 batch=64 max_len=2048 device_memory_gib=16
    swiftjax plan configs/plan/llama8b_v5e.yaml                    # the same keys from a YAML file

The model is built abstractly (:func:`jax.eval_shape`: shapes only) from an HF directory, a
``config.json`` or a preset name (:data:`PRESETS`, real models' published ``config.json``
numbers). Per device:

* weights: each parameter's bytes divided by the mesh axes its layout splits it over
  (:func:`swiftjax.parallel.model_rules`: heads / FFN / vocabulary over ``model``, FSDP over
  ``data``);
* KV cache: ``2 L B Hkv Dh S`` elements of the cache dtype, batch over ``data`` and KV heads over
  ``model`` where they divide (the sampler's constraints);
* activations: the largest transient of one prefill of the batch (``max_len`` tokens per row,
  the rows of one ``data`` shard): the residual stream, one layer's q/k/v, its float32 attention
  scores ``[B, H, T, T]``, its two FFN halves, and the last position's float32 logits; heads,
  FFN and vocabulary divided over ``model``. An estimate of the peak, not an XLA measurement.

It fits when the sum is at most ``device_memory_gib`` x ``headroom`` (XLA's own buffers and
fragmentation take the rest).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from swiftjax.config import parse_typed
from swiftjax.models.config import ModelConfig
from swiftjax.parallel import MeshConfig, model_param_specs

__all__ = ["PlanConfig", "PRESETS", "plan", "format_plan", "main", "resolve_model_config"]

GIB = 1024 ** 3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Published config.json numbers of real models (no weights needed to plan).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "eos_token_id": 151645,
    },
}


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """model: an HF directory, a config.json path or a preset (:data:`PRESETS`).
    batch: rows decoded together (all devices). max_len: prompt + new tokens per row (the cache
    length). dtype: weights and activations; cache_dtype: null = dtype.
    device_memory_gib: one device's memory; headroom: the fraction a plan may use."""

    model: str = "llama-3.1-8b"
    batch: int = 64
    max_len: int = 2048
    dtype: str = "bfloat16"
    cache_dtype: str | None = None
    device_memory_gib: float = 16.0
    headroom: float = 0.9
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        for name in ("batch", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("dtype", "cache_dtype"):
            v = getattr(self, name)
            if v is not None and v not in _DTYPE_BYTES:
                raise ValueError(f"{name}: expected one of {', '.join(_DTYPE_BYTES)}, got {v!r}")
        if not self.device_memory_gib > 0:
            raise ValueError(f"device_memory_gib: expected a positive number, got {self.device_memory_gib}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom: expected a number in (0, 1], got {self.headroom}")


def resolve_model_config(model: str) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, an HF directory or a config.json path."""
    if model in PRESETS:
        return ModelConfig.from_hf_dict(PRESETS[model], f"preset {model}")
    p = Path(model).expanduser()
    if p.is_dir() or p.is_file():
        return ModelConfig.from_pretrained(p)
    raise ValueError(f"model: expected a preset ({', '.join(PRESETS)}), an HF directory or a config.json, "
                     f"got {model!r}")


def _split(dim: int, n: int) -> int:
    """Elements of one shard of ``dim`` over ``n`` devices (n must divide dim to split at all)."""
    return dim // n if n > 1 and dim % n == 0 else dim


def weight_bytes_per_device(mcfg: ModelConfig, mesh: MeshConfig, dtype_bytes: int) -> tuple[int, int]:
    """(total weight bytes, bytes of the largest per-device share) under the model rules."""
    from flax import nnx

    from swiftjax.models.registry import abstract_model

    _, state = nnx.split(abstract_model(mcfg))
    amesh = jax.sharding.AbstractMesh((mesh.data, mesh.model), ("data", "model"))
    specs = model_param_specs(state, amesh, mesh.fsdp)
    sizes = {"data": mesh.data, "model": mesh.model}
    leaves = jax.tree.leaves(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = per = 0
    for x, spec in zip(leaves, spec_leaves):
        n = int(np.prod(x.shape)) if x.shape else 1
        total += n * dtype_bytes
        div = 1
        for a in tuple(spec):
            for name in (a if isinstance(a, tuple) else (a,)):
                if name is not None:
                    div *= sizes[name]
        per += -(-n // div) * dtype_bytes
    return total, per


def kv_bytes_per_device(mcfg: ModelConfig, mesh: MeshConfig, batch: int, max_len: int, dtype_bytes: int) -> int:
    b = _split(batch, mesh.data)
    hkv = _split(mcfg.num_kv_heads, mesh.model)
    return 2 * mcfg.num_layers * b * hkv * mcfg.head_dim * max_len * dtype_bytes


def activation_bytes_per_device(mcfg: ModelConfig, mesh: MeshConfig, batch: int, max_len: int,
                                dtype_bytes: int) -> int:
    b, t = _split(batch, mesh.data), max_len
    h = _split(mcfg.num_heads, mesh.model)
    hkv = _split(mcfg.num_kv_heads, mesh.model)
    ffn = _split(mcfg.intermediate_size, mesh.model)
    vocab = _split(mcfg.vocab_size, mesh.model)
    dh = mcfg.head_dim
    residual = 2 * b * t * mcfg.hidden_size * dtype_bytes          # the stream and one block's output
    qkv = b * t * (h + 2 * hkv) * dh * dtype_bytes
    scores = b * h * t * t * 4                                       # float32 softmax input
    mlp = 2 * b * t * ffn * dtype_bytes                              # gate and up
    logits = b * vocab * 4                                           # last position, float32
    return residual + qkv + max(scores, mlp) + logits


def plan(cfg: PlanConfig) -> dict:
    """The plan as a dict of byte counts per device and the verdict."""
    mcfg = resolve_model_config(cfg.model)
    wb = _DTYPE_BYTES[cfg.dtype]
    cb = _DTYPE_BYTES[cfg.cache_dtype or cfg.dtype]
    total_w, w = weight_bytes_per_device(mcfg, cfg.mesh, wb)
    kv = kv_bytes_per_device(mcfg, cfg.mesh, cfg.batch, cfg.max_len, cb)
    act = activation_bytes_per_device(mcfg, cfg.mesh, cfg.batch, cfg.max_len, wb)
    need = w + kv + act
    budget = cfg.device_memory_gib * GIB * cfg.headroom
    return {"model": cfg.model, "model_type": mcfg.model_type, "devices": cfg.mesh.devices,
            "mesh": {"data": cfg.mesh.data, "model": cfg.mesh.model, "fsdp": cfg.mesh.fsdp},
            "batch": cfg.batch, "max_len": cfg.max_len, "dtype": cfg.dtype,
            "params": total_w // wb, "weights_total": total_w,
            "per_device": {"weights": w, "kv_cache": kv, "activations": act, "total": need},
            "device_memory": int(cfg.device_memory_gib * GIB), "budget": int(budget), "fits": bool(need <= budget)}


def _gib(x: int) -> str:
    return f"{x / GIB:.2f} GiB"


def format_plan(p: dict) -> str:
    m = p["mesh"]
    d = p["per_device"]
    lines = [f"{p['model']} ({p['model_type']}, {p['params'] / 1e9:.2f}B params, {p['dtype']}): "
             f"{_gib(p['weights_total'])} of weights",
             f"mesh data={m['data']} model={m['model']} fsdp={str(m['fsdp']).lower()} ({p['devices']} devices), "
             f"batch {p['batch']}, {p['max_len']} tokens per row",
             f"per device: weights {_gib(d['weights'])} + KV cache {_gib(d['kv_cache'])} + "
             f"activations {_gib(d['activations'])} = {_gib(d['total'])}",
             f"{'fits' if p['fits'] else 'does NOT fit'}: {_gib(d['total'])} vs {_gib(p['budget'])} usable of "
             f"{_gib(p['device_memory'])} per device"]
    return "\n".join(lines)


def main(argv) -> int:
    """``swiftjax plan [CONFIG.yaml] [key=value ...]``; exit status 1 when it does not fit."""
    cfg = parse_typed(PlanConfig, argv, "plan")
    p = plan(cfg)
    print(format_plan(p))
    print(json.dumps(p))
    return 0 if p["fits"] else 1

