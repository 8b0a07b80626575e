"""One short, prepared accelerator check: bfloat16 forward MFU of a ~1B Llama and greedy
decode tokens/s against the memory-bandwidth bound, on whatever device JAX sees.

    python bench/bench_gpu.py [--small] [--batch 16 --seq 2048] [--decode-batches 1,64,256]

Random weights (the shapes of Llama-3.2-1B: d 2048, 16 layers, 32/8 heads, FFN 8192, vocab
128,256, tied), parameters and activations in bfloat16. The device's limits are measured in
the same run: bfloat16 matmul peak (an 8192-cube product) and read bandwidth (a sum over
4 GiB). Forward FLOPs = 2 x tokens x weights + the attention products; MFU = achieved /
measured peak. Decode step = the difference of two greedy lengths over their extra tokens;
its bound = (weight bytes + filled KV bytes) / bandwidth. ``--small``: a tiny config and small
probes (a CPU smoke run of the script itself, not a measurement).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import block_weights, report, timeit  # noqa: E402

from swiftjax.models.config import ModelConfig  # noqa: E402
from swiftjax.models.registry import create_model  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402

LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def device_limits(n: int, gib: float) -> dict:
    """Measured bfloat16 matmul TFLOP/s (n-cube) and read bandwidth GB/s (sum over ``gib``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t_mm = timeit(lambda: mm(a).block_until_ready(), warmup=3, repeats=10)
    x = jnp.ones((int(gib * 2 ** 30) // 2,), jnp.bfloat16)
    s = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t_bw = timeit(lambda: s(x).block_until_ready(), warmup=3, repeats=10)
    return {"device": jax.devices()[0].device_kind, "matmul_TFLOPs": 2 * n ** 3 / t_mm / 1e12,
            "bandwidth_GBs": x.nbytes / t_bw / 1e9}


def weights(cfg: ModelConfig) -> int:
    """Parameters a forward multiplies by (the output head once, the input table only gathered)."""
    return block_weights(cfg) + cfg.vocab_size * cfg.hidden_size


def bench_forward(model, cfg: ModelConfig, lim: dict, batch: int, seq: int) -> dict:
    gd, st = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 3, cfg.vocab_size, jnp.int32)

    @jax.jit
    def fwd(st, x):
        out = nnx.merge(gd, st)(x, output_hidden_states=True)
        return out.logits, out.hidden_states

    t = timeit(lambda: jax.block_until_ready(fwd(st, ids)), warmup=2, repeats=5)
    tokens = batch * seq
    flops = 2 * tokens * weights(cfg) + 2 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq
    return {"batch": batch, "seq": seq, "tok_s": tokens / t, "TFLOPs": flops / t / 1e12,
            "MFU_of_measured_peak": flops / t / 1e12 / lim["matmul_TFLOPs"]}


def bench_decode(model, cfg: ModelConfig, lim: dict, batch: int, prompt_len: int, n1: int, n2: int) -> dict:
    ids = jax.random.randint(jax.random.key(2), (batch, prompt_len), 3, cfg.vocab_size, jnp.int32)

    def run(n):
        scfg = SamplingConfig(max_new_tokens=n, temperature=0.0)
        return timeit(lambda: jax.block_until_ready(generate(model, ids, cfg=scfg).tokens), warmup=1, repeats=3)

    step = (run(n2) - run(n1)) / (n2 - n1)
    filled = prompt_len + (n1 + n2) / 2
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * filled * 4  # float32 cache
    bound = (2 * weights(cfg) + kv) / (lim["bandwidth_GBs"] * 1e9)
    return {"batch": batch, "step_ms": 1e3 * step, "tok_s": batch / step, "bound_ms": 1e3 * bound,
            "x_bound": step / bound}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke run of the script")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--decode-batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    a = ap.parse_args()
    if a.small:
        a.batch, a.seq, a.decode_batches, a.prompt_len = 2, 64, "1,4", 16
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    lim = device_limits(512 if a.small else 8192, 1 / 64 if a.small else 4.0)
    report("device limits (measured)", [lim])
    cfg = ModelConfig.from_hf_dict(TINY if a.small else LLAMA_1B, "tiny" if a.small else "llama-1b shape")
    model = create_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    report(f"forward + all hidden states, bfloat16, {weights(cfg) / 1e9:.2f}B weights",
           [bench_forward(model, cfg, lim, a.batch, a.seq)])
    n1, n2 = (2, 6) if a.small else (8, 72)
    report(f"greedy decode step, bfloat16 weights, prompt {a.prompt_len}",
           [bench_decode(model, cfg, lim, int(b), a.prompt_len, n1, n2) for b in a.decode_batches.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
