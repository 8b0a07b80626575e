"""The matrix products of one decode step, each timed alone: where a step's matmul time goes
and how far XLA:CPU's kernel is from the machine's bandwidth and FLOP peak at a few rows.

    python bench/bench_products.py [--models DIR ...] [--rows 1,16,48,64] [--small]

For each model (the converted real checkpoints when fetched, else their synthetic shapes) and
row count: every distinct product of a step (fused q/k/v, the attention output, fused
gate/up, down, the vocabulary projection), in both operand orders (``x @ W^T`` and the
weight-left ``W @ x^T`` that ``layers.dense`` uses for a few rows on the CPU), as ms,
GFLOP/s and GB/s of weight read, and the step's matmul total (layers x products + the
vocabulary) against the roofline of those products alone. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import REAL, SYNTHETIC, machine_limits  # noqa: E402
from common import report, timeit  # noqa: E402

from swiftjax.convert.fetch import models_root  # noqa: E402


def shapes(name: str, path: Path | None) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, {product: (in, out)}) of one decode step."""
    c = json.loads((path / "config.json").read_text()) if path else SYNTHETIC[name]
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    dh = c.get("head_dim") or d // hq
    layers = c["num_hidden_layers"]
    return layers, {"qkv": (d, (hq + 2 * hkv) * dh), "attn_out": (hq * dh, d), "gate_up": (d, 2 * f),
                    "down": (f, d), "vocab": (d, v)}


def time_product(rows: int, k: int, n: int) -> tuple[float, float]:
    """Seconds of ``x @ W^T`` and of ``W @ x^T`` for x [rows, k], W [n, k] (float32)."""
    x = jnp.ones((rows, k), jnp.float32)
    w = jnp.full((n, k), 0.01, jnp.float32)
    right = jax.jit(lambda x, w: x @ w.T)
    left = jax.jit(lambda x, w: w @ x.T)
    return (timeit(lambda: right(x, w).block_until_ready(), warmup=2, repeats=15),
            timeit(lambda: left(x, w).block_until_ready(), warmup=2, repeats=15))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="HF model directories (default: the cache's)")
    ap.add_argument("--rows", default="1,16,48,64")
    ap.add_argument("--small", action="store_true", help="a smoke run: the smaller model, 1 and 16 rows")
    args = ap.parse_args()
    if args.small:
        args.rows = "1,16"
    lim = machine_limits()
    report("machine limits (best of numpy/jax/torch)", [lim])
    if args.models:
        models = [(Path(p).name, Path(p)) for p in args.models]
    else:
        models = [(real, models_root() / real) if (models_root() / real / "config.json").is_file() else (syn, None)
                  for real, syn in zip(REAL, SYNTHETIC)]
    if args.small:
        models = models[:1]
    for name, path in models:
        layers, prods = shapes(name, path)
        out = []
        for rows in [int(r) for r in args.rows.split(",")]:
            step_ms, step_flop, step_bytes = 0.0, 0.0, 0.0
            for pname, (k, n) in prods.items():
                right, left = time_product(rows, k, n)
                best = min(right, left)
                flop, byts = 2 * rows * k * n, 4 * k * n
                times = 1 if pname == "vocab" else layers
                step_ms += 1e3 * best * times
                step_flop += flop * times
                step_bytes += byts * times
                out.append({"model": name, "rows": rows, "product": pname, "shape": f"[{rows},{k}]x[{k},{n}]",
                            "ms_xWt": 1e3 * right, "ms_Wxt": 1e3 * left,
                            "GFLOPs": flop / best / 1e9, "of_peak": flop / best / 1e9 / lim["matmul_GFLOPs"],
                            "GBs": byts / best / 1e9, "of_bw": byts / best / 1e9 / lim["bandwidth_GBs"]})
            bound = 1e3 * max(step_bytes / (lim["bandwidth_GBs"] * 1e9), step_flop / (lim["matmul_GFLOPs"] * 1e9))
            out.append({"model": name, "rows": rows, "product": "STEP (layers x products + vocab)",
                        "ms": step_ms, "bound_ms": bound, "x_bound": step_ms / bound})
        report(f"decode-step products: {name}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
