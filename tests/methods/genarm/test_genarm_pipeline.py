"""GenARM experiment pipeline on a tiny random world model: pairs, ARM training (full and LoRA),
weak ARM from the first layers, guided-decoding tables."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swiftjax
from swiftjax.data import candidates as cands
from swiftjax.world import tokenizer as wtok
from swiftjax.world import problems as world
from swiftjax.methods.genarm import pipeline as gr
from swiftjax.world import model as wexp
from swiftjax.models.registry import create_model

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64,
        "rope_theta": 10000.0, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("genarm")
    tok = wtok.build_tokenizer()
    mcfg = wexp.model_config({"model": TINY}, tok.get_vocab_size())
    model = create_model(mcfg, seed=0)
    base_dir = wexp.export(model, mcfg, tok, root / "base")
    rows = []
    for p in world.make_split("train", 6):
        first = p.solution.split("\n")[0]
        texts = [p.solution,                                   # correct
                 first + "\n" + p.solution,                    # correct, longer (a repeated step)
                 p.solution.rsplit("Answer:", 1)[0] + f"Answer: {p.answer + 1}",  # wrong answer
                 "Step 1: I do not know"]                      # no answer
        for j, t in enumerate(texts):
            ans = world.extract_answer(t)
            rows.append({"prompt_id": p.id, "index": j, "prompt": p.question, "text": t, "token_ids": None,
                         "answer": None if ans is None else str(ans), "correct": world.grade(t, p.answer),
                         "gold": str(p.answer)})
    assert [r["correct"] for r in rows[:4]] == [True, True, False, False]
    cands.write_candidates(root / "cands.jsonl", rows)
    return root, base_dir, rows, tok


def _ids(tok, r):
    return wtok.encode(tok, r["text"]) + [wtok.END_ID]


def test_pairs_and_encoding(tiny_world):
    _, _, rows, tok = tiny_world
    by_id = {}
    for r in rows:
        by_id.setdefault(r["prompt"], []).append(r)
    pairs = gr.correctness_pairs(rows, tok, max_per_prompt=3, seed=0)
    assert len(pairs) == 6 * 3
    for prompt, w, l in pairs:
        good = [_ids(tok, r) for r in by_id[prompt] if r["correct"]]
        bad = [_ids(tok, r) for r in by_id[prompt] if not r["correct"]]
        assert w in good and l in bad
    assert len({(p, tuple(w), tuple(l)) for p, w, l in pairs}) == len(pairs)  # distinct per problem
    brev = gr.brevity_pairs(rows, tok, max_per_prompt=4, min_gap=3, seed=0)
    assert len(brev) == 6
    for prompt, w, l in brev:
        assert len(l) - len(w) >= 3 and w == _ids(tok, by_id[prompt][0]) and l == _ids(tok, by_id[prompt][1])
    assert gr.brevity_pairs(rows, tok, 4, min_gap=1000, seed=0) == []
    anyp = gr.brevity_pairs(rows, tok, max_per_prompt=2, min_gap=3, seed=0, among="all")
    expected = 0
    for group in by_id.values():
        lens = [len(_ids(tok, r)) for r in group]
        expected += min(2, sum(b - a >= 3 for a in lens for b in lens))
    assert len(anyp) == expected
    for prompt, w, l in anyp:
        every = [_ids(tok, r) for r in by_id[prompt]]
        assert w in every and l in every and len(l) - len(w) >= 3
    with pytest.raises(ValueError, match="brevity_from"):
        gr.brevity_pairs(rows, tok, 2, 3, 0, among="some")

    arrays, dropped, groups = gr.encode_pairs(tok, pairs, max_len=128)
    assert dropped == 0 and arrays["ids_w"].shape == (len(pairs), 128)
    order = list(dict.fromkeys(q for q, _, _ in pairs))
    np.testing.assert_array_equal(groups, [order.index(q) for q, _, _ in pairs])
    for i, (prompt, w, l) in enumerate(pairs):
        p = wtok.encode(tok, wtok.format_prompt(prompt))
        for tag, resp in (("w", w), ("l", l)):
            ids, mask, rm = (arrays[f"{k}_{tag}"][i] for k in ("ids", "mask", "resp"))
            assert list(ids[: len(p) + len(resp)]) == p + resp and (ids[len(p) + len(resp):] == 0).all()
            assert mask.sum() == len(p) + len(resp) and rm.sum() == len(resp) and rm[len(p)] == 1
    fits = [len(wtok.encode(tok, wtok.format_prompt(q))) + max(len(w), len(l)) <= 40 for q, w, l in pairs]
    short, dropped, _ = gr.encode_pairs(tok, pairs, max_len=40)
    assert dropped == fits.count(False) and short["ids_w"].shape == (fits.count(True), 40)
    none, dropped, _ = gr.encode_pairs(tok, pairs, max_len=10)
    assert dropped == len(pairs) and none["ids_w"].shape == (0, 10)
    tr, va = gr.split_pairs(arrays, groups, 0.34, seed=0)  # 2 of 6 problems held out
    assert len(va["ids_w"]) == 2 * 3 and len(tr["ids_w"]) == 4 * 3
    together = np.concatenate([tr["ids_w"], va["ids_w"]])
    assert sorted(map(bytes, together)) == sorted(map(bytes, arrays["ids_w"]))
    prompt_of = lambda row: bytes(row[: list(row).index(wtok.ASSISTANT_ID) + 1])  # noqa: E731
    assert not {prompt_of(r) for r in tr["ids_w"]} & {prompt_of(r) for r in va["ids_w"]}  # by problem
    assert gr.split_pairs(arrays, groups, 0.0, seed=0)[1] is None
    with pytest.raises(ValueError, match="val_frac"):
        gr.split_pairs(arrays, groups, 1.0, seed=0)


def test_truncated_model_is_the_first_layers(tiny_world):
    _, base_dir, _, _ = tiny_world
    base, mcfg, _ = wexp.load_world_model(base_dir)
    small, scfg = gr.truncated_model(base, mcfg, 1)
    assert scfg.num_layers == 1
    ids = jnp.asarray(np.random.RandomState(0).randint(7, 100, size=(2, 9)))
    hs = base(ids, output_hidden_states=True).hidden_states
    ref = base.unembed(base.final_norm(hs[1]))  # residual stream after block 1, then norm + head
    np.testing.assert_allclose(np.asarray(small(ids).logits), np.asarray(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weak.layers"):
        gr.truncated_model(base, mcfg, 3)


def test_lora_arm_training_changes_only_targets(tiny_world):
    _, base_dir, rows, tok = tiny_world
    arrays, _, groups = gr.encode_pairs(tok, gr.correctness_pairs(rows, tok, 2, 0), 128)
    tr, va = gr.split_pairs(arrays, groups, 0.34, seed=0)
    base, _, _ = wexp.load_world_model(base_dir)
    model, _, _ = wexp.load_world_model(base_dir)
    tcfg = dict(gr.DEFAULTS["train"], lora=True, lora_targets=["q_proj", "v_proj"], max_steps=2,
                batch_size=4, lora_lr=1e-2, warmup_steps=0)
    model, info = gr.train_arm(model, tr, va, tcfg, seed=0, desc="lora", progress=False)
    assert info["steps"] == 2 and info["lora"]
    assert 0.0 <= info["eval"]["accuracy"] <= 1.0  # evaluated after the donated train steps
    before = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(before) == set(after)  # merged: a plain checkpoint layout
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k.endswith(("q_proj.weight", "v_proj.weight"))), k


def test_pipeline_end_to_end(tiny_world):
    root, base_dir, _, _ = tiny_world
    out = root / "run"
    over = [f"out={out}", f"base={base_dir}", f"candidates.path={root / 'cands.jsonl'}",
            "pairs.val_frac=0.0", "pairs.brevity_from=correct", "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=1",
            "weak.sft_steps=2", "weak.sft_examples=16", "weak.sft_batch_size=8",
            "guide.n_problems=3", "guide.n=2", "guide.max_new_tokens=6", "guide.batch_size=6",
            "guide.alphas=[0.0,1.0]", "guide.weights=[[1.0,1.0]]", "guide.weak_alphas=[1.0]"]
    assert gr.train_main(over) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["pairs"]["correct"]["total"] == 6 * 4 and summary["pairs"]["brevity"]["total"] == 6
    base, mcfg = swiftjax.load_model(base_dir)
    for name in ("correct", "brevity", "weak"):
        arm, acfg = swiftjax.load_model(out / f"arm_{name}")
        # 3 steps, or fewer when 2 epochs of batches of 4 run out first (6 brevity pairs: 2)
        assert summary["arms"][name]["steps"] == (2 if name == "brevity" else 3)
        assert acfg.num_layers == (1 if name == "weak" else 2) and acfg.vocab_size == mcfg.vocab_size
        w0 = np.asarray(base.model.embed_tokens.weight[...])
        assert not np.array_equal(np.asarray(arm.model.embed_tokens.weight[...]), w0)  # trained
    assert gr.guide_main(over) == 0
    res = json.loads((out / "results.json").read_text())
    plain = res["plain"]
    a0 = res["correct"][0]
    assert a0["alpha"] == 0.0 and "control_pass@1" not in a0
    # alpha = 0 with the same keys reproduces plain sampling exactly
    assert (a0["pass@1"], a0["mean_length"]) == (plain["pass@1"], plain["mean_length"])
    assert "control_pass@1" in res["correct"][1]
    assert len(res["multi_objective"]) == 1 and len(res["weak_to_strong"]) == 1
    assert res["weak_to_strong"][0]["arm_layers"] == 1
    for r in [plain, *res["correct"], *res["multi_objective"], *res["weak_to_strong"]]:
        assert 0 <= r["pass@1"] <= 100 and 1 <= r["mean_length"] <= 6
    md = (out / "results.md").read_text()
    assert "Correctness ARM" in md and "Weak-to-strong" in md and "brevity" in md


def test_bad_config(tiny_world):
    with pytest.raises(ValueError, match="arms"):
        gr.train_main(["arms=[helpful]"])
    with pytest.raises(ValueError, match="weak.init"):
        gr.train_main(["weak.init=random"])
    with pytest.raises(ValueError, match="unknown key"):
        gr.train_main(["train.learning_rate=1"])
    root, base_dir, rows, _ = tiny_world
    test_rows = [dict(r, prompt=p.question, prompt_id=p.id) for r, p in zip(rows, world.make_split("test", 4))]
    cands.write_candidates(root / "test_cands.jsonl", test_rows)
    with pytest.raises(ValueError, match="TRAINING"):
        gr.train_main([f"out={root / 'bad'}", f"base={base_dir}", f"candidates.path={root / 'test_cands.jsonl'}"])
