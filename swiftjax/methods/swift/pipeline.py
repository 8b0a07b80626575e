"""SWIFT for any (Backbone, Task): sample -> feature store -> head -> fused scores -> Best-of-N.

    swiftjax swift run   CONFIG [k=v ...]   # the whole pipeline; writes OUT/results.json
    swiftjax swift train CONFIG [k=v ...]   # sample the train split (if needed), train OUT/head
    swiftjax swift score CONFIG head=DIR [candidates=FILE]   # fused scores -> *_scored.jsonl
    swiftjax swift bon   SCORED.jsonl [--ks 1,2,4]           # Best-of-N table of a scored set
    swiftjax swift study CONFIG [k=v ...]    # many feature variants, one head each (study.py)
    swiftjax sample      CONFIG [split=test|train|both]      # only the candidate sets

``make demo`` is ``swiftjax swift run configs/demo.yaml`` (the world task on the shipped world
model). Every stage reuses its outputs when everything they depend on is unchanged:
candidates are keyed by the backbone's digest, the task and the sampling settings
(:mod:`swiftjax.sample`); a feature store by the backbone, the candidate rows (prompts and
token ids) and the feature spec; nothing is keyed by less than what it contains.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from swiftjax import bon
from swiftjax import selection as selection_mod
from swiftjax._io import atomic_file
from swiftjax.parallel import MeshConfig, use_mesh
from swiftjax.backbone import Backbone, load_backbone, BackboneConfig
from swiftjax.config import parse_typed, to_plain
from swiftjax.data import candidates as cands
from swiftjax.data.store import FeatureStore
from swiftjax.methods.swift import features as feats
from swiftjax.methods.swift.head_io import load_head, save_head
from swiftjax.train.metrics import EvalLogWriter
from swiftjax.methods.swift import train as train_mod
from swiftjax.methods.swift.prune import PruneConfig, pruned_best_of_n
from swiftjax.methods.swift.train import SwiftTrainConfig, train_head
from swiftjax.sample import SamplingSection, candidate_set, check_writable, digest
from swiftjax.tasks import TaskConfig, make_task

__all__ = ["SwiftRunConfig", "run", "feature_store_for", "feature_stores_for", "train_on_store", "score_rows", "in_group_order",
           "groups_of", "main", "sample_main"]


@dataclasses.dataclass(frozen=True)
class SwiftRunConfig:
    """Every default of a SWIFT run; YAML files and ``key=value`` overrides only override.

    model: an HF causal-LM directory, or ``world`` (the shipped world model).
    template / system / dtype: how the backbone is prompted (:class:`swiftjax.backbone.BackboneConfig`).
    n: candidates per problem.
    train_batch_size: rows decoded at once (and per shard) for the train split (null:
      sampling.batch_size): on CPU more rows in flight make the step's matmuls more efficient,
      while the test split keeps the size it was sampled with (the size is part of a set's key).
    max_len: the teacher-forced width of prompt + response
      (null: sampling.prompt_len + sampling.max_new_tokens, or the longest row rounded to 16).
    train_problems_used: train the head on the first m training problems only.
    rollouts_per_group: the recipe's groups (each problem's n rollouts cut into n / this).
    head / candidates / score_name: for ``swift score``.
    mesh: the device mesh the backbone samples and scores on (:class:`swiftjax.parallel.MeshConfig`;
      default one device).
    share_prompts: teacher-forced passes (feature stores, scoring) compute each prompt once for
      all its candidates and forward only the responses on its cache (the same features up to
      float rounding; :func:`swiftjax.methods.swift.features.write_stores`). Worth it when
      prompts are a large part of the rows (chat templates, long questions).
    """

    model: str = "world"
    template: str | None = None
    system: str | None = None
    dtype: str = "float32"
    task: TaskConfig = TaskConfig()
    out: str = "runs/swift"
    cache: str | None = None
    seed: int = 0
    n: int = 16
    sampling: SamplingSection = SamplingSection()
    train_batch_size: int | None = None
    max_len: int | None = None
    features: feats.FeatureSpec = feats.FeatureSpec(layers="all", mode="token_logprobs", k=4)
    rollouts_per_group: int = 8
    swift: SwiftTrainConfig = SwiftTrainConfig(loss="dpo")
    train_problems_used: int | None = None
    extract_batch: int = 256
    progress: bool = True
    split: str = "both"
    head: str | None = None
    candidates: str | None = None
    score_name: str = "swift"
    mesh: MeshConfig = MeshConfig()
    share_prompts: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n: expected a positive int, got {self.n}")
        if self.rollouts_per_group < 1 or self.n % self.rollouts_per_group:
            raise ValueError(f"rollouts_per_group: expected a divisor of n={self.n}, got {self.rollouts_per_group}")
        if self.train_batch_size is not None and self.train_batch_size < 1:
            raise ValueError(f"train_batch_size: expected a positive int or null, got {self.train_batch_size}")
        if self.extract_batch < 1:
            raise ValueError(f"extract_batch: expected a positive int, got {self.extract_batch}")
        if self.split not in ("train", "test", "both"):
            raise ValueError(f"split: expected train, test or both, got {self.split!r}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len: expected an int >= 2 or null, got {self.max_len}")
        if self.train_problems_used is not None and self.train_problems_used < 1:
            raise ValueError(f"train_problems_used: expected a positive int or null, got {self.train_problems_used}")


def backbone_of(cfg: SwiftRunConfig) -> Backbone:
    return load_backbone(BackboneConfig(path=cfg.model, template=cfg.template, system=cfg.system, dtype=cfg.dtype))


def in_group_order(rows, prompt_ids):
    """Rows sorted as ``candidates.group`` lays them out: prompt order, then candidate index."""
    pos = {p: i for i, p in enumerate(prompt_ids)}
    return sorted(rows, key=lambda r: (pos[r["prompt_id"]], r["index"]))


def groups_of(num_prompts: int, n: int, per_group: int) -> np.ndarray:
    """[G, per_group] row indices: each prompt's n rollouts cut into n / per_group groups."""
    if per_group < 1 or n % per_group:
        raise ValueError(f"rollouts_per_group: expected a divisor of n={n}, got {per_group}")
    return np.arange(num_prompts * n).reshape(-1, per_group)


def _teacher_forced_len(cfg: SwiftRunConfig, backbone: Backbone, rows) -> int:
    if cfg.max_len is not None:
        return cfg.max_len
    longest = max(len(backbone.prompt_ids(r["prompt"])) + len(r["token_ids"] or []) for r in rows)
    return -(-longest // 16) * 16


def encode_rows(backbone: Backbone, rows, max_len: int):
    """Teacher-forced (ids, attention_mask, response_mask) of candidate rows as generated."""
    missing = [i for i, r in enumerate(rows) if r["token_ids"] is None]
    if missing:
        raise ValueError(f"candidates: row {missing[0]} has no token_ids; SWIFT scores responses as generated")
    return backbone.encode_pairs([r["prompt"] for r in rows], [r["token_ids"] for r in rows], max_len)


def feature_store_for(backbone: Backbone, rows, spec: feats.FeatureSpec, out: Path, *, max_len: int,
                      batch_size: int, progress: bool, log=print, share_prompts: bool = False):
    """The feature store of a candidate set's response tokens, reused when one exists for the
    same backbone, rows (prompts and token ids) and spec (a half-written or corrupt one is rebuilt)."""
    stores, ids_, arr = feature_stores_for(backbone, rows, [spec], out, max_len=max_len, batch_size=batch_size,
                                           progress=progress, log=log, share_prompts=share_prompts)
    return stores[0], ids_, arr


def feature_stores_for(backbone: Backbone, rows, specs, out: Path, *, max_len: int, batch_size: int,
                       progress: bool, log=print, share_prompts: bool = False):
    """:func:`feature_store_for` of several specs: the stores that do not exist yet are written
    from ONE forward over the set (:func:`swiftjax.methods.swift.features.write_stores`),
    resumably: a killed run continues from the stores' last checkpoint (every 64 rows).
    Returns (stores in spec order, prompt ids, grouped arrays)."""
    ids_, arr = cands.group(rows)
    ordered = in_group_order(rows, ids_)
    rows_key = digest([(r["prompt"], r["token_ids"]) for r in ordered])
    keys = [{"model": backbone.digest, "rows": rows_key, "spec": s.to_dict(), "max_len": max_len,
             **({"shared_prompts": True} if share_prompts else {})} for s in specs]
    paths = [Path(out) / f"features_{digest(k)}" for k in keys]
    stores: dict[int, FeatureStore] = {}
    for i, (path, key) in enumerate(zip(paths, keys)):
        try:
            store = FeatureStore(path)
            if store.meta.get("key") == key:
                log(f"reusing {path}")
                stores[i] = store
        except ValueError:
            pass
    todo = [i for i in range(len(specs)) if i not in stores]
    if todo:
        t0 = time.time()
        ids, attn, resp = encode_rows(backbone, ordered, max_len)
        n = arr["correct"].shape[1]
        feats.write_stores([paths[i] for i in todo], backbone.model, [specs[i] for i in todo], ids, attn, resp,
                           arr["correct"].reshape(-1).astype(np.float32), np.repeat(np.arange(len(ids_)), n),
                           batch_size=batch_size, progress=progress, overwrite=True, share_prompts=share_prompts,
                           resume=True, metas=[{"key": keys[i], "model": backbone.describe()} for i in todo])
        for i in todo:
            stores[i] = FeatureStore(paths[i])
            log(f"extracted features of {len(stores[i])} candidates ({stores[i].num_tokens} response tokens, "
                f"F={stores[i].feature_dim}) -> {paths[i]}")
        log(f"one forward wrote {len(todo)} feature store(s) in {time.time() - t0:.0f}s")
    return [stores[i] for i in range(len(specs))], ids_, arr


def train_on_store(store, correct, cfg: SwiftRunConfig, *, log=print):
    """Train a head on a store whose rows are [P, N] candidates in group order."""
    p, n = correct.shape
    groups = groups_of(p, n, cfg.rollouts_per_group)
    labels = correct.reshape(-1)[groups]
    t0 = time.time()
    writer = None if cfg.progress else EvalLogWriter(log, "  validation at ")  # a background run's log
    params, info = train_head(store, groups, labels, cfg.swift, progress=cfg.progress, writer=writer)
    info["train_seconds"] = round(time.time() - t0, 1)
    info["config"] = to_plain(cfg.swift)
    log(f"trained SWIFT head ({info['num_params']} params, loss {cfg.swift.loss}) in {info['train_seconds']:.0f}s, "
        f"best validation loss {info['best_val_loss']:.4f}")
    return params, info


def score_rows(backbone: Backbone, params, spec, rows, *, max_len: int, batch_size: int, progress: bool,
               share_prompts: bool = False) -> np.ndarray:
    """Fused SWIFT scores of candidate rows (in the rows' own order)."""
    ids, attn, resp = encode_rows(backbone, rows, max_len)
    if share_prompts:
        return feats.fused_scores_many(backbone.model, [(params, spec)], ids, attn, resp, batch_size=batch_size,
                                       progress=progress, share_prompts=True)[0]
    return feats.fused_scores_batched(backbone.model, params, spec, ids, attn, resp, batch_size=batch_size,
                                      progress=progress)


def _candidates(cfg: SwiftRunConfig, backbone, task, split: str, log):
    sampling = cfg.sampling
    if split == "train" and cfg.train_batch_size is not None:
        sampling = dataclasses.replace(sampling, batch_size=cfg.train_batch_size)
    return candidate_set(backbone, task, split, n=cfg.n, sampling=sampling, seed=cfg.seed,
                         out_dir=Path(cfg.cache or cfg.out), progress=cfg.progress, log=log)


def _train_rows(cfg, task, rows):
    if cfg.train_problems_used:
        keep = {p.id for p in task.problems("train")[: cfg.train_problems_used]}
        rows = [r for r in rows if r["prompt_id"] in keep]
    return rows


def _max_len(cfg, backbone, *row_sets):
    if cfg.max_len is not None:
        return cfg.max_len
    if cfg.sampling.prompt_len is not None:
        return cfg.sampling.prompt_len + cfg.sampling.max_new_tokens
    return _teacher_forced_len(cfg, backbone, [r for rows in row_sets for r in rows])


def train(cfg: SwiftRunConfig, backbone=None, task=None, *, log=print):
    """Sample (or reuse) the training candidates, build their feature store and train a head;
    saves it to ``OUT/head``. Returns (params, info, store)."""
    out = check_writable(Path(cfg.out), "out")
    if cfg.cache:
        check_writable(Path(cfg.cache), "cache")
    backbone = backbone or backbone_of(cfg)
    task = task or make_task(cfg.task)
    rows, path = _candidates(cfg, backbone, task, "train", log)
    rows = _train_rows(cfg, task, rows)
    max_len = _max_len(cfg, backbone, rows)
    store, tr_ids, tr_arr = feature_store_for(backbone, rows, cfg.features, Path(cfg.cache or out), max_len=max_len,
                                              batch_size=cfg.extract_batch, progress=cfg.progress, log=log,
                                              share_prompts=cfg.share_prompts)
    params, info = train_on_store(store, tr_arr["correct"], cfg, log=log)
    info["n_train_problems"] = len(tr_ids)
    save_head(out / "head", params, cfg.features,
              {**info, "model": backbone.describe(), "task": task.describe(), "candidates": str(path),
               "max_len": max_len})
    return params, info, store


def run(cfg: SwiftRunConfig, *, report: bool = True, log=print) -> dict:
    """The whole pipeline; writes OUT/results.json, OUT/test_scores.npy, OUT/bon.png."""
    t_start = time.time()
    out = check_writable(Path(cfg.out), "out")
    backbone = backbone_of(cfg)
    task = make_task(cfg.task)
    test_rows, _ = _candidates(cfg, backbone, task, "test", log)
    params, info, store = train(cfg, backbone, task, log=log)
    max_len = _max_len(cfg, backbone, test_rows)

    te_ids, te_arr = cands.group(test_rows)
    t0 = time.time()
    scores = score_rows(backbone, params, cfg.features, in_group_order(test_rows, te_ids), max_len=max_len,
                        batch_size=cfg.extract_batch, progress=cfg.progress, share_prompts=cfg.share_prompts)
    log(f"fused-scored {len(scores)} test candidates in {time.time() - t0:.0f}s")
    scores = scores.reshape(te_arr["correct"].shape)

    table = bon.bon_table(te_arr["correct"], scores={"swift": scores}, answers=te_arr["answers"],
                          ks=list(range(1, cfg.n + 1)))
    t0 = time.time()
    selection = _selection(cfg, backbone, task, params, store, scores, te_arr, log)
    log(f"selection table ({len(selection['curves'])} curves over random subsets) in {time.time() - t0:.0f}s")
    t0 = time.time()
    pruning = _pruning(cfg, backbone, params, in_group_order(test_rows, te_ids), te_arr, scores, max_len)
    log(f"pruning replay in {time.time() - t0:.0f}s")
    result = {
        "bon": {k: table[k] for k in ("random", "majority", "swift", "oracle")},
        "n_test_problems": len(te_ids),
        "n_train_problems": info["n_train_problems"],
        "n": cfg.n,
        "pass@1": float(te_arr["correct"].mean() * 100),
        "selection": selection,
        "pruning": pruning,
        "swift": {"features": cfg.features.to_dict(), "feature_dim": int(store.feature_dim), **info},
        "model": backbone.describe(),
        "task": task.describe(),
        "config": to_plain(cfg),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    k = str(cfg.n)
    gap = result["bon"]["oracle"][k] - result["pass@1"]
    result["gap_closed"] = (result["bon"]["swift"][k] - result["pass@1"]) / gap if gap > 0 else None
    with atomic_file(out / "results.json", "w") as f:
        f.write(json.dumps(result, indent=2, default=float))
    with atomic_file(out / "test_scores.npy", "wb") as f:
        np.save(f, scores)
    if report:
        plot_bon(result, out / "bon.png", title=f"Best-of-N, {task.name} ({result['n_test_problems']} test problems)")
        print_table(result)
        print_selection(result)
        print_pruning(result)
    return result


def _selection(cfg: SwiftRunConfig, backbone, task, params, store, swift_scores, te_arr, log) -> dict:
    """Every score (SWIFT and the sampler's confidences) under every rule, over random
    k-subsets; vote temperatures fitted on the training candidates (SWIFT's in-sample)."""
    tr_rows, _ = _candidates(cfg, backbone, task, "train", log)
    _, tr_arr = cands.group(_train_rows(cfg, task, tr_rows))
    tr_swift = train_mod.score_rows(params, store, np.arange(len(store))).reshape(tr_arr["correct"].shape)
    test = {"swift": swift_scores, **te_arr["scores"]}
    train_scores = {"swift": tr_swift, **tr_arr["scores"]}
    temps = {name: selection_mod.fit_temperature(tr_arr["answers"], tr_arr["correct"], train_scores[name])
             for name in test if name in train_scores}
    ks = bon.default_ks(cfg.n)
    curves = selection_mod.selection_table(te_arr["answers"], te_arr["correct"], test, ks, temperatures=temps,
                                           seed=cfg.seed)
    return {"ks": ks, "temperatures": temps,
            "curves": {c: {str(k): list(v) for k, v in vals.items()} for c, vals in curves.items()}}


PRUNE_GRID = ((8, 0.25), (8, 0.5), (16, 0.25), (16, 0.5))  # (every tokens, fraction stopped)


def _pruning(cfg: SwiftRunConfig, backbone, params, ordered_rows, te_arr, swift_scores, max_len: int) -> dict:
    """SWIFT-pruned Best-of-N replayed on the test candidates (the same decisions as pruning
    while sampling, :mod:`swiftjax.methods.swift.prune`): accuracy and generated tokens for
    each (every, fraction) of :data:`PRUNE_GRID`, against plain Best-of-k at k/N of the tokens."""
    ids, attn, resp = encode_rows(backbone, ordered_rows, max_len)
    full = feats.fused_prefix_scores_batched(backbone.model, params, cfg.features, ids, attn, resp,
                                             batch_size=cfg.extract_batch, progress=cfg.progress)
    p, n = te_arr["correct"].shape
    lengths = np.array([len(r["token_ids"]) for r in ordered_rows])
    t = int(lengths.max())
    prefix = np.empty((p * n, t), np.float32)
    for i, r in enumerate(np.asarray(resp, bool)):
        own = full[i][r][: lengths[i]]
        prefix[i] = np.concatenate([own, np.full(t - len(own), own[-1] if len(own) else 0.0)])
    eos = set(backbone.eos_ids)
    finished = np.array([bool(r["token_ids"]) and r["token_ids"][-1] in eos for r in ordered_rows])
    out = []
    for every, frac in PRUNE_GRID:
        res = pruned_best_of_n(prefix.reshape(p, n, t), swift_scores, lengths.reshape(p, n), finished.reshape(p, n),
                               te_arr["correct"], PruneConfig(every=every, fraction=frac), answers=te_arr["answers"])
        out.append({"every": every, "fraction": frac, **res})
    result = {"n": n, "configs": out}
    conf = _confidence_prefixes(ordered_rows, lengths, t, cfg.sampling.confidence_window)
    if conf is not None:  # the same mechanism on the sampler's own confidence: DeepConf online
        final = np.array([r["scores"]["lowest_group"] for r in ordered_rows]).reshape(p, n)
        result["confidence"] = [
            {"every": every, "fraction": frac,
             **pruned_best_of_n(conf.reshape(p, n, t), final, lengths.reshape(p, n), finished.reshape(p, n),
                                te_arr["correct"], PruneConfig(every=every, fraction=frac), answers=te_arr["answers"])}
            for every, frac in PRUNE_GRID]
    return result


def _confidence_prefixes(rows, lengths, t: int, window: int) -> np.ndarray | None:
    """[rows, t] each response prefix's lowest-group confidence from the stored per-token
    confidences (held after the response ends), or None when the rows lack them."""
    if not all("token_confidence" in r and "lowest_group" in r.get("scores", {}) for r in rows):
        return None
    out = np.empty((len(rows), t), np.float32)
    for i, r in enumerate(rows):
        c = selection_mod.prefix_lowest_group(r["token_confidence"][: lengths[i]], window)
        out[i] = np.concatenate([c, np.full(t - len(c), c[-1] if len(c) else 0.0)])
    return out


def print_pruning(result: dict) -> None:
    pr = result.get("pruning")
    if not pr:
        return
    sel = result.get("selection", {}).get("curves", {})
    print(f"\nSWIFT-pruned sampling (replayed): Best-of-{pr['n']} among the kept candidates")
    print(f"{'every':>6}{'drop':>6}{'tokens':>9}{'kept/prob':>10}{'best':>16}{'vote':>16}")

    def line(c):
        vote = f"{c['vote_accuracy']:>9.1f} ±{c['vote_se']:>4.1f}" if "vote_accuracy" in c else ""
        print(f"{c['every']:>6}{c['fraction']:>6.2f}{100 * c['token_fraction']:>8.0f}%{c['kept_per_problem']:>10.1f}"
              f"{c['accuracy']:>9.1f} ±{c['se']:>4.1f}{vote}")

    for c in pr["configs"]:
        line(c)
    if "swift/best" in sel:
        plain = ", ".join(f"@{k} {v[0]:.1f}" for k, v in sel["swift/best"].items())
        print(f"plain SWIFT Best-of-k (random k-subsets; k/N of the tokens): {plain}")
    if pr.get("confidence"):
        print("the same pruning by the sampler's lowest-group confidence (DeepConf online; best by it, vote):")
        for c in pr["confidence"]:
            line(c)


def print_selection(result: dict) -> None:
    sel = result.get("selection")
    if not sel:
        return
    ks = sel["ks"]
    curves = {c: {k: tuple(v[str(k)]) for k in ks} for c, v in sel["curves"].items()}
    print(f"\nSelection over random k-subsets (accuracy % ± standard error over problems); "
          f"vote temperatures fitted on train: {', '.join(f'{k}={v:.3g}' for k, v in sel['temperatures'].items())}")
    print(selection_mod.format_selection(curves, ks))


def plot_bon(result: dict, path: Path, title: str = "Best-of-N") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in result["bon"].items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[str(k)] for k in ks], marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict) -> None:
    ks = [k for k in ("1", "2", "4", "8", "16", "32", "64") if k in result["bon"]["random"]]
    print("\nBest-of-N accuracy (%) on", result["n_test_problems"], "held-out problems")
    print(f"{'method':<10}" + "".join(f"{'@' + k:>8}" for k in ks))
    for name, curve in result["bon"].items():
        print(f"{name:<10}" + "".join(f"{curve[k]:>8.1f}" for k in ks))
    if result.get("gap_closed") is not None:
        print(f"SWIFT closes {100 * result['gap_closed']:.0f}% of the pass@1 -> oracle@{result['n']} gap; "
              f"wall {result['wall_seconds']:.0f}s")


# ----------------------------------------------------------------------------- commands


def _score(cfg: SwiftRunConfig) -> int:
    if not cfg.head:
        raise ValueError("swift score: expected head=DIR (a trained head, e.g. OUT/head)")
    params, spec, meta = load_head(Path(cfg.head))
    out = check_writable(Path(cfg.out), "out")
    backbone = backbone_of(cfg)
    trained_on = meta.get("info", {}).get("model", {}).get("digest")
    if trained_on and trained_on != backbone.digest:
        raise ValueError(f"head={cfg.head}: trained on model {meta['info']['model'].get('path')} "
                         f"(digest {trained_on[:12]}), not on model={cfg.model} (digest {backbone.digest[:12]})")
    if cfg.candidates:
        src = Path(cfg.candidates)
        if not src.is_file():
            raise ValueError(f"candidates: expected a candidate jsonl file, {src} "
                             + ("is a directory" if src.is_dir() else "does not exist"))
        rows = cands.read_candidates(src)
    else:
        rows, src = _candidates(cfg, backbone, make_task(cfg.task), "test", print)
    max_len = cfg.max_len or _teacher_forced_len(cfg, backbone, rows)  # right padding: any width >= the rows
    s = score_rows(backbone, params, spec, rows, max_len=max_len, batch_size=cfg.extract_batch, progress=cfg.progress,
                   share_prompts=cfg.share_prompts)
    for r, v in zip(rows, s):
        r.setdefault("scores", {})[cfg.score_name] = float(v)
    dst = out / (src.stem + "_scored.jsonl")
    cands.write_candidates(dst, rows)
    print(f"scored {len(rows)} candidates -> {dst}")
    return 0


def bon_main(argv) -> int:
    """``swiftjax swift bon FILE [--ks 1,2,4] [--draws 64] [--q 0.5] [--fit TRAIN_FILE]
    [--format candidates|qwen-math-bon]``: every
    Best-of-N curve of a scored candidate file. ``first_k``: the first k candidates (generation
    order); ``selection``: every score under every rule (best, weighted, filter-then-vote,
    Borda; plus random, majority, oracle) averaged over random k-subsets with standard errors.
    Weighted votes use a softmax temperature fitted on ``--fit`` (another scored file, e.g. the
    train split) or 1. ``--format qwen-math-bon``: Qwen2.5-Math's Best-of-N files (``response``,
    ``pred``, ``score``, ``pred_score``), answers compared by their normalised MATH key."""
    argv = list(argv)
    opts = {"--ks": None, "--draws": "64", "--q": "0.5", "--fit": None, "--format": "candidates"}
    for flag in list(opts):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ValueError(f"{flag}: expected a comma-separated list of k after it, e.g. --ks 1,2,4"
                                 if flag == "--ks" else f"{flag}: expected a value after it")
            opts[flag] = argv[i + 1]
            del argv[i: i + 2]
    ks = None
    if opts["--ks"] is not None:
        try:
            ks = [int(k) for k in opts["--ks"].split(",")]
        except ValueError:
            raise ValueError(f"--ks: expected a comma-separated list of ints, got {opts['--ks']!r}") from None
    try:
        draws, q = int(opts["--draws"]), float(opts["--q"])
    except ValueError:
        raise ValueError(f"--draws / --q: expected an int and a fraction, got {opts['--draws']!r} and "
                         f"{opts['--q']!r}") from None
    if draws < 1 or not 0 < q <= 1:
        raise ValueError(f"--draws / --q: expected draws >= 1 and q in (0, 1], got {draws} and {q}")
    if len(argv) != 1:
        raise ValueError("swift bon: expected one scored candidate jsonl file")
    src = _candidate_file(argv[0], "swift bon")
    if opts["--format"] not in ("candidates", "qwen-math-bon"):
        raise ValueError(f"--format: expected candidates or qwen-math-bon, got {opts['--format']!r}")
    if opts["--format"] == "qwen-math-bon":
        from swiftjax.data import math as math_grader

        ids_, arr = cands.group(cands.from_math_bon(src))
        arr["answers"] = [[math_grader.answer_key(a) for a in grp] for grp in arr["answers"]]
    else:
        ids_, arr = cands.group(cands.read_candidates(src))
    table = bon.bon_table(arr["correct"], scores=arr["scores"], answers=arr["answers"], ks=ks)
    temps = {}
    if opts["--fit"]:
        _, fit = cands.group(cands.read_candidates(_candidate_file(opts["--fit"], "--fit")))
        temps = {name: selection_mod.fit_temperature(fit["answers"], fit["correct"], fit["scores"][name])
                 for name in arr["scores"] if name in fit["scores"]}
    ks_sel = ks or bon.default_ks(arr["correct"].shape[1])
    sel = selection_mod.selection_table(arr["answers"], arr["correct"], arr["scores"], ks_sel, temperatures=temps,
                                        q=q, draws=draws)
    print(selection_mod.format_selection(sel, ks_sel), file=sys.stderr)
    print(json.dumps({"n_problems": len(ids_), "first_k": table, "temperatures": temps,
                      "selection": {c: {str(k): list(v) for k, v in vals.items()} for c, vals in sel.items()}},
                     indent=1))
    return 0


def _candidate_file(arg: str, what: str) -> Path:
    src = Path(arg)
    if not src.is_file():
        raise ValueError(f"{what}: expected a candidate jsonl file, {src} "
                         + ("is a directory" if src.is_dir() else "does not exist"))
    return src


def sample_main(argv) -> int:
    """``swiftjax sample CONFIG [split=test|train|both]``: only the candidate sets."""
    cfg = parse_typed(SwiftRunConfig, argv, "sample")
    check_writable(Path(cfg.cache or cfg.out), "out")
    with use_mesh(cfg.mesh):
        backbone, task = backbone_of(cfg), make_task(cfg.task)
        for split in (("test", "train") if cfg.split == "both" else (cfg.split,)):
            _, path = _candidates(cfg, backbone, task, split, print)
            print(path)
    return 0


def main(argv) -> int:
    """``swiftjax swift run|train|score|bon ...``"""
    subs = ("run", "train", "score", "bon", "study")
    if not argv or argv[0] not in subs:
        raise ValueError(f"swift: expected a subcommand, one of {', '.join(subs)} (swiftjax swift run CONFIG ...)")
    sub, rest = argv[0], list(argv[1:])
    if sub == "bon":
        return bon_main(rest)
    if sub == "study":
        from swiftjax.methods.swift import study

        return study.main(rest)
    if sub == "score" and "--refine" in rest:
        from swiftjax.methods.ebrm.pipeline import score_refine_main

        return score_refine_main(rest)
    cfg = parse_typed(SwiftRunConfig, rest, f"swift {sub}")
    with use_mesh(cfg.mesh):
        if sub == "run":
            run(cfg)
        elif sub == "train":
            train(cfg)
            print(f"saved head -> {Path(cfg.out) / 'head'}")
        else:
            return _score(cfg)
    return 0


def demo_main(argv) -> int:
    """``swiftjax demo [CONFIG]``: ``swift run`` on configs/demo.yaml (the world task)."""
    argv = list(argv)
    if not argv or "=" in argv[0]:
        argv = ["configs/demo.yaml"] + argv
    return main(["run", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
