"""Runs in a subprocess with 8 virtual CPU devices (tests/test_mesh.py launches it).

Trains a SWIFT-like linear head over random token features and a tiny MLP with the same seed
on: one device (plain jit), a (data=4, model=2) mesh, a (data=8, model=1) mesh and under pmap
over 8 devices; prints one JSON object with the loss curves, final params and shardings.
"""
from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swiftjax.train import loop  # noqa: E402
from swiftjax.train import mesh as M  # noqa: E402

STEPS = 12
B, T, D = 16, 6, 24
F, H = 16, 64


def head_init(key):
    return {"w": jax.random.normal(key, (D,)) * 0.1, "b": jnp.zeros(())}


def head_loss(params, batch, rng):
    """SWIFT-like: token scores h.w + b, masked mean over tokens, logistic loss on labels."""
    del rng
    s = batch["h"] @ params["w"] + params["b"]  # [B, T]
    m = batch["mask"]
    score = jnp.sum(s * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    y = batch["label"]
    loss = jnp.mean(jax.nn.softplus(score) - y * score)
    return loss, {"acc": jnp.mean((score > 0) == (y > 0.5))}


def head_batches(seed):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(STEPS):
        lengths = rs.randint(1, T + 1, size=B)
        out.append({
            "h": rs.randn(B, T, D).astype(np.float32),
            "mask": (np.arange(T)[None] < lengths[:, None]).astype(np.float32),
            "label": rs.randint(0, 2, size=B).astype(np.float32),
        })
    return out


def mlp_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (F, H)) * 0.3,
        "b1": jnp.zeros((H,)),
        "w2": jax.random.normal(k2, (H, 2)) * 0.3,
    }


def mlp_loss(params, batch, rng, dropout=0.0):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    if dropout:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0)
    y = h @ params["w2"]
    return jnp.mean((y - batch["y"]) ** 2), {"mae": jnp.mean(jnp.abs(y - batch["y"]))}


def mlp_dropout_loss(params, batch, rng):
    return mlp_loss(params, batch, rng, dropout=0.25)


def mlp_batches(seed):
    rs = np.random.RandomState(seed)
    return [
        {"x": rs.randn(B, F).astype(np.float32), "y": rs.randn(B, 2).astype(np.float32)}
        for _ in range(STEPS)
    ]


CASES = {
    "linear": (head_init, head_loss, head_batches, M.HEAD_RULES),
    # FSDP rule with a small threshold so the MLP's weights really are split along 'model'.
    "mlp": (mlp_init, mlp_loss, mlp_batches,
            M.ShardingRules(logical_axes=M.BASE_MODEL_RULES.logical_axes, fsdp_axis=M.MODEL,
                            min_shard_size=64)),
    "mlp_dropout": (mlp_init, mlp_dropout_loss, mlp_batches,
                    M.ShardingRules(logical_axes=M.BASE_MODEL_RULES.logical_axes,
                                    fsdp_axis=M.MODEL, min_shard_size=64)),
}

CFG = loop.OptimizerConfig(
    lr=5e-2, weight_decay=1e-2, schedule="cosine", warmup_steps=3, total_steps=STEPS, clip_norm=1.0
)


def tolist(tree):
    return {k: np.asarray(v).tolist() for k, v in jax.device_get(tree).items()}


def run_single(case, seed=0):
    init, loss_fn, batches, _ = CASES[case]
    tx = loop.make_optimizer(CFG)
    state = loop.init_state(init(jax.random.PRNGKey(seed)), tx, seed)
    step = loop.make_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(CFG))
    losses = []
    for b in batches(seed):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return {"losses": losses, "params": tolist(state.params)}


def run_mesh(case, data, model, seed=0):
    init, loss_fn, batches, rules = CASES[case]
    mesh = M.make_mesh(data=data, model=model)
    tx = loop.make_optimizer(CFG)
    state = loop.init_state(init(jax.random.PRNGKey(seed)), tx, seed)
    state = M.shard_state(state, mesh, rules, tx)
    want = {k: str(v.sharding.spec) for k, v in state.params.items()}
    step = loop.make_train_step(
        loss_fn, tx, lr_fn=loop.learning_rate_fn(CFG),
        state_sharding=M.shardings_of(state), batch_sharding=M.batch_sharding(mesh, rules),
    )
    losses = []
    for b in batches(seed):
        state, m = step(state, M.shard_batch(b, mesh, rules))
        losses.append(float(m["loss"]))
    got = {k: str(v.sharding.spec) for k, v in state.params.items()}
    n_shards = {k: len({str(s.index) for s in v.addressable_shards}) for k, v in state.params.items()}
    return {"losses": losses, "params": tolist(state.params), "specs_before": want,
            "specs_after": got, "distinct_shards": n_shards}


def run_pmap(case, seed=0):
    init, loss_fn, batches, _ = CASES[case]
    tx = loop.make_optimizer(CFG)
    state = M.pmap_replicate(loop.init_state(init(jax.random.PRNGKey(seed)), tx, seed), 8)
    step = M.make_pmap_train_step(loss_fn, tx, lr_fn=loop.learning_rate_fn(CFG))
    losses = []
    for b in batches(seed):
        state, m = step(state, M.pmap_split(b, 8))
        losses.append(float(m["loss"][0]))
    return {"losses": losses, "params": tolist(M.pmap_unreplicate(state.params))}


def errors():
    out = {}
    mesh = M.make_mesh(data=8)
    try:
        M.shard_batch({"x": np.zeros((12, 3), np.float32)}, mesh)
    except ValueError as e:
        out["shard_batch_indivisible"] = str(e)
    try:
        M.make_mesh(data=4, model=4)
    except ValueError as e:
        out["mesh_too_big"] = str(e)
    try:
        M.pmap_split({"x": np.zeros((12, 3), np.float32)}, 8)
    except ValueError as e:
        out["pmap_split_indivisible"] = str(e)
    return out


def main():
    res = {"n_devices": jax.device_count()}
    for case in ("linear", "mlp"):
        res[case] = {
            "single": run_single(case),
            "mesh_4x2": run_mesh(case, 4, 2),
            "mesh_8x1": run_mesh(case, 8, 1),
            "pmap": run_pmap(case),
        }
    res["mlp"]["single_again"] = run_single("mlp")
    res["mlp_dropout"] = {
        "single": run_single("mlp_dropout"),
        "mesh_4x2": run_mesh("mlp_dropout", 4, 2),
    }
    res["errors"] = errors()
    print("RESULT_JSON " + json.dumps(res))


if __name__ == "__main__":
    main()
