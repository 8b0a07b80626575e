"""Confidence scores and selection rules against brute-force / numpy references."""
import itertools

import numpy as np
import pytest

from swiftjax import selection as S


def _softmax_logp(rng, b, t, v):
    x = rng.normal(size=(b, t, v))
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_confidence_scores_against_definitions():
    rng = np.random.default_rng(0)
    lp = _softmax_logp(rng, 3, 7, 11)                       # full distributions [B, T, V]
    tok = rng.integers(0, 11, size=(3, 7))
    own = np.take_along_axis(lp, tok[..., None], -1)[..., 0]
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], bool)
    for b in range(3):
        n = mask[b].sum()
        assert S.mean_logprob(own, mask)[b] == pytest.approx(own[b, :n].mean())
        # KL(U || p) per token from its definition: sum_v (1/V) log((1/V) / p_v)
        kl = [np.sum((1 / 11) * np.log((1 / 11) / np.exp(lp[b, t]))) for t in range(n)]
        assert S.self_certainty(lp.mean(-1), mask, 11)[b] == pytest.approx(np.mean(kl))
    topk = -np.sort(-lp, -1)[..., :4]
    conf = S.token_confidence(topk)
    np.testing.assert_allclose(conf, -topk.mean(-1))
    for b in range(3):
        x = conf[b][mask[b]]
        windows = [x[i:i + 3].mean() for i in range(len(x) - 2)] or [x.mean()]
        assert S.lowest_group_confidence(conf, mask, 3)[b] == pytest.approx(min(windows))
        assert S.tail_confidence(conf, mask, 2)[b] == pytest.approx(x[-2:].mean())


@pytest.mark.parametrize("window", [1, 3, 5, 9])
def test_prefix_lowest_group_is_the_lowest_group_of_every_prefix(window):
    conf = np.random.default_rng(window).uniform(0.5, 9.0, size=8)
    got = S.prefix_lowest_group(conf, window)
    for t in range(8):
        want = S.lowest_group_confidence(conf[None, : t + 1], np.ones((1, t + 1), bool), window)[0]
        assert got[t] == pytest.approx(want)
    assert S.prefix_lowest_group([], 3).shape == (0,)
    with pytest.raises(ValueError, match=r"conf: expected one response's \[T\]"):
        S.prefix_lowest_group(np.ones((2, 3)), 3)


def _brute_weighted(answers, weights):
    best, best_w = None, -np.inf
    for a in dict.fromkeys(x for x in answers if x is not None):  # first-seen order
        w = sum(wi for ai, wi in zip(answers, weights) if ai == a)
        if w > best_w:
            best, best_w = a, w
    return None if best is None else answers.index(best)


def test_weighted_vote_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        answers = [None if rng.random() < 0.2 else int(rng.integers(0, 3)) for _ in range(n)]
        w = rng.integers(0, 3, size=n).astype(float)  # integer weights: ties happen
        assert S.pick_weighted(answers, w) == _brute_weighted(answers, w)
        assert S.pick_majority(answers) == _brute_weighted(answers, np.ones(n))


def test_filter_vote_and_borda_brute_force():
    answers = ["a", "b", "b", "c", "a", "b"]
    scores = np.array([5.0, 1.0, 0.5, 4.0, 3.0, 0.0])
    assert answers[S.pick_filter_vote(answers, scores, q=0.5)] == "a"   # top 3: a, c, a
    assert answers[S.pick_filter_vote(answers, scores, q=1.0)] == "b"   # everyone: b x3
    # borda: points 6..1 by rank: a: 6 + 4, c: 5, b: 3 + 2 + 1
    assert answers[S.pick_borda(answers, scores)] == "a"


def test_estimate_at_k_is_exact_expectation_in_the_limit():
    rng = np.random.default_rng(2)
    p, n = 24, 5
    correct = rng.random((p, n)) < 0.4
    scores = rng.normal(size=(p, n))
    answers = [[("ok" if c else f"w{j}") for j, c in enumerate(row)] for row in correct]
    # exact expectation of best-of-k over all k-subsets, problem by problem
    for k in (1, 2, 3):
        exact = np.mean([np.mean([correct[i, list(s)][np.argmax(scores[i, list(s)])]
                                  for s in itertools.combinations(range(n), k)]) for i in range(p)]) * 100
        est, se = S.estimate_at_k("best", answers, scores, correct, [k], draws=800, seed=0)[k]
        assert abs(est - exact) < 1.5 and se > 0  # ~4 Monte-Carlo s.d.
    assert S.estimate_at_k("best", answers, scores, correct, [n])[n][0] == pytest.approx(
        correct[np.arange(p), scores.argmax(1)].mean() * 100)
    # k = 1 of any rule is the mean accuracy
    assert S.estimate_at_k("majority", answers, None, correct, [1], draws=1000)[1][0] == pytest.approx(
        correct.mean() * 100, abs=2.0)


def test_paired_difference_at_k_equals_n_against_a_plain_loop():
    rng = np.random.default_rng(5)
    p, n = 40, 6
    correct = rng.random((p, n)) < 0.5
    scores = rng.normal(size=(p, n))
    answers = [[str(a) for a in row] for row in rng.integers(0, 3, size=(p, n))]
    best = S.per_problem_at_k("best", answers, scores, correct, [n])[n]
    maj = S.per_problem_at_k("majority", answers, None, correct, [n])[n]
    # references written out: the arg-max's correctness, and the first-reached most frequent answer's
    ref_best = correct[np.arange(p), scores.argmax(1)].astype(float)
    ref_maj = np.empty(p)
    for i in range(p):
        counts = {a: answers[i].count(a) for a in answers[i]}
        top = max(counts.values())
        j = next(t for t, a in enumerate(answers[i]) if counts[a] == top)
        ref_maj[i] = correct[i, j]
    np.testing.assert_array_equal(best, ref_best)
    np.testing.assert_array_equal(maj, ref_maj)
    d = ref_best - ref_maj
    got = S.paired_difference(best, maj)
    assert got == pytest.approx((d.mean() * 100, d.std(ddof=1) / np.sqrt(p) * 100))
    # estimate_at_k is the mean of the same per-problem values; identical rules differ by exactly 0
    assert S.estimate_at_k("best", answers, scores, correct, [n])[n][0] == pytest.approx(ref_best.mean() * 100)
    assert S.paired_difference(best, best) == (0.0, 0.0)
    # the same seeded subsets for every rule: a paired difference of k-subsets is 0 for a rule and itself
    a2 = S.per_problem_at_k("best", answers, scores, correct, [2], draws=50, seed=3)[2]
    b2 = S.per_problem_at_k("best", answers, scores, correct, [2], draws=50, seed=3)[2]
    np.testing.assert_array_equal(a2, b2)
    with pytest.raises(ValueError, match=r"per_a, per_b: expected two \[P\] arrays"):
        S.paired_difference(best, maj[:-1])


def test_sampler_confidences_combine_the_recorded_arrays():
    rng = np.random.default_rng(3)
    lp = _softmax_logp(rng, 3, 6, 9)
    tok = rng.integers(0, 9, size=(3, 6))
    own = np.take_along_axis(lp, tok[..., None], -1)[..., 0]
    lengths = np.array([6, 3, 1])
    topk = -np.sort(-lp, -1)[..., :4]
    got = S.sampler_confidences(own, lp.mean(-1), topk, lengths, 9, window=2, tail=2)
    mask = np.arange(6)[None] < lengths[:, None]
    np.testing.assert_allclose(got["mean_logprob"], S.mean_logprob(own, mask))
    np.testing.assert_allclose(got["self_certainty"], S.self_certainty(lp.mean(-1), mask, 9))
    conf = -topk.mean(-1)
    for b, n in enumerate(lengths):
        x = conf[b, :n]
        assert got["tail"][b] == pytest.approx(x[-2:].mean())
        assert got["lowest_group"][b] == pytest.approx(min([x[i:i + 2].mean() for i in range(n - 1)] or [x.mean()]))


def test_selection_table_baselines_are_exact_and_rules_use_their_weights():
    rng = np.random.default_rng(4)
    p, n = 30, 4
    correct = rng.random((p, n)) < 0.5
    answers = [[("ok" if c else f"w{int(rng.integers(0, 2))}") for c in row] for row in correct]
    scores = {"s": rng.normal(size=(p, n))}
    tab = S.selection_table(answers, correct, scores, [1, 2, 4], temperatures={"s": 0.5}, draws=8)
    # random and oracle are exact expectations over all k-subsets
    for k in (1, 2, 4):
        oracle = np.mean([np.mean([correct[i, list(c)].any() for c in itertools.combinations(range(n), k)])
                          for i in range(p)]) * 100
        assert tab["oracle"][k][0] == pytest.approx(oracle)
        assert tab["random"][k][0] == pytest.approx(correct.mean() * 100)
    # at k = N every rule sees the whole set once: compare with the rule applied directly
    w = np.exp((scores["s"] - scores["s"].max(1, keepdims=True)) / 0.5)
    for rule, vals in (("best", scores["s"]), ("weighted", w), ("borda", scores["s"])):
        direct = np.mean([correct[i, S.RULES[rule](answers[i], vals[i])] for i in range(p)]) * 100
        assert tab[f"s/{rule}"][4][0] == pytest.approx(direct)
    assert set(tab) == {"random", "oracle", "majority", "s/best", "s/weighted", "s/filter_vote", "s/borda"}


def test_fit_temperature_maximises_the_weighted_vote_on_its_data():
    rng = np.random.default_rng(5)
    p, n = 40, 6
    correct = rng.random((p, n)) < 0.4
    answers = [[("ok" if c else f"w{int(rng.integers(0, 3))}") for c in row] for row in correct]
    scores = rng.normal(size=(p, n)) + 1.5 * correct  # informative
    grid = (0.05, 0.3, 1.0, 5.0)

    def acc(t):
        w = np.exp((scores - scores.max(1, keepdims=True)) / t)
        return np.mean([correct[i, _brute_weighted(answers[i], w[i])] for i in range(p)])

    t = S.fit_temperature(answers, correct, scores, grid)
    assert acc(t) == max(acc(g) for g in grid)
