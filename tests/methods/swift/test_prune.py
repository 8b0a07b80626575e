"""SWIFT-pruned sampling: the decision rule against brute force, prefix scores against the
pooled score of each prefix, and online pruning against its offline replay."""

import jax
import numpy as np
import pytest
from hf_tiny import tiny_hf_model

import swiftjax
from swiftjax.methods.swift import features as F
from swiftjax.methods.swift import head as swift
from swiftjax.methods.swift.prune import PruneConfig, drop_lowest, pruned_best_of_n, replay
from swiftjax.sampling import SamplingConfig


def _brute_drop(scores, live, fraction, min_keep):
    out = np.zeros_like(live)
    for i in range(len(scores)):
        idx = [j for j in range(len(scores[i])) if live[i, j]]
        n_drop = min(int(np.floor(fraction * len(idx))), max(len(idx) - min_keep, 0))
        order = sorted(idx, key=lambda j: (scores[i, j], j))  # lowest first, earlier first among ties
        out[i, order[:n_drop]] = True
    return out


def test_drop_lowest_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p, g = int(rng.integers(1, 4)), int(rng.integers(1, 7))
        scores = rng.integers(0, 4, size=(p, g)).astype(np.float32)  # ties happen
        live = rng.random((p, g)) < 0.7
        frac, keep = float(rng.choice([0.0, 0.25, 0.5, 0.75])), int(rng.integers(1, 3))
        np.testing.assert_array_equal(np.asarray(drop_lowest(scores, live, frac, keep)),
                                      _brute_drop(scores, live, frac, keep))


def test_prefix_scores_equal_the_score_of_each_prefix():
    rng = np.random.default_rng(1)
    for c in (2, 1):
        proj = rng.normal(size=(3, 7, c)).astype(np.float32)
        mask = (rng.random((3, 7)) < 0.8).astype(np.int32)
        got = np.asarray(swift.prefix_scores_from_projections(proj, mask))
        for t in range(7):
            cut = mask * (np.arange(7)[None] <= t)
            np.testing.assert_allclose(got[:, t], np.asarray(swift.score_from_projections(proj, cut)), atol=1e-6)


def test_pruned_best_of_n_counts_tokens_and_picks_among_the_kept():
    prefix = np.array([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]])  # [1, 3, 4]
    lengths, finished = np.array([[4, 4, 2]]), np.array([[False, False, True]])
    correct = np.array([[True, False, False]])
    cfg = PruneConfig(every=1, fraction=0.5)
    stopped = replay(prefix, lengths, finished, cfg)
    np.testing.assert_array_equal(stopped, [[0, -1, -1]])   # step 0: 3 live, drop 1 (the lowest)
    res = pruned_best_of_n(prefix, prefix[:, :, -1], lengths, finished, correct, cfg)
    assert res["tokens"] == 1 + 4 + 2 and res["tokens_plain"] == 10 and res["accuracy"] == 0.0
    assert "vote_accuracy" not in res


def test_pruned_vote_is_majority_among_the_kept_against_brute_force():
    rng = np.random.default_rng(3)
    p, n, t = 40, 6, 12
    prefix = rng.normal(size=(p, n, t))
    lengths = rng.integers(3, t + 1, size=(p, n))
    finished = rng.random((p, n)) < 0.7
    answers = [[str(a) if a < 3 else None for a in rng.integers(0, 4, size=n)] for _ in range(p)]
    correct = np.array([[a == "1" for a in row] for row in answers])
    cfg = PruneConfig(every=3, fraction=0.5)
    res = pruned_best_of_n(prefix, prefix[:, :, -1], lengths, finished, correct, cfg, answers=answers)
    kept = replay(prefix, lengths, finished, cfg) < 0
    hits = []
    for i in range(p):
        counts = {}
        for j in range(n):
            if kept[i, j] and answers[i][j] is not None:
                counts[answers[i][j]] = counts.get(answers[i][j], 0) + 1
        top = max(counts.values()) if counts else 0
        winner = next((answers[i][j] for j in range(n) if kept[i, j] and counts.get(answers[i][j]) == top), None)
        hits.append(winner == "1")
    assert res["vote_accuracy"] == pytest.approx(100 * np.mean(hits))
    assert 0 < res["vote_accuracy"] < 100


def test_online_pruning_keeps_what_the_offline_replay_keeps(tmp_path):
    hf = tiny_hf_model("llama", seed=5)
    hf.save_pretrained(tmp_path)
    model, cfg = swiftjax.load_model(tmp_path)
    spec = F.FeatureSpec(layers="all", apply_norm=True)
    p = swift.init_params(jax.random.key(7), F.feature_dim(spec, cfg), gated=True)
    p = {"kernel": p["kernel"] * 4.0, "bias": p["bias"]}
    rs = np.random.RandomState(2)
    prompts = rs.randint(3, 97, size=(2, 6))
    ids = np.repeat(prompts, 4, 0)                      # 2 problems x 4 candidates
    mask = np.ones_like(ids)
    n, key = 8, jax.random.key(4)
    sc = SamplingConfig(max_new_tokens=n, temperature=1.0, eos_ids=tuple(range(3, 13)), pad_id=0)
    plain = F.generate_with_scores(model, p, spec, ids, mask, key=key, cfg=sc)
    prune = PruneConfig(every=2, fraction=0.5)
    pruned = F.generate_with_scores(model, p, spec, ids, mask, key=key, cfg=sc, prune=prune, prune_group=4,
                                    prompt_groups=4)
    stopped = replay(np.asarray(plain.running).reshape(2, 4, n), np.asarray(plain.lengths).reshape(2, 4),
                     np.asarray(plain.finished).reshape(2, 4), prune).reshape(-1)
    assert (stopped >= 0).any() and (stopped < 0).any()
    kept = stopped < 0
    lengths = np.asarray(pruned.lengths)
    np.testing.assert_array_equal(lengths, np.where(kept, np.asarray(plain.lengths), stopped + 1))
    np.testing.assert_array_equal(np.asarray(pruned.finished), np.asarray(plain.finished) & kept)
    tok, ref = np.asarray(pruned.tokens), np.asarray(plain.tokens)
    for b in range(8):  # every row's generated tokens are the unpruned row's, up to where it stopped
        np.testing.assert_array_equal(tok[b, :lengths[b]], ref[b, :lengths[b]])
    np.testing.assert_allclose(np.asarray(pruned.scores)[kept], np.asarray(plain.scores)[kept], atol=1e-5)
    with pytest.raises(ValueError, match="prune_group"):
        F.generate_with_scores(model, p, spec, ids, mask, key=key, cfg=sc, prune=prune, prune_group=3)
