"""dlconv.jax: the plain-JAX functions, values and gradients against jax.lax and jnp under
jax.jit, and the refusals they share with the bridge."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install -e '.[test]' brings it)")
jnp = jax.numpy

import dlconv.jax as dj  # noqa: E402


@pytest.mark.parametrize("strides,padding,dilation", [(1, "same", 1), (2, "valid", 1),
                                                      ((2, 1), ((1, 0), (2, 1)), 1), (1, "valid", 2)])
def test_conv2d_equals_lax_values_and_gradients(strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(4), jnp.float32)
    s = (strides, strides) if isinstance(strides, int) else strides
    d = (dilation, dilation)
    if isinstance(padding, str):
        from dlconv.shapes import conv_geometry
        g = conv_geometry(x.shape, w.shape, s, padding, d)
        pads = ((g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right))
    else:
        pads = padding

    def ours(x, w, b):
        return jnp.sum(jnp.sin(dj.conv2d(x, w, b, strides=strides, padding=padding, dilation=dilation,
                                         activation="tanh", backend="cpp")))

    def lax(x, w, b):
        y = jax.lax.conv_general_dilated(x, w, s, pads, rhs_dilation=d,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.sin(jnp.tanh(y + b)))

    v1, g1 = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, b)
    v2, g2 = jax.value_and_grad(lax, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    for a, e in zip(g1, g2):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))


def test_dense_equals_jnp_and_refuses_float64():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)
    y = jax.jit(lambda x, w: dj.dense(x, w, activation="softmax"))(x, w)
    np.testing.assert_allclose(y, jax.nn.softmax(x @ w), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="float32"):
        dj.dense(np.ones((2, 3)), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="strides"):
        dj.conv2d(x.reshape(1, 5, 7, 1), jnp.ones((1, 1, 1, 1), jnp.float32), strides=0)
