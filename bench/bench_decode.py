"""Decoding against the machine's limits: per-step time of greedy decoding on real model
shapes, as a fraction of the roofline and against transformers in the same process; the
study's sampled step (nucleus draws, confidences recorded) at the sampler's row counts;
Best-of-N candidates/s with and without the shared-prompt prefill; bfloat16 weights;
forward with all hidden states as a fraction of the matmul peak; peak memory of loading.

    python bench/bench_decode.py [--models DIR ...] [--batches 1,16,64] [--sampled-batches 48,64]
                                 [--sections greedy,sampled,bon,bf16,forward,load] [--small]

Models: the converted real checkpoints in the model cache (``swiftjax models fetch``) when
present, else synthetic Llama configs of the same shapes (random weights). Run it on an
idle machine: every figure shares the cores with nothing else.

Roofline of one decode step: ``max(bytes / bandwidth, FLOPs / matmul peak)``, with bytes =
every weight the step reads (the embedding table only where it is also the output head) +
the keys and values of the filled cache slots, FLOPs = 2 x batch x (weights read) + the
attention's 4 x batch x layers x heads x head_dim x filled slots. Bandwidth and matmul peak are
measured here, in this run (best of numpy / jax / torch on these cores).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import block_weights, report, timeit  # noqa: E402

import swiftjax  # noqa: E402
from swiftjax.convert.fetch import models_root  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402

REAL = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
# the same shapes with random weights, when the real checkpoints are not fetched
SYNTHETIC = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b-shape": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
}
SMALL = {"tiny-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)}


# ----------------------------------------------------------------------------- machine limits
def machine_limits() -> dict:
    """Read bandwidth (GB/s) and float32 matmul peak (GFLOP/s), best of numpy, jax and torch."""
    a = np.ones(2 ** 27, np.float32)  # 512 MiB
    ja = jnp.asarray(a)
    jsum = jax.jit(jnp.sum)
    ta = torch.from_numpy(a)
    bw = {"numpy": a.nbytes / timeit(a.sum, repeats=5),
          "jax": a.nbytes / timeit(lambda: jsum(ja).block_until_ready(), repeats=5),
          "torch": a.nbytes / timeit(ta.sum, repeats=5)}
    n = 2048
    x = np.random.RandomState(0).rand(n, n).astype(np.float32)
    jx = jnp.asarray(x)
    jmm = jax.jit(jnp.matmul)
    tx = torch.from_numpy(x)
    mm = {"numpy": 2 * n ** 3 / timeit(lambda: x @ x, repeats=5),
          "jax": 2 * n ** 3 / timeit(lambda: jmm(jx, jx).block_until_ready(), repeats=5),
          "torch": 2 * n ** 3 / timeit(lambda: tx @ tx, repeats=5)}
    return {"bandwidth_GBs": max(bw.values()) / 1e9, "matmul_GFLOPs": max(mm.values()) / 1e9,
            **{f"bw_{k}": v / 1e9 for k, v in bw.items()}, **{f"mm_{k}": v / 1e9 for k, v in mm.items()}}


# ----------------------------------------------------------------------------- models
def model_dirs(names, small: bool, tmp: Path) -> list[tuple[str, Path]]:
    if names:
        return [(Path(p).name, Path(p)) for p in names]
    if small:
        return [_synthetic(k, v, tmp) for k, v in SMALL.items()]
    out = []
    for real, (syn, shape) in zip(REAL, SYNTHETIC.items()):
        d = models_root() / real
        out.append((real, d) if (d / "config.json").is_file() else _synthetic(syn, shape, tmp))
    return out


def _synthetic(name, shape, tmp: Path) -> tuple[str, Path]:
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                   **shape)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp / name)
    return name + " (random weights)", tmp / name


def step_bound(cfg, batch: int, filled: float, lim: dict, bytes_per_weight: int = 4) -> dict:
    """Roofline of one decode step (module doc); ``filled``: mean filled cache slots."""
    L, hq, hkv, dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    weights = block_weights(cfg) + cfg.vocab_size * cfg.hidden_size  # the output head; the input table is gathered
    kv_bytes = 2 * L * batch * hkv * dh * filled * 4
    bytes_ = weights * bytes_per_weight + kv_bytes
    flops = 2 * batch * weights + 4 * batch * L * hq * dh * filled
    t = max(bytes_ / (lim["bandwidth_GBs"] * 1e9), flops / (lim["matmul_GFLOPs"] * 1e9))
    return {"bound_ms": 1e3 * t, "bytes_MB": bytes_ / 1e6, "GFLOP": flops / 1e9}


def _prompt(tok_path: Path, length: int, vocab: int) -> np.ndarray:
    """A realistic prompt of ``length`` ids (a chat-style maths question repeated)."""
    text = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? Think step by step. ")
    if (tok_path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok_path / "tokenizer.json")).encode(text * 40).ids
    else:
        ids = list(np.random.RandomState(0).randint(3, vocab, size=length))
    return np.asarray(ids[:length], np.int32)


# ----------------------------------------------------------------------------- decode steps
# the study's sampler settings (configs/study/*.yaml): nucleus draws, top-20 confidences recorded
SECTIONS = ("greedy", "sampled", "bon", "bf16", "forward", "load")
STUDY_SAMPLING = dict(temperature=0.7, top_p=0.95, record_topk=20)


def jax_step_ms(model, prompt, batch: int, n1: int, n2: int, groups: int, sampling: dict | None = None) -> float:
    """ms per decode step (greedy, or ``sampling``'s SamplingConfig fields with a fixed key)."""
    ids = jnp.asarray(np.tile(prompt[None], (batch, 1)))
    key = jax.random.key(0)

    def run(n):
        cfg = SamplingConfig(max_new_tokens=n, **(sampling or {"temperature": 0.0}))
        return timeit(lambda: jax.block_until_ready(generate(model, ids, key=key, cfg=cfg,
                                                             prompt_groups=groups).tokens),
                      warmup=1, repeats=2)

    return 1e3 * (run(n2) - run(n1)) / (n2 - n1)


def bench_sampled(path, lim, batches, prompt_len, n1, n2) -> list[dict]:
    """The study's sampled step per batch: ms, rows/s and the roofline of a greedy step."""
    model, cfg = swiftjax.load_model(path)
    prompt = _prompt(path, prompt_len, cfg.vocab_size)
    rows = []
    for b in batches:
        ms = jax_step_ms(model, prompt, b, n1, n2, groups=b, sampling=STUDY_SAMPLING)
        bound = step_bound(cfg, b, prompt_len + (n1 + n2) / 2, lim)
        rows.append({"batch": b, "step_ms": ms, "rows_s": 1e3 * b / ms, "bound_ms": bound["bound_ms"],
                     "x_bound": ms / bound["bound_ms"]})
    return rows


def torch_step_ms(hf, prompt, batch: int, steps: int) -> float:
    ids = torch.tensor(np.tile(prompt[None], (batch, 1)), dtype=torch.long)
    with torch.inference_mode():
        out = hf(ids[:1], use_cache=True)
        cache = out.past_key_values
        if batch > 1:  # one prefill, repeated (decoding cost does not depend on it)
            cache.batch_repeat_interleave(batch)
        tok = out.logits[:, -1].argmax(-1, keepdim=True).repeat(batch, 1)
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            out = hf(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def greedy_agrees(model, hf, prompt, n: int = 24) -> bool:
    """Greedy tokens of ours and of transformers' ``generate``, each up to its first end token."""
    eos = tuple(model.config.eos_token_id)
    out = generate(model, jnp.asarray(prompt[None]), cfg=SamplingConfig(max_new_tokens=n, temperature=0.0, eos_ids=eos))
    ours = np.asarray(out.tokens)[0, : int(out.lengths[0])]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].numpy()
    ends = [j for j, t in enumerate(ref) if t in eos]
    ref = ref[: ends[0] + 1] if ends else ref
    return len(ours) == len(ref) and bool((ours == ref).all())


def bench_decode(name, path, lim, batches, prompt_len, n1, n2) -> list[dict]:
    model, cfg = swiftjax.load_model(path)
    prompt = _prompt(path, prompt_len, cfg.vocab_size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for b in batches:
        ours = jax_step_ms(model, prompt, b, n1, n2, groups=b)
        theirs = torch_step_ms(hf, prompt, b, steps=n2 - n1)
        bound = step_bound(cfg, b, prompt_len + (n1 + n2) / 2, lim)
        rows.append({"model": name, "batch": b, "step_ms": ours, "tok_s": 1e3 * b / ours,
                     "transformers_step_ms": theirs, "vs_transformers": theirs / ours,
                     "bound_ms": bound["bound_ms"], "x_bound": ours / bound["bound_ms"],
                     "bytes_MB": bound["bytes_MB"], "GFLOP": bound["GFLOP"]})
    rows[-1]["greedy_equals_transformers"] = greedy_agrees(model, hf, prompt)
    return rows


def bench_best_of_n(name, path, prompt_len, new_tokens, n_values, prompts: int = 2) -> list[dict]:
    """Candidates/s of N samples of each of ``prompts`` prompts, prefill shared or not."""
    model, cfg = swiftjax.load_model(path)
    prompt = _prompt(path, prompt_len, cfg.vocab_size)
    rows = []
    for n in n_values:
        ids = jnp.asarray(np.tile(prompt[None], (prompts * n, 1)))
        scfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.7)
        key = jax.random.key(0)
        res = {}
        for groups in (1, n):
            res[groups] = timeit(lambda: jax.block_until_ready(
                generate(model, ids, key=key, cfg=scfg, prompt_groups=groups).tokens), warmup=1, repeats=2)
        rows.append({"model": name, "N": n, "prompts": prompts, "new_tokens": new_tokens,
                     "cand_s_shared": prompts * n / res[n], "cand_s_per_row": prompts * n / res[1],
                     "speedup": res[1] / res[n]})
    return rows


def bench_bf16(name, path, prompt_len, batch, n1, n2, lim) -> list[dict]:
    from swiftjax.models.config import ModelConfig

    prompt = _prompt(path, prompt_len, ModelConfig.from_pretrained(path).vocab_size)
    out = []
    toks = {}
    for dt in (jnp.float32, jnp.bfloat16):
        model, cfg = swiftjax.load_model(path, dtype=dt)
        ms = jax_step_ms(model, prompt, batch, n1, n2, groups=batch)
        toks[dt] = np.asarray(generate(model, jnp.asarray(prompt[None]),
                                       cfg=SamplingConfig(max_new_tokens=24, temperature=0.0)).tokens)[0]
        bound = step_bound(cfg, batch, prompt_len + (n1 + n2) / 2, lim, bytes_per_weight=2 if dt == jnp.bfloat16 else 4)
        out.append({"model": name, "dtype": jnp.dtype(dt).name, "batch": batch, "step_ms": ms,
                    "bound_ms": bound["bound_ms"], "x_bound": ms / bound["bound_ms"]})
    out[-1]["greedy_equals_float32"] = bool((toks[jnp.float32] == toks[jnp.bfloat16]).all())
    return out


def bench_forward(name, path, lim, batch: int, seq: int) -> list[dict]:
    """Forward with all hidden states: tokens/s and the fraction of the matmul peak."""
    from flax import nnx

    model, cfg = swiftjax.load_model(path)
    ids = jnp.asarray(np.tile(_prompt(path, seq, cfg.vocab_size)[None], (batch, 1)))
    gd, st = nnx.split(model)

    @jax.jit
    def fwd(st, x):
        out = nnx.merge(gd, st)(x, output_hidden_states=True)
        return out.logits, out.hidden_states

    t = timeit(lambda: jax.block_until_ready(fwd(st, ids)), warmup=1, repeats=3)
    tokens = batch * seq
    flops = 2 * tokens * (block_weights(cfg) + cfg.vocab_size * cfg.hidden_size) \
        + 2 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq
    return [{"model": name, "batch": batch, "seq": seq, "tok_s": tokens / t, "GFLOPs": flops / t / 1e9,
             "of_peak": flops / t / 1e9 / lim["matmul_GFLOPs"]}]


def load_peak(path: Path) -> dict:
    """Peak resident memory that ``load_model`` adds, in a fresh process, against the checkpoint
    size: the process's peak (``VmHWM``) after loading minus its resident size after importing
    jax. ``VmHWM`` belongs to the process's own address space; ``ru_maxrss`` is not used: Linux
    carries it over from the parent at fork, so a child of this (large) process would report
    the parent's size."""
    code = ("import re, sys, jax, jax.numpy as jnp, swiftjax; jnp.zeros(1).block_until_ready(); "
            "kb = lambda f: int(re.search(f + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "base = kb('VmRSS'); swiftjax.load_model(sys.argv[1]); print('PEAK', base, kb('VmHWM'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("PEAK "))
    base, peak = (int(x) * 1024 for x in line.split()[1:])
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"checkpoint_GB": size / 1e9, "load_peak_GB": (peak - base) / 1e9, "copies": (peak - base) / size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="HF model directories (default: the cache's)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--sampled-batches", default="48,64",
                    help="batches of the study's sampled step (T=0.7, top-p 0.95, top-20 recorded): rows/s picks "
                         "the sampler's rows in flight")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run, of {','.join(SECTIONS)}")
    ap.add_argument("--small", action="store_true", help="a tiny synthetic model (smoke run)")
    a = ap.parse_args()
    run = set(a.sections.split(","))
    if run - set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(run - set(SECTIONS))}; expected some of {','.join(SECTIONS)}")
    batches = [int(b) for b in a.batches.split(",")]
    n1, n2 = (4, 12) if a.small else (8, 40)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f} at start (run idle)")
    lim = machine_limits()
    report("machine limits (best of numpy/jax/torch)", [lim])
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_dirs(a.models, a.small, Path(tmp)):
            if "greedy" in run:
                report(f"greedy decode step, prompt {a.prompt_len}: {name}",
                       bench_decode(name, path, lim, batches, a.prompt_len, n1, n2))
            if "sampled" in run and a.sampled_batches:
                report(f"sampled decode step {STUDY_SAMPLING}, prompt {a.prompt_len}: {name}",
                       bench_sampled(path, lim, [int(b) for b in a.sampled_batches.split(",")], a.prompt_len, n1, n2))
            plen, new = (32, 8) if a.small else (256, 64)
            if "bon" in run:
                report(f"Best-of-N sampling (T=0.7), 2 prompts of {plen} tokens, {new} new tokens: {name}",
                       bench_best_of_n(name, path, plen, new, (8, 16)))
            if "bf16" in run:
                report(f"bfloat16 weights, batch 16: {name}", bench_bf16(name, path, a.prompt_len, 16, n1, n2, lim))
            if "forward" in run:
                report(f"forward + all hidden states: {name}", bench_forward(name, path, lim, 8, 256))
            if "load" in run:
                report(f"load_model peak memory: {name}", [load_peak(path)])
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
