"""The conv backward ops that read a max pool's gradient in place
(DlconvConv2DBackpropInputFromPool / DlconvConv2DBackpropFilterFromPool in csrc/tf_ops.cpp,
cpu::conv2d_backward_{data,filter}_pool2x2, emitted by dlconv.bridges.tensorflow._conv2d_grad for
a relu conv whose output feeds a 2x2 stride-2 valid native pool): dx, dw, db bit-identical to
DlconvMaxPool2DGrad (relu=True) followed by the linear backward ops, over generated geometries
(Winograd F(2x2) / F(4x4) and the direct paths, C and F tails, odd conv outputs, asymmetric pads,
stride 2, dilation, groups, a pool gradient with NaN / ±Inf, arbitrary arg bytes); the train
step's graph using them; gradients against TensorFlow's own ops; bad attrs and shapes as
InvalidArgumentError.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tf = pytest.importorskip("tensorflow")

from dlconv import tf_ops  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402

NO_Y = np.zeros((0, 0, 0, 0), np.float32)


def _attrs(pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), groups=1, activation="relu"):
    return dict(strides=list(strides), dilations=list(dilations), pads=list(pads), groups=groups,
                activation=activation)


def _out(size, k, stride, dil, before, after):
    return (size + before + after - dil * (k - 1) - 1) // stride + 1


@st.composite
def cases(draw):
    """(x, w, pool_dy, arg, attrs): 3x3 stride 1 (Winograd when C >= 8 and F >= 16; F(4x4) tiles
    on larger outputs, F(2x2) on small ones), 5x5, 1x1, stride 2, dilation 2, groups 2; C and F
    with and without a 16-lane tail; conv outputs odd or even; arg from the real pool of a relu
    conv, or arbitrary bytes; sometimes NaN / ±Inf in pool_dy."""
    k = draw(st.sampled_from([3, 3, 3, 1, 5]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    dil = draw(st.sampled_from([1, 1, 1, 2])) if k > 1 and stride == 1 else 1
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    c = groups * draw(st.sampled_from([3, 8, 12, 32]))
    f = groups * draw(st.sampled_from([8, 16, 20, 32]))
    pads = tuple(draw(st.integers(0, k // 2)) for _ in range(4))
    h, w = draw(st.integers(dil * (k - 1) + 2, 22)), draw(st.integers(dil * (k - 1) + 2, 22))
    oh, ow = _out(h, k, stride, dil, *pads[:2]), _out(w, k, stride, dil, *pads[2:])
    if oh < 2 or ow < 2:
        pads = (dil * (k // 2) + 1,) * 4
        oh, ow = _out(h, k, stride, dil, *pads[:2]), _out(w, k, stride, dil, *pads[2:])
    n = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    if draw(st.booleans()):
        x = np.round(x * 2).astype(np.float32)                 # integer-ish: zeros and ties
    wt = (rng.standard_normal((k, k, c // groups, f)) * 0.3).astype(np.float32)
    attrs = _attrs(pads, (stride, stride), (dil, dil), groups)
    if draw(st.booleans()):
        y = LIB.dlconv_conv2d(x, wt, np.zeros(0, np.float32), **attrs)
        _, arg = LIB.dlconv_max_pool2d(y, ksize=[2, 2], strides=[2, 2])
        arg = arg.numpy()
    else:                                                      # any bytes: taps 0-3, flagged or not, out of range
        arg = rng.integers(0, 256, (n, oh // 2, ow // 2, f)).astype(np.uint8)
    gp = rng.standard_normal((n, oh // 2, ow // 2, f)).astype(np.float32)
    if draw(st.integers(0, 4)) == 0:
        m = rng.random(gp.shape)
        gp[m < 0.05] = np.nan
        gp[(m >= 0.05) & (m < 0.1)] = -np.inf
    return x, wt, gp, arg, attrs, (oh, ow)


def _two_ops(x, w, gp, arg, attrs, conv_out):
    """The gather with relu' folded (DlconvMaxPool2DGrad, relu=True) and the linear backward ops."""
    n, _, _, f = gp.shape
    y = np.zeros((n,) + conv_out + (f,), np.float32)            # the pool's input: read for its shape
    dz = LIB.dlconv_max_pool2d_grad(y, gp, arg, ksize=[2, 2], strides=[2, 2], relu=True)
    lin = dict(attrs, activation="linear")
    dx = LIB.dlconv_conv2d_backprop_input(dz, w, NO_Y, np.array(x.shape, np.int32), **lin)
    dw, db = LIB.dlconv_conv2d_backprop_filter(x, dz, NO_Y, kernel_size=list(w.shape[:2]), **lin)
    return dx, dw, db


def _from_pool(x, w, gp, arg, attrs):
    dx = LIB.dlconv_conv2d_backprop_input_from_pool(gp, arg, w, np.array(x.shape, np.int32), **attrs)
    dw, db = LIB.dlconv_conv2d_backprop_filter_from_pool(x, gp, arg, kernel_size=list(w.shape[:2]), **attrs)
    return dx, dw, db


@settings(max_examples=60, deadline=None)
@given(cases())
def test_from_pool_ops_are_the_gather_and_linear_ops_bit_for_bit(case):
    x, w, gp, arg, attrs, conv_out = case
    for got, want, name in zip(_from_pool(x, w, gp, arg, attrs), _two_ops(x, w, gp, arg, attrs, conv_out),
                               ("dx", "dw", "db")):
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=name)   # NaN == NaN here


@pytest.mark.parametrize("shape,filters", [((4, 26, 26, 32), 64), ((2, 7, 7, 16), 16), ((2, 27, 11, 24), 40)])
def test_winograd_shapes_match_the_two_ops_and_tensorflow(shape, filters):
    """MNIST conv2 (F(4x4) backward passes), a small output (F(2x2)), an odd conv output with an F
    tail: bit-identical to the two-op path, and close to TensorFlow's conv/relu/pool gradients."""
    rng = np.random.default_rng(sum(shape) + filters)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((3, 3, shape[3], filters)) * 0.2).astype(np.float32)
    b = (rng.standard_normal(filters) * 0.1).astype(np.float32)
    y = LIB.dlconv_conv2d(x, w, b, **_attrs())
    _, arg = LIB.dlconv_max_pool2d(y, ksize=[2, 2], strides=[2, 2])
    oh, ow = shape[1] - 2, shape[2] - 2
    gp = rng.standard_normal((shape[0], oh // 2, ow // 2, filters)).astype(np.float32)
    got = _from_pool(x, w, gp, arg, _attrs())
    for a, e in zip(got, _two_ops(x, w, gp, arg, _attrs(), (oh, ow))):
        np.testing.assert_array_equal(a, e)
    xt, wt, bt = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        p = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(xt, wt, 1, "VALID") + bt), 2, 2, "VALID")
        loss = tf.reduce_sum(p * gp)
    for a, e, name in zip(got, tape.gradient(loss, [xt, wt, bt]), ("dx", "dw", "db")):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(e).max())), err_msg=name)


def _step_graph(pool, padding):
    """conv (relu) -> native pool in a tf.function: the gradients' graph op types."""
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 10, 10, 8)).astype(np.float32))
    w = tf.constant(np.random.default_rng(1).standard_normal((3, 3, 8, 16)).astype(np.float32))

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf_bridge.conv2d(x, w, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                                 activation="relu", backend="cpp")
            loss = tf.reduce_sum(tf_bridge.max_pool2d(y, pool_size=pool, padding=padding) ** 2)
        return tape.gradient(loss, [x, w])

    return {op.type for op in run.get_concrete_function().graph.get_operations()}


def test_the_bridge_reads_a_2x2_pool_gradient_in_place_and_gathers_for_other_pools():
    types = _step_graph((2, 2), "valid")
    assert {"DlconvConv2DBackpropInputFromPool", "DlconvConv2DBackpropFilterFromPool"} <= types
    assert not types & {"DlconvConv2DBackpropInput", "DlconvConv2DBackpropFilter"}, types
    types = _step_graph((3, 3), "same")                     # overlapping windows: the relu=True gather
    assert "DlconvConv2DBackpropInputFromPool" not in types and "DlconvConv2DBackpropInput" in types


@pytest.mark.parametrize("which", ["input", "filter"])
def test_their_gradient_is_refused_with_a_message(which):
    """A second derivative through a max pool is refused (as DlconvMaxPool2DGrad's is,
    tests/test_tf_pool.py), never a silent zero or a LookupError."""
    x = tf.constant(np.ones((1, 6, 6, 8), np.float32))
    w = tf.constant(np.ones((3, 3, 8, 16), np.float32))
    gp = tf.constant(np.ones((1, 2, 2, 16), np.float32))
    arg = tf.constant(np.zeros((1, 2, 2, 16), np.uint8))
    with tf.GradientTape() as tape:
        tape.watch(gp)
        if which == "input":
            out = LIB.dlconv_conv2d_backprop_input_from_pool(gp, arg, w, np.array(x.shape, np.int32), **_attrs())
        else:
            out = LIB.dlconv_conv2d_backprop_filter_from_pool(x, gp, arg, kernel_size=[3, 3], **_attrs())[0]
        loss = tf.reduce_sum(out)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        tape.gradient(loss, gp)


def test_bad_attrs_and_shapes_are_invalid_argument():
    x = np.ones((1, 6, 6, 8), np.float32)
    w = np.ones((3, 3, 8, 16), np.float32)
    gp = np.ones((1, 2, 2, 16), np.float32)
    arg = np.zeros((1, 2, 2, 16), np.uint8)
    xs = np.array(x.shape, np.int32)
    bi, bf = LIB.dlconv_conv2d_backprop_input_from_pool, LIB.dlconv_conv2d_backprop_filter_from_pool
    with pytest.raises(tf.errors.InvalidArgumentError, match="activation must be 'relu'"):
        bi(gp, arg, w, xs, **_attrs(activation="linear"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="activation must be 'relu'"):
        bf(x, gp, arg, kernel_size=[3, 3], **_attrs(activation="tanh"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="x_shape"):
        bi(gp, arg, w, np.array([1, 6, 6], np.int32), **_attrs())
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        bi(gp, arg, w, np.array([1, -6, 6, 8], np.int32), **_attrs())
    with pytest.raises(tf.errors.InvalidArgumentError, match="pool_dy has shape"):
        bi(np.ones((1, 3, 2, 16), np.float32), np.zeros((1, 3, 2, 16), np.uint8), w, xs, **_attrs())
    with pytest.raises(tf.errors.InvalidArgumentError, match="arg has shape"):
        bf(x, gp, np.zeros((1, 2, 2, 15), np.uint8), kernel_size=[3, 3], **_attrs())
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rank 4|must have rank"):
        bf(x[0], gp, arg, kernel_size=[3, 3], **_attrs())
    with pytest.raises(tf.errors.InvalidArgumentError, match="groups = 3"):
        bf(x, gp, arg, kernel_size=[3, 3], **_attrs(groups=3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel_size"):
        bf(x, gp, arg, kernel_size=[3], **_attrs())
