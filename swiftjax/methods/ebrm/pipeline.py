"""EBRM for any (Backbone, Task): a conventional reward model trained with label noise, refined
by EBRM; and the same refinement over SWIFT. The method: docs/ebrm.md.

    swiftjax ebrm run    CONFIG [key=value ...]     # e.g. configs/ebrm.yaml
    swiftjax ebrm refine CANDIDATES.jsonl --features FEATURES.npz --ebrm DIR [--out OUT.jsonl]

``ebrm run`` (:func:`run`), for each label-noise level (``noise_levels``):

1. candidates: ``n_train`` (train split) and ``n`` (test split) sampled responses per problem,
   from :func:`swiftjax.sample.candidate_set` (keyed by the backbone, the task and the sampling
   settings: a SWIFT run with the same settings and ``cache`` shares them). With
   ``pairs.demonstrations``, each training problem's worked solution (the task's
   demonstration, graded by the task) joins its candidates: the positive side of the pairs
   when the backbone rarely solves a problem itself;
2. training pairs = (correct, incorrect) responses of the same training problem, with an
   exact, seeded fraction of them swapped (:func:`swiftjax.methods.ebrm.reward_model.flip_pairs`);
3. a reward model (the backbone's body + a scalar head on the last token) trained with
   Bradley–Terry on those noisy pairs; (e, r0) of every training and test response;
4. EBRM (:func:`ebrm_on_arrays`): the conflict filter on the noisy training pairs, rewards
   normalised with the kept responses' statistics, the energy net trained with NCE+, test
   rewards refined (hybrid init, averaged over seeds);
5. preference accuracy on the clean held-out pairs (test problems' correct vs incorrect
   candidates; ties count wrong) and Best-of-N accuracy, base RM vs EBRM.

EBRM over SWIFT takes precomputed arrays (``swift.features``: an npz with ``e_train``,
``r0_train``, ``pairs_train``, ``e_test``, ``r0_test``, ``correct_test``; e = the gate-weighted
mean feature, :func:`swiftjax.methods.swift.head.pooled_features`, r0 =
:func:`swiftjax.methods.swift.head.score`), or computes them here from a trained SWIFT head
(``swift.head``, trained on the same backbone) over the same candidates, and runs the same
:func:`ebrm_on_arrays`.

Outputs under ``out``: ``results.json`` (with the backbone's and the task's description),
``results.md`` (the table), and per noise level ``noise_<level>/``: RM and EBRM metrics (jsonl),
``train_features.npz`` (e, r0, clean and noisy pairs, flip mask), ``test_features.npz`` (e, r0,
prompt_id, index), ``ebrm/`` (the energy net: ``ebrm.json`` + an orbax checkpoint) and
``test_scored.jsonl`` (candidates with scores ``rm`` and ``ebrm``). ``ebrm refine``
(:func:`score_refine_main`) re-applies a saved ``ebrm/`` to stored features.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax import bon
from swiftjax._io import atomic_file
from swiftjax.backbone import Backbone, BackboneConfig, load_backbone
from swiftjax.batching import epoch_batches
from swiftjax.config import build, parse_typed, subcommand, to_plain
from swiftjax.data import candidates as cands
from swiftjax.methods.ebrm import energy as ebrm
from swiftjax.methods.ebrm.reward_model import (RMTrainConfig, check_pairs, flip_pairs, init_reward_model,
                                                score_responses, train_reward_model)
from swiftjax.methods.swift import features as feats
from swiftjax.methods.swift import head as swift_head
from swiftjax.methods.swift.head_io import load_head
from swiftjax.sample import SamplingSection, candidate_set, check_writable, demonstration_rows
from swiftjax.tasks import Task, TaskConfig, make_task
from swiftjax.train import loop
from swiftjax.train.ckpt import Checkpointer
from swiftjax.train.metrics import JsonlWriter

__all__ = [
    "EbrmRunConfig",
    "PairsSection",
    "RMSection",
    "SwiftSection",
    "EBRMTrainConfig",
    "RefineConfig",
    "backbone_of",
    "training_rows",
    "order_rows",
    "encode_rows",
    "candidate_pairs",
    "preference_accuracy",
    "evaluate_scores",
    "filter_training_set",
    "train_ebrm",
    "refine_scores",
    "ebrm_on_arrays",
    "save_ebrm",
    "load_ebrm",
    "load_swift_arrays",
    "swift_arrays",
    "write_swift_arrays",
    "results_markdown",
    "run",
    "main",
    "score_refine_main",
]


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class EBRMTrainConfig:
    """Energy-net sizes and NCE+ training (hashable). ``filter``: the conflict filter on/off;
    ``shuffle``: reshuffle every epoch (the reference does not shuffle).

    Defaults are for the world's small data (a few thousand responses, ~300 steps), not the
    reference's (dropout 0.5, lr 9e-5, M 768): on e ~ N(0, I_128) with r0 linear in e (as for
    an RM head), 120 steps with dropout 0.5 left the hybrid-initialised refinement nearly
    unrelated to r0 (Spearman 0.1-0.2), while dropout 0.1 and lr 3e-3 gave 0.98.
    """

    r_hidden: tuple[int, ...] = (16, 32, 64)
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    filter: bool = True
    num_neg: int = 128
    stds: tuple[float, ...] = (3.5,)
    beta: float = 0.1
    lam: float = 0.05
    lr: float = 3e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    epochs: int | None = 20
    max_steps: int | None = None
    shuffle: bool = True

    def __post_init__(self):
        object.__setattr__(self, "stds", tuple(float(s) for s in self.stds))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"ebrm.batch_size: expected a positive int, got {self.batch_size!r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("ebrm: expected epochs or max_steps (or both), got neither")

    def net(self, embed_dim: int) -> ebrm.EBRMConfig:
        return ebrm.EBRMConfig(embed_dim=int(embed_dim), r_hidden=self.r_hidden, hidden=self.hidden,
                               dropout=self.dropout)


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Inference settings (:func:`swiftjax.methods.ebrm.energy.refine`); ``seeds``: runs averaged (one with
    init 'base', which is deterministic)."""

    steps: int = 50
    lr0: float = 0.5
    eta: float = 0.2
    min_lr: float = 1e-6
    init: str = "hybrid"
    seeds: int = 5

    def __post_init__(self):
        if self.init not in ebrm.INIT_MODES:
            raise ValueError(f"refine.init: expected one of {ebrm.INIT_MODES}, got {self.init!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"refine.seeds: expected a positive int, got {self.seeds!r}")


@dataclasses.dataclass(frozen=True)
class PairsSection:
    """Training pairs. ``max_per_problem``: a seeded subset of (correct, incorrect) pairs per
    problem (null: all); ``flip_seed``: which pairs get their label flipped;
    ``demonstrations``: add each training problem's demonstration solution to its candidates."""

    max_per_problem: int | None = 8
    seed: int = 0
    flip_seed: int = 0
    demonstrations: bool = False

    def __post_init__(self):
        if self.max_per_problem is not None and self.max_per_problem < 1:
            raise ValueError(f"max_per_problem: expected a positive int or null, got {self.max_per_problem}")


@dataclasses.dataclass(frozen=True)
class RMSection:
    """The reward model: the backbone's body + a scalar head (``head_seed``, ``head_init_std``),
    trained with Bradley–Terry (:class:`swiftjax.methods.ebrm.reward_model.RMTrainConfig`).
    ``max_len``: the teacher-forced width of prompt + response (null: the longest, rounded up
    to a multiple of 8); ``seed``: the batch order (the same for every noise level)."""

    max_len: int | None = None
    head_seed: int = 0
    head_init_std: float = 0.02
    train_last_layers: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int | None = 1
    max_steps: int | None = None
    warmup_steps: int = 20
    clip_norm: float | None = 1.0
    seed: int = 0
    score_batch_size: int = 256

    def __post_init__(self):
        self.train_config()  # RMTrainConfig's own checks
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len: expected an int >= 2 or null, got {self.max_len}")
        if self.score_batch_size < 1:
            raise ValueError(f"score_batch_size: expected a positive int, got {self.score_batch_size}")
        if self.head_init_std < 0:
            raise ValueError(f"head_init_std: expected a number >= 0, got {self.head_init_std}")

    def train_config(self) -> RMTrainConfig:
        return RMTrainConfig(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                             epochs=self.epochs, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                             clip_norm=self.clip_norm, train_last_layers=self.train_last_layers, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class SwiftSection:
    """EBRM over SWIFT: ``features`` (precomputed arrays, see the module doc) or ``head`` (a
    SWIFT head trained on the same backbone, e.g. runs/demo/head); both null: skipped."""

    features: str | None = None
    head: str | None = None


@dataclasses.dataclass(frozen=True)
class EbrmRunConfig:
    """Every default of ``ebrm run``; YAML files and ``key=value`` overrides only override.

    model: an HF causal-LM directory, or ``world`` (the shipped world model).
    template / system / dtype: how the backbone is prompted (:class:`swiftjax.backbone.BackboneConfig`).
    n / n_train: candidates per test / training problem (n_train null: n).
    cache: where candidate sets are kept (null: ``out``).
    """

    model: str = "world"
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"
    task: TaskConfig = TaskConfig()
    out: str = "runs/ebrm"
    cache: str | None = None
    seed: int = 0
    progress: bool = True
    noise_levels: tuple[float, ...] = (0.0, 0.2, 0.4)
    n: int = 16
    n_train: int | None = None
    sampling: SamplingSection = SamplingSection()
    pairs: PairsSection = PairsSection()
    rm: RMSection = RMSection()
    ebrm: EBRMTrainConfig = EBRMTrainConfig()
    refine: RefineConfig = RefineConfig()
    swift: SwiftSection = SwiftSection()

    def __post_init__(self):
        if not self.noise_levels or any(not 0.0 <= x <= 1.0 for x in self.noise_levels):
            raise ValueError(f"noise_levels: expected a non-empty list of fractions in [0, 1], "
                             f"got {list(self.noise_levels)}")
        for k in ("n", "n_train"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k}: expected a positive int, got {v}")


def backbone_of(cfg) -> Backbone:
    return load_backbone(BackboneConfig(path=cfg.model, template=cfg.template, system=cfg.system, dtype=cfg.dtype))


# ----------------------------------------------------------------------------- candidates


def training_rows(backbone: Backbone, task: Task, rows, n: int, demonstrations: bool) -> list[dict]:
    """The training candidates, plus each problem's demonstration (index ``n``) when asked (a
    demonstration has no sampler scores, so the sampled rows' are dropped: the RM scores all)."""
    if not demonstrations:
        return list(rows)
    return without_scores(rows) + demonstration_rows(backbone, task, task.problems("train"), n)


def without_scores(rows) -> list[dict]:
    """Rows without their ``scores`` (the sampler's confidences), e.g. to pool them with unscored rows."""
    return [{k: v for k, v in r.items() if k != "scores"} for r in rows]


def order_rows(rows) -> tuple[list[str], list[dict], np.ndarray]:
    """Candidate rows in [P, N] order: (prompt_ids [P], rows flat [P*N] (row p*N + j is
    candidate j of prompt p), correct bool [P, N])."""
    ids, arr = cands.group(rows)
    n = arr["correct"].shape[1]
    by = {(r["prompt_id"], r["index"]): r for r in rows}
    flat = [by[(pid, j)] for pid in ids for j in range(n)]
    return ids, flat, arr["correct"]


def encode_rows(backbone: Backbone, rows, max_len: int | None = None,
                multiple: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (ids, attention_mask, response_mask), each [R, T] int32, of the backbone's
    rendered prompt + response (response_mask: 1 on the response tokens; pad: the backbone's).

    The response is the row's ``token_ids`` when present (exactly what was sampled, the
    end-of-turn id included if generation stopped), else the backbone's rendering of ``text``
    as an assistant turn. T is the longest sequence rounded up to ``multiple``, at most
    ``max_len`` (a longer sequence raises; null: no limit but the model's context).
    """
    if not rows:
        raise ValueError("rows: expected at least one candidate, got none")
    resps = []
    for i, row in enumerate(rows):
        resp = (list(row["token_ids"]) if row["token_ids"] is not None
                else backbone.response_ids(row["prompt"], row["text"]))
        if not resp:
            raise ValueError(f"rows[{i}] ({row['prompt_id']!r} #{row['index']}): expected a non-empty response, "
                             "got none")
        resps.append(resp)
    prompts = [r["prompt"] for r in rows]
    lens = {}
    for q in dict.fromkeys(prompts):
        lens[q] = len(backbone.prompt_ids(q))
    longest = max(lens[q] + len(r) for q, r in zip(prompts, resps))
    t = -(-longest // multiple) * multiple
    if max_len is not None:
        if longest > max_len:
            i = next(i for i, (q, r) in enumerate(zip(prompts, resps)) if lens[q] + len(r) > max_len)
            got = lens[prompts[i]] + len(resps[i])
            raise ValueError(f"rows[{i}] ({rows[i]['prompt_id']!r} #{rows[i]['index']}): expected at most "
                             f"rm.max_len={max_len} tokens (prompt + response), got {got}; raise rm.max_len")
        t = min(t, max_len)
    return backbone.encode_pairs(prompts, resps, t)


def candidate_pairs(correct, max_per_problem: int | None = None, seed: int = 0) -> np.ndarray:
    """(correct, incorrect) pairs within each problem, as flat row indices [K, 2] int64.

    correct: bool [P, N]; row ``p*N + j`` is candidate j of problem p. Problems with only
    correct or only incorrect candidates give no pair. ``max_per_problem``: keep a seeded
    random subset of that many pairs per problem (in their original order).
    """
    c = np.asarray(correct)
    if c.ndim != 2 or c.dtype != bool:
        raise ValueError(f"correct: expected a bool array [P, N], got {c.dtype} {c.shape}")
    if max_per_problem is not None and (isinstance(max_per_problem, bool) or int(max_per_problem) < 1):
        raise ValueError(f"max_per_problem: expected a positive int or None, got {max_per_problem!r}")
    rng = np.random.default_rng(seed)
    p_count, n = c.shape
    out = []
    for p in range(p_count):
        good, bad = np.flatnonzero(c[p]), np.flatnonzero(~c[p])
        if not good.size or not bad.size:
            continue
        pp = np.stack(np.meshgrid(good, bad, indexing="ij"), -1).reshape(-1, 2) + p * n
        if max_per_problem is not None and len(pp) > max_per_problem:
            pp = pp[np.sort(rng.choice(len(pp), int(max_per_problem), replace=False))]
        out.append(pp)
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), np.int64)


def preference_accuracy(scores, pairs) -> float | None:
    """Percent of pairs with ``scores[chosen] > scores[rejected]`` strictly (ties wrong);
    None when there is no pair. scores [R]; pairs [K, 2]."""
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores: expected shape [R], got {s.shape}")
    pr = check_pairs(pairs, s.shape[0])
    if pr.shape[0] == 0:
        return None
    return float(100.0 * np.mean(s[pr[:, 0]] > s[pr[:, 1]]))


def evaluate_scores(scores, correct, pairs) -> dict:
    """{'pref_acc': % or None, 'bon': {k: %}, 'bon@N': %} of flat scores [P*N] on correct [P, N]."""
    c = np.asarray(correct)
    s = np.asarray(scores, np.float64)
    if s.shape != (c.size,):
        raise ValueError(f"scores: expected [P*N={c.size}] (correct is {c.shape}), got {s.shape}")
    curve = bon.best_of_n(s.reshape(c.shape), c)
    n = c.shape[1]
    return {"pref_acc": preference_accuracy(s, pairs), "bon": {str(k): v for k, v in curve.items()},
            f"bon@{n}": curve[n]}


# ----------------------------------------------------------------------------- EBRM on arrays


def filter_training_set(r0, pairs, use_filter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows [M] sorted unique response indices of the kept pairs, keep bool [K]).

    The conflict filter keeps the pairs whose labels the base RM agrees with
    (``r0[chosen] > r0[rejected]``, :func:`swiftjax.methods.ebrm.energy.conflict_filter`) — the labels being
    whatever the RM was trained on (noisy ones included)."""
    r0 = np.asarray(r0)
    pr = check_pairs(pairs, r0.shape[0])
    if pr.shape[0] == 0:
        raise ValueError("pairs: expected at least one training pair, got none")
    keep = ebrm.conflict_filter(r0[pr[:, 0]], r0[pr[:, 1]]) if use_filter else np.ones(len(pr), bool)
    rows = np.unique(pr[keep].reshape(-1))
    if rows.size == 0:
        raise ValueError("conflict filter: the base RM disagrees with every training pair; nothing to train EBRM on")
    return rows, keep


@functools.lru_cache(maxsize=8)
def _ebrm_train_step(net: ebrm.EBRMConfig, tcfg: EBRMTrainConfig):
    opt = loop.OptimizerConfig(name="adamw", lr=float(tcfg.lr), weight_decay=float(tcfg.weight_decay))
    tx = loop.make_optimizer(opt)

    def loss_fn(params, batch, rng):
        loss = ebrm.nce_plus_loss(params, batch["e"], batch["r0"], rng, net, num_neg=tcfg.num_neg,
                                  stds=tcfg.stds, beta=tcfg.beta, lam=tcfg.lam, train=True)
        return loss, {}

    return tx, loop.make_train_step(loss_fn, tx)


def train_ebrm(e, r0_norm, tcfg: EBRMTrainConfig, *, seed: int = 0, writer=None, progress: bool = False,
               desc: str = "ebrm"):
    """Train the energy net with NCE+ on e [M, De], normalised rewards r0_norm [M].

    Returns (params, EBRMConfig, loop.FitResult). Fresh noise every step (from the loop's rng);
    batches reshuffled per epoch when ``tcfg.shuffle`` (then the last partial batch is dropped).
    """
    e = np.asarray(e, np.float32)
    r = np.asarray(r0_norm, np.float32)
    if e.ndim != 2 or r.shape != (e.shape[0],):
        raise ValueError(f"e, r0_norm: expected [M, De] and [M], got {e.shape} and {r.shape}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(r))):
        raise ValueError("e, r0_norm: expected finite values, found NaN or inf")
    net = tcfg.net(e.shape[1])
    params = ebrm.init_params(jax.random.key(seed), net)
    tx, step = _ebrm_train_step(net, tcfg)
    state = loop.init_state(params, tx, seed)
    bs = min(tcfg.batch_size, e.shape[0])
    batches = epoch_batches({"e": e, "r0": r}, bs, seed, shuffle=tcfg.shuffle, drop_last=tcfg.shuffle)
    res = loop.fit(state, step, batches, epochs=tcfg.epochs, max_steps=tcfg.max_steps, writer=writer,
                   log_every=10 if writer is not None else 0, progress=progress, desc=desc)
    return res.state.params, net, res


def refine_scores(params, net: ebrm.EBRMConfig, stats, e, r0, rcfg: RefineConfig = RefineConfig(),
                  seed: int = 0) -> np.ndarray:
    """Refined rewards [M] on the base RM's scale, averaged over ``rcfg.seeds`` inference runs.

    stats: (mean, std) the net was trained with (:func:`swiftjax.methods.ebrm.energy.fit_reward_stats`); r0 is
    normalised with them, refined by :func:`swiftjax.methods.ebrm.energy.refine` (run s uses key
    ``fold_in(key(seed), s)``), averaged, and mapped back.
    """
    mean, std = stats
    e = np.asarray(e, np.float32)
    r0n = ebrm.normalize_rewards(np.asarray(r0, np.float32), mean, std)
    runs = 1 if rcfg.init == "base" else rcfg.seeds
    total = jnp.zeros(r0n.shape, jnp.float32)
    base = jax.random.key(seed)
    for s in range(runs):
        res = ebrm.refine(params, e, r0n, jax.random.fold_in(base, s), net, steps=rcfg.steps, lr0=rcfg.lr0,
                          eta=rcfg.eta, min_lr=rcfg.min_lr, init=rcfg.init)
        total = total + res.reward
    return np.asarray(ebrm.denormalize_rewards(total / runs, mean, std), np.float32)


def ebrm_on_arrays(e_train, r0_train, pairs, e_test, r0_test, correct_test, tcfg: EBRMTrainConfig,
                   rcfg: RefineConfig, *, seed: int = 0, test_pairs=None, writer=None,
                   progress: bool = False, desc: str = "ebrm") -> tuple[dict, dict]:
    """EBRM over any base reward (an explicit RM or SWIFT), evaluated against its base.

    e_train [R, De], r0_train [R]: every training response; pairs [K, 2]: (chosen, rejected)
    rows as the base was trained (noisy labels included); e_test [P*N, De], r0_test [P*N]:
    test candidates in [P, N] order; correct_test bool [P, N]; test_pairs [K', 2] (default:
    every clean (correct, incorrect) pair of the test problems).

    Returns (result, artifacts): result = {'base': evaluate_scores(r0_test), 'ebrm':
    evaluate_scores(refined), 'filter': {...}, 'train': {...}}; artifacts = {'params', 'net',
    'stats', 'refined' [P*N], 'keep' [K], 'rows'}.
    """
    e_train = np.asarray(e_train, np.float32)
    r0_train = np.asarray(r0_train, np.float32)
    e_test = np.asarray(e_test, np.float32)
    r0_test = np.asarray(r0_test, np.float32)
    correct_test = np.asarray(correct_test, bool)
    if e_train.ndim != 2 or r0_train.shape != (e_train.shape[0],):
        raise ValueError(f"e_train, r0_train: expected [R, De] and [R], got {e_train.shape} and {r0_train.shape}")
    if e_test.ndim != 2 or e_test.shape[1] != e_train.shape[1] or r0_test.shape != (e_test.shape[0],):
        raise ValueError(f"e_test, r0_test: expected [M, De={e_train.shape[1]}] and [M], "
                         f"got {e_test.shape} and {r0_test.shape}")
    if correct_test.ndim != 2 or correct_test.size != e_test.shape[0]:
        raise ValueError(f"correct_test: expected [P, N] with P*N = {e_test.shape[0]}, got {correct_test.shape}")
    if test_pairs is None:
        test_pairs = candidate_pairs(correct_test)
    rows, keep = filter_training_set(r0_train, pairs, tcfg.filter)
    stats = ebrm.fit_reward_stats(r0_train[rows])
    if not stats[1] > 0:
        raise ValueError("EBRM training rewards: expected a spread of values, all are equal (std 0)")
    t0 = time.time()
    params, net, fit = train_ebrm(e_train[rows], ebrm.normalize_rewards(r0_train[rows], *stats), tcfg,
                                  seed=seed, writer=writer, progress=progress, desc=desc)
    t_train = time.time() - t0
    t0 = time.time()
    refined = refine_scores(params, net, stats, e_test, r0_test, rcfg, seed=seed)
    t_refine = time.time() - t0
    result = {
        "base": evaluate_scores(r0_test, correct_test, test_pairs),
        "ebrm": evaluate_scores(refined, correct_test, test_pairs),
        "filter": {"pairs": int(len(keep)), "kept": int(keep.sum()), "responses": int(rows.size)},
        "train": {"steps": int(fit.steps), "params": ebrm.num_params(params), "seconds": round(t_train, 2),
                  "refine_seconds": round(t_refine, 2), "reward_mean": stats[0], "reward_std": stats[1]},
        "test_pairs": int(len(test_pairs)),
    }
    arts = {"params": params, "net": net, "stats": stats, "refined": refined, "keep": keep, "rows": rows}
    return result, arts


# ----------------------------------------------------------------------------- save / load


def save_ebrm(directory, params, net: ebrm.EBRMConfig, stats, rcfg: RefineConfig) -> Path:
    """``directory/ebrm.json`` (net sizes, reward stats, refine settings) + ``directory/params``
    (orbax). An earlier save in ``directory`` is replaced."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "ebrm.json").unlink(missing_ok=True)
    if (d / "params").exists():
        shutil.rmtree(d / "params")
    meta = {"net": dataclasses.asdict(net), "stats": [float(stats[0]), float(stats[1])],
            "refine": dataclasses.asdict(rcfg)}
    with Checkpointer(d / "params", max_to_keep=1, async_save=False) as ck:
        ck.save(0, params, {"kind": "ebrm"})
        ck.wait_until_finished()
    (d / "ebrm.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_ebrm(directory):
    """(params, EBRMConfig, (mean, std), RefineConfig) saved by :func:`save_ebrm`."""
    d = Path(directory)
    if not (d / "ebrm.json").is_file():
        raise ValueError(f"ebrm: expected a directory saved by save_ebrm (with ebrm.json), got {d}")
    meta = json.loads((d / "ebrm.json").read_text())
    net = build(ebrm.EBRMConfig, meta["net"], "ebrm.net")
    target = ebrm.init_params(jax.random.key(0), net)
    with Checkpointer(d / "params", max_to_keep=1, async_save=False) as ck:
        restored = ck.restore(target)
    if restored is None:
        raise ValueError(f"ebrm: expected a readable checkpoint under {d / 'params'}, found none")
    return restored.state, net, tuple(meta["stats"]), build(RefineConfig, meta["refine"], "ebrm.refine")


SWIFT_KEYS = ("e_train", "r0_train", "pairs_train", "e_test", "r0_test", "correct_test")


def load_swift_arrays(path) -> dict:
    """The SWIFT (e, r0) arrays for :func:`ebrm_on_arrays` from an npz with :data:`SWIFT_KEYS`
    (and optionally ``test_pairs``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"swift.features: expected an npz file, {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in SWIFT_KEYS if k not in z]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected {list(SWIFT_KEYS)}")
        out = {k: z[k] for k in SWIFT_KEYS}
        if "test_pairs" in z:
            out["test_pairs"] = z["test_pairs"]
    return out


def swift_arrays(model, head_params, spec, ids, attention_mask, response_mask, batch_size: int = 32,
                 *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SWIFT's (e [N, F], r0 [N]) of a candidate set, for :func:`ebrm_on_arrays`.

    e = the gate-weighted mean of each response's token features
    (:func:`swiftjax.methods.swift.head.pooled_features`), r0 = the SWIFT score
    (:func:`swiftjax.methods.swift.head.score`),
    features streamed by :func:`swiftjax.methods.swift.features.iter_feature_batches` with ``spec``
    (a :class:`swiftjax.methods.swift.features.FeatureSpec`, as the head was trained on). ids / masks [N, T].
    """
    n = int(np.shape(ids)[0])
    e_out, r_out = None, np.zeros(n, np.float32)
    for fb in feats.iter_feature_batches(model, ids, attention_mask, response_mask, spec, batch_size,
                                         progress=progress):
        valid = fb.rows >= 0
        e = np.asarray(swift_head.pooled_features(head_params, fb.features, fb.mask))
        r = np.asarray(swift_head.score(head_params, fb.features, fb.mask))
        if e_out is None:
            e_out = np.zeros((n, e.shape[1]), np.float32)
        e_out[fb.rows[valid]] = e[valid]
        r_out[fb.rows[valid]] = r[valid]
    return e_out, r_out


def write_swift_arrays(path, e_train, r0_train, pairs_train, e_test, r0_test, correct_test, test_pairs=None) -> Path:
    """Write the npz that ``swift.features`` / :func:`load_swift_arrays` read (shapes checked)."""
    arrays = {"e_train": np.asarray(e_train, np.float32), "r0_train": np.asarray(r0_train, np.float32),
              "e_test": np.asarray(e_test, np.float32), "r0_test": np.asarray(r0_test, np.float32),
              "correct_test": np.asarray(correct_test, bool)}
    if arrays["e_train"].ndim != 2 or arrays["r0_train"].shape != arrays["e_train"].shape[:1]:
        raise ValueError(f"e_train, r0_train: expected [R, F] and [R], got {arrays['e_train'].shape} "
                         f"and {arrays['r0_train'].shape}")
    if arrays["e_test"].ndim != 2 or arrays["r0_test"].shape != arrays["e_test"].shape[:1] \
            or arrays["correct_test"].size != arrays["e_test"].shape[0]:
        raise ValueError(f"e_test, r0_test, correct_test: expected [P*N, F], [P*N], [P, N], got "
                         f"{arrays['e_test'].shape}, {arrays['r0_test'].shape}, {arrays['correct_test'].shape}")
    arrays["pairs_train"] = check_pairs(pairs_train, arrays["e_train"].shape[0], "pairs_train")
    if test_pairs is not None:
        arrays["test_pairs"] = check_pairs(test_pairs, arrays["e_test"].shape[0], "test_pairs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


# ----------------------------------------------------------------------------- pipeline


def _level_name(level: float) -> str:
    return f"noise_{level:g}"


def _features_npz(path, e, r0, rows, **extra):
    np.savez(path, e=np.asarray(e, np.float32), r0=np.asarray(r0, np.float32),
             prompt_id=np.array([r["prompt_id"] for r in rows]), index=np.array([r["index"] for r in rows], np.int64),
             **extra)


def _scored_rows(rows, **scores):
    out = []
    for i, r in enumerate(rows):
        row = {k: v for k, v in r.items() if k != "scores"}
        row["scores"] = {**r.get("scores", {}), **{name: float(s[i]) for name, s in scores.items()}}
        out.append(row)
    return out


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def results_markdown(results: dict) -> str:
    """The markdown table of :func:`run`'s results."""
    ref = results["reference"]
    n = ref["n"]
    task = results.get("task", {}).get("name", "?")
    model = results.get("model", {}).get("path", "?")
    lines = [
        f"# EBRM on {task} ({model}): base reward vs energy-based refinement",
        "",
        f"Test: {ref['problems']} problems x {n} candidates; preference accuracy (%) on "
        f"{ref['test_pairs']} clean held-out (correct, incorrect) pairs, ties wrong; Best-of-{n} "
        f"accuracy (%) (oracle {ref['oracle']:.1f}, random {ref['random']:.1f}).",
        "",
        f"| base | label noise | base pref acc | EBRM pref acc | base BoN@{n} | EBRM BoN@{n} | EBRM train pairs kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for level, r in results["rm"].items():
        f = r["filter"]
        lines.append(f"| RM | {float(level):.0%} | {_fmt(r['base']['pref_acc'])} | {_fmt(r['ebrm']['pref_acc'])} | "
                     f"{_fmt(r['base'][f'bon@{n}'])} | {_fmt(r['ebrm'][f'bon@{n}'])} | {f['kept']}/{f['pairs']} |")
    if results.get("swift"):
        r = results["swift"]
        m = r["n"]
        f = r["filter"]
        lines.append(f"| SWIFT | as given | {_fmt(r['base']['pref_acc'])} | {_fmt(r['ebrm']['pref_acc'])} | "
                     f"{_fmt(r['base'][f'bon@{m}'])} | {_fmt(r['ebrm'][f'bon@{m}'])} | {f['kept']}/{f['pairs']} |")
    return "\n".join(lines) + "\n"


def _check_inputs(cfg: EbrmRunConfig) -> None:
    """Input files named by the config exist (before any work)."""
    if cfg.swift.features and not Path(cfg.swift.features).is_file():
        raise ValueError(f"swift.features: expected an npz file, {cfg.swift.features} does not exist")
    if cfg.swift.head and not (Path(cfg.swift.head) / "head.json").is_file():
        raise ValueError(f"swift.head: expected a trained SWIFT head directory (with head.json), got {cfg.swift.head}")


def _swift_on_backbone(cfg: EbrmRunConfig, backbone: Backbone, arrays, *, out: Path, n_tr: int, clean, correct_te,
                       test_pairs) -> Path:
    """EBRM-over-SWIFT arrays from a trained head over this run's candidates (see the module doc);
    the filter uses the clean training pairs (SWIFT saw true labels)."""
    head, spec, meta = load_head(Path(cfg.swift.head))
    trained_on = meta.get("info", {}).get("model", {}).get("digest")
    if trained_on and trained_on != backbone.digest:
        raise ValueError(f"swift.head={cfg.swift.head}: trained on model {meta['info']['model'].get('path')} "
                         f"(digest {trained_on[:12]}), not on model={cfg.model} (digest {backbone.digest[:12]})")
    ids_all, attn_all, resp_all = arrays
    e_sw, r_sw = swift_arrays(backbone.model, head, spec, ids_all, attn_all, resp_all,
                              batch_size=cfg.rm.score_batch_size, progress=cfg.progress)
    return write_swift_arrays(out / "swift_arrays.npz", e_sw[:n_tr], r_sw[:n_tr], clean, e_sw[n_tr:], r_sw[n_tr:],
                              correct_te, test_pairs=test_pairs)


def run(cfg: EbrmRunConfig, *, log=print) -> dict:
    """The whole experiment (see the module docstring); returns the results dict."""
    out = check_writable(Path(cfg.out), "out")
    if cfg.cache:
        check_writable(Path(cfg.cache), "cache")
    _check_inputs(cfg)
    t_start = time.time()
    backbone = backbone_of(cfg)
    task = make_task(cfg.task)
    n_train = cfg.n_train or cfg.n
    demos = training_rows(backbone, task, [], n_train, cfg.pairs.demonstrations)  # checked before sampling
    sets, paths = {}, {}
    for split, n in (("train", n_train), ("test", cfg.n)):
        sets[split], paths[split] = candidate_set(backbone, task, split, n=n, sampling=cfg.sampling, seed=cfg.seed,
                                                  out_dir=Path(cfg.cache or out), progress=cfg.progress, log=log)
    _, train_rows, correct_tr = order_rows(without_scores(sets["train"]) + demos)
    test_ids, test_rows, correct_te = order_rows(sets["test"])
    ids_all, attn_all, resp_all = encode_rows(backbone, train_rows + test_rows, cfg.rm.max_len)  # one T: one compile
    n_tr = len(train_rows)
    ids_tr, attn_tr = ids_all[:n_tr], attn_all[:n_tr]
    pc = cfg.pairs
    clean = candidate_pairs(correct_tr, pc.max_per_problem, pc.seed)
    if clean.shape[0] == 0:
        raise ValueError(f"{paths['train']}: expected training problems with both correct and incorrect "
                         "responses, found none (no preference pairs); pairs.demonstrations=true adds the "
                         "task's worked solutions")
    test_pairs = candidate_pairs(correct_te)
    n = correct_te.shape[1]
    results = {
        "reference": {"problems": len(test_ids), "n": n, "test_pairs": int(len(test_pairs)),
                      "oracle": bon.oracle_at_k(correct_te, [n])[n], "random": bon.random_at_k(correct_te, [n])[n],
                      "train_problems": int(correct_tr.shape[0]), "train_candidates": int(correct_tr.size),
                      "train_pairs": int(len(clean)), "train_pass@1": float(100 * correct_tr.mean()),
                      "candidates": {k: str(v) for k, v in paths.items()}},
        "rm": {},
        "swift": None,
        "model": backbone.describe(),
        "task": task.describe(),
    }
    rm0 = init_reward_model(backbone.model, seed=cfg.rm.head_seed, head_init_std=cfg.rm.head_init_std)
    rm_cfg = cfg.rm.train_config()
    sbs = cfg.rm.score_batch_size
    for level in cfg.noise_levels:
        d = out / _level_name(level)
        d.mkdir(parents=True, exist_ok=True)
        noisy, flipped = flip_pairs(clean, level, pc.flip_seed)
        t0 = time.time()
        with JsonlWriter(d / "rm_metrics.jsonl") as w:
            rm, fit = train_reward_model(rm0, ids_tr, attn_tr, noisy, rm_cfg, writer=w, progress=cfg.progress,
                                         desc=f"RM (noise {level:g})")
        t_rm = time.time() - t0
        r_all, e_all = score_responses(rm, ids_all, attn_all, sbs)  # one call: one compiled shape
        r_tr, e_tr, r_te, e_te = r_all[:n_tr], e_all[:n_tr], r_all[n_tr:], e_all[n_tr:]
        with JsonlWriter(d / "ebrm_metrics.jsonl") as w:
            res, arts = ebrm_on_arrays(e_tr, r_tr, noisy, e_te, r_te, correct_te, cfg.ebrm, cfg.refine, seed=cfg.seed,
                                       test_pairs=test_pairs, writer=w, progress=cfg.progress,
                                       desc=f"EBRM (noise {level:g})")
        keep = arts["keep"]
        res["filter"]["kept_correctly_labelled"] = float(np.mean(~flipped[keep])) if keep.any() else None
        res["flip"] = {"pairs": int(len(flipped)), "flipped": int(flipped.sum()), "requested": level}
        res["rm_train"] = {"steps": int(fit.steps), "seconds": round(t_rm, 2),
                           "noisy_pair_acc": preference_accuracy(r_tr, noisy),
                           "clean_pair_acc": preference_accuracy(r_tr, clean)}
        _features_npz(d / "train_features.npz", e_tr, r_tr, train_rows, pairs_clean=clean, pairs_noisy=noisy,
                      flipped=flipped)
        _features_npz(d / "test_features.npz", e_te, r_te, test_rows)
        save_ebrm(d / "ebrm", arts["params"], arts["net"], arts["stats"], cfg.refine)
        cands.write_candidates(d / "test_scored.jsonl", _scored_rows(test_rows, rm=r_te, ebrm=arts["refined"]))
        results["rm"][f"{level:g}"] = res
        log(f"noise {level:g}: pref acc {_fmt(res['base']['pref_acc'])} -> {_fmt(res['ebrm']['pref_acc'])}, "
            f"BoN@{n} {_fmt(res['base'][f'bon@{n}'])} -> {_fmt(res['ebrm'][f'bon@{n}'])}")
    swift_features = cfg.swift.features
    if cfg.swift.head and not swift_features:
        swift_features = _swift_on_backbone(cfg, backbone, (ids_all, attn_all, resp_all), out=out, n_tr=n_tr,
                                            clean=clean, correct_te=correct_te, test_pairs=test_pairs)
    if swift_features:
        sw = load_swift_arrays(swift_features)
        with JsonlWriter(out / "swift_ebrm_metrics.jsonl") as w:
            res, arts = ebrm_on_arrays(sw["e_train"], sw["r0_train"], sw["pairs_train"], sw["e_test"], sw["r0_test"],
                                       sw["correct_test"], cfg.ebrm, cfg.refine, seed=cfg.seed,
                                       test_pairs=sw.get("test_pairs"), writer=w, progress=cfg.progress,
                                       desc="EBRM (SWIFT)")
        res["n"] = int(np.asarray(sw["correct_test"]).shape[1])
        res["features"] = str(swift_features)
        save_ebrm(out / "swift_ebrm", arts["params"], arts["net"], arts["stats"], cfg.refine)
        results["swift"] = res
    results["seconds"] = round(time.time() - t_start, 1)
    results["config"] = to_plain(cfg)
    with atomic_file(out / "results.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_file(out / "results.md", "w") as f:
        f.write(results_markdown(results))
    return results


def run_main(argv) -> int:
    """``swiftjax ebrm run [CONFIG.yaml] [key=value ...]``."""
    cfg = parse_typed(EbrmRunConfig, argv, "ebrm run")
    results = run(cfg)
    print(results_markdown(results))
    print(f"wrote {Path(cfg.out) / 'results.json'} and results.md")
    return 0


# ----------------------------------------------------------------------------- refine


def score_refine_main(argv: Sequence[str]) -> int:
    """``swiftjax ebrm refine CANDIDATES.jsonl --features F.npz --ebrm DIR [--out OUT.jsonl]
    [--seeds K] [--seed S] [--name ebrm] [--base-name rm]`` (also ``swiftjax swift score --refine``).

    F.npz holds ``e`` [M, De], ``prompt_id`` [M], ``index`` [M] and ``r0`` [M] (else r0 is read
    from the candidates' ``scores[base-name]``); rows are matched by (prompt_id, index). Writes
    the candidates with ``scores[name]`` = refined and ``scores[base-name]`` = r0, and prints
    base vs refined Best-of-N (and pairwise accuracy when some problems have both labels).
    """
    p = argparse.ArgumentParser(prog="swiftjax ebrm refine", description="EBRM-refine stored rewards")
    p.add_argument("--refine", action="store_true", help="(accepted for the `swift score --refine` route)")
    p.add_argument("candidates")
    p.add_argument("--features", required=True)
    p.add_argument("--ebrm", required=True, help="directory written by save_ebrm (e.g. runs/ebrm/noise_0.2/ebrm)")
    p.add_argument("--out", default=None, help="default: CANDIDATES with .refined.jsonl")
    p.add_argument("--seeds", type=int, default=None, help="inference runs averaged (default: as saved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="ebrm")
    p.add_argument("--base-name", default="rm")
    a = p.parse_args(list(argv))
    out = Path(a.out) if a.out else Path(a.candidates).with_suffix(".refined.jsonl")
    check_writable(out.parent, "--out")
    params, net, stats, rcfg = load_ebrm(a.ebrm)
    if a.seeds is not None:
        rcfg = dataclasses.replace(rcfg, seeds=a.seeds)
    rows = cands.read_candidates(a.candidates)
    fpath = Path(a.features)
    if not fpath.is_file():
        raise ValueError(f"--features: expected an npz file, {fpath} does not exist")
    with np.load(fpath, allow_pickle=False) as z:
        for k in ("e", "prompt_id", "index"):
            if k not in z:
                raise ValueError(f"{fpath}: missing array {k!r}; expected e, prompt_id, index (and r0)")
        e = z["e"]
        keys = list(zip(z["prompt_id"].tolist(), z["index"].tolist()))
        r0_stored = z["r0"] if "r0" in z else None
    where = {k: i for i, k in enumerate(keys)}
    missing = [(r["prompt_id"], r["index"]) for r in rows if (r["prompt_id"], r["index"]) not in where]
    if missing:
        raise ValueError(f"{fpath}: no features for {len(missing)} candidate(s), e.g. {missing[0]}")
    sel = np.array([where[(r["prompt_id"], r["index"])] for r in rows])
    if r0_stored is not None:
        r0 = np.asarray(r0_stored, np.float32)[sel]
    else:
        if any(a.base_name not in r.get("scores", {}) for r in rows):
            raise ValueError(f"r0: expected 'r0' in {fpath} or scores[{a.base_name!r}] on every candidate")
        r0 = np.array([r["scores"][a.base_name] for r in rows], np.float32)
    refined = refine_scores(params, net, stats, e[sel], r0, rcfg, seed=a.seed)
    scored = _scored_rows(rows, **{a.base_name: r0, a.name: refined})
    cands.write_candidates(out, scored)
    _, flat, correct = order_rows(scored)
    n = correct.shape[1]
    pairs = candidate_pairs(correct)
    for name in (a.base_name, a.name):
        s = np.array([r["scores"][name] for r in flat])
        ev = evaluate_scores(s, correct, pairs)
        print(f"{name}: BoN@{n} {_fmt(ev[f'bon@{n}'])}, pref acc {_fmt(ev['pref_acc'])} ({len(pairs)} pairs)")
    print(f"wrote {out}")
    return 0


def main(argv) -> int:
    """``swiftjax ebrm run CONFIG [k=v ...]`` | ``swiftjax ebrm refine ...`` (a saved energy net)."""
    return subcommand("ebrm", {"run": run_main, "refine": score_refine_main}, argv)
