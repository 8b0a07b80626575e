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
from swiftjax.models.config import ModelConfig
from swiftjax.models.transformer import HiddenState, LayerProjection, Taps
from hf_tiny import ARCHS, tiny_hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param, seed=ARCHS.index(request.param))
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    model, cfg = swiftjax.load_model(d)
    return request.param, hf, model, cfg, d


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
