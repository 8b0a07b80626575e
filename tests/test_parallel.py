"""swiftjax.parallel: sampling, scoring, feature extraction and fine-tuning steps on a device mesh
equal one device. The multi-device checks run tests/_mesh_infer_worker.py once in a subprocess
with 8 virtual CPU devices (a 4x2 mesh with FSDP); other layouts are checked on their specs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_tiny import ARCHS, tiny_hf_config

from swiftjax import parallel

REPO = Path(__file__).resolve().parents[1]
MESHES = ("4x2",)


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_mesh_infer_worker.py")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_ran_every_mesh_on_8_devices(worker):
    assert worker["devices"] == 8
    assert sorted(worker["meshes"]) == sorted(MESHES)
    for res in worker["meshes"].values():
        assert res["n_devices_of_q"] == 8  # the weights really live on the mesh


TOKENS = [("4x2", w) for w in ("greedy", "sampled", "grouped", "scored_tokens")]
NUMBERS = [("4x2", w) for w in ("sampled_logprobs", "fused", "features", "scored", "arm_loss", "dpo_loss")]


@pytest.mark.parametrize("mesh, what", TOKENS)
def test_mesh_tokens_identical_to_one_device(worker, mesh, what):
    assert worker["meshes"][mesh][what] == worker["one"][what]


@pytest.mark.parametrize("mesh, what", NUMBERS)
def test_mesh_numbers_within_1e5_of_one_device(worker, mesh, what):
    got, want = np.asarray(worker["meshes"][mesh][what]), np.asarray(worker["one"][what])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma3"])
def test_other_port_families_on_a_mesh(worker, arch):
    res = worker["archs"][arch]
    assert res["4x2"]["greedy"] == res["one"]["greedy"]
    np.testing.assert_allclose(res["4x2"]["fused"], res["one"]["fused"], atol=1e-5, rtol=0)


def test_mesh_layouts_follow_the_rules(worker):
    fs = worker["meshes"]["4x2"]["shardings"]
    q, o = "model/layers/0/self_attn/q_proj/weight/value", "model/layers/0/self_attn/o_proj/weight/value"
    assert fs[q] == "P('model', 'data')" and fs[o] == "P('data', 'model')"  # TP over heads + FSDP
    assert fs["model/embed_tokens/weight/value"] == "P('model', 'data')"    # vocabulary rows over 'model'
    assert fs["model/layers/0/input_layernorm/weight/value"] == "P()"       # norms replicated
    # the KV cache: batch over 'data', KV heads over 'model'
    assert worker["meshes"]["4x2"]["cache"] == {"k": "P('data', 'model')", "v": "P('data', 'model')",
                                                "key_valid": "P('data',)"}


def test_tensor_parallel_only_and_indivisible_dimensions():
    """fsdp=false keeps the other dimension whole; a dimension the mesh axis does not divide
    (2 KV heads over 4, 6 rows over 4) stays unsplit instead of failing."""
    import jax
    from flax import nnx

    from swiftjax.models.config import ModelConfig
    from swiftjax.models.registry import abstract_model
    from swiftjax.train.mesh import path_str

    cfg = ModelConfig.from_hf_dict(tiny_hf_config("llama", vocab=96).to_dict())
    _, state = nnx.split(abstract_model(cfg))
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    P = jax.sharding.PartitionSpec
    specs = parallel.model_param_specs(state, mesh, fsdp=False)
    flat = dict((path_str(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0])
    assert flat["model/layers/0/self_attn/q_proj/weight/value"] == P("model", None)
    assert flat["model/layers/0/self_attn/o_proj/weight/value"] == P(None, "model")
    assert parallel._spec((8, 2, 16, 32), ("batch", "kv_heads", None, None), {"data": 2, "model": 4}) == \
        P("data", None, None, None)
    assert parallel._spec((6, 4, 16, 32), ("batch", "kv_heads", None, None), {"data": 4, "model": 4}) == \
        P(None, "model", None, None)


def test_mesh_config_checks_and_one_device_is_no_mesh():
    with pytest.raises(ValueError, match=r"mesh\.data: expected a positive int, got 0"):
        parallel.MeshConfig(data=0)
    with pytest.raises(ValueError, match=r"mesh\.model"):
        parallel.MeshConfig(model=True)
    assert parallel.MeshConfig().build() is None
    with parallel.use_mesh(parallel.MeshConfig()) as m:
        assert m is None and parallel.current_mesh() is None
    x = np.ones((4, 3), np.float32)
    assert parallel.constrain(x, "batch", None) is x  # no mesh: untouched
    with pytest.raises(ValueError, match=r"data\*model <= 1 devices"):
        parallel.MeshConfig(data=2).build()


@pytest.mark.parametrize("arch", ARCHS)
def test_model_rules_name_every_large_weight_of_the_ports(arch):
    """Every 2-D weight of every port matches a tensor-parallel rule (no silent replication);
    vectors (norms, biases) are replicated."""
    import jax
    from flax import nnx

    from swiftjax.models.config import ModelConfig
    from swiftjax.models.registry import abstract_model
    from swiftjax.train.mesh import path_str

    cfg = ModelConfig.from_hf_dict(tiny_hf_config(arch, vocab=96).to_dict())  # every dim divisible by 2
    _, state = nnx.split(abstract_model(cfg))
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "model"))
    specs = parallel.model_param_specs(state, mesh)
    flat = dict((path_str(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
    shapes = dict((path_str(p), x.shape) for p, x in jax.tree_util.tree_flatten_with_path(state)[0])
    assert any(len(s) == 2 for s in shapes.values())
    for path, shape in shapes.items():
        if path.startswith("transformer/wpe/"):  # GPT-2's position table: split over 'data' only
            assert flat[path] == jax.sharding.PartitionSpec(None, "data")
        elif len(shape) == 2:
            assert "model" in tuple(flat[path]), (path, flat[path])
        else:
            assert flat[path] == jax.sharding.PartitionSpec(), path
