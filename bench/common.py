"""Timing helpers shared by the benchmarks (median of repeats after warm-up)."""
from __future__ import annotations

import json
import os
import statistics
import time


def timeit(fn, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of ``fn()``; ``fn`` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_weights(cfg) -> int:
    """Weights one token multiplies by in the blocks (fused q/k/v, attention output, gated
    MLP), all layers; a ``ModelConfig``."""
    d = cfg.hidden_size
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * d \
        + 3 * d * cfg.intermediate_size
    return cfg.num_layers * per_layer


def report(name: str, rows: list[dict]) -> None:
    """Print a small table and append the rows as JSON lines to $BENCH_OUT if set."""
    print(f"\n== {name}")
    for r in rows:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"bench": name, **r}) + "\n")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
