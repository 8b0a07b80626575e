"""`ebrm run` end to end on tiny random HF chat models (Qwen2, Llama 3) and a GSM8K-format toy
task, plus the pipeline's bookkeeping (pairs, preference accuracy, filter) against plain
references. A random model solves nothing: the training problems' demonstrations
(``pairs.demonstrations``) are the correct side of the pairs."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import save_tiny_chat_model, write_gsm8k_toy

from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.methods.ebrm import energy as ebrm
from swiftjax.methods.ebrm import pipeline as er
from swiftjax.methods.swift import features as feats
from swiftjax.tasks import TaskConfig, make_task

REPO = Path(__file__).resolve().parents[3]
LEVELS = (0.0, 0.4)
N, N_TRAIN, P_TEST, P_TRAIN = 4, 3, 2, 4


def swift_npz(path, d, n_train=40, p_test=4):
    """Stand-in SWIFT arrays: e with a direction that separates correct from incorrect."""
    rng = np.random.default_rng(0)
    lab_tr = rng.random(n_train) < 0.5
    e_tr = rng.normal(size=(n_train, d)).astype(np.float32)
    e_tr[:, 0] += 2.0 * lab_tr
    good, bad = np.flatnonzero(lab_tr), np.flatnonzero(~lab_tr)
    pairs = np.stack([good[:8], bad[:8]], 1)
    correct = rng.random((p_test, N)) < 0.5
    e_te = rng.normal(size=(p_test * N, d)).astype(np.float32)
    e_te[:, 0] += 2.0 * correct.reshape(-1)
    return er.write_swift_arrays(path, e_tr, e_tr[:, 0] + rng.normal(size=n_train), pairs, e_te,
                                 e_te[:, 0] + rng.normal(size=p_test * N), correct)


def _config(tmp, model, *extra):
    data = write_gsm8k_toy(tmp / "gsm8k.jsonl")
    return parse_typed(er.EbrmRunConfig, [
        f"model={model}", "task.name=gsm8k", f"task.test_path={data}", f"task.n_test={P_TEST}",
        f"task.n_train={P_TRAIN}", f"out={tmp / 'out'}", f"n={N}", f"n_train={N_TRAIN}", f"noise_levels={list(LEVELS)}",
        "sampling.max_new_tokens=8", "sampling.prompt_len=240", "sampling.batch_size=8", "pairs.demonstrations=true",
        "pairs.max_per_problem=3", "rm.max_len=null", "rm.epochs=2", "rm.batch_size=4", "rm.warmup_steps=1",
        "rm.score_batch_size=16", "ebrm.epochs=3", "ebrm.batch_size=8", "ebrm.num_neg=16", "ebrm.hidden=[16,8]",
        "ebrm.r_hidden=[8]", "refine.seeds=2", "refine.steps=10", "progress=false", *extra], "test")


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def ebrm_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"ebrm_{request.param}")
    model, _ = save_tiny_chat_model(request.param, tmp / "model")
    extra = [f"swift.features={swift_npz(tmp / 'swift.npz', 16)}"] if request.param == "qwen2" else []
    cfg = _config(tmp, model, *extra)
    res = er.run(cfg, log=lambda *a: None)
    return cfg, res, tmp / "out"


# ----------------------------------------------------------------------------- whole pipeline


def ref_clean_pairs(rows):
    """Every (correct, incorrect) pair of each problem as (prompt_id, index) keys, by a loop."""
    by = {}
    for r in rows:
        by.setdefault(r["prompt_id"], []).append(r)
    out = []
    for pid, rs in by.items():
        for a in rs:
            for b in rs:
                if a["correct"] and not b["correct"]:
                    out.append(((pid, a["index"]), (pid, b["index"])))
    return out


def test_run_writes_results_with_model_and_task(ebrm_run):
    cfg, res, out = ebrm_run
    saved = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    bb = er.backbone_of(cfg)
    assert saved["model"] == bb.describe() and saved["task"]["name"] == "gsm8k"
    assert saved["config"]["pairs"]["demonstrations"] is True
    ref = saved["reference"]
    assert ref["n"] == N and ref["problems"] == P_TEST
    assert ref["train_problems"] == P_TRAIN and ref["train_candidates"] == P_TRAIN * (N_TRAIN + 1)
    # the training pairs: min(cap, correct x incorrect) per problem of the stored labels
    z = np.load(out / "noise_0" / "train_features.npz")
    sampled = cands.read_candidates(next(out.glob("candidates_train_*.jsonl")))
    _, _, correct = er.order_rows(er.training_rows(bb, make_task(cfg.task), sampled, N_TRAIN, True))
    expect = sum(min(3, int(c.sum()) * int((~c).sum())) for c in correct)
    assert ref["train_pairs"] == len(z["pairs_clean"]) == expect > 0
    assert set(saved["rm"]) == {f"{x:g}" for x in LEVELS}
    for level in LEVELS:
        r = saved["rm"][f"{level:g}"]
        for side in ("base", "ebrm"):
            assert set(r[side]["bon"]) == {"1", "2", "4"}
            assert 0.0 <= r[side][f"bon@{N}"] <= 100.0
        assert 0 < r["filter"]["kept"] <= r["filter"]["pairs"]
        assert r["rm_train"]["steps"] >= 1
        d = out / f"noise_{level:g}"
        for name in ("train_features.npz", "test_features.npz", "test_scored.jsonl", "rm_metrics.jsonl",
                     "ebrm_metrics.jsonl", "ebrm/ebrm.json"):
            assert (d / name).is_file(), name
        assert f"| RM | {level:.0%} |" in md
    assert "gsm8k" in md and "EBRM BoN@4" in md
    if cfg.swift.features:
        assert saved["swift"] is not None and "| SWIFT |" in md


@pytest.mark.parametrize("level", LEVELS)
def test_scores_are_finite_and_refinement_moves_them(ebrm_run, level):
    cfg, _, out = ebrm_run
    d = out / f"noise_{level:g}"
    tr, te = np.load(d / "train_features.npz"), np.load(d / "test_features.npz")
    hidden = er.backbone_of(cfg).config.hidden_size
    assert tr["e"].shape == (P_TRAIN * (N_TRAIN + 1), hidden) and te["e"].shape == (P_TEST * N, hidden)
    assert np.isfinite(tr["e"]).all() and np.isfinite(tr["r0"]).all() and np.isfinite(te["r0"]).all()
    rows = cands.read_candidates(d / "test_scored.jsonl")
    base = np.array([r["scores"]["rm"] for r in rows])
    refined = np.array([r["scores"]["ebrm"] for r in rows])
    assert len(rows) == P_TEST * N and np.isfinite(refined).all()
    assert np.abs(refined - base).max() > 1e-4  # the energy net moved the rewards


@pytest.mark.parametrize("level", LEVELS)
def test_flips_exact_fraction_and_filters_on_noisy_labels(ebrm_run, level):
    _, _, out = ebrm_run
    res = json.loads((out / "results.json").read_text())["rm"][f"{level:g}"]
    z = np.load(out / f"noise_{level:g}" / "train_features.npz")
    clean, noisy, flipped = z["pairs_clean"], z["pairs_noisy"], z["flipped"]
    assert flipped.sum() == round(level * len(clean)) == res["flip"]["flipped"]
    for c, nz, f in zip(clean, noisy, flipped):
        assert tuple(nz) == (tuple(c[::-1]) if f else tuple(c))
    # the conflict filter, recomputed from the stored rewards and the noisy labels
    r0 = z["r0"].astype(np.float64)
    kept = [1 for a, b in noisy if r0[a] > r0[b]]
    assert res["filter"]["kept"] == len(kept)
    assert res["filter"]["responses"] == len({int(i) for a, b in noisy if r0[a] > r0[b] for i in (a, b)})


def test_metrics_match_reference(ebrm_run):
    _, _, out = ebrm_run
    level = LEVELS[-1]
    res = json.loads((out / "results.json").read_text())["rm"][f"{level:g}"]
    rows = cands.read_candidates(out / f"noise_{level:g}" / "test_scored.jsonl")
    z = np.load(out / f"noise_{level:g}" / "test_features.npz")
    stored = {(p, int(i)): float(r) for p, i, r in zip(z["prompt_id"].tolist(), z["index"], z["r0"])}
    for r in rows:
        assert abs(r["scores"]["rm"] - stored[(r["prompt_id"], r["index"])]) < 1e-6
    key = {(r["prompt_id"], r["index"]): r for r in rows}
    pairs = ref_clean_pairs(rows)
    assert res["test_pairs"] == len(pairs)
    for name, side in (("rm", "base"), ("ebrm", "ebrm")):
        wins = [key[a]["scores"][name] > key[b]["scores"][name] for a, b in pairs]
        assert res[side]["pref_acc"] == (pytest.approx(100.0 * np.mean(wins), abs=1e-9) if pairs else None)
        solved = []  # Best-of-N: the first maximum among all N candidates, by a loop
        for pid in dict.fromkeys(r["prompt_id"] for r in rows):
            group = sorted((r for r in rows if r["prompt_id"] == pid), key=lambda r: r["index"])
            best = max(range(N), key=lambda j: (group[j]["scores"][name], -j))
            solved.append(group[best]["correct"])
        assert res[side][f"bon@{N}"] == pytest.approx(100.0 * np.mean(solved), abs=1e-9)


def test_refine_command_reproduces_stored_refinement(ebrm_run, tmp_path, capsys):
    _, _, out = ebrm_run
    d = out / f"noise_{LEVELS[-1]:g}"
    dst = tmp_path / "refined.jsonl"
    assert er.main(["refine", str(d / "test_scored.jsonl"), "--features", str(d / "test_features.npz"),
                    "--ebrm", str(d / "ebrm"), "--out", str(dst), "--name", "again"]) == 0
    assert "BoN@4" in capsys.readouterr().out
    for r in cands.read_candidates(dst):
        np.testing.assert_allclose(r["scores"]["again"], r["scores"]["ebrm"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ebrm.json"):
        er.score_refine_main([str(d / "test_scored.jsonl"), "--features", str(d / "test_features.npz"),
                              "--ebrm", str(tmp_path)])


def test_encode_rows_and_swift_arrays_match_numpy_reference(tmp_path):
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    bb = er.backbone_of(parse_typed(er.EbrmRunConfig, [f"model={model}"], "test"))
    task = make_task(TaskConfig(name="gsm8k", test_path=str(write_gsm8k_toy(tmp_path / "g.jsonl")), n_test=2,
                                n_train=4))
    rows = er.demonstration_rows(bb, task, task.problems("train"), 0)
    rows[1] = dict(rows[1], token_ids=None)  # rendered from its text instead
    ids, attn, resp = er.encode_rows(bb, rows, None)
    assert ids.shape[1] % 8 == 0
    for i, r in enumerate(rows):  # the response mask covers exactly the response tokens
        want = bb.response_ids(r["prompt"], r["text"])
        assert ids[i][resp[i] == 1].tolist() == want and want[-1] in bb.eos_ids
        assert ids[i][attn[i] == 0].tolist() == [bb.pad_id] * int((attn[i] == 0).sum())
    with pytest.raises(ValueError, match="rm.max_len"):
        er.encode_rows(bb, rows, 16)
    rng = np.random.default_rng(0)
    head = {"kernel": jnp.asarray(rng.normal(size=(96, 2)) * 0.3, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}
    e, r0 = er.swift_arrays(bb.model, head, feats.FeatureSpec(layers=(1, 2)), ids, attn, resp, batch_size=3)
    graphdef, state = nnx.split(bb.model)
    hidden = jax.jit(lambda st, i, a: nnx.merge(graphdef, st)(i, a, output_hidden_states=True).hidden_states)
    hs = hidden(state, jnp.asarray(ids), jnp.asarray(attn))
    x = np.concatenate([np.asarray(hs[1]), np.asarray(hs[2])], -1).astype(np.float64)  # [B, T, 96]
    k, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    for i in range(len(rows)):
        xs = x[i][resp[i] == 1]
        g = 1.0 / (1.0 + np.exp(-(xs @ k[:, 0] + b[0])))
        rt = xs @ k[:, 1] + b[1]
        np.testing.assert_allclose(r0[i], (g * rt).sum() / g.sum(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(e[i], (g[:, None] * xs).sum(0) / g.sum(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bookkeeping


def test_candidate_pairs_match_loop():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 5)) < 0.4
    pairs = er.candidate_pairs(correct)
    ref = [(p * 5 + i, p * 5 + j) for p in range(7) for i in range(5) for j in range(5)
           if correct[p, i] and not correct[p, j]]
    assert sorted(map(tuple, pairs.tolist())) == sorted(ref)
    capped = er.candidate_pairs(correct, max_per_problem=2, seed=3)
    per = np.bincount(capped[:, 0] // 5, minlength=7)
    full = np.bincount(pairs[:, 0] // 5, minlength=7)
    np.testing.assert_array_equal(per, np.minimum(full, 2))
    assert set(map(tuple, capped.tolist())) <= set(ref)
    with pytest.raises(ValueError, match="bool"):
        er.candidate_pairs(np.zeros((2, 3), np.int32))


def test_preference_accuracy_ties_count_wrong():
    s = np.array([1.0, 1.0, 2.0, 0.5])
    pairs = np.array([[0, 1], [2, 3], [3, 2]])
    assert er.preference_accuracy(s, pairs) == pytest.approx(100.0 / 3)
    assert er.preference_accuracy(s, np.zeros((0, 2), np.int64)) is None
    with pytest.raises(ValueError, match="row indices"):
        er.preference_accuracy(s, np.array([[0, 9]]))


def test_filter_training_set_vs_reference():
    rng = np.random.default_rng(1)
    r0 = rng.normal(size=30)
    pairs = rng.integers(0, 30, size=(25, 2))
    rows, keep = er.filter_training_set(r0, pairs)
    ref_keep = np.array([r0[a] > r0[b] for a, b in pairs])
    np.testing.assert_array_equal(keep, ref_keep)
    assert rows.tolist() == sorted({int(i) for (a, b), k in zip(pairs, ref_keep) if k for i in (a, b)})
    rows_all, keep_all = er.filter_training_set(r0, pairs, use_filter=False)
    assert keep_all.all() and rows_all.tolist() == sorted(set(pairs.reshape(-1).tolist()))
    with pytest.raises(ValueError, match="disagrees"):
        er.filter_training_set(np.array([0.0, 1.0]), np.array([[0, 1]]))


def test_save_ebrm_overwrites_and_load_roundtrips(tmp_path):
    net = ebrm.EBRMConfig(embed_dim=3, r_hidden=(4,), hidden=(5,))
    rcfg = er.RefineConfig(steps=7, init="base", seeds=1)
    er.save_ebrm(tmp_path / "m", ebrm.init_params(jax.random.key(0), net), net, (0.0, 1.0), er.RefineConfig())
    p2 = ebrm.init_params(jax.random.key(1), net)
    er.save_ebrm(tmp_path / "m", p2, net, (0.5, 2.0), rcfg)  # a rerun into the same folder
    params, net2, stats, rcfg2 = er.load_ebrm(tmp_path / "m")
    assert net2 == net and stats == (0.5, 2.0) and rcfg2 == rcfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs(tmp_path):
    tcfg, rcfg = er.EBRMTrainConfig(), er.RefineConfig()
    with pytest.raises(ValueError, match="e_test"):
        er.ebrm_on_arrays(np.zeros((4, 3)), np.zeros(4), [[0, 1]], np.zeros((4, 5)), np.zeros(4),
                          np.zeros((2, 2), bool), tcfg, rcfg)
    with pytest.raises(ValueError, match="correct_test"):
        er.ebrm_on_arrays(np.zeros((4, 3)), np.zeros(4), [[0, 1]], np.zeros((4, 3)), np.zeros(4),
                          np.zeros((3, 2), bool), tcfg, rcfg)
    np.savez(tmp_path / "bad.npz", e_train=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="missing arrays"):
        er.load_swift_arrays(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="pairs_train"):
        er.write_swift_arrays(tmp_path / "x.npz", np.zeros((3, 2)), np.zeros(3), [[0, 3]], np.zeros((4, 2)),
                              np.zeros(4), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="correct_test"):
        er.write_swift_arrays(tmp_path / "x.npz", np.zeros((3, 2)), np.zeros(3), [[0, 1]], np.zeros((4, 2)),
                              np.zeros(4), np.zeros((3, 2), bool))


def test_config_is_validated_before_any_work(tmp_path):
    def err(*args):
        with pytest.raises(ValueError) as e:
            er.main(["run", *args])
        return str(e.value)

    assert "noise_levels: expected a non-empty list of fractions" in err("noise_levels=[0.5,1.5]")
    assert "refine.init: expected one of" in err("refine.init=nope")
    assert "rm.lr: expected a number" in err("rm.lr=fast")
    assert "pairs.max_per_problm: unknown key" in err("pairs.max_per_problm=2")
    f = tmp_path / "file"
    f.write_text("x")
    assert "out: expected a directory" in err(f"out={f}")
    assert "swift.features: expected an npz file" in err(f"out={tmp_path / 'o'}", f"swift.features={tmp_path / 'no'}")
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    data = write_gsm8k_toy(tmp_path / "g.jsonl")  # as a jsonl task with no solution field: no demonstrations
    assert "pairs.demonstrations: task jsonl has no demonstration" in err(
        f"model={model}", f"out={tmp_path / 'o'}", "task.name=jsonl", f"task.test_path={data}", "task.n_test=2",
        "task.n_train=4", "pairs.demonstrations=true")
    assert not list((tmp_path / "o").glob("candidates_*"))  # failed before sampling
    cfg = parse_typed(er.EbrmRunConfig, [str(REPO / "configs" / "ebrm.yaml")], "test")  # the shipped config parses
    assert cfg.model == "world" and cfg.task.name == "world" and cfg.pairs.max_per_problem == 4
