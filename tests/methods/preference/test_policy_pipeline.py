"""End-to-end runs of the policy pipelines on tiny sizes: SFT -> IRFT / RFT, and DPO vs MRPO.

A tiny world model (one layer, 30 steps) is trained once with
``swiftjax.world.model.train``; both pipelines start from it."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from swiftjax.config import config_from_argv
from swiftjax.data import candidates as cands
from swiftjax.methods.preference import pairs as prefs
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.methods.preference import pipeline as pr
from swiftjax.world import model as wexp
from swiftjax.models.registry import create_model

TINY_WORLD = {
    "data": {"n_train": 48, "n_val": 16, "max_len": 96},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64},
    "train": {"batch_size": 16, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0,
              "ckpt_every": 0},
}
GEN = {"max_new_tokens": 16, "prompt_len": 64, "batch_size": 16}
EVAL = {"n_problems": 8, "n_samples": 2, "batch_size": 16, "max_len": 96, "each_stage": False,
        "pair_batch_size": 16}


@pytest.fixture(scope="module")
def world_out(tmp_path_factory):
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def sft_dir(world_out):
    """Trained with swiftjax.world.model.train (through the pipelines' own helper)."""
    d = pr.ensure_world_model({"model": None, "world": TINY_WORLD}, world_out, progress=False)
    assert d == world_out / "model" and (d / "model.safetensors").is_file()
    return d


@pytest.fixture(scope="module")
def other_dir(world_out):
    """A second reference: the same architecture, another seed, untrained (cheap)."""
    cfg = pr._deep_merge(wexp.DEFAULTS, TINY_WORLD)
    tok = wtok.build_tokenizer()
    mcfg = wexp.model_config(cfg, tok.get_vocab_size())
    return wexp.export(create_model(mcfg, seed=1), mcfg, tok, world_out / "other")


def _finite(*xs):
    return all(isinstance(x, float) and math.isfinite(x) for x in xs)


def test_irft_rft_end_to_end(sft_dir, tmp_path):
    cfg = pr._deep_merge(pr.IRFT_DEFAULTS, {
        "out": str(tmp_path / "irft"), "progress": False,
        "sft": {"model": str(sft_dir), "world": TINY_WORLD},
        "generation": GEN,
        "demos": {"n": 16, "max_len": 96},
        "irft": {"stages": 2, "batch_size": 4, "beta": 0.5, "epochs": 1, "optimizer": {"lr": 1e-4}},
        "rft": {"rounds": 1, "rm": {"steps": 5, "batch_size": 8}, "pg": {"steps": 2, "batch_size": 16}},
        "eval": {k: v for k, v in EVAL.items() if k != "pair_batch_size"},
    })
    res = pr.run_irft(cfg)
    out = tmp_path / "irft"
    for name in ("results.json", "results.md", "metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert [e["method"] for e in saved["evals"]] == ["SFT", "IRFT", "RFT"]
    for e in saved["evals"]:
        assert 0.0 <= e["greedy"] <= 100.0 and 0.0 <= e["pass@1"] <= 100.0 and _finite(e["gold_logp"])
    stages = res["irft_stages"]
    assert [s["stage"] for s in stages] == [1, 2]
    for s in stages:
        assert s["pairs"] + s["skipped_identical"] + s["skipped_long"] == s["prompts"] == 8
        assert s["steps"] == 2
        # the policy equals the frozen copy pi_t at each stage's first step: r_t difference 0
        assert abs(s["loss_first"] - math.log(2.0)) < 1e-5
        assert _finite(s["loss_last"]) and s["loss_last"] != s["loss_first"]
    (r,) = res["rft_rounds"]
    assert abs(r["rm_loss_first"] - math.log(2.0)) < 1e-5  # zero-initialised head
    assert _finite(r["rm_loss_last"], r["pg_loss_last"], r["reward_first"], r["reward_last"], r["kl_last"])
    assert r["pg_steps"] == 2
    md = (out / "results.md").read_text()
    assert "| IRFT | 2 |" in md and "| RFT | 1 |" in md


def test_stage_pairs_keep_what_the_negatives_option_says(monkeypatch):
    """Per problem i the fake 'generation' is: i % 3 == 0 the demonstration itself, 1 another
    response graded correct, 2 another graded incorrect. Identical ones are always skipped;
    correct ones only with negatives='incorrect'."""
    tok = wtok.build_tokenizer()
    problems = world.make_split("train", 9, seed=0)
    demo = [pr._demo_response_ids(tok, p) for p in problems]
    tail = wtok.encode(tok, "Answer: 12345") + [wtok.END_ID]
    # problem i's other response shares its first i tokens with the demonstration, then parts
    other = [demo[i][:i] + tail for i in range(9)]
    assert all(o[i] != d[i] for i, (o, d) in enumerate(zip(other, demo)))

    def fake_sample(model, tok_, probs, cfg, *, n, temperature, seed):
        return [{"token_ids": demo[i] if i % 3 == 0 else other[i], "correct": i % 3 != 2}
                for i, _ in enumerate(probs)]

    monkeypatch.setattr(pr, "_sample", fake_sample)
    cfg = {"demos": {"max_len": 96}}
    for negatives, want in (("all", [1, 2, 4, 5, 7, 8]), ("incorrect", [2, 5, 8])):
        arrays, info, kept = pr._stage_pairs(None, tok, problems, cfg, 0.0, seed=0, negatives=negatives)
        assert kept.tolist() == want
        assert info["skipped_identical"] == 3 and info["pairs"] == len(want)
        assert info["skipped_correct"] == (3 if negatives == "incorrect" else 0)
        assert abs(info["gen_correct"] - 100.0 * 6 / 9) < 1e-9
        # the kept rows pair each problem's own demonstration with its own generation
        for r, i in enumerate(want):
            resp = arrays["demo_ids"][r][arrays["demo_response_mask"][r].astype(bool)].tolist()
            assert resp == demo[i]
            gen = arrays["gen_ids"][r][arrays["gen_response_mask"][r].astype(bool)].tolist()
            assert gen == other[i]
    # contrast=first_divergence: the same pairs, masks cut after the token where they part
    cut, info_cut, kept_cut = pr._stage_pairs(None, tok, problems, cfg, 0.0, seed=0, contrast="first_divergence")
    full, _, kept_full = pr._stage_pairs(None, tok, problems, cfg, 0.0, seed=0)
    assert kept_cut.tolist() == kept_full.tolist() and info_cut["pairs"] == 6
    np.testing.assert_array_equal(cut["demo_ids"], full["demo_ids"])
    for side in ("demo", "gen"):
        m = cut[f"{side}_response_mask"]
        assert (m <= full[f"{side}_response_mask"]).all() and (m.sum(1) >= 1).all()
    for r, i in enumerate(kept_cut):  # i shared tokens + the one where they part
        assert cut["demo_response_mask"][r].sum() == cut["gen_response_mask"][r].sum() == i + 1


def test_irft_rejects_unknown_options(sft_dir, tmp_path):
    cfg = pr._deep_merge(pr.IRFT_DEFAULTS, {"out": str(tmp_path), "progress": False,
                                            "irft": {"negatives": "wrong"}})
    model, _, tok = wexp.load_world_model(sft_dir)
    with pytest.raises(ValueError, match="irft.negatives: expected 'all' or 'incorrect'"):
        pr.run_irft_stages(model, tok, [], [], cfg, None)
    cfg["irft"].update(negatives="all", contrast="token")
    with pytest.raises(ValueError, match="irft.contrast: expected 'sequence' or 'first_divergence'"):
        pr.run_irft_stages(model, tok, [], [], cfg, None)


def _synthetic_candidates(path, n_problems=10):
    """Gold solutions (correct) and corrupted ones (incorrect) of validation problems."""
    rows = []
    for p in world.make_split("validation", n_problems, seed=0):
        texts = [(p.solution, True), (p.solution.replace("Answer:", "Answer: 1"), False),
                 (p.solution + " 7", False)]
        for j, (t, _) in enumerate(texts):
            rows.append({"prompt_id": p.id, "index": j, "prompt": p.question, "text": t, "token_ids": None,
                         "answer": str(world.extract_answer(t)), "correct": world.grade(t, p.answer),
                         "gold": str(p.answer)})
    assert any(r["correct"] for r in rows) and not all(r["correct"] for r in rows)
    cands.write_candidates(path, rows)
    return path


def test_dpo_mrpo_end_to_end(sft_dir, other_dir, tmp_path):
    cand = _synthetic_candidates(tmp_path / "cands.jsonl")
    cfg = pr._deep_merge(pr.MRPO_DEFAULTS, {
        "out": str(tmp_path / "mrpo"), "progress": False,
        "sft": {"model": str(sft_dir), "world": TINY_WORLD},
        "generation": GEN,
        "candidates": {"path": str(cand)},
        "pairs": {"max_per_prompt": 2, "held_out": 0.3, "max_len": 96, "counts": [4, 12]},
        "eval": EVAL,
        "train": {"steps": 3, "batch_size": 4},
    })
    cfg["references"] = [{"name": "other", "model": str(other_dir)},
                         {"name": "copy", "model": str(sft_dir)}]
    cfg["methods"] = [
        {"name": "dpo", "loss": "dpo", "refs": ["init"]},
        {"name": "mrpo_k1", "loss": "mrpo", "refs": ["init"]},
        {"name": "mrpo_k3", "loss": "mrpo", "refs": ["init", "other", "copy"], "weighting": "arwc",
         "convention": "paper", "eps": 0.1},
    ]
    res = pr.run_mrpo(cfg)
    out = tmp_path / "mrpo"
    for name in ("results.json", "results.md", "metrics.jsonl", "pairs.npz"):
        assert (out / name).is_file(), name
    data = prefs.load_pair_data(out / "pairs.npz")
    assert data["ref_names"].tolist() == ["init", "other", "copy"]
    N = len(data["prompt_id"])
    assert data["ref_chosen"].shape == (3, N) and np.all(np.isfinite(data["ref_chosen"]))
    # 'copy' is the policy's own directory: its stored log-probs equal the primary's
    np.testing.assert_allclose(data["ref_chosen"][2], data["ref_chosen"][0], rtol=1e-6)
    assert not np.allclose(data["ref_chosen"][1], data["ref_chosen"][0])
    held = set(data["prompt_id"][data["held_out"]].tolist())
    train = set(data["prompt_id"][~data["held_out"]].tolist())
    assert held and train and not held & train

    runs = {(r["method"], r["pairs"]): r for r in res["runs"]}
    assert len(runs) == 3 * 2
    for r in runs.values():
        assert _finite(r["train_loss_first"], r["train_loss_last"], r["loss"], r["acc_primary"], r["pass@1"])
    for n in (4, 12):
        d, m1 = runs[("dpo", n)], runs[("mrpo_k1", n)]
        # at step 0 the policy is its init: DPO's loss is log 2, and MRPO with one reference is DPO
        assert abs(d["train_loss_first"] - math.log(2.0)) < 1e-5
        assert abs(m1["train_loss_first"] - d["train_loss_first"]) < 1e-6
        assert abs(m1["train_loss_last"] - d["train_loss_last"]) < 1e-5
        assert abs(m1["acc_primary"] - d["acc_primary"]) < 1e-9
        # K = 3 starts elsewhere: its virtual reference is not the policy
        assert runs[("mrpo_k3", n)]["train_loss_first"] != d["train_loss_first"]
    md = (out / "results.md").read_text()
    assert "What this run shows" in md and "| mrpo_k3 | 3 | 12 |" in md


def test_mrpo_config_errors(sft_dir, tmp_path):
    cfg = pr._deep_merge(pr.MRPO_DEFAULTS, {"out": str(tmp_path), "progress": False,
                                            "sft": {"model": str(sft_dir)}})
    with pytest.raises(ValueError, match="unknown references"):
        pr.Method.from_dict({"name": "x", "loss": "mrpo", "refs": ["init", "nope"]}, ["init"])
    with pytest.raises(ValueError, match="must start with"):
        pr.Method.from_dict({"name": "x", "loss": "mrpo", "refs": ["a", "init"]}, ["init", "a"])
    with pytest.raises(ValueError, match="exactly one"):
        pr.Method.from_dict({"name": "x", "loss": "dpo", "refs": ["init", "a"]}, ["init", "a"])
    with pytest.raises(ValueError, match="unknown keys"):
        pr.Method.from_dict({"name": "x", "loss": "dpo", "betta": 1}, ["init"])
    cfg["references"] = [{"name": "init", "model": str(sft_dir)}]
    with pytest.raises(ValueError, match="distinct name"):
        pr.run_mrpo(cfg)
    with pytest.raises(ValueError, match="model.safetensors"):
        pr.ensure_world_model({"model": str(tmp_path / "nothing")}, tmp_path / "x")


def test_ensure_world_model_reuse(sft_dir, world_out):
    before = (sft_dir / "model.safetensors").stat().st_mtime_ns
    again = pr.ensure_world_model({"model": None, "world": TINY_WORLD}, world_out, progress=False)
    assert again == sft_dir and (sft_dir / "model.safetensors").stat().st_mtime_ns == before  # not retrained
    changed = pr._deep_merge(TINY_WORLD, {"train": {"max_steps": 31}})
    with pytest.raises(ValueError, match="another config"):
        pr.ensure_world_model({"model": None, "world": changed}, world_out, progress=False)


# ----------------------------------------------------------------------------- helpers


def test_pref_metrics_against_numpy():
    rng = np.random.default_rng(0)
    N = 50
    data = {"ref_chosen": rng.normal(-20, 3, (3, N)).astype(np.float32),
            "ref_rejected": rng.normal(-20, 3, (3, N)).astype(np.float32)}
    pw, pl = rng.normal(-20, 3, N).astype(np.float32), rng.normal(-20, 3, N).astype(np.float32)
    rw, rl = data["ref_chosen"].astype(np.float64), data["ref_rejected"].astype(np.float64)
    beta = 0.5
    dpo = pr.Method.from_dict({"name": "d", "loss": "dpo"}, ["init"])
    m = pr._pref_metrics(pw, pl, data, dpo, [0], beta, None)
    want = 100 * np.mean((pw - rw[0]) > (pl - rl[0]))
    assert abs(m["acc_primary"] - want) < 1e-9 and abs(m["acc_own"] - want) < 1e-4
    assert abs(m["acc_logp"] - 100 * np.mean(pw > pl)) < 1e-9
    z = beta * ((pw - rw[0]) - (pl - rl[0]))
    assert abs(m["loss"] - np.mean(np.log1p(np.exp(-z)))) < 1e-5
    # uniform-weight MRPO without CTRO: harmonic virtual reference, from scratch
    uni = pr.Method.from_dict({"name": "u", "loss": "mrpo", "refs": ["init", "a", "b"], "weighting": "uniform",
                               "eps": None}, ["init", "a", "b"])
    m = pr._pref_metrics(pw, pl, data, uni, [0, 1, 2], beta, None)

    def virt(r):  # -log sum_k (1/K) exp(-lp_k), shifted for stability
        c = (-r).max(0)
        return -(np.log(np.mean(np.exp(-r - c), axis=0)) + c)

    vw, vl = virt(rw), virt(rl)
    z = beta * ((pw - vw) - (pl - vl))
    assert abs(m["acc_own"] - 100 * np.mean(z > 0)) < 1e-4
    assert abs(m["loss"] - np.mean(np.log1p(np.exp(-z)))) < 1e-5


def test_validation_weights_use_training_pairs():
    rng = np.random.default_rng(1)
    data = {"ref_chosen": rng.normal(-10, 2, (3, 40)).astype(np.float32),
            "ref_rejected": rng.normal(-12, 2, (3, 40)).astype(np.float32)}
    m = pr.Method.from_dict({"name": "v", "loss": "mrpo", "refs": ["init", "a"], "weighting": "validation"},
                            ["init", "a", "b"])
    w = pr._weights_for(m, data, [0, 2])
    s = np.abs(data["ref_chosen"][[0, 2]].astype(np.float64) - data["ref_rejected"][[0, 2]]).mean(1)
    np.testing.assert_allclose(w, s / s.sum(), rtol=1e-5)
    assert pr._weights_for(pr.Method.from_dict({"name": "d", "loss": "dpo"}, ["init"]), data, [0]) is None


def test_chunks_and_last_index():
    ch = pr._chunks(10, 3, seed=0)
    assert [len(c) for c in ch] == [3, 3, 3]
    flat = np.concatenate(ch)
    assert len(set(flat.tolist())) == 9 and flat.max() < 10
    with pytest.raises(ValueError, match="at least one"):
        pr._chunks(2, 3, seed=0)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert np.asarray(pr._last_index(mask)).tolist() == [1, 3, 0]


def test_verdict_counts():
    rows = [{"method": "dpo", "kind": "dpo", "pairs": 10, "acc_primary": 60.0, "pass@1": 30.0},
            {"method": "m2", "kind": "mrpo", "pairs": 10, "acc_primary": 90.0, "pass@1": 30.5},
            {"method": "m3", "kind": "mrpo", "pairs": 10, "acc_primary": 20.0, "pass@1": 29.0}]
    text = "\n".join(pr._verdict(rows, n_held=400, n_eval=400))
    assert "acc_primary: MRPO better in 1/2 comparisons, DPO better in 1/2, within noise in 0/2" in text
    assert "pass@1: MRPO better in 0/2 comparisons, DPO better in 0/2, within noise in 2/2" in text


def test_configs_match_defaults_and_overrides():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    for name, defaults in (("irft", pr.IRFT_DEFAULTS), ("mrpo", pr.MRPO_DEFAULTS)):
        cfg = config_from_argv([str(root / "configs" / f"{name}.yaml"), "seed=3", "train.seeds=[0,1]"]
                              if name == "mrpo" else [str(root / "configs" / f"{name}.yaml"), "seed=3"], defaults)
        assert cfg["seed"] == 3
        cfg["seed"] = defaults["seed"]
        if name == "mrpo":
            assert cfg["train"]["seeds"] == [0, 1]
            cfg["train"]["seeds"] = defaults["train"]["seeds"]
        assert cfg == defaults, f"configs/{name}.yaml drifted from policy_run's defaults"
    with pytest.raises(ValueError, match="unknown key"):
        config_from_argv(["irft.betta=1"], pr.IRFT_DEFAULTS)
    with pytest.raises(ValueError, match="optimizer.lr"):
        pr._opt_config({"name": "adamw", "lr": "fast"}, 10)
    opt = pr._opt_config({"name": "rmsprop", "lr": "1e-4", "schedule": "cosine"}, 20, 0.1)
    assert opt.lr == 1e-4 and opt.total_steps == 20 and opt.warmup_steps == 2
