"""The preference drivers end to end on tiny random HF chat models (Qwen2 with ChatML, Llama-3
with its header template) and a GSM8K-format toy task: (SFT ->) IRFT / RFT, and DPO vs MRPO with
a second reference model on its own tokenisation. Plus the drivers' pure helpers and configs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import save_tiny_chat_model, write_gsm8k_toy

from swiftjax.backbone import load_backbone
from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.methods.preference import common, irft, mrpo, pipeline
from swiftjax.methods.preference import pairs as prefs
from swiftjax.tasks import TaskConfig, make_task

REPO = Path(__file__).resolve().parents[3]
ARCHS = ("qwen2", "llama3")
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {a: save_tiny_chat_model(a, root / a, seed=i)[0] for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_gsm8k_toy(tmp_path_factory.mktemp("data") / "gsm8k.jsonl")


def _task_args(toy, n_test=2):
    return ["task.name=gsm8k", f"task.test_path={toy}", f"task.n_test={n_test}", "task.n_train=null"]


def _small(out, model, toy):
    """Tiny budgets. One prompt width, one teacher-forced width (208) and one eval batch size for
    pairs, gold solutions and frozen log-probs, and no sampled pass@1, so few programs compile."""
    return [f"model={model}", *_task_args(toy), f"out={out}", "progress=false", "generation.max_new_tokens=8",
            "generation.prompt_len=176", "generation.batch_size=4", "eval.n_samples=0", "eval.batch_size=4",
            "eval.each_stage=false", "eval.max_len=208"]


def _finite(*xs):
    return all(isinstance(x, float) and math.isfinite(x) for x in xs)


def _synthetic_candidates(path, toy):
    """Per training problem: its reference solution (graded correct) and two corrupted ones."""
    task = make_task(TaskConfig(name="gsm8k", test_path=str(toy), n_test=2, n_train=None))
    rows = []
    for p in task.problems("train"):
        for j, t in enumerate([p.solution, p.solution.replace(f"#### {p.gold}", "#### 99"), "no idea\n#### 1"]):
            ans, ok = task.grade(t, p.gold)
            rows.append({"prompt_id": p.id, "index": j, "prompt": task.user_message(p), "text": t,
                         "token_ids": None, "answer": ans, "correct": ok, "gold": p.gold})
    assert sum(r["correct"] for r in rows) == 4 and len(rows) == 12
    cands.write_candidates(path, rows)
    return path


# ============================================================================= DPO / MRPO


def _mrpo_run(arch, models, toy, tmp_path, references, methods):
    cand = _synthetic_candidates(tmp_path / "cands.jsonl", toy)
    cfg = parse_typed(mrpo.MRPORunConfig, _small(tmp_path / "mrpo", models[arch], toy) + [
        f"candidates.path={cand}", "pairs.max_per_prompt=2", "pairs.held_out=0.25", "pairs.counts=[4]",
        "pairs.max_len=208", "train.steps=2", "train.batch_size=2", "train.optimizer.lr=1e-3",
        f"references={references}", f"methods={methods}"], "test")
    res = mrpo.run_mrpo(cfg, log=lambda *a: None)
    out = tmp_path / "mrpo"
    for name in ("results.json", "results.md", "metrics.jsonl", "pairs.npz"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    # the outputs say which models and task they came from
    assert saved["policy"]["digest"] == load_backbone(str(models[arch])).digest and saved["task"]["name"] == "gsm8k"
    pairs, extra = prefs.load_pairs(out / "pairs.npz")
    assert np.all(np.isfinite(pairs.ref_chosen)) and np.all(np.isfinite(pairs.ref_rejected))
    assert len(pairs) == 8 and extra["held_out"].sum() == 2  # 4 prompts x 2 pairs, 1 prompt held out
    held = set(extra["record_prompt_id"][extra["held_out"]].tolist())
    assert held and not held & set(extra["record_prompt_id"][~extra["held_out"]].tolist())
    (run,) = res["runs"]
    assert _finite(run["train_loss_first"], run["train_loss_last"], run["loss"], run["acc_primary"], run["greedy"])
    return run, saved, pairs, out, cfg


# Each end-to-end run takes one architecture as the policy (both chat templates are exercised:
# llama3 here and in IRFT, qwen2 in MRPO, whose second reference is the other architecture).
@pytest.mark.parametrize("arch", ["llama3"])
def test_dpo_end_to_end(arch, models, toy, tmp_path):
    """DPO against the initial policy, two steps."""
    run, saved, pairs, _, _ = _mrpo_run(arch, models, toy, tmp_path, "[]", "[{name: dpo, loss: dpo}]")
    assert [r["name"] for r in saved["references"]] == ["init"] and pairs.ref_names == ("init",)
    # step 0: the policy is its own reference, so DPO's loss is exactly log 2 ...
    assert abs(run["train_loss_first"] - LOG2) < 1e-5
    # ... one step later the parameters have moved (the second step's loss and the held-out loss differ)
    assert abs(run["train_loss_last"] - LOG2) > 1e-7 and abs(run["loss"] - LOG2) > 1e-7


@pytest.mark.parametrize("arch", ["qwen2"])
def test_mrpo_k2_end_to_end(arch, models, toy, tmp_path):
    """MRPO with K = 2 references: the policy and a model of the other architecture, which scores
    the pair texts with its own tokenizer and chat template. Two steps."""
    other = models[ARCHS[1 - ARCHS.index(arch)]]
    run, saved, pairs, out, cfg = _mrpo_run(arch, models, toy, tmp_path, f"[{{name: other, model: {other}}}]",
                                       "[{name: mrpo_k2, loss: mrpo, refs: [init, other], eps: 0.1}]")
    assert [r["name"] for r in saved["references"]] == ["init", "other"] and pairs.ref_names == ("init", "other")
    assert saved["references"][1]["digest"] == load_backbone(str(other)).digest
    assert not np.allclose(pairs.ref_chosen[:, 0], pairs.ref_chosen[:, 1])
    # its virtual reference is not the policy: the loss does not start at log 2; the parameters move
    assert abs(run["train_loss_first"] - LOG2) > 1e-6 and run["train_loss_last"] != run["train_loss_first"]
    assert abs(run["loss"] - LOG2) > 1e-7 and run["K"] == 2
    # MRPO with one reference is DPO: on these pairs, with the other model's log-probs as a policy
    pw, pl = pairs.ref_chosen[:, 1], pairs.ref_rejected[:, 1]
    dpo = mrpo.pref_metrics(pw, pl, pairs.select_refs([0]), mrpo.MethodSection(name="d"), 0.1, None)
    k1 = mrpo.pref_metrics(pw, pl, pairs.select_refs([0]), mrpo.MethodSection(name="k1", loss="mrpo"), 0.1, None)
    assert abs(dpo["loss"] - LOG2) > 1e-3 and abs(dpo["loss"] - k1["loss"]) < 1e-6
    assert dpo["acc_own"] == k1["acc_own"]
    assert "| mrpo_k2 | 2 | 4 |" in (out / "results.md").read_text()
    # a second build reuses the stored pairs and every reference's log-probs (nothing is scored again)
    said = []
    again, held, _ = mrpo.build_pair_data(cfg, out, load_backbone(str(models[arch])), make_task(cfg.task),
                                          log=said.append)
    assert not [m for m in said if m.startswith("reference")] and again.ref_names == pairs.ref_names
    np.testing.assert_array_equal(again.ref_chosen, pairs.ref_chosen)
    np.testing.assert_array_equal(again.chosen_ids, pairs.chosen_ids)


def test_mrpo_samples_candidates_with_candidate_set(models, toy, tmp_path):
    """With candidates.path null the policy's own samples (swiftjax.sample.candidate_set) feed the
    pairs; a random model gets nothing right, so there is no pair and the run says so."""
    cfg = parse_typed(mrpo.MRPORunConfig, _small(tmp_path / "m", models["qwen2"], toy) + ["candidates.n=2"], "test")
    with pytest.raises(ValueError, match="no prompt has both a correct and an incorrect candidate"):
        mrpo.run_mrpo(cfg, log=lambda *a: None)
    (path,) = (tmp_path / "m").glob("candidates_train_*.jsonl")
    rows = cands.read_candidates(path)
    assert len(rows) == 4 * 2 and all(r["token_ids"] for r in rows)


# ============================================================================= SFT -> IRFT / RFT


@pytest.mark.parametrize("arch", ["llama3"])
def test_irft_one_stage_end_to_end(arch, models, toy, tmp_path):
    cfg = parse_typed(irft.IRFTRunConfig, _small(tmp_path / "irft", models[arch], toy) + [
        "max_len=208", "irft.stages=1", "irft.epochs=1", "irft.batch_size=2", "irft.beta=0.5",
        "irft.optimizer.lr=1e-3", "rft.enabled=false"], "test")
    res = irft.run_irft(cfg, log=lambda *a: None)
    out = tmp_path / "irft"
    for name in ("results.json", "results.md", "metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    bb = load_backbone(str(models[arch]))
    assert saved["model"]["digest"] == saved["policy"]["digest"] == bb.digest and saved["sft"] is None
    assert saved["task"]["name"] == "gsm8k" and saved["n_demos"] == 4
    assert [e["method"] for e in saved["evals"]] == ["initial", "IRFT"]
    for e in saved["evals"]:
        assert 0.0 <= e["greedy"] <= 100.0 and _finite(e["gold_logp"])
    (s,) = res["irft_stages"]
    assert s["pairs"] + s["skipped_identical"] + s["skipped_long"] == s["prompts"] == 4
    assert s["steps"] == 2
    # the policy equals the frozen copy pi_t at the stage's first step: the loss is log 2 ...
    assert abs(s["loss_first"] - LOG2) < 1e-5
    # ... and the parameters move: the second step's loss differs, and so does the gold log-prob
    assert _finite(s["loss_last"]) and abs(s["loss_last"] - s["loss_first"]) > 1e-7
    assert saved["evals"][1]["gold_logp"] != saved["evals"][0]["gold_logp"]
    assert "| IRFT | 1 |" in (out / "results.md").read_text()


def test_sft_stage_trains_on_the_task_demonstrations(models, toy, tmp_path):
    """sft.steps > 0: the backbone is fine-tuned on the training problems' solutions and saved as
    a model directory (with its tokenizer and template), reused while nothing changed."""
    cfg = parse_typed(irft.IRFTRunConfig, _small(tmp_path / "o", models["llama3"], toy) + [
        "sft.steps=2", "sft.batch_size=2", "sft.optimizer.lr=1e-2"], "test")
    task = make_task(cfg.task)
    base, policy, info = common.ensure_sft_policy(common.backbone_config(cfg), task, cfg.sft, tmp_path / "o",
                                                  seed=0, progress=False, log=lambda *a: None)
    model_dir = tmp_path / "o" / "sft" / "model"
    assert policy.path == model_dir and policy.digest != base.digest
    assert policy.template == base.template and policy.eos_ids == base.eos_ids and policy.pad_id == base.pad_id
    assert info["demonstrations"] == 4 and info["steps"] == 2
    assert _finite(info["loss_first"], info["loss_last"]) and info["loss_last"] < info["loss_first"]
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    _, again, info2 = common.ensure_sft_policy(common.backbone_config(cfg), task, cfg.sft, tmp_path / "o", seed=0,
                                               progress=False, log=lambda *a: None)
    assert again.digest == policy.digest and info2 == json.loads(json.dumps(info))
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not retrained


def test_rft_round_end_to_end(models, toy, tmp_path):
    cfg = parse_typed(irft.IRFTRunConfig, _small(tmp_path / "rft", models["qwen2"], toy) + [
        "max_len=208", "irft.enabled=false", "rft.rounds=1", "rft.rm.steps=3", "rft.rm.batch_size=4",
        "rft.pg.steps=2", "rft.pg.batch_size=4", "rft.pg.temperature=0.0"], "test")
    res = irft.run_irft(cfg, log=lambda *a: None)
    (r,) = res["rft_rounds"]
    assert r["pairs"] == 4
    assert abs(r["rm_loss_first"] - LOG2) < 1e-5  # the zero-initialised head scores both sides alike
    assert _finite(r["rm_loss_last"], r["pg_loss_last"], r["reward_first"], r["reward_last"], r["kl_last"])
    assert r["pg_steps"] == 2 and r["rm_loss_last"] != r["rm_loss_first"]
    assert [e["method"] for e in res["evals"]] == ["initial", "RFT"]


def test_stage_pairs_keep_what_the_negatives_option_says(models, toy, monkeypatch):
    """Per problem i the fake 'generation' is: i % 3 == 0 the demonstration itself, 1 another
    response graded correct, 2 another graded incorrect. Identical ones are always skipped;
    correct ones only with negatives='incorrect'."""
    bb = load_backbone(str(models["qwen2"]))
    task = make_task(TaskConfig(name="gsm8k", test_path=str(toy), n_test=6, n_train=None))
    problems = task.problems("test")
    msgs = [task.user_message(p) for p in problems]
    demo = [bb.response_ids(m, p.solution) for m, p in zip(msgs, problems)]
    tail = bb.encode("Answer: 12345") + [bb.eos_ids[0]]
    other = [demo[i][:i] + tail for i in range(6)]  # shares its first i tokens with the demonstration
    assert all(o[i] != d[i] for i, (o, d) in enumerate(zip(other, demo)))

    def fake_sample(backbone, model, task_, probs, *, n, gen, temperature, seed):
        return [{"token_ids": demo[i] if i % 3 == 0 else other[i], "correct": i % 3 != 2} for i, _ in enumerate(probs)]

    monkeypatch.setattr(irft, "sample_rows", fake_sample)
    cfg = irft.IRFTRunConfig()
    for negatives, want in (("all", [1, 2, 4, 5]), ("incorrect", [2, 5])):
        pairs, info, kept = irft.stage_pairs(bb, None, task, problems, cfg, temperature=0.0, seed=0, max_len=256,
                                             negatives=negatives)
        assert kept.tolist() == want and len(pairs) == len(want)
        assert info["skipped_identical"] == 2 and info["pairs"] == len(want)
        assert info["skipped_correct"] == (2 if negatives == "incorrect" else 0)
        assert abs(info["gen_correct"] - 100.0 * 4 / 6) < 1e-9
        for r, i in enumerate(want):  # each problem's own demonstration against its own generation
            assert pairs.chosen_ids[r][pairs.chosen_response_mask[r].astype(bool)].tolist() == demo[i]
            assert pairs.rejected_ids[r][pairs.rejected_response_mask[r].astype(bool)].tolist() == other[i]
    cut, _, kept_cut = irft.stage_pairs(bb, None, task, problems, cfg, temperature=0.0, seed=0, max_len=256,
                                        contrast="first_divergence")
    full, _, _ = irft.stage_pairs(bb, None, task, problems, cfg, temperature=0.0, seed=0, max_len=256)
    np.testing.assert_array_equal(cut.chosen_ids, full.chosen_ids)
    for r, i in enumerate(kept_cut):  # i shared tokens + the one where they part
        assert cut.chosen_response_mask[r].sum() == cut.rejected_response_mask[r].sum() == i + 1


# ============================================================================= configs


def test_configs_parse_and_only_override():
    ic = parse_typed(irft.IRFTRunConfig, [str(REPO / "configs" / "irft.yaml"), "seed=3"], "test")
    mc = parse_typed(mrpo.MRPORunConfig, [str(REPO / "configs" / "mrpo.yaml"), "train.seeds=[0,1]"], "test")
    assert ic.seed == 3 and ic.model == "world" and ic.task.name == "world"
    assert ic.irft.optimizer.name == "rmsprop" and ic.irft.optimizer.lr == 3e-6  # the measured recipe
    assert mc.train.seeds == (0, 1) and mc.train.optimizer.lr == 1e-5 and mc.model == "world"
    assert [m.name for m in mc.methods][:3] == ["dpo", "mrpo_k2", "mrpo_k3"]
    # the dataclass defaults are the recipe: the files only restate or override them
    assert irft.IRFTRunConfig().irft.optimizer == ic.irft.optimizer
    assert mrpo.MRPORunConfig().train.optimizer == mc.train.optimizer
    with pytest.raises(ValueError, match="betta: unknown key"):
        parse_typed(irft.IRFTRunConfig, ["irft.betta=1"], "test")
    with pytest.raises(ValueError, match="negatives: expected one of"):
        parse_typed(irft.IRFTRunConfig, ["irft.negatives=wrong"], "test")
    with pytest.raises(ValueError, match="unknown references"):
        parse_typed(mrpo.MRPORunConfig, ["methods=[{name: x, loss: mrpo, refs: [init, nope]}]"], "test")
    with pytest.raises(ValueError, match="must start with"):
        parse_typed(mrpo.MRPORunConfig, ["methods=[{name: x, loss: mrpo, refs: [a, init]}]"], "test")
    with pytest.raises(ValueError, match="exactly one"):
        parse_typed(mrpo.MRPORunConfig, ["references=[{name: a, model: m}]",
                                         "methods=[{name: x, loss: dpo, refs: [init, a]}]"], "test")
    with pytest.raises(ValueError, match="other than 'init'"):
        parse_typed(mrpo.MRPORunConfig, ["references=[{name: init, model: m}]"], "test")


def test_output_dir_checked_before_any_work(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="out: expected a directory"):
        pipeline.main(["irft", f"out={f}", "model=/nonexistent"])
    with pytest.raises(ValueError, match="out: expected a directory"):
        pipeline.main(["mrpo", f"out={f}", "model=/nonexistent"])


def test_no_world_imports_in_the_preference_folder():
    for py in (REPO / "swiftjax" / "methods" / "preference").glob("*.py"):
        src = py.read_text()
        assert "swiftjax.world" not in src and "from swiftjax import world" not in src, py.name


# ============================================================================= helpers


def _pairs_with_refs(rc, rr):
    n = rc.shape[0]
    ids = np.ones((n, 4), np.int32)
    m = np.array([[0, 1, 1, 0]] * n, np.int32)
    p = prefs.PreferencePairs.build((ids, ids, m), (ids, ids, m))
    return p.with_refs([f"r{k}" for k in range(rc.shape[1])], rc, rr)


def test_pref_metrics_against_numpy():
    rng = np.random.default_rng(0)
    N = 50
    rc, rr = rng.normal(-20, 3, (N, 3)).astype(np.float32), rng.normal(-20, 3, (N, 3)).astype(np.float32)
    pairs = _pairs_with_refs(rc, rr)
    pw, pl = rng.normal(-20, 3, N).astype(np.float32), rng.normal(-20, 3, N).astype(np.float32)
    rw, rl = rc.T.astype(np.float64), rr.T.astype(np.float64)
    beta = 0.5
    m = mrpo.pref_metrics(pw, pl, pairs.select_refs([0]), mrpo.MethodSection(name="d"), beta, None)
    want = 100 * np.mean((pw - rw[0]) > (pl - rl[0]))
    assert abs(m["acc_primary"] - want) < 1e-9 and abs(m["acc_own"] - want) < 1e-4
    assert abs(m["acc_logp"] - 100 * np.mean(pw > pl)) < 1e-9
    z = beta * ((pw - rw[0]) - (pl - rl[0]))
    assert abs(m["loss"] - np.mean(np.log1p(np.exp(-z)))) < 1e-5
    # uniform-weight MRPO without CTRO: harmonic virtual reference, from scratch
    uni = mrpo.MethodSection(name="u", loss="mrpo", refs=("init", "a", "b"), weighting="uniform", eps=None)
    m = mrpo.pref_metrics(pw, pl, pairs, uni, beta, None)

    def virt(r):  # -log sum_k (1/K) exp(-lp_k), shifted for stability
        c = (-r).max(0)
        return -(np.log(np.mean(np.exp(-r - c), axis=0)) + c)

    z = beta * ((pw - virt(rw)) - (pl - virt(rl)))
    assert abs(m["acc_own"] - 100 * np.mean(z > 0)) < 1e-4
    assert abs(m["loss"] - np.mean(np.log1p(np.exp(-z)))) < 1e-5


def test_validation_weights_use_training_pairs():
    rng = np.random.default_rng(1)
    rc, rr = rng.normal(-10, 2, (40, 3)).astype(np.float32), rng.normal(-12, 2, (40, 3)).astype(np.float32)
    pairs = _pairs_with_refs(rc, rr).select_refs([0, 2])
    m = mrpo.MethodSection(name="v", loss="mrpo", refs=("init", "a"), weighting="validation")
    w = mrpo.weights_for(m, pairs)
    s = np.abs(rc[:, [0, 2]].astype(np.float64) - rr[:, [0, 2]]).mean(0)
    np.testing.assert_allclose(w, s / s.sum(), rtol=1e-5)
    assert mrpo.weights_for(mrpo.MethodSection(name="d"), pairs.select_refs([0])) is None


def test_chunks_and_last_index():
    ch = irft._chunks(10, 3, seed=0)
    assert [len(c) for c in ch] == [3, 3, 3]
    flat = np.concatenate(ch)
    assert len(set(flat.tolist())) == 9 and flat.max() < 10
    with pytest.raises(ValueError, match="at least one"):
        irft._chunks(2, 3, seed=0)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert np.asarray(irft._last_index(mask)).tolist() == [1, 3, 0]


def test_verdict_counts():
    rows = [{"method": "dpo", "kind": "dpo", "pairs": 10, "acc_primary": 60.0, "pass@1": 30.0},
            {"method": "m2", "kind": "mrpo", "pairs": 10, "acc_primary": 90.0, "pass@1": 30.5},
            {"method": "m3", "kind": "mrpo", "pairs": 10, "acc_primary": 20.0, "pass@1": 29.0}]
    text = "\n".join(mrpo.verdict(rows, n_held=400, n_eval=400))
    assert "acc_primary: MRPO better in 1/2 comparisons, DPO better in 1/2, within noise in 0/2" in text
    assert "pass@1: MRPO better in 0/2 comparisons, DPO better in 0/2, within noise in 2/2" in text


def test_optimizer_section_schedules():
    opt = irft.IRFTSection().optimizer.make(20)
    assert opt.name == "rmsprop" and opt.lr == 3e-6 and opt.total_steps == 20 and opt.warmup_steps == 2
    assert irft.IRFTSection().optimizer.make(1).warmup_steps == 0  # a cosine needs a decay step
