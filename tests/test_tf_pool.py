"""The graph-native TensorFlow max pool (DlconvMaxPool2D / DlconvMaxPool2DGrad in
csrc/tf_ops.cpp, dlconv.bridges.tensorflow.max_pool2d): values and gradients against
tf.nn.max_pool2d and dlconv.reference over generated geometries (ragged edges, "same" pads,
overlapping windows, integer values for ties, NaN / ±Inf as TensorFlow treats them), eager and
in tf.function with an unknown batch; the stored arg; the shape functions; bad attrs and shapes
(InvalidArgumentError naming them); the fallback to the stock op; no PyFunc in a Keras train
step.  Plain TensorFlow, no Keras backend switch: the Keras layer on every backend is
tests/keras_suite/test_pool_layer.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tf = pytest.importorskip("tensorflow")

from dlconv import reference, tf_ops  # noqa: E402
from dlconv.shapes import pool_geometry  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402

CHANNELS = (1, 3, 16, 17, 64)    # scalar only, tail only, one vector, vector + tail, 4 vectors


@st.composite
def pool_cases(draw):
    """(x, pool, strides or None, padding, dy seed): pool 1-3, stride 1-3, valid/same, ragged
    edges, integer values (many ties), sometimes NaN / ±Inf."""
    ph, pw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    strides = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(st.sampled_from(["valid", "same"]))
    h = draw(st.integers(ph if padding == "valid" else 1, 9))
    w = draw(st.integers(pw if padding == "valid" else 1, 9))
    n, c = draw(st.integers(0, 2)), draw(st.sampled_from(CHANNELS))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.integers(-3, 4, (n, h, w, c)).astype(np.float32)
    if draw(st.booleans()):
        m = rng.random(x.shape)
        x[m < 0.1] = np.nan
        x[(m >= 0.1) & (m < 0.15)] = -np.inf
        x[(m >= 0.15) & (m < 0.2)] = np.inf
    return x, (ph, pw), strides, padding, draw(st.integers(0, 2**31 - 1))


def _value_and_grad(fn, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * dy)
    return y, tape.gradient(loss, x)


def _assert_equal_nan(a, b, what):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)   # NaN == NaN here


@settings(max_examples=40, deadline=None)
@given(pool_cases(), st.booleans())
def test_max_pool_matches_tf_and_reference(case, in_function):
    x_np, pool, strides, padding, seed = case
    g = pool_geometry(x_np.shape, pool, strides, padding)
    dy_np = np.random.default_rng(seed).standard_normal(g.y_shape).astype(np.float32)
    x, dy = tf.constant(x_np), tf.constant(dy_np)

    def ours(t):
        return tf_bridge.max_pool2d(t, pool_size=pool, strides=strides, padding=padding)

    def stock(t):
        return tf.nn.max_pool2d(t, list(pool), list(strides or pool), padding.upper())

    if in_function:   # unknown batch: the pads are resolved from height, width and channels
        spec = [tf.TensorSpec((None, *x_np.shape[1:]), tf.float32), tf.TensorSpec((None, *g.y_shape[1:]), tf.float32)]
        y, dx = tf.function(lambda t, d: _value_and_grad(ours, t, d), input_signature=spec)(x, dy)
    else:
        y, dx = _value_and_grad(ours, x, dy)
    y_tf, dx_tf = _value_and_grad(stock, x, dy)
    _assert_equal_nan(y, y_tf, "y vs tf.nn.max_pool2d")
    _assert_equal_nan(y, reference.max_pool2d(x_np, pool, strides, padding), "y vs reference")
    # Same additions in the same order (first maximum, row-major windows): equal, not just close.
    np.testing.assert_allclose(dx, dx_tf, rtol=1e-6, atol=1e-6, err_msg="dx vs TensorFlow's gradient")
    np.testing.assert_allclose(dx, reference.max_pool2d_backward(x_np, dy_np, pool, strides, padding),
                               rtol=1e-6, atol=1e-6, err_msg="dx vs reference")


def test_arg_is_the_reference_argmax_and_the_op_is_native():
    x = np.random.default_rng(3).integers(-2, 3, (2, 7, 6, 17)).astype(np.float32)
    g = pool_geometry(x.shape, (3, 2), (2, 2), "same")
    y, arg = LIB.dlconv_max_pool2d(x, ksize=[3, 2], strides=[2, 2],
                                   pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right])
    y_ref, pos = reference.max_pool2d_argmax(x, (3, 2), (2, 2), "same")    # flat ih * W + iw
    oh = np.arange(g.out_h)[None, :, None, None]
    ow = np.arange(g.out_w)[None, None, :, None]
    tap = (pos // g.in_w - (oh * 2 - g.pad_top)) * 2 + (pos % g.in_w - (ow * 2 - g.pad_left))
    assert arg.dtype == tf.uint8
    np.testing.assert_array_equal(y, y_ref)
    chosen = np.take_along_axis(x.reshape(2, -1, 17), pos.reshape(2, -1, 17), axis=1).reshape(pos.shape)
    # the window tap kh * k_w + kw of the same member, +128 where that member is not > 0
    np.testing.assert_array_equal(arg, tap + 128 * ~(chosen > 0))

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(tf_bridge.max_pool2d(t, pool_size=(2, 2)) ** 2)
        return tape.gradient(loss, t)

    types = {op.type for op in step.get_concrete_function(tf.TensorSpec((None, 8, 8, 4))).graph.get_operations()}
    assert {"DlconvMaxPool2D", "DlconvMaxPool2DGrad"} <= types
    assert not types & {"MaxPool", "MaxPoolGrad", "PyFunc", "PyFuncStateless", "EagerPyFunc"}, sorted(types)


@pytest.mark.parametrize("shape, pool, strides, padding", [
    ((None, 9, 7, 5), (2, 2), None, "valid"), ((None, 9, 7, 5), (3, 2), (2, 1), "same"),
    ((4, 1, 1, 3), (2, 2), (1, 1), "same")])
def test_shape_function_agrees_with_dlconv_shapes(shape, pool, strides, padding):
    g = pool_geometry((1, *shape[1:]), pool, strides, padding)
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def f(t):
        y, arg = LIB.dlconv_max_pool2d(t, ksize=list(pool), strides=[g.stride_h, g.stride_w],
                                       pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right])
        dx = LIB.dlconv_max_pool2d_grad(t, y, arg, ksize=list(pool), strides=[g.stride_h, g.stride_w],
                                        pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right])
        seen.update(y=tuple(y.shape), arg=tuple(arg.shape), dx=tuple(dx.shape))
        return dx

    f.get_concrete_function()
    assert seen["y"] == seen["arg"] == (shape[0], g.out_h, g.out_w, shape[3])
    assert seen["dx"] == shape


X = np.zeros((1, 4, 4, 2), np.float32)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(ksize=[2], strides=[1, 1]), "attr ksize must have 2 values"),
    (dict(ksize=[0, 2], strides=[1, 1]), "attr ksize values must be in"),
    (dict(ksize=[2, 2], strides=[1, 0]), "attr strides values must be in"),
    (dict(ksize=[2, 2], strides=[1, 1], pads=[0, 0, 0]), "attr pads (top, bottom, left, right) must have 4"),
    (dict(ksize=[2, 2], strides=[1, 1], pads=[0, 2, 0, 0]), "must each be smaller than the pool size"),
    (dict(ksize=[5, 2], strides=[1, 1]), "larger than the padded input height"),
    (dict(ksize=[13, 10], strides=[1, 1]), "has more than 128 taps"),
])
def test_bad_attrs_raise_invalid_argument(kwargs, needle):
    with pytest.raises(tf.errors.InvalidArgumentError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LIB.dlconv_max_pool2d(X, **kwargs)


def test_bad_attrs_in_a_graph_fail_at_construction():
    @tf.function(input_signature=[tf.TensorSpec((None, 4, 4, 2), tf.float32)])
    def f(t):
        return LIB.dlconv_max_pool2d(t, ksize=[2, 2], strides=[1, 1], pads=[2, 0, 0, 0])

    with pytest.raises(ValueError, match="must each be smaller than the pool size"):
        f.get_concrete_function()


@pytest.mark.parametrize("x, dy, arg, needle", [
    (np.zeros((1, 4, 4), np.float32), np.zeros((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.uint8),
     "x must have rank 4"),
    (X, np.zeros((1, 3, 2, 2), np.float32), np.zeros((1, 3, 2, 2), np.uint8), "dy has shape"),
    (X, np.zeros((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 1), np.uint8), "arg has shape"),
    (X, np.zeros((1, 2, 2, 2), np.float32), tf.zeros((1, 2, 2, 2), tf.int32), "uint8"),
])
def test_bad_gradient_shapes_raise_invalid_argument(x, dy, arg, needle):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=needle):
        LIB.dlconv_max_pool2d_grad(x, dy, arg, ksize=[2, 2], strides=[2, 2])


# ----------------------------------------------------------------------------- relu' folded in
def _conv_relu_pool(x, w, b, pool, strides, padding, native):
    y = tf_bridge.conv2d(x, w, b, strides=(1, 1), padding="valid", dilation=(1, 1), activation="relu",
                         backend="cpp")
    if native:
        return y, tf_bridge.max_pool2d(y, pool_size=pool, strides=strides, padding=padding)
    return y, tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, w, 1, "VALID") + b), list(pool),
                               list(strides or pool), padding.upper())


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([((2, 2), None, "valid"), ((3, 3), (2, 2), "same"),
                                                   ((2, 3), (1, 2), "valid")]), st.sampled_from([3, 16, 17]))
def test_relu_folded_into_the_pool_gradient_matches_tf(seed, pool_args, filters):
    """conv(relu) -> native pool: the conv's gradient uses the pool gradient with relu' folded in
    (relu=True) and linear backward ops; values equal TensorFlow's conv/relu/pool gradients.
    Integer-valued inputs: many exact zeros after the relu (ties of zeros, relu'(0) = 0)."""
    pool, strides, padding = pool_args
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(-2, 3, (2, 9, 8, 3)).astype(np.float32))
    w = tf.constant(rng.integers(-1, 2, (3, 3, 3, filters)).astype(np.float32))
    b = tf.constant(rng.integers(-1, 2, filters).astype(np.float32))

    def grads(native):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            _, p = _conv_relu_pool(x, w, b, pool, strides, padding, native)
            loss = tf.reduce_sum(p * p + p)
        return tape.gradient(loss, [x, w, b])

    fn = tf.function(lambda: grads(True))         # a graph: the fold sees the pool's gradient op
    graph = fn.get_concrete_function().graph
    folded = [op for op in graph.get_operations() if op.type == "DlconvMaxPool2DGrad" and op.get_attr("relu")]
    in_place = [op for op in graph.get_operations() if op.type.endswith("FromPool")]
    if pool_args == ((2, 2), None, "valid"):      # read in place (tests/test_tf_conv_from_pool.py)
        assert len(in_place) == 2 and not folded
    else:
        assert folded and not in_place, "the relu derivative was not folded into the pool gradient"
    for t in ("DlconvConv2DBackpropFilter", "DlconvConv2DBackpropInput"):
        assert all(op.get_attr("activation") == b"linear" for op in graph.get_operations() if op.type == t)
    stock = grads(False)
    for ours in (fn(), grads(True)):               # folded (graph) and unfolded (eager)
        for a, e, name in zip(ours, stock, ("dx", "dw", "db")):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-4, err_msg=name)


def test_a_tape_over_the_relu_output_gets_the_unmasked_pool_gradient():
    x = tf.constant(np.random.default_rng(1).integers(-2, 3, (1, 6, 6, 2)).astype(np.float32))
    w = tf.constant(np.random.default_rng(2).integers(-1, 2, (1, 1, 2, 4)).astype(np.float32))
    @tf.function          # a graph, where the fold applies
    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf_bridge.conv2d(x, w, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                                 activation="relu", backend="cpp")
            loss = tf.reduce_sum(tf_bridge.max_pool2d(y, pool_size=(2, 2)))
        return (y,) + tuple(tape.gradient(loss, [y, x]))

    y, dy, dx = run()
    y_np = y.numpy()
    np.testing.assert_array_equal(dy, reference.max_pool2d_backward(y_np, np.ones((1, 3, 3, 4), np.float32), 2))
    assert (y_np == 0).any() and (np.asarray(dy)[y_np == 0] != 0).any()    # ties of zeros keep dL/dy
    expected = tf.nn.conv2d_transpose(np.asarray(dy) * (y_np > 0), w, x.shape, 1, "VALID")
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-6)


def test_a_corrupt_arg_writes_nothing_out_of_bounds():
    # The gather compares arg with each dx position's tap: out-of-range taps just match nothing.
    arg = np.full((1, 2, 2, 2), 100, np.uint8)
    dx = LIB.dlconv_max_pool2d_grad(X, np.ones((1, 2, 2, 2), np.float32), arg, ksize=[2, 2], strides=[2, 2])
    np.testing.assert_array_equal(dx, np.zeros_like(X))


def test_second_derivative_is_refused():
    x = tf.constant(np.random.default_rng(0).random((1, 4, 4, 2), dtype=np.float32))
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(tf_bridge.max_pool2d(x, pool_size=(2, 2)) ** 2)
        g = inner.gradient(y, x)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        outer.gradient(g, x)


def test_fallbacks_take_the_stock_op():
    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    def unknown_hw(t):
        return tf_bridge.max_pool2d(t, pool_size=(2, 2), padding="same")

    types = {op.type for op in unknown_hw.get_concrete_function().graph.get_operations()}
    assert "MaxPool" in types and "DlconvMaxPool2D" not in types
    big = tf_bridge.max_pool2d(tf.zeros((1, 13, 13, 2)), pool_size=(13, 10))     # 130 taps > 128
    np.testing.assert_array_equal(big, tf.nn.max_pool2d(tf.zeros((1, 13, 13, 2)), [13, 10], [13, 10], "VALID"))
    assert not tf_bridge.native_pool(tf.zeros((1, 4, 4, 3)), backend="reference")
    assert tf_bridge.native_pool(tf.zeros((1, 4, 4, 3)), backend="numba")
    x = np.arange(48, dtype=np.float32).reshape(1, 4, 4, 3)
    np.testing.assert_array_equal(unknown_hw(x), tf.nn.max_pool2d(x, 2, 2, "SAME"))


def test_pool_threshold_knob_gives_the_same_numbers():
    x = np.random.default_rng(5).integers(-3, 4, (2, 24, 24, 64)).astype(np.float32)   # 73,728 elements
    dy = tf.constant(np.random.default_rng(6).random((2, 12, 12, 64), dtype=np.float32))
    fn = lambda t: tf_bridge.max_pool2d(t, pool_size=(2, 2))  # noqa: E731
    old = tf_ops.threading_knobs(serial_pool_elements=0)          # the OpenMP team
    try:
        team = _value_and_grad(fn, tf.constant(x), dy)
        tf_ops.threading_knobs(serial_pool_elements=1e12)          # one thread
        one = _value_and_grad(fn, tf.constant(x), dy)
    finally:
        tf_ops.threading_knobs(**old)
    for a, b in zip(team, one):
        np.testing.assert_array_equal(a, b)
