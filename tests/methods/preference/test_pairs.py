"""Preference pairs: construction, prompt split, encoding, reference log-probs on each
reference's own tokenisation (two different tokenizers), atomic storage."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from swiftjax.methods.preference import pairs as prefs
from swiftjax.world import tokenizer as wtok
from swiftjax.models.config import ModelConfig
from swiftjax.models.registry import create_model


# ----------------------------------------------------------------------------- helpers


def _rows(n_prompts=12, n=6, seed=0, dup=True):
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for j in range(n):
            a = rng.randint(0, 3) if dup else j  # small text space: duplicates happen
            ok = rng.random() < 0.5
            rows.append({"prompt_id": f"p{p:03d}", "index": j, "prompt": f"What is {p} + {p}?",
                         "text": f"Step 1: {p} + {p} = {2 * p + (0 if ok else a + 1)}\nAnswer: {a}{'' if ok else 'x'}",
                         "token_ids": None, "answer": str(2 * p), "correct": ok})
    return rows


def _brute_pairs(rows):
    """Every distinct (correct text, incorrect text) per prompt, from scratch."""
    out = {}
    for r in rows:
        out.setdefault(r["prompt_id"], [])
    for pid in out:
        grp = [r for r in rows if r["prompt_id"] == pid]
        good = {r["text"] for r in grp if r["correct"]}
        bad = {r["text"] for r in grp if not r["correct"]}
        out[pid] = set(itertools.product(good, bad))
    return out


# ----------------------------------------------------------------------------- pairs


def test_make_pairs_all_when_uncapped():
    rows = _rows()
    pairs = prefs.make_pairs(rows, max_per_prompt=10_000, seed=0)
    brute = _brute_pairs(rows)
    got: dict = {}
    for p in pairs:
        got.setdefault(p["prompt_id"], []).append((p["chosen"], p["rejected"]))
    for pid, want in brute.items():
        assert len(got.get(pid, [])) == len(set(got.get(pid, []))), "duplicate pairs"
        assert set(got.get(pid, [])) == want
    by_key = {(r["prompt_id"], r["index"]): r for r in rows}
    for p in pairs:
        c, r = by_key[(p["prompt_id"], p["chosen_index"])], by_key[(p["prompt_id"], p["rejected_index"])]
        assert c["correct"] and not r["correct"]
        assert c["text"] == p["chosen"] and r["text"] == p["rejected"] and c["prompt"] == p["prompt"]


def test_make_pairs_capped_deterministic_and_per_prompt():
    rows = _rows(seed=1)
    brute = _brute_pairs(rows)
    a = prefs.make_pairs(rows, max_per_prompt=3, seed=5)
    b = prefs.make_pairs(list(reversed(rows)), max_per_prompt=3, seed=5)
    key = lambda ps: sorted((p["prompt_id"], p["chosen"], p["rejected"]) for p in ps)  # noqa: E731
    assert key(a) == key(b)  # row order does not matter
    counts = {}
    for p in a:
        counts[p["prompt_id"]] = counts.get(p["prompt_id"], 0) + 1
        assert (p["chosen"], p["rejected"]) in brute[p["prompt_id"]]
    for pid, want in brute.items():
        assert counts.get(pid, 0) == min(3, len(want))
    # a prompt's draw does not depend on the other prompts in the file
    only = [r for r in rows if r["prompt_id"] == "p004"]
    assert key(prefs.make_pairs(only, 3, seed=5)) == key([p for p in a if p["prompt_id"] == "p004"])
    c = prefs.make_pairs(rows, max_per_prompt=3, seed=6)
    assert key(c) != key(a)


def test_split_by_prompt():
    pairs = prefs.make_pairs(_rows(n_prompts=20), 4, seed=0)
    P = len({p["prompt_id"] for p in pairs})
    tr, ho = prefs.split_by_prompt(pairs, 0.25, seed=3)
    assert len(tr) + len(ho) == len(pairs)
    tp, hp = {p["prompt_id"] for p in tr}, {p["prompt_id"] for p in ho}
    assert not tp & hp and len(hp) == round(0.25 * P)
    tr2, ho2 = prefs.split_by_prompt(list(reversed(pairs)), 0.25, seed=3)
    assert {p["prompt_id"] for p in ho2} == hp
    _, ho3 = prefs.split_by_prompt(pairs, 2, seed=3)
    assert len({p["prompt_id"] for p in ho3}) == 2
    with pytest.raises(ValueError, match="held_out"):
        prefs.split_by_prompt(pairs, 1.5)
    with pytest.raises(ValueError, match="held_out"):
        prefs.split_by_prompt(pairs, P + 1)
    with pytest.raises(ValueError, match="missing keys"):
        prefs.split_by_prompt([{"prompt_id": "x"}], 0.5)


def test_subsample_nested():
    small = prefs.subsample_pairs(100, 10, seed=2)
    big = prefs.subsample_pairs(100, 40, seed=2)
    assert len(set(small)) == 10 and set(small) <= set(big)
    assert np.all(np.diff(big) > 0)
    with pytest.raises(ValueError, match="at most"):
        prefs.subsample_pairs(5, 6)


def test_make_pairs_bad_inputs():
    with pytest.raises(ValueError, match="max_per_prompt"):
        prefs.make_pairs(_rows(), 0)
    bad = _rows()[:2]
    del bad[0]["correct"]
    with pytest.raises(ValueError, match="correct"):
        prefs.make_pairs(bad, 2)


# ----------------------------------------------------------------------------- encoding


def test_encode_pairs_matches_world_encoder_and_drops_long():
    tok = wtok.build_tokenizer()
    pairs = prefs.make_pairs(_rows(n_prompts=6), 3, seed=0)
    arrs, kept = prefs.encode_pairs(tok, pairs, 64)
    assert len(kept) == len(pairs)
    for side in ("chosen", "rejected"):
        ids, attn, resp = wtok.encode_examples(tok, [p["prompt"] for p in pairs], [p[side] for p in pairs], 64)
        np.testing.assert_array_equal(arrs[f"{side}_ids"], ids)
        np.testing.assert_array_equal(arrs[f"{side}_attention_mask"], attn)
        np.testing.assert_array_equal(arrs[f"{side}_response_mask"], resp)
    long = dict(pairs[1], rejected=pairs[1]["rejected"] + " pad" * 80)
    arrs2, kept2 = prefs.encode_pairs(tok, [pairs[0], long, pairs[2]], 64, drop_long=True)
    assert kept2.tolist() == [0, 2]
    np.testing.assert_array_equal(arrs2["chosen_ids"], arrs["chosen_ids"][[0, 2]])
    with pytest.raises(ValueError, match="max_len"):
        prefs.encode_pairs(tok, [long], 64)


def test_encode_generated():
    tok = wtok.build_tokenizer()
    qs = ["What is 2 + 3?", "Mia has 4 pens."]
    gen = [[17, 18, wtok.END_ID], [20, 21, 22, 23]]
    arrs, kept = prefs.encode_generated(tok, qs, gen, 40)
    assert kept.tolist() == [0, 1]
    for i, (q, g) in enumerate(zip(qs, gen)):
        p = wtok.encode(tok, wtok.format_prompt(q))
        n = len(p) + len(g)
        assert arrs["ids"][i, :n].tolist() == p + g
        assert np.all(arrs["ids"][i, n:] == wtok.PAD_ID)
        assert arrs["attention_mask"][i].tolist() == [1] * n + [0] * (40 - n)
        assert arrs["response_mask"][i].tolist() == [0] * len(p) + [1] * len(g) + [0] * (40 - n)
    arrs, kept = prefs.encode_generated(tok, qs, [gen[0], list(range(10, 50))], 40, drop_long=True)
    assert kept.tolist() == [0]
    with pytest.raises(ValueError, match="max_len"):
        prefs.encode_generated(tok, qs, [gen[0], list(range(10, 50))], 40)


# ----------------------------------------------------------------------------- references


_SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>")


def _char_tokenizer():
    """A character-level tokenizer (one token per printable ASCII char / whitespace)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    chars = [" ", "\n", "\t"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {t: i for i, t in enumerate(list(_SPECIAL) + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    return tok


def _char_encode(tok, prompts, responses, max_len):
    """<bos> prompt chars <sep> response chars <eos>; response mask on the response + <eos>."""
    n = len(prompts)
    ids = np.zeros((n, max_len), np.int32)
    attn, resp = np.zeros_like(ids), np.zeros_like(ids)
    for i, (q, s) in enumerate(zip(prompts, responses)):
        p = [1] + tok.encode(q, add_special_tokens=False).ids + [4]
        r = tok.encode(s, add_special_tokens=False).ids + [2]
        if len(p) + len(r) > max_len:
            raise ValueError(f"row {i}: too long for max_len={max_len}")
        ids[i, : len(p) + len(r)] = p + r
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p): len(p) + len(r)] = 1
    return ids, attn, resp


def _model(vocab, seed):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return create_model(cfg, seed=seed)


def _own_logprobs(model, seqs):
    """Teacher-forced log-probs of each (token list, response mask) in float64 numpy.

    The rows are stacked with trailing padding and run with no attention mask at all: the
    model is causal, so what follows a row's last token cannot change its logits."""
    T = max(len(q) for q, _ in seqs)
    ids = np.zeros((len(seqs), T), np.int32)
    for i, (q, _) in enumerate(seqs):
        ids[i, : len(q)] = q
    logits = np.asarray(model(ids).logits, np.float64)  # [N, T, V]
    out = []
    for i, (q, m) in enumerate(seqs):
        lg = logits[i, : len(q)]
        logz = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        lp = lg[np.arange(len(q) - 1), q[1:]] - logz[:-1]
        out.append(float((lp * np.asarray(m[1:])).sum()))
    return np.array(out)


def test_reference_logprobs_on_own_tokenisation():
    wt = wtok.build_tokenizer()
    ct = _char_tokenizer()
    assert not prefs.same_tokenizer(wt, ct) and prefs.same_tokenizer(wt, wtok.build_tokenizer())
    rows = _rows(n_prompts=4, n=4, seed=2)
    pairs = prefs.make_pairs(rows, 1, seed=0)
    assert len(pairs) >= 3
    m_world = _model(wt.get_vocab_size(), 0)
    m_char = _model(ct.get_vocab_size(), 1)
    refs = [prefs.Reference("world", m_world, wt),
            prefs.Reference("char", m_char, ct, encode=_char_encode, max_len=96)]
    data = prefs.build_pair_data(wt, pairs, refs, max_len=48, batch_size=4)
    N = len(pairs)
    assert data["ref_chosen"].shape == (2, N) and data["ref_rejected"].shape == (2, N)
    assert data["ref_names"].tolist() == ["world", "char"]
    for side, key in (("chosen", "ref_chosen"), ("rejected", "ref_rejected")):
        w_seqs, c_seqs = [], []
        for p in pairs:
            # the world model on the world tokenisation
            ids, _, resp = wtok.encode_examples(wt, [p["prompt"]], [p[side]], 48)
            n = int((ids[0] != wtok.PAD_ID).sum())
            w_seqs.append((ids[0, :n].tolist(), resp[0, :n].tolist()))
            # the char model on its own character tokenisation
            cids, cattn, cresp = _char_encode(ct, [p["prompt"]], [p[side]], 96)
            n = int(cattn[0].sum())
            c_seqs.append((cids[0, :n].tolist(), cresp[0, :n].tolist()))
        np.testing.assert_allclose(data[key][0], _own_logprobs(m_world, w_seqs), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(data[key][1], _own_logprobs(m_char, c_seqs), rtol=1e-5, atol=1e-4)
    # the char tokenisation is really different (more tokens than the world one)
    assert cattn.sum() > (ids != 0).sum()
    # the fast path (shared ids) equals encoding again with the reference's own tokenizer
    slow = prefs.reference_logprobs(refs[0], [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                    max_len=48, batch_size=4)
    np.testing.assert_allclose(slow, data["ref_chosen"][0], rtol=1e-6, atol=1e-6)


def test_reference_tokenizer_mismatch_raises():
    wt = wtok.build_tokenizer()
    ct = _char_tokenizer()
    small = _model(ct.get_vocab_size(), 0)  # vocab 103 < world ids
    ids, attn, resp = wtok.encode_examples(wt, ["Ella has 7 apples and 3 pears."], ["Answer: 10"], 32)
    ref = prefs.Reference("char", small, ct, encode=_char_encode)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        prefs.reference_logprobs(ref, ["q"], ["a"], shared=(ids, attn, resp))
    with pytest.raises(ValueError, match="max_len"):
        prefs.reference_logprobs(ref, ["q"], ["a"])
    with pytest.raises(ValueError, match="distinct names"):
        prefs.pair_reference_logprobs([ref, ref], [], {"chosen_ids": ids}, wt)


# ----------------------------------------------------------------------------- storage


def test_save_load_roundtrip_atomic(tmp_path):
    data = {"prompt_id": np.array(["a", "bb"]), "chosen_ids": np.arange(6, dtype=np.int32).reshape(2, 3),
            "ref_names": np.array(["x"]), "ref_chosen": np.array([[0.5, -1.0]], np.float32)}
    path = prefs.save_pair_data(tmp_path / "sub" / "pairs.npz", data)
    back = prefs.load_pair_data(path)
    assert sorted(back) == sorted(data)
    for k in data:
        np.testing.assert_array_equal(back[k], data[k])
        assert back[k].dtype == data[k].dtype
    assert [p.name for p in path.parent.iterdir()] == ["pairs.npz"]  # no temp file left
    sub = prefs.take_pairs(back, [1])
    assert sub["prompt_id"].tolist() == ["bb"] and sub["ref_chosen"].tolist() == [[-1.0]]
    with pytest.raises(ValueError, match="dtype object"):
        prefs.save_pair_data(tmp_path / "o.npz", {"x": np.array([{}, None], dtype=object)})
    assert not (tmp_path / "o.npz").exists() and not list(tmp_path.glob(".o.*"))
    with pytest.raises(ValueError, match=".npz"):
        prefs.save_pair_data(tmp_path / "o.txt", data)
    with pytest.raises(ValueError, match="does not exist"):
        prefs.load_pair_data(tmp_path / "missing.npz")


def _np_through_first_divergence(ids_a, ma, ids_b, mb):
    out_a, out_b = np.zeros_like(ma), np.zeros_like(mb)
    for i in range(ids_a.shape[0]):
        ra = [int(t) for t, m in zip(ids_a[i], ma[i]) if m]
        rb = [int(t) for t, m in zip(ids_b[i], mb[i]) if m]
        d = 0
        while d < len(ra) and d < len(rb) and ra[d] == rb[d]:
            d += 1
        s = int(np.flatnonzero(ma[i])[0])
        out_a[i, s: s + min(d + 1, len(ra))] = 1
        out_b[i, s: s + min(d + 1, len(rb))] = 1
    return out_a, out_b


def test_through_first_divergence_matches_a_loop_on_random_pairs():
    rng = np.random.default_rng(0)
    n, T = 200, 24
    ids_a = np.zeros((n, T), np.int32)
    ids_b = np.zeros((n, T), np.int32)
    ma = np.zeros((n, T), np.int32)
    mb = np.zeros((n, T), np.int32)
    for i in range(n):
        p = int(rng.integers(1, 8))
        la, lb = int(rng.integers(1, T - p + 1)), int(rng.integers(1, T - p + 1))
        a = rng.integers(3, 6, size=la)  # a small alphabet: long shared prefixes are common
        b = rng.integers(3, 6, size=lb)
        k = int(rng.integers(0, min(la, lb) + 1))
        b[:k] = a[:k]
        if la == lb and (a == b).all():
            b[-1] = 9
        ids_a[i, :p] = ids_b[i, :p] = 7
        ids_a[i, p:p + la], ids_b[i, p:p + lb] = a, b
        ma[i, p:p + la], mb[i, p:p + lb] = 1, 1
    got_a, got_b = prefs.through_first_divergence({"ids": ids_a, "response_mask": ma},
                                                  {"ids": ids_b, "response_mask": mb})
    want_a, want_b = _np_through_first_divergence(ids_a, ma, ids_b, mb)
    np.testing.assert_array_equal(got_a, want_a)
    np.testing.assert_array_equal(got_b, want_b)
    assert (got_a <= ma).all() and (got_b <= mb).all() and got_a.sum() < ma.sum()


def test_through_first_divergence_errors():
    ids = np.array([[7, 3, 4, 0]], np.int32)
    m = np.array([[0, 1, 1, 0]], np.int32)
    with pytest.raises(ValueError, match="identical"):
        prefs.through_first_divergence({"ids": ids, "response_mask": m}, {"ids": ids.copy(), "response_mask": m})
    with pytest.raises(ValueError, match="different positions"):
        prefs.through_first_divergence({"ids": ids, "response_mask": m},
                                       {"ids": ids, "response_mask": np.array([[0, 0, 1, 1]], np.int32)})
    with pytest.raises(ValueError, match="one shape"):
        prefs.through_first_divergence({"ids": ids, "response_mask": m}, {"ids": ids[:, :3], "response_mask": m})
    with pytest.raises(ValueError, match="at least one response token"):
        prefs.through_first_divergence({"ids": ids, "response_mask": m},
                                       {"ids": ids, "response_mask": np.zeros_like(m)})
