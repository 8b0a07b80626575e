"""Best-of-N metrics against plain-Python references on random pools (with ties)."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax import bon

# ----------------------------------------------------------------------------- references


def ref_pick(row):
    """Index of the first maximal value, by explicit loop."""
    best, best_i = None, None
    for i, v in enumerate(row):
        if best is None or v > best:
            best, best_i = v, i
    return best_i


def ref_bon(scores, correct, ks):
    out = {}
    for k in ks:
        hits = [correct[p][ref_pick(list(scores[p][:k]))] for p in range(len(scores))]
        out[k] = 100.0 * sum(hits) / len(hits)
    return out


def ref_random(correct, ks):
    return {k: 100.0 * sum(sum(r[:k]) / k for r in correct) / len(correct) for k in ks}


def ref_oracle(correct, ks):
    return {k: 100.0 * sum(any(r[:k]) for r in correct) / len(correct) for k in ks}


def ref_majority(answers, correct, ks):
    out = {}
    for k in ks:
        hits = 0
        for a_row, c_row in zip(answers, correct):
            votes = [a for a in a_row[:k] if a is not None]
            if not votes:
                continue
            cnt = Counter(votes)
            top = max(cnt.values())
            winners = [a for a in cnt if cnt[a] == top]
            first = min(a_row[:k].index(a) for a in winners)  # earliest first occurrence
            hits += bool(c_row[first])
        out[k] = 100.0 * hits / len(correct)
    return out


def ref_pass(correct, ks):
    n = len(correct[0])
    out = {}
    for k in ks:
        vals = []
        for r in correct:
            c = sum(r)
            vals.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
        out[k] = 100.0 * sum(vals) / len(vals)
    return out


def ref_ranks(row):
    return [sum(1 for w in row if w > v) for v in row]


def ref_combined_pick(s_row, e_row, mode):
    if mode == "ranking":
        rs, re_ = ref_ranks(s_row), ref_ranks(e_row)
        comb = [max(a, b) for a, b in zip(rs, re_)]
        best = min(comb)
        return comb.index(best)

    def scale(row):
        lo, hi = min(row), max(row)
        return [1.0 if hi == lo else (v - lo) / (hi - lo) for v in row]

    ss, ee = scale(s_row), scale(e_row)
    comb = [(a + b) / 2 for a, b in zip(ss, ee)]
    return ref_pick(comb)


def ref_combined(s, e, correct, ks, mode):
    out = {}
    for k in ks:
        hits = [correct[p][ref_combined_pick(list(s[p][:k]), list(e[p][:k]), mode)] for p in range(len(s))]
        out[k] = 100.0 * sum(hits) / len(hits)
    return out


def assert_close(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), (k, got[k], want[k])


def pool(seed, p=37, n=8, levels=3):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(p, n)).astype(np.float32)  # many ties
    correct = rng.random((p, n)) < 0.4
    return rng, scores, correct


# ----------------------------------------------------------------------------- tests


def test_default_ks():
    assert bon.default_ks(8) == [1, 2, 4, 8]
    assert bon.default_ks(6) == [1, 2, 4, 6]
    assert bon.default_ks(1) == [1]
    assert bon.default_ks(64)[-1] == 64 and len(bon.default_ks(64)) == 7
    with pytest.raises(ValueError):
        bon.default_ks(0)


@pytest.mark.parametrize("seed", range(4))
def test_best_of_n_matches_reference_with_ties(seed):
    _, scores, correct = pool(seed)
    ks = [1, 2, 3, 4, 5, 8]
    assert_close(bon.best_of_n(scores, correct, ks), ref_bon(scores.tolist(), correct.tolist(), ks))


def test_best_of_n_continuous_scores_and_default_ks():
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(50, 6))
    correct = rng.random((50, 6)) < 0.5
    got = bon.best_of_n(scores, correct)
    assert list(got) == [1, 2, 4, 6]
    assert_close(got, ref_bon(scores.tolist(), correct.tolist(), [1, 2, 4, 6]))


def test_best_of_n_ties_go_to_earliest():
    scores = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    correct = np.array([[True, False, False], [False, False, True]])
    got = bon.best_of_n(scores, correct, [3])
    assert got[3] == pytest.approx(50.0)  # row 0 picks 0 (correct), row 1 picks 1 (wrong)


def test_best_of_n_keeps_float64_precision():
    # distinct in float64, equal in float32: the later (correct) one must win
    scores = np.array([[1.0, 1.0 + 1e-12]])
    correct = np.array([[False, True]])
    assert bon.best_of_n(scores, correct, [2])[2] == 100.0


def test_best_of_n_accepts_inf_and_jax_arrays():
    scores = jnp.array([[-jnp.inf, 0.5, jnp.inf]], dtype=jnp.float32)
    correct = jnp.array([[False, False, True]])
    assert bon.best_of_n(scores, correct, [1, 2, 3]) == {1: 0.0, 2: 0.0, 3: 100.0}


def test_select_best_matches_numpy_argmax_reference():
    _, scores, _ = pool(5)
    got = np.asarray(bon.select_best(jnp.asarray(scores)))
    want = [ref_pick(list(r)) for r in scores]
    assert got.tolist() == want


@pytest.mark.parametrize("seed", range(3))
def test_random_oracle_pass(seed):
    _, _, correct = pool(seed, n=7)
    ks = [1, 2, 3, 7]
    c = correct.tolist()
    assert_close(bon.random_at_k(correct, ks), ref_random(c, ks))
    assert_close(bon.oracle_at_k(correct, ks), ref_oracle(c, ks))
    assert_close(bon.pass_at_k(correct, ks), ref_pass(c, ks))


def test_pass_at_k_is_oracle_over_all_subsets():
    rng = np.random.default_rng(3)
    correct = rng.random((9, 6)) < 0.3
    for k in range(1, 7):
        subsets = list(itertools.combinations(range(6), k))
        brute = np.mean([[any(row[list(s)]) for s in subsets] for row in correct]) * 100
        assert bon.pass_at_k(correct, [k])[k] == pytest.approx(brute, abs=1e-9)
    assert bon.pass_at_k(correct, [6])[6] == pytest.approx(bon.oracle_at_k(correct, [6])[6])


@pytest.mark.parametrize("seed", range(4))
def test_majority_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    p, n = 41, 8
    vocab = ["a", "b", "c", None]
    answers = [[vocab[i] for i in rng.integers(0, 4, size=n)] for _ in range(p)]
    answers[0] = [None] * n  # all None -> incorrect
    correct = rng.random((p, n)) < 0.5
    correct[0] = True
    ks = [1, 2, 3, 4, 6, 8]
    assert_close(bon.majority_at_k(answers, correct, ks), ref_majority(answers, correct.tolist(), ks))


def test_majority_rules():
    # tie between "x" (first at 0) and "y" (first at 1): x wins; None never wins
    answers = [["x", "y", "y", "x"], [None, None, "z", None], [None, None, None, None]]
    correct = np.array([[True, False, False, False], [True, True, False, True], [True] * 4])
    got = bon.majority_at_k(answers, correct, [4])
    assert got[4] == pytest.approx(100.0 / 3)  # row0 right, row1 picks z (wrong), row2 all None


@pytest.mark.parametrize("mode", ["ranking", "scaling"])
@pytest.mark.parametrize("seed", range(3))
def test_combined_matches_reference(mode, seed):
    rng, s, correct = pool(seed, p=29, n=8, levels=4)
    e = rng.integers(0, 3, size=s.shape).astype(np.float64)
    e[0] = 1.0  # a constant group
    ks = [1, 2, 3, 5, 8]
    got = bon.best_of_n_combined(s, e, correct, ks, mode)
    assert_close(got, ref_combined(s.tolist(), e.tolist(), correct.tolist(), ks, mode))


def test_combine_functions_directly():
    rng = np.random.default_rng(8)
    s = rng.integers(0, 3, size=(6, 5)).astype(np.float64)
    e = rng.normal(size=(6, 5))
    e[1] = 2.0
    r = bon.combine_ranking(s, e)
    sc = bon.combine_scaling(s, e)
    for p in range(6):
        rs, re_ = ref_ranks(list(s[p])), ref_ranks(list(e[p]))
        np.testing.assert_array_equal(r[p], [-max(a, b) for a, b in zip(rs, re_)])

        def scale(row):
            lo, hi = min(row), max(row)
            return [1.0 if hi == lo else (v - lo) / (hi - lo) for v in row]

        np.testing.assert_allclose(sc[p], (np.array(scale(list(s[p]))) + scale(list(e[p]))) / 2, atol=1e-12)
    np.testing.assert_array_equal(bon.rank_desc(np.array([[3.0, 1.0, 3.0, 2.0]])), [[0, 3, 0, 2]])


def test_combination_is_within_first_k():
    # candidate 2 is the best of all by e, but within the first 2 the ranks change.
    s = np.array([[0.0, 1.0, 5.0]])
    e = np.array([[1.0, 0.0, 9.0]])
    correct = np.array([[True, False, False]])
    # ranking, k=2 on s2/e2: within the first 2, ranks s=[0,1], e=[1,0] -> [1,1] -> index 0;
    # ranks over all 3 would be s=[0,1,2], e=[2,0,1] -> [2,1] on the first two -> index 1.
    s2, e2 = np.array([[2.0, 1.0, 0.0]]), np.array([[0.0, 2.0, 1.0]])
    assert bon.best_of_n_combined(s2, e2, correct, [2], "ranking")[2] == 100.0
    assert bon.best_of_n(bon.combine_ranking(s2, e2)[:, :2], correct[:, :2], [2])[2] == 0.0
    # scaling, k=2: s'=[0,1], e'=[1,0] -> [0.5,0.5] -> index 0; over all 3 it would pick 1
    assert bon.best_of_n_combined(s, e, correct, [2], "scaling")[2] == 100.0
    assert bon.best_of_n(bon.combine_scaling(s, e)[:, :2], correct[:, :2], [2])[2] == 0.0
    assert bon.best_of_n_combined(s, e, correct, [3], "scaling")[3] == 0.0


def test_bon_table_json():
    rng, s, correct = pool(2, n=4)
    answers = [[str(int(x)) for x in row] for row in rng.integers(0, 2, size=(s.shape[0], 4))]
    e = rng.normal(size=s.shape)
    t = bon.bon_table(correct, scores={"swift": s, "rm": e}, answers=answers,
                      combos={"swift+rm": ("swift", "rm", "ranking")})
    assert set(t) == {"random", "oracle", "majority", "swift", "rm", "swift+rm"}
    assert list(t["swift"]) == ["1", "2", "4"]
    json.dumps(t)
    want = ref_bon(s.tolist(), correct.tolist(), [1, 2, 4])
    assert [t["swift"][str(k)] for k in (1, 2, 4)] == pytest.approx([want[k] for k in (1, 2, 4)])
    with pytest.raises(ValueError, match="combos"):
        bon.bon_table(correct, scores={"swift": s}, combos={"x": ("swift", "nope", "ranking")})
    with pytest.raises(ValueError, match="collides"):
        bon.bon_table(correct, scores={"random": s})


def test_bad_inputs():
    s = np.zeros((3, 4))
    c = np.zeros((3, 4), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        bon.best_of_n(s[:, :3], c)
    with pytest.raises(ValueError, match="2-D"):
        bon.best_of_n(s[0], c[0])
    for bad_k in ([0], [5], [1.0], [True], []):
        with pytest.raises(ValueError, match="ks"):
            bon.best_of_n(s, c, bad_k)
    nan = s.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bon.best_of_n(nan, c)
    with pytest.raises(ValueError, match="NaN"):
        bon.best_of_n_combined(s, nan, c)
    with pytest.raises(ValueError, match="boolean"):
        bon.oracle_at_k(np.full((3, 4), 2))
    with pytest.raises(ValueError, match="mode"):
        bon.best_of_n_combined(s, s, c, mode="sum")
    inf = s.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        bon.combine_scaling(s, inf)
    with pytest.raises(ValueError, match="P=3"):
        bon.majority_at_k([["a"] * 4] * 2, c)
    with pytest.raises(ValueError, match="N=4"):
        bon.majority_at_k([["a"] * 4, ["a"] * 3, ["a"] * 4], c)
    with pytest.raises(ValueError, match="hashable"):
        bon.majority_at_k([[["a"]] * 4] * 3, c)
    with pytest.raises(ValueError, match="non-empty"):
        bon.random_at_k(np.zeros((0, 4), dtype=bool))
