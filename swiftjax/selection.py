"""Selection beyond Best-of-N: confidence scores from the sampler's own log-probs, voting rules
over any score, and Best-of-k estimated over random k-subsets of the N candidates.

Scores (higher = more confident), all from per-token quantities the sampler already has:

* ``mean_logprob``: the mean log-prob of the response's own tokens;
* ``self_certainty``: the mean over tokens of KL(uniform || p_t) = -log V - mean_v log p_t(v)
  (needs each step's mean log-prob over the vocabulary);
* DeepConf's token confidence ``c_t = -mean of the top-k log-probs of p_t``; its
  ``lowest_group`` confidence is the minimum over sliding windows of ``window`` tokens of the
  windows' mean c_t, and ``tail`` the mean c_t of the last ``tail`` tokens.

Rules over [P, N] candidates (``answers`` [P][N] hashable or None, ``correct`` [P, N] bool):
``best`` (the top score), ``majority`` (most frequent answer), ``weighted`` (the answer with the
largest sum of per-candidate weights), ``filter_vote`` (majority among the top ``q`` fraction by
score), ``borda`` (each candidate gives its answer ``N_k - rank`` points). Ties between answers
are broken by the first candidate (in generation order) that holds them; a rule that picks no
answer (every answer None) counts as wrong.

``estimate_at_k`` averages a rule's accuracy over ``draws`` random k-subsets of each problem's N
candidates (the same subsets for every rule, seeded) and reports the mean over problems with its
standard error: the first-k curve is one ordering's noise.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from swiftjax.bon import pass_at_k_rows

__all__ = [
    "mean_logprob", "self_certainty", "token_confidence", "lowest_group_confidence", "tail_confidence",
    "pick_best", "pick_majority", "pick_weighted", "pick_filter_vote", "pick_borda", "RULES",
    "softmax_weights", "estimate_at_k", "sampler_confidences", "fit_temperature",
    "selection_table", "format_selection", "SCORED_RULES", "per_problem_at_k", "paired_difference",
    "rule_inputs",
]


def _masked(values, mask):
    v = np.asarray(values, np.float64)
    m = np.asarray(mask, bool)
    if v.shape != m.shape:
        raise ValueError(f"mask: expected shape {v.shape}, got {m.shape}")
    return v, m


def mean_logprob(token_logprobs, mask) -> np.ndarray:
    """[B] mean of the response tokens' own log-probs; token_logprobs, mask [B, T]."""
    v, m = _masked(token_logprobs, mask)
    return np.where(m, v, 0.0).sum(-1) / np.maximum(m.sum(-1), 1)


def self_certainty(mean_vocab_logprob, mask, vocab_size: int) -> np.ndarray:
    """[B] mean over response tokens of KL(U || p_t) = -log V - mean_v log p_t(v).
    mean_vocab_logprob [B, T]: each step's mean log-prob over the V vocabulary entries."""
    v, m = _masked(mean_vocab_logprob, mask)
    kl = -np.log(vocab_size) - v
    return np.where(m, kl, 0.0).sum(-1) / np.maximum(m.sum(-1), 1)


def token_confidence(topk_logprobs) -> np.ndarray:
    """[B, T] DeepConf token confidence: minus the mean of each step's top-k log-probs [B, T, k]."""
    x = np.asarray(topk_logprobs, np.float64)
    if x.ndim != 3:
        raise ValueError(f"topk_logprobs: expected [B, T, k], got shape {x.shape}")
    return -x.mean(-1)


def lowest_group_confidence(conf, mask, window: int) -> np.ndarray:
    """[B] the minimum over sliding windows of ``window`` response tokens of their mean
    confidence (a response shorter than the window: its mean over all its tokens)."""
    c, m = _masked(conf, mask)
    if window < 1:
        raise ValueError(f"window: expected a positive int, got {window}")
    out = np.empty(c.shape[0])
    for b in range(c.shape[0]):
        x = c[b][m[b]]
        if x.size == 0:
            out[b] = 0.0
        elif x.size <= window:
            out[b] = x.mean()
        else:
            cs = np.concatenate([[0.0], np.cumsum(x)])
            out[b] = ((cs[window:] - cs[:-window]) / window).min()
    return out


def prefix_lowest_group(conf, window: int) -> np.ndarray:
    """[T] the lowest-group confidence of every prefix of one response's token confidences [T]:
    entry t equals :func:`lowest_group_confidence` of the first t + 1 tokens (the mean so far
    until a window is full, then the running minimum of the window means). Confidence-pruned
    sampling (DeepConf online) reads it at its checkpoints."""
    x = np.asarray(conf, np.float64)
    if x.ndim != 1:
        raise ValueError(f"conf: expected one response's [T] token confidences, got shape {x.shape}")
    if window < 1:
        raise ValueError(f"window: expected a positive int, got {window}")
    if x.size == 0:
        return x
    cs = np.concatenate([[0.0], np.cumsum(x)])
    t = np.arange(1, x.size + 1)
    out = cs[1:] / t
    if x.size >= window:
        means = (cs[window:] - cs[:-window]) / window  # window ending at token window-1+i
        out[window - 1:] = np.minimum.accumulate(means)
    return out


def tail_confidence(conf, mask, tail: int) -> np.ndarray:
    """[B] mean confidence of the last ``tail`` response tokens."""
    c, m = _masked(conf, mask)
    if tail < 1:
        raise ValueError(f"tail: expected a positive int, got {tail}")
    out = np.empty(c.shape[0])
    for b in range(c.shape[0]):
        x = c[b][m[b]]
        out[b] = x[-tail:].mean() if x.size else 0.0
    return out


# ----------------------------------------------------------------------------- rules
# A rule maps (answers [n] of hashable|None, scores [n] float) -> the index of the picked
# candidate (whose correctness counts) or None.


def _first_holder(answers, best_answer):
    return next(i for i, a in enumerate(answers) if a == best_answer)


def pick_best(answers, scores, **_) -> int | None:
    return int(np.argmax(scores)) if len(scores) else None


def _vote(answers, weights) -> int | None:
    totals: dict[Hashable, float] = {}
    order: list[Hashable] = []
    for a, w in zip(answers, weights):
        if a is None:
            continue
        if a not in totals:
            totals[a] = 0.0
            order.append(a)
        totals[a] += float(w)
    if not totals:
        return None
    top = max(totals.values())
    winner = next(a for a in order if totals[a] == top)  # first answer (generation order) among ties
    return _first_holder(answers, winner)


def pick_majority(answers, scores=None, **_) -> int | None:
    return _vote(answers, np.ones(len(answers)))


def pick_weighted(answers, scores, **_) -> int | None:
    """The answer with the largest sum of weights (``scores`` must be weights >= 0)."""
    return _vote(answers, scores)


def pick_filter_vote(answers, scores, q: float = 0.5, **_) -> int | None:
    """Majority vote among the top ``ceil(q * n)`` candidates by score (ties: earlier first)."""
    n = len(answers)
    keep = max(1, int(np.ceil(q * n)))
    top = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:keep]
    mask = np.zeros(n, bool)
    mask[top] = True
    return _vote([a if mask[i] else None for i, a in enumerate(answers)], np.ones(n))


def pick_borda(answers, scores, **_) -> int | None:
    """Each candidate gives its answer n - rank points (rank 0 = the best score)."""
    n = len(answers)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    points = np.empty(n)
    points[order] = n - np.arange(n)
    return _vote(answers, points)


RULES: dict[str, Callable] = {"best": pick_best, "majority": pick_majority, "weighted": pick_weighted,
                              "filter_vote": pick_filter_vote, "borda": pick_borda}


def softmax_weights(scores, temperature: float) -> np.ndarray:
    """Per-problem softmax of scores [P, N] at ``temperature`` (a calibrated vote weight). A vote
    does not change under a per-problem factor, so these weights also serve any k-subset."""
    s = np.asarray(scores, np.float64) / float(temperature)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def rule_inputs(scores, rule: str, temperature: float = 1.0):
    """What a scored ``rule`` ranks or votes with: :func:`softmax_weights` of ``scores`` at
    ``temperature`` for ``weighted``, the scores themselves for the other rules."""
    return softmax_weights(scores, temperature) if rule == "weighted" else scores


def _per_problem(values: np.ndarray) -> tuple[float, float]:
    p = len(values)
    se = values.std(ddof=1) / np.sqrt(p) if p > 1 else 0.0
    return float(values.mean() * 100), float(se * 100)


def per_problem_at_k(rule: str | Callable, answers: Sequence[Sequence], scores, correct, ks: Sequence[int], *,
                     draws: int = 200, seed: int = 0, **rule_kw) -> dict[int, np.ndarray]:
    """{k: [P] accuracy in [0, 1] of ``rule`` on each problem, over random k-subsets of its N.

    For each problem, ``draws`` subsets of size k (k = N: the full set once) are drawn with a
    seeded generator: the same subsets for every rule and score given the seed, so two rules'
    per-problem values can be compared pairwise (:func:`paired_difference`)."""
    fn = RULES[rule] if isinstance(rule, str) else rule
    correct = np.asarray(correct, bool)
    p, n = correct.shape
    scores = np.zeros((p, n)) if scores is None else np.asarray(scores, np.float64)
    if scores.shape != (p, n) or len(answers) != p:
        raise ValueError(f"scores, answers: expected [{p}, {n}], got {scores.shape} and {len(answers)} rows")
    out = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"ks: expected values in [1, {n}], got {k}")
        rng = np.random.default_rng([seed, k])
        per = np.empty(p)
        for i in range(p):
            subsets = [np.arange(n)] if k == n else [rng.choice(n, size=k, replace=False) for _ in range(draws)]
            hits = []
            for sub in subsets:
                j = fn([answers[i][t] for t in sub], scores[i, sub], **rule_kw)
                hits.append(bool(j is not None and correct[i, sub[j]]))
            per[i] = np.mean(hits)
        out[int(k)] = per
    return out


def estimate_at_k(rule: str | Callable, answers: Sequence[Sequence], scores, correct, ks: Sequence[int], *,
                  draws: int = 200, seed: int = 0, **rule_kw) -> dict[int, tuple[float, float]]:
    """{k: (accuracy %, standard error %)} of ``rule`` over random k-subsets: the mean over
    problems of :func:`per_problem_at_k`, and the problems' standard deviation / sqrt(P)."""
    per = per_problem_at_k(rule, answers, scores, correct, ks, draws=draws, seed=seed, **rule_kw)
    return {k: _per_problem(v) for k, v in per.items()}


def paired_difference(per_a, per_b) -> tuple[float, float]:
    """(mean difference, standard error) in percentage points between two rules' per-problem
    accuracies on the same problems (and subsets): the standard error of the per-problem
    differences, which is smaller than the unpaired one when the rules agree on most problems."""
    a, b = np.asarray(per_a, np.float64), np.asarray(per_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per_a, per_b: expected two [P] arrays, got {list(a.shape)} and {list(b.shape)}")
    return _per_problem(a - b)


# ----------------------------------------------------------------------------- from the sampler


def sampler_confidences(token_logprobs, mean_vocab_logprob, topk_logprobs, lengths, vocab_size: int, *,
                        window: int, tail: int) -> dict[str, np.ndarray]:
    """The confidence scores of sampled rows from what the sampler recorded (no extra forward).

    token_logprobs, mean_vocab_logprob [B, T]; topk_logprobs [B, T, k]; lengths [B] (tokens
    generated, the end token included). Returns {name: [B]} for ``mean_logprob``,
    ``self_certainty``, ``lowest_group`` (window ``window``) and ``tail`` (last ``tail`` tokens).
    """
    lp = np.asarray(token_logprobs, np.float64)
    mask = np.arange(lp.shape[1])[None, :] < np.asarray(lengths)[:, None]
    conf = token_confidence(topk_logprobs)
    return {"mean_logprob": mean_logprob(lp, mask),
            "self_certainty": self_certainty(mean_vocab_logprob, mask, vocab_size),
            "lowest_group": lowest_group_confidence(conf, mask, window),
            "tail": tail_confidence(conf, mask, tail)}


# ----------------------------------------------------------------------------- tables

SCORED_RULES = ("best", "weighted", "filter_vote", "borda")
TEMPERATURE_GRID = tuple(float(t) for t in np.logspace(-2, 1, 13))


def fit_temperature(answers, correct, scores, grid: Sequence[float] = TEMPERATURE_GRID) -> float:
    """The softmax temperature of a score's vote weights that maximises weighted-vote accuracy
    over all N candidates of the given (training) problems; ties go to the larger T."""
    n = np.shape(correct)[1]
    best_t, best_acc = None, -1.0
    for t in sorted(grid, reverse=True):
        acc = estimate_at_k("weighted", answers, softmax_weights(scores, t), correct, [n])[n][0]
        if acc > best_acc:
            best_t, best_acc = t, acc
    return float(best_t)


def selection_table(answers, correct, scores: dict, ks: Sequence[int], *, temperatures: dict | None = None,
                    q: float = 0.5, draws: int = 64, seed: int = 0) -> dict[str, dict[int, tuple[float, float]]]:
    """Every rule over every score, as {curve: {k: (accuracy %, standard error %)}}.

    Curves: ``random`` (exact: the mean correctness), ``oracle`` (exact unbiased pass@k),
    ``majority``, and ``<score>/<rule>`` for each score and rule of :data:`SCORED_RULES`
    (``weighted`` votes with :func:`softmax_weights` at ``temperatures[score]``, default 1).
    Rules over subsets use :func:`estimate_at_k` (the same seeded subsets for every curve)."""
    correct = np.asarray(correct, bool)
    p, n = correct.shape
    out = {"random": {k: _per_problem(correct.mean(1)) for k in ks},
           "oracle": {k: _per_problem(pass_at_k_rows(correct, k)) for k in ks},
           "majority": estimate_at_k("majority", answers, None, correct, ks, draws=draws, seed=seed)}
    for name, s in scores.items():
        s = np.asarray(s, np.float64)
        if s.shape != (p, n):
            raise ValueError(f"scores[{name!r}]: expected shape [{p}, {n}], got {list(s.shape)}")
        t = (temperatures or {}).get(name, 1.0)
        for rule in SCORED_RULES:
            out[f"{name}/{rule}"] = estimate_at_k(rule, answers, rule_inputs(s, rule, t), correct, ks, draws=draws,
                                                  seed=seed, q=q)
    return out


def format_selection(table: dict, ks: Sequence[int]) -> str:
    """A plain-text table: one curve per line, accuracy +- standard error at each k."""
    width = max(len(c) for c in table) + 2
    lines = [f"{'curve':<{width}}" + "".join(f"{'@' + str(k):>14}" for k in ks)]
    for curve, vals in table.items():
        lines.append(f"{curve:<{width}}" + "".join(f"{vals[k][0]:>8.1f} ±{vals[k][1]:>4.1f}" for k in ks))
    return "\n".join(lines)
