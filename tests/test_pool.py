"""The max pool (issue 10): dlconv.shapes.pool_geometry, the NumPy reference against
tf.nn.max_pool2d and its gradient (values, ties, NaN / ±Inf), the C++ kernel (forward with and
without the stored index, both backward paths) against the reference, dlconv.ops' input rules,
and the torch and JAX bridges against the reference and the framework's own pool (values and
gradients; torch.library.opcheck; jax.jit / grad / vmap).  Plain frameworks, no Keras: the
Keras layer runs under each Keras backend in tests/keras_own (Keras' own pooling tests) and
tests/keras_suite/test_pool_layer.py, each in its own process.

Rules checked (TensorFlow's, measured): y = max(lowest float32, max of the non-NaN members);
the gradient goes to the first member in row-major window order unless a later one is strictly
greater; padding is never a member.  torch and JAX propagate NaN, so they are compared on
finite inputs (with ties) only.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import ops, reference
from dlconv.shapes import pool_geometry

from conftest import cpu_backend_params

CPP = [p for p in cpu_backend_params() if p.values[0] == "cpp"]
POOL_BACKENDS = [p for p in cpu_backend_params() if p.values[0] in ("cpp", "reference", "numba")]
CHANNELS = (1, 3, 16, 17, 64)    # scalar only, tail only, one vector, vector + tail, 4 vectors


@st.composite
def pool_cases(draw):
    """(x, pool, strides, padding): pool 1-3, stride 1-3, valid/same, ragged edges; integer
    values (many ties), some NaN / ±Inf."""
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(st.sampled_from(["valid", "same"]))
    h = draw(st.integers(ph if padding == "valid" else 1, 9))
    w = draw(st.integers(pw if padding == "valid" else 1, 9))
    c = draw(st.sampled_from(CHANNELS))
    n = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    nonfinite = draw(st.booleans())
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n, h, w, c)).astype(np.float32)
    if nonfinite:
        m = rng.random(x.shape)
        x[m < 0.1] = np.nan
        x[(m >= 0.1) & (m < 0.15)] = -np.inf
        x[(m >= 0.15) & (m < 0.2)] = np.inf
    return x, (ph, pw), (sh, sw), padding


def _dy(y, seed=1):
    return np.random.default_rng(seed).random(y.shape).astype(np.float32)


# ----------------------------------------------------------------------------- geometry
def test_pool_geometry_is_the_depthwise_conv_record():
    g = pool_geometry((2, 5, 5, 3), 2, None, "same")
    assert (g.k_h, g.k_w, g.stride_h, g.stride_w) == (2, 2, 2, 2)        # strides=None: the pool
    assert (g.groups, g.filters, g.out_h, g.out_w) == (3, 3, 3, 3)
    assert (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (0, 1, 0, 1)   # TF: extra after
    g = pool_geometry((1, 7, 6, 4), (3, 2), (2, 1), "valid")
    assert (g.out_h, g.out_w) == (3, 5)


@pytest.mark.parametrize("args, match", [
    (((1, 1, 1, 3), 2, None, "valid"), r"pool_size \(height\)=2 is larger"),
    (((1, 4, 4, 3), 0, None, "valid"), "pool_size"),
    (((1, 4, 4, 3), 2, 0, "valid"), "strides"),
    (((1, 4, 4, 3), 2, None, 1), "padding must be 'valid' or 'same'"),
    (((4, 4, 3), 2, None, "valid"), "rank 4"),
])
def test_pool_geometry_refuses_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        pool_geometry(*args)


# ----------------------------------------------------------------------------- reference vs TF
@settings(max_examples=40, deadline=None)
@given(pool_cases())
def test_reference_matches_tensorflow(case):
    tf = pytest.importorskip("tensorflow")
    x, pool, strides, padding = case
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = tf.nn.max_pool2d(xt, pool, strides, padding.upper())
    dy = _dy(yt)
    dxt = tape.gradient(yt, xt, output_gradients=tf.constant(dy)).numpy()
    np.testing.assert_array_equal(reference.max_pool2d(x, pool, strides, padding), yt.numpy())
    np.testing.assert_allclose(reference.max_pool2d_backward(x, dy, pool, strides, padding), dxt,
                               rtol=1e-6, atol=1e-6)


def test_reference_tie_and_nan_rules_by_hand():
    x = np.array([[1, 3, 3, 0], [3, 2, 1, 3], [np.nan, 1, 5, 5], [2, np.nan, 5, 5]],
                 np.float32).reshape(1, 4, 4, 1)
    y, arg = reference.max_pool2d_argmax(x, 2)
    np.testing.assert_array_equal(y.ravel(), [3, 3, 2, 5])        # NaN ignored (TF)
    np.testing.assert_array_equal(arg.ravel(), [1, 2, 8, 10])     # first max; a NaN first keeps it
    y = reference.max_pool2d(np.full((1, 3, 3, 1), -np.inf, np.float32), 2, 2, "same")
    np.testing.assert_array_equal(y.ravel(), [reference.POOL_LOWEST] * 4)


# ----------------------------------------------------------------------------- C++ kernel
@pytest.mark.parametrize("backend", CPP)
@settings(max_examples=60, deadline=None)
@given(pool_cases())
def test_cpp_kernel_matches_reference(backend, case):
    x, pool, strides, padding = case
    y_ref, arg_ref = reference.max_pool2d_argmax(x, pool, strides, padding)
    y, arg = ops.max_pool2d(x, pool, strides, padding, backend=backend, return_argmax=True)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(ops.max_pool2d(x, pool, strides, padding, backend=backend), y_ref)
    dy = _dy(y)
    dx_ref = reference.max_pool2d_backward(x, dy, pool, strides, padding)
    for a in (arg, None):          # gather from the stored index; recomputed from x
        dx = ops.max_pool2d_backward(dy, x, pool, strides, padding, backend=backend, arg=a)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", POOL_BACKENDS)
def test_every_backend_runs_the_pool(backend):
    x = np.random.default_rng(0).standard_normal((2, 6, 5, 17)).astype(np.float32)
    y = ops.max_pool2d(x, 3, 2, "same", backend=backend)
    np.testing.assert_array_equal(y, reference.max_pool2d(x, 3, 2, "same"))
    dy = _dy(y)
    np.testing.assert_allclose(ops.max_pool2d_backward(dy, x, 3, 2, "same", backend=backend),
                               reference.max_pool2d_backward(x, dy, 3, 2, "same"), rtol=1e-6)


@pytest.mark.parametrize("backend", CPP)
def test_cpp_checks_geometry_and_buffers(backend):
    from dlconv import _C
    x = np.zeros((1, 4, 4, 3), np.float32)
    g = pool_geometry(x.shape, 2)
    with pytest.raises(ValueError, match="not a pool geometry"):          # a conv record
        _C.max_pool2d_forward(x, g.as_tuple()[:17] + (1,), None, None)
    with pytest.raises(ValueError, match=r"y has shape \(1, 3, 2, 3\)"):
        _C.max_pool2d_forward(x, g.as_tuple(), np.zeros((1, 3, 2, 3), np.float32), None)
    with pytest.raises(TypeError, match="arg must be int32"):
        _C.max_pool2d_forward(x, g.as_tuple(), None, np.zeros(g.y_shape, np.int64))
    with pytest.raises(ValueError, match="needs arg"):
        _C.max_pool2d_backward(np.zeros(g.y_shape, np.float32), g.as_tuple(), None, None, None)


def test_ops_input_rules():
    x = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(TypeError, match="float32"):
        ops.max_pool2d(x.astype(np.float64))
    with pytest.raises(ValueError, match="rank 4"):
        ops.max_pool2d(x[0])
    with pytest.raises(ValueError, match=r"dy has shape"):
        ops.max_pool2d_backward(np.zeros((1, 3, 3, 3), np.float32), x)
    with pytest.raises(TypeError, match="arg must be an int32"):
        ops.max_pool2d_backward(np.zeros((1, 2, 2, 3), np.float32), x, arg=np.zeros((1, 2, 2, 3)))
    y = ops.max_pool2d(np.zeros((0, 4, 4, 3), np.float32))               # empty batch
    assert y.shape == (0, 2, 2, 3)
    view = np.arange(96, dtype=np.float32).reshape(1, 4, 8, 3)[:, :, ::2]  # strided: one copy
    np.testing.assert_array_equal(ops.max_pool2d(view, backend="cpp" if CPP else "reference"),
                                  reference.max_pool2d(np.ascontiguousarray(view)))


# ----------------------------------------------------------------------------- torch bridge
@pytest.mark.parametrize("backend", CPP + ["reference"])
@settings(max_examples=15, deadline=None)
@given(pool_cases())
def test_torch_bridge_matches_reference_and_torch(backend, case):
    torch = pytest.importorskip("torch")
    from dlconv.bridges import torch as bt
    x, pool, strides, padding = case
    xt = torch.tensor(x, requires_grad=True)
    y = bt.max_pool2d(xt, pool_size=pool, strides=strides, padding=padding, backend=backend)
    dy = _dy(y)
    y.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y.detach().numpy(), reference.max_pool2d(x, pool, strides, padding))
    np.testing.assert_allclose(xt.grad.numpy(), reference.max_pool2d_backward(x, dy, pool, strides, padding),
                               rtol=1e-6, atol=1e-6)
    if padding == "valid" and np.isfinite(x).all():      # torch's own pool (NCHW; no TF "same")
        xs = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
        ys = torch.nn.functional.max_pool2d(xs, pool, strides)
        ys.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
        np.testing.assert_array_equal(y.detach().numpy(), ys.detach().numpy().transpose(0, 2, 3, 1))
        np.testing.assert_allclose(xt.grad.numpy(), xs.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6)


def test_torch_opcheck_and_bad_input():
    torch = pytest.importorskip("torch")
    from dlconv.bridges import torch as bt
    x = torch.randn(2, 7, 6, 17, requires_grad=True)
    torch.library.opcheck(torch.ops.dlconv.max_pool2d.default, (x, [3, 2], [2, 1], "same", "auto"))
    with pytest.raises(TypeError, match="float32"):
        bt.max_pool2d(x.double())
    with pytest.raises(ValueError, match="rank 4"):
        bt.max_pool2d(x[0])


# ----------------------------------------------------------------------------- JAX bridge
@pytest.mark.parametrize("backend", CPP + ["reference"])
@settings(max_examples=12, deadline=None)
@given(pool_cases())
def test_jax_bridge_jit_grad_match_reference_and_lax(backend, case):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from dlconv.bridges import jax as bj
    x, pool, strides, padding = case
    dy = _dy(reference.max_pool2d(x, pool, strides, padding))

    def f(a):
        return bj.max_pool2d(a, pool_size=pool, strides=strides, padding=padding, backend=backend)

    y = jax.jit(f)(x)
    dx = jax.jit(jax.grad(lambda a: jnp.sum(f(a) * dy)))(x)
    np.testing.assert_array_equal(np.asarray(y), reference.max_pool2d(x, pool, strides, padding))
    np.testing.assert_allclose(np.asarray(dx), reference.max_pool2d_backward(x, dy, pool, strides, padding),
                               rtol=1e-6, atol=1e-6)
    if np.isfinite(x).all():             # XLA's reduce_window (TF's "same" split via explicit pads)
        g = pool_geometry(x.shape, pool, strides, padding)
        pads = ((0, 0), (g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right), (0, 0))

        def lax(a):
            return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, *pool, 1), (1, *strides, 1), pads)

        np.testing.assert_array_equal(np.asarray(y), np.asarray(lax(x)))
        np.testing.assert_allclose(np.asarray(dx), np.asarray(jax.grad(lambda a: jnp.sum(lax(a) * dy))(x)),
                                   rtol=1e-6)


@pytest.mark.parametrize("backend", CPP)
def test_jax_ffi_program_vmap_and_bad_input(backend):
    jax = pytest.importorskip("jax")
    from dlconv.bridges import jax as bj
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 5, 17)).astype(np.float32)

    def f(a):
        return bj.max_pool2d(a, pool_size=2, strides=1, padding="same", backend=backend)

    assert bj.pool_path_for(backend) == "ffi"
    text = jax.jit(jax.grad(lambda a: f(a).sum())).lower(x[0]).as_text()
    assert "dlconv_max_pool2d_forward" in text and "dlconv_max_pool2d_backward" in text
    assert "callback" not in text
    yv = jax.jit(jax.vmap(f))(x)                                      # VMAP_METHOD = "sequential"
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(yv[i]), reference.max_pool2d(x[i], 2, 1, "same"))
    with pytest.raises(TypeError, match="float32"):
        bj.max_pool2d(x[0].astype(np.float64))
    with pytest.raises(ValueError, match="pool_size"):
        bj.max_pool2d(x[0], pool_size=7, padding="valid")
