"""The same train_step on 1 device, on meshes and under pmap; sharding rules.

The multi-device checks run tests/_mesh_worker.py once in a subprocess with 8 virtual CPU
devices (the pytest process has one device) and compare its JSON output here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from swiftjax.train import mesh as M

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_mesh_worker.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT_JSON ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT_JSON "):])


def _max_param_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def test_mesh_worker_sees_8_devices(worker):
    assert worker["n_devices"] == 8


@pytest.mark.parametrize("case", ["linear", "mlp"])
@pytest.mark.parametrize("layout", ["mesh_4x2", "mesh_8x1"])
def test_mesh_same_loss_curve_and_params_as_one_device(worker, case, layout):
    single, run = worker[case]["single"], worker[case][layout]
    assert len(run["losses"]) == len(single["losses"]) > 0
    np.testing.assert_allclose(run["losses"], single["losses"], atol=TOL, rtol=0)
    assert _max_param_diff(run["params"], single["params"]) < TOL
    # training moved the params (the comparison is not between two untouched inits)
    assert single["losses"][0] != single["losses"][-1]


@pytest.mark.parametrize("case", ["linear", "mlp"])
def test_pmap_same_loss_curve_and_params_as_one_device(worker, case):
    single, run = worker[case]["single"], worker[case]["pmap"]
    np.testing.assert_allclose(run["losses"], single["losses"], atol=TOL, rtol=0)
    assert _max_param_diff(run["params"], single["params"]) < TOL


def test_mesh_same_seed_gives_identical_run(worker):
    a, b = worker["mlp"]["single"], worker["mlp"]["single_again"]
    assert a["losses"] == b["losses"]
    assert _max_param_diff(a["params"], b["params"]) == 0.0


def test_mesh_random_loss_same_on_mesh(worker):
    # dropout draws from the step's rng: the partitionable threefry gives the same bits sharded
    single, run = worker["mlp_dropout"]["single"], worker["mlp_dropout"]["mesh_4x2"]
    np.testing.assert_allclose(run["losses"], single["losses"], atol=TOL, rtol=0)
    assert _max_param_diff(run["params"], single["params"]) < TOL


def test_mesh_fsdp_params_stay_sharded_through_training(worker):
    run = worker["mlp"]["mesh_4x2"]
    want = {"w1": "P(None, 'model')", "w2": "P('model', None)", "b1": "P('model',)"}
    assert run["specs_before"] == want
    assert run["specs_after"] == want
    assert run["distinct_shards"] == {"w1": 2, "w2": 2, "b1": 2}
    # head rules: params replicated on every layout
    for layout in ("mesh_4x2", "mesh_8x1"):
        specs = worker["linear"][layout]["specs_after"]
        assert specs == {"w": "P()", "b": "P()"}


def test_shard_batch_and_pmap_split_reject_indivisible_batches(worker):
    err = worker["errors"]
    assert "divisible" in err["shard_batch_indivisible"] and "12" in err["shard_batch_indivisible"]
    assert "divisible" in err["pmap_split_indivisible"]
    assert "data*model" in err["mesh_too_big"]


# ------------------------------------------------------------- rules (1 device)
def _expected_fsdp(shape, n, min_size):
    """Independent statement of the FSDP default: largest dim divisible by n, ties -> first."""
    if int(np.prod(shape)) < min_size or not shape:
        return P()
    best = None
    for d, s in enumerate(shape):
        if s % n == 0 and (best is None or s > shape[best]):
            best = d
    if best is None:
        return P()
    return P(*["model" if d == best else None for d in range(len(shape))])


@pytest.mark.parametrize(
    "shape", [(512, 128), (128, 512), (6, 1024), (1000, 1026), (3, 5), (256,), (64, 64), (7, 2048, 9)]
)
def test_shard_param_spec_fsdp_default(shape):
    mesh = AbstractMesh((4, 2), ("data", "model"))
    rules = M.ShardingRules(logical_axes=M.BASE_MODEL_RULES.logical_axes, fsdp_axis="model",
                            min_shard_size=1000)
    got = M.param_spec("x", shape, mesh, rules)
    assert got == _expected_fsdp(shape, 2, 1000)


def test_shard_param_specs_tree_rules_and_overrides():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    rules = M.ShardingRules(
        logical_axes=M.BASE_MODEL_RULES.logical_axes,
        param_axes=((r"embed/embedding$", ("vocab", "embed")), (r"mlp/.*kernel$", ("embed", "mlp"))),
        fsdp_axis="model", min_shard_size=256,
    )
    params = {
        "embed": {"embedding": np.zeros((1000, 64))},  # 1000 % 4 == 0 -> vocab on 'model'
        "layers": [{"mlp": {"kernel": np.zeros((64, 6))}},  # 6 % 4 != 0 -> stays unsharded
                   {"mlp": {"kernel": np.zeros((64, 256))}}],
        "norm": np.zeros((64,)),  # small -> replicated
        "other": np.zeros((4, 512)),  # FSDP default on the largest dim
    }
    specs = M.param_specs(params, mesh, rules)
    assert specs["embed"]["embedding"] == P("model", None)
    assert specs["layers"][0]["mlp"]["kernel"] == P(None, None)
    assert specs["layers"][1]["mlp"]["kernel"] == P(None, "model")
    assert specs["norm"] == P()
    assert specs["other"] == P(None, "model")
    # head rules replicate everything
    head = M.param_specs(params, mesh, M.HEAD_RULES)
    assert all(s == P() for s in jax.tree.leaves(head, is_leaf=lambda x: isinstance(x, P)))


def test_shard_logical_to_spec_uses_each_mesh_axis_once():
    rules = M.BASE_MODEL_RULES
    assert M.logical_to_spec(("batch", "embed"), rules) == P("data", None)
    assert M.logical_to_spec(("mlp", "heads"), rules) == P("model", None)
    with pytest.raises(ValueError, match="logical axis"):
        M.logical_to_spec(("nope",), rules)


def test_mesh_make_mesh_validates_sizes():
    n = jax.device_count()
    with pytest.raises(ValueError, match="data\\*model"):
        M.make_mesh(data=n + 1)
    with pytest.raises(ValueError, match="axis_types"):
        M.make_mesh(data=1, axis_types="manual")
    with pytest.raises(ValueError, match="model"):
        M.make_mesh(model=0)
    mesh = M.make_mesh(data=1, model=1)
    assert dict(mesh.shape) == {"data": 1, "model": 1}
