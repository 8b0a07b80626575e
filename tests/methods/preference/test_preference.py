"""swiftjax.methods.preference.losses against plain numpy (float64) references written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.methods.preference.losses import (
    arwc_weights,
    bt_reward_loss,
    bt_token_reward_loss,
    ctro_clip,
    ctro_eps,
    dpo_loss,
    first_divergence,
    irft_loss,
    kl_regularised_pg_loss,
    mrpo_loss,
    sft_loss,
    uniform_weights,
    validation_weights,
    virtual_reference,
)

F64 = np.float64


def np_neg_log_sigmoid(x):
    return np.logaddexp(0.0, -np.asarray(x, F64))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, F64)))


def np_dpo(pi_w, pi_l, ref_w, ref_l, beta):
    r_w = beta * (np.asarray(pi_w, F64) - ref_w)
    r_l = beta * (np.asarray(pi_l, F64) - ref_l)
    return np_neg_log_sigmoid(r_w - r_l).mean(), r_w, r_l


def np_arwc(ref_w, ref_l, convention):
    a = np.abs(np.asarray(ref_w, F64) - ref_l)
    K = a.shape[0]
    if K == 1:
        return np.ones_like(a)
    if convention == "code":  # the number below multiplies 1/pi_primary
        alpha = a[1] / (a[1] + a[0] + 1e-6)
        return np.stack([alpha, 1 - alpha])
    if K == 2:  # the spec's formula, weight of the extra reference
        alpha = a[1] / (a[1] + a[0] + 1e-6)
        return np.stack([1 - alpha, alpha])
    ext = a[1:] / (a.sum(0) + 1e-6)
    return np.concatenate([1 - ext.sum(0, keepdims=True), ext])


def np_ctro(ref_w, ref_l, eps):
    rw, rl = np.array(ref_w, F64), np.array(ref_l, F64)
    bw, bl = rw.mean(0), rl.mean(0)
    if eps < 0:
        ew = el = np.full(rw.shape[1], -eps)
    else:
        ew = eps * np.abs(bw) / (np.abs(bw) + np.abs(bl))
        el = eps - ew
    for k in range(1, rw.shape[0]):  # max then min, as the reference code orders it
        rw[k] = np.minimum(np.maximum(rw[k], rw[0] * (1 + ew)), rw[0] * (1 - ew))
        rl[k] = np.minimum(np.maximum(rl[k], rl[0] * (1 + el)), rl[0] * (1 - el))
    return rw, rl, ew, el


def np_virtual(r, w, kind):
    r = np.asarray(r, F64)
    w = np.broadcast_to(np.asarray(w, F64).reshape(w.shape + (1,) * (2 - np.ndim(w))), r.shape)
    if kind == "harmonic":
        return -np.log(np.sum(w * np.exp(-r), axis=0))
    return np.sum(w * r, axis=0)


def np_mrpo(pi_w, pi_l, ref_w, ref_l, beta, eps, weighting, convention, virtual, weights=None):
    K, B = ref_w.shape
    if K == 1:
        return np_dpo(pi_w, pi_l, ref_w[0].astype(F64), ref_l[0].astype(F64), beta)[0]
    if weighting == "arwc":
        w = np_arwc(ref_w, ref_l, convention)
    elif weighting == "uniform":
        w = np.full((K,), 1.0 / K)
    else:
        w = np.asarray(weights, F64)
    rw, rl = np.asarray(ref_w, F64), np.asarray(ref_l, F64)
    if eps is not None:
        rw, rl, _, _ = np_ctro(rw, rl, eps)
    return np_dpo(pi_w, pi_l, np_virtual(rw, w, virtual), np_virtual(rl, w, virtual), beta)[0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _pair(rng, B=6, K=2):
    pi_w = (-20 + 5 * rng.standard_normal(B)).astype(np.float32)
    pi_l = (-24 + 5 * rng.standard_normal(B)).astype(np.float32)
    ref_w = (-20 + 8 * rng.standard_normal((K, B))).astype(np.float32)
    ref_l = (-24 + 8 * rng.standard_normal((K, B))).astype(np.float32)
    return pi_w, pi_l, np.minimum(ref_w, -1), np.minimum(ref_l, -1)


# ----------------------------------------------------------------------------- SFT / DPO


def test_sft_loss_matches_numpy(rng):
    lp = (-3 * rng.random((3, 6))).astype(np.float32)
    mask = rng.integers(0, 2, (3, 6))
    mask[0, 0] = 1
    got_tok = sft_loss(lp, mask)
    got_seq = sft_loss(lp, mask, reduction="sequence")
    np.testing.assert_allclose(float(got_tok), -(lp * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(got_seq), -(lp * mask).sum(1).mean(), rtol=1e-6)
    assert float(sft_loss(lp, np.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(lp, mask, reduction="mean")
    with pytest.raises(ValueError, match="mask"):
        sft_loss(lp, mask[:, :3])


def test_dpo_matches_numpy_and_metrics(rng):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=8, K=1)
    beta = 0.1
    loss, m = dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], beta)
    want, r_w, r_l = np_dpo(pi_w, pi_l, ref_w[0], ref_l[0], beta)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(m["reward_chosen"]), r_w.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["reward_rejected"]), r_l.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["reward_margin"]), (r_w - r_l).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), (r_w > r_l).mean())


def test_dpo_accuracy_is_strict():
    z = np.zeros(4, np.float32)
    _, m = dpo_loss(z - 1, z - 1, z - 2, z - 2, 0.5)  # every reward equal
    assert float(m["accuracy"]) == 0.0


def test_dpo_gradient_and_stop_gradient(rng):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=5, K=1)
    beta = 0.3
    g = jax.grad(lambda a, b, c, d: dpo_loss(a, b, c, d, beta)[0], argnums=(0, 1, 2, 3))(
        pi_w, pi_l, ref_w[0], ref_l[0])
    z = beta * ((pi_w.astype(F64) - ref_w[0]) - (pi_l - ref_l[0]))
    dz = -np_sigmoid(-z) / len(z)
    np.testing.assert_allclose(np.asarray(g[0]), beta * dz, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[1]), -beta * dz, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(g[2])) and not np.any(np.asarray(g[3]))


# ----------------------------------------------------------------------------- MRPO parts


@pytest.mark.parametrize("wshape", ["K", "KB"])
def test_virtual_reference_matches_numpy(rng, wshape):
    K, B = 3, 5
    lp = -rng.uniform(1, 60, (K, B)).astype(np.float32)
    w = rng.random((K, B) if wshape == "KB" else (K,))
    w = (w / w.sum(0)).astype(np.float32)
    got_h = virtual_reference(lp, w)
    got_g = virtual_reference(lp, w, virtual="geometric")
    np.testing.assert_allclose(np.asarray(got_h), np_virtual(lp, w, "harmonic"), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_g), np_virtual(lp, w, "geometric"), rtol=1e-6, atol=1e-5)
    # harmonic mean of probabilities <= geometric mean (weighted AM-GM on 1/pi)
    assert np.all(np.asarray(got_h) <= np.asarray(got_g) + 1e-4)


def test_virtual_reference_drops_zero_weights():
    lp = np.array([[-10.0, -3000.0], [-2000.0, -5.0]], np.float32)  # [K=2, B=2]
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    got = np.asarray(virtual_reference(lp, w))
    np.testing.assert_allclose(got, [-10.0, -5.0], rtol=0, atol=1e-6)


def test_virtual_reference_large_values():
    lp = np.array([[-10.0, -3000.0], [-2000.0, -5.0]], np.float32)  # [K=2, B=2]
    w = np.array([0.25, 0.75], np.float32)
    got = np.asarray(virtual_reference(lp, w))
    # pi~ = 1 / (sum_k w_k / pi_k); the least likely reference dominates:
    # lp~ = -log(w_k exp(-lp_k) + ...) ~= lp_k - log(w_k) for that k
    want = np.array([-2000.0 - np.log(0.75), -3000.0 - np.log(0.25)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ctro_clip_band_property(rng):
    n = 400
    lp_pri = -rng.uniform(0.5, 80, n).astype(np.float32)
    lp_ext = (lp_pri * rng.uniform(0.3, 1.7, n)).astype(np.float32)
    eps = rng.uniform(0, 0.5, n).astype(np.float32)
    got = np.asarray(ctro_clip(lp_ext, lp_pri, eps)).astype(F64)
    lo = lp_pri.astype(F64) * (1 + eps)
    hi = lp_pri.astype(F64) * (1 - eps)
    assert np.all(lo <= hi)  # negative log-probs: (1+eps)*lp is the lower end
    assert np.all(got >= lo - 1e-4) and np.all(got <= hi + 1e-4)
    inside = (lp_ext >= lo) & (lp_ext <= hi)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(got[inside], lp_ext[inside])
    np.testing.assert_allclose(got, np.clip(lp_ext, lo, hi), rtol=1e-6, atol=1e-5)
    # eps = 0 collapses onto the primary reference
    np.testing.assert_array_equal(np.asarray(ctro_clip(lp_ext, lp_pri, 0.0)), lp_pri)


def test_ctro_eps_matches_numpy(rng):
    _, _, ref_w, ref_l = _pair(rng, B=7, K=2)
    ew, el = ctro_eps(ref_w, ref_l, 0.1)
    _, _, want_w, want_l = np_ctro(ref_w, ref_l, 0.1)
    np.testing.assert_allclose(np.asarray(ew), want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(el), want_l, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ew + el), 0.1, rtol=1e-6)
    fw, fl = ctro_eps(ref_w, ref_l, -0.2)
    np.testing.assert_allclose(np.asarray(fw), 0.2, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(fl), 0.2, rtol=1e-7)


@pytest.mark.parametrize("K,convention", [(2, "paper"), (2, "code"), (3, "paper"), (1, "paper")])
def test_arwc_weights_match_numpy(rng, K, convention):
    _, _, ref_w, ref_l = _pair(rng, B=9, K=K)
    got = np.asarray(arwc_weights(ref_w, ref_l, convention))
    want = np_arwc(ref_w, ref_l, convention)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, rtol=0, atol=1e-6)
    assert np.all(got >= 0)


def test_arwc_conventions_are_swapped(rng):
    _, _, ref_w, ref_l = _pair(rng, B=5, K=2)
    p = np.asarray(arwc_weights(ref_w, ref_l, "paper"))
    c = np.asarray(arwc_weights(ref_w, ref_l, "code"))
    # the extra reference's confidence number sits on 1/pi_ext (paper) or 1/pi_pri (code)
    np.testing.assert_allclose(p[1], c[0], rtol=1e-6)
    # paper: the more confident reference gets the larger weight
    a = np.abs(ref_w - ref_l)
    np.testing.assert_array_equal(p[1] > p[0], a[1] > a[0])
    with pytest.raises(ValueError, match="K = 2"):
        arwc_weights(np.concatenate([ref_w, ref_w[:1]]), np.concatenate([ref_l, ref_l[:1]]), "code")


def test_uniform_and_validation_weights(rng):
    np.testing.assert_allclose(np.asarray(uniform_weights(4)), 0.25)
    _, _, vw, vl = _pair(rng, B=50, K=3)
    m = vw.astype(F64) - vl
    d = np.abs(m).mean(1)
    acc = (m > 0).mean(1)
    np.testing.assert_allclose(np.asarray(validation_weights(vw, vl)), d / d.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(validation_weights(vw, vl, "accuracy")), acc / acc.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        validation_weights(vw, vl, "bandit")
    with pytest.raises(ValueError, match="K"):
        uniform_weights(0)


# ----------------------------------------------------------------------------- MRPO loss


CASES = [
    dict(weighting="arwc", convention="paper", virtual="harmonic", eps=0.1),
    dict(weighting="arwc", convention="code", virtual="harmonic", eps=0.1),
    dict(weighting="arwc", convention="paper", virtual="harmonic", eps=-0.05),
    dict(weighting="arwc", convention="paper", virtual="harmonic", eps=None),
    dict(weighting="arwc", convention="paper", virtual="geometric", eps=0.1),
    dict(weighting="uniform", convention="paper", virtual="harmonic", eps=0.3),
]


@pytest.mark.parametrize("case", CASES)
def test_mrpo_matches_numpy_k2(rng, case):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=16, K=2)
    beta = 0.1
    loss, m = mrpo_loss(pi_w, pi_l, ref_w, ref_l, beta, **case)
    want = np_mrpo(pi_w, pi_l, ref_w, ref_l, beta, case["eps"], case["weighting"], case["convention"],
                   case["virtual"])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert 0.0 <= float(m["clip_frac"]) <= 1.0


@pytest.mark.parametrize("weighting", ["uniform", "fixed", "arwc"])
def test_mrpo_matches_numpy_k3(rng, weighting):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=10, K=3)
    weights = np.array([0.5, 0.2, 0.3], np.float32) if weighting == "fixed" else None
    loss, _ = mrpo_loss(pi_w, pi_l, ref_w, ref_l, 0.2, 0.15, weighting=weighting, weights=weights)
    want = np_mrpo(pi_w, pi_l, ref_w, ref_l, 0.2, 0.15, weighting, "paper", "harmonic", weights)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_mrpo_k1_is_dpo_exactly(rng, case):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=8, K=1)
    case = dict(case, convention="paper")
    loss, m = mrpo_loss(pi_w, pi_l, ref_w, ref_l, 0.1, **case)
    dloss, dm = dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], 0.1)
    assert float(loss) == float(dloss)
    for k in dm:
        assert float(m[k]) == float(dm[k])


@pytest.mark.parametrize("case", [c for c in CASES if c["eps"] is not None and c["eps"] >= 0])
def test_mrpo_eps0_is_dpo_against_primary(rng, case):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=8, K=2)
    loss, _ = mrpo_loss(pi_w, pi_l, ref_w, ref_l, 0.1, **dict(case, eps=0.0))
    dloss, _ = dpo_loss(pi_w, pi_l, ref_w[0], ref_l[0], 0.1)
    np.testing.assert_allclose(float(loss), float(dloss), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda a, b: mrpo_loss(a, b, ref_w, ref_l, 0.1, **dict(case, eps=0.0))[0], argnums=(0, 1))(pi_w, pi_l)
    gd = jax.grad(lambda a, b: dpo_loss(a, b, ref_w[0], ref_l[0], 0.1)[0], argnums=(0, 1))(pi_w, pi_l)
    np.testing.assert_allclose(np.asarray(g[0]), np.asarray(gd[0]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[1]), np.asarray(gd[1]), rtol=1e-5, atol=1e-7)


def test_mrpo_references_get_no_gradient(rng):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=4, K=2)
    g = jax.grad(lambda rw, rl: mrpo_loss(pi_w, pi_l, rw, rl)[0], argnums=(0, 1))(ref_w, ref_l)
    assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))


def test_mrpo_bad_inputs(rng):
    pi_w, pi_l, ref_w, ref_l = _pair(rng, B=4, K=2)
    with pytest.raises(ValueError, match=r"\[K, B\]"):
        mrpo_loss(pi_w, pi_l, ref_w[0], ref_l[0])
    with pytest.raises(ValueError, match="B=4"):
        mrpo_loss(pi_w, pi_l, ref_w[:, :3], ref_l[:, :3])
    with pytest.raises(ValueError, match="weighting"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, weighting="bandit")
    with pytest.raises(ValueError, match="weights"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, weighting="fixed")
    with pytest.raises(ValueError, match="summing to 1"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, weighting="fixed", weights=np.array([0.5, 0.6], np.float32))
    with pytest.raises(ValueError, match="weights"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, weights=np.array([0.5, 0.5], np.float32))
    with pytest.raises(ValueError, match="beta"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.0)
    with pytest.raises(ValueError, match="virtual"):
        mrpo_loss(pi_w, pi_l, ref_w, ref_l, virtual="arithmetic")
    bad = ref_w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        mrpo_loss(pi_w, pi_l, bad, ref_l)
    with pytest.raises(ValueError, match="eps"):
        ctro_clip(ref_w[1], ref_w[0], np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="pi_l"):
        dpo_loss(pi_w, pi_l[:3], ref_w[0], ref_l[0])


# ----------------------------------------------------------------------------- IRFT


def test_irft_is_dpo_with_generated_loser(rng):
    pi_d, pi_g, fr, _ = _pair(rng, B=6, K=2)
    frozen_d, frozen_g = fr[0], fr[1]
    loss, m = irft_loss(pi_d, pi_g, frozen_d, frozen_g, 0.1)
    dloss, dm = dpo_loss(pi_d, pi_g, frozen_d, frozen_g, 0.1)
    assert float(loss) == float(dloss)
    # and against the formula written out
    r_d = 0.1 * (pi_d.astype(F64) - frozen_d)
    r_g = 0.1 * (pi_g.astype(F64) - frozen_g)
    np.testing.assert_allclose(float(loss), np_neg_log_sigmoid(r_d - r_g).mean(), rtol=1e-6)


def test_irft_gradient_identity_wrt_logprobs(rng):
    B, beta = 5, 0.1
    lp_d = (-30 * rng.random(B)).astype(np.float32)
    lp_g = (-30 * rng.random(B)).astype(np.float32)
    gd, gg = jax.grad(lambda a, b: irft_loss(a, b, lp_d, lp_g, beta)[0], argnums=(0, 1))(lp_d, lp_g)
    # at theta = theta_t, per example: d loss / d lp_demo = -beta/2, d / d lp_gen = +beta/2 (mean over B)
    np.testing.assert_allclose(np.asarray(gd) * B, -beta / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gg) * B, beta / 2, rtol=1e-6)


def test_irft_gradient_identity_wrt_parameters(rng):
    """A toy unigram policy: lp(y) = sum_t log_softmax(theta)[y_t]."""
    V, beta = 7, 0.25
    theta_t = jnp.asarray(rng.standard_normal(V), jnp.float32)
    y_demo = jnp.asarray(rng.integers(0, V, 6))
    y_gen = jnp.asarray(rng.integers(0, V, 9))

    def lp(theta, y):
        return jnp.sum(jax.nn.log_softmax(theta)[y])

    frozen_d, frozen_g = lp(theta_t, y_demo), lp(theta_t, y_gen)

    def loss(theta):
        return irft_loss(lp(theta, y_demo)[None], lp(theta, y_gen)[None], frozen_d[None], frozen_g[None], beta)[0]

    g = np.asarray(jax.grad(loss)(theta_t), F64)
    # independent numpy gradient of lp: counts - n * softmax
    p = np.exp(np.asarray(theta_t, F64) - np.log(np.exp(np.asarray(theta_t, F64)).sum()))
    grad_lp = lambda y: np.bincount(np.asarray(y), minlength=V) - len(y) * p  # noqa: E731
    want = -(beta / 2) * (grad_lp(y_demo) - grad_lp(y_gen))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- RFT


def test_bt_reward_loss_matches_numpy(rng):
    r_d = rng.standard_normal(9).astype(np.float32)
    r_g = rng.standard_normal(9).astype(np.float32)
    loss, m = bt_reward_loss(r_d, r_g)
    np.testing.assert_allclose(float(loss), np_neg_log_sigmoid(r_d.astype(F64) - r_g).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), (r_d > r_g).mean())
    with pytest.raises(ValueError, match="r_gen"):
        bt_reward_loss(r_d, r_g[:4])


def _np_first_div(a, b, ma, mb):
    B, T = a.shape
    out = np.full(B, T)
    for i in range(B):
        for t in range(T):
            if bool(ma[i, t]) != bool(mb[i, t]) or (ma[i, t] and a[i, t] != b[i, t]):
                out[i] = t
                break
    return out


def _token_pairs(rng):
    B, T = 5, 10
    a = rng.integers(0, 6, (B, T)).astype(np.int32)
    b = a.copy()
    ma = np.ones((B, T), np.int32)
    mb = np.ones((B, T), np.int32)
    b[0, 4:] = (a[0, 4:] + 1) % 6           # differ from position 4
    ma[1, 7:] = 0                           # row 1: b longer, same prefix -> diverge at 7
    mb[1, 8:] = 0
    b[1, 7] = 3
    ma[2, 6:] = 0                           # row 2: identical sequences (different pad ids)
    mb[2, 6:] = 0
    b[2, 6:] = 0
    b[3, 2] = (a[3, 2] + 2) % 6             # row 3: single differing token at 2
    mb[4, 5:] = 0                           # row 4: b is a prefix of a
    return a, b, ma, mb


def test_first_divergence_matches_numpy(rng):
    a, b, ma, mb = _token_pairs(rng)
    got = np.asarray(first_divergence(a, b, ma, mb))
    want = _np_first_div(a, b, ma, mb)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, [4, 7, 10, 2, 5])


def test_bt_token_reward_loss_matches_numpy(rng):
    a, b, ma, mb = _token_pairs(rng)
    r_a = rng.standard_normal(a.shape).astype(np.float32)
    r_b = rng.standard_normal(a.shape).astype(np.float32)
    loss, m = bt_token_reward_loss(r_a, r_b, a, b, ma, mb)
    div = _np_first_div(a, b, ma, mb)
    per_row = []
    for i in range(a.shape[0]):
        ts = [t for t in range(a.shape[1]) if t >= div[i] and (ma[i, t] or mb[i, t])]
        if ts:
            per_row.append(np.mean([np_neg_log_sigmoid(float(r_a[i, t]) - float(r_b[i, t])) for t in ts]))
    np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-6)
    assert float(m["rows"]) == len(per_row) == 4


def test_kl_pg_loss_matches_numpy_and_gradient(rng):
    B, T, beta = 4, 6, 0.2
    logp = (-3 * rng.random((B, T))).astype(np.float32)
    ref = (-3 * rng.random((B, T))).astype(np.float32)
    rew = rng.standard_normal(B).astype(np.float32)
    mask = rng.integers(0, 2, (B, T)).astype(np.float32)
    mask[:, 0] = 1
    kl = ((logp.astype(F64) - ref) * mask).sum(1)
    ret = rew - beta * kl
    seq = (logp.astype(F64) * mask).sum(1)
    for baseline, b in (("mean", ret.mean()), ("none", 0.0),
                        ("loo", (ret.sum() - ret) / (B - 1))):
        adv = ret - b
        loss, m = kl_regularised_pg_loss(logp, ref, rew, mask, beta, baseline=baseline)
        np.testing.assert_allclose(float(loss), -(adv * seq).mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(m["kl"]), kl.mean(), rtol=1e-5, atol=1e-6)
        g_lp, g_ref, g_r = jax.grad(
            lambda x, y, z: kl_regularised_pg_loss(x, y, z, mask, beta, baseline=baseline)[0],
            argnums=(0, 1, 2))(logp, ref, rew)
        np.testing.assert_allclose(np.asarray(g_lp), -(adv[:, None] * mask) / B, rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(g_ref)) and not np.any(np.asarray(g_r))
    with pytest.raises(ValueError, match="baseline"):
        kl_regularised_pg_loss(logp, ref, rew, mask, beta, baseline="critic")
    with pytest.raises(ValueError, match="rewards"):
        kl_regularised_pg_loss(logp, ref, rew[:2], mask, beta)
    with pytest.raises(ValueError, match="beta"):
        kl_regularised_pg_loss(logp, ref, rew, mask, -1.0)
