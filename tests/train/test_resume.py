"""Checkpoints and resume: a SIGKILLed run resumes to the same params as an uninterrupted one;
corrupted (checksum mismatch), unsealed and partial checkpoints are skipped with a warning,
never loaded, and never moved by a read."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _demo_run as demo_run
from swiftjax.train.ckpt import CORRUPT_DIR, MANIFEST, Checkpointer
from swiftjax.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _step_dirs(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def _truncate_tree(d: Path) -> int:
    n = 0
    for p in d.rglob("*"):
        if p.is_file() and p.name != "commit_success.txt":
            with open(p, "r+b") as fh:
                fh.truncate(p.stat().st_size // 2)
            n += 1
    return n


def _tree_close(a, b, tol):
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=tol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return demo_run.run(str(tmp_path_factory.mktemp("ref") / "ckpt"), steps=STEPS)


def test_resume_after_sigkill_and_corruption_equals_uninterrupted_run(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "metrics.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(REPO / "tests" / "train" / "_demo_run.py"), "--ckpt-dir", str(ckpt),
           "--steps", str(STEPS), "--ckpt-every", "5", "--sleep", "0.15", "--log", str(log),
           "--out", str(tmp_path / "never.json")]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(_step_dirs(ckpt)) < 3:
            assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoints appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.json").exists()
    steps = _step_dirs(ckpt)
    assert steps and steps[-1] < STEPS
    latest, previous = steps[-1], steps[-2]

    # corrupt the newest checkpoint and leave an unfinished save beside it
    assert _truncate_tree(ckpt / str(latest) / "state") > 0
    tmp = ckpt / f"{latest + 5}.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\x00" * 10)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = demo_run.run(str(ckpt), steps=STEPS, log=str(log))
    msgs = [str(w.message) for w in caught]
    assert any(f"step {latest}" in m and "unreadable" in m for m in msgs), msgs
    assert any("partial" in m and tmp.name in m for m in msgs), msgs
    assert any(p.name.startswith(f"{latest}-") for p in (ckpt / CORRUPT_DIR).iterdir())

    assert resumed.steps == uninterrupted.steps == STEPS
    _tree_close(resumed.state.params, uninterrupted.state.params, 1e-6)
    _tree_close(resumed.best_params, uninterrupted.best_params, 1e-6)
    assert resumed.best_step == uninterrupted.best_step
    assert [h["step"] for h in resumed.history] == [h["step"] for h in uninterrupted.history]

    # the killed run's log followed by the resumed run's: every step logged, training restarted
    # from the previous good checkpoint (steps after it logged twice)
    train_steps = [r["step"] for r in read_jsonl(log) if r["split"] == "train"]
    assert set(train_steps) == set(range(1, STEPS + 1))
    assert train_steps.count(previous + 1) == 2


def test_resume_from_final_checkpoint_runs_no_more_steps(tmp_path):
    a = demo_run.run(str(tmp_path / "c"), steps=10, ckpt_every=5)
    b = demo_run.run(str(tmp_path / "c"), steps=10, ckpt_every=5)
    assert a.steps == b.steps == 10
    _tree_close(a.state.params, b.state.params, 0.0)


# ------------------------------------------------------------- Checkpointer unit
def _state(v: float):
    return {"w": jnp.full((3, 2), v), "step": jnp.int32(int(v)), "nested": {"b": jnp.arange(4.0) * v}}


def test_resume_checkpointer_skips_deleted_file_and_partial_dir(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=5)
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {"tag": f"s{s}"})
    ck.wait_until_finished()
    assert ck.all_steps() == [1, 2, 3]
    # delete the data files of step 3 and leave a partial step 4
    victims = [p for p in (tmp_path / "ck" / "3" / "state").rglob("*") if p.is_file()
               and p.name not in ("commit_success.txt",)]
    for p in victims:
        p.unlink()
    (tmp_path / "ck" / "4.orbax-checkpoint-tmp-42" / "state").mkdir(parents=True)
    with pytest.warns(RuntimeWarning) as rec:
        r = ck.restore(_state(0.0))
    msgs = [str(w.message) for w in rec]
    assert any("step 3" in m and "unreadable" in m for m in msgs)
    assert any("partial" in m for m in msgs)
    assert r.step == 2 and r.meta == {"tag": "s2"}
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.full((3, 2), 2.0))
    np.testing.assert_array_equal(np.asarray(r.state["nested"]["b"]), np.arange(4.0) * 2)
    # reading moved nothing; the writer sets the bad step aside when it saves that step again
    assert ck.all_steps() == [1, 2, 3] and not (tmp_path / "ck" / CORRUPT_DIR).exists()
    assert ck.save(3, _state(3.5), {"tag": "again"})
    ck.wait_until_finished()
    assert [p.name.split("-")[0] for p in (tmp_path / "ck" / CORRUPT_DIR).iterdir()] == ["3"]
    r = ck.restore(_state(0.0))
    assert r.step == 3 and r.meta == {"tag": "again"}
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.full((3, 2), 3.5))
    ck.close()


def _tree_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _flip_a_state_data_file(step_dir: Path) -> Path:
    """Flip one byte of a per-process ocdbt data file (orbax itself restores such a step)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process_" in str(p)]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("damage", ["meta_value", "state_bytes", "no_manifest"])
def test_resume_checkpointer_skips_size_preserving_corruption(tmp_path, damage):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=5)
    for s in (1, 2, 3):
        ck.save(s, _state(float(s)), {"tag": f"s{s}"})
    ck.wait_until_finished()
    step3 = tmp_path / "ck" / "3"
    assert (step3 / MANIFEST).is_file()
    if damage == "meta_value":  # still valid JSON of the same size: orbax alone loads it
        meta = step3 / "meta" / "metadata"
        text = meta.read_text()
        assert '"s3"' in text
        meta.write_text(text.replace('"s3"', '"s9"'))
    elif damage == "state_bytes":
        size = _flip_a_state_data_file(step3).stat().st_size
        assert size > 0
    else:  # killed after orbax finished the step, before it was sealed
        (step3 / MANIFEST).unlink()
    before = _tree_files(tmp_path / "ck")
    with pytest.warns(RuntimeWarning, match=r"step 3 .*skipped") as rec:
        r = ck.restore(_state(0.0))
    assert r.step == 2 and r.meta == {"tag": "s2"}
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.full((3, 2), 2.0))
    want = "manifest" if damage == "no_manifest" else "checksum mismatch"
    assert any(want in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert _tree_files(tmp_path / "ck") == before  # reading moved / deleted / wrote nothing
    with pytest.raises(ValueError, match=want):
        ck.restore(_state(0.0), step=3)
    ck.close()


def test_resume_checkpointer_sync_saves_are_sealed(tmp_path):
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(7, _state(7.0), {"tag": "s7"})
    assert (tmp_path / "ck" / "7" / MANIFEST).is_file()
    assert ck.restore(_state(0.0)).step == 7
    ck.close()


def test_resume_checkpointer_keeps_n_and_handles_empty_dir(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2)
    assert ck.restore(_state(0.0)) is None and ck.latest_step() is None
    for s in range(1, 6):
        ck.save(s, _state(float(s)))
    ck.wait_until_finished()
    assert ck.all_steps() == [4, 5]
    r = ck.restore(_state(0.0), step=4)
    assert r.step == 4 and int(r.state["step"]) == 4
    ck.close()


def test_resume_checkpointer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "a", max_to_keep=0)
    ck = Checkpointer(tmp_path / "b")
    with pytest.raises(ValueError, match="step"):
        ck.save(-1, _state(1.0))
    with pytest.raises(ValueError, match="PRNG"):
        ck.restore({"k": jax.random.key(0)})
    ck.close()
