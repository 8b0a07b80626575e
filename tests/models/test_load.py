"""Checkpoint loading: the index's weight_map is honoured, names and shapes are checked from
the safetensors headers before any tensor data is read, and a truncated file or an incomplete
config.json is one clear line naming the file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import swiftjax
from swiftjax.models import load as load_mod
from hf_tiny import tiny_hf_model

INDEX = "model.safetensors.index.json"


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    tiny_hf_model("qwen2").save_pretrained(d, max_shard_size="20KB")
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _index(d):
    return json.loads((d / INDEX).read_text())


def _two_shards(d):
    """(a tensor name, its shard, another shard) from the weight_map."""
    wm = _index(d)["weight_map"]
    shards = sorted(set(wm.values()), key=lambda f: -list(wm.values()).count(f))  # fullest first
    assert len(shards) >= 2 and list(wm.values()).count(shards[0]) >= 2
    name = sorted(k for k, v in wm.items() if v == shards[0])[0]
    return name, shards[0], shards[1]


def test_a_tensor_in_two_shards_is_an_error(sharded_dir, tmp_path):
    d = _copy(sharded_dir, tmp_path / "m")
    name, home, other = _two_shards(d)
    w = load_file(str(d / other))
    w[name] = np.zeros_like(load_file(str(d / home))[name]) + 7.0  # a stale copy: last would win
    save_file(w, str(d / other), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        swiftjax.load_model(d)
    msg = _one_line(e)
    assert INDEX in msg and f"tensor {name!r} is in two shards" in msg and home in msg and other in msg


def test_the_weight_map_says_which_shard_holds_a_tensor(sharded_dir, tmp_path):
    d = _copy(sharded_dir, tmp_path / "m")
    name, home, other = _two_shards(d)
    idx = _index(d)
    idx["weight_map"][name] = other  # the map disagrees with the shards
    (d / INDEX).write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=rf"weight_map puts tensor '{name}' in {other}, but it is in {home}"):
        swiftjax.load_model(d)
    # a shard the weight_map does not name is never read
    d2 = _copy(sharded_dir, tmp_path / "m2")
    w = load_file(str(d2 / home))
    save_file({name: w[name] + 1.0}, str(d2 / "model-stray.safetensors"), metadata={"format": "pt"})
    model, _ = swiftjax.load_model(d2)
    ref, _ = swiftjax.load_model(sharded_dir)
    a = load_mod.param_keys(model)
    assert set(a) == set(load_mod.param_keys(ref))
    # a missing shard and a broken index are named
    d3 = _copy(sharded_dir, tmp_path / "m3")
    (d3 / other).unlink()
    with pytest.raises(ValueError, match=rf"{other}: expected a safetensors file, found none"):
        swiftjax.load_model(d3)
    (d3 / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=rf"{INDEX}: expected a non-empty 'weight_map'"):
        swiftjax.load_model(d3)


class _NoData:
    """safe_open whose handles refuse to read tensor data (headers only)."""

    def __init__(self, real):
        self.real = real

    def __call__(self, *a, **kw):
        outer = self

        class Handle:
            def __enter__(self):
                self.fh = outer.real(*a, **kw).__enter__()
                return self

            def __exit__(self, *exc):
                return self.fh.__exit__(*exc)

            def keys(self):
                return self.fh.keys()

            def get_slice(self, k):
                sl = self.fh.get_slice(k)

                class Slice:  # shape and dtype only, never the data
                    def get_shape(self):
                        return sl.get_shape()

                    def get_dtype(self):
                        return sl.get_dtype()

                return Slice()

            def get_tensor(self, k):
                raise AssertionError(f"tensor data of {k} read before the names were checked")

        return Handle()


def test_names_and_shapes_are_checked_before_reading_tensor_data(tmp_path, monkeypatch):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    w = load_file(str(tmp_path / "model.safetensors"))
    w.pop("model.layers.1.mlp.up_proj.weight")
    w["model.layers.9.bogus.weight"] = np.zeros(3, np.float32)
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(load_mod, "safe_open", _NoData(load_mod.safe_open))
    with pytest.raises(ValueError, match=r"missing weights: \['model.layers.1.mlp.up_proj.weight'\]"):
        swiftjax.load_model(tmp_path)
    w.pop("model.layers.9.bogus.weight")
    w["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(w, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: weight model.layers.1.mlp.up_proj.weight: "
                                         r"expected shape \(80, 48\), got \(3, 3\)"):
        swiftjax.load_model(tmp_path)


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_is_one_clear_line(tmp_path, sharded, sharded_dir):
    if sharded:
        d = _copy(sharded_dir, tmp_path / "m")
        victim = d / sorted(set(_index(d)["weight_map"].values()))[-1]
    else:
        d = tmp_path / "m"
        tiny_hf_model("gpt2").save_pretrained(d)
        victim = d / "model.safetensors"
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    with pytest.raises(ValueError) as e:
        swiftjax.load_model(d)
    msg = _one_line(e)
    assert msg.startswith(f"{victim}: expected a complete safetensors file"), msg


@pytest.mark.parametrize("arch, drop, missing", [
    ("llama", ("hidden_size",), "['hidden_size']"),
    ("qwen2", ("num_hidden_layers", "vocab_size"), "['vocab_size', 'num_hidden_layers']"),
    ("gpt2", ("n_embd",), "['n_embd']"),
])
def test_config_without_required_keys_is_one_clear_line(tmp_path, arch, drop, missing):
    tiny_hf_model(arch).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in drop:
        cfg.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        swiftjax.load_model(tmp_path)
    msg = _one_line(e)
    assert msg == f"{tmp_path / 'config.json'}: expected keys {missing} for model_type {cfg['model_type']!r}, found none"


def test_config_bad_values_and_bad_json(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**good, "hidden_size": "48"}))
    with pytest.raises(ValueError, match=r"config.json: expected 'hidden_size' to be a positive integer, got '48'"):
        swiftjax.load_model(tmp_path)
    f.write_text(json.dumps({**good, "hidden_size": 50, "head_dim": None}))
    with pytest.raises(ValueError, match=r"expected 'hidden_size' \(50\) divisible by 'num_attention_heads' \(4\)"):
        swiftjax.load_model(tmp_path)
    f.write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got unreadable content"):
        swiftjax.load_model(tmp_path)


# ----------------------------------------------------------------------------- newer families' config.json


def _no_tokens(cfg):
    return cfg.replace(bos_token_id=None, eos_token_id=(), pad_token_id=None)


@pytest.mark.parametrize("mt, cls", [("qwen3", "Qwen3Config"), ("gemma2", "Gemma2Config"),
                                     ("gemma3_text", "Gemma3TextConfig"), ("phi3", "Phi3Config")])
def test_absent_keys_take_transformers_defaults(mt, cls):
    """A config.json with only the required keys reads as transformers reads it (head_dim,
    norm eps, soft-caps, windows and their pattern, RoPE bases, query scale, tying)."""
    import transformers
    from swiftjax.models.config import ModelConfig

    d = {"model_type": mt, "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 7,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 80,
         "max_position_embeddings": 128}
    ours = ModelConfig.from_hf_dict(d)
    theirs = ModelConfig.from_hf_dict(getattr(transformers, cls).from_dict(d).to_dict())
    assert _no_tokens(ours) == _no_tokens(theirs)


def test_gemma3_legacy_rope_keys_read_as_transformers_reads_them():
    """rope_theta + rope_scaling (global), rope_local_base_freq (local) and an integer
    sliding_window_pattern, as Gemma 3 checkpoints on the Hub write them."""
    import transformers
    from swiftjax.models.config import FULL, SLIDING, ModelConfig

    legacy = {"model_type": "gemma3_text", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 5,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 80,
              "max_position_embeddings": 128, "rope_theta": 2000.0, "rope_local_base_freq": 50.0, "sliding_window": 4,
              "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "sliding_window_pattern": 3,
              "attn_logit_softcapping": 7.0, "final_logit_softcapping": None}
    ours = ModelConfig.from_hf_dict(legacy)
    assert (ours.rope_theta, ours.rope_local_theta, ours.rope_type, ours.rope_scaling) == (
        2000.0, 50.0, "linear", (("factor", 2.0),))
    assert ours.layer_types == (SLIDING, SLIDING, FULL, SLIDING, SLIDING)
    assert ours.attn_logit_softcapping is None  # transformers' Gemma 3 attention never soft-caps
    theirs = transformers.Gemma3TextConfig.from_dict(legacy).to_dict()
    assert _no_tokens(ModelConfig.from_hf_dict(theirs)) == _no_tokens(ours)
    assert ModelConfig.from_hf_dict(ours.to_hf_dict()) == ours


_GOOD = {
    "qwen3": {"model_type": "qwen3", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 3,
              "num_attention_heads": 4, "intermediate_size": 80, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 3,
               "num_attention_heads": 4, "intermediate_size": 80, "sliding_window": 4},
    "phi3": {"model_type": "phi3", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 3,
             "num_attention_heads": 4, "intermediate_size": 80, "max_position_embeddings": 128,
             "original_max_position_embeddings": 64,
             "rope_scaling": {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}},
}


@pytest.mark.parametrize("mt, change, match", [
    ("qwen3", {"use_sliding_window": True}, r"qwen3: use_sliding_window=true is not supported"),
    ("gemma2", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=true is not supported"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     r"expected 'layer_types' to be a list of 3 entries"),
    ("gemma2", {"layer_types": ["full_attention"]}, r"expected 'layer_types' to be a list of 3 entries"),
    ("gemma2", {"sliding_window": None}, r"expected 'sliding_window' to be a positive integer \(layer_types"),
    ("gemma2", {"final_logit_softcapping": "30"},
     r"expected 'final_logit_softcapping' to be a positive number or null"),
    ("gemma2", {"query_pre_attn_scalar": 0}, r"expected 'query_pre_attn_scalar' to be a positive number, got 0"),
    ("gemma2", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}},
     r"unsupported rope type 'dynamic' in 'rope_parameters': expected one of default, linear, llama3"),
    ("gemma2", {"model_type": "gemma3_text", "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
     r"expected 'rope_parameters' keyed by layer type"),
    ("gemma2", {"model_type": "gemma3_text", "rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"unsupported rope type 'linear' in 'rope_parameters.sliding_attention': expected one of default"),
    ("gemma2", {"model_type": "gemma3_text", "sliding_window_pattern": 0},
     r"expected 'sliding_window_pattern' to be a positive integer"),
    ("gemma2", {"model_type": "gemma3_text", "rope_scaling": {"rope_type": "linear"}},
     r"expected rope_parameters.factor to be a positive number for rope type 'linear'"),
    ("phi3", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"unsupported rope type 'linear' in 'rope_parameters': expected one of default, longrope"),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 5, "long_factor": [2.0] * 6}},
     r"expected rope_parameters.short_factor to be a list of 6 positive numbers"),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 6}},
     r"expected rope_parameters.long_factor to be a list of 6 positive numbers .* got None"),
    ("phi3", {"partial_rotary_factor": 0.3}, r"expected 'partial_rotary_factor' in \(0, 1\] giving an even"),
    ("phi3", {"sliding_window": 0}, r"expected 'sliding_window' to be a positive integer or null, got 0"),
])
def test_bad_newer_configs_are_one_clear_line(tmp_path, mt, change, match):
    good = _GOOD[mt]
    swiftjax.models.config.ModelConfig.from_hf_dict(good)  # the base reads
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**good, **change}))
    with pytest.raises(ValueError) as e:
        swiftjax.load_model(tmp_path)
    msg = _one_line(e)
    assert msg.startswith(f"{f}: "), msg
    assert __import__("re").search(match, msg), msg


def test_phi3_legacy_su_rope_reads_as_longrope():
    from swiftjax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(_GOOD["phi3"])
    s = cfg.rope_scaling_dict()
    assert (cfg.rope_type, s["original_max_position_embeddings"], s["short_factor"]) == ("longrope", 64, (1.0,) * 6)
    hash(cfg)  # a static jit argument: the factor lists are stored as tuples
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_phi3_original_max_position_embeddings_is_read_as_transformers_reads_it():
    """Phi-3's top-level original_max_position_embeddings (transformers' default 4096) overrides
    the one inside rope_parameters."""
    import transformers
    from swiftjax.models.config import ModelConfig

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6,
            "original_max_position_embeddings": 32}
    base = {k: v for k, v in _GOOD["phi3"].items() if k not in ("rope_scaling", "original_max_position_embeddings")}
    for extra, want in (({}, 4096), ({"original_max_position_embeddings": 64}, 64)):
        d = {**base, **extra, "rope_parameters": rope}
        ours = ModelConfig.from_hf_dict(d)
        theirs = transformers.Phi3Config.from_dict(d)
        assert ours.rope_scaling_dict()["original_max_position_embeddings"] == want
        assert theirs.rope_parameters["original_max_position_embeddings"] == want
