"""`swift study`: many SWIFT heads from one train forward and one test forward, on a tiny chat model."""
import dataclasses
import json

import numpy as np
import pytest
import yaml
from hf_tiny import save_tiny_chat_model, write_gsm8k_toy

from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.data.store import FeatureStore
from swiftjax.methods.swift import features as F
from swiftjax.methods.swift import pipeline, study
from swiftjax.methods.swift.head_io import load_head


def test_store_plan_shares_one_raw_store_between_hidden_specs():
    specs = [F.FeatureSpec(layers=(3, 1)), F.FeatureSpec(layers=(1,), apply_norm=True),
             F.FeatureSpec(mode="token_logprobs", k=2), F.FeatureSpec(mode="topk", k=3),
             F.FeatureSpec(mode="token_logprobs", k=2)]
    stores, sources = study.store_plan(specs, num_layers=4)
    assert stores == [F.FeatureSpec(layers=(1, 3)), F.FeatureSpec(mode="token_logprobs", k=2),
                      F.FeatureSpec(mode="topk", k=3)]
    assert sources == [study.Source(0, (1, 3), False), study.Source(0, (1,), True), study.Source(1),
                       study.Source(2), study.Source(1)]
    stores, _ = study.store_plan([F.FeatureSpec(layers=(0, 1, 2)), F.FeatureSpec(layers=(3, 4))], num_layers=4)
    assert stores == [F.FeatureSpec(layers="all")]
    with pytest.raises(ValueError, match=r"FeatureSpec.layers: expected indices in \[0, 4\]"):
        study.store_plan([F.FeatureSpec(layers=(5,))], num_layers=4)


def _config(tmp, model, variants, *extra):
    data = write_gsm8k_toy(tmp / "gsm8k.jsonl")
    f = tmp / "study.yaml"
    f.write_text(yaml.safe_dump({"variants": variants}))
    return parse_typed(study.SwiftStudyConfig, [
        str(f), f"model={model}", "task.name=gsm8k", f"task.test_path={data}", "task.n_test=2", "task.n_train=4",
        f"out={tmp / 'out'}", f"cache={tmp / 'cache'}", "n=4", "rollouts_per_group=4", "sampling.max_new_tokens=10",
        "sampling.batch_size=8", "sampling.temperature=1.0", "swift.max_epochs=2", "swift.groups_per_batch=1",
        "extract_batch=8", "progress=false", *extra], "test")


VARIANTS = [{"name": "all", "features": {"layers": "all"}},
            {"name": "ends_norm", "features": {"layers": [2, 0], "apply_norm": True}},
            {"name": "one", "features": {"layers": [1]}},
            {"name": "tok", "features": {"mode": "token_logprobs", "k": 2}}]


def test_study_trains_every_head_and_scores_them_in_one_forward(tmp_path):
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    cfg = _config(tmp_path, model, VARIANTS, "train_batch_size=5")
    logs = []
    res = study.run_study(cfg, log=logs.append)
    # without a progress bar each head's validation losses go to the log, one line per epoch
    assert sum("validation at step" in line for line in logs) >= len(VARIANTS) * 2
    # the train split decodes 5 rows at a time (its own key), the test split keeps sampling.batch_size
    for split, bs in (("train", 5), ("test", 8)):
        key = json.loads(next((tmp_path / "cache").glob(f"candidates_{split}_*.jsonl.key.json")).read_text())
        assert key["sampling"]["batch_size"] == bs
    saved = json.loads((tmp_path / "out" / "study.json").read_text())
    assert saved["verdict"] == res["verdict"] and "majority vote" in res["verdict"]
    assert (tmp_path / "out" / "study.md").read_text().startswith("| score / rule |")
    # every head x rule against majority vote, paired over the same test problems, recomputed here
    _, arr_te = cands.group(cands.read_candidates(next((tmp_path / "cache").glob("candidates_test_*.jsonl"))))
    maj = np.array([_majority_correct(a, c) for a, c in zip(arr_te["answers"], arr_te["correct"])])
    assert set(res["vs_majority"]) == {f"{v}/{r}" for v in [x["name"] for x in VARIANTS]
                                       for r in ("best", "weighted", "filter_vote", "borda")}
    sc = np.load(next((tmp_path / "out").glob("test_scores_*.npy")))[0].reshape(arr_te["correct"].shape)
    d = arr_te["correct"][np.arange(len(maj)), sc.argmax(1)] - maj
    assert res["vs_majority"]["all/best"] == pytest.approx([d.mean() * 100, d.std(ddof=1) / np.sqrt(len(d)) * 100])
    assert res["verdict"].startswith("all/best Best-of-4") and "paired difference" in res["verdict"]
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| vs majority vote @4, paired (points) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| all | "))
    best4 = res["curves"]["all/best"]["4"]
    assert row.split(" | ")[-3] == f"{best4[0]:.1f} ± {best4[1]:.1f}" and "| Borda @4 |" in md
    names = [v["name"] for v in VARIANTS]
    assert set(res["curves"]) >= {f"{n}/{rule}" for n in names for rule in ("best", "weighted", "borda")}
    assert set(res["curves"]) >= {"mean_logprob/best", "majority", "oracle", "random"}
    # one forward wrote two stores: the raw states of every layer and the token log-probs
    stores = sorted((tmp_path / "cache").glob("features_*"))
    assert len(stores) == 2
    assert sorted(FeatureStore(s).spec["mode"] for s in stores) == ["hidden", "token_logprobs"]
    # every head's test scores (one forward for all) equal that head's own fused scoring
    test_rows = cands.read_candidates(next((tmp_path / "cache").glob("candidates_test_*.jsonl")))
    te_ids, arr = cands.group(test_rows)
    ordered = pipeline.in_group_order(test_rows, te_ids)
    bb = pipeline.backbone_of(cfg)
    got = np.load(next((tmp_path / "out").glob("test_scores_*.npy")))
    assert got.shape == (len(names), len(ordered))
    for i, name in enumerate(names):
        params, spec, meta = load_head(tmp_path / "out" / "heads" / name)
        assert spec == cfg.variants[i].features and len(meta["info"]["train_scores"]) == 16
        ref = pipeline.score_rows(bb, params, spec, ordered, max_len=256, batch_size=8, progress=False)
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5)
    # a rerun reuses the stores, heads and scores and gives the same table
    stamp = {n: (tmp_path / "out" / "heads" / n / "head.json").stat().st_mtime_ns for n in names}
    logs.clear()
    again = study.run_study(cfg, log=logs.append)
    assert again["curves"] == res["curves"]
    assert {n: (tmp_path / "out" / "heads" / n / "head.json").stat().st_mtime_ns for n in names} == stamp
    assert sum("reusing" in line for line in logs) == 2 + len(names) + 1
    # a head's own learning rate retrains that head only, and is reported
    logs.clear()
    own = [dict(v, lr=0.02) if v["name"] == "one" else dict(v, standardize=True) if v["name"] == "tok" else v
           for v in VARIANTS]
    res_lr = study.run_study(_config(tmp_path, model, own, "train_batch_size=5"), log=logs.append)
    assert [line.split(":")[0] for line in logs if "training a head" in line] == ["one", "tok"]
    assert res_lr["variants"]["one"]["lr"] == 0.02 and res_lr["variants"]["all"]["lr"] == cfg.swift.lr
    assert res_lr["variants"]["tok"]["standardize"] and not res_lr["variants"]["one"]["standardize"]
    assert "| one | " in (tmp_path / "out" / "study.md").read_text()
    with pytest.raises(ValueError, match="lr: expected a positive learning rate"):
        _config(tmp_path, model, [dict(VARIANTS[0], lr=0.0)])
    # a changed recipe retrains the heads (their key covers it), not the stores
    logs.clear()
    study.run_study(_config(tmp_path, model, VARIANTS[:1], "train_batch_size=5", "swift.lr=0.01"), log=logs.append)
    assert any("all: training a head" in line for line in logs)
    assert sum("one forward wrote" in line for line in logs) == 0


def test_layer_subset_heads_read_a_narrowed_store_and_train_the_same_heads(tmp_path, monkeypatch):
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    variants = [{"name": "all", "features": {"layers": "all"}},
                {"name": "one", "features": {"layers": [1]}},
                {"name": "one_norm", "features": {"layers": [1], "apply_norm": True}}]
    cfg = _config(tmp_path, model, variants)
    logs = []
    res = study.run_study(cfg, log=logs.append)
    narrowed = [line for line in logs if line.startswith("narrowed ")]
    assert len(narrowed) == 1 and "to layers [1]" in narrowed[0] and "narrow_seconds" in res["stages"]
    stores = {FeatureStore(s).feature_dim: FeatureStore(s) for s in (tmp_path / "cache").glob("features_*")}
    assert len(stores) == 2
    big, small = stores[max(stores)], stores[min(stores)]
    d = small.feature_dim  # one state of the tiny model; the big store holds all of them, in order
    np.testing.assert_array_equal(small.row_bits(3), big.row_bits(3)[:, d:2 * d])
    assert small.meta["key"]["narrowed_from"] == big.meta["key"]
    # the same study reading the big store only trains the same heads
    monkeypatch.setattr(study, "NARROW_AT_MOST", 0.0)
    wide = study.run_study(dataclasses.replace(cfg, out=str(tmp_path / "out_wide")), log=logs.append)
    for name in ("one", "one_norm"):
        a, _, _ = load_head(tmp_path / "out" / "heads" / name)
        b, _, _ = load_head(tmp_path / "out_wide" / "heads" / name)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert wide["curves"] == res["curves"]
    # a rerun whose heads are all trained neither reads nor writes a narrowed store
    monkeypatch.setattr(study, "NARROW_AT_MOST", 0.5)
    logs.clear()
    study.run_study(cfg, log=logs.append)
    assert not any("(layers [1])" in line or line.startswith("narrowed ") for line in logs)
    # a head to train again (a new out) reuses the narrowed store
    logs.clear()
    study.run_study(dataclasses.replace(cfg, out=str(tmp_path / "out_again")), log=logs.append)
    assert any(line.startswith("reusing") and "(layers [1])" in line for line in logs)
    assert not any(line.startswith("narrowed ") for line in logs)


def _majority_correct(answers, correct) -> float:
    """Majority vote written out: the most frequent non-empty answer, ties to the first reached."""
    seen = [a for a in answers if a is not None]
    if not seen:
        return 0.0
    top = max(seen.count(a) for a in seen)
    j = next(t for t, a in enumerate(answers) if a is not None and seen.count(a) == top)
    return float(correct[j])


def test_study_config_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="variants: expected distinct names"):
        _config(tmp_path, "world", VARIANTS[:1] * 2)
    with pytest.raises(ValueError, match="name: expected letters.*directory name"):
        _config(tmp_path, "world", [{"name": "../x", "features": {"layers": "all"}}])
    with pytest.raises(ValueError, match=r"variants\[0\].features.bogus: unknown key"):
        _config(tmp_path, "world", [{"name": "x", "features": {"bogus": 1}}])


def test_study_with_shared_prompts_and_a_killed_test_scoring(tmp_path, monkeypatch):
    """share_prompts: stores and test scores from prompts computed once match the full forward;
    test scoring killed after one chunk continues from that chunk."""
    model, _ = save_tiny_chat_model("qwen2", tmp_path / "model")
    cfg = _config(tmp_path, model, VARIANTS, "share_prompts=true")
    monkeypatch.setattr(study, "TEST_CHUNK_ROWS", 4)  # one problem (n = 4) per chunk: 2 chunks
    real = F.fused_scores_many
    calls = []

    def dies(*a, **kw):
        calls.append(kw)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(F, "fused_scores_many", dies)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg, log=lambda *_: None)
    assert len(list((tmp_path / "out").glob("test_scores_*.parts/rows_*.npy"))) == 1
    calls.clear()
    monkeypatch.setattr(F, "fused_scores_many", lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1])
    res = study.run_study(cfg, log=lambda *_: None)
    assert len(calls) == 1 and all(kw["share_prompts"] for kw in calls)  # only the second chunk
    assert not list((tmp_path / "out").glob("test_scores_*.parts"))
    # the shared stores hold the full forward's features (bf16, rounding)
    shared = sorted((tmp_path / "cache").glob("features_*"))
    assert all(FeatureStore(s).meta["key"]["shared_prompts"] for s in shared)
    bb = pipeline.backbone_of(cfg)
    train_rows = cands.read_candidates(next((tmp_path / "cache").glob("candidates_train_*.jsonl")))
    tr_ids, _ = cands.group(train_rows)
    ordered = pipeline.in_group_order(train_rows, tr_ids)
    ids, attn, resp = pipeline.encode_rows(bb, ordered, 256)
    specs = [FeatureStore(s).spec for s in shared]
    full = F.extract_many(bb.model, ids, attn, resp, [F.FeatureSpec.from_dict(s) for s in specs])
    for s, x in zip(shared, full):
        st = FeatureStore(s)
        for r in range(len(ordered)):
            np.testing.assert_allclose(st.row(r), np.asarray(x[r])[resp[r] > 0], rtol=2.0 ** -8, atol=1e-5)
    # every head's shared-prompt test scores equal its full-forward fused scores
    test_rows = cands.read_candidates(next((tmp_path / "cache").glob("candidates_test_*.jsonl")))
    te_ids, _ = cands.group(test_rows)
    te = pipeline.in_group_order(test_rows, te_ids)
    got = np.load(next((tmp_path / "out").glob("test_scores_*.npy")))
    for i, v in enumerate(VARIANTS):
        params, spec, _ = load_head(tmp_path / "out" / "heads" / v["name"])
        ref = pipeline.score_rows(bb, params, spec, te, max_len=256, batch_size=8, progress=False)
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5)
    assert res["stages"]["test_scoring_seconds"] > 0
