"""One configuration dataclass for every supported causal LM, built from an HF ``config.json``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# keys a config.json must hold (positive ints), per family
REQUIRED_KEYS = {
    "gpt2": ("vocab_size", "n_embd", "n_head", "n_layer"),
    "default": ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"),
}
# keys that, when present and not null, must be positive ints
OPTIONAL_INT_KEYS = ("head_dim", "num_key_value_heads", "max_position_embeddings", "n_inner", "n_positions")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


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
    if not d.get("head_dim") and d[width] % d[heads]:
        raise ValueError(f"{where}: expected {width!r} ({d[width]}) divisible by {heads!r} ({d[heads]})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised across HF model families.

    ``rope_scaling`` is a tuple of ``(key, value)`` pairs so the config stays hashable
    (it is a static argument of jitted functions).
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

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

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
        head_dim = d.get("head_dim") or hidden // n_heads
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        if not rope:
            rope = dict(legacy)
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}: expected one of {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        extra = tuple(
            sorted((k, v) for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta"))
        )
        sliding = None
        if mt == "mistral":
            sliding = d.get("sliding_window")
        elif mt == "qwen2" and d.get("use_sliding_window"):
            # transformers applies Qwen2's window only above max_window_layers; unsupported here.
            raise ValueError("qwen2: use_sliding_window=true is not supported (expected false)")
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            hidden_act=d.get("hidden_act", "silu"),
            rope_theta=theta,
            rope_type=rope_type,
            rope_scaling=extra,
            qkv_bias=bool(d.get("attention_bias", False)) or mt == "qwen2",
            o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=d.get("pad_token_id"),
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
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
        d = {
            "model_type": self.model_type,
            "architectures": [arch[self.model_type]],
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
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d
