"""Conventional reward model: last-token embedding, BT loss, label flipping, training."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from swiftjax.methods.ebrm import reward_model as rmm
from swiftjax.models.config import ModelConfig
from swiftjax.models.registry import create_model

VOCAB = 24


def tiny_lm(seed=0, layers=2):
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, num_layers=layers, num_heads=2,
                      num_kv_heads=2, head_dim=8, intermediate_size=32, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return create_model(cfg, seed=seed)


def final_hidden(lm, ids, mask):
    """The LM's final-normed hidden states [B, T, D] (jitted: op-by-op eager is slow on CPU)."""
    graphdef, state = nnx.split(lm)
    fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m, output_hidden_states=True).hidden_states[-1])
    return np.asarray(fn(state, jnp.asarray(ids), jnp.asarray(mask)))


def right_padded(rng, lengths, t):
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, VOCAB, n)
        mask[i, :n] = 1
    return ids, mask


# ----------------------------------------------------------------------------- forward


def test_rm_forward_picks_last_non_pad_token():
    rng = np.random.default_rng(0)
    model = rmm.init_reward_model(tiny_lm(), seed=3, head_init_std=0.5)
    lengths = [9, 1, 5, 9, 3]
    ids, mask = right_padded(rng, lengths, 9)
    r, e = rmm.rm_forward(model, ids, mask)
    assert r.shape == (5,) and e.shape == (5, 16)
    # reference 1: the model's own final-normed hidden states, last real position by a loop
    h = final_hidden(model.lm, ids, mask)
    w = np.asarray(model.head.kernel.value, np.float64)[:, 0]
    b = float(np.asarray(model.head.bias.value)[0])
    for i, n in enumerate(lengths):
        last = max(j for j in range(9) if mask[i, j] == 1)
        assert last == n - 1
        np.testing.assert_allclose(np.asarray(e[i]), h[i, last], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(r[i]), h[i, last].astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)
    # reference 2: each row alone, without padding, read at its final position
    for i in (1, 2):  # lengths 1 and 5
        n = lengths[i]
        h_alone = final_hidden(model.lm, ids[i:i + 1, :n], np.ones((1, n), np.int32))[0, -1]
        np.testing.assert_allclose(np.asarray(e[i]), h_alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(rmm.last_token_index(mask)), np.array(lengths) - 1)


def test_score_responses_matches_forward_in_batches():
    rng = np.random.default_rng(1)
    model = rmm.init_reward_model(tiny_lm(), seed=0, head_init_std=0.3)
    ids, mask = right_padded(rng, rng.integers(1, 8, 11), 8)
    r_ref, e_ref = rmm.rm_forward(model, ids, mask)
    r, e = rmm.score_responses(model, ids, mask, batch_size=4)  # 3 batches, the last padded
    assert r.shape == (11,) and e.shape == (11, 16)
    np.testing.assert_allclose(r, np.asarray(r_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e, np.asarray(e_ref), rtol=1e-5, atol=1e-6)


def test_rm_forward_bad_inputs():
    model = rmm.init_reward_model(tiny_lm(), seed=0)
    ids = np.ones((2, 4), np.int32)
    left = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    with pytest.raises(ValueError, match="right padding"):
        rmm.rm_forward(model, ids, left)
    with pytest.raises(ValueError, match="at least one token"):
        rmm.rm_forward(model, ids, np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int32))
    with pytest.raises(ValueError, match="integer"):
        rmm.rm_forward(model, ids.astype(np.float32), np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="same shape"):
        rmm.rm_forward(model, ids, np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="RewardModel"):
        rmm.rm_forward(model.lm, ids, np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="DecoderLM"):
        rmm.init_reward_model(object())


# ----------------------------------------------------------------------------- loss


def test_bt_loss_and_accuracy_match_numpy():
    rng = np.random.default_rng(2)
    rc = rng.normal(size=37).astype(np.float32) * 3
    rr = rng.normal(size=37).astype(np.float32) * 3
    rr[:4] = rc[:4]  # ties count wrong
    d = rc.astype(np.float64) - rr.astype(np.float64)
    ref = np.mean(-np.log(1.0 / (1.0 + np.exp(-d))))
    np.testing.assert_allclose(float(rmm.bt_loss(rc, rr)), ref, rtol=1e-5, atol=1e-6)
    ref_acc = np.mean([1.0 if a > b else 0.0 for a, b in zip(rc, rr)])
    np.testing.assert_allclose(float(rmm.pair_accuracy(rc, rr)), ref_acc, rtol=1e-6)
    # large margins: no overflow
    assert np.isfinite(float(rmm.bt_loss(np.array([-200.0], np.float32), np.array([200.0], np.float32))))
    with pytest.raises(ValueError, match="same shape"):
        rmm.bt_loss(rc, rr[:3])
    with pytest.raises(ValueError, match="floating"):
        rmm.bt_loss(np.ones(3, np.int32), np.ones(3, np.int32))
    with pytest.raises(ValueError, match="at least one pair"):
        rmm.bt_loss(np.zeros(0, np.float32), np.zeros(0, np.float32))


def test_rm_pair_loss_equals_bt_of_forward():
    rng = np.random.default_rng(3)
    model = rmm.init_reward_model(tiny_lm(), seed=1, head_init_std=0.5)
    ids, mask = right_padded(rng, [3, 6, 2, 6, 4, 5], 6)
    batch = {"ids_c": ids[:3], "attn_c": mask[:3], "ids_r": ids[3:], "attn_r": mask[3:]}
    graphdef, state = nnx.split(model)
    loss_fn = jax.jit(lambda st, b: rmm.rm_pair_loss(nnx.merge(graphdef, st), b))
    loss, aux = loss_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
    r, _ = rmm.rm_forward(model, ids, mask)
    r = np.asarray(r, np.float64)
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-(r[:3] - r[3:])))), rtol=1e-5)
    np.testing.assert_allclose(float(aux["acc"]), np.mean(r[:3] > r[3:]), rtol=1e-6)


# ----------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("n,frac", [(0, 0.3), (1, 0.4), (10, 0.2), (37, 0.4), (100, 0.0), (53, 1.0)])
def test_flip_pairs_flips_exact_fraction(n, frac):
    rng = np.random.default_rng(n)
    pairs = rng.integers(0, 1000, size=(n, 2))
    noisy, flipped = rmm.flip_pairs(pairs, frac, seed=5)
    assert flipped.dtype == bool and flipped.shape == (n,)
    assert flipped.sum() == int(round(frac * n))
    np.testing.assert_array_equal(noisy[flipped], pairs[flipped][:, ::-1])
    np.testing.assert_array_equal(noisy[~flipped], pairs[~flipped])
    again, f2 = rmm.flip_pairs(pairs, frac, seed=5)
    np.testing.assert_array_equal(f2, flipped)
    np.testing.assert_array_equal(again, noisy)


def test_flip_bad_inputs():
    with pytest.raises(ValueError, match="frac"):
        rmm.flip_mask(10, 1.5, 0)
    with pytest.raises(ValueError, match="frac"):
        rmm.flip_mask(10, "a", 0)
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        rmm.flip_pairs(np.zeros((4, 3), np.int64), 0.2, 0)
    with pytest.raises(ValueError, match="integer"):
        rmm.flip_pairs(np.zeros((4, 2), np.float32), 0.2, 0)
    with pytest.raises(ValueError, match="row indices"):
        rmm.check_pairs(np.array([[0, 5]]), n_rows=5)


# ----------------------------------------------------------------------------- training


def separable_set(rng, n_pairs, t=6):
    """Chosen responses end in token 5, rejected ones in token 6 (random prefixes, lengths)."""
    lengths = rng.integers(2, t + 1, 2 * n_pairs)
    ids, mask = right_padded(rng, lengths, t)
    ids[np.arange(2 * n_pairs), lengths - 1] = np.where(np.arange(2 * n_pairs) < n_pairs, 5, 6)
    pairs = np.stack([np.arange(n_pairs), np.arange(n_pairs) + n_pairs], axis=1)
    return ids, mask, pairs


def pair_acc(model, ids, mask, pairs):
    r, _ = rmm.score_responses(model, ids, mask, batch_size=64)
    return float(np.mean(r[pairs[:, 0]] > r[pairs[:, 1]]))


def test_training_on_separable_pairs_raises_accuracy_and_freezes_body():
    rng = np.random.default_rng(4)
    ids, mask, pairs = separable_set(rng, 32)
    model = rmm.init_reward_model(tiny_lm(seed=2), seed=0, head_init_std=0.02)
    # start from a head that prefers the rejected responses
    r0, e0 = rmm.score_responses(model, ids, mask)
    direction = e0[pairs[:, 1]].mean(0) - e0[pairs[:, 0]].mean(0)
    model.head.kernel.value = jnp.asarray(direction[:, None] / np.linalg.norm(direction), jnp.float32)
    before = pair_acc(model, ids, mask, pairs)
    assert before < 0.5
    body_before = jax.tree.map(np.asarray, nnx.state(model.lm, nnx.Param))
    cfg = rmm.RMTrainConfig(lr=3e-2, batch_size=16, epochs=None, max_steps=30, train_last_layers=1, seed=0)
    trained, res = rmm.train_reward_model(model, ids, mask, pairs, cfg)
    after = pair_acc(trained, ids, mask, pairs)
    assert res.steps == 30
    assert after >= 0.9 and after > before
    # the input model is untouched; only the head, the last block and the final norm moved
    assert pair_acc(model, ids, mask, pairs) == before
    flat_before = dict(nnx.to_flat_state(body_before))
    moved = []
    for path, var in nnx.to_flat_state(nnx.state(trained.lm, nnx.Param)):
        same = np.array_equal(np.asarray(var.value), np.asarray(flat_before[path].value))
        trainable = path[:3] == ("model", "layers", 1) or path[:2] == ("model", "norm")
        if trainable:
            moved.append(not same)
        else:
            assert same, path
    assert moved and all(moved)


def test_trainable_filter_selection():
    model = rmm.init_reward_model(tiny_lm(layers=3), seed=0)

    def names(flt):
        _, t, _ = nnx.split(model, flt, ...)
        return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(t)}

    head_only = names(rmm.trainable_filter(model, 0))
    assert head_only == {"head/kernel", "head/bias"}
    last2 = names(rmm.trainable_filter(model, 2))
    assert {p.split("/")[3] for p in last2 if p.startswith("lm/model/layers/")} == {"1", "2"}
    assert "lm/model/norm/weight" in last2 or any(p.startswith("lm/model/norm") for p in last2)
    assert not any(p.startswith("lm/model/embed_tokens") for p in last2)
    assert rmm.trainable_filter(model, None) is nnx.Param
    with pytest.raises(ValueError, match="train_last_layers"):
        rmm.trainable_filter(model, 4)
