"""swiftjax.logprobs against plain numpy (float64) references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.logprobs import (
    masked_sum,
    sequence_logprob,
    shift_for_lm,
    token_logprobs,
    token_logprobs_from_hidden,
)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def np_token_logprobs(logits, targets):
    ls = np_log_softmax(logits)
    B, T = targets.shape
    out = np.empty((B, T))
    for b in range(B):
        for t in range(T):
            out[b, t] = ls[b, t, targets[b, t]]
    return out


def np_sequence_logprob(logits, ids, mask):
    ls = np_log_softmax(logits)
    B, T = ids.shape
    out = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                out[b] += ls[b, t - 1, ids[b, t]]
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _inputs(rng, B=3, T=7, V=11, scale=3.0):
    logits = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    return logits, targets


def test_token_logprobs_matches_numpy(rng):
    logits, targets = _inputs(rng)
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    np.testing.assert_allclose(np.asarray(got), np_token_logprobs(logits, targets), rtol=1e-6, atol=1e-5)


def test_token_logprobs_bf16_reduces_in_float32(rng):
    logits, targets = _inputs(rng, V=50, scale=5.0)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = token_logprobs(lb, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    # the reference sees exactly the bf16-rounded values, reduced in float64
    want = np_token_logprobs(np.asarray(lb.astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 3, 6, 7, 100])
def test_chunked_equals_unchunked(rng, chunk):
    logits, targets = _inputs(rng, B=2, T=7, V=13)
    full = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(targets), chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np_token_logprobs(logits, targets), rtol=1e-6, atol=1e-5)


def test_chunked_gradient_equals_unchunked(rng):
    logits, targets = _inputs(rng, B=2, T=5, V=9)
    w = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)

    def f(lg, chunk):
        return jnp.sum(w * token_logprobs(lg, jnp.asarray(targets), chunk_size=chunk))

    g_full = jax.grad(f)(jnp.asarray(logits), None)
    g_chunk = jax.grad(f)(jnp.asarray(logits), 2)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-6, atol=1e-6)
    # analytic: d/dlogits of w*lp = w*(onehot - softmax)
    p = np.exp(np_log_softmax(logits))
    onehot = np.eye(9)[targets]
    want = np.asarray(w)[..., None] * (onehot - p)
    np.testing.assert_allclose(np.asarray(g_full), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2, 5])
@pytest.mark.parametrize("use_bias", [False, True])
def test_from_hidden_matches_numpy(rng, chunk, use_bias):
    B, T, D, V = 2, 5, 4, 17
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    W = rng.standard_normal((V, D)).astype(np.float32)
    bias = rng.standard_normal(V).astype(np.float32) if use_bias else None
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    got = token_logprobs_from_hidden(jnp.asarray(h), jnp.asarray(W), jnp.asarray(targets),
                                     bias=None if bias is None else jnp.asarray(bias), chunk_size=chunk)
    logits = h.astype(np.float64) @ W.astype(np.float64).T + (0 if bias is None else bias)
    np.testing.assert_allclose(np.asarray(got), np_token_logprobs(logits, targets), rtol=1e-5, atol=1e-5)


def test_sequence_logprob_matches_numpy_with_padding(rng):
    B, T, V = 3, 8, 10
    logits, ids = _inputs(rng, B, T, V)
    mask = np.zeros((B, T), np.int32)
    mask[0, 3:8] = 1          # right-aligned response, no padding
    mask[1, 2:5] = 1          # right padding after position 4
    mask[2, 5:8] = 1          # left padding + prompt before
    got = sequence_logprob(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np_sequence_logprob(logits, ids, mask), rtol=1e-6, atol=1e-5)
    got_c = sequence_logprob(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask.astype(bool)), chunk_size=3)
    np.testing.assert_allclose(np.asarray(got_c), np.asarray(got), rtol=0, atol=1e-5)


def test_sequence_logprob_under_jit(rng):
    logits, ids = _inputs(rng, 2, 6, 7)
    mask = np.zeros((2, 6), np.float32)
    mask[:, 2:] = 1
    f = jax.jit(lambda lg, i, m: sequence_logprob(lg, i, m))
    np.testing.assert_allclose(np.asarray(f(logits, ids, mask)), np_sequence_logprob(logits, ids, mask),
                               rtol=1e-6, atol=1e-5)


def test_shift_for_lm_and_masked_sum(rng):
    ids = rng.integers(0, 9, size=(2, 5)).astype(np.int32)
    mask = rng.integers(0, 2, size=(2, 5)).astype(np.int32)
    inp, tgt, tm = shift_for_lm(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(inp), ids[:, :-1])
    np.testing.assert_array_equal(np.asarray(tgt), ids[:, 1:])
    np.testing.assert_array_equal(np.asarray(tm), mask[:, 1:])
    v = rng.standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(masked_sum(v, mask)), (v * mask).sum(1), rtol=1e-6)


def test_bad_inputs_raise(rng):
    logits, targets = _inputs(rng, 2, 4, 5)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, targets.astype(np.float32))
    with pytest.raises(ValueError, match=r"targets: expected shape \[B, T\]=\(2, 4\) matching logits"):
        token_logprobs(logits, targets[:, :3])
    with pytest.raises(ValueError, match=r"targets: expected shape \[B, T\]=\(2, 4\) matching hidden"):
        token_logprobs_from_hidden(np.zeros((2, 4, 3), np.float32), np.zeros((5, 3), np.float32), targets[:1])
    bad = targets.copy()
    bad[0, 0] = 5
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        token_logprobs(logits, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)
    mask = np.zeros((2, 4), np.int32)
    mask[:, 2:] = 1
    m0 = mask.copy()
    m0[1, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob(logits, targets, m0)
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match="empty"):
        sequence_logprob(logits, targets, empty)
    got = sequence_logprob(logits, targets, empty, allow_empty=True)
    assert float(got[1]) == 0.0
    with pytest.raises(ValueError, match="response_mask"):
        sequence_logprob(logits, targets, mask[:, :3])
    with pytest.raises(ValueError, match="unembed"):
        token_logprobs_from_hidden(np.zeros((2, 4, 3), np.float32), np.zeros((5, 2), np.float32), targets)
    with pytest.raises(ValueError, match="at least 2"):
        shift_for_lm(targets[:, :1], mask[:, :1])
