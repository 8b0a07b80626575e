"""swiftjax.methods.genarm.arm (GenARM) against plain numpy (float64) references written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.methods.genarm import arm as arm_mod
from swiftjax.methods.genarm.arm import (
    arm_loss,
    arm_reward,
    check_vocab_compatible,
    guided_logits,
    guided_logprobs,
    sample_guided,
)

F64 = np.float64


def np_log_softmax(x):
    x = np.asarray(x, F64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def np_guided(base, arms, alphas):
    V = base.shape[-1]
    s = np_log_softmax(base)
    for a, al in zip(arms, alphas):
        s = s + al * np_log_softmax(a)[:, :V]
    return s


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- ARM loss


def test_arm_loss_sigmoid_matches_numpy(rng):
    w = (-40 + 10 * rng.standard_normal(8)).astype(np.float32)
    l = (-45 + 10 * rng.standard_normal(8)).astype(np.float32)
    for beta_r, gamma in ((0.05, 0.0), (0.5, 0.3)):
        loss, m = arm_loss(w, l, beta_r, gamma)
        z = beta_r * (w.astype(F64) - l)
        np.testing.assert_allclose(float(loss), np.logaddexp(0, -(z - gamma)).mean(), rtol=1e-6)
        np.testing.assert_allclose(float(m["accuracy"]), (z > 0).mean())
        np.testing.assert_allclose(float(m["reward_margin"]), z.mean(), rtol=1e-5)


def test_arm_loss_hinge_and_length_normalisation(rng):
    w = (-40 + 10 * rng.standard_normal(8)).astype(np.float32)
    l = (-45 + 10 * rng.standard_normal(8)).astype(np.float32)
    loss, _ = arm_loss(w, l, 0.05, kind="hinge")
    z = 0.05 * (w.astype(F64) - l)
    np.testing.assert_allclose(float(loss), np.maximum(0, 1 - z).mean(), rtol=1e-6)
    lw = rng.integers(5, 30, 8).astype(np.float32)
    ll = rng.integers(5, 30, 8).astype(np.float32)
    loss_n, _ = arm_loss(w, l, 0.5, length_normalize=True, len_w=lw, len_l=ll)
    zn = 0.5 * (w.astype(F64) / lw - l.astype(F64) / ll)
    np.testing.assert_allclose(float(loss_n), np.logaddexp(0, -zn).mean(), rtol=1e-6)


def test_arm_loss_gradient(rng):
    w = (-40 + 10 * rng.standard_normal(4)).astype(np.float32)
    l = (-45 + 10 * rng.standard_normal(4)).astype(np.float32)
    gw, gl = jax.grad(lambda a, b: arm_loss(a, b, 0.1, 0.2)[0], argnums=(0, 1))(w, l)
    z = 0.1 * (w.astype(F64) - l) - 0.2
    want = -0.1 * (1 / (1 + np.exp(z))) / 4
    np.testing.assert_allclose(np.asarray(gw), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gl), -want, rtol=1e-5)


def test_arm_reward(rng):
    lp = (-30 * rng.random(5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(arm_reward(lp, 0.05)), 0.05 * lp.astype(F64), rtol=1e-6)


def test_arm_loss_bad_inputs(rng):
    w = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="kind"):
        arm_loss(w, w, kind="ipo")
    with pytest.raises(ValueError, match="gamma"):
        arm_loss(w, w, gamma=0.1, kind="hinge")
    with pytest.raises(ValueError, match="len_w"):
        arm_loss(w, w, length_normalize=True)
    with pytest.raises(ValueError, match="len_w"):
        arm_loss(w, w, length_normalize=True, len_w=np.zeros(3), len_l=np.ones(3))
    with pytest.raises(ValueError, match="beta_r"):
        arm_loss(w, w, beta_r=0.0)
    with pytest.raises(ValueError, match="arm_l"):
        arm_loss(w, w[:2])
    with pytest.raises(ValueError, match="arm_w"):
        arm_loss(np.zeros((3, 1), np.float32), w)


# ----------------------------------------------------------------------------- guided decoding


def _logits(rng, B=3, V=12, K=2, V_arm=None):
    base = (2 * rng.standard_normal((B, V))).astype(np.float32)
    arms = (2 * rng.standard_normal((K, B, V_arm or V))).astype(np.float32)
    return base, arms


def test_guided_logits_match_numpy_stacked_and_list(rng):
    base, arms = _logits(rng, V=12, K=2, V_arm=15)
    alphas = np.array([0.7, 1.8], np.float32)
    want = np_guided(base, arms, alphas)
    got = guided_logits(base, arms, alphas)
    assert got.shape == base.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
    # a list of ARMs with different (longer) vocabularies
    arm2 = (2 * rng.standard_normal((3, 20))).astype(np.float32)
    lst = [arms[0], arm2]
    got_l = guided_logits(base, lst, alphas)
    np.testing.assert_allclose(np.asarray(got_l), np_guided(base, lst, alphas), rtol=1e-6, atol=1e-5)


def test_alpha_zero_is_base_log_softmax(rng):
    base, arms = _logits(rng)
    got = guided_logits(base, arms, np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(got), np_log_softmax(base), rtol=1e-6, atol=1e-6)
    lp = guided_logprobs(base, arms, np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(lp), np_log_softmax(base), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
def test_guided_distribution_is_product_of_experts(rng, T):
    base, arms = _logits(rng, V=9, K=2, V_arm=11)
    alphas = np.array([1.0, 0.4], np.float32)
    got = np.asarray(guided_logprobs(base, arms, alphas, temperature=T), F64)
    # p ∝ (pi_base * prod_i pi_arm_i[:V]^alpha_i)^(1/T), normalised over the base vocabulary
    pb = np.exp(np_log_softmax(base))
    unnorm = pb.copy()
    for a, al in zip(arms, alphas):
        unnorm = unnorm * np.exp(np_log_softmax(a))[:, :9] ** al
    unnorm = unnorm ** (1 / T)
    want = np.log(unnorm / unnorm.sum(-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)


def test_truncation_normalisation_order_does_not_change_distribution(rng):
    base, arms = _logits(rng, V=8, K=1, V_arm=13)
    alphas = np.array([1.3], np.float32)
    a = np.asarray(guided_logprobs(base, arms, alphas))
    b = np.asarray(guided_logprobs(base, arms[:, :, :8], alphas))  # truncate first, then normalise
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sample_guided_frequencies(rng):
    base, arms = _logits(rng, B=1, V=5, K=1)
    alphas = np.array([1.5], np.float32)
    n = 20000
    probs = np.exp(np_guided(base, arms, alphas))
    probs = probs / probs.sum(-1, keepdims=True)
    toks = np.asarray(sample_guided(jax.random.key(0), np.repeat(base, n, 0), np.repeat(arms, n, 1), alphas))
    assert toks.dtype == np.int32 and toks.min() >= 0 and toks.max() < 5
    freq = np.bincount(toks, minlength=5) / n
    np.testing.assert_allclose(freq, probs[0], atol=0.015)


def test_alphas_do_not_retrace(rng):
    base, arms = _logits(rng)
    traces = {"n": 0}

    def step(b, a, al):
        traces["n"] += 1  # Python side effect: runs once per trace only
        return guided_logprobs(b, a, al)

    jstep = jax.jit(step)
    outs = []
    for al in ([0.0, 0.0], [1.0, 0.5], [3.0, -0.2]):
        outs.append(np.asarray(jstep(base, arms, np.asarray(al, np.float32))))
    assert traces["n"] == 1
    for out, al in zip(outs, ([0.0, 0.0], [1.0, 0.5], [3.0, -0.2])):
        np.testing.assert_allclose(out, np_log_softmax(np_guided(base, arms, al)), rtol=1e-5, atol=1e-5)
    # the library's own jitted kernel, called eagerly with new alphas, is not recompiled
    guided_logits(base, arms, np.asarray([0.1, 0.2], np.float32))
    n0 = arm_mod._scores_jit._cache_size()
    for al in ([0.3, 0.4], [5.0, 6.0], [-1.0, 2.0]):
        guided_logits(base, arms, np.asarray(al, np.float32))
    assert arm_mod._scores_jit._cache_size() == n0


def test_guided_bad_inputs(rng):
    base, arms = _logits(rng, V=12, K=2)
    with pytest.raises(ValueError, match="shorter"):
        guided_logits(base, arms[:, :, :10], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="shorter"):
        guided_logits(base, [arms[0], arms[1][:, :11]], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="alphas"):
        guided_logits(base, arms, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="batch"):
        guided_logits(base, arms[:, :2], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="empty"):
        guided_logits(base, [], np.ones(0, np.float32))
    with pytest.raises(ValueError, match="temperature"):
        guided_logprobs(base, arms, np.ones(2, np.float32), temperature=0.0)
    with pytest.raises(ValueError, match="base_logits"):
        guided_logits(base[None], arms, np.ones(2, np.float32))


# ----------------------------------------------------------------------------- vocabularies


class _Tok:
    def __init__(self, vocab):
        self._v = vocab

    def get_vocab(self):
        return dict(self._v)


def test_check_vocab_compatible():
    base = {"<s>": 0, "a": 1, "b": 2, "c": 3}
    assert check_vocab_compatible(base, dict(base)) == 4
    assert check_vocab_compatible(_Tok(base), _Tok({**base, "<pad>": 4, "d": 5})) == 4
    with pytest.raises(ValueError, match=r"id 2: base 'b' vs arm 'x'"):
        check_vocab_compatible(base, {"<s>": 0, "a": 1, "x": 2, "c": 3})
    with pytest.raises(ValueError, match="2 of 4 ids"):
        check_vocab_compatible(base, {"<s>": 0, "a": 1, "c": 2, "b": 3})
    with pytest.raises(ValueError, match="cannot score"):
        check_vocab_compatible(base, {"<s>": 0, "a": 1, "b": 2})
    with pytest.raises(ValueError, match="get_vocab"):
        check_vocab_compatible(["a", "b"], base)
    with pytest.raises(ValueError, match="two tokens"):
        check_vocab_compatible({"a": 0, "b": 0}, base)


def test_check_vocab_compatible_real_tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    t1 = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t2 = Tokenizer(models.WordLevel({"<unk>": 0, "world": 1, "hello": 2}, unk_token="<unk>"))
    assert check_vocab_compatible(t1, t1) == 3
    with pytest.raises(ValueError, match="id 1"):
        check_vocab_compatible(t1, t2)
