"""One configuration dataclass for every supported causal LM, built from an HF ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "qwen3", "gemma2", "gemma3_text", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Phi-3 accepts only these (transformers maps its legacy "su" and "yarn" names to "longrope")
PHI3_ROPE_TYPES = ("default", "longrope")
FULL, SLIDING = "full_attention", "sliding_attention"  # layer types (HF ``layer_types``)
GEMMA = ("gemma2", "gemma3_text")
# transformers' config defaults for a head_dim missing from config.json (else hidden / heads)
DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# keys a config.json must hold (positive ints), per family
REQUIRED_KEYS = {
    "gpt2": ("vocab_size", "n_embd", "n_head", "n_layer"),
    "default": ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"),
}
# keys that, when present and not null, must be positive ints
OPTIONAL_INT_KEYS = ("head_dim", "num_key_value_heads", "max_position_embeddings", "n_inner", "n_positions")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _number(d: Mapping[str, Any], key: str, default, where: str, *, optional: bool = False):
    """``d[key]`` (``default`` when absent) as a positive float; None allowed when ``optional``."""
    v = d.get(key, default)
    if v is None and optional:
        return None
    if not _positive_number(v):
        raise ValueError(f"{where}: expected {key!r} to be a positive number{' or null' if optional else ''}, "
                         f"got {v!r}")
    return float(v)


def _hashable(v):
    """JSON lists as tuples, recursively (the config is a static jit argument)."""
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def check_hf_dict(d: Mapping[str, Any], where: str = "config.json") -> None:
    """One-line ValueError naming ``where`` unless ``d`` holds every key its model family
    needs, as a positive int, with the head count dividing the width."""
    mt = d.get("model_type")
    required = REQUIRED_KEYS["gpt2" if mt == "gpt2" else "default"]
    missing = [k for k in required if k not in d or d[k] is None]
    if missing:
        raise ValueError(f"{where}: expected keys {missing} for model_type {mt!r}, found none")
    for k in required + tuple(k for k in OPTIONAL_INT_KEYS if d.get(k) is not None):
        if not _positive_int(d[k]):
            raise ValueError(f"{where}: expected {k!r} to be a positive integer, got {d[k]!r}")
    width, heads = ("n_embd", "n_head") if mt == "gpt2" else ("hidden_size", "num_attention_heads")
    if not d.get("head_dim") and mt not in DEFAULT_HEAD_DIM and d[width] % d[heads]:
        raise ValueError(f"{where}: expected {width!r} ({d[width]}) divisible by {heads!r} ({d[heads]})")


# ---------------------------------------------------------------------------- config.json parts
def _rope_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """The model's RoPE parameters: ``rope_parameters`` (transformers >= 5), else the legacy
    ``rope_scaling`` with the top-level ``rope_theta``."""
    rope = dict(d.get("rope_parameters") or {})
    if not rope:
        rope = dict(d.get("rope_scaling") or {})
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    return rope


def _rope_fields(rope: Mapping[str, Any], where: str, field: str, allowed: tuple[str, ...],
                 aliases: Mapping[str, str] | None = None) -> tuple[float, str, tuple]:
    """(rope_theta, rope_type, scaling pairs) of one RoPE parameter dict, validated."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    rope_type = (aliases or {}).get(rope_type, rope_type)
    if rope_type not in allowed:
        raise ValueError(f"{where}: unsupported rope type {rope_type!r} in {field!r}: "
                         f"expected one of {', '.join(allowed)}")
    theta = _number(rope, "rope_theta", 10000.0, where)
    if rope_type in ("linear", "llama3") and not _positive_number(rope.get("factor")):
        raise ValueError(f"{where}: expected {field}.factor to be a positive number for rope type "
                         f"{rope_type!r}, got {rope.get('factor')!r}")
    extra = tuple(sorted((k, _hashable(v)) for k, v in rope.items()
                         if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")))
    return theta, rope_type, extra


def _phi3_rope(d: Mapping[str, Any], rope: Mapping[str, Any], where: str, head_dim: int) -> dict[str, Any]:
    """Phi-3's RoPE: optional partial rotary and ``longrope`` (short / long factors, switched on
    the sequence length, see :func:`swiftjax.models.layers.rope_tables`)."""
    prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if not _positive_number(prf) or prf > 1 or int(head_dim * prf) % 2 or int(head_dim * prf) == 0:
        raise ValueError(f"{where}: expected 'partial_rotary_factor' in (0, 1] giving an even rotary "
                         f"dimension of head_dim {head_dim}, got {prf!r}")
    theta, rope_type, extra = _rope_fields(rope, where, "rope_parameters", PHI3_ROPE_TYPES,
                                           aliases={"su": "longrope", "yarn": "longrope"})
    if rope_type == "longrope":
        params = dict(extra)
        half = int(head_dim * prf) // 2
        for k in ("short_factor", "long_factor"):
            v = params.get(k)
            if not (isinstance(v, tuple) and len(v) == half and all(_positive_number(x) for x in v)):
                raise ValueError(f"{where}: expected rope_parameters.{k} to be a list of {half} positive "
                                 f"numbers (rotary_dim / 2) for rope type 'longrope', got {v!r}")
        # as transformers reads it: the top-level value (default 4096) wins over rope_parameters'
        orig = d.get("original_max_position_embeddings", 4096)
        if not _positive_int(orig):
            raise ValueError(f"{where}: expected 'original_max_position_embeddings' to be a positive "
                             f"integer, got {orig!r}")
        params["original_max_position_embeddings"] = orig
        for k in ("factor", "attention_factor"):
            if params.get(k) is None:
                params.pop(k, None)
            else:
                params[k] = _number(params, k, None, where)
        extra = tuple(sorted(params.items()))
    return dict(rope_theta=theta, rope_type=rope_type, rope_scaling=extra, partial_rotary_factor=float(prf))


def _gemma3_rope_dicts(d: Mapping[str, Any], where: str) -> tuple[dict, dict]:
    """Gemma 3's (global, local) RoPE parameter dicts: ``rope_parameters`` keyed by layer type
    (transformers >= 5), else the legacy ``rope_theta`` + ``rope_scaling`` (global) and
    ``rope_local_base_freq`` (local). transformers' defaults: bases 1e6 (global), 1e4 (local)."""
    params = d.get("rope_parameters")
    if params:
        if not isinstance(params, Mapping) or not set(params) <= {FULL, SLIDING}:
            got = sorted(params) if isinstance(params, Mapping) else params
            raise ValueError(f"{where}: expected 'rope_parameters' keyed by layer type ({FULL!r}, {SLIDING!r}) "
                             f"for gemma3_text, got {got!r}")
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = {}, {}
    full.update(d.get("rope_scaling") or {})
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    return full, local


def _layer_types(d: Mapping[str, Any], where: str, n_layers: int, pattern: int) -> tuple[str, ...]:
    """``layer_types`` from config.json, else every ``pattern``-th block full, the rest sliding."""
    lt = d.get("layer_types")
    if lt is None:
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
    if not isinstance(lt, (list, tuple)) or len(lt) != n_layers or any(x not in (FULL, SLIDING) for x in lt):
        raise ValueError(f"{where}: expected 'layer_types' to be a list of {n_layers} entries, each "
                         f"{FULL!r} or {SLIDING!r}, got {lt!r}")
    return tuple(lt)


def _gemma_fields(d: Mapping[str, Any], where: str, mt: str, n_layers: int) -> dict[str, Any]:
    """Gemma 2 / Gemma 3 options, with transformers' defaults for absent keys."""
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: {mt}: use_bidirectional_attention=true is not supported (expected false)")
    if mt == "gemma2":
        pattern = 2
    else:
        pattern = d.get("sliding_window_pattern", 6)
        if not _positive_int(pattern):
            raise ValueError(f"{where}: expected 'sliding_window_pattern' to be a positive integer, got {pattern!r}")
    layer_types = _layer_types(d, where, n_layers, pattern)
    window = d.get("sliding_window", 4096)
    if SLIDING in layer_types and not _positive_int(window):
        raise ValueError(f"{where}: expected 'sliding_window' to be a positive integer (layer_types has "
                         f"{SLIDING!r} blocks), got {window!r}")
    return dict(
        layer_types=layer_types,
        sliding_window=window if SLIDING in layer_types else None,
        hidden_act=d.get("hidden_activation") or "gelu_pytorch_tanh",
        norm_unit_offset=True,
        scale_embeddings=True,
        qk_norm=mt == "gemma3_text",
        query_pre_attn_scalar=_number(d, "query_pre_attn_scalar", 256, where),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping: ignored here too
        attn_logit_softcapping=(_number(d, "attn_logit_softcapping", 50.0, where, optional=True)
                                if mt == "gemma2" else None),
        final_logit_softcapping=_number(d, "final_logit_softcapping", 30.0 if mt == "gemma2" else None,
                                        where, optional=True),
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised across HF model families.

    ``rope_scaling`` is a tuple of ``(key, value)`` pairs (list values as tuples) so the
    config stays hashable (it is a static argument of jitted functions).

    Per-layer attention: ``layer_types`` (empty, or one of ``FULL`` / ``SLIDING`` per block)
    says which blocks use the ``sliding_window``; empty means every block does when a window
    is set (Mistral, Phi-3). ``rope_local_theta`` (Gemma 3) gives sliding blocks their own
    plain RoPE base; full blocks use ``rope_theta`` / ``rope_type`` / ``rope_scaling``.

    Family options: ``qk_norm`` (RMSNorm of each query/key head before RoPE: Qwen3, Gemma 3),
    ``norm_unit_offset`` (RMSNorm weights stored as ``w`` and applied as ``1 + w``: Gemma),
    ``scale_embeddings`` (token embeddings times sqrt(hidden_size): Gemma),
    ``query_pre_attn_scalar`` (attention scale ``s ** -0.5`` instead of ``head_dim ** -0.5``),
    ``attn_logit_softcapping`` / ``final_logit_softcapping`` (``c * tanh(x / c)`` on the
    attention scores / output logits), ``partial_rotary_factor`` (RoPE on the first
    ``rotary_dim`` channels of each head: Phi-3 / Phi-4-mini).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0
    qk_norm: bool = False
    norm_unit_offset: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ``rotary_dim``; the rest pass)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_type(self, i: int) -> str:
        """``FULL`` or ``SLIDING``: the attention of block ``i``."""
        if self.layer_types:
            return self.layer_types[i]
        return SLIDING if self.sliding_window is not None else FULL

    def window(self, layer_type: str) -> int | None:
        """The sliding window of blocks of ``layer_type`` (None: full causal attention)."""
        return self.sliding_window if layer_type == SLIDING else None

    @property
    def num_hidden_states(self) -> int:
        """L + 1: the embedding output plus one state per block (the last after the final norm)."""
        return self.num_layers + 1

    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "ModelConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {mt!r}: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        check_hf_dict(d, where)
        eos = d.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        if mt == "gpt2":
            n_embd = d["n_embd"]
            n_head = d["n_head"]
            if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
                raise ValueError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
            return cls(
                model_type="gpt2",
                vocab_size=d["vocab_size"],
                hidden_size=n_embd,
                num_layers=d["n_layer"],
                num_heads=n_head,
                num_kv_heads=n_head,
                head_dim=n_embd // n_head,
                intermediate_size=d.get("n_inner") or 4 * n_embd,
                max_position_embeddings=d.get("n_positions", 1024),
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                hidden_act=d.get("activation_function", "gelu_new"),
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                tie_word_embeddings=d.get("tie_word_embeddings", True),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_t,
                pad_token_id=d.get("pad_token_id"),
            )
        n_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        n_layers = d["num_hidden_layers"]
        head_dim = d.get("head_dim") or DEFAULT_HEAD_DIM.get(mt) or hidden // n_heads
        bias = bool(d.get("attention_bias", False))
        kw: dict[str, Any] = dict(
            qkv_bias=bias or mt == "qwen2",  # Qwen2 always has q/k/v biases, never an o bias
            o_bias=bias and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            norm_eps=d.get("rms_norm_eps", 1e-5 if mt == "phi3" else 1e-6),
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", mt in GEMMA)),
        )
        if mt == "gemma3_text":
            full, local = _gemma3_rope_dicts(d, where)
            kw["rope_local_theta"] = _rope_fields(local, where, f"rope_parameters.{SLIDING}", ("default",))[0]
        else:
            full = _rope_dict(d)
        if mt == "phi3":
            kw.update(_phi3_rope(d, full, where, head_dim))
        else:
            kw["rope_theta"], kw["rope_type"], kw["rope_scaling"] = _rope_fields(
                full, where, "rope_parameters", SUPPORTED_ROPE_TYPES)

        sliding = None
        if mt in ("mistral", "phi3"):
            sliding = d.get("sliding_window")
        elif mt in ("qwen2", "qwen3") and d.get("use_sliding_window"):
            # transformers applies Qwen2/3's window only above max_window_layers; unsupported here.
            raise ValueError(f"{where}: {mt}: use_sliding_window=true is not supported (expected false)")
        if mt == "qwen3":
            kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
        if mt in GEMMA:
            kw.update(_gemma_fields(d, where, mt, n_layers))
            sliding = kw.pop("sliding_window")
        if sliding is not None and not _positive_int(sliding):
            raise ValueError(f"{where}: expected 'sliding_window' to be a positive integer or null, got {sliding!r}")
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            # transformers' Phi-3 default (it sets longrope's attention factor)
            max_position_embeddings=d.get("max_position_embeddings", 4096 if mt == "phi3" else 2048),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
            **kw,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"expected a config.json at {f}, found none")
        try:
            d = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{f}: expected a JSON object, got unreadable content ({e})") from None
        return cls.from_hf_dict(d, str(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict that transformers loads into the matching model."""
        eos = list(self.eos_token_id)
        eos_v = eos[0] if len(eos) == 1 else (eos or None)
        if self.is_gpt2:
            return {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.hidden_act,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": eos_v,
                "pad_token_id": self.pad_token_id,
            }
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **_jsonable(dict(self.rope_scaling))}
        d = {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": self.hidden_act,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos_v,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "phi3"):
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if self.model_type == "qwen3":
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "phi3":
            rope["partial_rotary_factor"] = d["partial_rotary_factor"] = self.partial_rotary_factor
            if self.rope_type == "longrope":
                d["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        if self.model_type in GEMMA:
            d["hidden_activation"] = d.pop("hidden_act")
            d.update(
                attention_bias=self.qkv_bias,
                layer_types=list(self.layer_types),
                sliding_window=self.sliding_window,
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
            )
        if self.model_type == "gemma3_text":
            d["rope_parameters"] = {FULL: rope, SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta}}
        return d


def _jsonable(v):
    """Tuples back to JSON lists, recursively."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


def _int_if_whole(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v
