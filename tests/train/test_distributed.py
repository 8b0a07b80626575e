"""swiftjax.train.distributed: host data shards, main-process logic, init argument wiring."""
from __future__ import annotations

import numpy as np
import pytest

from swiftjax.train import distributed as dist
from swiftjax.train.metrics import JsonlWriter, read_jsonl, to_python


@pytest.mark.parametrize("n,p", [(10, 3), (12, 4), (7, 8), (100, 1), (0, 2)])
def test_host_shard_drop_remainder_equal_disjoint_blocks(n, p):
    idx = np.random.RandomState(n).permutation(n)
    parts = [dist.host_shard(idx, i, p) for i in range(p)]
    per = n // p
    assert all(len(x) == per for x in parts)
    flat = np.concatenate(parts) if parts else np.array([])
    np.testing.assert_array_equal(flat, idx[: per * p])  # contiguous blocks in order


@pytest.mark.parametrize("n,p", [(10, 3), (12, 4), (7, 8), (5, 2)])
def test_host_shard_keep_remainder_covers_everything_once(n, p):
    idx = np.arange(100, 100 + n)
    parts = [dist.host_shard(idx, i, p, drop_remainder=False) for i in range(p)]
    np.testing.assert_array_equal(np.concatenate(parts), idx)
    sizes = [len(x) for x in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_host_shard_int_and_default_process():
    np.testing.assert_array_equal(dist.host_shard(6, 1, 2), [3, 4, 5])
    np.testing.assert_array_equal(dist.host_shard([4, 5, 6]), [4, 5, 6])  # one process here


def test_host_shard_bad_inputs():
    with pytest.raises(ValueError, match="process_index"):
        dist.host_shard(10, 3, 3)
    with pytest.raises(ValueError, match="process_count"):
        dist.host_shard(10, 0, 0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        dist.host_shard(np.zeros((2, 2)), 0, 1)


def test_is_main_process_and_writer_respects_it(tmp_path):
    assert dist.is_main_process(0) and not dist.is_main_process(3)
    assert dist.is_main_process()  # a single-process run is the main process
    w1 = JsonlWriter(tmp_path / "other.jsonl", process_index=1)
    w1.write(1, {"loss": 1.0})
    w1.close()
    assert not (tmp_path / "other.jsonl").exists()
    w0 = JsonlWriter(tmp_path / "main.jsonl", process_index=0)
    w0.write(1, {"loss": np.float32(0.5), "v": np.array([1.0, 2.0]), "n": np.int64(3)})
    w0.close()
    assert read_jsonl(tmp_path / "main.jsonl") == [{"step": 1, "loss": 0.5, "v": [1.0, 2.0], "n": 3}]
    assert to_python({"a": float("nan")}) == {"a": "nan"}


def test_resolve_distributed_args_from_env_and_args():
    env = {dist.ENV_COORDINATOR: "10.0.0.1:1234", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "2"}
    assert dist.resolve_distributed_args(env=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
    }
    # arguments win over the environment
    got = dist.resolve_distributed_args("h:9", 2, 1, env=env)
    assert got == {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1}
    assert dist.resolve_distributed_args(env={}) is None
    assert dist.resolve_distributed_args(env={dist.ENV_AUTO: "auto"}) == {}


def test_resolve_distributed_args_bad_inputs():
    with pytest.raises(ValueError, match="together"):
        dist.resolve_distributed_args("h:1", env={})
    with pytest.raises(ValueError, match="host:port"):
        dist.resolve_distributed_args("nohost", 2, 0, env={})
    with pytest.raises(ValueError, match="process_id"):
        dist.resolve_distributed_args("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="integer"):
        dist.resolve_distributed_args(env={dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "x",
                                           dist.ENV_PROCESS_ID: "0"})


def test_maybe_initialize_single_process_is_a_no_op(monkeypatch):
    for k in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, dist.ENV_AUTO):
        monkeypatch.delenv(k, raising=False)
    assert dist.maybe_initialize() is False
