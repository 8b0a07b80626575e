"""LoRA adapters: identity at init, numpy reference of the adapted forward, merge, save/load,
and that only adapters are trained through loop.nnx_split(wrt=nnx.LoRAParam)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import swiftjax
from swiftjax.methods.genarm import lora
from swiftjax.models.config import ModelConfig
from swiftjax.models.layers import Linear
from swiftjax.models.load import save_model
from swiftjax.models.registry import create_model
from swiftjax.train import loop

LLAMA = ModelConfig(model_type="llama", vocab_size=53, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=48, qkv_bias=True, o_bias=True)
GPT2 = ModelConfig(model_type="gpt2", vocab_size=53, hidden_size=32, num_layers=2, num_heads=4,
                   num_kv_heads=4, head_dim=8, intermediate_size=64, qkv_bias=True, o_bias=True,
                   mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64,
                   hidden_act="gelu_new", norm_eps=1e-5)
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
PHI3 = ModelConfig(model_type="phi3", vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, intermediate_size=48)  # fused qkv_proj / gate_up_proj


def _ids(b=3, t=6, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 53, size=(b, t))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _randomize_b(model, seed=1):
    for i, (_, m) in enumerate(lora.lora_modules(model)):
        m.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def _flat_params(model, filt=nnx.Param):
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


@pytest.mark.parametrize("cfg,targets", [(LLAMA, lora.DEFAULT_TARGETS), (GPT2, GPT2_TARGETS),
                                         (PHI3, lora.DEFAULT_TARGETS)])
def test_zero_b_is_identity_and_numpy_reference(cfg, targets):
    ids, mask = _ids()
    model = create_model(cfg, seed=0)
    ref_model = create_model(cfg, seed=0)
    y0 = np.asarray(model(ids, mask).logits)
    lora.apply_lora(model, rank=4, alpha=8.0, targets=targets, rngs=nnx.Rngs(5))
    n_adapted = len(lora.lora_modules(model))
    # llama: 7 projections a layer; gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj; phi3: qkv, o, gate_up, down
    assert n_adapted == cfg.num_layers * (7 if cfg.model_type == "llama" else 4)
    np.testing.assert_array_equal(np.asarray(model(ids, mask).logits), y0)

    # after "training": dense numpy weights W + (alpha/r) A B in the module's layout
    _randomize_b(model)
    dense = {}
    for path, m in lora.lora_modules(model):
        a, b = np.asarray(m.lora_a[...], np.float64), np.asarray(m.lora_b[...], np.float64)
        upd = (8.0 / 4) * a @ b  # [in, out]
        w = np.asarray(m.weight[...], np.float64)
        dense[".".join(map(str, path)) + ".weight"] = (w + (upd.T if m.layout == "out_in" else upd)).astype(np.float32)
    flat = []
    for p, v in nnx.to_flat_state(nnx.state(ref_model, nnx.Param)):
        key = ".".join(map(str, p))
        flat.append((p, v.replace(jnp.asarray(dense[key])) if key in dense else v))
    nnx.update(ref_model, nnx.from_flat_state(flat))
    np.testing.assert_allclose(np.asarray(model(ids, mask).logits), np.asarray(ref_model(ids, mask).logits),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_lora_linear_matches_numpy(layout):
    lin = Linear(12, 7, bias=True, rngs=nnx.Rngs(0), layout=layout)
    lin.bias[...] = jax.random.normal(jax.random.key(2), (7,))

    class Holder(nnx.Module):
        def __init__(self):
            self.q_proj = lin

    h = Holder()
    lora.apply_lora(h, rank=3, alpha=6.0, targets=("q_proj",), rngs=1, init="gaussian")
    m = h.q_proj
    assert isinstance(m, lora.LoRALinear)
    m.lora_b[...] = jax.random.normal(jax.random.key(3), (3, 7))
    x = np.random.RandomState(4).randn(2, 5, 12).astype(np.float32)
    w = np.asarray(m.weight[...], np.float64)
    w_io = w.T if layout == "out_in" else w
    ref = x @ w_io + np.asarray(m.bias[...]) + 2.0 * (x @ np.asarray(m.lora_a[...], np.float64)) @ np.asarray(
        m.lora_b[...], np.float64)
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), ref, atol=1e-5, rtol=1e-5)


def test_init_distributions():
    lin = Linear(400, 64, bias=False, rngs=nnx.Rngs(0))

    class Holder(nnx.Module):
        def __init__(self):
            self.v_proj = lin

    h = Holder()
    lora.apply_lora(h, rank=16, alpha=16.0, targets=("v_proj",), rngs=0)
    a = np.asarray(h.v_proj.lora_a[...])
    assert a.shape == (400, 16) and np.abs(a).max() <= 1 / np.sqrt(400)
    assert np.std(a) == pytest.approx(1 / np.sqrt(400) / np.sqrt(3), rel=0.05)  # uniform(-b, b)
    assert np.all(np.asarray(h.v_proj.lora_b[...]) == 0) and h.v_proj.lora_b.shape == (16, 64)


def test_merge_equals_unmerged_and_saves_plain_checkpoint(tmp_path):
    ids, mask = _ids()
    model = create_model(LLAMA, seed=0)
    plain_keys = set(_flat_params(model))
    lora.apply_lora(model, rank=4, alpha=16.0, rngs=3)
    _randomize_b(model, seed=7)
    y = np.asarray(model(ids, mask).logits)
    lora.merge_lora(model)
    assert not lora.lora_modules(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert set(_flat_params(model)) == plain_keys
    np.testing.assert_allclose(np.asarray(model(ids, mask).logits), y, atol=2e-5, rtol=1e-5)
    save_model(model, LLAMA, tmp_path / "m")
    loaded, _ = swiftjax.load_model(tmp_path / "m")
    np.testing.assert_allclose(np.asarray(loaded(ids, mask).logits), y, atol=2e-5, rtol=1e-5)
    # a merged model can be adapted again
    lora.apply_lora(model, rank=2, alpha=2.0, targets=("q_proj",), rngs=0)
    assert len(lora.lora_modules(model)) == LLAMA.num_layers


def test_only_lora_params_are_trained():
    ids, mask = _ids(b=4, t=8)
    model = create_model(LLAMA, seed=0)
    lora.apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), rngs=0)
    graphdef, trainable, frozen = loop.nnx_split(model, wrt=nnx.LoRAParam)
    keys = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    assert keys and all(k.endswith(("lora_a", "lora_b")) for k in keys)
    assert len(keys) == 2 * 3 * LLAMA.num_layers

    def fn(m, batch, rng):
        logits = m(batch["ids"], batch["mask"]).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, batch["ids"][..., None], -1)[..., 0]), {}

    loss_fn = loop.nnx_loss(graphdef, fn)
    batch = {"ids": ids, "mask": mask}
    grads = jax.grad(lambda p: loss_fn(p, batch, None, frozen)[0])(trainable)
    g = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    for k, v in g.items():
        if k.endswith("lora_a"):
            np.testing.assert_array_equal(v, 0.0)  # B = 0 at init: no gradient reaches A yet
        else:
            assert np.abs(v).max() > 0
    frozen_before = jax.tree.map(np.asarray, jax.tree.leaves(frozen))
    tx = loop.make_optimizer(loop.OptimizerConfig(lr=1e-2))
    state = loop.init_state(jax.tree.map(jnp.copy, trainable), tx, 0, frozen=frozen)
    step = loop.make_train_step(loss_fn, tx)
    for _ in range(3):
        state, _ = step(state, batch)
    for a, b in zip(frozen_before, jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    trained = loop.nnx_merge(graphdef, state.params, state.frozen)
    assert any(np.abs(np.asarray(m.lora_b[...])).max() > 0 for _, m in lora.lora_modules(trained))


def test_dropout_only_with_a_key():
    ids, mask = _ids()
    model = create_model(LLAMA, seed=0)
    lora.apply_lora(model, rank=4, alpha=8.0, rngs=0, dropout=0.5)
    _randomize_b(model)
    y = np.asarray(model(ids, mask).logits)
    graphdef, state = nnx.split(model)

    def fwd(st, key):
        m = nnx.merge(graphdef, st)
        f = lora.with_lora_dropout(lambda mm, b, r: (mm(ids, mask).logits, {}))
        return f(m, None, key)[0]

    y1 = np.asarray(jax.jit(fwd)(state, jax.random.key(1)))
    y1b = np.asarray(jax.jit(fwd)(state, jax.random.key(1)))
    y2 = np.asarray(jax.jit(fwd)(state, jax.random.key(2)))
    assert np.abs(y1 - y).max() > 1e-4 and np.abs(y1 - y2).max() > 1e-4
    np.testing.assert_array_equal(y1, y1b)
    np.testing.assert_array_equal(np.asarray(model(ids, mask).logits), y)  # outside: no dropout
    np.testing.assert_allclose(np.asarray(jax.jit(fwd)(state, None)), y, atol=1e-6)  # jit vs eager rounding


def test_bad_inputs():
    model = create_model(LLAMA, seed=0)
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(model, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(model, rank=33, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        lora.apply_lora(model, rank=2, alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        lora.apply_lora(model, rank=2, alpha=1.0, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        lora.apply_lora(model, rank=2, alpha=1.0, init="xavier")
    with pytest.raises(ValueError, match="match no Linear"):
        lora.apply_lora(model, rank=2, alpha=1.0, targets=("c_attn",))
    with pytest.raises(ValueError, match="targets"):
        lora.apply_lora(model, rank=2, alpha=1.0, targets="q_proj")
    with pytest.raises(ValueError, match="model"):
        lora.apply_lora({"w": 1}, rank=2, alpha=1.0)
    with pytest.raises(ValueError, match="found none"):
        lora.merge_lora(model)
    lora.apply_lora(model, rank=2, alpha=1.0)
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(model, rank=2, alpha=1.0)
