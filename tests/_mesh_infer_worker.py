"""Runs in a subprocess with 8 virtual CPU devices (tests/test_parallel.py launches it).

The same tiny Llama (GQA: 4 query / 2 KV heads) decodes, scores and takes one fine-tuning step
on one device and inside ``parallel.use_mesh`` for several meshes; prints one JSON object with
every output, so the test compares them in the parent process.
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
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: hf_tiny

from swiftjax import parallel  # noqa: E402
from swiftjax.methods.genarm.pipeline import make_arm_loss  # noqa: E402
from swiftjax.methods.preference.mrpo import MethodSection, _pair_train_fn  # noqa: E402
from swiftjax.methods.preference.pairs import PreferencePairs  # noqa: E402
from swiftjax.methods.swift import features as F  # noqa: E402
from swiftjax.methods.swift.head import init_params  # noqa: E402
from swiftjax.models.config import ModelConfig  # noqa: E402
from swiftjax.models.registry import create_model  # noqa: E402
from swiftjax.sampling import SamplingConfig, generate  # noqa: E402
from swiftjax.train import loop  # noqa: E402
from swiftjax.train.mesh import path_str  # noqa: E402

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, eos_token_id=(3,), pad_token_id=0)
MESHES = [(4, 2, True, True)]  # data, model, fsdp, every output (other layouts: tests/test_parallel.py, specs)
B, T, N = 8, 10, 12


def fresh_model():
    return create_model(CFG, seed=0)


def prompts():
    rs = np.random.RandomState(0)
    ids = rs.randint(4, CFG.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for i, pad in enumerate([0, 3, 0, 5, 1, 0, 2, 4]):
        mask[i, :pad] = 0
        ids[i, :pad] = 0
    return ids, mask


def grouped_prompts():
    ids, mask = prompts()
    return np.repeat(ids[::2], 2, axis=0), np.repeat(mask[::2], 2, axis=0)


def scoring_rows():
    rs = np.random.RandomState(1)
    ids = rs.randint(4, CFG.vocab_size, size=(B, 16)).astype(np.int32)
    attn = np.ones_like(ids)
    resp = np.zeros_like(ids)
    for i in range(B):
        resp[i, 6: 6 + 3 + i] = 1
    return ids, attn, resp


def pairs():
    ids, attn, resp = scoring_rows()
    rs = np.random.RandomState(2)
    ids2 = ids.copy()
    ids2[:, 6:] = rs.randint(4, CFG.vocab_size, size=ids2[:, 6:].shape)
    ref_c = rs.randn(B, 1).astype(np.float32) - 20
    ref_r = rs.randn(B, 1).astype(np.float32) - 20
    return PreferencePairs.build((ids, attn, resp), (ids2, attn, resp), ref_c, ref_r, ("init",))


def one_step_loss(model, fn):
    graphdef, params, rest = loop.nnx_split(model)
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=1e-2))
    step = loop.make_train_step(loop.nnx_loss(graphdef, fn), tx)
    state = loop.init_state(jax.tree.map(jnp.copy, params), tx, 0, frozen=rest)
    losses = []
    for _ in range(2):  # the second loss checks the update too
        state, m = step(state, batch_of(fn))
        losses.append(float(m["loss"]))
    return losses


def batch_of(fn):
    p = pairs()
    return p if fn is DPO else p.arrays()


ARM = make_arm_loss(0.05, 0.0, "sigmoid", False)
DPO = _pair_train_fn(MethodSection(name="dpo", loss="dpo"), 0.1, None)


def run_all(model, full: bool = True):
    """Every output on ``model``; ``full=False``: greedy, sampled and fused scores only (the
    second mesh layout: fewer compilations)."""
    ids, mask = prompts()
    greedy = generate(model, ids, mask, cfg=SamplingConfig(max_new_tokens=N, temperature=0.0, eos_ids=(3,)))
    sampled_cfg = SamplingConfig(max_new_tokens=N, temperature=0.9, top_p=0.9, eos_ids=(3,))
    sampled = generate(model, ids, mask, key=jax.random.key(7), cfg=sampled_cfg)
    head = init_params(jax.random.key(3), F.feature_dim(F.FeatureSpec(layers="all", mode="hidden"), CFG))
    spec = F.FeatureSpec(layers="all", mode="hidden")
    sids, sattn, sresp = scoring_rows()
    fused = F.fused_scores_batched(model, head, spec, sids, sattn, sresp, batch_size=8)
    out = {"greedy": np.asarray(greedy.tokens).tolist(), "sampled": np.asarray(sampled.tokens).tolist(),
           "sampled_logprobs": np.asarray(sampled.logprobs).tolist(), "fused": np.asarray(fused).tolist()}
    if not full:
        return out
    gids, gmask = grouped_prompts()
    grouped = generate(model, gids, gmask, key=jax.random.key(7), cfg=sampled_cfg, prompt_groups=2)
    feats = np.asarray(F.extract(model, sids, sattn, sresp, F.FeatureSpec(layers=(0, 2), mode="hidden")))
    scored = F.generate_with_scores(model, head, spec, ids, mask, key=jax.random.key(5), cfg=sampled_cfg)
    return {**out, "grouped": np.asarray(grouped.tokens).tolist(), "features": feats.tolist(),
            "scored_tokens": np.asarray(scored.tokens).tolist(), "scored": np.asarray(scored.scores).tolist(),
            "arm_loss": one_step_loss(fresh_model_copy(model), ARM),
            "dpo_loss": one_step_loss(fresh_model_copy(model), DPO)}


def fresh_model_copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def shardings(model):
    _, state = nnx.split(model)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {path_str(p): str(x.sharding.spec) for p, x in flat
            if any(s in path_str(p) for s in ("layers/0/self_attn/q_proj", "layers/0/self_attn/o_proj",
                                               "layers/0/mlp/down_proj", "embed_tokens", "lm_head",
                                               "layers/0/input_layernorm"))}


def cache_specs():
    """The layout the sampler's cache constraint gives a [B, Hkv, Dh, S] key buffer."""
    from swiftjax.models.cache import init_cache
    from swiftjax.sampling import constrain_cache

    c = jax.jit(lambda: constrain_cache(init_cache(CFG, B, 16)))()
    return {"k": str(c.k[0].sharding.spec), "v": str(c.v[0].sharding.spec),
            "key_valid": str(c.key_valid.sharding.spec)}


def other_archs():
    """Greedy tokens and fused scores of Gemma 3 (sliding and full blocks with their own masks and
    RoPE tables, soft-caps, q/k norms): {arch: {"one": ..., "4x2": ...}}."""
    from hf_tiny import tiny_hf_config

    out = {}
    for arch in ("gemma3",):
        cfg = ModelConfig.from_hf_dict(tiny_hf_config(arch, vocab=96).to_dict())
        ids, mask = prompts()
        ids = ids % 96
        spec = F.FeatureSpec(layers="all", mode="hidden")
        head = init_params(jax.random.key(3), F.feature_dim(spec, cfg))
        sids, sattn, sresp = scoring_rows()
        res = {}
        for name, mcfg in (("one", None), ("4x2", parallel.MeshConfig(data=4, model=2))):
            with parallel.use_mesh(mcfg) as mesh:
                m = parallel.shard_model(create_model(cfg, seed=1), mesh)
                g = generate(m, ids, mask, cfg=SamplingConfig(max_new_tokens=N, temperature=0.0, eos_ids=(2,)))
                res[name] = {"greedy": np.asarray(g.tokens).tolist(),
                             "fused": np.asarray(F.fused_scores_batched(m, head, spec, sids % 96, sattn, sresp,
                                                                        batch_size=8)).tolist()}
        out[arch] = res
    return out


def main():
    out = {"devices": len(jax.devices()), "one": run_all(fresh_model()), "meshes": {}, "archs": other_archs()}
    for data, model_axis, fsdp, full in MESHES:
        with parallel.use_mesh(parallel.MeshConfig(data=data, model=model_axis, fsdp=fsdp)) as mesh:
            m = parallel.shard_model(fresh_model(), mesh)
            res = run_all(m, full)
            res["shardings"] = shardings(m)
            res["cache"] = cache_specs()
            res["n_devices_of_q"] = len(nnx.state(m)["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
                                        [...].sharding.device_set)
        out["meshes"][f"{data}x{model_axis}{'' if fsdp else '-nofsdp'}"] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
