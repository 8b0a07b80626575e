"""`swift run` end to end on tiny HF chat models and a GSM8K-format task; resumable sampling."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import save_tiny_chat_model, write_gsm8k_toy

from swiftjax import selection as S
from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.methods.swift import pipeline
from swiftjax.methods.swift.head_io import load_head

REPO = Path(__file__).resolve().parents[3]


def _config(tmp, model, *extra):
    data = write_gsm8k_toy(tmp / "gsm8k.jsonl")
    return parse_typed(pipeline.SwiftRunConfig, [
        f"model={model}", "task.name=gsm8k", f"task.test_path={data}", "task.n_test=2", "task.n_train=4",
        f"out={tmp / 'out'}", "n=4", "rollouts_per_group=4", "sampling.max_new_tokens=10", "sampling.batch_size=8",
        "sampling.temperature=1.0", "swift.max_epochs=2", "swift.groups_per_batch=1", "extract_batch=8",
        "progress=false", *extra], "test")


@pytest.mark.parametrize("arch", ["qwen2", "llama3"])
def test_swift_run_on_a_tiny_chat_model(arch, tmp_path):
    model, _ = save_tiny_chat_model(arch, tmp_path / "model")
    cfg = _config(tmp_path, model)
    res = pipeline.run(cfg, report=False)
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(out["bon"]) == {"random", "majority", "swift", "oracle"}
    assert set(out["bon"]["swift"]) == {"1", "2", "3", "4"}
    assert out["model"]["digest"] == res["model"]["digest"] and out["task"]["name"] == "gsm8k"
    assert out["n_test_problems"] == 2 and out["n_train_problems"] == 4
    # fused scores of the test candidates == the head over stored (teacher-forced) features
    params, spec, meta = load_head(tmp_path / "out" / "head")
    assert meta["info"]["model"]["digest"] == out["model"]["digest"]
    rows = sorted(cands.read_candidates(next((tmp_path / "out").glob("candidates_test_*.jsonl"))),
                  key=lambda r: (r["prompt_id"], r["index"]))
    bb = pipeline.backbone_of(cfg)
    from swiftjax import features as feats
    from swiftjax import swift

    ids, attn, resp = pipeline.encode_rows(bb, rows, 256)
    ref = np.asarray(swift.score(params, feats.extract(bb.model, ids, attn, resp, spec), resp))
    got = pipeline.score_rows(bb, params, spec, rows, max_len=256, batch_size=8, progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the sampler's stored confidence: its mean log-prob is the teacher-forced one (T = 1)
    from swiftjax.logprobs import response_token_logprobs

    lp, m = (np.asarray(x, np.float64) for x in response_token_logprobs(bb.model, ids, attn, resp))
    np.testing.assert_allclose([r["scores"]["mean_logprob"] for r in rows], (lp * m).sum(1) / m.sum(1), atol=1e-4)
    assert set(out["selection"]["curves"]) >= {"swift/best", "mean_logprob/weighted", "tail/borda", "majority"}
    assert {c["every"] for c in out["pruning"]["configs"]} == {8, 16}
    # the same pruning replayed on the sampler's per-token confidences (DeepConf online)
    assert [(c["every"], c["fraction"]) for c in out["pruning"]["confidence"]] == \
        [(c["every"], c["fraction"]) for c in out["pruning"]["configs"]]
    for r in rows:  # each token's confidence; their lowest group is the stored score
        assert len(r["token_confidence"]) == len(r["token_ids"])
        assert r["scores"]["lowest_group"] == pytest.approx(
            S.prefix_lowest_group(r["token_confidence"], cfg.sampling.confidence_window)[-1], abs=1e-3)
    # every response ends at an end-of-turn id or at max_new_tokens
    for r in rows:
        assert r["token_ids"][-1] in bb.eos_ids or len(r["token_ids"]) == 10
    # a second run reuses everything and gives the same table
    again = pipeline.run(cfg, report=False)
    assert again["bon"] == res["bon"]


def _sample_cmd(tmp, model, out, *extra):
    data = write_gsm8k_toy(tmp / "gsm8k.jsonl")
    return [sys.executable, "-m", "swiftjax.cli", "sample", f"model={model}", "task.name=gsm8k",
            f"task.test_path={data}", "task.n_test=6", "task.n_train=null", f"out={out}", "n=4", "rollouts_per_group=4",
            "split=test",
            "sampling.max_new_tokens=12", "sampling.batch_size=2", "progress=false", *extra]


@pytest.mark.parametrize("refill", [None, 3])
def test_sampling_killed_then_rerun_gives_the_identical_set(tmp_path, refill):
    """Lock-step: byte-identical. Continuous batching: the same samples (the rows in flight at
    the kill ran beside other rows after it: scores equal up to float rounding)."""
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    extra = [] if refill is None else [f"sampling.refill_every={refill}"]
    ref = subprocess.run(_sample_cmd(tmp_path, model, tmp_path / "ref", *extra), env=env, capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr
    # the same run, killed (SIGKILL) once some shards are on disk, then run again
    slow = {**env, "SWIFTJAX_SHARD_DELAY": "0.5"}
    proc = subprocess.Popen(_sample_cmd(tmp_path, model, tmp_path / "killed", *extra), env=slow,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((tmp_path / "killed").glob("*.shards/*.jsonl"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = list((tmp_path / "killed").glob("*.shards/*.jsonl"))
    assert 3 <= len(shards) < 12, "the kill should land mid-run"
    again = subprocess.run(_sample_cmd(tmp_path, model, tmp_path / "killed", *extra), env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    a = next((tmp_path / "ref").glob("candidates_test_*.jsonl"))
    b = next((tmp_path / "killed").glob("candidates_test_*.jsonl"))
    assert a.name == b.name
    assert not list((tmp_path / "killed").glob("*.shards"))
    if refill is None:
        assert a.read_bytes() == b.read_bytes()
        return
    ra, rb = cands.read_candidates(a), cands.read_candidates(b)
    assert [(r["prompt_id"], r["index"], r["token_ids"], r["correct"]) for r in ra] == \
        [(r["prompt_id"], r["index"], r["token_ids"], r["correct"]) for r in rb]
    assert len({tuple(r["token_ids"]) for r in ra}) > len(ra) // 2   # rows drew different samples
    for x, y in zip(ra, rb):
        assert x["scores"] == pytest.approx(y["scores"], rel=1e-4, abs=1e-4)


def test_config_is_validated_whole_before_any_work(tmp_path):
    def err(*args):
        with pytest.raises(ValueError) as e:
            parse_typed(pipeline.SwiftRunConfig, list(args), "swift run")
        return str(e.value)

    assert "sampling.temperature: expected a finite number, got nan" in err("sampling.temperature=nan")
    assert "sampling.max_new_tokens: expected an int, got 3.0" in err("sampling.max_new_tokens=3.0")
    assert "max_len: expected an int or null, got 'abc'" in err("max_len=abc")
    assert "progress: expected true/false, got 'maybe'" in err("progress=maybe")
    assert "features.layers: expected" in err("features.layers=3")
    assert "swift.los: unknown key" in err("swift.los=dpo")
    assert "train_batch_size: expected a positive int or null, got 0" in err("train_batch_size=0")
    assert "swift: loss: expected one of" in err("swift.loss=nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: 4\nsampling: {temperature: 1.0\n")
    assert f"config {bad}: line" in err(str(bad))
    bad.write_text("n: 4\nsamplin: {}\n")
    assert f"{bad}: samplin: unknown key" in err(str(bad))


def test_outputs_are_checked_before_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    cfg = parse_typed(pipeline.SwiftRunConfig, [f"out={f}"], "swift run")
    with pytest.raises(ValueError, match="out: expected a directory, .* is an existing file"):
        pipeline.run(cfg, report=False)


def test_bon_command_reports_every_rule_over_random_subsets(tmp_path, capsys):
    from swiftjax import cli, selection

    rng = np.random.default_rng(0)
    rows = []
    for p in range(12):
        for j in range(4):
            ok = bool(rng.random() < 0.5)
            rows.append({"prompt_id": f"p{p}", "index": j, "prompt": "q", "text": "t", "token_ids": [1],
                         "answer": "42" if ok else f"{j % 2}", "correct": ok,
                         "scores": {"s": float(rng.normal() + ok), "c": float(rng.normal())}})
    cands.write_candidates(tmp_path / "c.jsonl", rows)
    assert cli.main(["swift", "bon", str(tmp_path / "c.jsonl"), "--ks", "1,4", "--draws", "8",
                     "--fit", str(tmp_path / "c.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["selection"]) == {"random", "oracle", "majority"} | {
        f"{s}/{r}" for s in ("s", "c") for r in selection.SCORED_RULES}
    _, arr = cands.group(rows)
    best = arr["correct"][np.arange(12), arr["scores"]["s"].argmax(1)].mean() * 100
    assert out["selection"]["s/best"]["4"][0] == pytest.approx(best)          # k = N: the whole set
    assert out["first_k"]["s"]["4"] == pytest.approx(best)
    assert set(out["temperatures"]) == {"s", "c"}


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    from swiftjax import cli

    def err(*argv):
        assert cli.main(list(argv)) == 2
        out = capsys.readouterr().err.strip()
        assert "\n" not in out and "Traceback" not in out, out
        return out

    assert "--ks: expected a comma-separated list" in err("swift", "bon", "x.jsonl", "--ks")
    assert "is a directory" in err("swift", "bon", str(tmp_path))
    head = tmp_path / "nohead"
    assert "expected a trained head directory" in err("swift", "score", f"head={head}", f"candidates={tmp_path}")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: [1\n")
    assert "line 2" in err("swift", "run", str(bad))
    assert "expected a subcommand" in err("swift")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            assert "cannot write" in err("sample", f"out={ro / 'x'}", "model=world")
    finally:
        ro.chmod(0o700)


def test_feature_store_key_covers_model_and_prompts(tmp_path):
    from swiftjax.backbone import load_backbone

    a, _ = save_tiny_chat_model("qwen2", tmp_path / "a", seed=0)
    b, _ = save_tiny_chat_model("qwen2", tmp_path / "b", seed=1)
    rows = [{"prompt_id": f"p{i // 4}", "index": i % 4, "prompt": f"q{i // 4}", "text": "", "token_ids": [5, 6, 7],
             "answer": None, "correct": bool(i % 2), "gold": "1"} for i in range(8)]
    spec = pipeline.SwiftRunConfig().features
    kw = dict(max_len=64, batch_size=8, progress=False, log=lambda *_: None)
    sa, _, _ = pipeline.feature_store_for(load_backbone(a), rows, spec, tmp_path / "c", **kw)
    sb, _, _ = pipeline.feature_store_for(load_backbone(b), rows, spec, tmp_path / "c", **kw)
    other = [{**r, "prompt": r["prompt"] + "!"} for r in rows]
    sc, _, _ = pipeline.feature_store_for(load_backbone(a), other, spec, tmp_path / "c", **kw)
    assert len({sa.path, sb.path, sc.path}) == 3  # another model or other prompts: another store
    assert not np.array_equal(sa.row(0), sb.row(0))
    again, _, _ = pipeline.feature_store_for(load_backbone(a), rows, spec, tmp_path / "c", **kw)
    assert again.path == sa.path
