"""A small, deterministic training run exercising the whole loop (used by the resume test).

``python tests/train/_demo_run.py --ckpt-dir DIR --steps 40 --ckpt-every 5 --out final.json``

A 2-layer MLP regresses random targets from random features; batches are reshuffled each
epoch with a seed derived from the epoch, the optimizer is AdamW with warm-up + cosine and
clipping, and the run evaluates every few steps tracking the best params. Killed at any point
and started again with the same arguments, it resumes from the latest readable checkpoint and
ends with the same params as a run that was never interrupted.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from swiftjax.train.ckpt import Checkpointer
from swiftjax.train.loop import (
    EarlyStopping,
    FitResult,
    OptimizerConfig,
    fit,
    init_state,
    learning_rate_fn,
    make_eval_fn,
    make_optimizer,
    make_train_step,
)
from swiftjax.train.metrics import JsonlWriter

N_TRAIN, N_EVAL, FEATURES, HIDDEN, BATCH = 64, 32, 12, 32, 8


def make_data(seed: int):
    rs = np.random.RandomState(seed)
    w = rs.randn(FEATURES).astype(np.float32)
    x = rs.randn(N_TRAIN + N_EVAL, FEATURES).astype(np.float32)
    y = (np.tanh(x @ w) + 0.1 * rs.randn(N_TRAIN + N_EVAL)).astype(np.float32)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def init_params(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "b1": jnp.zeros((HIDDEN,)),
        "w2": jax.random.normal(k2, (HIDDEN,)) / np.sqrt(HIDDEN),
    }


def predict(params: dict, x: jax.Array) -> jax.Array:
    """x: [B, F] -> [B]."""
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def loss_fn(params, batch, rng):
    del rng
    err = predict(params, batch["x"]) - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def run(
    ckpt_dir: str | None,
    *,
    steps: int = 40,
    ckpt_every: int = 5,
    eval_every: int = 5,
    seed: int = 0,
    sleep: float = 0.0,
    log: str | None = None,
    progress: bool = False,
) -> FitResult:
    (xt, yt), (xe, ye) = make_data(seed)
    cfg = OptimizerConfig(
        lr=3e-2, weight_decay=1e-2, schedule="cosine", warmup_steps=4, total_steps=steps,
        clip_norm=1.0,
    )
    tx = make_optimizer(cfg)
    state = init_state(init_params(seed), tx, seed)
    step = make_train_step(loss_fn, tx, lr_fn=learning_rate_fn(cfg))
    if sleep:
        inner = step

        def step(s, b):  # slow the run down so a test can kill it mid-way
            out = inner(s, b)
            time.sleep(sleep)
            return out

    def batches(epoch: int):
        order = np.random.RandomState(seed * 1000 + epoch).permutation(N_TRAIN)
        for i in range(0, N_TRAIN - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            yield {"x": xt[idx], "y": yt[idx]}

    eval_fn = make_eval_fn(
        lambda p, b: {"loss": loss_fn(p, b, None)[0]}, [{"x": xe, "y": ye}]
    )
    ck = Checkpointer(ckpt_dir, max_to_keep=3) if ckpt_dir else None
    writer = JsonlWriter(log) if log else None
    try:
        return fit(
            state, step, batches, max_steps=steps, eval_fn=eval_fn, eval_every=eval_every,
            early_stopping=EarlyStopping("loss", "min", patience=None), checkpointer=ck,
            ckpt_every=ckpt_every, writer=writer, progress=progress, desc="demo",
        )
    finally:
        if ck is not None:
            ck.close()
        if writer is not None:
            writer.close()


def result_to_json(res: FitResult) -> dict:
    to_list = lambda t: {k: np.asarray(v).tolist() for k, v in t.items()}  # noqa: E731
    return {
        "steps": res.steps,
        "params": to_list(res.state.params),
        "best_params": to_list(res.best_params),
        "best_step": res.best_step,
        "best_metric": res.best_metric,
        "history": res.history,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    ap.add_argument("--log", default=None, help="jsonl metrics file")
    ap.add_argument("--out", default=None, help="write final params and history here (JSON)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    res = run(
        a.ckpt_dir, steps=a.steps, ckpt_every=a.ckpt_every, eval_every=a.eval_every, seed=a.seed,
        sleep=a.sleep, log=a.log, progress=a.progress,
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result_to_json(res)))


if __name__ == "__main__":
    main()
