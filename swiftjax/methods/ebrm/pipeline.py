"""EBRM in the world: a conventional reward model trained with label noise, refined by EBRM;
and the same refinement over SWIFT.

    swiftjax train-ebrm [configs/ebrm.yaml] [key=value ...]
    swiftjax score --refine CANDIDATES.jsonl --features FEATURES.npz --ebrm DIR [--out OUT.jsonl]

``train-ebrm`` (:func:`main`), for each label-noise level (``noise_levels``):

1. training pairs = (correct, incorrect) candidates of the same training problem, with an
   exact, seeded fraction of them swapped (:func:`swiftjax.methods.ebrm.reward_model.flip_pairs`);
2. a reward model (the world model's body + a scalar head on the last token) trained with
   Bradley–Terry on those noisy pairs; (e, r0) of every training and test candidate;
3. EBRM (:func:`ebrm_on_arrays`): the conflict filter on the noisy training pairs, rewards
   normalised with the kept responses' statistics, the energy net trained with NCE+, test
   rewards refined (hybrid init, averaged over seeds);
4. preference accuracy on the clean held-out pairs (test problems' correct vs incorrect
   candidates; ties count wrong) and Best-of-N accuracy, base RM vs EBRM.

EBRM over SWIFT takes precomputed arrays (``swift.features``: an npz with ``e_train``,
``r0_train``, ``pairs_train``, ``e_test``, ``r0_test``, ``correct_test``; e = the gate-weighted
mean feature, :func:`swiftjax.methods.swift.head.pooled_features`, r0 = :func:`swiftjax.methods.swift.head.score`) and
runs the same :func:`ebrm_on_arrays`.

Outputs under ``out``: ``results.json``, ``results.md`` (the table), and per noise level
``noise_<level>/``: RM and EBRM metrics (jsonl), ``train_features.npz`` (e, r0, clean and noisy
pairs, flip mask), ``test_features.npz`` (e, r0, prompt_id, index), ``ebrm/`` (the energy net:
``ebrm.json`` + an orbax checkpoint) and ``test_scored.jsonl`` (candidates with scores ``rm`` and
``ebrm``). ``score --refine`` (:func:`score_refine_main`) re-applies a saved ``ebrm/`` to stored
features.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax import bon
from swiftjax.methods.ebrm import energy as ebrm
from swiftjax.config import config_from_argv, to_dataclass
from swiftjax.data import candidates as cands
from swiftjax.world import tokenizer as wtok

__all__ = [
    "DEFAULTS",
    "EBRMTrainConfig",
    "RefineConfig",
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
    "ensure_candidates",
    "results_markdown",
    "run",
    "main",
    "score_refine_main",
]

DEFAULTS = {
    "seed": 0,
    "out": "runs/ebrm",
    "model": None,  # world-model directory (default: the shipped swiftjax/assets/world_model)
    "world": {},  # WorldConfig fields: must match the world model's
    "progress": True,
    "noise_levels": [0.0, 0.2, 0.4],
    "candidates": {
        # path: a candidate jsonl; null: sample it from the world model (cached under out/)
        "train": {"path": None, "split": "validation", "n_problems": 500, "n": 8, "seed": 1},
        "test": {"path": None, "split": "test", "n_problems": 300, "n": 16, "seed": 0},
        "split_seed": 0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64,
        "prompt_len": 64, "batch_size": 512,
    },
    "pairs": {"max_per_problem": 8, "seed": 0, "flip_seed": 0},
    "rm": {"max_len": 128, "head_seed": 0, "head_init_std": 0.02, "train_last_layers": None,
           "lr": 2.0e-4, "weight_decay": 0.0, "batch_size": 32, "epochs": 1, "max_steps": None,
           "warmup_steps": 20, "clip_norm": 1.0, "seed": 0, "score_batch_size": 256},
    "ebrm": {"r_hidden": [16, 32, 64], "hidden": [256, 128], "dropout": 0.1, "filter": True,
             "num_neg": 128, "stds": [3.5], "beta": 0.1, "lam": 0.05, "lr": 3.0e-3,
             "weight_decay": 0.01, "batch_size": 256, "epochs": 20, "max_steps": None, "shuffle": True},
    "refine": {"steps": 50, "lr0": 0.5, "eta": 0.2, "min_lr": 1.0e-6, "init": "hybrid", "seeds": 5},
    "swift": {"features": None, "head": None},
}


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


# ----------------------------------------------------------------------------- candidates


def order_rows(rows) -> tuple[list[str], list[dict], np.ndarray]:
    """Candidate rows in [P, N] order: (prompt_ids [P], rows flat [P*N] (row p*N + j is
    candidate j of prompt p), correct bool [P, N])."""
    ids, arr = cands.group(rows)
    n = arr["correct"].shape[1]
    by = {(r["prompt_id"], r["index"]): r for r in rows}
    flat = [by[(pid, j)] for pid in ids for j in range(n)]
    return ids, flat, arr["correct"]


def encode_rows(tok, rows, max_len: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded (ids, attention_mask, response_mask), each [R, T] int32, of chat prompt +
    response (response_mask: 1 on the response tokens).

    The response is the row's ``token_ids`` when present (exactly what was sampled, <|end|>
    included if generation stopped), else ``encode(text) + [<|end|>]``. T is the longest
    sequence rounded up to ``multiple``, at most ``max_len`` (a longer sequence raises).
    """
    seqs, starts = [], []
    for i, row in enumerate(rows):
        prompt = wtok.encode(tok, wtok.format_prompt(row["prompt"]))
        resp = list(row["token_ids"]) if row["token_ids"] is not None else wtok.encode(tok, row["text"]) + [wtok.END_ID]
        if not resp:
            raise ValueError(f"rows[{i}] ({row['prompt_id']!r} #{row['index']}): expected a non-empty response, "
                             "got none")
        seq = prompt + resp
        if len(seq) > max_len:
            raise ValueError(f"rows[{i}] ({row['prompt_id']!r} #{row['index']}): expected at most max_len={max_len} "
                             f"tokens (prompt + response), got {len(seq)}; raise rm.max_len")
        seqs.append(seq)
        starts.append(len(prompt))
    if not seqs:
        raise ValueError("rows: expected at least one candidate, got none")
    longest = max(len(s) for s in seqs)
    t = min(max_len, -(-longest // multiple) * multiple)
    ids = np.full((len(seqs), t), wtok.PAD_ID, np.int32)
    attn = np.zeros((len(seqs), t), np.int32)
    resp = np.zeros((len(seqs), t), np.int32)
    for i, (s, p0) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = s
        attn[i, :len(s)] = 1
        resp[i, p0:len(s)] = 1
    return ids, attn, resp


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
    from swiftjax.methods.ebrm.reward_model import check_pairs

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
    from swiftjax.methods.ebrm.reward_model import check_pairs

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
    from swiftjax.train import loop

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
    from swiftjax.batching import epoch_batches
    from swiftjax.train import loop

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
    import shutil

    from swiftjax.train.ckpt import Checkpointer

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
    from swiftjax.train.ckpt import Checkpointer

    d = Path(directory)
    if not (d / "ebrm.json").is_file():
        raise ValueError(f"ebrm: expected a directory saved by save_ebrm (with ebrm.json), got {d}")
    meta = json.loads((d / "ebrm.json").read_text())
    net = to_dataclass(ebrm.EBRMConfig, meta["net"], "ebrm.net")
    target = ebrm.init_params(jax.random.key(0), net)
    with Checkpointer(d / "params", max_to_keep=1, async_save=False) as ck:
        restored = ck.restore(target)
    if restored is None:
        raise ValueError(f"ebrm: expected a readable checkpoint under {d / 'params'}, found none")
    return restored.state, net, tuple(meta["stats"]), to_dataclass(RefineConfig, meta["refine"], "ebrm.refine")


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
    (:func:`swiftjax.methods.swift.head.pooled_features`), r0 = the SWIFT score (:func:`swiftjax.methods.swift.head.score`),
    features streamed by :func:`swiftjax.methods.swift.features.iter_feature_batches` with ``spec``
    (a :class:`swiftjax.methods.swift.features.FeatureSpec`, as the head was trained on). ids / masks [N, T].
    """
    from swiftjax.methods.swift import features as feats
    from swiftjax.methods.swift import head as swift

    n = int(np.shape(ids)[0])
    e_out, r_out = None, np.zeros(n, np.float32)
    for fb in feats.iter_feature_batches(model, ids, attention_mask, response_mask, spec, batch_size,
                                         progress=progress):
        valid = fb.rows >= 0
        e = np.asarray(swift.pooled_features(head_params, fb.features, fb.mask))
        r = np.asarray(swift.score(head_params, fb.features, fb.mask))
        if e_out is None:
            e_out = np.zeros((n, e.shape[1]), np.float32)
        e_out[fb.rows[valid]] = e[valid]
        r_out[fb.rows[valid]] = r[valid]
    return e_out, r_out


def write_swift_arrays(path, e_train, r0_train, pairs_train, e_test, r0_test, correct_test, test_pairs=None) -> Path:
    """Write the npz that ``swift.features`` / :func:`load_swift_arrays` read (shapes checked)."""
    from swiftjax.methods.ebrm.reward_model import check_pairs

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


def _world_cfg(cfg):
    from swiftjax.world import model as wexp

    return wexp.world_config(cfg)


def ensure_candidates(cfg: dict, which: str, model_dir: Path, *, progress: bool = True) -> Path:
    """The candidate jsonl for ``which`` ('train' | 'test'): the configured path, or one sampled
    from the world model into ``out/candidates_<which>.jsonl`` (reused while its sampling
    settings and model are unchanged)."""
    from swiftjax.world import problems as world
    from swiftjax.world import model as wexp

    c = cfg["candidates"]
    sub = c[which]
    if sub.get("path"):
        path = Path(sub["path"])
        if not path.is_file():
            raise ValueError(f"candidates.{which}.path: expected a candidate jsonl, {path} does not exist")
        return path
    path = Path(cfg["out"]) / f"candidates_{which}.jsonl"
    key = {k: sub[k] for k in ("split", "n_problems", "n", "seed")}
    key.update({k: c[k] for k in ("split_seed", "temperature", "top_p", "top_k", "max_new_tokens", "prompt_len",
                                  "batch_size")})  # the sampling keys depend on the batch layout
    key["world"] = cfg.get("world") or {}
    key["model_sha256"] = wexp.model_digest(model_dir)

    def sample():
        model, _, tok = wexp.load_world_model(model_dir)
        problems = world.make_split(sub["split"], sub["n_problems"], _world_cfg(cfg), seed=c["split_seed"])
        return wexp.sample_candidates(model, tok, problems, n=sub["n"], temperature=c["temperature"],
                                      top_p=c["top_p"], top_k=c["top_k"], max_new_tokens=c["max_new_tokens"],
                                      prompt_len=c["prompt_len"], batch_size=c["batch_size"], seed=sub["seed"],
                                      progress=progress)

    cands.cached_candidates(path, key, sample)
    return path


def _rm_train_config(rm: dict):
    from swiftjax.methods.ebrm.reward_model import RMTrainConfig

    keys = ("lr", "weight_decay", "batch_size", "epochs", "max_steps", "warmup_steps", "clip_norm",
            "train_last_layers", "seed")
    return to_dataclass(RMTrainConfig, {k: rm[k] for k in keys}, "rm")


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
    lines = [
        "# EBRM in the world: base reward vs energy-based refinement",
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


def run(cfg: dict, *, progress: bool | None = None) -> dict:
    """The whole experiment (see the module docstring); returns the results dict."""
    from swiftjax.world import model as wexp
    from swiftjax.models.load import load_model
    from swiftjax.methods.ebrm.reward_model import flip_pairs, init_reward_model, score_responses, train_reward_model
    from swiftjax.train.metrics import JsonlWriter

    progress = cfg.get("progress", True) if progress is None else progress
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    levels = [float(x) for x in cfg["noise_levels"]]
    if not levels or any(not 0.0 <= x <= 1.0 for x in levels):
        raise ValueError(f"noise_levels: expected a non-empty list of fractions in [0, 1], got {cfg['noise_levels']!r}")
    tcfg = to_dataclass(EBRMTrainConfig, cfg["ebrm"], "ebrm")
    rcfg = to_dataclass(RefineConfig, cfg["refine"], "refine")
    rm_cfg = _rm_train_config(cfg["rm"])
    model_dir = Path(cfg["model"]) if cfg.get("model") else wexp.ASSET_DIR
    if not (model_dir / "model.safetensors").is_file():
        raise ValueError(f"model: expected a world-model directory with model.safetensors, got {model_dir}")
    _world_cfg(cfg)  # validates the world section early
    t_start = time.time()

    paths = {w: ensure_candidates(cfg, w, model_dir, progress=progress) for w in ("train", "test")}
    _, train_rows, correct_tr = order_rows(cands.read_candidates(paths["train"]))
    test_ids, test_rows, correct_te = order_rows(cands.read_candidates(paths["test"]))
    tok = wtok.load_tokenizer(model_dir)
    max_len = int(cfg["rm"]["max_len"])
    ids_all, attn_all, resp_all = encode_rows(tok, train_rows + test_rows, max_len)  # one T: one compilation
    n_tr = len(train_rows)
    ids_tr, attn_tr = ids_all[:n_tr], attn_all[:n_tr]
    pc = cfg["pairs"]
    clean = candidate_pairs(correct_tr, pc["max_per_problem"], pc["seed"])
    if clean.shape[0] == 0:
        raise ValueError(f"{paths['train']}: expected training problems with both correct and incorrect "
                         "candidates, found none (no preference pairs)")
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
    }
    lm, _ = load_model(model_dir)
    rm0 = init_reward_model(lm, seed=int(cfg["rm"]["head_seed"]), head_init_std=float(cfg["rm"]["head_init_std"]))
    sbs = int(cfg["rm"]["score_batch_size"])
    for level in levels:
        d = out / _level_name(level)
        d.mkdir(parents=True, exist_ok=True)
        noisy, flipped = flip_pairs(clean, level, pc["flip_seed"])
        t0 = time.time()
        with JsonlWriter(d / "rm_metrics.jsonl") as w:
            rm, fit = train_reward_model(rm0, ids_tr, attn_tr, noisy, rm_cfg, writer=w, progress=progress,
                                         desc=f"RM (noise {level:g})")
        t_rm = time.time() - t0
        r_all, e_all = score_responses(rm, ids_all, attn_all, sbs)  # one call: one compiled shape
        r_tr, e_tr, r_te, e_te = r_all[:n_tr], e_all[:n_tr], r_all[n_tr:], e_all[n_tr:]
        with JsonlWriter(d / "ebrm_metrics.jsonl") as w:
            res, arts = ebrm_on_arrays(e_tr, r_tr, noisy, e_te, r_te, correct_te, tcfg, rcfg, seed=int(cfg["seed"]),
                                       test_pairs=test_pairs, writer=w, progress=progress,
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
        save_ebrm(d / "ebrm", arts["params"], arts["net"], arts["stats"], rcfg)
        cands.write_candidates(d / "test_scored.jsonl", _scored_rows(test_rows, rm=r_te, ebrm=arts["refined"]))
        results["rm"][f"{level:g}"] = res
        print(f"noise {level:g}: pref acc {_fmt(res['base']['pref_acc'])} -> {_fmt(res['ebrm']['pref_acc'])}, "
              f"BoN@{n} {_fmt(res['base'][f'bon@{n}'])} -> {_fmt(res['ebrm'][f'bon@{n}'])}", flush=True)
    if cfg.get("swift", {}).get("head") and not cfg["swift"].get("features"):
        # EBRM over a trained SWIFT head on the same candidates: e = gate-weighted mean feature,
        # r0 = the SWIFT score; the filter uses the clean training pairs (SWIFT saw true labels)
        from swiftjax.methods.swift.head_io import load_head

        head, spec, _ = load_head(Path(cfg["swift"]["head"]))
        e_sw, r_sw = swift_arrays(lm, head, spec, ids_all, attn_all, resp_all, batch_size=sbs)
        cfg["swift"]["features"] = str(write_swift_arrays(
            out / "swift_arrays.npz", e_sw[:n_tr], r_sw[:n_tr], clean, e_sw[n_tr:], r_sw[n_tr:], correct_te,
            test_pairs=test_pairs))
    if cfg.get("swift", {}).get("features"):
        sw = load_swift_arrays(cfg["swift"]["features"])
        with JsonlWriter(out / "swift_ebrm_metrics.jsonl") as w:
            res, arts = ebrm_on_arrays(sw["e_train"], sw["r0_train"], sw["pairs_train"], sw["e_test"], sw["r0_test"],
                                       sw["correct_test"], tcfg, rcfg, seed=int(cfg["seed"]),
                                       test_pairs=sw.get("test_pairs"), writer=w, progress=progress,
                                       desc="EBRM (SWIFT)")
        res["n"] = int(np.asarray(sw["correct_test"]).shape[1])
        save_ebrm(out / "swift_ebrm", arts["params"], arts["net"], arts["stats"], rcfg)
        results["swift"] = res
    results["seconds"] = round(time.time() - t_start, 1)
    results["config"] = cfg
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    return results


def run_main(argv) -> int:
    """``swiftjax train-ebrm [CONFIG.yaml] [key=value ...]``."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: swiftjax train-ebrm [CONFIG.yaml] [key=value ...]", file=sys.stderr)
        return 0
    cfg = config_from_argv(argv, DEFAULTS)
    results = run(cfg)
    print(results_markdown(results))
    print(f"wrote {Path(cfg['out']) / 'results.json'} and results.md")
    return 0


# ----------------------------------------------------------------------------- score --refine


def score_refine_main(argv: Sequence[str]) -> int:
    """``swiftjax score --refine CANDIDATES.jsonl --features F.npz --ebrm DIR [--out OUT.jsonl]
    [--seeds K] [--seed S] [--name ebrm] [--base-name rm]``.

    F.npz holds ``e`` [M, De], ``prompt_id`` [M], ``index`` [M] and ``r0`` [M] (else r0 is read
    from the candidates' ``scores[base-name]``); rows are matched by (prompt_id, index). Writes
    the candidates with ``scores[name]`` = refined and ``scores[base-name]`` = r0, and prints
    base vs refined Best-of-N (and pairwise accuracy when some problems have both labels).
    """
    p = argparse.ArgumentParser(prog="swiftjax score --refine", description="EBRM-refine stored rewards")
    p.add_argument("--refine", action="store_true", help="(accepted for the `score --refine` route)")
    p.add_argument("candidates")
    p.add_argument("--features", required=True)
    p.add_argument("--ebrm", required=True, help="directory written by save_ebrm (e.g. runs/ebrm/noise_0.2/ebrm)")
    p.add_argument("--out", default=None, help="default: CANDIDATES with .refined.jsonl")
    p.add_argument("--seeds", type=int, default=None, help="inference runs averaged (default: as saved)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="ebrm")
    p.add_argument("--base-name", default="rm")
    a = p.parse_args(list(argv))
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
    out = Path(a.out) if a.out else Path(a.candidates).with_suffix(".refined.jsonl")
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
    from swiftjax.config import subcommand

    return subcommand("ebrm", {"run": run_main, "refine": score_refine_main}, argv)
