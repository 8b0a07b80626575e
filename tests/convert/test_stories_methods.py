"""Every method's pipeline on the converted llama2.c stories260K model (a base model without a
chat template: ``template=plain``), over a GSM8K-format toy task: an EBRM refine, a GenARM
train + guided decode and a DPO step. (The SWIFT pipeline on it: test_llama2c.py.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hf_tiny import write_gsm8k_toy

from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.convert.llama2c import convert_llama2c
from swiftjax.data.paths import data_dir
from swiftjax.methods.ebrm import pipeline as er
from swiftjax.methods.genarm import pipeline as gr
from swiftjax.methods.preference import mrpo
from swiftjax.tasks import TaskConfig, make_task


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    d = data_dir()
    m = d / "models" / "stories260K" if d is not None else None
    if m is None or not (m / "stories260K.bin").is_file() or not (m / "tok512.bin").is_file():
        pytest.skip("real data absent: ../shared/data/models/stories260K (or $SWIFTJAX_DATA) not found")
    root = tmp_path_factory.mktemp("stories")
    convert_llama2c(m / "stories260K.bin", m / "tok512.bin", root / "hf")
    return root / "hf", write_gsm8k_toy(root / "gsm8k.jsonl")


def _common(model, data, out):
    return [f"model={model}", "template=plain", "task.name=gsm8k", f"task.test_path={data}", "task.n_test=2",
            f"out={out}", "progress=false"]


def test_ebrm_refine_on_stories(stories, tmp_path):
    model, data = stories
    cfg = parse_typed(er.EbrmRunConfig, _common(model, data, tmp_path / "ebrm") + [
        "task.n_train=4", "n=4", "n_train=3", "noise_levels=[0.0]", "sampling.max_new_tokens=8",
        "sampling.batch_size=8", "pairs.demonstrations=true", "pairs.max_per_problem=3", "rm.max_len=null",
        "rm.epochs=2", "rm.batch_size=4", "rm.warmup_steps=1", "rm.score_batch_size=16", "ebrm.epochs=3",
        "ebrm.batch_size=8", "ebrm.num_neg=16", "ebrm.hidden=[16,8]", "ebrm.r_hidden=[8]", "refine.seeds=2",
        "refine.steps=10"], "test")
    er.run(cfg, log=lambda *a: None)
    res = json.loads((tmp_path / "ebrm" / "results.json").read_text())
    assert res["model"]["template"] == "plain" and res["task"]["name"] == "gsm8k"
    scored = [json.loads(line) for line in next((tmp_path / "ebrm").rglob("test_scored.jsonl")).open()]
    rm, eb = (np.array([r["scores"][k] for r in scored]) for k in ("rm", "ebrm"))
    assert np.isfinite(rm).all() and np.isfinite(eb).all() and not np.allclose(rm, eb)


def test_genarm_train_and_guide_on_stories(stories, tmp_path):
    model, data = stories
    cfg = parse_typed(gr.GenarmConfig, _common(model, data, tmp_path / "genarm") + [
        "task.n_train=4", "arms=[correct]", "candidates.n=3", "candidates.sampling.max_new_tokens=8",
        "candidates.sampling.batch_size=12", "pairs.demonstrations=true", "pairs.max_len=128", "pairs.val_frac=0.0",
        "train.max_steps=2", "train.batch_size=4", "train.warmup_steps=1", "guide.n=2",
        "guide.sampling.max_new_tokens=6", "guide.sampling.batch_size=4", "guide.alphas=[0.0,1.0]",
        "guide.weights=[]", "guide.weak_alphas=[]"], "test")
    gr.train(cfg, log=lambda *a: None)
    res = gr.guide(cfg, log=lambda *a: None)
    saved = json.loads((tmp_path / "genarm" / "results.json").read_text())
    assert saved["model"]["template"] == "plain" and saved["arms"] == ["correct"]
    a0 = res["correct"][0]
    assert a0["alpha"] == 0.0 and {k: a0[k] for k in res["plain"]} == res["plain"]  # alpha 0 = plain sampling


def test_dpo_step_on_stories(stories, tmp_path):
    model, data = stories
    rows = []
    task = make_task(TaskConfig(name="gsm8k", test_path=str(data), n_test=2, n_train=None))
    for p in task.problems("train"):
        for j, t in enumerate([p.solution, p.solution.replace(f"#### {p.gold}", "#### 99")]):
            ans, ok = task.grade(t, p.gold)
            rows.append({"prompt_id": p.id, "index": j, "prompt": task.user_message(p), "text": t,
                         "token_ids": None, "answer": ans, "correct": ok, "gold": p.gold})
    cands.write_candidates(tmp_path / "cands.jsonl", rows)
    cfg = parse_typed(mrpo.MRPORunConfig, _common(model, data, tmp_path / "dpo") + [
        "task.n_train=null", "generation.max_new_tokens=8", "generation.batch_size=4", "eval.n_samples=0",
        "eval.batch_size=4", "eval.each_stage=false", f"candidates.path={tmp_path / 'cands.jsonl'}",
        "pairs.max_per_prompt=1", "pairs.held_out=0.25", "pairs.counts=[3]", "pairs.max_len=160", "train.steps=1",
        "train.batch_size=2", "train.optimizer.lr=1e-3", "references=[]",
        "methods=[{name: dpo, loss: dpo, refs: [init]}]"], "test")
    mrpo.run_mrpo(cfg, log=lambda *a: None)
    saved = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert saved["task"]["name"] == "gsm8k" and saved["policy"]["template"] == "plain"
    first = [v for v in _find(saved, "train_loss_first")]
    assert first and all(math.isclose(v, math.log(2), rel_tol=1e-3) for v in first)  # policy == reference at step 0


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)
