"""SWIFT costs: (a) fused scoring (the head folded into the forward) vs a plain forward and
vs extract-then-score; (b) head training throughput, swiftjax's jitted train step vs the same
head + loss + AdamW in PyTorch, on batches read from a feature store.

    python bench/bench_swift.py [--small]

Timings on a shared CPU are noisy: (a) interleaves the variants round by round and reports
medians; run it on an idle machine for a figure to quote.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import report, timeit  # noqa: E402

from swiftjax.methods.swift import features as F  # noqa: E402
from swiftjax.methods.swift import head as swift  # noqa: E402
from swiftjax.data.store import FeatureStore, FeatureStoreWriter  # noqa: E402
from swiftjax.models.config import ModelConfig  # noqa: E402
from swiftjax.models.registry import create_model  # noqa: E402
from swiftjax.train.loop import OptimizerConfig, init_state, make_optimizer, make_train_step  # noqa: E402


# ----------------------------------------------------------------------------- (a) fused scoring


def llama(layers, d, vocab):
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=d, num_layers=layers,
                       num_heads=d // 64, num_kv_heads=d // 64, head_dim=64,
                       intermediate_size=int(d * 8 / 3) // 64 * 64, max_position_embeddings=4096)


def _temp_bytes(jitted, *args, **kw) -> float:
    """Bytes XLA allocates for temporaries and outputs of one call (compiled memory analysis)."""
    try:
        m = jitted.lower(*args, **kw).compile().memory_analysis()
        return float(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # memory analysis is backend-dependent
        return float("nan")


def bench_fused(layers, d, vocab, batch, seq, rounds):
    cfg = llama(layers, d, vocab)
    model = create_model(cfg, seed=0)
    spec = F.FeatureSpec()  # all L+1 states
    params = swift.init_params(jax.random.key(0), F.feature_dim(spec, cfg), gated=True)
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(3, vocab, size=(batch, seq)), jnp.int32)
    attn = jnp.ones((batch, seq), jnp.int32)
    resp = jnp.asarray((np.arange(seq)[None] >= seq // 4) * np.ones((batch, 1)), jnp.float32)
    gd, st = nnx.split(model)
    layer_ids = F.resolve_layers(spec, cfg.num_layers)

    @jax.jit
    def plain(st, ids, attn):  # the forward alone: last hidden state, no logits
        return nnx.merge(gd, st)(ids, attn, output_hidden_states=True, compute_logits=False).hidden_states[-1]

    @jax.jit
    def with_logits(st, ids, attn):
        return nnx.merge(gd, st)(ids, attn).logits

    @jax.jit
    def extract_score(st, params, ids, attn, resp):  # materialises [B, T, F] features
        x = F._features(nnx.merge(gd, st), ids, attn, resp, spec, layer_ids)
        return swift.score(params, x, resp)

    def fused(st, params, ids, attn, resp):
        return F._fused(st, params, ids, attn, resp, graphdef=gd, spec=spec, layers=layer_ids)

    a = np.asarray(fused(st, params, ids, attn, resp))
    b = np.asarray(extract_score(st, params, ids, attn, resp))
    runs = {
        "plain": lambda: jax.block_until_ready(plain(st, ids, attn)),
        "logits": lambda: jax.block_until_ready(with_logits(st, ids, attn)),
        "fused": lambda: jax.block_until_ready(fused(st, params, ids, attn, resp)),
        "extract": lambda: jax.block_until_ready(extract_score(st, params, ids, attn, resp)),
    }
    for fn in runs.values():  # compile + warm
        fn()
    times = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved: load drifts hit every variant alike
        for k, fn in runs.items():
            times[k].append(timeit(fn, warmup=0, repeats=1))
    med = {k: float(np.median(v)) for k, v in times.items()}
    mem_fused = _temp_bytes(F._fused, st, params, ids, attn, resp, graphdef=gd, spec=spec, layers=layer_ids)
    mem_extract = _temp_bytes(extract_score, st, params, ids, attn, resp)
    return {
        "plain_s": med["plain"], "fused_s": med["fused"], "extract_score_s": med["extract"],
        "forward_with_logits_s": med["logits"],
        "fused_overhead_vs_plain": med["fused"] / med["plain"] - 1.0,
        "fused_vs_forward_with_logits": med["fused"] / med["logits"] - 1.0,
        "extract_score_overhead_vs_plain": med["extract"] / med["plain"] - 1.0,
        "fused_temp_MiB": mem_fused / 2**20, "extract_temp_MiB": mem_extract / 2**20,
        "max_abs_score_diff": float(np.abs(a - b).max()),
    }


# ----------------------------------------------------------------------------- (b) head training


def make_store(path, n_rows, seq, fdim, seed=0):
    rs = np.random.RandomState(seed)
    with FeatureStoreWriter(path, fdim, {"bench": True}) as w:
        for start in range(0, n_rows, 16):
            k = min(16, n_rows - start)
            rows = [rs.randn(int(rs.randint(seq // 2, seq + 1)), fdim).astype(np.float32) for _ in range(k)]
            w.add(rows, rs.randint(0, 2, size=k).astype(np.float32), np.arange(start, start + k) // 8)
    return FeatureStore(path)


def torch_head_step_fn(kernel, bias, lr, wd):
    lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(kernel).T.copy()))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias).copy()))
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)

    def score(x, m):
        proj = lin(x)
        g = torch.sigmoid(proj[..., 0])
        r = proj[..., 1]
        return (g * r * m).sum(-1) / (g * m).sum(-1).clamp_min(1e-8)

    def step(x, m, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(score(x, m), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return lin, step


def bench_train(store, batch, seq, steps, n_batches=4):
    fdim = store.feature_dim
    rs = np.random.RandomState(1)
    host = []
    for _ in range(n_batches):
        idx = rs.choice(len(store), size=batch, replace=False)
        x, m = store.batch(idx, pad_to=seq)
        host.append((x, m, store.labels[idx].astype(np.float32)))
    t_read = timeit(lambda: store.batch(rs.choice(len(store), size=batch, replace=False), pad_to=seq),
                    warmup=1, repeats=5)
    lr, wd = 1e-4, 1e-5
    p0 = swift.init_params(jax.random.key(0), fdim, gated=True)
    k0, b0 = np.asarray(p0["kernel"]), np.asarray(p0["bias"])

    # swiftjax: generic jitted train step (donated state) around the SWIFT head and ce loss
    def make_loss(score_fn):
        def loss_fn(params, b, rng):
            return swift.loss_ce(score_fn(params, b["x"], b["m"]), b["y"]), {}
        return loss_fn

    tx = make_optimizer(OptimizerConfig(name="adamw", lr=lr, weight_decay=wd))
    dev = [jax.device_put({"x": x, "m": m, "y": y}) for x, m, y in host]

    def jax_runner(score_fn):
        step = make_train_step(make_loss(score_fn), tx)
        state = [init_state({"kernel": jnp.array(k0), "bias": jnp.array(b0)}, tx, 0)]

        def run(n):
            s = state[0]
            for i in range(n):
                s, metrics = step(s, dev[i % n_batches])
            jax.block_until_ready(s.params)
            state[0] = s
            return metrics

        return run, state

    run_jax, state = jax_runner(swift.score)

    # PyTorch: the same head, loss and optimizer, eager
    lin, tstep = torch_head_step_fn(k0, b0, lr, wd)
    tdev = [tuple(torch.from_numpy(a) for a in hb) for hb in host]

    def run_torch(n):
        for i in range(n):
            loss = tstep(*tdev[i % n_batches])
        return loss

    # agreement: a few identical steps from the same init
    jl = [float(run_jax(1)["loss"]) for _ in range(3)]
    tl = [float(run_torch(1)) for _ in range(3)]
    kdiff = float(np.abs(np.asarray(state[0].params["kernel"]) - lin.weight.detach().numpy().T).max())
    times = {"jax": [], "torch": []}
    threads = torch.get_num_threads()
    times["torch_1thread"] = []
    for _ in range(3):  # interleaved rounds, medians
        times["jax"].append(timeit(lambda: run_jax(steps), warmup=0, repeats=1) / steps)
        times["torch"].append(timeit(lambda: run_torch(steps), warmup=0, repeats=1) / steps)
        torch.set_num_threads(1)  # small ops: one thread avoids pool overhead; keep torch's best
        times["torch_1thread"].append(timeit(lambda: run_torch(steps), warmup=0, repeats=1) / steps)
        torch.set_num_threads(threads)
    t_jax = float(np.median(times["jax"]))
    t_pt = min(float(np.median(times["torch"])), float(np.median(times["torch_1thread"])))
    return {
        "B": batch, "T": seq, "F": fdim,
        "swiftjax_steps_s": 1.0 / t_jax, "torch_steps_s": 1.0 / t_pt,
        "torch_threads_best": 1 if t_pt < float(np.median(times["torch"])) else threads,
        "swiftjax_examples_s": batch / t_jax, "torch_examples_s": batch / t_pt,
        "speedup": t_pt / t_jax, "store_batch_read_s": t_read,
        "loss_diff_first_steps": float(np.max(np.abs(np.asarray(jl) - np.asarray(tl)))),
        "kernel_diff_after_3_steps": kdiff,
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a quick smoke-size run")
    args = ap.parse_args(argv)
    if args.small:
        fused_cfg = dict(layers=2, d=128, vocab=512, batch=2, seq=64, rounds=3)
        train_cfgs = [dict(seq=32, fdim=256, steps=20)]
    else:
        fused_cfg = dict(layers=8, d=512, vocab=8192, batch=8, seq=256, rounds=4)
        # world-model-sized features (L=4, d=128: 5 states) and the (a) model's (9 states, d=512)
        train_cfgs = [dict(seq=64, fdim=5 * 128, steps=100), dict(seq=256, fdim=9 * 512, steps=10)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f} (a loaded machine makes these figures noisy)")
    r = bench_fused(**fused_cfg)
    report(f"(a) SWIFT fused scoring, Llama L={fused_cfg['layers']} d={fused_cfg['d']} "
           f"V={fused_cfg['vocab']}, batch {fused_cfg['batch']} x {fused_cfg['seq']}, all states, gated "
           "head, float32 (goal: fused overhead <= 5%)", [r])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tc in enumerate(train_cfgs):
            store = make_store(Path(tmp) / f"store{i}", 64, tc["seq"], tc["fdim"])
            rows.append(bench_train(store, 16, tc["seq"], tc["steps"]))
    report("(b) SWIFT head train step (ce, AdamW lr 1e-4 wd 1e-5), batch 16 from a bf16 feature "
           "store: swiftjax jit vs PyTorch eager (goal: speedup >= 2)", rows)


if __name__ == "__main__":
    main()
