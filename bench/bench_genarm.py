"""GenARM decoding speed: plain vs guided sampling (same base, an ARM of the same size), and
GenARM vs ARGS (top-k = 10 candidates, each scored by a full uncached forward of the reward
model at every token). Random Llama models; every row runs all new tokens (no end token).

    python bench/bench_genarm.py [--small] [--rounds 7] [--args-new 16]

Goals: guided / plain slowdown <= 2.2x; GenARM >= 5x faster than ARGS at k = 10.
Decoding times are the fastest of ``--rounds`` interleaved calls (robust on a shared CPU).
ARGS is timed once (compiled ahead) over its first ``--args-new`` tokens, which favours it
(shorter fixed-shape sequences): the GenARM / ARGS speed-up printed is a lower bound.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

from swiftjax.methods.genarm import guided as arm_decode  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402
from swiftjax.models.config import ModelConfig  # noqa: E402
from swiftjax.models.registry import create_model  # noqa: E402


def make_model(d, layers, vocab, seed):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=d, num_layers=layers,
                      num_heads=max(1, d // 64), num_kv_heads=max(1, d // 64), head_dim=min(64, d),
                      intermediate_size=int(d * 8 / 3) // 32 * 32, max_position_embeddings=1024)
    return create_model(cfg, seed=seed)


def _ready(out):
    return jax.block_until_ready(out.tokens)


def best_interleaved(fns: dict, rounds: int) -> dict:
    """Fastest of ``rounds`` timed calls of each function, after one warm-up (compile) call
    each; the calls are interleaved round by round so that load from other processes on a
    shared CPU hits every method alike, and the minimum is the stable statistic there."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def time_args(base, rm, ids, mask, cfg, k):
    """ARGS is slow: the first call compiles (timed apart), then time a single run."""
    def run():
        return arm_decode.args_generate(base, rm, ids, mask, k=k, w=1.0, key=jax.random.key(0), cfg=cfg)

    t0 = time.perf_counter()
    jax.block_until_ready(run().tokens)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(run().tokens)
    t_run = time.perf_counter() - t0
    return t_run, t_first - t_run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a quick smoke-size run")
    ap.add_argument("--k", type=int, default=10, help="ARGS candidates per token")
    ap.add_argument("--rounds", type=int, default=7, help="timed calls per decoding method")
    ap.add_argument("--args-new", type=int, default=16,
                    help="new tokens of the (slow) ARGS run; 0 = as many as the others")
    a = ap.parse_args(argv)
    if a.small:
        d, layers, vocab, batch, prompt, new = 128, 2, 500, 4, 16, 32
    else:
        d, layers, vocab, batch, prompt, new = 256, 4, 1000, 8, 32, 64
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: Llama d={d} L={layers} V={vocab}, "
          f"batch {batch}, prompt {prompt}, {new} new tokens (ARGS: {a.args_new or new}), ARGS k={a.k}")
    base = make_model(d, layers, vocab, seed=0)
    arm_model = make_model(d, layers, vocab, seed=1)
    ids = np.random.RandomState(0).randint(3, vocab, size=(batch, prompt))
    mask = np.ones_like(ids)
    cfg = SamplingConfig(max_new_tokens=new, temperature=1.0, eos_ids=())
    key = jax.random.key(0)
    toks = batch * new

    greedy = SamplingConfig(max_new_tokens=new, temperature=0.0, eos_ids=())
    t = best_interleaved({
        "plain": lambda: _ready(generate(base, ids, mask, key=key, cfg=cfg)),
        "guided": lambda: _ready(arm_decode.guided_generate(base, [arm_model], [1.0], ids, mask, key=key, cfg=cfg)),
        "two": lambda: _ready(arm_decode.guided_generate(base, [arm_model, arm_model], [1.0, 0.5], ids, mask,
                                                         key=key, cfg=cfg)),
        "greedy": lambda: _ready(arm_decode.guided_generate(base, [arm_model], [1.0], ids, mask, cfg=greedy)),
    }, rounds=a.rounds)
    t_plain, t_guided, t_two, t_guided_greedy = t["plain"], t["guided"], t["two"], t["greedy"]
    # ARGS costs ~100x more: time its first `args_new` tokens only. Our fixed-shape ARGS scores
    # every candidate over T + args_new columns, so a shorter run is cheaper per token: the
    # speed-up below is a lower bound.
    args_cfg = SamplingConfig(max_new_tokens=a.args_new or new, temperature=0.0, eos_ids=())
    t_args, t_args_compile = time_args(base, arm_model, ids, mask, args_cfg, a.k)
    args_toks = batch * args_cfg.max_new_tokens
    rows = [
        {"method": "plain", "tok_s": toks / t_plain, "seconds": t_plain},
        {"method": "genarm_1arm", "tok_s": toks / t_guided, "seconds": t_guided,
         "slowdown_vs_plain": t_guided / t_plain},
        {"method": "genarm_2arms", "tok_s": toks / t_two, "seconds": t_two, "slowdown_vs_plain": t_two / t_plain},
        {"method": "genarm_1arm_greedy", "tok_s": toks / t_guided_greedy, "seconds": t_guided_greedy},
        {"method": f"args_k{a.k}_greedy", "tok_s": args_toks / t_args, "seconds": t_args,
         "new_tokens": args_cfg.max_new_tokens, "genarm_speedup": (toks / t_guided_greedy) / (args_toks / t_args),
         "compile_s": t_args_compile},
    ]
    report("genarm decoding", rows)
    print(f"\nguided / plain slowdown: {t_guided / t_plain:.2f}x (goal <= 2.2x)")
    print(f"GenARM vs ARGS (k={a.k}, greedy both, tokens/s): {rows[-1]['genarm_speedup']:.1f}x faster "
          "(goal >= 5x)")


if __name__ == "__main__":
    main()
