"""Flax ports vs transformers' PyTorch models on random tiny configs of every architecture."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import swiftjax
from swiftjax.models.cache import init_cache
from swiftjax.models.config import FULL, SLIDING, ModelConfig
from swiftjax.models.registry import create_model
from swiftjax.models.transformer import HiddenState, LayerProjection, Taps
from hf_tiny import ARCHS, WINDOWS, tiny_hf_config, tiny_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """arch -> (hf, model, cfg, dir), each built once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            hf = tiny_hf_model(arch, seed=ARCHS.index(arch))
            d = tmp_path_factory.mktemp(arch)
            hf.save_pretrained(d)
            model, cfg = swiftjax.load_model(d)
            cache[arch] = (hf, model, cfg, d)
        return cache[arch]

    return get


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, loaded):
    return (request.param, *loaded(request.param))


def _batch(seed=0, b=3, t=11, vocab=97, pads=(0, 3, 6)):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(b, t))
    mask = np.ones_like(ids)
    for r, p in enumerate(pads[:b]):
        mask[r, :p] = 0
    ids[mask == 0] = 0
    return ids, mask


def _torch_forward(hf, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_every_hidden_state_match_transformers(pair, padded):
    arch, hf, model, cfg, _ = pair
    ids, mask = _batch(pads=(0, 3, 6) if padded else (0, 0, 0))
    t_logits, t_states = _torch_forward(hf, ids, mask)
    out = model(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    valid = mask.astype(bool)
    assert out.logits.shape == t_logits.shape
    np.testing.assert_allclose(np.asarray(out.logits)[valid], t_logits[valid], atol=TOL, rtol=0)
    assert len(out.hidden_states) == cfg.num_layers + 1 == len(t_states)
    for i, (ours, ref) in enumerate(zip(out.hidden_states, t_states)):
        np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=TOL, rtol=0,
                                   err_msg=f"{arch} hidden state {i}")


def test_left_padding_gives_the_unpadded_outputs(pair):
    _, _, model, _, _ = pair
    ids, mask = _batch(pads=(0, 4, 0))
    padded = model(jnp.asarray(ids), jnp.asarray(mask)).logits[1, 4:]
    alone = model(jnp.asarray(ids[1:2, 4:])).logits[0]
    np.testing.assert_allclose(np.asarray(padded), np.asarray(alone), atol=1e-5)


def test_sliding_window_matters_and_matches():
    """The mistral fixture has window 5 < T: check that the window really changes outputs."""
    hf = tiny_hf_model("mistral")
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    assert cfg.sliding_window == 5
    from swiftjax.models.registry import create_model
    m = create_model(cfg, seed=3)
    ids = jnp.asarray(_batch(pads=(0, 0, 0))[0])
    a = m(ids).logits
    m.config = cfg.replace(sliding_window=None)
    b = m(ids).logits
    assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(a[:, :5]), np.asarray(b[:, :5]), atol=1e-6)


def _variant(model, cfg, **changes):
    """A model with ``cfg.replace(**changes)`` and ``model``'s weights (those it still has)."""
    m = create_model(cfg.replace(**changes))
    src = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    leaves = [(p, v.replace(src[p][...])) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))]
    nnx.update(m, nnx.from_flat_state(leaves))
    return m


# Each option of the newer ports, switched off (or, for Gemma 3's attention soft-cap, which
# transformers ignores, switched on), moves the logits away from transformers' by far more than
# TOL: so the parity tests above check every one of them.
OPTIONS = [
    ("qwen3", dict(qk_norm=False)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=None)),
    ("gemma2", dict(layer_types=(FULL,) * 3)),  # no sliding window
    ("gemma3", dict(rope_local_theta=None)),  # sliding blocks on the global RoPE
    ("gemma3", dict(rope_type="default", rope_scaling=())),  # global RoPE unscaled
    ("gemma3", dict(attn_logit_softcapping=0.5)),
    ("gemma3", dict(final_logit_softcapping=None)),
    ("gemma3", dict(layer_types=(SLIDING,) * 3)),  # the full block windowed too
    ("phi3", dict(sliding_window=None)),
    ("phi3", dict(rope_type="default", rope_scaling=())),  # no longrope factors / attention factor
]


@pytest.mark.parametrize("arch, changes", OPTIONS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_every_option_of_the_newer_ports_matters(loaded, arch, changes):
    hf, model, cfg, _ = loaded(arch)
    ids, mask = _batch(pads=(0, 3, 6))
    t_logits, _ = _torch_forward(hf, ids, mask)
    valid = mask.astype(bool)
    same = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)[valid]
    np.testing.assert_allclose(same, t_logits[valid], atol=TOL, rtol=0)
    other = np.asarray(_variant(model, cfg, **changes)(jnp.asarray(ids), jnp.asarray(mask)).logits)[valid]
    assert np.abs(other - t_logits[valid]).max() > 10 * TOL


def test_windows_and_layer_types_of_the_fixtures():
    """The parity tests run sequences longer than every window; Gemma alternates block types."""
    for arch, w in WINDOWS.items():
        cfg = ModelConfig.from_hf_dict(tiny_hf_config(arch).to_dict())
        assert cfg.sliding_window == w < 11
        kinds = [cfg.layer_type(i) for i in range(cfg.num_layers)]
        assert kinds == ([SLIDING, FULL, SLIDING] if arch.startswith("gemma") else [SLIDING] * 3), arch
    cfg = ModelConfig.from_hf_dict(tiny_hf_config("qwen3").to_dict())
    assert (cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == (16, True, False)
    assert cfg.head_dim * cfg.num_heads != cfg.hidden_size


def test_phi3_longrope_switches_to_long_factors_like_transformers(tmp_path):
    """original_max_position_embeddings 8: an 11-token forward uses the long factors, a 7-token
    one the short ones (transformers decides per forward from the largest position)."""
    import transformers
    torch.manual_seed(1)
    hcfg = transformers.Phi3Config.from_dict({**tiny_hf_config("phi3").to_dict(),
                                              "original_max_position_embeddings": 8})
    hf = transformers.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.08) if p.ndim > 1 else p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, cfg = swiftjax.load_model(tmp_path)
    assert cfg.rope_scaling_dict()["original_max_position_embeddings"] == 8
    ids, mask = _batch(pads=(0, 3, 6))
    logits = {}
    for t in (11, 7):  # largest position 10 (> 8: long factors) and 6 (short ones)
        t_logits, t_states = _torch_forward(hf, ids[:, :t], mask[:, :t])
        out = model(jnp.asarray(ids[:, :t]), jnp.asarray(mask[:, :t]), output_hidden_states=True)
        valid = mask[:, :t].astype(bool)
        np.testing.assert_allclose(np.asarray(out.logits)[valid], t_logits[valid], atol=TOL, rtol=0)
        for i, (ours, ref) in enumerate(zip(out.hidden_states, t_states)):
            np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=TOL, rtol=0, err_msg=f"state {i}")
        logits[t] = np.asarray(out.logits)[:, :7][mask[:, :7].astype(bool)]
    assert np.abs(logits[11] - logits[7]).max() > 10 * TOL  # same tokens and positions: the factor sets differ
    # a cache long enough to cross the switch would mix the two: refused (shapes only, nothing runs)
    run = lambda c: model(jnp.asarray(ids[:, :2]), cache=c).logits  # noqa: E731
    jax.eval_shape(run, init_cache(cfg, 3, 8))
    with pytest.raises(ValueError, match=r"cache: expected at most 8 slots \(original_max_position_embeddings\)"):
        jax.eval_shape(run, init_cache(cfg, 3, 9))


def test_kv_cache_decoding_equals_full_forward(pair):
    _, _, model, cfg, _ = pair
    ids, mask = _batch(seed=2, pads=(0, 2, 5))
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    t0 = 6
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 2)
    step = jax.jit(lambda m_state, x, mk, c: nnx.merge(gd, m_state)(x, mk, cache=c))
    gd, st = nnx.split(model)
    out = step(st, jnp.asarray(ids[:, :t0]), jnp.asarray(mask[:, :t0]), cache)
    got = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(t0, ids.shape[1]):
        out = step(st, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    got = np.concatenate(got, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)
    assert int(cache.cursor) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1))


def test_sown_states_and_projections(pair):
    _, _, model, cfg, _ = pair
    ids, mask = _batch(seed=4)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model(ids, mask, output_hidden_states=True).hidden_states
    layers = (0, 1, cfg.num_layers)
    _, inter = nnx.capture(model, HiddenState)(ids, mask, taps=Taps(layers=layers))
    flat = {k: v for k, v in nnx.to_pure_dict(inter).items()}
    assert sorted(flat) == [f"state_{i:03d}" for i in layers]
    for i in layers:
        np.testing.assert_allclose(np.asarray(flat[f"state_{i:03d}"][0]), np.asarray(full[i]), atol=1e-6)
    # projections through the final norm (apply_norm) equal normed states @ W
    rs = np.random.RandomState(0)
    ws = {i: jnp.asarray(rs.randn(cfg.hidden_size, 2).astype(np.float32)) for i in layers}
    _, inter = nnx.capture(model, LayerProjection)(ids, mask, taps=Taps(layers=layers, apply_norm=True),
                                                   projections=ws)
    flat = nnx.to_pure_dict(inter)
    for i in layers:
        ref = np.asarray(model.final_norm(full[i])) @ np.asarray(ws[i])
        np.testing.assert_allclose(np.asarray(flat[f"proj_{i:03d}"][0]), ref, atol=1e-4, rtol=1e-5)


def test_bf16_compute_is_close_to_float32(pair):
    _, _, model, _, d = pair
    m16, _ = swiftjax.load_model(d, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    ids, mask = _batch(seed=5, pads=(0, 0, 0))
    a = np.asarray(model(jnp.asarray(ids)).logits)
    b = np.asarray(m16(jnp.asarray(ids)).logits)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 0.05


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    _, _, model, cfg, d = pair
    with pytest.raises(ValueError, match="integer"):
        model(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="same shape"):
        model(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="taps.layers"):
        model(jnp.ones((1, 3), jnp.int32), taps=Taps(layers=(cfg.num_layers + 1,)))


def test_out_of_vocab_ids_raise_when_eager(pair):
    _, _, model, cfg, _ = pair
    v = cfg.vocab_size
    ids, mask = _batch(pads=(0, 3, 6))
    for bad in (v, v + 5, -1):
        big = ids.copy()
        big[1, 5] = bad
        with pytest.raises(ValueError, match=rf"input_ids: expected token ids in \[0, {v}\), got {bad} at \[1, 5\]"):
            model(jnp.asarray(big), jnp.asarray(mask))
        with pytest.raises(ValueError, match="expected token ids"):
            model(big, mask)  # numpy inputs too
    padded = ids.copy()
    padded[2, 0] = v  # under attention_mask 0: never read, allowed
    out = model(jnp.asarray(padded), jnp.asarray(mask))
    assert np.isfinite(np.asarray(out.logits)[mask.astype(bool)]).all()
    # under jit the ids are tracers: no host check, no error
    graphdef, state = nnx.split(model)
    traced = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m).logits)(state, jnp.asarray(ids), jnp.asarray(mask))
    assert traced.shape == (3, 11, v)


def test_missing_and_extra_weights_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    w = load_file(str(tmp_path / "model.safetensors"))
    w.pop("model.layers.1.mlp.up_proj.weight")
    w["model.layers.9.bogus.weight"] = np.zeros(3, np.float32)
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing weights: \['model.layers.1.mlp.up_proj.weight'\].*"
                                         r"unexpected weights: \['model.layers.9.bogus.weight'\]"):
        swiftjax.load_model(tmp_path)


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'.*llama, mistral, qwen2, gpt2"):
        swiftjax.load_model(tmp_path)
    with pytest.raises(ValueError, match="expected a directory"):
        swiftjax.load_model(tmp_path / "nope")


def test_sharded_checkpoint_loads(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = swiftjax.load_model(tmp_path)
    ids, mask = _batch(seed=6)
    t_logits, _ = _torch_forward(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)[valid],
                               t_logits[valid], atol=TOL)


def test_save_model_round_trips_through_transformers(pair, tmp_path):
    arch, hf, model, cfg, _ = pair
    from swiftjax.models.load import save_model
    import transformers
    out = save_model(model, cfg, tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float()
    ids, mask = _batch(seed=7)
    a, _ = _torch_forward(back, ids, mask)
    b, _ = _torch_forward(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(a[valid], b[valid], atol=1e-6)
    with pytest.raises(ValueError, match="not empty"):
        save_model(model, cfg, out)
