"""Best-of-N selection and metrics.

Every metric works on a candidate pool of shape [P, N]: P prompts, N candidates per
prompt in *generation order*. "@k" always means "the first k candidates", never a
random subset, so a curve over k is what one would have got by generating only k.

Metrics (all return ``{k: accuracy in %}``):

- :func:`best_of_n`       arg-max of a score among the first k (ties to the earliest).
- :func:`random_at_k`     expected accuracy of a uniformly random pick among the first k.
- :func:`majority_at_k`   majority vote over final answers among the first k.
- :func:`oracle_at_k`     any correct among the first k.
- :func:`pass_at_k`       the unbiased pass@k estimator over all N samples (Chen et al., 2021).
- :func:`best_of_n_combined`  an intrinsic score combined with an external RM's score
  (``ranking`` or ``scaling``), the combination done inside each first-k group.

The selection is done in NumPy on the caller's dtype (no float32 rounding that could
turn two distinct float64 scores into a tie); it is bookkeeping over [P, N] arrays,
not a hot path. :func:`select_best` is the jittable JAX counterpart for use inside
a jitted program.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax._checks import check_rank, check_same_shape

__all__ = [
    "default_ks",
    "select_best",
    "best_of_n",
    "random_at_k",
    "majority_at_k",
    "oracle_at_k",
    "pass_at_k",
    "pass_at_k_rows",
    "rank_desc",
    "combine_ranking",
    "combine_scaling",
    "best_of_n_combined",
    "bon_table",
]


# ----------------------------------------------------------------------------- checks


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself: n=8 -> [1, 2, 4, 8]; n=6 -> [1, 2, 4, 6]."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(int(n))
    return ks


def _check_ks(ks, n: int) -> list[int]:
    if ks is None:
        return default_ks(n)
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool):
        ks = [ks]
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"ks: expected ints in 1..{n}, got {k!r} ({type(k).__name__})")
        if not 1 <= int(k) <= n:
            raise ValueError(f"ks: expected ints in 1..N={n}, got {int(k)}")
        out.append(int(k))
    if not out:
        raise ValueError("ks: expected at least one k, got an empty sequence")
    return out


def _as_correct(correct, name: str = "correct") -> np.ndarray:
    arr = np.asarray(correct)
    check_rank(arr, name, 2, "[P, N]")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty [P, N] array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name}: expected booleans (or 0/1), got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name}: expected booleans (or 0/1), found other values")
    return arr.astype(bool)


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores)
    check_rank(arr, name, 2, "[P, N]")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name}: expected a real-valued [P, N] array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        p, n = np.argwhere(np.isnan(arr))[0]
        raise ValueError(f"{name}: expected no NaN scores, found NaN at prompt {p}, candidate {n}")
    return arr


def _pct(x: np.ndarray) -> float:
    return float(100.0 * np.mean(x))


# ----------------------------------------------------------------------------- selection


@jax.jit
def select_best(scores: jax.Array) -> jax.Array:
    """Index of the best candidate per prompt: [P, N] -> [P] int32 (ties to the earliest).

    Jittable counterpart of the selection in :func:`best_of_n`; slice ``scores[:, :k]``
    before calling it for BoN@k.
    """
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _pick(scores_k: np.ndarray) -> np.ndarray:
    # np.argmax returns the first maximal index: ties go to the earliest candidate.
    return np.argmax(scores_k, axis=1)


def best_of_n(scores, correct, ks=None) -> dict[int, float]:
    """Best-of-N accuracy (%) for each k.

    For each prompt take the first k candidates in generation order, pick the one with
    the highest score (ties to the lowest index), and count the prompt solved if the
    pick is correct.

    Args:
      scores: [P, N] real scores (higher is better); NaN raises, +-inf is allowed.
      correct: [P, N] booleans (or 0/1).
      ks: ints in 1..N (default: :func:`default_ks` of N).
    Returns:
      {k: accuracy in percent} in the order of ``ks``.
    """
    correct = _as_correct(correct)
    check_rank(scores, "scores", 2, "[P, N]")
    check_same_shape(correct, scores, "correct", "scores")
    scores = _as_scores(scores)
    ks = _check_ks(ks, correct.shape[1])
    rows = np.arange(correct.shape[0])
    return {k: _pct(correct[rows, _pick(scores[:, :k])]) for k in ks}


def random_at_k(correct, ks=None) -> dict[int, float]:
    """Expected accuracy (%) of a uniformly random pick among the first k: mean(correct[:, :k])."""
    correct = _as_correct(correct)
    ks = _check_ks(ks, correct.shape[1])
    return {k: _pct(correct[:, :k].mean(axis=1)) for k in ks}


def oracle_at_k(correct, ks=None) -> dict[int, float]:
    """Accuracy (%) of an oracle: a prompt counts if any of its first k candidates is correct."""
    correct = _as_correct(correct)
    ks = _check_ks(ks, correct.shape[1])
    return {k: _pct(correct[:, :k].any(axis=1)) for k in ks}


def _majority_pick(answers_k: Sequence[Hashable | None]) -> int | None:
    """Index of the first occurrence of the winning answer, or None if all are None."""
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, a in enumerate(answers_k):
        if a is None:
            continue
        if a not in counts:
            counts[a] = 0
            first[a] = i
        counts[a] += 1
    if not counts:
        return None
    # max count; among equal counts the answer that appeared first (dicts keep insertion order
    # and max returns the first maximal item).
    best = max(counts, key=lambda a: counts[a])
    return first[best]


def majority_at_k(answers, correct, ks=None) -> dict[int, float]:
    """Majority-vote accuracy (%) over final answers among the first k candidates.

    Rules: the answer given by the most of the first k candidates wins; ``None`` answers
    (no extractable answer) never vote, and a prompt whose first k answers are all
    ``None`` counts as incorrect. Ties between answers with equal counts go to the
    answer whose first occurrence is earliest. The prompt is solved if the candidate at
    that first occurrence is correct. Answers are compared with ``==``/``hash``, so
    normalise them first (e.g. :func:`swiftjax.data.math.answer_key`).

    Args:
      answers: P sequences of N hashable answers or None.
      correct: [P, N] booleans.
      ks: ints in 1..N.
    """
    correct = _as_correct(correct)
    p, n = correct.shape
    if isinstance(answers, np.ndarray) and answers.ndim == 2:
        answers = answers.tolist()
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
        raise ValueError(f"answers: expected P={p} sequences of N={n} answers, got {type(answers).__name__}")
    if len(answers) != p:
        raise ValueError(f"answers: expected P={p} rows (same as correct), got {len(answers)}")
    for i, row in enumerate(answers):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != n:
            got = len(row) if isinstance(row, Sequence) else type(row).__name__
            raise ValueError(f"answers[{i}]: expected N={n} answers, got {got}")
        for j, a in enumerate(row):
            if a is not None and not isinstance(a, Hashable):
                raise ValueError(f"answers[{i}][{j}]: expected a hashable answer or None, got {type(a).__name__}")
    ks = _check_ks(ks, n)
    out = {}
    for k in ks:
        hits = np.zeros(p, dtype=bool)
        for i in range(p):
            j = _majority_pick(answers[i][:k])
            hits[i] = j is not None and correct[i, j]
        out[k] = _pct(hits)
    return out


def pass_at_k(correct, ks=None) -> dict[int, float]:
    """Unbiased pass@k (%) from all N samples per prompt (Chen et al., 2021).

    For a prompt with c correct among n samples, pass@k = 1 - C(n-c, k) / C(n, k), computed
    as 1 - prod_{i=n-c+1}^{n} (1 - k/i); averaged over prompts. Unlike the "first k"
    metrics this uses every sample, so it is the expectation of oracle@k over random
    k-subsets.
    """
    correct = _as_correct(correct)
    ks = _check_ks(ks, correct.shape[1])
    return {k: _pct(pass_at_k_rows(correct, k)) for k in ks}


def pass_at_k_rows(correct, k: int) -> np.ndarray:
    """[P] per-prompt unbiased pass@k in [0, 1]: 1 - C(n - c, k) / C(n, k) for c correct of n."""
    correct = np.asarray(correct, bool)
    n = correct.shape[1]
    out = np.empty(correct.shape[0])
    for i, ci in enumerate(correct.sum(axis=1)):
        out[i] = 1.0 if n - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - ci + 1, n + 1, dtype=np.float64)))
    return out


# ----------------------------------------------------------------------------- combination


def rank_desc(scores) -> np.ndarray:
    """Competition rank of each candidate within its row, 0 = best: [P, N] -> [P, N] int.

    rank[p, i] = number of candidates in row p with a strictly higher score, so tied
    scores share the better rank.
    """
    s = _as_scores(scores)
    return (s[:, None, :] > s[:, :, None]).sum(axis=-1)


def combine_ranking(scores, external) -> np.ndarray:
    """Rank combination of two scores: [P, N], [P, N] -> combined score [P, N] (higher is better).

    Each candidate's combined rank is the worse (larger) of its ranks under the two scores
    (:func:`rank_desc`, ties share the better rank); the best combined rank wins, ties to
    the earliest candidate. Returned as ``-combined_rank`` (float64) so that an arg-max
    (:func:`best_of_n`) applies the rule. Ranks depend on the group: for BoN@k combine
    ``scores[:, :k]`` with ``external[:, :k]`` (:func:`best_of_n_combined` does).
    """
    check_rank(scores, "scores", 2, "[P, N]")
    check_same_shape(scores, external, "scores", "external")
    r = np.maximum(rank_desc(_as_scores(scores)), rank_desc(_as_scores(external, "external")))
    return -r.astype(np.float64)


def _minmax(x: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: expected finite scores for min-max scaling, found inf")
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    span = hi - lo
    const = span == 0
    out = (x - lo) / np.where(const, 1.0, span)
    return np.where(const, 1.0, out)


def combine_scaling(scores, external) -> np.ndarray:
    """Scaling combination: [P, N], [P, N] -> combined score [P, N] in [0, 1].

    Each score is min-max scaled to [0, 1] within its row (a constant row scales to 1),
    and the two are averaged; arg-max (ties to the earliest) picks. Like
    :func:`combine_ranking` it depends on the group, so combine the first-k slice for BoN@k.
    """
    check_rank(scores, "scores", 2, "[P, N]")
    check_same_shape(scores, external, "scores", "external")
    s = _minmax(_as_scores(scores).astype(np.float64), "scores")
    e = _minmax(_as_scores(external, "external").astype(np.float64), "external")
    return 0.5 * (s + e)


_COMBINE = {"ranking": combine_ranking, "scaling": combine_scaling}


def best_of_n_combined(scores, external, correct, ks=None, mode: str = "ranking") -> dict[int, float]:
    """BoN accuracy (%) with ``scores`` combined with an external RM's ``external`` scores.

    For each k the combination (``mode`` 'ranking' or 'scaling') is computed within the first
    k candidates of each prompt, then the arg-max (ties to the earliest) is taken.

    Args:
      scores, external: [P, N] real scores (NaN raises).
      correct: [P, N] booleans.
      ks: ints in 1..N.
      mode: 'ranking' | 'scaling'.
    """
    if mode not in _COMBINE:
        raise ValueError(f"mode: expected one of {sorted(_COMBINE)}, got {mode!r}")
    correct = _as_correct(correct)
    check_rank(scores, "scores", 2, "[P, N]")
    check_same_shape(correct, scores, "correct", "scores")
    check_same_shape(correct, external, "correct", "external")
    scores = _as_scores(scores)
    external = _as_scores(external, "external")
    ks = _check_ks(ks, correct.shape[1])
    rows = np.arange(correct.shape[0])
    fn = _COMBINE[mode]
    return {k: _pct(correct[rows, _pick(fn(scores[:, :k], external[:, :k]))]) for k in ks}


# ----------------------------------------------------------------------------- table


def _json_keys(d: Mapping[int, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in d.items()}


def bon_table(
    correct,
    scores: Mapping[str, Any] | None = None,
    answers=None,
    ks=None,
    combos: Mapping[str, tuple[str, str, str]] | None = None,
) -> dict[str, dict[str, float]]:
    """All Best-of-N curves of one candidate pool, JSON-ready (string keys "1", "2", ...).

    Args:
      correct: [P, N] booleans.
      scores: {name: [P, N] scores}; each gets a BoN curve under its name.
      answers: P x N final answers (hashable or None); adds "majority" when given.
      ks: ints in 1..N (default: :func:`default_ks`).
      combos: {out_name: (score_name, external_name, mode)} combined curves
        (:func:`best_of_n_combined`), names referring to ``scores``.
    Returns:
      {"random": {...}, "oracle": {...}, ["majority": {...}], name: {...}, ...}, each
      {"k": accuracy %}.
    """
    correct = _as_correct(correct)
    ks = _check_ks(ks, correct.shape[1])
    table: dict[str, dict[str, float]] = {
        "random": _json_keys(random_at_k(correct, ks)),
        "oracle": _json_keys(oracle_at_k(correct, ks)),
    }
    if answers is not None:
        table["majority"] = _json_keys(majority_at_k(answers, correct, ks))
    scores = dict(scores or {})
    for name, s in scores.items():
        if name in table:
            raise ValueError(f"scores: name {name!r} collides with a baseline curve")
        table[name] = _json_keys(best_of_n(s, correct, ks))
    for out_name, spec in (combos or {}).items():
        if not (isinstance(spec, (tuple, list)) and len(spec) == 3):
            raise ValueError(f"combos[{out_name!r}]: expected (score_name, external_name, mode), got {spec!r}")
        a, b, mode = spec
        for nm in (a, b):
            if nm not in scores:
                raise ValueError(f"combos[{out_name!r}]: expected a name in scores {sorted(scores)}, got {nm!r}")
        if out_name in table:
            raise ValueError(f"combos: name {out_name!r} collides with another curve")
        table[out_name] = _json_keys(best_of_n_combined(scores[a], scores[b], correct, ks, mode))
    return table

