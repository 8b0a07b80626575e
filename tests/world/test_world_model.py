"""The world model pipeline: deterministic training, HF export that transformers loads with the
same logits, the shipped model, and candidate sampling through the generic Backbone/Task path."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import swiftjax
from swiftjax._io import file_sha256
from swiftjax.backbone import load_backbone
from swiftjax.config import parse_typed
from swiftjax.sample import SamplingSection, candidate_set
from swiftjax.tasks import TaskConfig, make_task
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.world import model as wexp

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.n_train=640", "data.n_val=64", "train.batch_size=32",
        "train.max_steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.ckpt_every=6"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    dirs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"world{i}")
        cfg = parse_typed(wexp.WorldModelConfig, TINY + [f"out={out}"], "test")
        dirs.append(wexp.train(cfg, progress=False))
    return dirs


def test_training_is_bit_for_bit_reproducible(tiny_runs):
    a, b = (d / "model.safetensors" for d in tiny_runs)
    assert a.read_bytes() == b.read_bytes()


def test_export_loads_in_transformers_with_the_same_logits(tiny_runs):
    d = tiny_runs[0]
    model, cfg, tok = wexp.load_world_model(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    probs = world.make_split("test", 3, seed=0)
    ids, attn, _ = wtok.encode_examples(tok, [p.question for p in probs], [p.solution for p in probs], 96)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(attn)).logits)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(attn)).logits.numpy()
    m = attn.astype(bool)
    np.testing.assert_allclose(ours[m], ref[m], atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert hf_tok(wtok.format_prompt(probs[0].question), add_special_tokens=False)["input_ids"] == \
        wtok.encode(tok, wtok.format_prompt(probs[0].question))
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [wtok.END_ID, wtok.EOS_ID]


def test_sampling_rows_are_graded_and_seeded(tiny_runs, tmp_path):
    bb = load_backbone(tiny_runs[0])
    task = make_task(TaskConfig(name="world", n_test=3, seed=0))
    kw = dict(n=4, sampling=SamplingSection(max_new_tokens=16, prompt_len=64, batch_size=8), seed=1, progress=False,
              log=lambda *_: None)
    rows, _ = candidate_set(bb, task, "test", out_dir=tmp_path / "a", **kw)
    again, _ = candidate_set(bb, task, "test", out_dir=tmp_path / "b", **kw)
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in again]
    assert len(rows) == 12 and [r["index"] for r in rows[:4]] == [0, 1, 2, 3]
    probs = world.make_split("test", 3, seed=0)
    tok = wtok.load_tokenizer(tiny_runs[0])
    for r in rows:
        p = next(p for p in probs if p.id == r["prompt_id"])
        assert r["correct"] == world.grade(r["text"], p.answer)
        assert r["text"] == wtok.decode_response(tok, r["token_ids"])
        assert len(r["token_ids"]) <= 16


def test_shipped_model_is_what_the_manifest_says():
    d = wexp.ASSET_DIR
    if not (d / "model.safetensors").is_file():
        pytest.skip("no shipped world model in this checkout")
    manifest = json.loads((d / "MANIFEST.json").read_text())
    assert file_sha256(d / "model.safetensors") == manifest["sha256"]["model.safetensors"]
    model, cfg = swiftjax.load_model(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    ids = np.array([[wtok.BOS_ID, wtok.USER_ID, 20, 21, 22, wtok.ASSISTANT_ID]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), ref, atol=1e-4)


def test_hosts_share_a_candidate_set_through_the_filesystem(tiny_runs, tmp_path, monkeypatch):
    """Two hosts (simulated in turn): host 1 samples its batches (odd b) and waits for process 0;
    process 0 samples the even ones, assembles and cleans up; the set equals one host's, and host
    1 then reads process 0's file."""
    bb = load_backbone(tiny_runs[0])
    task = make_task(TaskConfig(name="world", n_test=5, seed=0))
    kw = dict(n=4, sampling=SamplingSection(max_new_tokens=12, prompt_len=64, batch_size=8), seed=2, progress=False,
              log=lambda *_: None)
    alone, _ = candidate_set(bb, task, "test", out_dir=tmp_path / "one", **kw)
    monkeypatch.setenv("SWIFTJAX_SHARD_WAIT", "0.2")
    with pytest.raises(TimeoutError, match="process 0 to write"):
        candidate_set(bb, task, "test", out_dir=tmp_path / "pod", hosts=(1, 2), **kw)
    shard_dir = next((tmp_path / "pod").glob("*.shards"))
    assert sorted(p.name for p in shard_dir.glob("*.jsonl")) == ["00001.jsonl"]  # 3 batches: host 1 owns b=1
    rows, path = candidate_set(bb, task, "test", out_dir=tmp_path / "pod", hosts=(0, 2), **kw)
    assert rows == alone and not shard_dir.exists()
    again, path1 = candidate_set(bb, task, "test", out_dir=tmp_path / "pod", hosts=(1, 2), **kw)
    assert again == alone and path1 == path
    with pytest.raises(ValueError, match=r"hosts: expected \(process_index, process_count\)"):
        candidate_set(bb, task, "test", out_dir=tmp_path / "pod", hosts=(2, 2), **kw)
