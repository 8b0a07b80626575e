"""SWIFT-pruned sampling: at fixed checkpoints of decoding, each problem's live candidates
with the lowest running SWIFT score stop, so the batch's remaining steps go to the
promising ones (the same mechanism over a confidence score is DeepConf's online variant).

One decision rule, :func:`drop_lowest`, serves both the jitted decoding loop
(:func:`swiftjax.methods.swift.features.generate_with_scores` with ``prune=``) and
:func:`replay`, which applies it offline to the prefix scores of already-sampled candidates:
rows never see each other and the sampler's random stream does not depend on which rows are
live, so pruning online keeps exactly the candidates the replay keeps.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

__all__ = ["PruneConfig", "drop_lowest", "replay", "pruned_best_of_n"]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """every: a checkpoint after every ``every`` generated tokens; fraction: the share of a
    problem's live candidates stopped at each checkpoint (rounded down); min_keep: never stop
    a problem's last ``min_keep`` live candidates."""

    every: int = 16
    fraction: float = 0.5
    min_keep: int = 1

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"prune.every: expected a positive int, got {self.every!r}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"prune.fraction: expected a fraction in [0, 1), got {self.fraction!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int) or self.min_keep < 1:
            raise ValueError(f"prune.min_keep: expected a positive int, got {self.min_keep!r}")


def drop_lowest(scores, live, fraction: float, min_keep: int):
    """[P, G] bool: the live candidates to stop. Per problem (row), the
    ``min(floor(fraction * live), live - min_keep)`` live candidates with the lowest scores
    (ties: the earlier candidate first). scores [P, G] float, live [P, G] bool."""
    scores = jnp.asarray(scores, jnp.float32)
    live = jnp.asarray(live, bool)
    n_live = live.sum(-1, keepdims=True)
    n_drop = jnp.clip(jnp.floor(fraction * n_live.astype(jnp.float32)).astype(jnp.int32), 0,
                      jnp.maximum(n_live - min_keep, 0))
    key = jnp.where(live, scores, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1, stable=True)
    return live & (rank < n_drop)


def replay(prefix, lengths, finished, cfg: PruneConfig) -> np.ndarray:
    """When each candidate would have been stopped: [P, N] step index (-1: never).

    prefix [P, N, T]: the running score after each generated token (constant after the end);
    lengths [P, N]: tokens generated unpruned (the end token included); finished [P, N]: the
    candidate emitted an end token."""
    prefix = np.asarray(prefix, np.float32)
    lengths = np.asarray(lengths)
    finished = np.asarray(finished, bool)
    p, n, t = prefix.shape
    stopped = np.full((p, n), -1)
    for c in range(cfg.every - 1, t, cfg.every):
        done = (finished & (lengths - 1 <= c)) | (stopped >= 0) | (lengths - 1 < c)
        drop = np.asarray(drop_lowest(prefix[:, :, c], ~done, cfg.fraction, cfg.min_keep))
        stopped[drop] = c
    return stopped


def pruned_best_of_n(prefix, final, lengths, finished, correct, cfg: PruneConfig, answers=None) -> dict:
    """Accuracy (%) of Best-of-N by the final score among the candidates pruning keeps, and the
    tokens generated (pruned candidates count up to their checkpoint) against plain sampling.
    With ``answers`` [P][N] also ``vote_accuracy``: majority vote among the kept candidates."""
    from swiftjax.selection import pick_majority

    stopped = replay(prefix, lengths, finished, cfg)
    kept = stopped < 0
    tokens = np.where(kept, lengths, stopped + 1)
    pick = np.argmax(np.where(kept, np.asarray(final, np.float64), -np.inf), axis=1)
    correct = np.asarray(correct, bool)
    hits = correct[np.arange(len(pick)), pick]
    p = len(pick)
    extra = {}
    if answers is not None:
        votes = []
        for i in range(p):
            idx = np.flatnonzero(kept[i])
            j = pick_majority([answers[i][t] for t in idx])
            votes.append(bool(j is not None and correct[i, idx[j]]))
        votes = np.array(votes)
        extra = {"vote_accuracy": float(votes.mean() * 100),
                 "vote_se": float(votes.std(ddof=1) / np.sqrt(p) * 100) if p > 1 else 0.0}
    return {**extra, "accuracy": float(hits.mean() * 100),
            "se": float(hits.std(ddof=1) / np.sqrt(p) * 100) if p > 1 else 0.0,
            "tokens": int(tokens.sum()), "tokens_plain": int(np.asarray(lengths).sum()),
            "token_fraction": float(tokens.sum() / max(int(np.asarray(lengths).sum()), 1)),
            "kept_per_problem": float(kept.sum(1).mean())}
