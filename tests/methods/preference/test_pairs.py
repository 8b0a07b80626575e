"""Preference pairs: construction, prompt split, the one encoded pair type (on HF chat
backbones), reference log-probs on each reference's own tokenisation (two different chat
templates and tokenizers), atomic storage."""
from __future__ import annotations

import itertools
import random

import jax
import numpy as np
import pytest
from flax import nnx
from hf_tiny import save_tiny_chat_model

from swiftjax.backbone import load_backbone
from swiftjax.methods.preference import pairs as prefs


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


# ----------------------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {arch: save_tiny_chat_model(arch, root / arch, seed=i)[0] for i, arch in enumerate(("qwen2", "llama3"))}


@pytest.fixture(scope="module")
def qwen(chat_dirs):
    return load_backbone(str(chat_dirs["qwen2"]))


@pytest.fixture(scope="module")
def llama(chat_dirs):
    return load_backbone(str(chat_dirs["llama3"]))


def _toy_pairs(n=5):
    rows = _rows(n_prompts=n, n=4, seed=2)
    return prefs.make_pairs(rows, 1, seed=0)


# ----------------------------------------------------------------------------- the pair type


def test_encode_pairs_layout_matches_the_backbone(qwen):
    """Right padding, the prompt first, both sides of a row laid out alike; texts become the
    template's assistant turn, ids are used as they are."""
    recs = _toy_pairs()
    prompts = [p["prompt"] for p in recs]
    gen = [[5, 6, 7]] * len(recs)
    pairs, kept = prefs.encode_pairs(qwen, prompts, [p["chosen"] for p in recs], gen)
    assert kept.tolist() == list(range(len(recs))) and len(pairs) == len(recs)
    assert pairs.max_len % 16 == 0 and pairs.ref_chosen.shape == (len(recs), 0)
    for i, p in enumerate(recs):
        pr = qwen.prompt_ids(p["prompt"])
        resp = qwen.response_ids(p["prompt"], p["chosen"])
        n = len(pr) + len(resp)
        assert pairs.chosen_ids[i, :n].tolist() == pr + resp
        assert np.all(pairs.chosen_ids[i, n:] == qwen.pad_id)
        assert pairs.chosen_attention_mask[i].tolist() == [1] * n + [0] * (pairs.max_len - n)
        assert pairs.chosen_response_mask[i].tolist() == [0] * len(pr) + [1] * len(resp) + [0] * (pairs.max_len - n)
        assert resp[-1] in qwen.eos_ids
        m = len(pr) + 3
        assert pairs.rejected_ids[i, :m].tolist() == pr + [5, 6, 7]
        assert pairs.rejected_response_mask[i].tolist() == [0] * len(pr) + [1] * 3 + [0] * (pairs.max_len - m)
    # an explicit width: too-long pairs are dropped (or raise)
    long = [gen[0]] + [list(range(3, 3 + 400))] + gen[2:]
    short, kept = prefs.encode_pairs(qwen, prompts, [p["chosen"] for p in recs], long, 256, drop_long=True)
    assert kept.tolist() == [0] + list(range(2, len(recs))) and short.max_len == 256
    np.testing.assert_array_equal(short.chosen_ids[:, :pairs.max_len], pairs.chosen_ids[kept])
    with pytest.raises(ValueError, match="max_len"):
        prefs.encode_pairs(qwen, prompts, [p["chosen"] for p in recs], long, 256)
    with pytest.raises(ValueError, match="at least one response token"):
        prefs.encode_pairs(qwen, prompts[:1], [[]], [[3]])


def test_pair_type_views_and_checks(qwen):
    recs = _toy_pairs()
    prompts = [p["prompt"] for p in recs]
    pairs, _ = prefs.encode_pairs(qwen, prompts, [p["chosen"] for p in recs], [p["rejected"] for p in recs])
    n = len(pairs)
    rc, rr = np.arange(2 * n, dtype=np.float32).reshape(n, 2), -np.ones((n, 2), np.float32)
    withr = pairs.with_refs(["a", "b"], rc, rr)
    assert withr.ref_names == ("a", "b") and withr.ref_chosen.shape == (n, 2)
    sel = withr.select_refs([1])
    assert sel.ref_names == ("b",) and sel.ref_chosen[:, 0].tolist() == rc[:, 1].tolist()
    sub = withr.take([2, 0])
    assert len(sub) == 2 and sub.ref_chosen.tolist() == rc[[2, 0]].tolist()
    np.testing.assert_array_equal(sub.rejected_ids, pairs.rejected_ids[[2, 0]])
    with pytest.raises(ValueError, match="distinct"):
        withr.with_refs(["a"], rc[:, :1], rr[:, :1])
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        pairs.with_refs(["a"], rc, rr)
    bad = prefs.PreferencePairs(**{**pairs.arrays(), "rejected_ids": pairs.rejected_ids[:, :-1]})
    with pytest.raises(ValueError, match="rejected_ids"):
        bad.check()
    # a batch is a pytree: the arrays are leaves, the names static
    leaves, _ = jax.tree_util.tree_flatten(withr)
    assert len(leaves) == 8


def _np_logprobs(model, ids, attn, resp):
    """Teacher-forced summed response log-probs in float64 numpy. The rows run with no
    attention mask at all: the model is causal, so what follows a row's last token (its
    padding) cannot change the logits of its own tokens."""
    gd, st = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(gd, s)(x).logits)(st, np.asarray(ids))  # [N, T, V], one call
    logits = np.asarray(logits, np.float64)
    out = []
    for i in range(ids.shape[0]):
        n = int(attn[i].sum())
        q, lg = ids[i, :n], logits[i, :n]
        logz = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        lp = lg[np.arange(n - 1), q[1:]] - logz[:-1]
        out.append(float((lp * resp[i, 1:n]).sum()))
    return np.array(out)


def test_reference_logprobs_on_own_tokenisation(qwen, llama, chat_dirs):
    """A reference with another tokenizer and template scores the pair texts on its own
    encoding; one with the same tokenisation reuses the policy's ids."""
    assert not prefs.same_tokenisation(qwen, llama)
    again = load_backbone(str(chat_dirs["qwen2"]))
    assert prefs.same_tokenisation(qwen, again)
    recs = _toy_pairs()
    prompts, ch, rj = [p["prompt"] for p in recs], [p["chosen"] for p in recs], [p["rejected"] for p in recs]
    pairs, _ = prefs.encode_pairs(qwen, prompts, ch, rj)
    lw, ll = prefs.reference_logprobs(llama, qwen, pairs, prompts, ch, rj, batch_size=2)
    own, _ = prefs.encode_pairs(llama, prompts, ch, rj)
    assert not np.array_equal(own.chosen_ids[:, :8], pairs.chosen_ids[:, :8])  # really another encoding
    np.testing.assert_allclose(lw, _np_logprobs(llama.model, *own.side("chosen")), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ll, _np_logprobs(llama.model, *own.side("rejected")), rtol=1e-5, atol=1e-4)
    fw, fl = prefs.reference_logprobs(again, qwen, pairs, prompts, ch, rj, batch_size=4)
    np.testing.assert_allclose(fw, _np_logprobs(qwen.model, *pairs.side("chosen")), rtol=1e-5, atol=1e-4)
    # on another tokenisation, generated ids cannot be re-used: texts are needed
    with pytest.raises(ValueError, match="texts"):
        prefs.reference_logprobs(llama, qwen, pairs, prompts, [[3]] * len(recs), rj)
    with pytest.raises(ValueError, match="one per pair"):
        prefs.reference_logprobs(llama, qwen, pairs, prompts[:1], ch, rj)


# ----------------------------------------------------------------------------- storage


def test_save_load_roundtrip_atomic(tmp_path, qwen):
    recs = _toy_pairs()
    prompts = [p["prompt"] for p in recs]
    pairs, _ = prefs.encode_pairs(qwen, prompts, [p["chosen"] for p in recs], [[4, 5]] * len(recs))
    pairs = pairs.with_refs(["x"], np.full((len(recs), 1), -2.5), np.full((len(recs), 1), -3.0))
    extra = {"prompt_id": np.array([p["prompt_id"] for p in recs]), "meta": np.array("{}")}
    path = prefs.save_pairs(tmp_path / "sub" / "pairs.npz", pairs, extra)
    back, bextra = prefs.load_pairs(path)
    assert back.ref_names == ("x",) and sorted(bextra) == ["meta", "prompt_id"]
    for k, v in pairs.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), v)
    assert bextra["prompt_id"].tolist() == extra["prompt_id"].tolist()
    assert [p.name for p in path.parent.iterdir()] == ["pairs.npz"]  # no temp file left
    with pytest.raises(ValueError, match="dtype object"):
        prefs.save_pairs(tmp_path / "o.npz", pairs, {"x": np.array([{}, None], dtype=object)})
    assert not (tmp_path / "o.npz").exists() and not list(tmp_path.glob(".o.*"))
    with pytest.raises(ValueError, match="own fields"):
        prefs.save_pairs(tmp_path / "o.npz", pairs, {"chosen_ids": np.zeros(2)})
    with pytest.raises(ValueError, match=".npz"):
        prefs.save_pairs(tmp_path / "o.txt", pairs)
    with pytest.raises(ValueError, match="does not exist"):
        prefs.load_pairs(tmp_path / "missing.npz")


def _pairs_of(ids_a, ma, ids_b, mb):
    attn_a, attn_b = (ids_a != 0).astype(np.int32), (ids_b != 0).astype(np.int32)
    return prefs.PreferencePairs.build((ids_a, np.maximum(attn_a, ma), ma), (ids_b, np.maximum(attn_b, mb), mb))


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
    cut = prefs.through_first_divergence(_pairs_of(ids_a, ma, ids_b, mb))
    got_a, got_b = cut.chosen_response_mask, cut.rejected_response_mask
    want_a, want_b = _np_through_first_divergence(ids_a, ma, ids_b, mb)
    np.testing.assert_array_equal(got_a, want_a)
    np.testing.assert_array_equal(got_b, want_b)
    assert (got_a <= ma).all() and (got_b <= mb).all() and got_a.sum() < ma.sum()


def test_through_first_divergence_errors():
    ids = np.array([[7, 3, 4, 0]], np.int32)
    m = np.array([[0, 1, 1, 0]], np.int32)
    with pytest.raises(ValueError, match="identical"):
        prefs.through_first_divergence(_pairs_of(ids, m, ids.copy(), m))
    with pytest.raises(ValueError, match="different positions"):
        prefs.through_first_divergence(_pairs_of(ids, m, np.array([[7, 3, 4, 5]], np.int32),
                                                  np.array([[0, 0, 1, 1]], np.int32)))
    with pytest.raises(ValueError, match="at least one response token"):
        prefs.through_first_divergence(_pairs_of(ids, m, ids, np.zeros_like(m)))
