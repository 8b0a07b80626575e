"""The shared matmul helper: both of its forms against numpy, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swiftjax.models import layers


@pytest.mark.parametrize("lead", [(1,), (2,), (4, 4), (2, 16), (33,), (3, 40), (65,)])
def test_dense_equals_numpy_in_both_forms(lead):
    rs = np.random.RandomState(sum(lead))
    x = rs.randn(*lead, 24).astype(np.float32)
    w = rs.randn(40, 24).astype(np.float32)
    y = layers.dense(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-5, atol=1e-5)
    # the weight-left form is the one taken for a few rows on the CPU (and only there)
    rows = int(np.prod(lead))
    jaxpr = str(jax.make_jaxpr(layers.dense)(jnp.asarray(x), jnp.asarray(w)))
    assert ("optimization_barrier" in jaxpr) == layers.weight_left(rows)
    if jax.default_backend() == "cpu":
        assert layers.weight_left(rows) == (2 <= rows <= 64)


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_dense_gradients_equal_numpy(rows):
    rs = np.random.RandomState(rows)
    x, w = rs.randn(rows, 12).astype(np.float32), rs.randn(20, 12).astype(np.float32)
    g = rs.randn(rows, 20).astype(np.float32)  # d loss / d y
    gx, gw = jax.grad(lambda x, w: jnp.sum(layers.dense(x, w) * g), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(gx), g @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), g.T @ x, rtol=1e-5, atol=1e-5)


def test_dense_float32_accumulation_from_bfloat16():
    rs = np.random.RandomState(0)
    x, w = rs.randn(16, 64).astype(np.float32), rs.randn(8, 64).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y = layers.dense(xb, wb, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    ref = np.asarray(xb, np.float32) @ np.asarray(wb, np.float32).T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
