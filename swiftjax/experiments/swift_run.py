"""SWIFT on a candidate set: ``train-swift``, ``score`` (``--refine``: EBRM) and ``bon``.

    swiftjax train-swift [configs/swift.yaml] candidates=runs/x/cands_train.jsonl out=runs/swift
    swiftjax score  [configs/swift.yaml] candidates=runs/x/cands_test.jsonl head=runs/swift/head
    swiftjax score --refine ...          # EBRM refinement, see swiftjax.experiments.ebrm_run
    swiftjax bon    SCORED.jsonl [--ks 1,2,4,8,16]
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from swiftjax import bon
from swiftjax.config import config_from_argv, to_dataclass
from swiftjax.data import candidates as cands

DEFAULTS = {
    "model": None,              # world-model dir (default: the shipped one)
    "candidates": None,         # candidate jsonl (with token_ids)
    "out": "runs/swift",
    "head": None,               # trained head dir (score)
    "max_len": 128,
    "features": {"layers": "all", "apply_norm": False, "mode": "hidden", "k": None},
    "rollouts_per_group": 8,
    "swift": {},                # SwiftTrainConfig fields
    "extract_batch": 256,
    "score_name": "swift",
    "progress": True,
}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def in_group_order(rows, prompt_ids):
    """Rows sorted as ``candidates.group`` lays them out: prompt order, then candidate index."""
    pos = {p: i for i, p in enumerate(prompt_ids)}
    return sorted(rows, key=lambda r: (pos[r["prompt_id"]], r["index"]))


def groups_of(num_prompts: int, n: int, per_group: int) -> np.ndarray:
    """[G, per_group] row indices: each prompt's n rollouts cut into n / per_group groups."""
    if per_group < 1 or n % per_group:
        raise ValueError(f"rollouts_per_group: expected a divisor of n={n}, got {per_group}")
    return np.arange(num_prompts * n).reshape(-1, per_group)


def feature_store_for(model, tok, rows, spec, out: Path, *, max_len: int, batch_size: int,
                      progress: bool, log=print):
    """The feature store of a candidate set's response tokens, reused when it already exists
    for the same rows and spec (a half-written or corrupt one is rebuilt)."""
    from swiftjax import features as feats
    from swiftjax.data.store import FeatureStore
    from swiftjax.experiments.world import encode_candidate_rows

    ids_, arr = cands.group(rows)
    ordered = in_group_order(rows, ids_)
    path = Path(out) / f"features_{digest({'rows': digest([r['token_ids'] for r in ordered]), 'spec': spec.to_dict()})}"
    try:
        store = FeatureStore(path)
        log(f"reusing {path}")
        return store, ids_, arr
    except ValueError:
        pass
    t0 = time.time()
    ids, attn, resp = encode_candidate_rows(tok, ordered, max_len)
    n = arr["correct"].shape[1]
    feats.write_store(path, model, spec, ids, attn, resp, arr["correct"].reshape(-1).astype(np.float32),
                      np.repeat(np.arange(len(ids_)), n), batch_size=batch_size, progress=progress,
                      overwrite=True)
    store = FeatureStore(path)
    log(f"extracted features of {len(store)} candidates ({store.num_tokens} response tokens, "
        f"F={store.feature_dim}) -> {path} in {time.time() - t0:.0f}s")
    return store, ids_, arr


def train_on_store(store, correct, cfg: dict, *, log=print):
    """Train a head on a store whose rows are [P, N] candidates in group order."""
    from swiftjax.swift_train import SwiftTrainConfig, train_head

    p, n = correct.shape
    groups = groups_of(p, n, cfg["rollouts_per_group"])
    labels = correct.reshape(-1)[groups]
    scfg = to_dataclass(SwiftTrainConfig, cfg["swift"], "swift")
    t0 = time.time()
    params, info = train_head(store, groups, labels, scfg, progress=cfg["progress"])
    info["train_seconds"] = round(time.time() - t0, 1)
    info["config"] = dict(scfg.__dict__)
    log(f"trained SWIFT head ({info['num_params']} params, loss {scfg.loss}) in {info['train_seconds']:.0f}s, "
        f"best validation loss {info['best_val_loss']:.4f}")
    return params, info


def save_head(path: Path, params, spec, info: dict) -> Path:
    """A trained head as an orbax checkpoint plus its feature spec (``head.json``)."""
    import shutil
    import tempfile

    from swiftjax.train.ckpt import Checkpointer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:  # build beside the target, then swap it in: a rerun replaces the old head whole
        ck = Checkpointer(tmp / "ckpt", max_to_keep=1, async_save=False)
        ck.save(0, {"params": params}, {"spec": spec.to_dict()})
        ck.wait_until_finished()
        ck.close()
        shape = [int(d) for d in np.shape(params["kernel"])]
        (tmp / "head.json").write_text(json.dumps({"spec": spec.to_dict(), "kernel_shape": shape, "info": info},
                                                  indent=2, default=float))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_head(path: Path):
    import jax

    from swiftjax import features as feats
    from swiftjax.train.ckpt import Checkpointer

    path = Path(path)
    meta_file = path / "head.json"
    if not meta_file.is_file():
        raise ValueError(f"head: expected a trained head directory with head.json at {path}")
    meta = json.loads(meta_file.read_text())
    spec = feats.FeatureSpec.from_dict(meta["spec"])
    f, c = meta["kernel_shape"]
    target = {"params": {"kernel": np.zeros((f, c), np.float32), "bias": np.zeros((c,), np.float32)}}
    restored = Checkpointer(path / "ckpt").restore(target)
    if restored is None:
        raise ValueError(f"head: no readable checkpoint under {path / 'ckpt'}")
    params = jax.tree.map(np.asarray, restored.state["params"])
    return params, spec


def score_rows(model, tok, params, spec, rows, *, max_len: int, batch_size: int, progress: bool) -> np.ndarray:
    """Fused SWIFT scores of candidate rows (in the rows' own order)."""
    from swiftjax import features as feats
    from swiftjax.experiments.world import encode_candidate_rows

    ids, attn, resp = encode_candidate_rows(tok, rows, max_len)
    return feats.fused_scores_batched(model, params, spec, ids, attn, resp, batch_size=batch_size,
                                      progress=progress)


def train_main(argv) -> int:
    from swiftjax import features as feats
    from swiftjax.experiments.world import load_world_model

    cfg = config_from_argv(argv, DEFAULTS)
    if not cfg["candidates"]:
        raise ValueError("train-swift: expected candidates=PATH.jsonl (a sampled candidate set)")
    model, _, tok = load_world_model(cfg["model"])
    spec = feats.FeatureSpec.from_dict(cfg["features"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    store, _, arr = feature_store_for(model, tok, cands.read_candidates(cfg["candidates"]), spec, out,
                                      max_len=cfg["max_len"], batch_size=cfg["extract_batch"],
                                      progress=cfg["progress"])
    params, info = train_on_store(store, arr["correct"], cfg)
    print(f"saved head -> {save_head(out / 'head', params, spec, info)}")
    return 0


def score_main(argv) -> int:
    if "--refine" in argv:
        from swiftjax.experiments.ebrm_run import score_refine_main

        return score_refine_main(argv)
    from swiftjax.experiments.world import load_world_model

    cfg = config_from_argv(argv, DEFAULTS)
    if not cfg["candidates"] or not cfg["head"]:
        raise ValueError("score: expected candidates=PATH.jsonl and head=DIR")
    model, _, tok = load_world_model(cfg["model"])
    params, spec = load_head(Path(cfg["head"]))
    rows = cands.read_candidates(cfg["candidates"])
    s = score_rows(model, tok, params, spec, rows, max_len=cfg["max_len"], batch_size=cfg["extract_batch"],
                   progress=cfg["progress"])
    for r, v in zip(rows, s):
        r.setdefault("scores", {})[cfg["score_name"]] = float(v)
    out = Path(cfg["out"]) / (Path(cfg["candidates"]).stem + "_scored.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    cands.write_candidates(out, rows)
    print(f"scored {len(rows)} candidates -> {out}")
    return 0


def bon_main(argv) -> int:
    if not argv:
        raise ValueError("bon: expected a scored candidate jsonl")
    ks = None
    if "--ks" in argv:
        i = argv.index("--ks")
        ks = [int(k) for k in argv[i + 1].split(",")]
    ids_, arr = cands.group(cands.read_candidates(argv[0]))
    table = bon.bon_table(arr["correct"], scores=arr["scores"], answers=arr["answers"], ks=ks)
    print(json.dumps({"n_problems": len(ids_), **table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
