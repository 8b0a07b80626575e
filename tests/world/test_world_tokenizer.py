"""The world tokenizer: determinism, round trips, digits, response masks, HF loading."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swiftjax.world import tokenizer as T
from swiftjax.world import problems as W

_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


@pytest.fixture(scope="module")
def problems():
    cfg_hard = W.WorldConfig(min_steps=3, max_steps=4, max_operand=50, easy_max_operand=20,
                             distractor_prob=1.0)
    return (W.make_split("train", 2000) + W.make_split("test", 500)
            + W.make_split("validation", 500, cfg_hard))


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    return T.save_tokenizer(tok, tmp_path_factory.mktemp("world_tok"))


@pytest.fixture(scope="module")
def hf(saved_dir):
    return T.load_hf_tokenizer(saved_dir)


# ----------------------------------------------------------------------------- vocabulary


def test_special_ids_and_size(tok):
    assert tok.get_vocab_size() < 512
    for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]):
        assert tok.token_to_id(t) == i
    assert (T.PAD_ID, T.BOS_ID, T.EOS_ID, T.UNK_ID, T.USER_ID, T.ASSISTANT_ID, T.END_ID) == tuple(range(7))


def test_build_is_deterministic(tok, saved_dir, tmp_path):
    again = T.save_tokenizer(T.build_tokenizer(), tmp_path / "again")
    for f in _FILES:
        assert (saved_dir / f).read_bytes() == (again / f).read_bytes(), f
    # a fresh interpreter with another hash seed writes the same bytes
    out = tmp_path / "subprocess"
    code = ("import sys; from swiftjax.world import tokenizer as T; "
            "T.save_tokenizer(T.build_tokenizer(), sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=repo)
    for f in _FILES:
        assert (saved_dir / f).read_bytes() == (out / f).read_bytes(), f


def test_digits_are_single_tokens(tok):
    vocab = tok.get_vocab()
    for token in vocab:
        if any(c.isdigit() for c in token) and not token.startswith("Step"):
            assert len(token.lstrip("\u0120")) == 1, token
    ids = tok.encode("Step 1: 305 + 27 = 332", add_special_tokens=False).ids
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces == ["Step\u01201:", "\u01203", "0", "5", "\u0120+", "\u01202", "7",
                      "\u0120=", "\u01203", "3", "2"]


def test_world_words_are_single_tokens(tok):
    for w in W.vocabulary():
        assert len(tok.encode(" " + w, add_special_tokens=False).ids) == 1, w
        if w[0].isupper():
            assert len(tok.encode(w, add_special_tokens=False).ids) == 1, w


# ----------------------------------------------------------------------------- round trips


def test_round_trip_on_world_texts(tok, problems):
    lengths = []
    for p in problems:
        for text in (p.question, p.solution, T.format_example(p.question, p.solution)):
            ids = tok.encode(text, add_special_tokens=False).ids
            assert T.UNK_ID not in ids, text
            assert tok.decode(ids, skip_special_tokens=False) == text
            assert T.decode(tok, ids) == text
        full = tok.encode(T.format_example(p.question, p.solution)).ids
        assert len(full) == W.count_tokens(p.question) + W.count_tokens(p.solution) + 4
        lengths.append(len(full))
    assert max(lengths) <= 96


def test_round_trip_on_any_ascii(tok):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\r"]
    words = list(W.vocabulary())
    for _ in range(500):
        parts = [rng.choice(alphabet) if rng.random() < 0.6 else rng.choice(words) for _ in range(30)]
        text = "".join(parts)
        assert T.decode(tok, T.encode(tok, text)) == text
    assert T.encode(tok, "applesauce") == [tok.token_to_id(c) for c in "applesauce"]
    assert T.UNK_ID in T.encode(tok, "caf\u00e9") and T.UNK_ID in T.encode(tok, "a\x01b")


def test_token_length_distribution(tok):
    """Prints the lengths of chat-formatted examples (prompt + solution + <|end|>)."""
    ps = W.make_split("train", 3000, seed=1)
    lens = np.array([len(tok.encode(T.format_example(p.question, p.solution)).ids) for p in ps])
    prompt = np.array([len(tok.encode(T.format_prompt(p.question)).ids) for p in ps])
    steps = np.array([p.steps for p in ps])
    print(f"\nexample tokens: max {lens.max()} mean {lens.mean():.1f} p95 {np.percentile(lens, 95):.0f};"
          f" prompt tokens: max {prompt.max()} mean {prompt.mean():.1f};"
          f" response tokens: max {(lens - prompt).max()} mean {(lens - prompt).mean():.1f}")
    for n in sorted(set(steps.tolist())):
        sel = lens[steps == n]
        print(f"  {n} steps: n={sel.size} max {sel.max()} mean {sel.mean():.1f}")
    assert lens.max() <= 96


# ----------------------------------------------------------------------------- chat format


def test_format_strings():
    assert T.format_prompt("Q?") == "<bos><|user|>Q?<|assistant|>"
    assert T.format_example("Q?", "Answer: 1") == "<bos><|user|>Q?<|assistant|>Answer: 1<|end|>"
    with pytest.raises(ValueError, match="question"):
        T.format_prompt(None)
    with pytest.raises(ValueError, match="solution"):
        T.format_example("Q?", 3)


def test_response_mask_covers_the_assistant_turn(tok, problems):
    for p in problems[::5]:
        ids, mask = T.encode_example(tok, p.question, p.solution, max_len=112)
        assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (112,)
        full = tok.encode(T.format_example(p.question, p.solution)).ids
        n = len(full)
        assert ids[:n].tolist() == full and (ids[n:] == T.PAD_ID).all()
        assert T.decode(tok, ids[mask == 1]) == p.solution + "<|end|>"
        assert T.decode(tok, ids[:n][mask[:n] == 0]) == T.format_prompt(p.question)
        on = np.flatnonzero(mask)
        assert on[-1] == n - 1 and ids[on[-1]] == T.END_ID
        assert (np.diff(on) == 1).all()  # one contiguous span
        assert ids[on[0] - 1] == T.ASSISTANT_ID


def test_encode_examples_batch(tok, problems):
    ps = problems[:16]
    ids, attn, resp = T.encode_examples(tok, [p.question for p in ps], [p.solution for p in ps], 100)
    assert ids.shape == attn.shape == resp.shape == (16, 100)
    for i, p in enumerate(ps):
        one, m = T.encode_example(tok, p.question, p.solution, 100)
        np.testing.assert_array_equal(ids[i], one)
        np.testing.assert_array_equal(resp[i], m)
        n = len(tok.encode(T.format_example(p.question, p.solution)).ids)
        assert attn[i].tolist() == [1] * n + [0] * (100 - n)
    assert ((resp == 1) <= (attn == 1)).all()
    with pytest.raises(ValueError, match="solutions"):
        T.encode_examples(tok, ["a", "b"], ["x"], 50)


def test_encode_prompts_left_and_right(tok, problems):
    qs = [p.question for p in problems[:12]]
    ids, mask = T.encode_prompts(tok, qs, max_len=64)
    assert ids.shape == mask.shape == (12, 64) and ids.dtype == np.int32 and mask.dtype == np.int32
    assert (ids[:, -1] == T.ASSISTANT_ID).all() and (mask[:, -1] == 1).all()
    rids, rmask = T.encode_prompts(tok, qs, max_len=64, left_pad=False)
    for i, q in enumerate(qs):
        row = tok.encode(T.format_prompt(q)).ids
        n = len(row)
        assert mask[i].tolist() == [0] * (64 - n) + [1] * n
        assert ids[i, 64 - n:].tolist() == row and (ids[i, :64 - n] == T.PAD_ID).all()
        assert rmask[i].tolist() == [1] * n + [0] * (64 - n)
        assert rids[i, :n].tolist() == row and (rids[i, n:] == T.PAD_ID).all()
    with pytest.raises(ValueError, match="max_len"):
        T.encode_prompts(tok, qs, max_len=10)
    with pytest.raises(ValueError, match="max_len"):
        T.encode_prompts(tok, qs, max_len=0)
    with pytest.raises(ValueError, match="single str"):
        T.encode_prompts(tok, "a question", max_len=64)


def test_encode_example_too_long_raises(tok, problems):
    p = problems[0]
    with pytest.raises(ValueError, match="max_len"):
        T.encode_example(tok, p.question, p.solution, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        T.encode_example(tok, p.question, p.solution, max_len=-1)


def test_decode_response(tok):
    sol = "Step 1: 2 * 3 = 6\nAnswer: 6"
    body = tok.encode(sol, add_special_tokens=False).ids
    assert T.decode_response(tok, body + [T.END_ID] + body) == sol
    assert T.decode_response(tok, np.array(body + [T.EOS_ID, 9, 9], np.int64)) == sol
    assert T.decode_response(tok, body + [T.PAD_ID, T.PAD_ID]) == sol
    assert T.decode_response(tok, body) == sol
    assert T.decode_response(tok, []) == ""
    assert T.decode_response(tok, [T.END_ID] + body) == ""
    batch = np.array([body + [T.END_ID, 0], body + [T.PAD_ID, T.PAD_ID]], np.int32)
    assert T.decode_responses(tok, batch) == [sol, sol]
    with pytest.raises(ValueError, match=r"\[T\]"):
        T.decode_response(tok, batch)
    with pytest.raises(ValueError, match="integer"):
        T.decode_response(tok, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        T.decode_responses(tok, np.array(body))


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_loads_and_matches(tok, hf, problems):
    assert hf.pad_token == "<pad>" and hf.pad_token_id == 0
    assert hf.bos_token_id == T.BOS_ID and hf.eos_token_id == T.EOS_ID and hf.unk_token_id == T.UNK_ID
    assert hf.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"]) == [4, 5, 6]
    assert len(hf) == tok.get_vocab_size()
    for p in problems[::7]:
        text = T.format_example(p.question, p.solution)
        ours = tok.encode(text).ids
        assert hf(text)["input_ids"] == ours
        assert hf.encode(text, add_special_tokens=False) == ours
        assert hf.decode(ours) == text
        assert T.encode(hf, text) == ours and T.decode(hf, ours) == text
    p = problems[3]
    a = T.encode_example(tok, p.question, p.solution, 100)
    b = T.encode_example(hf, p.question, p.solution, 100)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(T.encode_prompts(tok, [p.question], 64)[0],
                                  T.encode_prompts(hf, [p.question], 64)[0])


def test_hf_chat_template_reproduces_format(hf, problems):
    for p in problems[:200:10]:
        user = [{"role": "user", "content": p.question}]
        both = user + [{"role": "assistant", "content": p.solution}]
        assert hf.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == T.format_prompt(p.question)
        assert hf.apply_chat_template(both, tokenize=False) == T.format_example(p.question, p.solution)
        ids = hf.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == T.encode(hf, T.format_prompt(p.question))


def test_load_tokenizer_round_trip(tok, saved_dir, tmp_path):
    again = T.load_tokenizer(saved_dir)
    assert again.to_str() == tok.to_str()
    with pytest.raises(ValueError, match="tokenizer.json"):
        T.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizers.Tokenizer"):
        T.save_tokenizer("not a tokenizer", tmp_path / "x")
    with pytest.raises(ValueError, match="words"):
        T.build_tokenizer(words=["ok", "not ok"])
