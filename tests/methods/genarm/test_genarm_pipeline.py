"""GenARM pipeline on tiny random HF chat models (Qwen2, Llama 3) and a GSM8K-format toy task:
pairs, ARM training (full and LoRA), the weak ARM from the first layers, guided-decoding tables.
A random model solves nothing: the training problems' demonstrations
(``pairs.demonstrations``) are the correct side of the pairs."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import save_tiny_chat_model, write_gsm8k_toy

from swiftjax.config import parse_typed
from swiftjax.data import candidates as cands
from swiftjax.methods.genarm import pipeline as gr
from swiftjax.sampling import SamplingConfig
from swiftjax.tasks import TaskConfig, make_task

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny Qwen2 backbone, the toy task and hand-made candidates: per training problem its
    demonstration (correct), the same with a repeated first line (correct, longer), a wrong
    final answer and no answer."""
    root = tmp_path_factory.mktemp("genarm")
    model, _ = save_tiny_chat_model("qwen2", root / "model")
    bb = gr.backbone_of(parse_typed(gr.GenarmConfig, [f"model={model}"], "test"))
    task = make_task(TaskConfig(name="gsm8k", test_path=str(write_gsm8k_toy(root / "g.jsonl")), n_test=2,
                                n_train=4))
    rows = []
    for p in task.problems("train"):
        head, tail = p.solution.rsplit("####", 1)
        texts = [p.solution, p.solution.split("\n")[0] + "\n" + p.solution, f"{head}#### {int(p.gold) + 1}",
                 "I do not know"]
        for j, t in enumerate(texts):
            ans, ok = task.grade(t, p.gold)
            rows.append({"prompt_id": p.id, "index": j, "prompt": task.user_message(p), "text": t, "token_ids": None,
                         "answer": ans, "correct": ok, "gold": p.gold})
    assert [r["correct"] for r in rows[:4]] == [True, True, False, False]
    return root, bb, task, rows


def _ids(bb, r):
    return bb.response_ids(r["prompt"], r["text"])


def test_pairs_and_encoding(toy):
    _, bb, _, rows = toy
    by_id = {}
    for r in rows:
        by_id.setdefault(r["prompt"], []).append(r)
    pairs = gr.correctness_pairs(rows, bb, max_per_prompt=3, seed=0)
    assert len(pairs) == 4 * 3
    for prompt, w, l in pairs:
        good = [_ids(bb, r) for r in by_id[prompt] if r["correct"]]
        bad = [_ids(bb, r) for r in by_id[prompt] if not r["correct"]]
        assert w in good and l in bad and w[-1] in bb.eos_ids
    assert len({(p, tuple(w), tuple(l)) for p, w, l in pairs}) == len(pairs)  # distinct per problem
    brev = gr.brevity_pairs(rows, bb, max_per_prompt=4, min_gap=3, seed=0)
    assert len(brev) == 4
    for prompt, w, l in brev:
        assert len(l) - len(w) >= 3 and w == _ids(bb, by_id[prompt][0]) and l == _ids(bb, by_id[prompt][1])
    assert gr.brevity_pairs(rows, bb, 4, min_gap=1000, seed=0) == []
    anyp = gr.brevity_pairs(rows, bb, max_per_prompt=2, min_gap=3, seed=0, among="all")
    expected = 0
    for group in by_id.values():
        lens = [len(_ids(bb, r)) for r in group]
        expected += min(2, sum(b - a >= 3 for a in lens for b in lens))
    assert len(anyp) == expected
    with pytest.raises(ValueError, match="brevity_from"):
        gr.brevity_pairs(rows, bb, 2, 3, 0, among="some")

    arrays, dropped, groups = gr.encode_pairs(bb, pairs, max_len=None)
    width = arrays.max_len
    assert dropped == 0 and width % 16 == 0 and len(arrays) == len(pairs)
    order = list(dict.fromkeys(q for q, _, _ in pairs))
    np.testing.assert_array_equal(groups, [order.index(q) for q, _, _ in pairs])
    for i, (prompt, w, l) in enumerate(pairs):
        p = bb.prompt_ids(prompt)
        for side, resp in (("chosen", w), ("rejected", l)):
            ids, mask, rm = (np.asarray(a)[i] for a in arrays.side(side))
            assert list(ids[: len(p) + len(resp)]) == p + resp and (ids[len(p) + len(resp):] == bb.pad_id).all()
            assert mask.sum() == len(p) + len(resp) and rm.sum() == len(resp) and rm[len(p)] == 1
    need = [len(bb.prompt_ids(q)) + max(len(w), len(l)) for q, w, l in pairs]
    cut = sorted(need)[len(need) // 2]
    short, dropped, _ = gr.encode_pairs(bb, pairs, max_len=cut)
    assert dropped == sum(k > cut for k in need) and short.chosen_ids.shape == (len(pairs) - dropped, cut)
    none, dropped, _ = gr.encode_pairs(bb, pairs, max_len=10)
    assert dropped == len(pairs) and none.chosen_ids.shape == (0, 10)
    tr, va = gr.split_pairs(arrays, groups, 0.5, seed=0)  # 2 of 4 problems held out
    assert len(va) == 2 * 3 and len(tr) == 2 * 3
    together = np.concatenate([tr.chosen_ids, va.chosen_ids])
    assert sorted(map(bytes, together)) == sorted(map(bytes, np.asarray(arrays.chosen_ids)))

    def prompt_of(ids, resp):
        return bytes(ids[: int(np.argmax(resp))])

    assert not ({prompt_of(i, r) for i, r in zip(tr.chosen_ids, tr.chosen_response_mask)}
                & {prompt_of(i, r) for i, r in zip(va.chosen_ids, va.chosen_response_mask)})  # split by problem
    assert gr.split_pairs(arrays, groups, 0.0, seed=0)[1] is None
    with pytest.raises(ValueError, match="val_frac"):
        gr.split_pairs(arrays, groups, 1.0, seed=0)


def test_truncated_model_is_the_first_layers(toy):
    _, bb, _, _ = toy
    base, mcfg = bb.model, bb.config
    small, scfg = gr.truncated_model(base, mcfg, 1)
    assert scfg.num_layers == 1
    ids = jnp.asarray(np.random.RandomState(0).randint(7, 100, size=(2, 9)))

    def jitted(model, fn):  # op-by-op eager is slow on CPU
        graphdef, state = nnx.split(model)
        return jax.jit(lambda st: fn(nnx.merge(graphdef, st)))(state)

    # the residual stream after block 1, then norm + head
    ref = jitted(base, lambda m: m.unembed(m.final_norm(m(ids, output_hidden_states=True).hidden_states[1])))
    np.testing.assert_allclose(np.asarray(jitted(small, lambda m: m(ids).logits)), np.asarray(ref),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weak.layers"):
        gr.truncated_model(base, mcfg, mcfg.num_layers + 1)


def test_lora_arm_training_changes_only_targets(toy):
    _, bb, _, rows = toy
    arrays, _, groups = gr.encode_pairs(bb, gr.correctness_pairs(rows, bb, 2, 0), None)
    tr, va = gr.split_pairs(arrays, groups, 0.25, seed=0)
    tcfg = gr.ArmTrainConfig(lora=True, lora_targets=("q_proj", "v_proj"), max_steps=2, batch_size=2, lora_lr=1e-2,
                             warmup_steps=0)
    model, info = gr.train_arm(gr.copy_model(bb.model), tr, va, tcfg, seed=0, desc="lora", progress=False)
    assert info["steps"] == 2 and info["lora"]
    assert 0.0 <= info["eval"]["accuracy"] <= 1.0  # evaluated after the donated train steps
    flat = lambda m: {".".join(map(str, p)): np.asarray(v[...])  # noqa: E731
                      for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    before, after = flat(bb.model), flat(model)  # the backbone's own model is intact
    assert set(before) == set(after)  # merged: a plain checkpoint layout
    for k in before:
        changed = not np.array_equal(before[k], after[k])
        assert changed == (k.endswith(("q_proj.weight", "v_proj.weight"))), k


def _config(tmp, model, *extra):
    data = write_gsm8k_toy(tmp / "gsm8k.jsonl")
    return parse_typed(gr.GenarmConfig, [
        f"model={model}", "task.name=gsm8k", f"task.test_path={data}", "task.n_test=2", "task.n_train=4",
        f"out={tmp / 'out'}", "candidates.n=3", "candidates.sampling.max_new_tokens=8",
        "candidates.sampling.batch_size=12", "pairs.demonstrations=true", "pairs.max_len=256", "pairs.val_frac=0.0",
        "train.max_steps=2", "train.batch_size=4", "train.warmup_steps=1", "weak.sft_steps=2",
        "weak.sft_batch_size=4", "guide.n=2",
        "guide.sampling.max_new_tokens=6", "guide.sampling.batch_size=4", "guide.alphas=[0.0,1.0]",
        "guide.weights=[[1.0,1.0]]", "guide.weak_alphas=[1.0]", "progress=false", *extra], "test")


# every ARM on one architecture; the correctness ARM alone on the other (the same code paths)
ARMS = {"qwen2": ("correct", "brevity", "weak"), "llama3": ("correct",)}


@pytest.fixture(scope="module", params=sorted(ARMS))
def trained(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"genarm_{request.param}")
    model, _ = save_tiny_chat_model(request.param, tmp / "model")
    cfg = _config(tmp, model, f"arms=[{','.join(ARMS[request.param])}]")
    bb, task = gr.backbone_of(cfg), make_task(cfg.task)
    summary = gr.train(cfg, bb, task, log=lambda *a: None)
    return cfg, bb, task, summary


def test_train_saves_arms_with_their_origin(trained):
    cfg, bb, task, summary = trained
    out = Path(cfg.out)
    assert json.loads((out / "train_summary.json").read_text())["model"] == bb.describe()
    assert summary["task"]["name"] == "gsm8k" and summary["candidates"] == 4 * (3 + 1)
    # the correctness pairs: min(cap, correct x incorrect) per problem of the labelled rows
    rows = cands.read_candidates(next(out.glob("candidates_train_*.jsonl")))
    by = {}
    for r in rows + gr.demonstration_rows(bb, task, task.problems("train"), 3):
        by.setdefault(r["prompt_id"], []).append(r["correct"])
    assert summary["pairs"]["correct"]["total"] == sum(min(4, sum(c) * (len(c) - sum(c))) for c in by.values()) > 0
    w0 = np.asarray(bb.model.model.embed_tokens.weight[...])  # the backbone's own model is intact
    arms = gr.load_arms(cfg, bb)
    assert set(arms) == {n for n in cfg.arms if "skipped" not in summary["arms"][n]} and "correct" in arms
    for name, arm in arms.items():
        meta = json.loads((out / f"arm_{name}" / "arm.json").read_text())
        assert meta["base"]["digest"] == bb.digest and meta["task"]["name"] == "gsm8k"
        assert arm.config.num_layers == (1 if name == "weak" else bb.config.num_layers)
        assert arm.config.vocab_size == bb.config.vocab_size
        if name != "weak":
            assert summary["arms"][name]["steps"] == 2
            assert not np.array_equal(np.asarray(arm.model.embed_tokens.weight[...]), w0)  # trained


def test_guided_decoding_with_alpha_zero_is_plain_sampling(trained):
    cfg, bb, task, _ = trained
    arm = gr.load_arms(cfg, bb)["correct"]
    msgs = [task.user_message(p) for p in task.problems("test") for _ in range(2)]
    ids, mask = bb.encode_prompts(msgs, -(-max(len(bb.prompt_ids(m)) for m in msgs) // 16) * 16)
    scfg = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_ids=bb.eos_ids, pad_id=bb.pad_id)
    plain = gr.decode_all(bb.model, [], [], ids, mask, scfg, batch_size=4, seed=0)
    guided0 = gr.decode_all(bb.model, [arm], [0.0], ids, mask, scfg, batch_size=4, seed=0)
    np.testing.assert_array_equal(guided0, plain)  # same keys, token for token
    guided = gr.decode_all(bb.model, [arm], [4.0], ids, mask, scfg, batch_size=4, seed=0)
    assert guided.shape == plain.shape and ((guided >= 0) & (guided < bb.config.vocab_size)).all()


def test_guide_writes_tables(trained):
    cfg, bb, _, _ = trained
    res = gr.guide(cfg, log=lambda *a: None)
    out = Path(cfg.out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"]["digest"] == bb.digest and saved["task"]["name"] == "gsm8k"
    assert saved["arms"] == sorted(cfg.arms) and saved["problems"] == 2
    a0 = res["correct"][0]
    assert a0["alpha"] == 0.0 and "control_pass@1" not in a0 and "control_pass@1" in res["correct"][1]
    assert {k: a0[k] for k in res["plain"]} == res["plain"]  # alpha 0 = plain sampling
    rows = [res["plain"], *res["correct"], *res.get("multi_objective", []), *res.get("weak_to_strong", [])]
    for r in rows:
        assert 0 <= r["pass@1"] <= 100 and 1 <= r["mean_length"] <= 6 and 0 <= r["finished"] <= 100
    md = (out / "results.md").read_text()
    assert "Correctness ARM" in md and "gsm8k" in md
    if "weak" in cfg.arms:
        assert res["weak_to_strong"][0]["arm_layers"] == 1 and "Weak-to-strong" in md
        assert len(res["multi_objective"]) == 1


def test_bad_config_and_outputs(tmp_path):
    with pytest.raises(ValueError, match="arms"):
        gr.train_main(["arms=[helpful]"])
    with pytest.raises(ValueError, match="weak.init"):
        gr.train_main(["weak.init=random"])
    with pytest.raises(ValueError, match="unknown key"):
        gr.train_main(["train.learning_rate=1"])
    with pytest.raises(ValueError, match="weights: expected"):
        gr.main(["guide", "guide.weights=[[1.0,2.0,3.0]]"])
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="out: expected a directory"):
        gr.main(["train", f"out={f}"])
    with pytest.raises(ValueError, match="out: expected a directory"):
        gr.main(["guide", f"out={f}"])
    cfg = parse_typed(gr.GenarmConfig, [str(REPO / "configs" / "genarm.yaml")], "test")  # the shipped config parses
    assert cfg.model == "world" and cfg.task.n_train == 2000 and cfg.guide.sampling.prompt_len == 64


def test_arms_from_another_model_are_refused(toy, tmp_path):
    root, bb, _, _ = toy
    other, _ = save_tiny_chat_model("qwen2", tmp_path / "other", seed=1)
    cfg = parse_typed(gr.GenarmConfig, [f"model={other}", f"out={tmp_path}", "arms=[correct]"], "test")
    gr.save_arm(bb.model, bb.config, bb, gr.arm_dir(cfg, "correct"), {"base": bb.describe()})
    with pytest.raises(ValueError, match="an ARM trained from model"):
        gr.load_arms(cfg, gr.backbone_of(cfg))


def test_missing_demonstrations_fail_before_any_sampling(toy, tmp_path):
    root, bb, _, _ = toy
    data = root / "g.jsonl"  # a jsonl task with no solution field: no demonstrations
    base = [f"model={bb.path}", f"out={tmp_path}", "task.name=jsonl", f"task.test_path={data}", "task.n_test=2",
            "task.n_train=4", "task.grader=exact"]
    for extra, match in ((["pairs.demonstrations=true", "arms=[correct]"], "pairs.demonstrations: task jsonl"),
                         (["arms=[weak]"], "weak.sft_steps: task jsonl")):
        cfg = parse_typed(gr.GenarmConfig, base + extra, "test")
        with pytest.raises(ValueError, match=match):
            gr.train(cfg, bb, make_task(cfg.task))
        assert not list(tmp_path.glob("candidates_*"))
