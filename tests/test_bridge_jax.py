"""The JAX bridge (dlconv.bridges.jax): values and gradients against jax.lax / jnp.dot and
dlconv.reference, under jax.jit, jax.grad and jax.vmap, over generated geometries, for every
CPU backend; the jitted program of the cpp backend holds the FFI custom calls and no Python
callback; bad input is refused at trace time; the FFI handlers return errors, never crash.

No Keras here (its backend is fixed per process): plain JAX in this process.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install -e '.[jax]'); "
                                        "the JAX bridge cannot be tested without it")
import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dlconv import reference  # noqa: E402
from dlconv.bridges import jax as bridge  # noqa: E402
from dlconv.shapes import conv_geometry  # noqa: E402

from conftest import cpu_backend_params  # noqa: E402

BACKENDS = cpu_backend_params()
CPU_NAMES = [p.values[0] for p in BACKENDS if not p.marks]
ACTS = {"linear": lambda v: v, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}
DENSE_ACTS = {**ACTS, "softmax": jax.nn.softmax}
RTOL, ATOL = 1e-4, 1e-4          # float32 sums of up to a few hundred terms
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-3


def _f32(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _lax_conv(x, w, b, g, act):
    """The framework's own op, on the geometry's explicit pads."""
    y = jax.lax.conv_general_dilated(
        x, w, (g.stride_h, g.stride_w), ((g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right)),
        rhs_dilation=(g.dil_h, g.dil_w), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    return ACTS[act](y if b is None else y + b)


def _loss(f):
    """A loss whose gradient is not all-ones (sin weights every output differently)."""
    return lambda *a: jnp.sum(jnp.sin(f(*a)))


@st.composite
def conv_cases(draw):
    k_h, k_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["valid", "same", "explicit"]))
    pad = kind if kind != "explicit" else tuple(
        (draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    ext_h, ext_w = (k_h - 1) * d[0] + 1, (k_w - 1) * d[1] + 1
    h = draw(st.integers(ext_h, ext_h + 6))        # big enough for "valid"; ragged vs stride
    w = draw(st.integers(ext_w, ext_w + 6))
    x_shape = (draw(st.integers(1, 3)), h, w, draw(st.integers(1, 5)))
    w_shape = (k_h, k_w, x_shape[3], draw(st.integers(1, 6)))
    return x_shape, w_shape, s, pad, d, draw(st.booleans()), draw(st.sampled_from(sorted(ACTS))), \
        draw(st.sampled_from(CPU_NAMES))


@settings(max_examples=24)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv2d_values_and_gradients(case, seed):
    x_shape, w_shape, s, pad, d, use_bias, act, backend = case
    g = conv_geometry(x_shape, w_shape, s, pad, d)
    rng = np.random.default_rng(seed)
    x, w = _f32(rng, x_shape), _f32(rng, w_shape, 0.5)
    b = _f32(rng, (w_shape[3],)) if use_bias else None

    def ours(x, w, *b):
        return bridge.conv2d(x, w, b[0] if b else None, strides=s, padding=pad, dilation=d,
                             activation=act, backend=backend)

    args = (x, w) + ((b,) if use_bias else ())
    y = jax.jit(ours)(*args)
    np.testing.assert_allclose(y, _lax_conv(x, w, b, g, act), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y, reference.conv2d_forward(np.asarray(x), np.asarray(w),
                                                           None if b is None else np.asarray(b), g, act),
                               rtol=RTOL, atol=ATOL)
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(_loss(ours), argnums=argnums))(*args)
    want = jax.grad(_loss(lambda x, w, *b: _lax_conv(x, w, b[0] if b else None, g, act)),
                    argnums=argnums)(*args)
    for name, a, c in zip(("dx", "dw", "db"), got, want):
        np.testing.assert_allclose(a, c, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)
    if act == "linear":          # the backward passes against the NumPy oracle as well
        dy = np.cos(np.asarray(y, np.float64)).astype(np.float32)
        np.testing.assert_allclose(got[0], reference.conv2d_backward_data(dy, np.asarray(w), g),
                                   rtol=GRAD_RTOL, atol=GRAD_ATOL)
        dw_ref, db_ref = reference.conv2d_backward_filter(np.asarray(x), dy, g)
        np.testing.assert_allclose(got[1], dw_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        if use_bias:
            np.testing.assert_allclose(got[2], db_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@settings(max_examples=16)
@given(batch=st.integers(1, 9), n_in=st.integers(1, 40), n_out=st.integers(1, 20),
       use_bias=st.booleans(), act=st.sampled_from(sorted(DENSE_ACTS)),
       backend=st.sampled_from(CPU_NAMES), seed=st.integers(0, 2**16))
def test_dense_values_and_gradients(batch, n_in, n_out, use_bias, act, backend, seed):
    rng = np.random.default_rng(seed)
    x, w = _f32(rng, (batch, n_in)), _f32(rng, (n_in, n_out), 0.3)
    b = _f32(rng, (n_out,)) if use_bias else None
    args = (x, w) + ((b,) if use_bias else ())

    def ours(x, w, *b):
        return bridge.dense(x, w, b[0] if b else None, activation=act, backend=backend)

    def stock(x, w, *b):
        z = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        return DENSE_ACTS[act](z + b[0] if b else z)

    y = jax.jit(ours)(*args)
    np.testing.assert_allclose(y, stock(*args), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y, reference.dense_forward(np.asarray(x), np.asarray(w),
                                                          None if b is None else np.asarray(b), act),
                               rtol=RTOL, atol=ATOL)
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(_loss(ours), argnums=argnums))(*args)
    want = jax.grad(_loss(stock), argnums=argnums)(*args)
    for name, a, c in zip(("dx", "dw", "db"), got, want):
        np.testing.assert_allclose(a, c, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_conv_and_dense(backend):
    """jax.vmap over a leading axis of x (and of the weights), forward and gradient."""
    rng = np.random.default_rng(7)
    xs, w, b = _f32(rng, (3, 2, 6, 5, 3)), _f32(rng, (3, 3, 3, 4), 0.5), _f32(rng, (4,))
    g = conv_geometry((2, 6, 5, 3), (3, 3, 3, 4), (2, 1), "same", (1, 1))

    def conv(x, w, b):
        return bridge.conv2d(x, w, b, strides=(2, 1), padding="same", dilation=(1, 1),
                             activation="tanh", backend=backend)

    ys = jax.jit(jax.vmap(conv, in_axes=(0, None, None)))(xs, w, b)
    for i in range(3):
        np.testing.assert_allclose(ys[i], _lax_conv(xs[i], w, b, g, "tanh"), rtol=RTOL, atol=ATOL)
    ws = jnp.stack([w, 2 * w])              # batched weights too (a per-example model)
    gw = jax.jit(jax.vmap(jax.grad(_loss(conv), argnums=1), in_axes=(None, 0, None)))(xs[0], ws, b)
    for i in range(2):
        want = jax.grad(_loss(lambda x, w, b: _lax_conv(x, w, b, g, "tanh")), argnums=1)(xs[0], ws[i], b)
        np.testing.assert_allclose(gw[i], want, rtol=GRAD_RTOL, atol=GRAD_ATOL)

    xd, wd = _f32(rng, (4, 5, 7)), _f32(rng, (7, 3))
    yd = jax.jit(jax.vmap(lambda x: bridge.dense(x, wd, None, activation="softmax", backend=backend)))(xd)
    np.testing.assert_allclose(yd, jax.nn.softmax(jnp.einsum("bij,jk->bik", xd, wd)), rtol=RTOL, atol=1e-5)


def _hlo(backend):
    rng = np.random.default_rng(0)
    x, w, b = _f32(rng, (2, 5, 5, 3)), _f32(rng, (3, 3, 3, 4)), _f32(rng, (4,))
    wd = _f32(rng, (4 * 3 * 3, 5))

    def loss(x, w, b, wd):
        y = bridge.conv2d(x, w, b, strides=(1, 1), padding="valid", dilation=(1, 1),
                          activation="relu", backend=backend)
        return jnp.sum(bridge.dense(y.reshape(2, -1), wd, None, activation="softmax", backend=backend) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, w, b, wd).as_text()


def test_cpp_jitted_step_is_ffi_calls_without_python_callback():
    if bridge.path_for("cpp") != "ffi":
        pytest.skip("dlconv._C was built without the XLA FFI handlers: " + bridge.ffi_status("cpu")[1])
    text = _hlo("cpp")
    for target in ("dlconv_conv2d_forward", "dlconv_conv2d_backward_data", "dlconv_conv2d_backward_filter",
                   "dlconv_dense_forward", "dlconv_softmax", "dlconv_activation_backward",
                   "dlconv_dense_backward"):
        assert f"@{target}" in text or f'"{target}"' in text, target
    assert "callback" not in text.lower()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cpp"])
def test_other_backends_run_as_pure_callbacks(backend):
    assert bridge.path_for(backend) == "callback"
    text = _hlo(backend)
    assert "callback" in text.lower() and "dlconv_conv2d_forward" not in text


# ----------------------------------------------------------------------------- bad input
def _conv(x, w, b=None, **kw):
    kw = {"strides": (1, 1), "padding": "valid", "dilation": (1, 1), "backend": "cpp", **kw}
    return bridge.conv2d(x, w, b, **kw)


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_bad_dtype_and_shapes_are_refused_at_trace_time(wrap):
    x, w = jnp.zeros((1, 5, 5, 3), jnp.float32), jnp.zeros((3, 3, 3, 2), jnp.float32)
    with pytest.raises(TypeError, match="x must be float32, got float16"):
        wrap(_conv)(x.astype(jnp.float16), w)
    with pytest.raises(TypeError, match="kernel must be float32, got int32"):
        wrap(_conv)(x, w.astype(jnp.int32))
    with pytest.raises(TypeError, match="bias must be float32"):
        wrap(_conv)(x, w, jnp.zeros(2, jnp.bfloat16))
    with pytest.raises(ValueError, match="channel"):
        wrap(_conv)(x, jnp.zeros((3, 3, 4, 2), jnp.float32))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(2,\)"):
        wrap(_conv)(x, w, jnp.zeros(3, jnp.float32))
    with pytest.raises(ValueError, match="kernel"):
        wrap(_conv)(jnp.zeros((1, 2, 2, 3), jnp.float32), w)
    with pytest.raises(ValueError, match="feature mismatch"):
        wrap(lambda a, b: bridge.dense(a, b, None))(jnp.zeros((2, 5), jnp.float32), jnp.zeros((4, 3), jnp.float32))
    with pytest.raises(TypeError, match="x must be float32, got float16"):
        wrap(lambda a, b: bridge.dense(a, b, None))(jnp.zeros((2, 4), jnp.float16), jnp.zeros((4, 3), jnp.float32))


def test_float64_numpy_input_is_refused_not_narrowed():
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        _conv(np.zeros((1, 5, 5, 3)), jnp.zeros((3, 3, 3, 2), jnp.float32))
    with pytest.raises(TypeError, match="kernel must be float32, got float64"):
        bridge.dense(jnp.zeros((2, 4), jnp.float32), np.zeros((4, 3)), None)
    with pytest.raises(TypeError, match="x must be a float32 array, got list"):
        bridge.dense([[1, 2]], jnp.zeros((2, 3), jnp.float32), None)


def test_ffi_handlers_return_errors_instead_of_crashing():
    """Called directly with a wrong geometry, a wrong shape or a wrong dtype, the handlers
    report an error naming the buffer (XLA raises it); the process carries on."""
    if bridge.path_for("cpp") != "ffi":          # on a GPU machine: the CUDA handlers
        pytest.skip("no XLA FFI handlers for the cpp backend here: " + bridge.ffi_status(
            "CUDA" if jax.default_backend() == "gpu" else "cpu")[1])
    g = conv_geometry((1, 5, 5, 3), (3, 3, 3, 2))
    x, w = jnp.ones((1, 5, 5, 3), jnp.float32), jnp.ones((3, 3, 3, 2), jnp.float32)
    out = jax.ShapeDtypeStruct(g.y_shape, jnp.float32)
    call = jax.ffi.ffi_call("dlconv_conv2d_forward", out)
    geo = np.asarray(g.as_tuple(), np.int64)
    attrs = {"act": np.int64(0), "variant": np.int64(0)}
    with pytest.raises(Exception, match=r"dlconv XLA FFI dlconv_conv2d_forward: x has shape \(1, 5, 4, 3\)"):
        jax.block_until_ready(call(x[:, :, :4], w, geometry=geo, **attrs))
    with pytest.raises(Exception, match="w must be float32"):
        jax.block_until_ready(call(x, w.astype(jnp.float16), geometry=geo, **attrs))
    bad = geo.copy()
    bad[15] += 1                                  # out_h inconsistent with the other fields
    with pytest.raises(Exception, match="invalid geometry"):
        jax.block_until_ready(call(x, w, geometry=bad, **attrs))
    with pytest.raises(Exception, match="17 fields"):
        jax.block_until_ready(call(x, w, geometry=geo[:5], **attrs))
    with pytest.raises(Exception, match="activation code"):
        jax.block_until_ready(call(x, w, geometry=geo, act=np.int64(9), variant=np.int64(0)))
    y = call(x, w, geometry=geo, **attrs)          # and a good call still works afterwards
    np.testing.assert_allclose(y, np.full(g.y_shape, 27.0, np.float32))


def test_cpp_without_ffi_handlers_falls_back_to_pure_callback(monkeypatch):
    """A dlconv._C built without the XLA FFI headers: the cpp kernels run through
    jax.pure_callback instead, with the same values and gradients."""
    monkeypatch.setattr(bridge, "path_for", lambda backend: "callback")
    bridge._conv_op.cache_clear()
    bridge._dense_op.cache_clear()
    try:
        text = _hlo("cpp")
        assert "callback" in text.lower() and "dlconv_conv2d_forward" not in text
        rng = np.random.default_rng(3)
        x, w, b = _f32(rng, (2, 7, 6, 3)), _f32(rng, (3, 2, 3, 4), 0.5), _f32(rng, (4,))
        g = conv_geometry(x.shape, w.shape, (2, 1), ((1, 2), (0, 1)), (1, 2))

        def ours(x, w, b):
            return bridge.conv2d(x, w, b, strides=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2),
                                 activation="sigmoid", backend="cpp")

        np.testing.assert_allclose(jax.jit(ours)(x, w, b), _lax_conv(x, w, b, g, "sigmoid"), rtol=RTOL, atol=ATOL)
        got = jax.jit(jax.grad(_loss(ours), argnums=(0, 1, 2)))(x, w, b)
        want = jax.grad(_loss(lambda x, w, b: _lax_conv(x, w, b, g, "sigmoid")), argnums=(0, 1, 2))(x, w, b)
        for a, c in zip(got, want):
            np.testing.assert_allclose(a, c, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    finally:
        bridge._conv_op.cache_clear()
        bridge._dense_op.cache_clear()


def test_compiled_step_drops_unneeded_grads_and_fuses_the_activation():
    """In the compiled (XLA-optimised) gradient of conv(relu) → conv(relu) → loss with respect
    to the weights only: no backward-data call for the first convolution (its input needs no
    gradient: XLA removes the unused custom call, the JAX analogue of torch's
    needs_input_grad), one for the second; both backward-filter calls take y (relu' fused into
    the kernels: no activation-backward call), and no transpose or copy of an activation
    tensor around the custom calls."""
    if bridge.path_for("cpp") != "ffi":
        pytest.skip("dlconv._C was built without the XLA FFI handlers: " + bridge.ffi_status("cpu")[1])
    import re
    rng = np.random.default_rng(5)
    x = _f32(rng, (4, 9, 9, 2))
    w1, w2 = _f32(rng, (3, 3, 2, 3)), _f32(rng, (3, 3, 3, 4))

    def loss(w1, w2):
        h = bridge.conv2d(x, w1, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                          activation="relu", backend="cpp")
        y = bridge.conv2d(h, w2, None, strides=(1, 1), padding="same", dilation=(1, 1),
                          activation="relu", backend="cpp")
        return jnp.sum(y * y)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w1, w2).compile().as_text()
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    assert sorted(targets) == sorted(["dlconv_conv2d_forward"] * 2 + ["dlconv_conv2d_backward_data"]
                                     + ["dlconv_conv2d_backward_filter"] * 2), targets
    for line in text.splitlines():
        if re.search(r"= f32\[4,\d+,\d+,\d+\]\{[0-9,]+\} (transpose|copy)\(", line):
            raise AssertionError(f"an activation is transposed or copied: {line.strip()[:200]}")
    g1, g2 = jax.grad(loss, argnums=(0, 1))(w1, w2)

    def lax_loss(w1, w2):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, w1, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        y = jax.nn.relu(jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return jnp.sum(y * y)

    e1, e2 = jax.grad(lax_loss, argnums=(0, 1))(w1, w2)
    np.testing.assert_allclose(g1, e1, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(jnp.abs(e1).max()))
    np.testing.assert_allclose(g2, e2, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(jnp.abs(e2).max()))
