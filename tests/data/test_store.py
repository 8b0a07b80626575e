"""Feature store: bf16 round trip (vs a bit-level numpy rounding), ragged rows, shards,
checksums, and refusal of half-written, truncated or tampered stores; no temporary dirs left."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from swiftjax.data.store import (MANIFEST, FeatureStore, FeatureStoreWriter, from_bf16_bits,
                                 narrow_store, to_bf16_bits)

F_DIM = 6


def np_bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) with integer bit arithmetic, back to
    float32. Finite inputs only."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def _rows(seed=0, lengths=(3, 1, 7, 4, 2)):
    rs = np.random.RandomState(seed)
    return [(rs.randn(n, F_DIM) * 10.0 ** rs.uniform(-3, 3, size=(n, F_DIM))).astype(np.float32)
            for n in lengths]


def _write(path, rows, shard_rows=2, **kw):
    n = len(rows)
    labels = (np.arange(n) % 2).astype(np.float32)
    groups = np.arange(n) // 2
    with FeatureStoreWriter(path, F_DIM, {"layers": [0, 2], "mode": "hidden"}, shard_rows=shard_rows,
                            meta={"note": "test"}, **kw) as w:
        w.add(rows[:2], labels[:2], groups[:2], extras={"index": np.arange(2)})
        w.add(rows[2:], labels[2:], groups[2:], extras={"index": np.arange(2, n)})
    return labels, groups


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_bf16_bits_match_bit_level_rounding():
    rs = np.random.RandomState(1)
    x = np.concatenate([rs.randn(5000).astype(np.float32) * 10.0 ** rs.uniform(-30, 30, 5000),
                        np.float32([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.0e38])])  # ties incl.
    x = x.astype(np.float32)
    got = from_bf16_bits(to_bf16_bits(x))
    ref = np_bf16_round(x)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.all(np.abs(got - x) <= 2.0 ** -8 * np.abs(x))


def test_round_trip_ragged_rows_across_shards(tmp_path):
    rows = _rows()
    labels, groups = _write(tmp_path / "st", rows, shard_rows=2)
    st = FeatureStore(tmp_path / "st")
    assert len(st) == 5 and st.feature_dim == F_DIM and st.num_tokens == 17 and st.max_len == 7
    assert len(st.manifest["shards"]) == 3  # 2 + 2 + 1 rows
    assert st.spec == {"layers": [0, 2], "mode": "hidden"} and st.meta == {"note": "test"}
    np.testing.assert_array_equal(st.labels, labels)
    np.testing.assert_array_equal(st.group_ids, groups)
    np.testing.assert_array_equal(st.extras["index"], np.arange(5))
    np.testing.assert_array_equal(st.lengths, [3, 1, 7, 4, 2])
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(st.row(i), np_bf16_round(r))
    idx = [4, 0, 2]
    x, m = st.batch(idx)
    assert x.dtype == np.float32 and x.shape == (3, 7, F_DIM) and m.shape == (3, 7)
    for j, i in enumerate(idx):
        n = rows[i].shape[0]
        np.testing.assert_array_equal(x[j, :n], np_bf16_round(rows[i]))
        np.testing.assert_allclose(x[j, :n], rows[i], rtol=2.0 ** -8, atol=0)
        assert np.all(x[j, n:] == 0) and np.all(m[j, :n] == 1) and np.all(m[j, n:] == 0)
    x2, _ = st.batch(np.array([1]), pad_to=st.max_len)
    assert x2.shape == (1, 7, F_DIM)
    cols = np.array([F_DIM - 1, 0])  # a column subset, in the order asked
    x3, m3 = st.batch(idx, columns=cols)
    np.testing.assert_array_equal(x3, x[..., cols])
    np.testing.assert_array_equal(m3, m)
    x4, m4 = st.batch(idx, columns=cols, exact_bf16=True)  # the stored values, in half the bytes
    assert x4.dtype == ml_dtypes.bfloat16 and x4.nbytes * 2 == x3.nbytes
    np.testing.assert_array_equal(x4.astype(np.float32), x3)
    np.testing.assert_array_equal(m4, m)
    x5, m5 = st.batch(idx, exact_bf16=True)  # whole rows read straight into the batch
    np.testing.assert_array_equal(x5.astype(np.float32), x)
    np.testing.assert_array_equal(m5, m)
    assert _leftovers(tmp_path) == []


def test_narrowed_store_holds_the_same_bits_of_the_chosen_columns(tmp_path):
    rows = _rows(seed=4, lengths=(3, 1, 7, 4, 2, 5, 6))
    labels, groups = _write(tmp_path / "st", rows, shard_rows=3)
    st = FeatureStore(tmp_path / "st")
    cols = np.array([4, 1, 5])
    small = narrow_store(st, tmp_path / "small", cols, rows_per_add=2, meta={"key": "k"})
    assert len(small) == len(st) and small.feature_dim == 3 and small.meta == {"key": "k"}
    assert small.spec == st.spec and small.max_len == st.max_len
    np.testing.assert_array_equal(small.lengths, st.lengths)
    np.testing.assert_array_equal(small.labels, labels)
    np.testing.assert_array_equal(small.group_ids, groups)
    np.testing.assert_array_equal(small.extras["index"], np.arange(len(rows)))
    for i in range(len(rows)):
        np.testing.assert_array_equal(small.row_bits(i), st.row_bits(i)[:, cols])
    idx = [6, 0, 3]
    np.testing.assert_array_equal(small.batch(idx)[0], st.batch(idx, columns=cols)[0])
    with pytest.raises(ValueError, match=r"columns: expected a non-empty 1-D int array of indices in \[0, 6\)"):
        narrow_store(st, tmp_path / "bad", np.array([6]))
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def test_shard_truncated_after_opening_is_an_error_not_zeros(tmp_path):
    rows = _rows()
    _write(tmp_path / "st", rows, shard_rows=2)
    st = FeatureStore(tmp_path / "st")
    last = tmp_path / "st" / st.manifest["shards"][-1]["file"]
    with open(last, "r+b") as fh:  # row 4 (the last shard's only row) loses its bytes
        fh.truncate(last.stat().st_size - 2 * F_DIM * 2)
    np.testing.assert_array_equal(st.batch([0, 2])[0][1, :7], np_bf16_round(rows[2]))  # other shards read
    for kw in ({}, {"exact_bf16": True}):
        with pytest.raises(ValueError, match=rf"shard {last.name} ended early reading row 4"):
            st.batch([0, 4], **kw)


def test_padded_batch_input_keeps_only_masked_tokens(tmp_path):
    rs = np.random.RandomState(2)
    x = rs.randn(2, 5, F_DIM).astype(np.float32)
    m = np.array([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    with FeatureStoreWriter(tmp_path / "st", F_DIM, shard_bytes=1) as w:  # one row per shard
        w.add(x, [1, 0], [0, 0], mask=m)
    st = FeatureStore(tmp_path / "st")
    assert len(st.manifest["shards"]) == 2
    np.testing.assert_array_equal(st.row(0), np_bf16_round(x[0, [1, 2, 4]]))
    np.testing.assert_array_equal(st.row(1), np_bf16_round(x[1]))


def test_missing_manifest_is_a_half_written_store(tmp_path):
    _write(tmp_path / "st", _rows())
    (tmp_path / "st" / MANIFEST).unlink()
    with pytest.raises(ValueError, match="half-written"):
        FeatureStore(tmp_path / "st")
    with pytest.raises(ValueError, match="expected a directory"):
        FeatureStore(tmp_path / "nothing")


def test_truncated_shard_is_detected_even_without_checksums(tmp_path):
    _write(tmp_path / "st", _rows())
    shard = tmp_path / "st" / "shard_00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    for verify in (True, False):
        with pytest.raises(ValueError, match="shard 1.*truncated"):
            FeatureStore(tmp_path / "st", verify=verify)


def test_tampered_bytes_fail_the_checksum(tmp_path):
    _write(tmp_path / "st", _rows())
    shard = tmp_path / "st" / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # same size, one bit flipped in the features
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256.*shard_00000"):
        FeatureStore(tmp_path / "st")
    st = FeatureStore(tmp_path / "st", verify=False)  # opt-out: opens, the bytes are what they are
    assert len(st) == 5


def test_missing_file_and_tampered_labels(tmp_path):
    _write(tmp_path / "a", _rows())
    (tmp_path / "a" / "shard_00002.npy").unlink()
    with pytest.raises(ValueError, match="missing"):
        FeatureStore(tmp_path / "a")
    _write(tmp_path / "b", _rows())
    lab = tmp_path / "b" / "labels.npy"
    arr = np.load(lab)
    arr[0] = 1.0 - arr[0]
    np.save(lab, arr)
    with pytest.raises(ValueError, match="labels.*sha256"):
        FeatureStore(tmp_path / "b")


def test_edited_manifest_is_refused(tmp_path):
    _write(tmp_path / "st", _rows())
    mpath = tmp_path / "st" / MANIFEST
    m = json.loads(mpath.read_text())
    m["num_rows"] = 4
    mpath.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="offsets"):
        FeatureStore(tmp_path / "st")
    mpath.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        FeatureStore(tmp_path / "st")


def test_exception_inside_the_writer_leaves_nothing(tmp_path):
    rows = _rows()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureStoreWriter(tmp_path / "st", F_DIM, shard_rows=1) as w:
            w.add(rows[:3], [1, 0, 1], [0, 0, 1])  # shards already on disk in the tmp dir
            assert _leftovers(tmp_path)  # writing happens beside the target
            raise RuntimeError("boom")
    assert not (tmp_path / "st").exists()
    assert _leftovers(tmp_path) == []
    # a bad add inside the block: ValueError propagates, nothing left
    with pytest.raises(ValueError, match="feature dim"):
        with FeatureStoreWriter(tmp_path / "st", F_DIM) as w:
            w.add([np.zeros((2, F_DIM + 1), np.float32)], [1], [0])
    assert not (tmp_path / "st").exists() and _leftovers(tmp_path) == []
    # closing an empty writer fails and cleans up
    with pytest.raises(ValueError, match="at least one row"):
        with FeatureStoreWriter(tmp_path / "st", F_DIM):
            pass
    assert not (tmp_path / "st").exists() and _leftovers(tmp_path) == []


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from swiftjax.data.store import FeatureStoreWriter
w = FeatureStoreWriter(sys.argv[1], 6, shard_rows=1)
w.add([np.ones((3, 6), np.float32)] * 3, [1, 0, 1], [0, 0, 1])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_outright_is_cleaned_by_the_next_writer(tmp_path):
    import os
    import subprocess
    import sys

    target = tmp_path / "st"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _leftovers(tmp_path)
    assert len(left) == 1 and not target.exists()  # SIGKILL: no chance to clean up
    assert any((tmp_path / left[0]).glob("shard_*.npy"))
    # a live writer's directory and a fresh one without an owner (a writer between creating
    # it and writing its owner) are not touched; an old owner-less one is removed
    live = tmp_path / "st.tmp-live"
    live.mkdir()
    (live / ".owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    unknown = tmp_path / "st.tmp-unknown"
    unknown.mkdir()
    ownerless = tmp_path / "st.tmp-ownerless"
    (ownerless / "junk").mkdir(parents=True)
    os.utime(ownerless, (0, 0))
    rows = _rows()
    _write(target, rows)
    assert _leftovers(tmp_path) == ["st.tmp-live", "st.tmp-unknown"]
    assert len(FeatureStore(target)) == len(rows)
    assert not (target / ".owner").exists()  # the installed store carries no owner file


_KILLED_INSTALL = """
import os, shutil, signal, sys
import numpy as np
from swiftjax.data import store
where = sys.argv[2]
rename, rmtree = os.rename, shutil.rmtree
def kill_at(kind, path):
    if where == kind and (".tmp-" if kind == "rename_in" else ".old-") in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = lambda a, b: (kill_at("rename_in", a), rename(a, b))[1]
shutil.rmtree = lambda p, **kw: (kill_at("remove_old", p), rmtree(p, **kw))[1]
with store.FeatureStoreWriter(sys.argv[1], 6, overwrite=True) as w:
    w.add([np.ones((2, 6), np.float32)] * 3, [1, 0, 1], [0, 0, 1])
"""


@pytest.mark.parametrize("where", ["rename_in", "remove_old"])
def test_killed_replacement_keeps_a_readable_store_and_the_next_writer_cleans_up(tmp_path, where):
    import subprocess
    import sys

    target = tmp_path / "st"
    rows = _rows()
    _write(target, rows)  # the old store: 5 rows
    proc = subprocess.run([sys.executable, "-c", _KILLED_INSTALL, str(target), where], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _leftovers(tmp_path)
    if where == "rename_in":  # old store renamed aside, new one not yet in: readers get the old one
        assert not target.exists() and [n.split("-")[0] for n in left] == ["st.old", "st.tmp"]
        st = FeatureStore(target)
        assert len(st) == len(rows) and st.path.name.startswith("st.old-")
        np.testing.assert_array_equal(st.row(2), from_bf16_bits(to_bf16_bits(rows[2])))
    else:  # new store in place, old one not yet removed
        assert [n.split("-")[0] for n in left] == ["st.old"]
        assert len(FeatureStore(target)) == 3
    _write(target, rows[:4], overwrite=True)  # the next writer
    assert _leftovers(tmp_path) == []
    assert len(FeatureStore(target)) == 4


def test_reader_prefers_the_target_over_an_old_store(tmp_path):
    rows = _rows()
    _write(tmp_path / "st", rows)
    _write(tmp_path / "other", rows[:2])
    (tmp_path / "other").rename(tmp_path / "st.old-x")  # a leftover beside a store in place
    assert len(FeatureStore(tmp_path / "st")) == len(rows)
    (tmp_path / "st.old-x" / MANIFEST).unlink()  # an incomplete old store is never read
    (tmp_path / "st").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="expected a directory"):
        FeatureStore(tmp_path / "st")


def test_existing_path_needs_overwrite(tmp_path):
    rows = _rows()
    _write(tmp_path / "st", rows)
    with pytest.raises(ValueError, match="already exists"):
        FeatureStoreWriter(tmp_path / "st", F_DIM)
    _write(tmp_path / "st", rows[:2], overwrite=True)
    assert len(FeatureStore(tmp_path / "st")) == 2
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("call, match", [
    (lambda w: w.add([np.zeros((0, F_DIM), np.float32)], [1], [0]), "empty row"),
    (lambda w: w.add([np.full((2, F_DIM), np.nan, np.float32)], [1], [0]), "finite"),
    (lambda w: w.add([np.full((2, F_DIM), 3.4e38, np.float32)], [1], [0]), "overflow"),
    (lambda w: w.add([np.zeros((2, F_DIM), np.float32)], [1, 0], [0]), "labels"),
    (lambda w: w.add([np.zeros((2, F_DIM), np.float32)], [2.0], [0]), r"\[0, 1\]"),
    (lambda w: w.add([np.zeros((2, F_DIM), np.float32)], [1], [0.5]), "group_ids"),
    (lambda w: w.add([np.zeros((2, F_DIM), np.int32)], [1], [0]), "floating"),
    (lambda w: w.add(np.zeros((1, 2, F_DIM), np.float32), [1], [0]), "mask"),
    (lambda w: w.add([np.zeros((2, F_DIM), np.float32)], [1], [0], mask=np.ones((1, 2))), "mask"),
    (lambda w: w.add(np.zeros((2, F_DIM), np.float32), [1], [0]), r"\[B, T, F\]"),
])
def test_bad_adds_raise(tmp_path, call, match):
    w = FeatureStoreWriter(tmp_path / "st", F_DIM)
    try:
        with pytest.raises(ValueError, match=match):
            call(w)
    finally:
        w.abort()
    assert _leftovers(tmp_path) == []


def test_bad_constructor_and_batch_args(tmp_path):
    with pytest.raises(ValueError, match="feature_dim"):
        FeatureStoreWriter(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="JSON"):
        FeatureStoreWriter(tmp_path / "x", F_DIM, {"f": object()})
    assert _leftovers(tmp_path) == []
    _write(tmp_path / "st", _rows())
    st = FeatureStore(tmp_path / "st")
    with pytest.raises(ValueError, match="index"):
        st.batch([0, 5])
    with pytest.raises(ValueError, match="pad_to"):
        st.batch([2], pad_to=3)
    with pytest.raises(ValueError, match="indices"):
        st.batch([])
    for bad in ([F_DIM], [-1], [], [[0]]):
        with pytest.raises(ValueError, match="columns: expected"):
            st.batch([0], columns=np.array(bad, int))


_KILLED_RESUMABLE = """
import os, signal, sys
import numpy as np
from swiftjax.data.store import FeatureStoreWriter
rows = [np.full((i % 3 + 1, 6), i, np.float32) for i in range(7)]
w = FeatureStoreWriter(sys.argv[1], 6, {"mode": "hidden"}, shard_rows=2, meta={"key": 1}, resume=True)
w.add(rows[:3], np.ones(3), np.arange(3), extras={"index": np.arange(3)})
w.checkpoint()
w.add(rows[3:5], np.zeros(2), np.arange(3, 5), extras={"index": np.arange(3, 5)})  # 1 shard flushed, 1 row buffered
os.kill(os.getpid(), signal.SIGKILL)
"""


def _resumable(path, meta=None, **kw):
    return FeatureStoreWriter(path, F_DIM, {"mode": "hidden"}, shard_rows=2, meta=meta or {"key": 1},
                              resume=True, **kw)


def test_resumable_writer_continues_after_its_last_checkpoint(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "st"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RESUMABLE, str(target)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = tmp_path / "st.partial"
    assert partial.is_dir() and not target.exists()
    assert len(list(partial.glob("shard_*.npy"))) == 3  # 2 checkpointed + 1 flushed after it
    rows = [np.full((i % 3 + 1, F_DIM), i, np.float32) for i in range(7)]
    # other metadata (another store's content): the partial rows are not reused
    with _resumable(target, meta={"key": 2}) as w:
        assert w.rows_done == 0
        w.add(rows, np.ones(7), np.arange(7), extras={"index": np.arange(7)})
    assert FeatureStore(target).meta == {"key": 2} and not partial.exists()
    proc = subprocess.run([sys.executable, "-c", _KILLED_RESUMABLE, str(target) + "2"], capture_output=True)
    assert proc.returncode == -9
    with _resumable(tmp_path / "st2") as w:
        assert w.rows_done == 3  # the unlisted shard written after the checkpoint is gone
        assert sorted(f.name for f in (tmp_path / "st2.partial").glob("shard_*.npy")) == ["shard_00000.npy",
                                                                                         "shard_00001.npy"]
        w.add(rows[3:], np.zeros(4), np.arange(3, 7), extras={"index": np.arange(3, 7)})
    st = FeatureStore(tmp_path / "st2")
    assert len(st) == 7 and st.meta == {"key": 1}
    for i in range(7):
        np.testing.assert_array_equal(st.row(i), rows[i])
    np.testing.assert_array_equal(st.labels, [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(st.group_ids, np.arange(7))
    np.testing.assert_array_equal(st.extras["index"], np.arange(7))
    assert st.extras["index"].dtype == np.arange(7).dtype
    assert not (tmp_path / "st2.partial").exists() and not (st.path / "progress.json").exists()


def test_resumable_writer_rollback_exception_and_live_owner(tmp_path):
    import os

    rows = _rows(lengths=(2, 3, 1, 4, 2, 5))
    target = tmp_path / "st"
    with pytest.raises(RuntimeError, match="boom"):
        with _resumable(target) as w:
            w.add(rows[:2], [1, 0], [0, 0])
            w.checkpoint()
            w.add(rows[2:4], [1, 0], [1, 1])
            w.checkpoint()
            raise RuntimeError("boom")  # an exception keeps the checkpointed rows
    assert not target.exists() and (tmp_path / "st.partial").is_dir()
    w = _resumable(target)
    assert w.rows_done == 4
    assert w.rollback(3) == 2 and w.rows_done == 2  # back to the checkpoint at or before row 3
    w.abort()
    w = _resumable(target)
    assert w.rows_done == 2  # the rollback was recorded
    # a live writer owns the partial directory: a second one is refused
    (tmp_path / "st.partial" / ".owner").write_text(f"{os.uname().nodename} {os.getppid()}\n")
    with pytest.raises(ValueError, match="being written by process"):
        _resumable(target)
    (tmp_path / "st.partial" / ".owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    w.add(rows[2:], [1, 0, 1, 1], [1, 1, 2, 2])
    w.close()
    st = FeatureStore(target)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(st.row(i), from_bf16_bits(to_bf16_bits(r)))
    np.testing.assert_array_equal(st.labels, [1, 0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="resume=True"):
        FeatureStoreWriter(tmp_path / "other", F_DIM).checkpoint()


def test_narrowed_store_needs_the_disk_space_first(tmp_path, monkeypatch):
    import collections

    import swiftjax._io as io_mod

    _write(tmp_path / "st", _rows())
    st = FeatureStore(tmp_path / "st")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: usage(0, 0, st.num_tokens * 2 * 2 - 1))
    with pytest.raises(ValueError, match="narrowed store small: expected 0.00 GB free"):
        narrow_store(st, tmp_path / "small", np.array([0, 1]))
    assert not (tmp_path / "small").exists() and _leftovers(tmp_path) == []
