"""The EBRM experiment end to end on a tiny world model (trained 30 steps here), plus the
pipeline's bookkeeping (pairs, preference accuracy, filter) against plain references."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

from swiftjax.data import candidates as cands
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.methods.ebrm import pipeline as er

REPO = Path(__file__).resolve().parents[3]
LEVELS = (0.0, 0.4)
N = 4


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from swiftjax.world import model as wexp

    cfg = copy.deepcopy(wexp.DEFAULTS)
    cfg["out"] = str(tmp_path_factory.mktemp("world"))
    cfg["data"] = {"n_train": 256, "n_val": 16, "max_len": 96}
    cfg["model"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64,
                    "rope_theta": 10000.0, "max_position_embeddings": 256}
    cfg["train"] = {"batch_size": 16, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0,
                    "clip_norm": 1.0, "eval_every": 0, "ckpt_every": 0}
    return wexp.train(cfg, progress=False)


def synthetic_rows(tok, split, n_problems, seed):
    """N candidates per problem: the gold solution or one with a wrong final answer (a 30-step
    model samples almost no correct solution, so pairs would be missing)."""
    rng = random.Random(seed)
    rows = []
    for p in world.make_split(split, n_problems):
        for j in range(N):
            good = j == 0 if j < 2 else rng.random() < 0.5
            ans = p.answer if good else p.answer + rng.randint(1, 9)
            text = p.solution.rsplit("Answer:", 1)[0] + f"Answer: {ans}"
            rows.append({"prompt_id": p.id, "index": j, "prompt": p.question, "text": text,
                         "token_ids": wtok.encode(tok, text) + [wtok.END_ID], "answer": str(ans),
                         "correct": world.grade(text, p.answer), "gold": str(p.answer)})
    random.Random(seed + 1).shuffle(rows)  # file order must not matter
    return rows


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


@pytest.fixture(scope="module")
def pipeline(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ebrm")
    tok = wtok.load_tokenizer(tiny_world)
    cands.write_candidates(tmp / "train.jsonl", synthetic_rows(tok, "validation", 6, 0))
    cands.write_candidates(tmp / "test.jsonl", synthetic_rows(tok, "test", 4, 1))
    swift_npz(tmp / "swift.npz", 32)
    out = tmp / "run"
    argv = [str(REPO / "configs" / "ebrm.yaml"), f"out={out}", f"model={tiny_world}", f"noise_levels={list(LEVELS)}",
            "progress=false", f"candidates.train.path={tmp / 'train.jsonl'}",
            f"candidates.test.path={tmp / 'test.jsonl'}", f"swift.features={tmp / 'swift.npz'}",
            "rm.epochs=2", "rm.batch_size=8", "ebrm.epochs=3", "ebrm.batch_size=16", "ebrm.num_neg=16",
            "ebrm.hidden=[32,16]", "refine.seeds=2", "refine.steps=10"]
    assert er.main(argv) == 0
    return tmp, out


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


def test_pipeline_writes_results_and_table(pipeline):
    tmp, out = pipeline
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert set(res["rm"]) == {f"{x:g}" for x in LEVELS}
    assert res["reference"]["n"] == N and res["reference"]["problems"] == 4
    for level in LEVELS:
        r = res["rm"][f"{level:g}"]
        for side in ("base", "ebrm"):
            assert 0.0 <= r[side]["pref_acc"] <= 100.0
            assert 0.0 <= r[side][f"bon@{N}"] <= 100.0
            assert set(r[side]["bon"]) == {"1", "2", "4"}
        assert 0 < r["filter"]["kept"] <= r["filter"]["pairs"]
        d = out / f"noise_{level:g}"
        for name in ("train_features.npz", "test_features.npz", "test_scored.jsonl", "rm_metrics.jsonl",
                     "ebrm_metrics.jsonl", "ebrm/ebrm.json"):
            assert (d / name).is_file(), name
        assert f"| RM | {level:.0%} |" in md
    assert res["swift"] is not None and "| SWIFT |" in md
    assert "base pref acc" in md and "EBRM BoN@4" in md


@pytest.mark.parametrize("level", LEVELS)
def test_pipeline_flips_exact_fraction_and_filters_on_noisy_labels(pipeline, level):
    _, out = pipeline
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


@pytest.mark.parametrize("level", LEVELS)
def test_pipeline_metrics_match_reference(pipeline, level):
    tmp, out = pipeline
    res = json.loads((out / "results.json").read_text())["rm"][f"{level:g}"]
    rows = cands.read_candidates(out / f"noise_{level:g}" / "test_scored.jsonl")
    z = np.load(out / f"noise_{level:g}" / "test_features.npz")
    stored = {(p, int(i)): float(r) for p, i, r in zip(z["prompt_id"].tolist(), z["index"], z["r0"])}
    for r in rows:
        assert abs(r["scores"]["rm"] - stored[(r["prompt_id"], r["index"])]) < 1e-6
    key = {(r["prompt_id"], r["index"]): r for r in rows}
    pairs = ref_clean_pairs(cands.read_candidates(tmp / "test.jsonl"))
    assert res["test_pairs"] == len(pairs)
    for name, side in (("rm", "base"), ("ebrm", "ebrm")):
        wins = [key[a]["scores"][name] > key[b]["scores"][name] for a, b in pairs]
        assert res[side]["pref_acc"] == pytest.approx(100.0 * np.mean(wins), abs=1e-9)
        # Best-of-N: the first maximum among all N candidates, by a loop
        solved = []
        for pid in dict.fromkeys(r["prompt_id"] for r in rows):
            group = sorted((r for r in rows if r["prompt_id"] == pid), key=lambda r: r["index"])
            best = max(range(N), key=lambda j: (group[j]["scores"][name], -j))
            solved.append(group[best]["correct"])
        assert res[side][f"bon@{N}"] == pytest.approx(100.0 * np.mean(solved), abs=1e-9)


def test_score_refine_reproduces_stored_refinement(pipeline, tmp_path, capsys):
    _, out = pipeline
    d = out / "noise_0.4"
    dst = tmp_path / "refined.jsonl"
    assert er.score_refine_main(["--refine", str(d / "test_scored.jsonl"), "--features", str(d / "test_features.npz"),
                                 "--ebrm", str(d / "ebrm"), "--out", str(dst), "--name", "again"]) == 0
    assert "BoN@4" in capsys.readouterr().out
    for r in cands.read_candidates(dst):
        np.testing.assert_allclose(r["scores"]["again"], r["scores"]["ebrm"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ebrm.json"):
        er.score_refine_main([str(d / "test_scored.jsonl"), "--features", str(d / "test_features.npz"),
                              "--ebrm", str(tmp_path)])


def test_sampling_path_writes_and_reuses_candidates(tiny_world, tmp_path):
    cfg = copy.deepcopy(er.DEFAULTS)
    cfg["out"] = str(tmp_path)
    cfg["candidates"]["test"].update({"n_problems": 2, "n": 2})
    cfg["candidates"].update({"max_new_tokens": 6, "batch_size": 4})
    path = er.ensure_candidates(cfg, "test", tiny_world, progress=False)
    rows = cands.read_candidates(path)
    ids, flat, correct = er.order_rows(rows)
    assert correct.shape == (2, 2) and len(ids) == 2
    stamp = path.stat().st_mtime_ns
    assert er.ensure_candidates(cfg, "test", tiny_world, progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not resampled


def test_swift_arrays_match_numpy_reference(tiny_world):
    pytest.importorskip("swiftjax.methods.swift.features")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from swiftjax.methods.swift import features as feats
    from swiftjax.world import model as wexp

    model, _, tok = wexp.load_world_model(tiny_world)
    rows = synthetic_rows(tok, "test", 2, 5)[:7]
    ids, attn, resp = er.encode_rows(tok, rows, 128)
    for i, r in enumerate(rows):  # the response mask covers exactly the response tokens
        assert ids[i][resp[i] == 1].tolist() == r["token_ids"]
    rng = np.random.default_rng(0)
    head = {"kernel": jnp.asarray(rng.normal(size=(64, 2)) * 0.3, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=2), jnp.float32)}
    e, r0 = er.swift_arrays(model, head, feats.FeatureSpec(layers=(1, 2)), ids, attn, resp, batch_size=4)
    graphdef, state = nnx.split(model)
    hidden = jax.jit(lambda st, i, a: nnx.merge(graphdef, st)(i, a, output_hidden_states=True).hidden_states)
    hs = hidden(state, jnp.asarray(ids), jnp.asarray(attn))  # jitted: eager op-by-op is slow on CPU
    x = np.concatenate([np.asarray(hs[1]), np.asarray(hs[2])], -1).astype(np.float64)  # [B, T, 64]
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
    import jax

    from swiftjax.methods.ebrm import energy as ebrm

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
    with pytest.raises(ValueError, match="refine.init"):
        er.RefineConfig(init="nope")
    cfg = copy.deepcopy(er.DEFAULTS)
    cfg.update(out=str(tmp_path), noise_levels=[0.5, 1.5])
    with pytest.raises(ValueError, match="noise_levels"):
        er.run(cfg)
