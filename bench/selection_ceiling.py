"""How far SWIFT selection could go on a candidate set: heads fitted to the test candidates'
own labels (a diagnostic upper bound for a gated linear head on those features, never a
result), beside the honest head `swift run` trained on the training candidates.

    python bench/selection_ceiling.py configs/demo.yaml [key=value ...]

Uses the config's cached test candidates and the head in OUT/head (`make demo` first); writes
the test candidates' feature store into the cache (keyed like every store). Fits one head per
(loss, learning rate) of a small grid to every test problem (no held-out split; the recipe's
epochs), and prints pass@1, oracle@N, majority@N and SWIFT Best-of-N at k = N of the honest
head and of each fitted one, with standard errors and the fraction of the pass@1 -> oracle@N
gap closed. When the best fitted head stays below a goal, no head of that form on those
features reaches it by training alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from swiftjax import selection
from swiftjax.config import parse_typed
from swiftjax.methods.swift import pipeline as P
from swiftjax.methods.swift import train as T
from swiftjax.methods.swift.head_io import load_head
from swiftjax.tasks import make_task

GRID = (("dpo", 1e-3), ("dpo", 1e-2), ("infonca", 1e-3), ("ce", 1e-3))


def _at_n(rule, answers, scores, correct) -> tuple[float, float]:
    p, n = correct.shape
    per = selection.per_problem_at_k(rule, answers, scores, correct, [n])[n]
    return per.mean() * 100, per.std(ddof=1) / np.sqrt(p) * 100


def main(argv) -> int:
    cfg = parse_typed(P.SwiftRunConfig, argv, "selection_ceiling")
    honest, spec, _ = load_head(Path(cfg.out) / "head")
    if spec != cfg.features:
        raise ValueError(f"{Path(cfg.out) / 'head'}: trained on features {spec.to_dict()}, the config asks for "
                         f"{cfg.features.to_dict()}")
    backbone, task = P.backbone_of(cfg), make_task(cfg.task)
    test_rows, _ = P._candidates(cfg, backbone, task, "test", print)
    store, _, arr = P.feature_store_for(backbone, test_rows, cfg.features, Path(cfg.cache or cfg.out),
                                        max_len=P._max_len(cfg, backbone, test_rows), batch_size=cfg.extract_batch,
                                        progress=cfg.progress, share_prompts=cfg.share_prompts)
    correct, answers = arr["correct"], arr["answers"]
    p, n = correct.shape
    pass1, oracle = correct.mean() * 100, correct.any(1).mean() * 100

    def line(what, acc, se):
        print(f"  {what:<52} {acc:5.1f} +- {se:.1f}  ({(acc - pass1) / (oracle - pass1):4.0%} of the gap)")

    print(f"{task.name}: {p} test problems x {n}; pass@1 {pass1:.1f}, oracle@{n} {oracle:.1f}")
    line(f"majority@{n}", *_at_n("majority", answers, None, correct))
    line(f"SWIFT@{n}, the head trained on the training candidates",
         *_at_n("best", answers, T.score_rows(honest, store, np.arange(len(store))).reshape(p, n), correct))
    groups = P.groups_of(p, n, cfg.rollouts_per_group)
    for loss, lr in GRID:
        c = T.SwiftTrainConfig(loss=loss, lr=lr, max_epochs=cfg.swift.max_epochs, gated=cfg.swift.gated,
                               val_frac=0.0, seed=cfg.swift.seed)
        params, _ = T.train_head(store, groups, correct.reshape(-1)[groups], c, progress=False)
        s = T.score_rows(params, store, np.arange(len(store))).reshape(p, n)
        line(f"SWIFT@{n}, fitted to the test labels ({loss}, lr {lr:g})", *_at_n("best", answers, s, correct))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
