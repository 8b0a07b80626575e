"""`make demo`: the main job on the embedded world, end to end, from the shipped model.

1. sample N candidates for held-out test problems and for training problems (KV-cache decoder);
2. extract SWIFT features of the training candidates' response tokens into an on-disk,
   checksummed bf16 feature store;
3. train a gated SWIFT head with the paper's recipe (best validation weights kept);
4. score the test candidates with the *fused* path (head folded into the forward pass, no
   [T, F] features held) and report Best-of-N for random / majority / SWIFT / oracle.

Writes runs/demo/results.json, runs/demo/bon.png and prints the table. Stages reuse their
outputs from an earlier run when the inputs that determine them are unchanged.

    swiftjax demo [configs/demo.yaml] [key=value ...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from swiftjax import bon
from swiftjax.config import config_from_argv
from swiftjax.data import candidates as cands
from swiftjax.data import world
from swiftjax.experiments import swift_run
from swiftjax.experiments import world as wexp

DEFAULTS = {
    "out": "runs/demo",
    "cache": None,                      # where candidates and feature stores live (default: out)
    "seed": 0,
    "model": None,                      # world-model dir; default: the shipped one
    "n_test_problems": 300,
    "n_train_problems": 1000,
    "train_problems_used": None,        # train the head on the first m sampled problems only
    "n": 16,
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64,
                 "prompt_len": 64, "batch_size": 512},
    "max_len": 128,                     # teacher-forced prompt + response
    "features": {"layers": "all", "apply_norm": False, "mode": "token_logprobs", "k": 4},
    "rollouts_per_group": 8,            # training groups of the recipe (2 problems x 8 rollouts)
    "swift": {"loss": "dpo"},           # SwiftTrainConfig fields
    "extract_batch": 256,
    "progress": True,
}


def candidates_for(cfg: dict, split: str, n_problems: int, model, tok, log) -> list[dict]:
    """Sampled candidates of a split, cached under out/ keyed by what determines them."""
    out = Path(cfg["cache"] or cfg["out"])
    model_dir = Path(cfg["model"] or wexp.ASSET_DIR)
    key = {"split": split, "n_problems": n_problems, "n": cfg["n"], "seed": cfg["seed"],
           "sampling": cfg["sampling"], "model_sha256": wexp.model_digest(model_dir)}
    path = out / f"candidates_{split}_{swift_run.digest(key)}.jsonl"

    def sample():
        problems = world.make_split(split, n_problems, seed=cfg["seed"])
        s = cfg["sampling"]
        t0 = time.time()
        rows = wexp.sample_candidates(model, tok, problems, n=cfg["n"], temperature=s["temperature"],
                                      top_p=s["top_p"], top_k=s["top_k"], max_new_tokens=s["max_new_tokens"],
                                      prompt_len=s["prompt_len"], batch_size=s["batch_size"],
                                      seed=cfg["seed"] + (0 if split == "test" else 1),
                                      progress=cfg["progress"])
        log(f"sampled {len(rows)} {split} candidates in {time.time() - t0:.0f}s")
        return rows

    if path.is_file():
        log(f"candidates: {path}")
    return cands.cached_candidates(path, key, sample)


def run(cfg: dict, *, report: bool = True) -> dict:
    from swiftjax import features as feats

    t_start = time.time()
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    log = print
    model, mcfg, tok = wexp.load_world_model(cfg["model"])
    spec = feats.FeatureSpec.from_dict(cfg["features"])

    test_rows = candidates_for(cfg, "test", cfg["n_test_problems"], model, tok, log)
    train_rows = candidates_for(cfg, "train", cfg["n_train_problems"], model, tok, log)
    if cfg["train_problems_used"]:
        keep = set(world.make_split("train", cfg["n_train_problems"], seed=cfg["seed"])[i].id
                   for i in range(min(cfg["train_problems_used"], cfg["n_train_problems"])))
        train_rows = [r for r in train_rows if r["prompt_id"] in keep]
    cache = Path(cfg["cache"] or out)

    # -- features of the training candidates -> checksummed on-disk store; train the head
    store, tr_ids, tr_arr = swift_run.feature_store_for(model, tok, train_rows, spec, cache, max_len=cfg["max_len"],
                                                        batch_size=cfg["extract_batch"], progress=cfg["progress"],
                                                        log=log)
    params, info = swift_run.train_on_store(store, tr_arr["correct"], cfg, log=log)
    swift_run.save_head(out / "head", params, spec, info)

    # -- fused scoring of the test candidates
    te_ids, te_arr = cands.group(test_rows)
    t0 = time.time()
    scores = swift_run.score_rows(model, tok, params, spec, swift_run.in_group_order(test_rows, te_ids),
                                  max_len=cfg["max_len"], batch_size=cfg["extract_batch"], progress=cfg["progress"])
    log(f"fused-scored {len(scores)} test candidates in {time.time() - t0:.0f}s")
    scores = scores.reshape(te_arr["correct"].shape)

    table = bon.bon_table(te_arr["correct"], scores={"swift": scores}, answers=te_arr["answers"],
                          ks=list(range(1, cfg["n"] + 1)))
    result = {
        "bon": {k: table[k] for k in ("random", "majority", "swift", "oracle")},
        "n_test_problems": len(te_ids),
        "n_train_problems": len(tr_ids),
        "n": cfg["n"],
        "pass@1": float(te_arr["correct"].mean() * 100),
        "swift": {"features": cfg["features"], "feature_dim": int(store.feature_dim), **info},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    k = str(cfg["n"])
    gap = result["bon"]["oracle"][k] - result["pass@1"]
    result["gap_closed"] = (result["bon"]["swift"][k] - result["pass@1"]) / gap if gap > 0 else None
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    np.save(out / "test_scores.npy", scores)
    if report:
        plot_bon(result, out / "bon.png")
        print_table(result)
    return result


def plot_bon(result: dict, path: Path) -> None:
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
    ax.set_title(f"Best-of-N on the embedded world ({result['n_test_problems']} test problems)")
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


def main(argv) -> int:
    cfg = config_from_argv(argv, DEFAULTS)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
