"""Load and save Hugging Face causal-LM directories without torch.

Module attribute names mirror transformers', so a parameter's NNX path joined by dots is
its safetensors key; loading is a checked copy (names, shapes) into an abstract model.

Order of checks: the safetensors headers (names, shapes; a sharded checkpoint's
``model.safetensors.index.json`` weight_map says which shard holds each tensor, and a tensor
in two shards is an error) are compared with the model before any tensor data is read.
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from swiftjax.models.config import ModelConfig
from swiftjax.models.registry import abstract_model

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def param_keys(model) -> dict[str, tuple]:
    """HF key -> (shape, dtype) for every parameter of ``model`` (abstract or concrete)."""
    return {_key(p): (tuple(v.shape), v.dtype) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), validated."""
    try:
        d = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{index}: expected a JSON object with a 'weight_map', got unreadable content ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{index}: expected a non-empty 'weight_map' object (tensor name -> shard file), "
                         f"got {type(wm).__name__ if wm is not None else 'none'}")
    for k, v in wm.items():
        if not isinstance(v, str) or Path(v).name != v or not v:
            raise ValueError(f"{index}: weight_map[{k!r}]: expected a shard file name in this directory, got {v!r}")
    return wm


def _header(f: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, dtype) from a safetensors header (no tensor data is read)."""
    if not f.is_file():
        raise ValueError(f"{f}: expected a safetensors file, found none")
    try:
        with safe_open(str(f), framework="numpy") as fh:
            out = {}
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: expected a complete safetensors file, got a truncated or unreadable one ({e})") from None


def checkpoint_layout(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """tensor name (as stored) -> (file, shape, dtype) of a checkpoint, from headers only.

    Sharded: only the shards the index's weight_map names are read, each tensor must be in
    the shard the weight_map says and in no other, and every tensor of those shards must be
    listed. Otherwise ``model.safetensors``.
    """
    path = Path(path)
    index, single = path / INDEX, path / SINGLE
    if not index.is_file():
        if single.is_file():
            return {k: (single, shape, dt) for k, (shape, dt) in _header(single).items()}
        raise ValueError(f"{path}: expected {SINGLE} or {INDEX}, found neither")
    wm = _read_weight_map(index)
    layout: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for name in sorted(set(wm.values())):
        f = path / name
        for k, (shape, dt) in _header(f).items():
            if k in layout:
                raise ValueError(f"{index}: tensor {k!r} is in two shards, {layout[k][0].name} and {name} "
                                 "(expected each tensor in exactly one)")
            layout[k] = (f, shape, dt)
    for k, name in wm.items():
        if k not in layout or layout[k][0].name != name:
            where = f"it is in {layout[k][0].name}" if k in layout else "no listed shard holds it"
            raise ValueError(f"{index}: weight_map puts tensor {k!r} in {name}, but {where}")
    unlisted = sorted(set(layout) - set(wm))
    if unlisted:
        raise ValueError(f"{index}: expected every tensor of the shards in the weight_map, "
                         f"{len(unlisted)} are not (e.g. {unlisted[:3]})")
    return layout


def _normalise_key(key: str, cfg: ModelConfig) -> str:
    # Old GPT-2 checkpoints store the body without the "transformer." prefix.
    if cfg.is_gpt2 and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def _normalised_layout(path: Path, cfg: ModelConfig) -> dict[str, tuple[str, Path, tuple[int, ...]]]:
    """normalised key -> (stored name, file, shape); two stored names for one key are an error."""
    out: dict[str, tuple[str, Path, tuple[int, ...]]] = {}
    for raw, (f, shape, _) in checkpoint_layout(path).items():
        key = _normalise_key(raw, cfg)
        if key in out:
            raise ValueError(f"{path}: tensors {out[key][0]!r} and {raw!r} are the same weight {key!r} "
                             "(expected it once)")
        out[key] = (raw, f, shape)
    return out


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _data_index(f: Path) -> tuple[int, dict]:
    """(byte offset of the data section, {name: header entry}) of a safetensors file."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _stream_tensors(wanted: dict[str, tuple[str, Path]]):
    """Yield (key, array) for {key: (stored name, file)} one tensor at a time, read with plain
    file reads into a fresh buffer (no memory map), so a caller that converts and drops each
    array holds about one copy of the checkpoint at its peak."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, (raw, f) in wanted.items():
        by_file.setdefault(f, []).append((key, raw))
    for f, items in by_file.items():
        try:
            base, header = _data_index(f)
            with open(f, "rb") as fh:
                for key, raw in items:
                    e = header[raw]
                    start, end = (int(x) for x in e["data_offsets"])
                    arr = np.empty(tuple(e["shape"]), _DTYPES[e["dtype"]])
                    fh.seek(base + start)
                    if arr.nbytes != end - start or fh.readinto(arr.reshape(-1).view(np.uint8)) != end - start:
                        raise OSError(f"tensor {raw!r} is cut short")
                    yield key, arr
        except (KeyError, OSError, ValueError) as e:
            raise ValueError(f"{f}: expected a complete safetensors file, got a truncated or unreadable one ({e})") from None


def _read_tensors(wanted: dict[str, tuple[str, Path]]) -> dict[str, np.ndarray]:
    """key -> array for {key: (stored name, file)}."""
    return dict(_stream_tensors(wanted))


def read_safetensors(path: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) checkpoint as numpy arrays, keys normalised."""
    layout = _normalised_layout(Path(path), cfg)
    return _read_tensors({k: (raw, f) for k, (raw, f, _) in layout.items()})


def load_model(path: str | Path, dtype=jnp.float32, compute_dtype=None, sharding=None):
    """Load a local HF directory (config.json + safetensors) into an NNX model.

    ``dtype`` is the parameter dtype; ``compute_dtype`` (default: ``dtype``) the matmul
    dtype (norms and softmax always accumulate in float32). ``sharding``, if given, is a
    callable ``key -> jax.sharding.Sharding`` used to place each parameter.
    Returns ``(model, config)``. Missing or unexpected weight names and wrong shapes raise
    ValueError, found from the safetensors headers before any tensor data is read.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_model: expected a directory with config.json, got {path}")
    dtype = jnp.float32 if dtype is None else dtype
    cfg = ModelConfig.from_pretrained(path)
    model = abstract_model(cfg, dtype=compute_dtype or dtype, param_dtype=dtype)
    layout = _normalised_layout(path, cfg)
    expected = param_keys(model)
    ignored = {k for k in layout if k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")
    missing = sorted(set(expected) - set(layout))
    extra = sorted(set(layout) - set(expected) - ignored)
    if missing or extra:
        raise ValueError(
            f"{path}: checkpoint does not match {cfg.model_type} config; "
            f"missing weights: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected weights: {extra[:20]}{' ...' if len(extra) > 20 else ''}"
        )
    for key, (shape, _) in expected.items():
        raw, f, got = layout[key]
        if got != shape:
            raise ValueError(f"{f}: weight {raw}: expected shape {shape}, got {got}")
    pure = {}
    for key, arr in _stream_tensors({k: layout[k][:2] for k in expected}):  # one tensor at a time
        val = jnp.asarray(arr, dtype=dtype)
        del arr
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
