"""The NumPy oracle itself, against TensorFlow: forward, both backward passes, dense, softmax.

Every kernel test trusts dlconv.reference, so the reference is checked first against the
framework (values from tf.nn.conv2d, gradients from tf.GradientTape)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dlconv import reference as ref
from dlconv.shapes import conv_geometry

tf = pytest.importorskip("tensorflow", reason="TensorFlow is the framework the oracle is checked against")


@st.composite
def conv_cases(draw):
    k_h, k_w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    d = 1 if s > 1 else draw(st.integers(1, 2))  # TF refuses stride > 1 with dilation > 1
    mode = draw(st.sampled_from(["valid", "same", "explicit"]))
    pads = "valid"
    if mode == "same":
        pads = "same"
    elif mode == "explicit":
        pads = tuple(tuple(draw(st.integers(0, 2)) for _ in range(2)) for _ in range(2))
    in_h = draw(st.integers((k_h - 1) * d + 1, 9))
    in_w = draw(st.integers((k_w - 1) * d + 1, 9))
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    return (n, in_h, in_w, c), (k_h, k_w, c, k), s, pads, d


def _tf_conv(x, w, g):
    """TensorFlow's convolution for geometry g.

    TensorFlow's CPU gradient kernels refuse dilation > 1, so a dilated kernel is written
    out as the equivalent undilated one with zeros between the taps; the gradient with
    respect to the real taps is the strided slice [::dil_h, ::dil_w] of the expanded one.
    """
    pad = [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]]
    if g.dil_h > 1 or g.dil_w > 1:
        w = tf.scatter_nd(
            [[i * g.dil_h, j * g.dil_w] for i in range(g.k_h) for j in range(g.k_w)],
            tf.reshape(w, (g.k_h * g.k_w, g.in_c, g.filters)),
            (g.k_h_eff, g.k_w_eff, g.in_c, g.filters))
    return tf.nn.conv2d(x, w, strides=[1, g.stride_h, g.stride_w, 1], padding=pad)


@settings(max_examples=60)
@given(conv_cases(), st.sampled_from(["linear", "relu", "sigmoid", "tanh"]), st.booleans())
def test_conv_forward_and_gradients_match_tensorflow(case, act, use_bias):
    xs, ws, s, pads, d = case
    g = conv_geometry(xs, ws, s, pads, d)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    b = rng.standard_normal(ws[3]).astype(np.float32) if use_bias else None
    dy = rng.standard_normal(g.y_shape).astype(np.float32)

    tx, tw = tf.constant(x), tf.constant(w)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([tx, tw])
        z = _tf_conv(tx, tw, g)
        if b is not None:
            z = z + b
        y = {"linear": tf.identity, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh}[act](z)
        loss_z = tf.reduce_sum(z * dy)
    # The convolution's shape must be the one dlconv.shapes resolved.
    assert tuple(y.shape) == g.y_shape
    np.testing.assert_allclose(ref.conv2d_forward(x, w, b, g, act), y.numpy(), rtol=1e-4, atol=1e-4)
    dx_tf, dw_tf = tape.gradient(loss_z, [tx, tw])
    np.testing.assert_allclose(ref.conv2d_backward_data(dy, w, g), dx_tf.numpy(), rtol=1e-4, atol=1e-4)
    dw, db = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(dw, dw_tf.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh", "softmax"])
def test_dense_forward_and_backward_match_tensorflow(act):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 13)).astype(np.float32)
    w = rng.standard_normal((13, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    dy = rng.standard_normal((7, 5)).astype(np.float32)
    tx, tw, tb = tf.constant(x), tf.constant(w), tf.constant(b)
    fn = {"linear": tf.identity, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
          "softmax": tf.nn.softmax}[act]
    with tf.GradientTape() as tape:
        tape.watch([tx, tw, tb])
        y = fn(tf.matmul(tx, tw) + tb)
        loss = tf.reduce_sum(y * dy)
    y_ref = ref.dense_forward(x, w, b, act)
    np.testing.assert_allclose(y_ref, y.numpy(), rtol=1e-5, atol=1e-5)
    grads = ref.dense_backward(x, w, dy, y_ref, act)
    for ours, theirs in zip(grads, tape.gradient(loss, [tx, tw, tb])):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_padded_corner_output_reads_only_four_inputs():
    """The workshop's picture: a 3x3 kernel at a padded corner meets 4 real inputs."""
    g = conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), 1, 1)
    x = np.zeros((1, 5, 5, 1), np.float32)
    w = np.ones((3, 3, 1, 1), np.float32)
    x[0, :2, :2, 0] = 1.0   # exactly the inputs the corner window can see
    x[0, 2:, :, 0] = 100.0  # everything else: must not reach output (0, 0)
    x[0, :, 2:, 0] = 100.0
    assert ref.conv2d_forward(x, w, None, g)[0, 0, 0, 0] == 4.0
