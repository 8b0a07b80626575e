"""swiftjax plan: per-device bytes of weights, KV cache and activations against hand arithmetic."""
from __future__ import annotations

import json

import pytest

from swiftjax import plan as P
from swiftjax.parallel import MeshConfig

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.fixture()
def tiny_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path)


def test_weights_by_hand_one_device_and_mesh(tiny_dir):
    # embed 64x32 + lm_head 64x32 + 2 x (q 32x32, k 16x32, v 16x32, o 32x32, gate/up/down 64x32, 2 norms) + norm
    per_layer = 1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32
    total = 2 * 2048 + 2 * per_layer + 32
    one = P.plan(P.PlanConfig(model=tiny_dir, dtype="float32", batch=8, max_len=16))
    assert one["params"] == total and one["per_device"]["weights"] == 4 * total
    # 2x2 with FSDP: every matrix split 4 ways, the 5 norm vectors (160 numbers) replicated
    mesh = P.plan(P.PlanConfig(model=tiny_dir, dtype="float32", batch=8, max_len=16, mesh=MeshConfig(2, 2)))
    assert mesh["per_device"]["weights"] == 4 * ((total - 160) // 4 + 160)
    # tensor parallel only: matrices split 2 ways
    tp = P.plan(P.PlanConfig(model=tiny_dir, dtype="float32", batch=8, max_len=16, mesh=MeshConfig(2, 2, fsdp=False)))
    assert tp["per_device"]["weights"] == 4 * ((total - 160) // 2 + 160)


def test_kv_cache_and_activations_by_hand(tiny_dir):
    p = P.plan(P.PlanConfig(model=tiny_dir, dtype="float32", batch=8, max_len=16, mesh=MeshConfig(2, 2)))
    # 2 (k, v) x 2 layers x 4 rows (8 over data=2) x 1 KV head (2 over model=2) x 8 dims x 16 slots x 4 bytes
    assert p["per_device"]["kv_cache"] == 2 * 2 * 4 * 1 * 8 * 16 * 4
    b, t = 4, 16
    residual = 2 * b * t * 32 * 4
    qkv = b * t * (2 + 2 * 1) * 8 * 4
    scores = b * 2 * t * t * 4
    mlp = 2 * b * t * 32 * 4
    logits = b * 32 * 4
    assert p["per_device"]["activations"] == residual + qkv + max(scores, mlp) + logits
    d = p["per_device"]
    assert d["total"] == d["weights"] + d["kv_cache"] + d["activations"]


def test_llama_8b_preset_matches_its_published_size_and_cache():
    p = P.plan(P.PlanConfig(model="llama-3.1-8b", batch=64, max_len=2048, dtype="bfloat16"))
    assert p["params"] == 8_030_261_248  # Llama-3.1-8B's parameter count
    # 2 x 32 layers x 64 rows x 8 KV heads x 128 dims x 2048 slots x 2 bytes = 16 GiB on one device
    assert p["per_device"]["kv_cache"] == 16 * 1024 ** 3
    assert not p["fits"]  # one 16 GiB device cannot hold it
    sharded = P.plan(P.PlanConfig(model="llama-3.1-8b", batch=64, max_len=2048, mesh=MeshConfig(2, 4)))
    assert sharded["per_device"]["kv_cache"] == 16 * 1024 ** 3 // 8  # batch / 2, KV heads / 4
    assert sharded["fits"] and sharded["per_device"]["weights"] < p["per_device"]["weights"] / 7.9


def test_plan_cli_prints_and_exit_status(capsys, tiny_dir):
    assert P.main([f"model={tiny_dir}", "batch=8", "max_len=16"]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "per device: weights" in out
    assert P.main(["model=llama-3.1-8b", "device_memory_gib=1"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"model: expected a preset .* got 'nope'"):
        P.plan(P.PlanConfig(model="nope"))
    with pytest.raises(ValueError, match=r"dtype: expected one of float32, bfloat16, float16, got 'int8'"):
        P.PlanConfig(dtype="int8")
    with pytest.raises(ValueError, match=r"batch: expected a positive int"):
        P.PlanConfig(batch=0)
    with pytest.raises(ValueError, match=r"unknown key"):
        P.main(["model=llama-3.1-8b", "mesh.pipeline=2"])
