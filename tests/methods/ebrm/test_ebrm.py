"""EBRM energy network, NCE+ loss, reward normalisation, conflict filter and refinement."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from swiftjax.methods.ebrm import energy as ebrm
from swiftjax.methods.ebrm.energy import EBRMConfig

RTOL = 1e-5
ATOL = 1e-6

SMALL = EBRMConfig(embed_dim=6, r_hidden=(4, 5, 7), hidden=(12, 9), dropout=0.5)


# ----------------------------------------------------------------------------- numpy references


def np_energy(params, e, r, cfg):
    """Forward of the unsplit network in float64: concat([e, r_emb]) @ W1 (W1 = [w_e; w_r])."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    r = np.asarray(r, np.float64)
    squeeze = r.ndim == 1
    if squeeze:
        r = r[:, None]
    x = r[..., None]
    for layer in p["r_mlp"]:
        x = np.tanh(x @ layer["w"] + layer["b"])
    e = np.asarray(e, np.float64)
    eb = np.broadcast_to(e[:, None, :], r.shape + (e.shape[1],))
    z = np.concatenate([eb, x], axis=-1)
    w1 = np.concatenate([p["head_in"]["w_e"], p["head_in"]["w_r"]], axis=0)
    h = z @ w1 + p["head_in"]["b"]
    layers = p["head"]
    if layers:
        h = np.tanh(h)
        for j, layer in enumerate(layers):
            h = h @ layer["w"] + layer["b"]
            if j < len(layers) - 1:
                h = np.tanh(h)
    out = h[..., 0]
    return out[:, 0] if squeeze else out


def np_log_mix(y, center, stds):
    y = np.asarray(y, np.float64)
    comps = [
        -0.5 * ((y - center) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi) for s in stds
    ]
    return np.logaddexp.reduce(np.stack(comps), axis=0) - np.log(len(stds))


def np_nce_loss(params, e, r0, y_pos, y_neg, cfg, stds, lam):
    y_all = np.concatenate([np.asarray(y_pos)[:, None], np.asarray(y_neg)], axis=1).astype(np.float64)
    f = np_energy(params, e, y_all, cfg)
    t = f - np_log_mix(y_all, np.asarray(r0, np.float64)[:, None], stds)
    lse = np.logaddexp.reduce(t, axis=1)
    return -np.mean(t[:, 0] - lse) + lam * np.mean(f**2)


def np_refine(f, df, r, steps, lr0, eta, min_lr):
    """The spec's refinement, written as a plain loop over iterations (float32)."""
    r = np.asarray(r, np.float32).copy()
    lr = np.full(r.shape, lr0, np.float32)
    active = lr >= min_lr
    acc = np.zeros(r.shape, np.int32)
    t = 0
    while t < steps and active.any():
        fr = f(r)
        rt = (r + lr * df(r)).astype(np.float32)
        better = active & (f(rt) > fr)
        r = np.where(better, rt, r)
        lr = np.where(active & ~better, lr * np.float32(eta), lr).astype(np.float32)
        active = active & (lr >= min_lr)
        acc += better
        t += 1
    return r, lr, active, t, acc


# ----------------------------------------------------------------------------- config, init


def test_config_validation():
    assert EBRMConfig(8, r_hidden=[2, 3], hidden=[4]).r_hidden == (2, 3)
    for kwargs in (
        dict(embed_dim=0),
        dict(embed_dim=4, dropout=1.0),
        dict(embed_dim=4, dropout=-0.1),
        dict(embed_dim=4, r_hidden=()),
        dict(embed_dim=4, hidden=(8, 0)),
        dict(embed_dim=4, r_hidden=(2.5,)),
    ):
        with pytest.raises(ValueError, match="EBRMConfig"):
            EBRMConfig(**kwargs)
    hash(SMALL)  # static-arg friendly


def test_init_bounds_and_param_count():
    cfg = EBRMConfig(embed_dim=512)  # reference sizes
    params = ebrm.init_params(jax.random.key(0), cfg)
    dims = [(1, 16), (16, 32), (32, 64), (512 + 64, 1024), (1024, 512), (512, 1)]
    assert ebrm.num_params(params) == sum(i * o + o for i, o in dims)  # ~1.1M as the spec says
    fan_ins = [1, 16, 32]
    for layer, fi in zip(params["r_mlp"], fan_ins):
        for leaf in (layer["w"], layer["b"]):
            assert np.all(np.abs(np.asarray(leaf)) <= 1 / math.sqrt(fi))
    bound = 1 / math.sqrt(512 + 64)
    for leaf in params["head_in"].values():
        a = np.asarray(leaf)
        assert np.all(np.abs(a) <= bound)
    w_e = np.asarray(params["head_in"]["w_e"])
    assert w_e.shape == (512, 1024) and params["head_in"]["w_r"].shape == (64, 1024)
    assert abs(w_e.var() / (bound**2 / 3) - 1) < 0.02 and w_e.max() > 0.99 * bound
    for layer, fi in zip(params["head"], (1024, 512)):
        assert np.all(np.abs(np.asarray(layer["w"])) <= 1 / math.sqrt(fi))
        assert np.all(np.abs(np.asarray(layer["b"])) <= 1 / math.sqrt(fi))
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float32


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "cfg",
    [SMALL, EBRMConfig(embed_dim=3, r_hidden=(5,), hidden=(), dropout=0.0), EBRMConfig(embed_dim=5, r_hidden=(3, 4), hidden=(6,))],
)
def test_energy_vs_numpy(cfg):
    rng = np.random.default_rng(0)
    params = ebrm.init_params(jax.random.key(1), cfg)
    e = rng.normal(size=(4, cfg.embed_dim)).astype(np.float32)
    r = (rng.normal(size=4) * 3).astype(np.float32)
    rm = (rng.normal(size=(4, 9)) * 3).astype(np.float32)
    np.testing.assert_allclose(ebrm.energy(params, e, r, cfg), np_energy(params, e, r, cfg), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ebrm.energy(params, e, rm, cfg), np_energy(params, e, rm, cfg), rtol=RTOL, atol=ATOL)
    pe = ebrm.precompute_e(params, e)
    np.testing.assert_allclose(ebrm.energy_pre(params, pe, rm, cfg), ebrm.energy(params, e, rm, cfg), rtol=1e-6, atol=1e-6)
    # gradient in r matches a central finite difference of the numpy reference
    g = jax.grad(lambda x: jnp.sum(ebrm.energy(params, e, x, cfg)))(jnp.asarray(r))
    h = 1e-4
    fd = (np_energy(params, e, r.astype(np.float64) + h, cfg) - np_energy(params, e, r.astype(np.float64) - h, cfg)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-5)


def test_dropout_only_in_training():
    rng = np.random.default_rng(1)
    params = ebrm.init_params(jax.random.key(2), SMALL)
    e = rng.normal(size=(3, 6)).astype(np.float32)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    ev = ebrm.energy(params, e, r, SMALL)
    np.testing.assert_array_equal(ebrm.energy(params, e, r, SMALL, key=jax.random.key(0)), ev)
    t1 = ebrm.energy(params, e, r, SMALL, key=jax.random.key(0), train=True)
    t1b = ebrm.energy(params, e, r, SMALL, key=jax.random.key(0), train=True)
    t2 = ebrm.energy(params, e, r, SMALL, key=jax.random.key(1), train=True)
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, ev) and not np.allclose(t1, t2)
    # no dropout site (one r layer, no hidden layer): training == eval
    cfg0 = EBRMConfig(embed_dim=6, r_hidden=(4,), hidden=())
    p0 = ebrm.init_params(jax.random.key(3), cfg0)
    np.testing.assert_allclose(
        ebrm.energy(p0, e, r, cfg0, key=jax.random.key(0), train=True), ebrm.energy(p0, e, r, cfg0), rtol=1e-6
    )


def test_inverted_dropout_is_unbiased_on_last_hidden_layer():
    # with one hidden layer and one r layer the output is linear in the only dropped activation,
    # so the mean over independent masks equals the eval output
    cfg = EBRMConfig(embed_dim=3, r_hidden=(4,), hidden=(16,), dropout=0.5)
    params = ebrm.init_params(jax.random.key(4), cfg)
    rng = np.random.default_rng(2)
    e = rng.normal(size=(2, 3)).astype(np.float32)
    r = np.repeat(rng.normal(size=(2, 1)).astype(np.float32), 20000, axis=1)
    draws = np.asarray(ebrm.energy(params, e, r, cfg, key=jax.random.key(5), train=True))
    se = draws.std(axis=1) / np.sqrt(draws.shape[1])
    diff = np.abs(draws.mean(axis=1) - np.asarray(ebrm.energy(params, e, r[:, :1], cfg))[:, 0])
    assert np.all(diff < 5 * se + 1e-6)


# ----------------------------------------------------------------------------- NCE+


def test_log_mixture_density_vs_numpy():
    rng = np.random.default_rng(3)
    y = (rng.normal(size=(4, 7)) * 5).astype(np.float32)
    c = rng.normal(size=(4, 1)).astype(np.float32)
    for stds in ((3.5,), (0.5, 1.0, 4.0)):
        np.testing.assert_allclose(ebrm.log_mixture_density(y, c, stds), np_log_mix(y, c, stds), rtol=RTOL, atol=ATOL)
    # far tails stay finite (log-space, no underflow)
    far = ebrm.log_mixture_density(np.array([1e3], np.float32), np.zeros(1, np.float32), (0.1, 1.0))
    assert np.isfinite(np.asarray(far)).all()
    np.testing.assert_allclose(far, np_log_mix(np.array([1e3]), 0.0, (0.1, 1.0)), rtol=1e-5)


def test_sample_nce_noise_statistics():
    stds = (0.5, 4.0)
    r0 = np.linspace(-3, 3, 4).astype(np.float32)
    y_pos, y_neg = ebrm.sample_nce_noise(jax.random.key(0), r0, num_neg=50000, stds=stds, beta=0.1)
    assert y_pos.shape == (4,) and y_neg.shape == (4, 50000)
    d = np.asarray(y_neg) - r0[:, None]
    var = np.mean(np.square(stds))
    assert abs(d.var() / var - 1) < 0.03
    p_in = 0.5 * sum(math.erf(1.0 / (s * math.sqrt(2))) for s in stds)  # P(|d| < 1) under p_N
    assert abs(np.mean(np.abs(d) < 1.0) - p_in) < 0.01
    r0b = np.zeros(100000, np.float32)
    yp, _ = ebrm.sample_nce_noise(jax.random.key(1), r0b, num_neg=1, stds=stds, beta=0.1)
    assert abs(np.var(np.asarray(yp)) / (0.01 * var) - 1) < 0.03


@pytest.mark.parametrize("stds", [(3.5,), (0.5, 2.0)])
def test_nce_plus_loss_from_samples_vs_numpy(stds):
    rng = np.random.default_rng(4)
    params = ebrm.init_params(jax.random.key(6), SMALL)
    b, m = 5, 33
    e = rng.normal(size=(b, 6)).astype(np.float32)
    r0 = (rng.normal(size=b) * 2).astype(np.float32)
    y_pos = (r0 + rng.normal(size=b) * 0.3).astype(np.float32)
    y_neg = (r0[:, None] + rng.normal(size=(b, m)) * 3.5).astype(np.float32)
    got = ebrm.nce_plus_loss_from_samples(params, e, r0, y_pos, y_neg, SMALL, stds=stds, lam=0.05)
    want = np_nce_loss(params, e, r0, y_pos, y_neg, SMALL, stds, 0.05)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_nce_plus_loss_sampling_entry_point():
    cfg = EBRMConfig(embed_dim=6, r_hidden=(4, 5), hidden=(8,), dropout=0.5)
    stds = (0.5, 2.0)
    rng = np.random.default_rng(5)
    params = ebrm.init_params(jax.random.key(6), cfg)
    b, m = 5, 17
    e = rng.normal(size=(b, 6)).astype(np.float32)
    r0 = (rng.normal(size=b) * 2).astype(np.float32)
    # == explicit samples drawn with the first half of its key
    key = jax.random.key(7)
    yp, yn = ebrm.sample_nce_noise(jax.random.split(key)[0], r0, num_neg=m, stds=stds, beta=0.1)
    full = ebrm.nce_plus_loss(params, e, r0, key, cfg, num_neg=m, stds=stds, beta=0.1, lam=0.05, train=False)
    np.testing.assert_allclose(full, np_nce_loss(params, e, r0, yp, yn, cfg, stds, 0.05), rtol=RTOL, atol=ATOL)
    # differentiable, finite gradients (training mode with dropout)
    g = jax.grad(ebrm.nce_plus_loss)(params, e, r0, key, cfg, num_neg=m, stds=stds)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))


def test_nce_plus_loss_stable_for_large_f():
    # scale the output layer so f is huge: the log-difference form stays finite
    params = ebrm.init_params(jax.random.key(8), SMALL)
    params["head"][-1]["w"] = params["head"][-1]["w"] * 1e3
    params["head"][-1]["b"] = params["head"][-1]["b"] + 200.0
    rng = np.random.default_rng(5)
    e = rng.normal(size=(3, 6)).astype(np.float32)
    r0 = rng.normal(size=3).astype(np.float32)
    loss = ebrm.nce_plus_loss(params, e, r0, jax.random.key(0), SMALL, num_neg=16, lam=0.0, train=False)
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------- rewards, filter


def test_normalize_rewards_and_stats():
    rng = np.random.default_rng(6)
    r = (rng.normal(size=100) * 7 + 3).astype(np.float32)
    mean, std = ebrm.fit_reward_stats(r)
    np.testing.assert_allclose([mean, std], [np.mean(r.astype(np.float64)), np.std(r.astype(np.float64))], rtol=1e-12)
    _, std1 = ebrm.fit_reward_stats(r, ddof=1)
    np.testing.assert_allclose(std1, np.std(r.astype(np.float64), ddof=1), rtol=1e-12)
    z = ebrm.normalize_rewards(r, mean, std)
    np.testing.assert_allclose(z, 4 * (r - mean) / (std + 1e-8), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.std(np.asarray(z)), 4.0, rtol=1e-4)
    np.testing.assert_allclose(ebrm.denormalize_rewards(z, mean, std), r, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        ebrm.normalize_rewards(r, mean, -1.0)
    with pytest.raises(ValueError):
        ebrm.fit_reward_stats(np.array([1.0, np.nan]))


def test_conflict_filter_keeps_exactly_agreeing_pairs():
    rng = np.random.default_rng(7)
    rc = rng.integers(-3, 4, size=200).astype(np.float32)  # many ties
    rr = rng.integers(-3, 4, size=200).astype(np.float32)
    keep = ebrm.conflict_filter(rc, rr)
    assert keep.dtype == np.bool_ and keep.shape == (200,)
    for i in range(200):
        assert keep[i] == (float(rc[i]) > float(rr[i]))
    assert (rc == rr).any() and not keep[rc == rr].any()
    with pytest.raises(ValueError):
        ebrm.conflict_filter(rc, rr[:10])
    with pytest.raises(ValueError):
        ebrm.conflict_filter(np.array([np.nan]), np.array([0.0]))


# ----------------------------------------------------------------------------- refinement


def test_init_rewards_hybrid():
    r0 = np.array([-5.0, -2.0, -1.5, 0.0, 2.0, 2.0001, 9.0], np.float32)
    r = np.asarray(ebrm.init_rewards(jax.random.key(0), r0, "hybrid"))
    inside = (r0 >= -2) & (r0 <= 2)
    np.testing.assert_array_equal(r[inside], r0[inside])
    assert np.all((r[~inside] >= -4) & (r[~inside] < 4)) and not np.any(r[~inside] == r0[~inside])
    np.testing.assert_array_equal(ebrm.init_rewards(None, r0, "base"), r0)
    big = np.asarray(ebrm.init_rewards(jax.random.key(1), np.zeros(20000, np.float32), "random"))
    assert big.min() >= -4 and big.max() < 4 and abs(big.mean()) < 0.1 and abs(big.var() - 64 / 12) < 0.2


def test_refine_fn_finds_quadratic_maximiser():
    rng = np.random.default_rng(8)
    b = 64
    a = rng.uniform(0.2, 3.0, size=b).astype(np.float32)
    c = rng.uniform(-3, 3, size=b).astype(np.float32)
    r_init = rng.uniform(-4, 4, size=b).astype(np.float32)

    def f(r):
        return -a * (r - c) ** 2

    res = jax.jit(lambda r: ebrm.refine_fn(f, r, steps=200, lr0=0.5, eta=0.2, min_lr=1e-6))(r_init)
    np.testing.assert_allclose(res.reward, c, atol=1e-3)
    assert np.all(np.asarray(res.value) >= f(r_init))
    np.testing.assert_allclose(res.value, f(np.asarray(res.reward)), rtol=1e-6, atol=1e-12)


def test_refine_fn_step_halving_and_stop_logic():
    # dyadic numbers: every operation is exact in float32, so decisions are exact
    a = np.array([1.0, 1.0, 0.25], np.float32)
    c = np.array([0.5, -1.25, 0.0], np.float32)  # c = 0 keeps r - c exact for many halvings
    r_init = c + np.array([1.5, -0.75, 1.5], np.float32)

    def f(r):
        return -a * (r - c) ** 2

    def df(r):
        return -2 * a * (r - c)

    # a = 1, lr 1: r~ mirrors r around c, f equal -> rejected (strict), lr -> 0.5; then exact hit
    # (accepted); then g = 0 -> rejected until lr = 2^-7 < 0.01: 8 iterations, 1 accepted.
    # a = 0.25: every step halves the distance and is accepted.
    for steps in (5, 8, 50):
        res = ebrm.refine_fn(f, r_init, steps=steps, lr0=1.0, eta=0.5, min_lr=1e-2)
        r, lr, active, t, acc = np_refine(f, df, r_init, steps, 1.0, 0.5, 1e-2)
        np.testing.assert_array_equal(res.reward, r)
        np.testing.assert_array_equal(res.lr, lr)
        np.testing.assert_array_equal(res.active, active)
        np.testing.assert_array_equal(res.accepted, acc)
        assert int(res.steps) == t
    np.testing.assert_array_equal(res.reward[:2], c[:2])
    np.testing.assert_array_equal(res.lr, [2.0**-7, 2.0**-7, 1.0])
    np.testing.assert_array_equal(res.accepted, [1, 1, 50])
    np.testing.assert_array_equal(res.active, [False, False, True])
    assert int(res.steps) == 50
    # the loop ends as soon as every example has stopped
    res2 = ebrm.refine_fn(lambda r: -((r - c[:2]) ** 2), r_init[:2], steps=50, lr0=1.0, eta=0.5, min_lr=1e-2)
    assert int(res2.steps) == 8 and not np.any(np.asarray(res2.active))


def _train_tiny(cfg, e, r0, steps=80):
    params = ebrm.init_params(jax.random.key(10), cfg)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        loss, g = jax.value_and_grad(ebrm.nce_plus_loss)(params, e, r0, key, cfg, num_neg=32, stds=(1.0,))
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    keys = jax.random.split(jax.random.key(11), steps)
    for k in keys:
        params, state, _ = step(params, state, k)
    return params


def test_refine_with_trained_net_increases_f_monotonically():
    cfg = EBRMConfig(embed_dim=4, r_hidden=(8, 8), hidden=(16,), dropout=0.1)
    rng = np.random.default_rng(9)
    e = rng.normal(size=(48, 4)).astype(np.float32)
    r0 = (e @ np.array([1.0, -0.5, 0.3, 0.8], np.float32)).astype(np.float32)
    p0 = ebrm.init_params(jax.random.key(10), cfg)
    yp, yn = ebrm.sample_nce_noise(jax.random.key(99), r0, num_neg=64, stds=(1.0,), beta=0.1)
    before = ebrm.nce_plus_loss_from_samples(p0, e, r0, yp, yn, cfg, stds=(1.0,))
    params = _train_tiny(cfg, e, r0)
    after = ebrm.nce_plus_loss_from_samples(params, e, r0, yp, yn, cfg, stds=(1.0,))
    assert float(after) < float(before)

    key = jax.random.key(12)
    r_start = ebrm.init_rewards(key, r0, "hybrid")
    prev = None
    for n in range(0, 13, 2):
        res = ebrm.refine(params, e, r0, key, cfg, steps=n, lr0=0.5, eta=0.2)
        val = np.asarray(res.value)
        np.testing.assert_allclose(val, np_energy(params, e, np.asarray(res.reward), cfg), rtol=1e-5, atol=1e-6)
        if n == 0:
            np.testing.assert_array_equal(res.reward, r_start)
        else:
            assert np.all(val >= prev)
        prev = val
    assert np.any(val > np.asarray(ebrm.energy(params, e, r_start, cfg)) + 1e-4)
    # the refined point is a local maximum of f: small moves either way do not increase f
    res = ebrm.refine(params, e, r0, key, cfg, steps=200, lr0=0.5, eta=0.2)
    r_star = np.asarray(res.reward, np.float64)
    for d in (1e-2, -1e-2):
        assert np.all(np_energy(params, e, r_star + d, cfg) <= np.asarray(res.value) + 1e-5)
    # init='base' starts at r0 and needs no key
    res0 = ebrm.refine(params, e, r0, None, cfg, steps=0, init="base")
    np.testing.assert_array_equal(res0.reward, r0)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    params = ebrm.init_params(jax.random.key(0), SMALL)
    e = np.zeros((3, 6), np.float32)
    r = np.zeros(3, np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="e:"):
        ebrm.energy(params, np.zeros((3, 5), np.float32), r, SMALL)
    with pytest.raises(ValueError, match="r:"):
        ebrm.energy(params, e, np.zeros(4, np.float32), SMALL)
    with pytest.raises(ValueError, match="r:"):
        ebrm.energy(params, e, np.zeros((3, 2, 2), np.float32), SMALL)
    with pytest.raises(ValueError, match="key"):
        ebrm.energy(params, e, r, SMALL, train=True)
    with pytest.raises(ValueError, match="params"):
        ebrm.energy(params, e, r, EBRMConfig(embed_dim=6))
    with pytest.raises(ValueError, match="stds"):
        ebrm.nce_plus_loss(params, e, r, key, SMALL, stds=())
    with pytest.raises(ValueError, match="stds"):
        ebrm.nce_plus_loss(params, e, r, key, SMALL, stds=(1.0, -1.0))
    with pytest.raises(ValueError, match="num_neg"):
        ebrm.nce_plus_loss(params, e, r, key, SMALL, num_neg=0)
    with pytest.raises(ValueError, match="r0"):
        ebrm.nce_plus_loss(params, e, np.array([0.0, np.nan, 1.0], np.float32), key, SMALL)
    with pytest.raises(ValueError, match="y_neg"):
        ebrm.nce_plus_loss_from_samples(params, e, r, r, np.zeros((2, 4), np.float32), SMALL)
    with pytest.raises(ValueError, match="eta"):
        ebrm.refine(params, e, r, key, SMALL, eta=1.0)
    with pytest.raises(ValueError, match="steps"):
        ebrm.refine(params, e, r, key, SMALL, steps=-1)
    with pytest.raises(ValueError, match="init"):
        ebrm.refine(params, e, r, key, SMALL, init="zeros")
    with pytest.raises(ValueError, match="key"):
        ebrm.refine(params, e, r, None, SMALL)
    with pytest.raises(ValueError, match="f:"):
        ebrm.refine_fn(3, r)
    with pytest.raises(ValueError, match="r_init"):
        ebrm.refine_fn(lambda x: -x * x, np.zeros((2, 2), np.float32))
