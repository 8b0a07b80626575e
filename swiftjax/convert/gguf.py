"""Convert a llama.cpp GGUF file to a Hugging Face folder, without torch.

GGUF keeps the whole model in one file: metadata (architecture hyper-parameters, the tokenizer's
vocabulary, merges and special ids, the chat template) and tensors, most of them quantized in
blocks. This module reads it with the ``gguf`` package (its numpy dequantization kernels), and
writes a directory that :func:`swiftjax.load_model`, :class:`swiftjax.Backbone` and
``transformers`` load: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
shards + ``model.safetensors.index.json``), ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``.

What the conversion undoes (llama.cpp's ``convert_hf_to_gguf`` applied it):

* tensor names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.;
* ``llama`` only: the rows of ``attn_q`` / ``attn_k`` (weights and biases) were permuted inside
  each head from HF's rotate-half RoPE layout to GGML's interleaved-pair layout; ``qwen2`` and
  ``qwen3`` use GGML's NeoX RoPE and were stored as is (``qwen3`` adds the per-head q/k norms
  ``attn_q_norm`` / ``attn_k_norm``);
* ``llama`` with Llama-3 RoPE scaling: the scaling is stored as a ``rope_freqs`` tensor (one
  divisor per frequency) instead of config numbers; they are recovered from it (see
  :func:`llama3_rope_from_factors`);
* quantization: each tensor is dequantized to float32 (then cast to ``dtype``). A quantized
  model converts to its dequantized weights; nothing can bring back the original precision.

Tensors are converted one at a time and written straight into the safetensors files, so peak
memory is about one tensor plus the memory-mapped input. Everything is built in a temporary
folder beside the destination and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
SUPPORTED_TOKENIZERS = ("gpt2",)
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
GGUF_MAGIC = b"GGUF"

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Chat end-of-turn tokens: when the chat template writes one, generation must stop on it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


# ----------------------------------------------------------------------------------------------
# reading


def _err(path, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def open_gguf(path):
    """``gguf.GGUFReader`` for ``path``, with clear errors for a missing, foreign or cut file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gguf: expected a .gguf file, got {path} (missing)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise _err(path, f"not a GGUF file (expected magic b'GGUF', got {magic!r})")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader fails inside numpy when the file is cut short
        raise _err(path, f"cannot read this GGUF file of {size} bytes (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise _err(path, f"tensor {t.name} ends at byte {end}, the file has {size} (truncated)")
    return reader


def _field_value(f) -> Any:
    """A metadata value as Python; float32 scalars as their shortest decimal (1e-05, not 9.99e-06)."""
    import gguf

    v = f.contents()
    if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
        return float(str(np.float32(v)))
    return v


def read_metadata(reader) -> dict[str, Any]:
    """All metadata key -> value (arrays as lists)."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (row-major) order, i.e. the HF shape."""
    import gguf

    shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {t.name}: GGML type {t.tensor_type.name} cannot be dequantized: {e}") from None
    return np.asarray(arr, dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------
# layout


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (interleaved pairs back to rotate-half) for ``n_heads``.

    llama.cpp's converter reorders the rows of each head of a q/k projection (weight [rows, D] or
    bias [rows]) from (first half, second half) to interleaved pairs, i.e. views the head's rows
    as [2, head_dim/2] and transposes. The inverse views them as [head_dim/2, 2] and transposes.
    """
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"unpermute_rope_rows: {rows} rows do not split into {n_heads} heads of even size")
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation itself (rotate-half rows to interleaved pairs); the inverse of
    :func:`unpermute_rope_rows`. Used by tests that write GGUF files the way llama.cpp does."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"permute_rope_rows: {rows} rows do not split into {n_heads} heads of even size")
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(name: str) -> str | None:
    """The HF key for a GGUF tensor name, or None when it has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


# ----------------------------------------------------------------------------------------------
# config


def llama3_rope_from_factors(factors, theta: float, head_dim: int) -> dict[str, float]:
    """Llama-3 RoPE scaling numbers that reproduce llama.cpp's ``rope_freqs`` divisors.

    For frequency i (inverse frequency ``theta ** (-2i/head_dim)``, wavelength w_i) Llama-3 divides
    the inverse frequency by 1 (w < L/high), by ``factor`` (w > L/low), or in between by
    ``1 / ((1 - s)/factor + s)`` with ``s = (L/w - low) / (high - low)`` linear in 1/w. Only the
    ratios low/L and high/L matter, so L (``original_max_position_embeddings``) is chosen to make
    ``low_freq_factor`` about 1 and the ratios are fitted from the divisors. The result is checked
    by recomputing the divisors; a ``rope_freqs`` that no Llama-3 scaling produces raises
    ValueError. Returns HF ``rope_parameters`` extras (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), or {} when every divisor is 1.
    """
    r = np.asarray(factors, dtype=np.float64).reshape(-1)
    n = head_dim // 2
    if r.size != n:
        raise ValueError(f"rope_freqs: expected {n} divisors (head_dim {head_dim}), got {r.size}")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"rope_freqs: expected positive divisors, got {r.tolist()}")
    if np.allclose(r, 1.0, rtol=1e-6, atol=0):
        return {}
    f = float(r.max())
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    u = inv / (2 * math.pi)  # 1 / wavelength
    tol = 1e-5
    high = np.isclose(r, 1.0, rtol=tol, atol=0)
    low = np.isclose(r, f, rtol=tol, atol=0)
    mid = ~(high | low)
    s = (1.0 / r - 1.0 / f) / (1.0 - 1.0 / f)  # 0 in the low band, 1 in the high band
    u_low_max = float(u[low].max()) if low.any() else 0.0
    u_high_min = float(u[high].min()) if high.any() else float(u.max()) * 4.0
    # s = a * u + b; zero at z0 = low/L, one at z1 = high/L
    if mid.sum() >= 2:
        a, b = np.polyfit(u[mid], s[mid], 1)
        if a <= 0:
            raise ValueError(f"rope_freqs: divisors {r.tolist()} do not follow Llama-3 scaling")
        z0, z1 = -b / a, (1 - b) / a
    elif mid.sum() == 1:
        u0, s0 = float(u[mid][0]), float(s[mid][0])
        need = [s0 / u0]  # z0 > 0
        if u_low_max > 0:
            need.append(s0 / (u0 - u_low_max))
        need.append((1 - s0) / (u_high_min - u0))
        a = 2.0 * max(need)
        z0, z1 = u0 - s0 / a, u0 + (1 - s0) / a
    else:
        lo, hi = u_low_max, u_high_min
        z0, z1 = lo ** (2 / 3) * hi ** (1 / 3), lo ** (1 / 3) * hi ** (2 / 3)
    if not 0 < z0 < z1:
        raise ValueError(f"rope_freqs: divisors {r.tolist()} do not follow Llama-3 scaling")
    old = max(1, int(round(1.0 / z0)))
    params = {}
    for digits in (3, 5, 7, 10, 17):  # the shortest numbers that reproduce the divisors
        params = {
            "factor": float(f"{f:.{min(digits, 7)}g}"),
            "low_freq_factor": float(f"{old * z0:.{digits}g}"),
            "high_freq_factor": float(f"{old * z1:.{digits}g}"),
            "original_max_position_embeddings": old,
        }
        got = llama3_rope_divisors(params, theta, head_dim)
        if np.allclose(got, r, rtol=1e-5, atol=0):
            return params
    raise ValueError(f"rope_freqs: divisors {r.tolist()} do not follow Llama-3 scaling "
                     f"(best fit {params} gives {got.tolist()})")


def llama3_rope_divisors(params: dict, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors of Llama-3 RoPE scaling (what llama.cpp stores as rope_freqs)."""
    f, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wl = 2 * math.pi / inv
    out = np.ones_like(inv)
    out[wl > old / lo] = f
    mid = ~(wl < old / hi) & ~(wl > old / lo)
    s = (old / wl[mid] - lo) / (hi - lo)
    out[mid] = 1.0 / ((1 - s) / f + s)
    return out


def _one_int(meta: dict, key: str, path, default=None) -> int | None:
    v = meta.get(key, default)
    if isinstance(v, list):
        if not v or any(x != v[0] for x in v):
            raise _err(path, f"{key}: per-layer values {v} are not supported (expected one number)")
        v = v[0]
    return None if v is None else int(v)


@dataclass
class Plan:
    """What :func:`convert_gguf` will write: HF config, and per HF key the GGUF tensor + transform."""

    arch: str
    config: dict
    tensors: list[tuple[str, Any, Callable[[np.ndarray], np.ndarray]]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def plan_conversion(reader, path="gguf") -> Plan:
    """Read the architecture numbers and the tensor table; check every tensor's name and shape."""
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise _err(path, f"unsupported architecture {arch!r}: expected one of {', '.join(SUPPORTED_ARCHS)}")

    def key(k, default=None):
        return meta.get(f"{arch}.{k}", default)

    if (_one_int(meta, f"{arch}.expert_count", path, 0) or 0) > 0:
        raise _err(path, f"{arch} with {key('expert_count')} experts (mixture of experts) is not supported")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise _err(path, "no token_embd.weight tensor")
    n_layers = _one_int(meta, f"{arch}.block_count", path)
    hidden = _one_int(meta, f"{arch}.embedding_length", path)
    n_heads = _one_int(meta, f"{arch}.attention.head_count", path)
    n_kv = _one_int(meta, f"{arch}.attention.head_count_kv", path, n_heads)
    ffn = _one_int(meta, f"{arch}.feed_forward_length", path)
    for k, v in (("block_count", n_layers), ("embedding_length", hidden), ("attention.head_count", n_heads),
                 ("feed_forward_length", ffn)):
        if not v or v <= 0:
            raise _err(path, f"metadata {arch}.{k} missing or not positive ({v})")
    head_dim = _one_int(meta, f"{arch}.attention.key_length", path) or hidden // n_heads
    v_dim = _one_int(meta, f"{arch}.attention.value_length", path) or head_dim
    if v_dim != head_dim:
        raise _err(path, f"key length {head_dim} != value length {v_dim} is not supported")
    rope_dim = _one_int(meta, f"{arch}.rope.dimension_count", path) or head_dim
    if rope_dim != head_dim:
        raise _err(path, f"partial RoPE (rope.dimension_count {rope_dim} < head dim {head_dim}) is not supported")
    if n_heads % n_kv:
        raise _err(path, f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    vocab = int(by_name["token_embd.weight"].shape[1])  # ggml order: (hidden, vocab)
    theta = float(key("rope.freq_base", 10000.0))
    eps = float(key("attention.layer_norm_rms_epsilon", 1e-6))
    ctx = int(key("context_length", 2048))

    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling == "linear" and arch == "llama":
            rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(key("rope.scaling.factor"))}
        else:
            raise _err(path, f"{arch}: RoPE scaling {scaling!r} is not supported (expected none, or linear for llama)")
    if "rope_freqs.weight" in by_name:
        if arch != "llama" or rope["rope_type"] != "default":
            raise _err(path, f"{arch}: a rope_freqs tensor together with scaling {scaling!r} is not supported")
        extra = llama3_rope_from_factors(dequantize(by_name["rope_freqs.weight"]), theta, head_dim)
        if extra:
            rope = {"rope_type": "llama3", "rope_theta": theta, **extra}

    tied = "output.weight" not in by_name
    q_rows, kv_rows = n_heads * head_dim, n_kv * head_dim
    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not tied:
        expected["lm_head.weight"] = (vocab, hidden)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
        if arch == "qwen3":
            expected.update({p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)})
    optional_bias = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        optional_bias.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                              p + "self_attn.v_proj.bias": (kv_rows,), p + "self_attn.o_proj.bias": (hidden,),
                              p + "mlp.gate_proj.bias": (ffn,), p + "mlp.up_proj.bias": (ffn,),
                              p + "mlp.down_proj.bias": (hidden,)})

    plan = Plan(arch=arch, config={}, metadata=meta)
    unknown, have = [], set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf = hf_tensor_name(t.name)
        if hf is None or (hf not in expected and hf not in optional_bias):
            unknown.append(t.name)
            continue
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
        want = expected.get(hf) or optional_bias[hf]
        if shape != want:
            raise _err(path, f"tensor {t.name} ({hf}): expected shape {want} from the metadata, got {shape}")
        fn = _identity
        if arch == "llama" and ".q_proj." in hf:
            fn = _unpermuter(n_heads)
        elif arch == "llama" and ".k_proj." in hf:
            fn = _unpermuter(n_kv)
        plan.tensors.append((hf, t, fn))
        have.add(hf)
    if unknown:
        raise _err(path, f"{arch}: unsupported tensors {unknown[:12]}{' ...' if len(unknown) > 12 else ''}")
    missing = sorted(set(expected) - have)
    if missing:
        raise _err(path, f"{arch}: missing tensors for {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    biases = {k.rsplit(".", 2)[-2] for k in have if k.endswith(".bias")}
    for kind in biases:  # a bias must be present in every layer, or in none
        n = sum(1 for k in have if k.endswith(f".{kind}.bias"))
        if n != n_layers:
            raise _err(path, f"{kind}.bias present in {n} of {n_layers} layers")
    if arch == "qwen2":
        if biases != {"q_proj", "k_proj", "v_proj"}:
            raise _err(path, f"qwen2: expected q/k/v biases only, got biases on {sorted(biases)}")
        attention_bias = mlp_bias = False
    else:
        attn = biases & {"q_proj", "k_proj", "v_proj", "o_proj"}
        mlp = biases & {"gate_proj", "up_proj", "down_proj"}
        if arch == "qwen3" and mlp:
            raise _err(path, f"qwen3: expected no MLP biases, got biases on {sorted(mlp)}")
        if attn and len(attn) != 4 or mlp and len(mlp) != 3:
            raise _err(path, f"{arch}: biases on {sorted(biases)} only (HF {arch} has all attention biases or "
                             "none, all MLP biases or none)")
        attention_bias, mlp_bias = bool(attn), bool(mlp)
    plan.tensors.sort(key=lambda x: _sort_key(x[0]))

    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_parameters": rope,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": tied,
        "use_cache": True,
    }
    if rope["rope_type"] != "default":
        cfg["rope_scaling"] = dict(rope)
    if arch == "llama":
        cfg.update(attention_bias=attention_bias, mlp_bias=mlp_bias, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=n_layers)
    if arch == "qwen3":
        cfg["attention_bias"] = attention_bias
    plan.config = cfg
    return plan


def _identity(x):
    return x


def _unpermuter(n_heads):
    return lambda x: unpermute_rope_rows(x, n_heads)


def _sort_key(name: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed" in name else 2, 0, name)


# ----------------------------------------------------------------------------------------------
# tokenizer

# Split patterns of llama.cpp's pre-tokenizer types (the same regexes as the HF tokenizers).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (kind, ignore_merges, nfc)
PRE_TOKENIZERS = {
    "default": ("gpt2", False, False),
    "gpt2": ("gpt2", False, False),
    "smollm": ("digits+gpt2", False, False),
    "starcoder": ("digits+gpt2", False, False),
    "refact": ("digits+gpt2", False, False),
    "qwen2": ("qwen2", False, True),
    "deepseek-r1-qwen": ("qwen2", False, True),
    "llama-bpe": ("llama3", True, False),
    "llama3": ("llama3", True, False),
    "llama-v3": ("llama3", True, False),
    "smaug-bpe": ("llama3", False, False),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (bytes that print stay, the rest shift to 256+)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                 use_regex=True)])
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                             use_regex=False)])


@dataclass
class TokenizerInfo:
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict  # tokenizer_config.json
    special_tokens_map: dict
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None


def build_tokenizer(meta: dict, path="gguf") -> TokenizerInfo:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) and its configs from GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZERS:
        raise _err(path, f"tokenizer.ggml.model {model!r} is not supported (expected one of "
                         f"{', '.join(SUPPORTED_TOKENIZERS)}: byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise _err(path, "byte-level BPE tokenizer without tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise _err(path, f"{len(tokens)} tokens but {len(types)} token types")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise _err(path, f"tokenizer.ggml.pre {pre!r} is not supported (expected one of {', '.join(PRE_TOKENIZERS)})")
    kind, ignore_merges, nfc = PRE_TOKENIZERS[pre]

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_NORMAL and not set(tok) <= letters:  # stored as text: spell it in bytes
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        if tok in vocab:
            raise _err(path, f"token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise _err(path, f"malformed merge {m!r} (expected 'left right')")
        pairs.append((a, b))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                         ignore_merges=ignore_merges)
    except Exception as e:
        raise _err(path, f"cannot build the BPE model from the GGUF vocabulary: {e}") from None
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.NFC() if nfc else None
    tk.pre_tokenizer = _pre_tokenizer(kind)
    tk.decoder = decoders.ByteLevel()
    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif ty == TOKEN_USER_DEFINED:
            added.append(AddedToken(tok, special=False, normalized=False))
    tk.add_special_tokens([a for a in added if a.special])
    tk.add_tokens([a for a in added if not a.special])

    def tok_of(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None, None
        i = int(i)
        if not 0 <= i < len(tokens):
            raise _err(path, f"tokenizer.ggml.{key} {i} is outside the vocabulary of {len(tokens)}")
        return i, tokens[i]

    bos_id, bos = tok_of("bos_token_id")
    eos_id, eos = tok_of("eos_token_id")
    unk_id, unk = tok_of("unknown_token_id")
    pad_id, pad = tok_of("padding_token_id")
    eot_id, _ = tok_of("eot_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    tk.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)

    template = meta.get("tokenizer.chat_template")
    eos_ids = [i for i in (eos_id, eot_id) if i is not None]
    if template:
        for name in END_OF_TURN_TOKENS:
            if name in template and name in vocab:
                eos_ids.append(vocab[name])
    eos_ids = list(dict.fromkeys(eos_ids))
    smap = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
            if v is not None}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
        "padding_side": "left",
    }
    if template:
        cfg["chat_template"] = template
    return TokenizerInfo(tk, cfg, smap, bos_id, eos_ids, pad_id)


# ----------------------------------------------------------------------------------------------
# writing


_ST_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}


def _np_dtype(dtype: str):
    if dtype == "float32":
        return np.float32
    import ml_dtypes

    return ml_dtypes.bfloat16


def _shards(items: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Group tensor indices in order into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    out, cur, size = [], [], 0
    for i, (_, shape) in enumerate(items):
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if cur and size + n > max_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


def write_safetensors(fh, entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], dtype: str,
                      metadata: dict | None = None) -> int:
    """Write one safetensors file to ``fh``, producing each tensor only when it is written.

    ``entries``: (name, shape, make) with ``make()`` returning a float32 array of ``shape``.
    Returns the number of tensor bytes written.
    """
    st_dtype, itemsize = _ST_DTYPES[dtype]
    np_dtype = _np_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for name, shape, _ in entries:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for name, shape, make in entries:
        arr = make()
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{name}: produced shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: NaN or inf after dequantization")
        out = np.ascontiguousarray(arr.astype(np_dtype, copy=False))
        fh.write(memoryview(out.view(np.uint8).reshape(-1)))
        del arr, out
    return pos


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def _check_dst(dst: Path, overwrite: bool, who: str) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{who}: destination {dst} exists and is not a directory")
    if _is_nonempty_dir(dst) and not overwrite:
        raise ValueError(f"{who}: destination {dst} exists and is not empty; pass --overwrite "
                         "(overwrite=True) to replace it")


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` folder to ``dst``; a previous ``dst`` is moved aside first and
    deleted only once the new one is in place (restored if the rename fails)."""
    old = None
    try:
        if _is_nonempty_dir(dst):
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "d")
        elif dst.is_dir():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        if old is not None and (old / "d").exists() and not dst.exists():
            os.replace(old / "d", dst)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def convert_gguf(src, dst, *, dtype: str = "float32", overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 extra_files: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Write a Hugging Face folder for the GGUF file ``src`` at ``dst``; returns ``dst``.

    ``dtype``: "float32" or "bfloat16" for every weight. Safetensors files hold at most
    ``max_shard_bytes`` each (a single bigger tensor gets a shard of its own); more than one file
    comes with ``model.safetensors.index.json``. ``extra_files`` (name -> text) are written into
    the folder too. Raises ValueError for an unsupported architecture or tokenizer, a malformed or
    truncated file, or a non-empty ``dst`` without ``overwrite``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"convert gguf: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"convert gguf: max_shard_bytes must be positive, got {max_shard_bytes}")
    src, dst = Path(src), Path(dst)
    _check_dst(dst, overwrite, "convert gguf")
    reader = open_gguf(src)
    plan = plan_conversion(reader, src)
    tok = build_tokenizer(plan.metadata, src)
    cfg = dict(plan.config)
    cfg.update(bos_token_id=tok.bos_id,
               eos_token_id=tok.eos_ids[0] if len(tok.eos_ids) == 1 else (tok.eos_ids or None),
               pad_token_id=tok.pad_id, torch_dtype=dtype, dtype=dtype)
    gen = {"bos_token_id": tok.bos_id,
           "eos_token_id": tok.eos_ids[0] if len(tok.eos_ids) == 1 else tok.eos_ids,
           "pad_token_id": tok.pad_id}
    gen = {k: v for k, v in gen.items() if v is not None and v != []}

    items = [(hf, tuple(int(n) for n in reversed([int(x) for x in t.shape])), t, fn) for hf, t, fn in plan.tensors]
    _, itemsize = _ST_DTYPES[dtype]
    groups = _shards([(n, s) for n, s, _, _ in items], itemsize, max_shard_bytes)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map, total = {}, 0
        for k, group in enumerate(groups):
            fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            entries = [(items[i][0], items[i][1], (lambda t=items[i][2], fn=items[i][3]: fn(dequantize(t))))
                       for i in group]
            if progress:
                progress(f"writing {fname} ({len(entries)} tensors)")
            with open(tmp / fname, "wb") as fh:
                total += write_safetensors(fh, entries, dtype)
            weight_map.update({items[i][0]: fname for i in group})
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def parse_size(s: str) -> int:
    """'2GB', '500MB', '1GiB', '123' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", s, re.I)
    if not m:
        raise ValueError(f"expected a size like 2GB or 500MB, got {s!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def main_convert(argv: Iterable[str] | None = None) -> int:
    """CLI: ``[gguf] SRC.gguf DST [--dtype float32|bfloat16] [--overwrite] [--max-shard-size 2GiB]``."""
    argv = list(argv) if argv is not None else []
    if argv and argv[0] == "gguf":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="swiftjax convert gguf",
                                 description="Convert a llama.cpp GGUF file (llama, qwen2, qwen3) to a "
                                             "Hugging Face folder.")
    ap.add_argument("src", help="the .gguf file")
    ap.add_argument("dst", help="output folder (must be absent or empty unless --overwrite)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype (default float32)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    ap.add_argument("--max-shard-size", default="2GiB", help="largest safetensors file (default 2GiB)")
    args = ap.parse_args(argv)
    out = convert_gguf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                       max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {out} (from {args.src}, {args.dtype})")
    return 0
