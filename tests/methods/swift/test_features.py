"""SWIFT features (vs transformers' hidden states / logits), fused scoring (vs stored-feature
scoring and a numpy head), and the running score while decoding (vs teacher-forced scoring)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import swiftjax
from swiftjax.methods.swift import features as F
from swiftjax.methods.swift import head as swift
from swiftjax.data.store import FeatureStore
from swiftjax.methods.swift.train import LayerView
from swiftjax.sampling import SamplingConfig, generate
from hf_tiny import tiny_hf_model

HF_TOL = 1e-4  # our forward vs torch (same as tests/test_models.py)
FUSED_TOL = 1e-5  # fused vs stored-feature scoring (both ours, float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (hf, model, cfg), built on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            hf = tiny_hf_model(arch, seed=5)
            d = tmp_path_factory.mktemp(arch)
            hf.save_pretrained(d)
            model, cfg = swiftjax.load_model(d)
            cache[arch] = (hf, model, cfg)
        return cache[arch]

    return get


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, models):
    return (request.param, *models(request.param))


def _batch(seed=0, b=3, t=12, vocab=97):
    """Left-padded prompts followed by responses of different lengths, right padding after."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(b, t))
    attn = np.ones_like(ids)
    resp = np.zeros_like(ids)
    spans = [(0, 5, 12), (2, 6, 10), (4, 7, 12)]  # (left pad, response start, response end)
    for r, (pad, s, e) in enumerate(spans[:b]):
        attn[r, :pad] = 0
        attn[r, e:] = 0
        resp[r, s:e] = 1
    ids[attn == 0] = 0
    return ids, attn, resp


def _torch(hf, ids, attn):
    pos = np.maximum(np.cumsum(attn, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(attn), position_ids=torch.tensor(pos),
                 output_hidden_states=True)
    return out.logits.numpy().astype(np.float64), out.hidden_states


def _torch_norm(hf, h):
    norm = hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f
    with torch.no_grad():
        return norm(h).numpy()


def np_reference_features(hf, ids, attn, spec, num_layers):
    """Features straight from transformers: HF hidden states (normed with HF's final norm when
    apply_norm), concatenated in index order; or logits / numpy top-k."""
    logits, states = _torch(hf, ids, attn)
    if spec.mode == "hidden":
        layers = range(num_layers + 1) if spec.layers == "all" else sorted(spec.layers)
        parts = [_torch_norm(hf, states[i]) if spec.apply_norm else states[i].numpy() for i in layers]
        return np.concatenate(parts, axis=-1).astype(np.float64)
    if spec.mode == "logits":
        return logits
    top = -np.sort(-logits, axis=-1)[..., : spec.k]
    if spec.mode == "topk":
        return top
    mx = logits.max(-1, keepdims=True)
    return top - (np.log(np.exp(logits - mx).sum(-1, keepdims=True)) + mx)


def np_score(kernel, bias, x, mask):
    proj = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    m = np.asarray(mask, np.float64)
    if proj.shape[-1] == 2:
        g = 1.0 / (1.0 + np.exp(-proj[..., 0]))
        return (g * proj[..., 1] * m).sum(-1) / np.maximum((g * m).sum(-1), 1e-8)
    return (proj[..., 0] * m).sum(-1) / np.maximum(m.sum(-1), 1.0)


def _head(spec, cfg, gated, seed=0):
    p = swift.init_params(jax.random.key(seed), F.feature_dim(spec, cfg), gated=gated)
    # larger weights than the default init so that scores move visibly with the features
    return {"kernel": p["kernel"] * 4.0, "bias": p["bias"]}


# ----------------------------------------------------------------------------- spec


def test_spec_resolution_and_dims():
    s = F.FeatureSpec(layers=(3, 0, 1), apply_norm=True)
    assert F.resolve_layers(s, 3) == (0, 1, 3)
    assert F.resolve_layers(F.FeatureSpec(), 4) == (0, 1, 2, 3, 4)
    cfg = swiftjax.models.config.ModelConfig("llama", 50, 16, 3, 2, 2, 8, 32)
    assert F.feature_dim(s, cfg) == 3 * 16
    assert F.feature_dim(F.FeatureSpec(), cfg) == 4 * 16
    assert F.feature_dim(F.FeatureSpec(mode="logits"), cfg) == 50
    assert F.feature_dim(F.FeatureSpec(mode="topk", k=7), cfg) == 7
    assert F.FeatureSpec.from_dict(s.to_dict()) == s
    assert F.FeatureSpec.from_dict(F.FeatureSpec(mode="topk_logprobs", k=3).to_dict()).k == 3


@pytest.mark.parametrize("kw, match", [
    (dict(layers=()), "non-empty"),
    (dict(layers=(1, 1)), "distinct"),
    (dict(layers=(-1,)), "ints >= 0"),
    (dict(layers="some"), "'all'"),
    (dict(mode="pooled"), "mode"),
    (dict(mode="topk"), "k"),
    (dict(mode="hidden", k=3), "k"),
    (dict(apply_norm=1), "bool"),
])
def test_bad_specs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        F.FeatureSpec(**kw)


def test_resolve_rejects_out_of_range_and_logits_modes():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        F.resolve_layers(F.FeatureSpec(layers=(4,)), 3)
    with pytest.raises(ValueError, match="reads no hidden-state"):
        F.resolve_layers(F.FeatureSpec(mode="logits"), 3)


# ----------------------------------------------------------------------------- extraction

SPECS = [
    F.FeatureSpec(),  # all L+1 states
    F.FeatureSpec(layers=(3, 0), apply_norm=True),  # 0 and L (normed twice), given out of order
    F.FeatureSpec(mode="logits"),
    F.FeatureSpec(mode="topk", k=4),
    F.FeatureSpec(mode="topk_logprobs", k=4),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-{s.layers}-{s.apply_norm}")
def test_extract_equals_transformers_states(pair, spec):
    _, hf, model, cfg = pair
    ids, attn, resp = _batch()
    got = np.asarray(F.extract(model, ids, attn, resp, spec))
    ref = np_reference_features(hf, ids, attn, spec, cfg.num_layers)
    assert got.dtype == np.float32 and got.shape == ids.shape + (F.feature_dim(spec, cfg),)
    on = resp.astype(bool)
    np.testing.assert_allclose(got[on], ref[on], atol=HF_TOL, rtol=1e-5)
    assert np.all(got[~on] == 0)  # zero outside the response


def test_batches_cover_the_set_with_one_compilation(models):
    _, model, cfg = models("llama")
    ids, attn, resp = _batch(b=3)
    ids, attn, resp = (np.concatenate([a, a[::-1]], 0)[:5] for a in (ids, attn, resp))
    spec = F.FeatureSpec(layers=(1, 2))
    whole = np.asarray(F.extract(model, ids, attn, resp, spec))
    before = F._extract_many._cache_size()
    seen = []
    for fb in F.iter_feature_batches(model, ids, attn, resp, spec, batch_size=2):
        assert fb.features.shape == (2, ids.shape[1], F.feature_dim(spec, cfg))
        for j, r in enumerate(fb.rows):
            if r < 0:
                assert np.all(fb.mask[j] == 0)
                continue
            seen.append(r)
            np.testing.assert_allclose(np.asarray(fb.features[j]), whole[r], atol=1e-5)
            np.testing.assert_array_equal(fb.mask[j], resp[r])
    assert sorted(seen) == list(range(5))
    assert F._extract_many._cache_size() - before <= 1  # batches of 2, padded last: one shape


def _ragged_set(seed=0, n=9, t=40, vocab=97):
    """Right-padded prompt + response rows of very different lengths (and two left-padded rows)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(n, t))
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    for r in range(n):
        end = int(rs.randint(6, t + 1))
        start = 0 if r % 4 else t - end          # rows 0, 4, 8: left-padded to the full width
        attn[r, start: start + end] = 1
        resp[r, start + 3: start + end] = 1
    ids[attn == 0] = 0
    return ids, attn, resp


def test_length_bucketed_batches_equal_the_full_width_forward(models, tmp_path):
    """Batches cut to their rows' columns give each row's full-width features (and the store
    written from them holds the rows in order); fewer columns are computed."""
    _, model, cfg = models("llama")
    ids, attn, resp = _ragged_set()
    spec = F.FeatureSpec(layers=(0, 2), apply_norm=True)
    whole = np.asarray(F.extract(model, ids, attn, resp, spec))
    seen, columns = [], 0
    for fb in F.iter_feature_batches(model, ids, attn, resp, spec, batch_size=2, bucket=8):
        w = fb.features.shape[1]
        assert w % 8 == 0 or w == ids.shape[1]
        columns += w
        for j, r in enumerate(fb.rows[fb.rows >= 0]):
            seen.append(r)
            cols = slice(fb.start, fb.start + w)
            np.testing.assert_allclose(np.asarray(fb.features[j]), whole[r, cols], atol=1e-5)
            np.testing.assert_array_equal(fb.mask[j], resp[r, cols])
            assert resp[r].sum() == fb.mask[j].sum()   # no response token outside the cut
    assert sorted(seen) == list(range(len(ids)))
    assert columns < 5 * ids.shape[1]                  # 5 batches at full width would be 200
    p = _head(spec, cfg, True, seed=1)
    ref = np_score(p["kernel"], p["bias"], whole, resp)
    got = F.fused_scores_batched(model, p, spec, ids, attn, resp, batch_size=2, bucket=8)
    np.testing.assert_allclose(got, ref, atol=FUSED_TOL, rtol=FUSED_TOL)
    prefix = F.fused_prefix_scores_batched(model, p, spec, ids, attn, resp, batch_size=2, bucket=8)
    full = F.fused_prefix_scores_batched(model, p, spec, ids, attn, resp, batch_size=2, bucket=None)
    on = resp > 0
    np.testing.assert_allclose(prefix[on], full[on], atol=FUSED_TOL, rtol=FUSED_TOL)
    # a store written in length-sorted windows of 2 batches still holds row i at i
    path = F.write_store(tmp_path / "st", model, spec, ids, attn, resp, np.arange(len(ids)) % 2,
                         np.arange(len(ids)), batch_size=2, window_batches=2, shard_rows=3)
    st = FeatureStore(path)
    np.testing.assert_array_equal(st.group_ids, np.arange(len(ids)))
    for r in range(len(ids)):
        np.testing.assert_allclose(st.row(r), whole[r][resp[r] > 0], rtol=2.0 ** -8, atol=1e-30)


def test_one_forward_serves_several_specs_stores_and_heads(models, tmp_path):
    """extract_many / write_stores / fused_scores_many (one forward for every spec or head)
    equal the one-spec functions and a numpy head, on ragged rows in length-sorted batches."""
    _, model, cfg = models("llama")
    ids, attn, resp = _ragged_set(seed=2)
    last = cfg.num_layers
    specs = [F.FeatureSpec(), F.FeatureSpec(layers=(last, 0), apply_norm=True), F.FeatureSpec(layers=(1,)),
             F.FeatureSpec(mode="token_logprobs", k=3), F.FeatureSpec(mode="topk_logprobs", k=4)]
    each = [np.asarray(F.extract(model, ids, attn, resp, s)) for s in specs]
    many = F.extract_many(model, ids, attn, resp, specs)
    assert len(many) == len(specs)
    for got, ref in zip(many, each):
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6, rtol=1e-6)
    # the normed subset is the raw all-layer features' blocks through the final norm
    d = cfg.hidden_size
    raw = each[0].reshape(*ids.shape, last + 1, d)
    normed = np.concatenate([np.asarray(model.final_norm(jnp.asarray(raw[..., i, :]))) for i in (0, last)], -1)
    on = resp > 0
    np.testing.assert_allclose(each[1][on], normed[on], atol=1e-5, rtol=1e-5)

    stored = [0, 2, 3]
    paths = F.write_stores([tmp_path / f"s{i}" for i in stored], model, [specs[i] for i in stored], ids, attn, resp,
                           np.arange(len(ids)) % 2, np.arange(len(ids)) // 2, batch_size=2, window_batches=2,
                           metas=[{"i": i} for i in stored], shard_rows=4)
    for i, path in zip(stored, paths):
        st = FeatureStore(path)
        assert st.meta["i"] == i and F.FeatureSpec.from_dict(st.spec) == specs[i]
        for r in range(len(ids)):
            np.testing.assert_allclose(st.row(r), each[i][r][on[r]], rtol=2.0 ** -8, atol=1e-6)  # bf16, batching
    # the all-layer raw store serves the normed subset and the one-layer subset (LayerView)
    full = FeatureStore(paths[0])
    norm = jax.jit(model.final_norm)
    for view, ref in ((LayerView(full, range(last + 1), (last, 0), d, norm=norm), each[1]),
                      (LayerView(full, range(last + 1), (1,), d), each[2])):
        x, m = view.batch(np.arange(len(ids)))
        assert view.feature_dim == ref.shape[-1] and len(view) == len(ids)
        for r in range(len(ids)):
            n = int(on[r].sum())
            # bf16 keeps 8 significant bits (relative error <= 2^-8); the norm adds its own rms's
            np.testing.assert_allclose(x[r, :n], ref[r][on[r]], rtol=2.0 ** -7, atol=1e-6)
            assert np.all(x[r, n:] == 0) and m[r].sum() == n
    with pytest.raises(ValueError, match="layers: expected a non-empty subset"):
        LayerView(full, range(last + 1), (last + 1,), d)
    with pytest.raises(ValueError, match="source: expected"):
        LayerView(full, range(last), (0,), d)

    heads = [(_head(s, cfg, gated=i % 2 == 0, seed=i), s) for i, s in enumerate(specs)]
    got = F.fused_scores_many(model, heads, ids, attn, resp, batch_size=3, bucket=8)
    assert got.shape == (len(specs), len(ids))
    for (p, s), g, x in zip(heads, got, each):
        np.testing.assert_allclose(g, np_score(p["kernel"], p["bias"], x, resp), atol=FUSED_TOL, rtol=FUSED_TOL)
        assert np.ptp(g) > 1e-3
    np.testing.assert_allclose(got[1], F.fused_scores_batched(model, *heads[1], ids, attn, resp, batch_size=3),
                               atol=FUSED_TOL, rtol=FUSED_TOL)
    with pytest.raises(ValueError, match="heads: expected a non-empty sequence"):
        F.fused_scores_many(model, [], ids, attn, resp)
    with pytest.raises(ValueError, match="params\\['kernel'\\]: expected"):
        F.fused_scores_many(model, [(heads[0][0], specs[1])], ids, attn, resp)
    with pytest.raises(ValueError, match="specs: expected a non-empty sequence"):
        F.extract_many(model, ids, attn, resp, specs[0])
    with pytest.raises(ValueError, match="paths: expected distinct"):
        F.write_stores([tmp_path / "x", tmp_path / "x"], model, specs[:2], ids, attn, resp, np.zeros(len(ids)),
                       np.zeros(len(ids), int))
    assert not (tmp_path / "x").exists()


def test_response_rows_and_pad_rows_round_trip():
    rs = np.random.RandomState(0)
    x = rs.randn(3, 6, 4).astype(np.float32)
    m = np.zeros((3, 6), np.float32)
    m[0, 1:4] = 1
    m[1, :6] = 1
    m[2, 5] = 1
    rows = F.response_rows(x, m)
    assert [r.shape[0] for r in rows] == [3, 6, 1]
    np.testing.assert_array_equal(rows[0], x[0, 1:4])
    padded, pm = F.pad_rows(rows, pad_to=7)
    assert padded.shape == (3, 7, 4)
    for b in range(3):
        n = int(m[b].sum())
        np.testing.assert_array_equal(padded[b, :n], x[b][m[b] > 0])
        assert np.all(padded[b, n:] == 0) and pm[b].sum() == n
    with pytest.raises(ValueError, match="pad_to"):
        F.pad_rows(rows, pad_to=3)
    with pytest.raises(ValueError, match="mask"):
        F.response_rows(x, m[:, :5])


def test_write_store_holds_the_response_features(models, tmp_path):
    _, model, cfg = models("gpt2")
    ids, attn, resp = _batch()
    spec = F.FeatureSpec(layers=(0, cfg.num_layers))
    labels = np.array([1.0, 0.0, 1.0])
    groups = np.array([0, 0, 1])
    path = F.write_store(tmp_path / "st", model, spec, ids, attn, resp, labels, groups, batch_size=2,
                         shard_rows=2)
    st = FeatureStore(path)
    assert len(st) == 3 and st.feature_dim == F.feature_dim(spec, cfg)
    assert F.FeatureSpec.from_dict(st.spec) == spec and st.meta["num_layers"] == cfg.num_layers
    np.testing.assert_array_equal(st.labels, labels)
    np.testing.assert_array_equal(st.group_ids, groups)
    np.testing.assert_array_equal(st.lengths, resp.sum(1))
    whole = np.asarray(F.extract(model, ids, attn, resp, spec))
    x, m = st.batch([0, 1, 2])
    for b in range(3):
        ref = whole[b][resp[b] > 0]
        n = ref.shape[0]
        np.testing.assert_allclose(x[b, :n], ref, rtol=2.0 ** -8, atol=1e-30)  # bf16 rounding
        assert m[b].sum() == n


# ----------------------------------------------------------------------------- fused scoring

FUSED_CASES = [  # (spec, gated); every spec is also checked against transformers' features
    (F.FeatureSpec(), True),
    (F.FeatureSpec(layers="all", apply_norm=True), False),
    (F.FeatureSpec(layers=(3, 0), apply_norm=True), True),  # 0 and L
    (F.FeatureSpec(layers=(0,)), False),
    (F.FeatureSpec(mode="logits"), True),
    (F.FeatureSpec(mode="topk", k=4), False),
]


@pytest.mark.parametrize("spec, gated", FUSED_CASES,
                         ids=lambda v: f"{v.mode}-{v.layers}-{v.apply_norm}" if isinstance(v, F.FeatureSpec)
                         else ("gated" if v else "ungated"))
def test_fused_scores_equal_stored_feature_scores(pair, spec, gated):
    _, hf, model, cfg = pair
    _check_fused_scores(hf, model, cfg, spec, gated)


# the other ports (q/k norms, Gemma's sandwich norms and sliding/full blocks, Phi-3's fused weights)
MORE_ARCHS = ("qwen3", "gemma2", "gemma3", "phi3")


@pytest.mark.parametrize("arch", MORE_ARCHS)
@pytest.mark.parametrize("spec, gated", [(F.FeatureSpec(layers=(0, 2, 3), apply_norm=True), True),
                                         (F.FeatureSpec(mode="logits"), False)],
                         ids=["hidden-subset-norm-gated", "logits-ungated"])
def test_fused_scores_of_more_architectures(models, arch, spec, gated, request):
    hf, model, cfg = models(arch)
    if spec.mode == "logits" and cfg.final_logit_softcapping is not None:
        # soft-capped logits (Gemma) are not affine in the last state: fold_head must not fold them
        assert F.fold_head(model, _head(spec, cfg, gated), spec, ()) is None
    _check_fused_scores(hf, model, cfg, spec, gated)


def _check_fused_scores(hf, model, cfg, spec, gated):
    ids, attn, resp = _batch(seed=3)
    p = _head(spec, cfg, gated)
    fused = np.asarray(F.fused_scores(model, p, spec, ids, attn, resp))
    stored = np.asarray(swift.score(p, F.extract(model, ids, attn, resp, spec), resp))
    np.testing.assert_allclose(fused, stored, atol=FUSED_TOL, rtol=FUSED_TOL)
    # and against a numpy head over transformers' own features (independent of our forward)
    ref = np_score(p["kernel"], p["bias"], np_reference_features(hf, ids, attn, spec, cfg.num_layers), resp)
    np.testing.assert_allclose(fused, ref, atol=2e-4, rtol=1e-4)
    assert np.ptp(ref) > 1e-3  # the rows differ: the comparison can fail


def test_fused_scores_batched_equals_per_batch(models):
    _, model, cfg = models("gpt2")
    ids, attn, resp = _batch(seed=4)
    ids, attn, resp = (np.concatenate([a, a[::-1], a[:1]], 0) for a in (ids, attn, resp))  # N = 7
    spec = F.FeatureSpec(layers=(1, 3), apply_norm=True)
    p = _head(spec, cfg, True, seed=2)
    got = F.fused_scores_batched(model, p, spec, ids, attn, resp, batch_size=3)
    ref = np_score(p["kernel"], p["bias"], np.asarray(F.extract(model, ids, attn, resp, spec)), resp)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, ref, atol=FUSED_TOL, rtol=FUSED_TOL)


def test_fused_bad_inputs_raise(models):
    _, model, cfg = models("llama")
    ids, attn, resp = _batch()
    spec = F.FeatureSpec(layers=(1,))
    p = _head(spec, cfg, True)
    wide = _head(F.FeatureSpec(layers=(1, 2)), cfg, True)
    with pytest.raises(ValueError, match="rows"):
        F.fused_scores(model, wide, spec, ids, attn, resp)
    with pytest.raises(ValueError, match="response_mask"):
        bad = resp.copy()
        bad[1, 0] = 1  # a left-padding position
        F.fused_scores(model, p, spec, ids, attn, bad)
    with pytest.raises(ValueError, match="integer"):
        F.extract(model, ids.astype(np.float32), attn, resp, spec)
    with pytest.raises(ValueError, match="same shape"):
        F.extract(model, ids, attn, resp[:, :-1], spec)
    with pytest.raises(ValueError, match="FeatureSpec"):
        F.extract(model, ids, attn, resp, {"layers": "all"})
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        F.extract(model, ids, attn, resp, F.FeatureSpec(layers=(9,)))
    with pytest.raises(ValueError, match="batch_size"):
        next(F.iter_feature_batches(model, ids, attn, resp, spec, batch_size=0))
    with pytest.raises(ValueError, match="params"):
        F.fused_scores(model, {"kernel": p["kernel"]}, spec, ids, attn, resp)


@pytest.mark.parametrize("bad", ["too_big", "negative"])
def test_out_of_vocab_ids_raise_at_every_entry(models, tmp_path, bad):
    _, model, cfg = models("llama")
    ids, attn, resp = _batch()
    ids[1, 7] = cfg.vocab_size if bad == "too_big" else -1
    spec = F.FeatureSpec(layers=(1,))
    p = _head(spec, cfg, True)
    match = rf"ids: expected token ids in \[0, {cfg.vocab_size}\), got {ids[1, 7]} at \[1, 7\]"
    with pytest.raises(ValueError, match=match):
        F.extract(model, ids, attn, resp, spec)
    with pytest.raises(ValueError, match=match):
        next(F.iter_feature_batches(model, ids, attn, resp, spec, batch_size=2))
    with pytest.raises(ValueError, match=match):
        F.fused_scores(model, p, spec, ids, attn, resp)
    with pytest.raises(ValueError, match=match):
        F.fused_scores_batched(model, p, spec, ids, attn, resp, batch_size=2)
    with pytest.raises(ValueError, match=match):
        F.write_store(tmp_path / "s", model, spec, ids, attn, resp, np.zeros(3), np.arange(3))
    assert not (tmp_path / "s").exists()
    ok = ids.copy()
    ok[1, 7] = 5
    ok[1, 0] = cfg.vocab_size  # a padding position (attention_mask 0) is never read
    assert np.isfinite(np.asarray(F.extract(model, ok, attn, resp, spec))).all()


# ----------------------------------------------------------------------------- decoding


def _prompts(seed=1, vocab=97):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("arch, spec, gated", [
    ("llama", F.FeatureSpec(layers="all", apply_norm=True), True),
    ("gpt2", F.FeatureSpec(layers=(0, 2)), False),
    ("gemma3", F.FeatureSpec(layers=(1, 3), apply_norm=True), True),  # sliding + full blocks, cached
], ids=["llama-all-norm-gated", "gpt2-subset-ungated", "gemma3-subset-norm-gated"])
def test_running_score_during_decoding(models, arch, spec, gated):
    _, model, cfg = models(arch)
    ids, mask = _prompts()
    p = _head(spec, cfg, gated, seed=7)
    n = 8
    key = jax.random.key(4)
    # many end tokens: with this seed rows finish at different steps (asserted below)
    sc = SamplingConfig(max_new_tokens=n, temperature=1.0, eos_ids=tuple(range(3, 23)), pad_id=0)
    out = F.generate_with_scores(model, p, spec, ids, mask, key=key, cfg=sc)
    ref = generate(model, ids, mask, key=key, cfg=sc)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-6)
    lengths = np.asarray(out.lengths)
    # teacher-forced prompt + response (end token included), right-padded after the response
    live = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int32)
    full = np.concatenate([ids, np.asarray(out.tokens)], 1)
    attn = np.concatenate([mask, live], 1)
    resp = np.concatenate([np.zeros_like(mask), live], 1)
    tf = np.asarray(F.fused_scores(model, p, spec, full, attn, resp))
    np.testing.assert_allclose(np.asarray(out.scores), tf, atol=FUSED_TOL, rtol=FUSED_TOL)
    # every prefix: the running score equals the teacher-forced score of that prefix
    run = np.asarray(out.running)
    t = ids.shape[1]
    for j in range(n):
        pm = resp.copy()
        pm[:, t + j + 1:] = 0
        tf_j = np.asarray(F.fused_scores(model, p, spec, full, attn, pm))
        np.testing.assert_allclose(run[:, j], tf_j, atol=FUSED_TOL, rtol=FUSED_TOL)
    # per-token (u, r): zero after the end; the running score is their numpy pooling
    got = np.asarray(out.token_proj, np.float64)
    assert np.all(got[live == 0] == 0)
    for j in range(n):
        m = live * (np.arange(n)[None, :] <= j)
        if gated:
            g = 1.0 / (1.0 + np.exp(-got[..., 0]))
            ref_j = (g * got[..., 1] * m).sum(1) / np.maximum((g * m).sum(1), 1e-8)
        else:
            ref_j = (got[..., 0] * m).sum(1) / np.maximum(m.sum(1), 1.0)
        np.testing.assert_allclose(run[:, j], ref_j, atol=1e-6, rtol=1e-5)
    assert lengths.min() < n and len(set(lengths.tolist())) > 1  # rows ended early, at different steps


def test_generate_with_scores_bad_inputs(models):
    _, model, cfg = models("llama")
    ids, mask = _prompts()
    spec = F.FeatureSpec(layers=(1,))
    p = _head(spec, cfg, True)
    sc = SamplingConfig(max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="key"):
        F.generate_with_scores(model, p, spec, ids, mask, cfg=sc)
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="left padding"):
        F.generate_with_scores(model, p, spec, ids, right, key=jax.random.key(0), cfg=sc)
    with pytest.raises(ValueError, match="SamplingConfig"):
        F.generate_with_scores(model, p, spec, ids, mask, key=jax.random.key(0), cfg={"max_new_tokens": 2})


def test_token_logprob_features_match_numpy():
    from swiftjax.methods.swift.features import token_logprob_features

    rs = np.random.RandomState(0)
    logits = rs.randn(2, 5, 11).astype(np.float32) * 2
    ids = rs.randint(0, 11, size=(2, 5))
    got = np.asarray(token_logprob_features(jnp.asarray(logits), jnp.asarray(ids), k=3))
    x = logits.astype(np.float64)
    lp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    assert got.shape == (2, 5, 5)
    np.testing.assert_array_equal(got[:, 0], 0.0)
    for b in range(2):
        for t in range(1, 5):
            prev = lp[b, t - 1]
            ref = [prev[ids[b, t]], -(np.exp(prev) * prev).sum(), *np.sort(prev)[::-1][:3]]
            np.testing.assert_allclose(got[b, t], ref, rtol=1e-5, atol=1e-5)
    # a batch continuing a prefilled prompt: position 0 reads the prompt's last logits; and a
    # peaked distribution (logits ~ 40 apart) keeps its small entropy accurate
    first = rs.randn(2, 1, 11).astype(np.float32) * 40
    got = np.asarray(token_logprob_features(jnp.asarray(logits), jnp.asarray(ids), k=3, first=jnp.asarray(first)))
    f = first[:, 0].astype(np.float64)
    lpf = f - f.max(-1, keepdims=True) - np.log(np.exp(f - f.max(-1, keepdims=True)).sum(-1, keepdims=True))
    for b in range(2):
        ref = [lpf[b, ids[b, 0]], -(np.exp(lpf[b]) * lpf[b]).sum(), *np.sort(lpf[b])[::-1][:3]]
        np.testing.assert_allclose(got[b, 0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 1:], np.asarray(token_logprob_features(jnp.asarray(logits), jnp.asarray(ids),
                                                                             k=3))[:, 1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 15, 10_000])  # 3 rows: 1 column a chunk; 5 (ragged: 12 = 5 + 5 + 2); all
def test_chunked_logit_statistics_match_transformers(pair, chunk, monkeypatch):
    """The logits-mode features come from the final state in chunks of columns (never the
    [B, T, V] logits): one column a chunk, a ragged last chunk and a single chunk all equal
    numpy on transformers' logits (log-prob of the next token, entropy, top-k log-probs; raw top-k)."""
    _, hf, model, cfg = pair
    monkeypatch.setattr(F, "LOGIT_CHUNK", chunk)
    jax.clear_caches()  # the chunk size is read while tracing: no compilation of another test's size
    ids, attn, resp = _batch()                                  # 3 x 12 = 36 positions
    specs = (F.FeatureSpec(mode="token_logprobs", k=3), F.FeatureSpec(mode="topk_logprobs", k=4),
             F.FeatureSpec(mode="topk", k=2), F.FeatureSpec(layers=(1,)))
    got = [np.asarray(x) for x in F.extract_many(model, ids, attn, resp, specs)]
    logits, states = _torch(hf, ids, attn)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    on = resp.astype(bool)
    ref_tok = np.zeros(ids.shape + (5,))
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            prev = lp[b, t - 1]
            ref_tok[b, t] = [prev[ids[b, t]], -(np.exp(prev) * prev).sum(), *np.sort(prev)[::-1][:3]]
    np.testing.assert_allclose(got[0][on], ref_tok[on], atol=HF_TOL, rtol=1e-5)
    np.testing.assert_allclose(got[1][on], -np.sort(-lp, axis=-1)[..., :4][on], atol=HF_TOL, rtol=1e-5)
    np.testing.assert_allclose(got[2][on], -np.sort(-logits, axis=-1)[..., :2][on], atol=HF_TOL, rtol=1e-5)
    np.testing.assert_allclose(got[3][on], states[1].numpy()[on], atol=HF_TOL, rtol=1e-5)
    assert all(np.all(g[~on] == 0) for g in got)
    jax.clear_caches()


@pytest.mark.parametrize("v", [256, 300, 151936])
def test_row_sums_and_top_values_match_numpy(v):
    """The chunked statistics' two building blocks: blocked variadic row sums (float32, close to
    float64 numpy even over a 152k vocabulary) and the top-k values of several k at once."""
    rs = np.random.RandomState(v)
    a = np.exp(rs.randn(3, v)).astype(np.float32)
    b = (rs.randn(3, v) * 4).astype(np.float32)
    sa, sb = (np.asarray(x) for x in jax.jit(F._row_sums)(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(sa, a.astype(np.float64).sum(-1), rtol=2e-6)
    np.testing.assert_allclose(sb, b.astype(np.float64).sum(-1), rtol=2e-6, atol=2e-6 * np.abs(b).sum(-1).max())
    tops = F._top_values(jnp.asarray(b), (2, 5, 9))
    for k, got in zip((2, 5, 9), tops):
        np.testing.assert_array_equal(np.asarray(got), -np.sort(-b, axis=-1)[:, :k])
    assert F._top_values(jnp.asarray(b), ()) == ()


def test_fused_prefix_scores_equal_the_fused_score_of_each_prefix(models):
    _, model, cfg = models("llama")
    spec = F.FeatureSpec(layers=(0, 2), apply_norm=True)
    p = _head(spec, cfg, True, seed=3)
    rs = np.random.RandomState(8)
    ids = rs.randint(3, 97, size=(3, 9))
    attn = np.ones_like(ids)
    attn[2, 7:] = 0                                            # right padding
    resp = np.zeros_like(ids)
    resp[:, 4:] = 1
    resp[2, 7:] = 0
    got = F.fused_prefix_scores_batched(model, p, spec, ids, attn, resp, batch_size=2)
    for t in range(9):
        cut = resp * (np.arange(9)[None] <= t)
        np.testing.assert_allclose(got[:, t], np.asarray(F.fused_scores(model, p, spec, ids, attn, cut)),
                                   atol=FUSED_TOL, rtol=FUSED_TOL)


def _candidate_set(seed=3, groups=3, n=4, t=40, vocab=97):
    """A candidate set in group order (encode_pairs' layout): per group one prompt of its own
    length, then n responses of different lengths, right-padded."""
    rs = np.random.RandomState(seed)
    rows = []
    for g in range(groups):
        prompt = rs.randint(3, vocab, size=4 + 3 * g)
        for j in range(n):
            rows.append(np.concatenate([prompt, rs.randint(3, vocab, size=int(rs.randint(1, t - prompt.size + 1)))]))
            rows[-1] = (rows[-1], prompt.size)
    ids = np.zeros((len(rows), t), np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    for i, (r, p) in enumerate(rows):
        ids[i, : r.size] = r
        attn[i, : r.size] = 1
        resp[i, p: r.size] = 1
    return ids, attn, resp


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_shared_prompt_forward_equals_the_full_forward(models, tmp_path, arch):
    """Each prompt prefilled once and its responses forwarded on the broadcast cache give every
    row's own full-forward features (hidden, normed, token log-probs whose first token reads the
    prompt's last logits, top-k) and fused scores; fewer tokens are computed."""
    _, model, cfg = models(arch)
    ids, attn, resp = _candidate_set()
    last = cfg.num_layers
    specs = [F.FeatureSpec(), F.FeatureSpec(layers=(last, 1), apply_norm=True),
             F.FeatureSpec(mode="token_logprobs", k=3), F.FeatureSpec(mode="topk_logprobs", k=4)]
    each = [np.asarray(F.extract(model, ids, attn, resp, s)) for s in specs]
    on = resp > 0
    calls = []
    real = F._extract_many_shared

    def counted(*a, **kw):
        calls.append(a[3].shape)
        return real(*a, **kw)

    F._extract_many_shared = counted
    try:
        paths = F.write_stores([tmp_path / f"s{i}" for i in range(len(specs))], model, specs, ids, attn, resp,
                               np.arange(len(ids)) % 2, np.arange(len(ids)) // 4, batch_size=3, share_prompts=True)
    finally:
        F._extract_many_shared = real
    assert len(calls) == 6 and all(b == 3 for b, _ in calls)  # 3 prompts x ceil(4 / 3) batches, never plain
    for i, path in enumerate(paths):
        st = FeatureStore(path)
        for r in range(len(ids)):
            np.testing.assert_allclose(st.row(r), each[i][r][on[r]], rtol=2.0 ** -8, atol=1e-5)
    heads = [(_head(s, cfg, gated=i % 2 == 0, seed=i), s) for i, s in enumerate(specs)]
    got = F.fused_scores_many(model, heads, ids, attn, resp, batch_size=3, share_prompts=True)
    for (p, s), g, x in zip(heads, got, each):
        np.testing.assert_allclose(g, np_score(p["kernel"], p["bias"], x, resp), atol=FUSED_TOL, rtol=FUSED_TOL)
        assert np.ptp(g) > 1e-3
    # rows that share no prompt fall back to the length-sorted batches
    ids2, attn2, resp2 = _ragged_set(seed=4)
    plain = F.fused_scores_many(model, heads[:1], ids2, attn2, resp2, batch_size=3)
    np.testing.assert_array_equal(F.fused_scores_many(model, heads[:1], ids2, attn2, resp2, batch_size=3,
                                                      share_prompts=True), plain)


def test_resumed_store_writing_continues_where_it_stopped(models, tmp_path):
    """write_stores(resume=True) stopped after some batches keeps its checkpointed rows; the rerun
    computes only the rest and the stores equal ones written in one go."""
    _, model, cfg = models("llama")
    ids, attn, resp = _candidate_set(seed=5, groups=4)
    specs = [F.FeatureSpec(layers=(0, 2)), F.FeatureSpec(mode="token_logprobs", k=2)]
    args = (model, specs, ids, attn, resp, np.arange(len(ids)) % 2, np.arange(len(ids)) // 4)
    kw = dict(batch_size=2, share_prompts=True, resume=True, checkpoint_rows=4, metas=[{"k": 1}, {"k": 2}])
    whole = F.write_stores([tmp_path / "w0", tmp_path / "w1"], *args, **{**kw, "resume": False})
    real = F._extract_many_shared
    calls = []

    def dies(*a, **k):
        calls.append(a)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    F._extract_many_shared = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            F.write_stores([tmp_path / "r0", tmp_path / "r1"], *args, **kw)
        assert not (tmp_path / "r0").exists() and (tmp_path / "r0.partial").is_dir()
        calls.clear()
        F._extract_many_shared = lambda *a, **k: (calls.append(a), real(*a, **k))[1]
        F.write_stores([tmp_path / "r0", tmp_path / "r1"], *args, **kw)
    finally:
        F._extract_many_shared = real
    assert len(calls) == 4  # 5 batches ran (2 whole prompts = 8 rows checkpointed), the other 2 prompts now
    for a, b in zip(whole, [tmp_path / "r0", tmp_path / "r1"]):
        sa, sb = FeatureStore(a), FeatureStore(b)
        assert len(sa) == len(sb) == len(ids) and sb.meta == sa.meta
        np.testing.assert_array_equal(sa.labels, sb.labels)
        for r in range(len(ids)):
            np.testing.assert_array_equal(sa.row_bits(r), sb.row_bits(r))
    assert not (tmp_path / "r0.partial").exists()
    # checkpointed rows with other labels (e.g. a regraded set) are not continued
    F._extract_many_shared = dies
    calls.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            F.write_stores([tmp_path / "q0", tmp_path / "q1"], *args, **kw)
    finally:
        F._extract_many_shared = real
    relabelled = (model, specs, ids, attn, resp, 1 - np.arange(len(ids)) % 2, np.arange(len(ids)) // 4)
    F.write_stores([tmp_path / "q0", tmp_path / "q1"], *relabelled, **kw)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "q0").labels, 1 - np.arange(len(ids)) % 2)


def test_store_writing_is_refused_up_front_without_the_disk_space(models, tmp_path, monkeypatch):
    """2 bytes per feature per response token must be free before the forward starts; a resumed
    store needs only what it has not written yet."""
    import collections

    import swiftjax._io as io_mod

    _, model, cfg = models("llama")
    ids, attn, resp = _candidate_set(seed=6, groups=2)
    specs = [F.FeatureSpec(layers=(0, 2)), F.FeatureSpec(mode="token_logprobs", k=2)]
    need = int(resp.sum()) * sum(F.feature_dim(s, cfg) for s in specs) * 2
    usage = collections.namedtuple("usage", "total used free")
    free = {"n": need - 1}
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: usage(0, 0, free["n"]))
    args = (model, specs, ids, attn, resp, np.arange(len(ids)) % 2, np.arange(len(ids)) // 4)
    with pytest.raises(ValueError, match=rf"feature stores \({int(resp.sum())} response tokens\): expected "
                                         rf"{need / 1e9:.2f} GB free under {tmp_path}"):
        F.write_stores([tmp_path / "a", tmp_path / "b"], *args, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing started
    free["n"] = need
    F.write_stores([tmp_path / "a", tmp_path / "b"], *args, batch_size=2)
    # a partial store's bytes count as written: the rerun needs only the rest
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / "junk").write_bytes(b"x" * 1000)
    free["n"] = need - 1000
    with pytest.raises(ValueError, match="feature stores"):
        F.write_stores([tmp_path / "c", tmp_path / "d"], *args, batch_size=2)  # not resuming: all of it
    from swiftjax.methods.swift.features import _check_store_space

    _check_store_space([tmp_path / "c", tmp_path / "d"], specs, cfg, int(resp.sum()), resume=True)
