"""SWIFT head, pooling, fused/running paths, losses and logits features vs plain numpy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.methods.swift import head as swift

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------- numpy references


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_project(kernel, bias, x):
    return np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)


def np_score(kernel, bias, x, mask):
    """Loop-free reference written straight from the spec's formulas, float64."""
    proj = np_project(kernel, bias, x)
    m = np.asarray(mask, np.float64)
    out = np.zeros(proj.shape[0])
    for b in range(proj.shape[0]):
        if proj.shape[-1] == 2:
            g = np_sigmoid(proj[b, :, 0])
            r = proj[b, :, 1]
            out[b] = np.sum(g * r * m[b]) / max(np.sum(g * m[b]), 1e-8)
        else:
            r = proj[b, :, 0]
            out[b] = np.sum(r * m[b]) / max(np.sum(m[b]), 1.0)
    return out


def np_softmax(x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_ce(s, c):
    s = np.asarray(s, np.float64).ravel()
    c = np.asarray(c, np.float64).ravel()
    return np.mean(-(c * np_log_sigmoid(s) + (1 - c) * np_log_sigmoid(-s)))


def np_hinge(s, c):
    s = np.asarray(s, np.float64).ravel()
    c = np.asarray(c, np.float64).ravel()
    return np.mean(np.maximum(0.0, 1.0 - (2 * c - 1) * s))


def np_dpo(s, c, gid):
    losses = []
    for i in range(len(s)):
        for j in range(len(s)):
            if gid[i] == gid[j] and c[i] == 1 and c[j] == 0:
                losses.append(-np_log_sigmoid(float(s[i]) - float(s[j])))
    return float(np.mean(losses)) if losses else 0.0


def np_infonca(s, c, alpha):
    s = np.asarray(s, np.float64)
    w = np_softmax(np.asarray(c, np.float64) / alpha)
    return np.mean(-np.sum(w * np_log_softmax(s), axis=-1))


def np_nca(s, c, alpha):
    s = np.asarray(s, np.float64)
    k = s.shape[-1]
    w = np_softmax(np.asarray(c, np.float64) / alpha)
    return np.mean(-np.sum(w * np_log_sigmoid(s) + np_log_sigmoid(-s) / k, axis=-1))


# ----------------------------------------------------------------------------- helpers


def rand_params(rng, f, gated=True, scale=1.0):
    c = 2 if gated else 1
    return {
        "kernel": jnp.asarray(rng.normal(size=(f, c)) * scale / np.sqrt(f), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(c,)), jnp.float32),
    }


def rand_mask(rng, b, t, empty_rows=(1,)):
    lengths = rng.integers(1, t + 1, size=b)
    starts = rng.integers(0, t, size=b)
    m = np.zeros((b, t), np.float32)
    for i in range(b):
        m[i, starts[i] : starts[i] + lengths[i]] = 1.0
    for i in empty_rows:
        m[i] = 0.0
    return m


def rand_labels(rng, shape):
    return (rng.random(shape) < 0.5).astype(np.float32)


# ----------------------------------------------------------------------------- init


@pytest.mark.parametrize("gated", [True, False])
def test_init_shapes_and_bounds(gated):
    f = 4096
    p = swift.init_params(jax.random.key(0), f, gated=gated)
    c = 2 if gated else 1
    assert p["kernel"].shape == (f, c) and p["bias"].shape == (c,)
    assert p["kernel"].dtype == jnp.float32 and p["bias"].dtype == jnp.float32
    bound = 1.0 / np.sqrt(f)
    k = np.asarray(p["kernel"])
    assert np.all(np.abs(k) <= bound) and np.all(np.abs(np.asarray(p["bias"])) <= bound)
    # U(-a, a): mean 0, variance a^2 / 3, extremes close to +-a
    n = k.size
    assert abs(k.mean()) < 4 * bound / np.sqrt(3 * n)
    assert abs(k.var() / (bound**2 / 3) - 1) < 0.05
    assert k.max() > 0.99 * bound and k.min() < -0.99 * bound
    assert swift.num_params(p) == c * f + c
    assert swift.is_gated(p) is gated
    q = swift.init_params(jax.random.key(1), f, gated=gated)
    assert not np.allclose(np.asarray(q["kernel"]), k)


def test_num_params_matches_spec_count():
    p = swift.init_params(jax.random.key(0), 33 * 64)  # the spec's 33 states, small width
    assert swift.num_params(p) == 2 * 33 * 64 + 2


# ----------------------------------------------------------------------------- token scores, score


@pytest.mark.parametrize("gated", [True, False])
def test_token_scores_vs_numpy(gated):
    rng = np.random.default_rng(1)
    p = rand_params(rng, 24, gated)
    x = rng.normal(size=(3, 7, 24)).astype(np.float32)
    gate, reward = swift.token_scores(p, jnp.asarray(x))
    proj = np_project(p["kernel"], p["bias"], x)
    if gated:
        np.testing.assert_allclose(gate, np_sigmoid(proj[..., 0]), rtol=RTOL, atol=ATOL)
        assert np.all((np.asarray(gate) > 0) & (np.asarray(gate) < 1))
        np.testing.assert_allclose(reward, proj[..., 1], rtol=RTOL, atol=ATOL)
    else:
        assert gate is None
        np.testing.assert_allclose(reward, proj[..., 0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gated", [True, False])
def test_score_vs_numpy_with_empty_rows(gated):
    rng = np.random.default_rng(2)
    b, t, f = 6, 11, 20
    p = rand_params(rng, f, gated)
    x = rng.normal(size=(b, t, f)).astype(np.float32)
    m = rand_mask(rng, b, t, empty_rows=(1, 4))
    got = np.asarray(swift.score(p, jnp.asarray(x), jnp.asarray(m)))
    want = np_score(p["kernel"], p["bias"], x, m)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert got[1] == 0.0 and got[4] == 0.0
    # bool and int masks mean the same
    np.testing.assert_allclose(swift.score(p, x, m.astype(bool)), got, rtol=0, atol=0)
    np.testing.assert_allclose(swift.score(p, x, m.astype(np.int32)), got, rtol=0, atol=0)
    # shared formula on explicit projections
    proj = swift.project(p, x)
    np.testing.assert_allclose(swift.score_from_projections(proj, m), got, rtol=0, atol=0)
    if gated:  # small gates: sum g m << 1, where the 1e-8 floor (not 1) matters
        q = {"kernel": p["kernel"], "bias": p["bias"].at[0].set(-6.0)}
        den = (np_sigmoid(np_project(q["kernel"], q["bias"], x)[..., 0]) * m).sum(1)
        assert np.all(den[m.sum(1) > 0] < 0.1)
        np.testing.assert_allclose(swift.score(q, x, m), np_score(q["kernel"], q["bias"], x, m), rtol=RTOL, atol=ATOL)


def test_score_ignores_masked_tokens_and_bf16_features():
    rng = np.random.default_rng(3)
    p = rand_params(rng, 16)
    x = rng.normal(size=(2, 9, 16)).astype(np.float32)
    m = rand_mask(rng, 2, 9, empty_rows=())
    y = x.copy()
    y[m == 0] = rng.normal(size=((m == 0).sum(), 16)) * 100
    np.testing.assert_allclose(swift.score(p, x, m), swift.score(p, y, m), rtol=1e-6, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    want = np_score(p["kernel"], p["bias"], np.asarray(xb.astype(jnp.float32)), m)
    np.testing.assert_allclose(swift.score(p, xb, m), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("gated", [True, False])
def test_nan_or_inf_at_masked_positions_contributes_nothing(gated, poison):
    rng = np.random.default_rng(13)
    b, t, f = 3, 7, 10
    p = rand_params(rng, f, gated)
    x = rng.normal(size=(b, t, f)).astype(np.float32)
    m = rand_mask(rng, b, t, empty_rows=(2,))
    y = x.copy()
    y[m == 0] = poison
    for fn in (swift.score, swift.pooled_features):
        clean = np.asarray(fn(p, x, m))
        got = np.asarray(fn(p, y, m))
        assert np.all(np.isfinite(got)), fn.__name__
        np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-6, err_msg=fn.__name__)
        np.testing.assert_allclose(fn(p, y, m.astype(bool)), clean, rtol=1e-6, atol=1e-6)
    # gradients of a loss through the score (what training takes)
    labels = jnp.asarray((np.arange(b) % 2).astype(np.float32))
    grad = lambda feats: jax.grad(lambda q: swift.loss_ce(swift.score(q, feats, m), labels))(p)
    for gc, gy in zip(jax.tree_util.tree_leaves(grad(x)), jax.tree_util.tree_leaves(grad(y))):
        assert np.all(np.isfinite(np.asarray(gy)))
        np.testing.assert_allclose(gy, gc, rtol=1e-5, atol=1e-6)
    # projections: score_from_projections and the running score
    proj = np.asarray(swift.project(p, x))
    bad = proj.copy()
    bad[m == 0] = poison
    want = np.asarray(swift.score_from_projections(proj, m))
    np.testing.assert_allclose(swift.score_from_projections(bad, m), want, rtol=1e-6, atol=1e-6)
    state = swift.running_score_init(b, gated=gated)
    for i in range(t):
        state = swift.running_score_update(state, jnp.asarray(bad[:, i]), jnp.asarray(m[:, i]))
    np.testing.assert_allclose(swift.running_score_value(state), want, rtol=1e-5, atol=1e-6)


def test_listwise_losses_ignore_zero_weight_candidates_at_minus_inf():
    s = np.array([[2.0, -np.inf, 0.5]], np.float32)  # candidate 1: weight 0, log-prob -inf
    c = np.array([[1.0, 0.0, 1.0]], np.float32)
    ref = np.array([[2.0, 0.5]], np.float32), np.array([[1.0, 1.0]], np.float32)
    for name in ("infonca", "nca"):  # traced (as in training): the eager finite-score check is off
        fn = jax.jit(swift.loss_fn(name, alpha=1e-3))
        got = float(fn(jnp.asarray(s), jnp.asarray(c)))
        assert np.isfinite(got), name
        if name == "infonca":
            np.testing.assert_allclose(got, float(fn(*map(jnp.asarray, ref))), rtol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
def test_score_gradients_finite_with_empty_row(gated):
    rng = np.random.default_rng(4)
    p = rand_params(rng, 8, gated)
    x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    m = jnp.asarray(rand_mask(rng, 3, 5, empty_rows=(0,)))
    g = jax.grad(lambda q: jnp.sum(swift.score(q, x, m)))(p)
    for leaf in jax.tree_util.tree_leaves(g):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_score_under_jit_matches_eager():
    rng = np.random.default_rng(5)
    p = rand_params(rng, 8)
    x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
    m = jnp.asarray(rand_mask(rng, 3, 5))
    np.testing.assert_allclose(jax.jit(swift.score)(p, x, m), swift.score(p, x, m), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gated", [True, False])
def test_pooled_features_vs_numpy_and_linear_identity(gated):
    rng = np.random.default_rng(6)
    b, t, f = 5, 8, 12
    p = rand_params(rng, f, gated)
    x = rng.normal(size=(b, t, f)).astype(np.float32)
    m = rand_mask(rng, b, t, empty_rows=(2,))
    proj = np_project(p["kernel"], p["bias"], x)
    w = np_sigmoid(proj[..., 0]) * m if gated else m.astype(np.float64)
    floor = 1e-8 if gated else 1.0
    want = np.einsum("bt,btf->bf", w, x) / np.maximum(w.sum(1), floor)[:, None]
    got = np.asarray(swift.pooled_features(p, x, m))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # score == pooled . w_r + b_r for rows with a non-empty mask
    s = np.asarray(swift.score(p, x, m))
    lin = got @ np.asarray(p["kernel"][:, -1], np.float64) + float(p["bias"][-1])
    keep = m.sum(1) > 0
    np.testing.assert_allclose(s[keep], lin[keep], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- fused path


@pytest.mark.parametrize("gated", [True, False])
def test_split_kernel_consistency(gated):
    rng = np.random.default_rng(7)
    dims = (4, 6, 2)
    f = sum(dims)
    p = rand_params(rng, f, gated)
    x = rng.normal(size=(3, 5, f)).astype(np.float32)
    blocks = swift.split_kernel(p, dims)
    assert [blk.shape for blk in blocks] == [(d, p["kernel"].shape[1]) for d in dims]
    parts = np.split(x, np.cumsum(dims)[:-1], axis=-1)
    fused = sum(np_project(blk, np.zeros(blk.shape[1]), h) for blk, h in zip(blocks, parts))
    fused = fused + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(fused, np_project(p["kernel"], p["bias"], x), rtol=1e-6, atol=1e-6)
    # the library's fused projection and its score agree with the concatenated path
    pl = swift.project_layers(p, [jnp.asarray(h) for h in parts])
    np.testing.assert_allclose(pl, swift.project(p, x), rtol=1e-5, atol=1e-6)
    m = rand_mask(rng, 3, 5)
    np.testing.assert_allclose(
        swift.score_from_projections(pl, m), np_score(p["kernel"], p["bias"], x, m), rtol=RTOL, atol=ATOL
    )


def test_split_kernel_equal_width_int():
    rng = np.random.default_rng(8)
    p = rand_params(rng, 12)
    blocks = swift.split_kernel(p, 4)
    assert len(blocks) == 3
    np.testing.assert_array_equal(np.concatenate([np.asarray(b) for b in blocks]), np.asarray(p["kernel"]))
    with pytest.raises(ValueError, match="layer_dims"):
        swift.split_kernel(p, 5)
    with pytest.raises(ValueError, match="layer_dims"):
        swift.split_kernel(p, (4, 4))
    with pytest.raises(ValueError, match="layer_dims"):
        swift.split_kernel(p, (16, -4))


# ----------------------------------------------------------------------------- running score


@pytest.mark.parametrize("gated", [True, False])
def test_running_score_equals_score(gated):
    rng = np.random.default_rng(9)
    b, t, f = 4, 13, 10
    p = rand_params(rng, f, gated)
    x = jnp.asarray(rng.normal(size=(b, t, f)), jnp.float32)
    m = jnp.asarray(rand_mask(rng, b, t, empty_rows=(3,)))
    proj = swift.project(p, x)
    state = swift.running_score_init(b, gated=gated)
    np.testing.assert_array_equal(swift.running_score_value(state), np.zeros(b))
    for i in range(t):
        state = swift.running_score_update(state, proj[:, i], m[:, i])
        # partial score == score of the prefix
        want = np_score(p["kernel"], p["bias"], np.asarray(x)[:, : i + 1], np.asarray(m)[:, : i + 1])
        np.testing.assert_allclose(swift.running_score_value(state), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(swift.running_score_value(state), swift.score(p, x, m), rtol=RTOL, atol=ATOL)

    # inside a jitted scan (the decoding-loop use)
    @jax.jit
    def scan_score(proj, m):
        def step(st, inp):
            return swift.running_score_update(st, inp[0], inp[1]), None

        st, _ = jax.lax.scan(step, swift.running_score_init(b, gated), (proj.swapaxes(0, 1), m.T))
        return swift.running_score_value(st)

    np.testing.assert_allclose(scan_score(proj, m), swift.score(p, x, m), rtol=RTOL, atol=ATOL)


def test_running_score_bad_inputs():
    st = swift.running_score_init(3, gated=True)
    with pytest.raises(ValueError, match="ungated|gated"):
        swift.running_score_update(st, jnp.zeros((3, 1)), jnp.ones(3))
    with pytest.raises(ValueError, match="u_r_t"):
        swift.running_score_update(st, jnp.zeros((3, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match="m_t"):
        swift.running_score_update(st, jnp.zeros((3, 2)), jnp.ones(4))
    with pytest.raises(ValueError, match="batch"):
        swift.running_score_init(0)
    with pytest.raises(ValueError, match="state"):
        swift.running_score_value((1, 2))


# ----------------------------------------------------------------------------- losses


def test_loss_ce_and_hinge_vs_numpy():
    rng = np.random.default_rng(10)
    s = (rng.normal(size=16) * 3).astype(np.float32)
    c = rand_labels(rng, 16)
    np.testing.assert_allclose(swift.loss_ce(s, c), np_ce(s, c), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(swift.loss_hinge(s, c), np_hinge(s, c), rtol=RTOL, atol=ATOL)
    # extreme logits stay finite (stable BCE)
    big = np.array([80.0, -80.0, 80.0, -80.0], np.float32)
    lab = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    np.testing.assert_allclose(swift.loss_ce(big, lab), np_ce(big, lab), rtol=RTOL)
    # gradient of mean BCE is (sigmoid(s) - c) / B
    g = jax.grad(swift.loss_ce)(jnp.asarray(s), jnp.asarray(c))
    np.testing.assert_allclose(g, (np_sigmoid(s.astype(np.float64)) - c) / len(s), rtol=1e-5, atol=1e-7)


def test_loss_dpo_vs_numpy():
    rng = np.random.default_rng(11)
    for trial in range(5):
        b = 16
        s = rng.normal(size=b).astype(np.float32) * 2
        c = rand_labels(rng, b)
        gid = rng.integers(0, 4, size=b).astype(np.int32)
        np.testing.assert_allclose(swift.loss_dpo(s, c, gid), np_dpo(s, c, gid), rtol=RTOL, atol=ATOL)
    # [P, K] grouped variant == flat with row ids
    s2 = rng.normal(size=(2, 8)).astype(np.float32)
    c2 = rand_labels(rng, (2, 8))
    c2[0, 0], c2[0, 1] = 1, 0
    gid2 = np.repeat(np.arange(2), 8).astype(np.int32)
    np.testing.assert_allclose(
        swift.loss_dpo_grouped(s2, c2), np_dpo(s2.ravel(), c2.ravel(), gid2), rtol=RTOL, atol=ATOL
    )


def test_loss_dpo_without_pairs_is_zero_and_finite():
    s = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    c = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    gid = jnp.asarray([0, 0, 1, 1])  # group 0 all correct, group 1 all incorrect: no pair
    val, grad = jax.value_and_grad(swift.loss_dpo)(s, c, gid)
    assert float(val) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(4))


@pytest.mark.parametrize("alpha", [0.01, 0.5])
def test_listwise_losses_vs_numpy(alpha):
    rng = np.random.default_rng(12)
    s = (rng.normal(size=(3, 8)) * 2).astype(np.float32)
    c = rand_labels(rng, (3, 8))
    c[2] = 0.0  # a prompt with no correct candidate: uniform targets
    np.testing.assert_allclose(swift.loss_infonca(s, c, alpha), np_infonca(s, c, alpha), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(swift.loss_nca(s, c, alpha), np_nca(s, c, alpha), rtol=RTOL, atol=ATOL)


def test_loss_registry_uniform_signature():
    rng = np.random.default_rng(13)
    s = rng.normal(size=(2, 8)).astype(np.float32)
    c = rand_labels(rng, (2, 8))
    gid = np.repeat(np.arange(2), 8)
    want = {
        "ce": np_ce(s, c),
        "hinge": np_hinge(s, c),
        "dpo": np_dpo(s.ravel(), c.ravel(), gid),
        "infonca": np_infonca(s, c, 0.1),
        "nca": np_nca(s, c, 0.1),
    }
    assert set(swift.LOSSES) == set(want)
    for name, ref in want.items():
        fn = swift.loss_fn(name, alpha=0.1)
        np.testing.assert_allclose(fn(s, c), ref, rtol=RTOL, atol=ATOL, err_msg=name)
        # differentiable and jittable through the score
        g = jax.jit(jax.grad(fn))(jnp.asarray(s), jnp.asarray(c))
        assert np.all(np.isfinite(np.asarray(g))), name


def test_loss_bad_inputs():
    s = np.zeros((2, 4), np.float32)
    c = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="loss name"):
        swift.loss_fn("mse")
    with pytest.raises(ValueError, match="alpha"):
        swift.loss_infonca(s, c, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        swift.loss_ce(s, c + 2.0)
    with pytest.raises(ValueError, match="labels"):
        swift.loss_hinge(s, c + 0.5)
    with pytest.raises(ValueError, match="labels"):
        swift.loss_ce(s, c[:, :3])
    with pytest.raises(ValueError, match="scores"):
        swift.loss_nca(s[0], c[0])
    with pytest.raises(ValueError, match="scores"):
        swift.loss_ce(np.array([np.nan, 0.0], np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="group_ids"):
        swift.loss_dpo(s[0], c[0], np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="group_ids"):
        swift.loss_dpo(s[0], c[0], np.zeros(3, np.int32))


# ----------------------------------------------------------------------------- logits features


def test_logits_features_vs_numpy():
    rng = np.random.default_rng(14)
    logits = (rng.normal(size=(2, 5, 50)) * 3).astype(np.float32)
    np.testing.assert_array_equal(swift.logits_features(logits, "full"), logits)
    k = 7
    top = -np.sort(-logits.astype(np.float64), axis=-1)[..., :k]
    np.testing.assert_allclose(swift.logits_features(logits, "topk", k), top, rtol=1e-6, atol=1e-6)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(swift.logits_features(logits, "topk_logprobs", k), top - lse, rtol=1e-5, atol=1e-5)
    # log-probs are invariant to a per-position logit shift; raw top-k values are not
    shifted = logits + rng.normal(size=(2, 5, 1)).astype(np.float32) * 10
    np.testing.assert_allclose(
        swift.logits_features(shifted, "topk_logprobs", k),
        swift.logits_features(logits, "topk_logprobs", k),
        rtol=1e-4,
        atol=1e-4,
    )
    # features feed the head
    feats = swift.logits_features(logits, "topk_logprobs", k)
    p = swift.init_params(jax.random.key(0), k)
    assert swift.score(p, feats, np.ones((2, 5))).shape == (2,)


def test_logits_features_bad_inputs():
    x = np.zeros((2, 3, 10), np.float32)
    with pytest.raises(ValueError, match="mode"):
        swift.logits_features(x, "ids")
    with pytest.raises(ValueError, match="k"):
        swift.logits_features(x, "topk", 11)
    with pytest.raises(ValueError, match="k"):
        swift.logits_features(x, "topk", None)
    with pytest.raises(ValueError, match="logits"):
        swift.logits_features(x[0], "full")


# ----------------------------------------------------------------------------- head bad inputs


def test_head_bad_inputs():
    rng = np.random.default_rng(15)
    p = rand_params(rng, 8)
    x = np.zeros((2, 3, 8), np.float32)
    m = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="features"):
        swift.score(p, np.zeros((2, 3, 9), np.float32), m)
    with pytest.raises(ValueError, match="features"):
        swift.score(p, x[0], m)
    with pytest.raises(ValueError, match="features"):
        swift.score(p, x.astype(np.int32), m)
    with pytest.raises(ValueError, match="mask"):
        swift.score(p, x, np.ones((2, 4)))
    with pytest.raises(ValueError, match="kernel"):
        swift.score({"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)}, x, m)
    with pytest.raises(ValueError, match="bias"):
        swift.score({"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(1)}, x, m)
    with pytest.raises(ValueError, match="params"):
        swift.score({"w": 1}, x, m)
    with pytest.raises(ValueError, match="proj"):
        swift.score_from_projections(np.zeros((2, 3, 4), np.float32), m)
    with pytest.raises(ValueError, match="feature_dim"):
        swift.init_params(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="states"):
        swift.project_layers(p, [np.zeros((2, 3, 4), np.float32), np.zeros((2, 4, 4), np.float32)])
