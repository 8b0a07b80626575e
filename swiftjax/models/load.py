"""Load and save Hugging Face causal-LM directories without torch.

Module attribute names mirror transformers', so a parameter's NNX path joined by dots is
its safetensors key; loading is a checked copy (names, shapes) into an abstract model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from swiftjax.models.config import ModelConfig
from swiftjax.models.registry import abstract_model

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def param_keys(model) -> dict[str, tuple]:
    """HF key -> (shape, dtype) for every parameter of ``model`` (abstract or concrete)."""
    return {_key(p): (tuple(v.shape), v.dtype) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if single.is_file():
        return [single]
    raise ValueError(
        f"{path}: expected model.safetensors or model.safetensors.index.json, found neither"
    )


def _normalise_key(key: str, cfg: ModelConfig) -> str:
    # Old GPT-2 checkpoints store the body without the "transformer." prefix.
    if cfg.is_gpt2 and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def read_safetensors(path: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) checkpoint as numpy arrays, keys normalised."""
    out: dict[str, np.ndarray] = {}
    for f in _safetensors_files(Path(path)):
        with safe_open(str(f), framework="numpy") as fh:
            for k in fh.keys():
                out[_normalise_key(k, cfg)] = fh.get_tensor(k)
    return out


def load_model(path: str | Path, dtype=jnp.float32, compute_dtype=None, sharding=None):
    """Load a local HF directory (config.json + safetensors) into an NNX model.

    ``dtype`` is the parameter dtype; ``compute_dtype`` (default: ``dtype``) the matmul
    dtype (norms and softmax always accumulate in float32). ``sharding``, if given, is a
    callable ``key -> jax.sharding.Sharding`` used to place each parameter.
    Returns ``(model, config)``. Missing or unexpected weight names raise ValueError.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_model: expected a directory with config.json, got {path}")
    dtype = jnp.float32 if dtype is None else dtype
    cfg = ModelConfig.from_pretrained(path)
    model = abstract_model(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
    tensors = read_safetensors(path, cfg)
    expected = param_keys(model)
    ignored = {k for k in tensors if k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - ignored)
    if missing or extra:
        raise ValueError(
            f"{path}: checkpoint does not match {cfg.model_type} config; "
            f"missing weights: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected weights: {extra[:20]}{' ...' if len(extra) > 20 else ''}"
        )
    pure = {}
    for key, (shape, _) in expected.items():
        arr = tensors[key]
        if tuple(arr.shape) != shape:
            raise ValueError(f"{path}: weight {key}: expected shape {shape}, got {tuple(arr.shape)}")
        val = jnp.asarray(arr, dtype=dtype)
        if sharding is not None:
            val = jax.device_put(val, sharding(key))
        pure[key] = val
    _fill(model, pure)
    return model, cfg


def _fill(model, flat: dict[str, jax.Array]) -> None:
    state = nnx.state(model, nnx.Param)
    leaves = []
    for p, v in nnx.to_flat_state(state):
        leaves.append((p, v.replace(flat[_key(p)])))
    nnx.update(model, nnx.from_flat_state(leaves))


def save_model(model, cfg: ModelConfig, path: str | Path, *, overwrite: bool = False,
               extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``extra_files``) atomically.

    The directory is built beside ``path`` and renamed into place at the end, so a
    crash never leaves a half-written model behind.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"save_model: {path} exists and is not empty (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {k: np.asarray(jax.device_get(v[...]), dtype=np.float32)
                   for k, v in ((_key(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
