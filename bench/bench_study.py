"""The SWIFT study's two teacher-forced forwards on real candidates: plain vs shared prompts.

    python bench/bench_study.py --candidates runs/qwen_gsm8k/candidates_test_*.jsonl \
        [--model DIR] [--problems 6] [--what score|store|overhead] [--share 0|1] [--batch 4]

One configuration per invocation (so the peak resident memory printed is that configuration's):
``score`` runs :func:`~swiftjax.methods.swift.features.fused_scores_many` with one random head per
variant of ``configs/study/qwen_gsm8k_swift.yaml``; ``store`` writes the study's three feature
stores (every raw state, token log-probs k 4, top-16 log-probs) with
:func:`~swiftjax.methods.swift.features.write_stores` into a temporary directory. Printed: wall
seconds of a second run (the first compiles), response tokens/s (the work the study needs),
tokens actually forwarded (prompts once per batch when shared) and their GFLOP/s as a fraction
of the machine's float32 matmul peak measured in the same run, and peak RSS. ``overhead``: one
batch of ``--batch`` rows at full width, the bare forward against the same forward scoring the
paper's all-layer head (the fused-scoring overhead). Run it idle.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import machine_limits  # noqa: E402
from common import block_weights, report  # noqa: E402

from swiftjax.backbone import load_backbone  # noqa: E402
from swiftjax.batching import prompt_batches, row_spans  # noqa: E402
from swiftjax.convert.fetch import models_root  # noqa: E402
from swiftjax.data import candidates as cands  # noqa: E402
from swiftjax.methods.swift import features as F  # noqa: E402
from swiftjax.methods.swift import head as swift  # noqa: E402
from swiftjax.methods.swift import pipeline  # noqa: E402
from swiftjax.methods.swift.study import store_plan  # noqa: E402

VARIANTS = [F.FeatureSpec(), F.FeatureSpec(apply_norm=True), F.FeatureSpec(layers=(24,)), F.FeatureSpec(layers=(12,)),
            F.FeatureSpec(layers=(12, 16, 20, 24)), F.FeatureSpec(layers=(12, 16, 20, 24), apply_norm=True),
            F.FeatureSpec(mode="token_logprobs", k=4), F.FeatureSpec(mode="topk_logprobs", k=16)]


def _peak_rss_gb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1e6


def forwarded_tokens(ids, attn, resp, batch: int, share: bool) -> int:
    """Tokens the forward computes: every real token (plain, length-sorted cuts: about the real
    tokens), or each batch's prompt once plus its responses (shared)."""
    plan = prompt_batches(ids, attn, resp, batch) if share else None
    if plan is None:
        return int(attn.sum())
    first, _ = row_spans(attn)
    r0, _ = row_spans(resp)
    return int(resp.sum()) + sum(int(r0[b.prompt_row] - first[b.prompt_row]) for b in plan[1])


def _min_time(fn, repeats: int = 2) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def overhead(bb, ids, attn, resp, lim) -> int:
    """One batch at full width: the bare forward (last hidden state, no logits) against the
    same forward scoring the paper's all-layer SWIFT head (folded, one head; and through the
    many-head path). FLOPs count every column (padding included) and the attention products."""
    from flax import nnx

    cfg = bb.model.config
    gd, st = nnx.split(bb.model)
    bare = jax.jit(lambda s, i, m: nnx.merge(gd, s)(i, m, output_hidden_states=True,
                                                  compute_logits=False).hidden_states[-1])
    spec = F.FeatureSpec()
    layers = tuple(range(cfg.num_layers + 1))
    params = swift.init_params(jax.random.key(0), F.feature_dim(spec, cfg))
    resp = resp.astype(np.float32)
    t_bare = _min_time(lambda: bare(st, ids, attn))
    t_one = _min_time(lambda: F._fused(st, params, ids, attn, resp, graphdef=gd, spec=spec, layers=layers))
    t_many = _min_time(lambda: F._fused_many(st, (params,), ids, attn, resp, graphdef=gd, specs=(spec,),
                                             layers=(layers,)))
    b, t = ids.shape
    flops = 2 * b * t * block_weights(cfg) + 2 * 2 * b * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t
    report(f"forward vs fused SWIFT scoring, batch {b} x {t}, {bb.path}", [
        {"what": w, "s": x, "GFLOPs": flops / x / 1e9, "of_matmul_peak": flops / x / 1e9 / lim["matmul_GFLOPs"],
         "overhead_vs_bare": x / t_bare - 1}
        for w, x in (("bare forward", t_bare), ("fused all-layer head", t_one), ("many-head path", t_many))])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", required=True)
    ap.add_argument("--model", default=str(models_root() / "qwen2.5-coder-0.5b-instruct"))
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--what", choices=["score", "store", "overhead"], default="score")
    ap.add_argument("--share", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start (run idle)")
    lim = machine_limits()
    bb = load_backbone(a.model)
    cfg = bb.model.config
    rows = cands.read_candidates(a.candidates)
    ids_, _ = cands.group(rows)
    ordered = pipeline.in_group_order(rows, ids_)
    n = len(ordered) // len(ids_)
    ordered = ordered[: a.problems * n]
    width = max(len(bb.prompt_ids(r["prompt"])) + len(r["token_ids"]) for r in ordered)
    ids, attn, resp = pipeline.encode_rows(bb, ordered, -(-width // 64) * 64)
    share = bool(a.share)
    tmp = None  # the store-writing run's directory
    if a.what == "overhead":
        return overhead(bb, ids[: a.batch], attn[: a.batch], resp[: a.batch], lim)
    if a.what == "score":
        heads = [(swift.init_params(jax.random.key(i), F.feature_dim(s, cfg)), s) for i, s in enumerate(VARIANTS)]

        def run():
            return F.fused_scores_many(bb.model, heads, ids, attn, resp, batch_size=a.batch, progress=False,
                                       share_prompts=share)
    else:
        specs, _ = store_plan(VARIANTS, cfg.num_layers)
        tmp = tempfile.mkdtemp(prefix="bench_study_")
        count = iter(range(10))

        def run():
            i = next(count)
            return F.write_stores([Path(tmp) / f"r{i}_{j}" for j in range(len(specs))], bb.model, specs, ids, attn,
                                  resp, np.zeros(len(ids)), np.arange(len(ids)) // n, batch_size=a.batch,
                                  share_prompts=share)
    try:
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        run()
        t = time.perf_counter() - t0
    finally:  # the stores written (hundreds of MB a run) go with the run
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    fwd = forwarded_tokens(ids, attn, resp, a.batch, share)
    flops = 2 * fwd * (block_weights(cfg) + cfg.vocab_size * cfg.hidden_size)  # logits for every token (logits-mode variants need them)
    report(f"study forward ({a.what}, {'shared prompts' if share else 'plain'}, batch {a.batch}): "
           f"{len(ordered)} candidates of {a.problems} problems, {bb.path}", [{
               "first_run_s": first, "run_s": t, "response_tok_s": float(resp.sum()) / t,
               "response_tokens": int(resp.sum()), "forwarded_tokens": fwd, "GFLOPs": flops / t / 1e9,
               "of_matmul_peak": flops / t / 1e9 / lim["matmul_GFLOPs"], "matmul_peak_GFLOPs": lim["matmul_GFLOPs"],
               "peak_rss_GB": _peak_rss_gb()}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
