"""KV-cache sampling: greedy equals transformers' generate; filters equal a numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import swiftjax
from swiftjax.sampling import SamplingConfig, filter_logits, generate
from hf_tiny import ARCHS, tiny_hf_model


def _prompts(seed=1, vocab=97):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(4, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch, tmp_path):
    hf = tiny_hf_model(arch, seed=11)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts()
    n = 12
    out = generate(model, ids, mask, cfg=SamplingConfig(max_new_tokens=n, temperature=0,
                                                        eos_ids=(2,), pad_id=0))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=2)[:, ids.shape[1]:].numpy()
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()
    # lengths count up to and including EOS
    for row, length, fin in zip(ours, np.asarray(out.lengths), np.asarray(out.finished)):
        hits = np.flatnonzero(row == 2)
        assert fin == (hits.size > 0)
        assert length == (hits[0] + 1 if hits.size else n)


def test_logprobs_are_the_models_teacher_forced_logprobs(tmp_path):
    hf = tiny_hf_model("llama", seed=3)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts(seed=2)
    out = generate(model, ids, mask, key=jax.random.key(0),
                   cfg=SamplingConfig(max_new_tokens=6, temperature=1.0))
    full_ids = np.concatenate([ids, np.asarray(out.tokens)], 1)
    full_mask = np.concatenate([mask, np.ones_like(np.asarray(out.tokens))], 1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits, np.float64)
    t = ids.shape[1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.take_along_axis(logits[:, :-1], full_ids[:, 1:, None], -1)[..., 0] - lse[:, :-1]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[:, t - 1:], atol=2e-5)



def test_recorded_topk_and_mean_logprob_are_the_teacher_forced_distribution(tmp_path):
    hf = tiny_hf_model("qwen2", seed=4)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts(seed=5)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_ids=(2,), record_topk=3)
    out = generate(model, ids, mask, key=jax.random.key(1), cfg=cfg)
    plain = generate(model, ids, mask, key=jax.random.key(1), cfg=SamplingConfig(max_new_tokens=6, eos_ids=(2,)))
    np.testing.assert_array_equal(out.tokens, plain.tokens)  # recording changes nothing sampled
    assert plain.topk_logprobs is None and plain.mean_logprob is None
    toks = np.asarray(out.tokens)
    full_ids = np.concatenate([ids, toks], 1)
    full_mask = np.concatenate([mask, np.ones_like(toks)], 1)
    logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits, np.float64)
    t = ids.shape[1]
    lp = logits - (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                   + logits.max(-1, keepdims=True))
    lp = lp[:, t - 1:-1]                                          # [B, N, V]: the step distributions
    live = np.arange(6)[None, :] < np.asarray(out.lengths)[:, None]
    ref_top = -np.sort(-lp, -1)[..., :3]
    np.testing.assert_allclose(np.asarray(out.topk_logprobs)[live], ref_top[live], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.mean_logprob)[live], lp.mean(-1)[live], atol=2e-5)
    assert (np.asarray(out.topk_logprobs)[~live] == 0).all()

def _np_filter(logits, temperature, top_k, top_p):
    x = logits.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        row = x[b].copy()
        if top_k:
            thresh = np.sort(row)[::-1][top_k - 1]
            row[row < thresh] = -np.inf
        if top_p < 1:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            cum = 0.0
            keep = np.zeros_like(row, bool)
            for j, idx in enumerate(order):
                if cum < top_p:
                    keep[idx] = True
                cum += p[j]
            row[~keep] = -np.inf
        out[b] = row
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.5), (1, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    rs = np.random.RandomState(top_k * 10 + int(top_p * 10))
    logits = rs.randn(6, 40).astype(np.float32) * 3
    cfg = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), cfg))
    ref = _np_filter(logits, 0.8, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6)


@pytest.mark.parametrize("scale", [6.0, 0.05])  # peaked: the nucleus lies in the head; flat: full sort
def test_top_p_over_a_large_vocabulary_matches_numpy(scale):
    from swiftjax.sampling import TOP_P_HEAD

    rs = np.random.RandomState(int(scale * 100))
    logits = (rs.randn(5, 3 * TOP_P_HEAD + 7) * scale).astype(np.float32)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9)
    ours = np.asarray(filter_logits(jnp.asarray(logits), cfg))
    ref = _np_filter(logits, 1.0, 0, 0.9)
    kept = np.isfinite(ref).sum(-1)
    assert (kept < TOP_P_HEAD).all() if scale > 1 else (kept > TOP_P_HEAD).all()  # each branch is taken
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))


@pytest.mark.parametrize("case", ["flat", "ties", "masked", "one_token", "mixed"])
def test_nucleus_search_equals_the_sorted_definition(case):
    """The sort-free search (the flat-distribution branch) on every row kind, against numpy's
    stable sort: ties at the cut, -inf tokens (after top-k), a token holding top_p alone."""
    from swiftjax.sampling import _nucleus_by_search

    rs = np.random.RandomState(len(case))
    logits = (rs.randn(7, 300) * 0.3).astype(np.float32)
    if case == "ties":
        logits = np.round(logits * 4) / 4  # many equal values, so the cut falls inside a tie
    if case == "masked":
        logits[:, ::3] = -np.inf
    if case == "one_token":
        logits[:, 5] = 20.0
    if case == "mixed":
        logits[::2] *= 30.0
    search = jax.jit(lambda x, top_p: _nucleus_by_search(x, jax.nn.logsumexp(x, axis=-1, keepdims=True), top_p))
    for top_p in (0.3, 0.9, 0.999):
        ours = np.asarray(search(jnp.asarray(logits), top_p))
        ref = np.isfinite(_np_filter(logits, 1.0, 0, top_p))
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("scale,top_k,head", [(2.0, 0, True), (0.05, 0, False), (2.0, 50, True)])
def test_top_p_draws_equal_categorical_of_the_filtered_logits(scale, top_k, head):
    """The head-only arg-max (and the search branch) draws exactly what
    ``jax.random.categorical(key, filter_logits(...))`` draws, key by key."""
    from swiftjax.sampling import TOP_P_HEAD, sample_token

    rs = np.random.RandomState(int(scale * 10) + top_k)
    logits = jnp.asarray((rs.randn(5, 3 * TOP_P_HEAD + 7) * scale).astype(np.float32))
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, top_k=top_k)
    keys = jax.random.split(jax.random.key(0), 64)
    ours = jax.vmap(lambda k: sample_token(k, logits, cfg))(keys)
    ref = jax.vmap(lambda k: jax.random.categorical(k, filter_logits(logits, cfg), axis=-1))(keys)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert (np.asarray(ours) != np.asarray(ours)[:1]).any(axis=0).all()  # every row's draws vary
    kept = np.isfinite(np.asarray(filter_logits(logits, cfg))).sum(-1)
    assert (kept <= TOP_P_HEAD).all() == head  # the head branch, or the search branch, is taken


@pytest.mark.parametrize("v", [2000, 2048, 2053, 49152, 50257])
def test_argmax_last_is_numpy_argmax_with_ties_nan_and_inf(v):
    from swiftjax.sampling import argmax_last
    rng = np.random.default_rng(v)
    # finite rows (the blocked path): ties anywhere go to the first maximal index
    x = rng.normal(size=(2, 5, v)).astype(np.float32)
    x[0, 1] = np.round(x[0, 1])                         # many ties
    x[0, 2] = 7.0                                       # all equal
    x[0, 3] = -3e38                                     # all equal and hugely negative
    x[0, 4, v - 1] = 99.0                               # the maximum in the last entry (tail or block)
    x[1, 0, [v // 3, v - 2]] = 50.0                     # a tie across blocks (or block and tail)
    x[1, 1, 127:129] = 30.0                             # a tie straddling a block edge
    x[1, 2, [5, 130]] = 30.0                            # the first of two blocks holding the maximum
    x[1, 3, v - 2:] = 40.0                              # a tie inside the last entries
    for arr in (x, x[:, 0]):
        got = jax.jit(argmax_last)(jnp.asarray(arr))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.argmax(arr, axis=-1))
    # NaN counts as the maximum (the first one wins) and +-inf order as numbers, as in jnp.argmax
    y = rng.normal(size=(5, v)).astype(np.float32)
    y[0, [5, v - 1]] = np.nan
    y[1, v - 1] = np.nan
    y[2, [0, v - 1]] = np.inf
    y[3] = -np.inf
    y[4, 200] = np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax_last)(jnp.asarray(y))), np.argmax(y, axis=-1))


def test_gumbel_at_is_jax_random_gumbel_at_those_elements(monkeypatch):
    """The noise of the head's tokens alone equals jax.random.gumbel's full draw there, so a
    top-p draw computes it for 128 tokens instead of the vocabulary and draws the same token."""
    from swiftjax import sampling as S

    assert S._gumbel_at_is_exact()  # the default JAX settings
    rs = np.random.RandomState(5)
    for seed in range(3):
        key = jax.random.key(seed)
        idx = rs.randint(0, 50_000, size=(4, 16))
        full = np.asarray(jax.random.gumbel(key, (50_000,), jnp.float32))
        np.testing.assert_array_equal(np.asarray(S.gumbel_at(key, jnp.asarray(idx), 50_000)), full[idx])
        full2 = np.asarray(jax.random.gumbel(key, (3, 1000), jnp.float32))  # a [B, V] draw: flat index b V + i
        b, i = rs.randint(0, 3, 32), rs.randint(0, 1000, 32)
        np.testing.assert_array_equal(np.asarray(S.gumbel_at(key, jnp.asarray(b * 1000 + i), 3000)), full2[b, i])
    raw = jax.random.PRNGKey(4)  # a raw uint32 key: the default (threefry) impl
    np.testing.assert_array_equal(np.asarray(S.gumbel_at(raw, jnp.arange(5), 10)),
                                  np.asarray(jax.random.gumbel(raw, (10,), jnp.float32))[:5])
    assert not S._gumbel_at_is_exact(jax.random.key(0, impl="rbg"))  # other key kinds: full noise
    # whole draws: the head path and the full-noise path pick the same tokens, key by key
    logits = jnp.asarray((rs.randn(6, 3 * S.TOP_P_HEAD + 7) * 2.0).astype(np.float32))
    flat = jnp.asarray((rs.randn(6, 3 * S.TOP_P_HEAD + 7) * 0.05).astype(np.float32))  # nucleus beyond the head
    cfg = SamplingConfig(temperature=0.7, top_p=0.9)
    keys = jax.random.split(jax.random.key(9), 32)
    draw = jax.jit(jax.vmap(lambda k, x: S.sample_token(k, x, cfg), in_axes=(0, None)))
    rows = jax.jit(lambda ks, x: S.sample_token_rows(ks, x, cfg))
    fast = [np.asarray(draw(keys, x)) for x in (logits, flat)] + [np.asarray(rows(keys[:6], logits))]
    monkeypatch.setattr(S, "_gumbel_at_is_exact", lambda key=None: False)
    draw = jax.jit(jax.vmap(lambda k, x: S.sample_token(k, x, cfg), in_axes=(0, None)))
    rows = jax.jit(lambda ks, x: S.sample_token_rows(ks, x, cfg))
    slow = [np.asarray(draw(keys, x)) for x in (logits, flat)] + [np.asarray(rows(keys[:6], logits))]
    for f, sl in zip(fast, slow):
        np.testing.assert_array_equal(f, sl)
    assert len(np.unique(fast[0])) > 6  # the draws vary


def test_shared_prompt_prefill_gives_the_same_samples(tmp_path):
    hf = tiny_hf_model("llama", seed=5)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts(seed=6)
    ids, mask = np.repeat(np.asarray(ids)[:2], 3, 0), np.repeat(np.asarray(mask)[:2], 3, 0)  # 2 prompts x 3
    for cfg in (SamplingConfig(max_new_tokens=6, temperature=0), SamplingConfig(max_new_tokens=6, temperature=1.0)):
        key = jax.random.key(3) if cfg.temperature else None
        plain = generate(model, ids, mask, key=key, cfg=cfg)
        shared = generate(model, ids, mask, key=key, cfg=cfg, prompt_groups=3)
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
        np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        generate(model, ids, mask, cfg=cfg, key=key, prompt_groups=4)
    with pytest.raises(ValueError, match=r"prompt_groups=2: expected prompt 0 rows 2..3 to be identical"):
        generate(model, ids, mask, cfg=cfg, key=key, prompt_groups=2)


def test_sampling_respects_filters_and_is_seeded(tmp_path):
    hf = tiny_hf_model("qwen2", seed=4)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts(seed=3)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=1)
    a = generate(model, ids, mask, key=jax.random.key(1), cfg=cfg)
    greedy = generate(model, ids, mask, cfg=SamplingConfig(max_new_tokens=8, temperature=0))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(greedy.tokens))  # top-1 == greedy
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    x = generate(model, ids, mask, key=jax.random.key(5), cfg=cfg)
    y = generate(model, ids, mask, key=jax.random.key(5), cfg=cfg)
    z = generate(model, ids, mask, key=jax.random.key(6), cfg=cfg)
    np.testing.assert_array_equal(np.asarray(x.tokens), np.asarray(y.tokens))
    assert (np.asarray(x.tokens) != np.asarray(z.tokens)).any()


def test_generate_bad_inputs(tmp_path):
    hf = tiny_hf_model("gpt2", seed=5)
    hf.save_pretrained(tmp_path)
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="key is required"):
        generate(model, ids, mask, cfg=SamplingConfig(max_new_tokens=2, temperature=1.0))
    right = mask.copy()
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, right, cfg=SamplingConfig(max_new_tokens=2, temperature=0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="positions for gpt2"):
        generate(model, ids, mask, cfg=SamplingConfig(max_new_tokens=500, temperature=0))
