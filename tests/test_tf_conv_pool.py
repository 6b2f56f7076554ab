"""The opt-in fused relu conv + 2x2 max pool of the TensorFlow op library
(DlconvConv2DMaxPool2x2 in csrc/tf_ops.cpp, its gradient the conv's backward ops reading the pool's
gradient in place (tests/test_tf_conv_from_pool.py),
cpu::conv2d_forward_relu_maxpool2x2, emitted by dlconv.bridges.tensorflow.max_pool2d when
DLCONV_TF_FUSE_CONV_POOL=1): y and arg bit-identical to DlconvConv2D (relu) followed by
DlconvMaxPool2D over generated geometries (C and F tails, odd conv outputs, asymmetric pads, no
bias, geometries Winograd does not take, NaN / ±Inf that send Winograd to its fallback), and
close to TensorFlow's own ops; gradients against TensorFlow's in a tf.function, with the graph
holding the fused ops; the opt-in's documented limit (a tape over the conv's output); bad
attrs and shapes as InvalidArgumentError.
"""

import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tf = pytest.importorskip("tensorflow")

from dlconv import tf_ops  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402

FUSE = "DLCONV_TF_FUSE_CONV_POOL"


@contextmanager
def fusion(on):
    old = os.environ.get(FUSE)
    os.environ[FUSE] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FUSE, None)
        else:
            os.environ[FUSE] = old


def _attrs(pads=(0, 0, 0, 0), strides=(1, 1), activation="relu"):
    return dict(strides=list(strides), dilations=[1, 1], pads=list(pads), groups=1, activation=activation)


@st.composite
def cases(draw):
    """(x, w, b, pads, strides): 3x3 (Winograd when C >= 8 and F >= 16, stride 1) or 1x1 / 5x5,
    C and F with and without a 16-lane tail, conv outputs odd or even, sometimes NaN / ±Inf."""
    k = draw(st.sampled_from([3, 3, 3, 1, 5]))
    c = draw(st.sampled_from([3, 8, 12, 32]))
    f = draw(st.sampled_from([16, 20, 64]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    pads = tuple(draw(st.integers(0, k // 2)) for _ in range(4))
    h, w = draw(st.integers(k + 1, 13)), draw(st.integers(k + 1, 13))
    n = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = np.maximum(rng.standard_normal((n, h, w, c)), 0).astype(np.float32)   # a relu's output: zeros
    if draw(st.booleans()):
        x = np.round(x * 2).astype(np.float32)             # integer-ish values: ties in the pool
    wt = (rng.standard_normal((k, k, c, f)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(f) * 0.3).astype(np.float32) if draw(st.booleans()) else np.zeros(0, np.float32)
    if draw(st.integers(0, 4)) == 0:
        m = rng.random(x.shape)
        x[m < 0.01] = np.nan
        x[(m >= 0.01) & (m < 0.02)] = np.inf
    oh = (h + pads[0] + pads[1] - k) // stride + 1
    ow = (w + pads[2] + pads[3] - k) // stride + 1
    if oh < 2 or ow < 2:
        pads = (k // 2,) * 4
    return x, wt, b, pads, (stride, stride)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_fused_op_is_the_two_ops_bit_for_bit(case):
    x, w, b, pads, strides = case
    A = _attrs(pads, strides)
    y2, a2 = LIB.dlconv_max_pool2d(LIB.dlconv_conv2d(x, w, b, **A), ksize=[2, 2], strides=[2, 2])
    y1, a1 = LIB.dlconv_conv2d_max_pool2x2(x, w, b, **A)
    assert y1.shape == y2.shape and a1.dtype == tf.uint8
    np.testing.assert_array_equal(y1.numpy(), y2.numpy())     # NaN == NaN here
    np.testing.assert_array_equal(a1.numpy(), a2.numpy())
    if np.isfinite(x).all():                                  # and TensorFlow's own ops
        xp = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
        z = tf.nn.conv2d(xp, w, list(strides), "VALID") + (b if b.size else 0)
        want = tf.nn.max_pool2d(tf.nn.relu(z), 2, 2, "VALID")
        np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-5)


def test_mnist_conv2_shape_runs_winograd_and_matches():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((4, 26, 26, 32)), 0).astype(np.float32)
    w = (rng.standard_normal((3, 3, 32, 64)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(64) * 0.1).astype(np.float32)
    y1, a1 = LIB.dlconv_conv2d_max_pool2x2(x, w, b, **_attrs())
    y2, a2 = LIB.dlconv_max_pool2d(LIB.dlconv_conv2d(x, w, b, **_attrs()), ksize=[2, 2], strides=[2, 2])
    assert y1.shape == (4, 12, 12, 64)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(a1, a2)
    assert (a1.numpy() >= 128).any() and (a1.numpy() < 128).any()   # windows of zeros and not


def _layers_graph(fused, x, w, b, dy):
    """conv (relu, the layer's bridge call) -> max_pool2d in a tf.function: output, grads
    (x, w, b) and the graph's op types, traced with the opt-in on or off."""
    def run(x, w, b):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            y = tf_bridge.conv2d(x, w, b, strides=(1, 1), padding="valid", dilation=(1, 1),
                                 activation="relu", backend="cpp")
            p = tf_bridge.max_pool2d(y, pool_size=(2, 2))
            loss = tf.reduce_sum(p * dy)
        return (p,) + tuple(tape.gradient(loss, [x, w, b]))

    with fusion(fused):
        fn = tf.function(run)
        cf = fn.get_concrete_function(tf.TensorSpec((None,) + x.shape[1:]), tf.TensorSpec(w.shape),
                                      tf.TensorSpec(b.shape))
    types = {op.type for op in cf.graph.get_operations()}
    return fn(x, w, b), types


@pytest.mark.parametrize("shape,filters", [((3, 12, 10, 16), 16), ((2, 11, 13, 12), 20), ((2, 9, 9, 3), 16)])
def test_gradients_in_a_graph_match_tensorflow(shape, filters):
    rng = np.random.default_rng(sum(shape) + filters)
    x = tf.constant(rng.integers(-2, 3, shape).astype(np.float32))    # ties of zeros after the relu
    w = tf.constant(rng.integers(-1, 2, (3, 3, shape[3], filters)).astype(np.float32))
    b = tf.constant(rng.integers(-1, 2, filters).astype(np.float32))
    ph, pw = (shape[1] - 2) // 2, (shape[2] - 2) // 2
    dy = tf.constant(rng.standard_normal((shape[0], ph, pw, filters)).astype(np.float32))
    (p, *grads), types = _layers_graph(True, x, w, b, dy)
    assert {"DlconvConv2DMaxPool2x2", "DlconvConv2DBackpropInputFromPool", "DlconvConv2DBackpropFilterFromPool"} <= types
    assert not types & {"DlconvMaxPool2D", "DlconvMaxPool2DGrad", "MaxPool", "PyFunc", "EagerPyFunc"}, types
    (p0, *grads0), types0 = _layers_graph(False, x, w, b, dy)
    assert "DlconvMaxPool2D" in types0 and "DlconvConv2DMaxPool2x2" not in types0
    np.testing.assert_array_equal(p, p0)
    with tf.GradientTape() as tape:
        tape.watch([x, w, b])
        want_p = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, w, 1, "VALID") + b), 2, 2, "VALID")
        loss = tf.reduce_sum(want_p * dy)
    want = tape.gradient(loss, [x, w, b])
    np.testing.assert_allclose(p, want_p, rtol=1e-6, atol=1e-6)
    for got, unfused, exp, name in zip(grads, grads0, want, ("dx", "dw", "db")):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got, unfused, rtol=1e-6, atol=1e-5, err_msg=name)


def test_opt_in_only_and_eager_never_fuses():
    x = tf.constant(np.ones((1, 6, 6, 8), np.float32))
    w = tf.constant(np.ones((3, 3, 8, 16), np.float32))
    b = tf.constant(np.zeros(16, np.float32))
    dy = tf.ones((1, 2, 2, 16))
    _, types = _layers_graph(False, x, w, b, dy)
    assert "DlconvConv2DMaxPool2x2" not in types                    # off unless asked for
    with fusion(True):                                              # eager: no graph to fuse in
        y = tf_bridge.conv2d(x, w, b, strides=(1, 1), padding="valid", dilation=(1, 1), activation="relu",
                             backend="cpp")
        np.testing.assert_array_equal(tf_bridge.max_pool2d(y, pool_size=(2, 2)), tf.nn.max_pool2d(y, 2, 2, "VALID"))


def test_the_documented_limit_a_tape_over_the_conv_output():
    """With the opt-in, a tape over the conv's output inside a graph gets no gradient through
    the fused pool (the pool reads the conv's inputs, not its output): the reason it is opt-in."""
    x = tf.constant(np.random.default_rng(1).integers(-2, 3, (1, 6, 6, 8)).astype(np.float32))
    w = tf.constant(np.random.default_rng(2).integers(-1, 2, (3, 3, 8, 16)).astype(np.float32))

    def run():
        with tf.GradientTape() as tape:
            y = tf_bridge.conv2d(x, w, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                                 activation="relu", backend="cpp")
            tape.watch(y)
            loss = tf.reduce_sum(tf_bridge.max_pool2d(y, pool_size=(2, 2)))
        return tape.gradient(loss, y)

    with fusion(False):
        assert tf.function(run)() is not None
    with fusion(True):
        assert tf.function(run)() is None


def test_bad_attrs_and_shapes_are_invalid_argument():
    x = np.ones((1, 6, 6, 8), np.float32)
    w = np.ones((3, 3, 8, 16), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="activation must be 'relu'"):
        LIB.dlconv_conv2d_max_pool2x2(x, w, np.zeros(16, np.float32), **_attrs(activation="linear"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the 2x2 pool"):
        LIB.dlconv_conv2d_max_pool2x2(np.ones((1, 3, 8, 8), np.float32), w, np.zeros(16, np.float32), **_attrs())
    with pytest.raises(tf.errors.InvalidArgumentError, match="b must have 16 values"):
        LIB.dlconv_conv2d_max_pool2x2(x, w, np.zeros(5, np.float32), **_attrs())
