"""The C++ CPU kernels (dlconv._C, backend="cpp") against the NumPy reference and TensorFlow.

Shapes are generated (hypothesis): strides 1-3, valid / same / explicit asymmetric padding,
dilation 1-2, kernels 1-5, channel counts that are not multiples of the 12x32 register block
or the 16-float vector (C = 1, 3, 17; F = 1, 5, 33, 70), odd batches, bias on and off, every
activation.  Direct calls into _C with wrong buffers must raise, never crash.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import ops
from dlconv import reference as ref
from dlconv.backends import cpp_backend
from dlconv.shapes import conv_geometry, resolve_axis

_C = pytest.importorskip("dlconv._C", reason="dlconv._C is not built (pip install --no-build-isolation -e .)")

ACTS = ("linear", "relu", "sigmoid", "tanh")
CODES = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
# fp32 kernels vs the float64 oracle: reductions of up to a few hundred terms of O(1) values.
RTOL, ATOL = 1e-4, 1e-4


def _tol(k):
    """Absolute tolerance for a sum of k products of O(1) terms in float32."""
    return ATOL * max(1.0, np.sqrt(k))


@st.composite
def conv_cases(draw, small=True):
    kh = draw(st.integers(1, 5))
    kw = draw(st.integers(1, 5))
    dh = draw(st.integers(1, 2))
    dw = draw(st.integers(1, 2))
    sh = draw(st.integers(1, 3))
    sw = draw(st.integers(1, 3))
    c = draw(st.sampled_from((1, 3, 17)))
    f = draw(st.sampled_from((1, 5, 33, 70)))
    n = draw(st.sampled_from((1, 3, 5)))
    kind = draw(st.sampled_from(("valid", "same", "explicit")))
    if kind == "explicit":
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    else:
        padding = kind
        pads = (0, 0, 0, 0)
    # smallest input that fits the dilated kernel, plus a few pixels
    min_h = max(1, (kh - 1) * dh + 1 - pads[0] - pads[1])
    min_w = max(1, (kw - 1) * dw + 1 - pads[2] - pads[3])
    h = draw(st.integers(min_h, min_h + (6 if small else 12)))
    w = draw(st.integers(min_w, min_w + (6 if small else 12)))
    bias = draw(st.booleans())
    act = draw(st.sampled_from(ACTS))
    seed = draw(st.integers(0, 2**16))
    return dict(x_shape=(n, h, w, c), w_shape=(kh, kw, c, f), strides=(sh, sw), padding=padding,
                dilation=(dh, dw), bias=bias, act=act, seed=seed)


def _arrays(case):
    rng = np.random.default_rng(case["seed"])
    g = conv_geometry(case["x_shape"], case["w_shape"], case["strides"], case["padding"], case["dilation"])
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32) if case["bias"] else None
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    return g, x, w, b, dz


# ----------------------------------------------------------------------------- vs reference
@settings(max_examples=300)
@given(conv_cases())
def test_conv_forward_and_backward_match_reference(case):
    g, x, w, b, dz = _arrays(case)
    y = ops.conv2d(x, w, b, case["strides"], case["padding"], case["dilation"], case["act"], backend="cpp")
    assert y.dtype == np.float32 and y.shape == g.y_shape
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, g, case["act"]), rtol=RTOL, atol=_tol(g.gemm_k))

    dx = ops.conv2d_backward_data(dz, w, g.x_shape, case["strides"], case["padding"], case["dilation"],
                                  backend="cpp")
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w, g), rtol=RTOL,
                               atol=_tol(g.k_h * g.k_w * g.filters))
    dw, db = ops.conv2d_backward_filter(x, dz, g.w_shape, case["strides"], case["padding"], case["dilation"],
                                       backend="cpp")
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(g.gemm_m))


def _activated(g, act, rng):
    """(dy, y): a gradient and an activation output of the conv's output shape; relu's y has
    exact zeros (the derivative's edge) and sigmoid's lies in (0, 1), as real outputs do."""
    z = rng.standard_normal(g.y_shape, dtype=np.float32)
    y = ref.activate(z, act).astype(np.float32)
    return rng.standard_normal(g.y_shape, dtype=np.float32), np.ascontiguousarray(y)


def _check_fused_backward(g, x, w, dy, y, act):
    """The backward passes given dL/dy and y (derivative applied inside the kernels) against
    the reference given dL/dz = act'(y) · dy."""
    dz = ref.activation_backward(dy, y, act).astype(np.float32)
    t = g.as_tuple()
    dx = _C.conv2d_backward_data(dy, w, t, y=y, activation=CODES[act])
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w, g), rtol=RTOL,
                               atol=_tol(g.k_h * g.k_w * g.filters))
    dw, db = _C.conv2d_backward_filter(x, dy, t, y=y, activation=CODES[act])
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(g.gemm_m))
    # and what the unfused kernels give for dz formed first: the same arithmetic (bit for bit
    # for relu, a select; sigmoid / tanh within an ulp or two, the compiler may fuse 1 - y·y)
    unfused = _C.conv2d_backward_data(_C.activation_backward(dy, y, CODES[act]), w, t)
    if act in ("linear", "relu"):
        np.testing.assert_array_equal(dx, unfused)
    else:
        np.testing.assert_allclose(dx, unfused, rtol=1e-6, atol=1e-6 * float(np.abs(unfused).max()))


@settings(max_examples=150)
@given(conv_cases())
def test_backward_with_activation_derivative_inside_the_kernels(case):
    """Every geometry the generator makes (stride, dilation, asymmetric padding: the paths that
    form dz in a temporary) and every activation."""
    g, x, w, _, _ = _arrays(case)
    dy, y = _activated(g, case["act"], np.random.default_rng(case["seed"] + 1))
    _check_fused_backward(g, x, w, dy, y, case["act"])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 11, 9, 16), (3, 3, 16, 24), "valid"),           # Winograd both passes, odd OH/OW: ragged tiles
    ((2, 10, 13, 20), (3, 3, 20, 17), ((0, 2), (1, 0))),  # Winograd, asymmetric pads, F tail
    ((2, 12, 12, 64), (3, 3, 64, 32), "same"),           # Winograd backward-data into 32 channels
    ((5, 9, 8, 1), (3, 3, 1, 32), "valid"),              # C = 1: direct backward-filter, direct bwd-data
    ((2, 9, 9, 3), (3, 3, 3, 19), "same"),               # F = 19: direct backward-filter's padded chunk rows
])
def test_fused_backward_on_the_winograd_and_direct_paths(x_shape, w_shape, padding, act, rng):
    g = conv_geometry(x_shape, w_shape, 1, padding)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    dy, y = _activated(g, act, rng)
    _check_fused_backward(g, x, w, dy, y, act)


def test_fused_backward_arguments_are_checked(conv_args, rng):
    g, x, w, b = conv_args
    t = g.as_tuple()
    dy = rng.standard_normal(g.y_shape, dtype=np.float32)
    with pytest.raises(ValueError, match="activation 1 needs y, the activation's output"):
        _C.conv2d_backward_data(dy, w, t, activation=1)
    with pytest.raises(ValueError, match="activation 2 needs y"):
        _C.conv2d_backward_filter(x, dy, t, activation=2)
    with pytest.raises(ValueError, match=r"y has shape \(2, 4, 5, 3\), expected \(2, 4, 5, 4\)"):
        _C.conv2d_backward_data(dy, w, t, y=np.zeros((2, 4, 5, 3), np.float32), activation=1)
    with pytest.raises(TypeError, match="y must be float32, got float64"):
        _C.conv2d_backward_filter(x, dy, t, y=np.zeros(g.y_shape), activation=1)
    with pytest.raises(ValueError, match="activation code must be 0..3"):
        _C.conv2d_backward_data(dy, w, t, y=np.zeros(g.y_shape, np.float32), activation=4)
    with pytest.raises(ValueError, match="output dx overlaps input y"):
        both = np.zeros(x.size + dy.size, np.float32)
        _C.conv2d_backward_data(dy, w, t, both[:x.size].reshape(g.x_shape), y=both[x.size - 1:][:dy.size].reshape(g.y_shape),
                                activation=1)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((3, 12, 11, 40), (5, 5, 40, 37), 1, "same"),        # K = 1000 > KC: two reduction blocks
    ((2, 9, 9, 3), (3, 3, 3, 130), 2, ((0, 2), (1, 0))),  # F = 130: 4 full panels + ragged tail
    ((7, 26, 26, 32), (3, 3, 32, 64), 1, "valid"),       # MNIST conv2 shape at batch 7 (ragged M)
    ((1, 4, 4, 2), (4, 4, 2, 3), 1, "valid"),            # a single output pixel
    ((2, 7, 9, 70), (3, 3, 70, 130), 1, "same"),         # direct kernels: 64+64+2 and 64+6 panels, padded rows
    ((3, 5, 30, 3), (2, 4, 3, 17), 1, ((0, 4), (5, 2))),  # pads past the kernel: backward-data crops
    ((3, 9, 8, 17), (3, 3, 17, 20), 1, ((2, 0), (1, 3))),  # Winograd: odd OH, C/F tails, bwd-data crops
    ((2, 10, 13, 24), (3, 3, 24, 16), 1, "valid"),       # Winograd: odd OW (ragged right tile column)
])
def test_conv_block_edges(x_shape, w_shape, strides, padding, rng):
    g = conv_geometry(x_shape, w_shape, strides, padding)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32)
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    t = g.as_tuple()
    np.testing.assert_allclose(_C.conv2d_forward(x, w, b, t, 1), ref.conv2d_forward(x, w, b, g, "relu"),
                               rtol=RTOL, atol=_tol(g.gemm_k))
    np.testing.assert_allclose(_C.conv2d_backward_data(dz, w, t), ref.conv2d_backward_data(dz, w, g),
                               rtol=RTOL, atol=_tol(g.k_h * g.k_w * g.filters))
    dw, db = _C.conv2d_backward_filter(x, dz, t)
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(g.gemm_m))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("x_shape,padding", [((2, 7, 29, 16), "same"), ((1, 6, 5, 40), ((0, 1), (2, 0))),
                                             ((3, 31, 4, 9), "valid")])
def test_winograd_3x3_forward_and_backward_data(x_shape, padding, act, rng):
    """3x3 stride-1 convs with C >= 8, F >= 16 run Winograd F(2x2, 3x3) (forward, backward-data,
    backward-filter): every activation, odd
    sizes (29 tiles = 2 full blocks of 12 + 5), F = 70 (panel 64 + 6), bias on and off."""
    c = x_shape[-1]
    g = conv_geometry(x_shape, (3, 3, c, 70), 1, padding)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    for b in (None, rng.standard_normal(g.filters, dtype=np.float32)):
        np.testing.assert_allclose(_C.conv2d_forward(x, w, b, g.as_tuple(), CODES[act]),
                                   ref.conv2d_forward(x, w, b, g, act), rtol=RTOL, atol=_tol(g.gemm_k))
    np.testing.assert_allclose(_C.conv2d_backward_data(dz, w, g.as_tuple()), ref.conv2d_backward_data(dz, w, g),
                               rtol=RTOL, atol=_tol(9 * g.filters))
    dw, db = _C.conv2d_backward_filter(x, dz, g.as_tuple())
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(g.gemm_m))


def _aligned_empty(shape, offset_floats=0):
    """float32 array whose data starts offset_floats past a 64-byte boundary."""
    n = int(np.prod(shape))
    buf = np.empty(n + 32, np.float32)
    o = (-buf.ctypes.data % 64) // 4 + offset_floats
    return buf[o:o + n].reshape(shape)


@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("act", ("linear", "relu", "tanh"))
def test_winograd_blocks_cross_tile_rows_and_stream_stores(offset, act, rng):
    """Winograd tile blocks run over the flattened (n, th, tw) grid: 13-tile rows (26-wide output,
    the backward-data of MNIST conv2) and an odd 5x5 tile grid per image make blocks straddle
    rows and images.  F = 64 into a 64-byte aligned output takes the non-temporal store path;
    offset 4 floats (misaligned) and tanh take the ordinary stores."""
    g = conv_geometry((3, 11, 11, 32), (3, 3, 32, 64), 1, "same")  # 6x6 tiles, 2 ragged edges
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32)
    y = _aligned_empty(g.y_shape, offset)
    out = _C.conv2d_forward(x, w, b, g.as_tuple(), CODES[act], y)
    assert out is y or np.shares_memory(out, y)
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, g, act), rtol=RTOL, atol=_tol(g.gemm_k))
    # backward-data of a 26-wide input from 32 channels: C = 64 in, F = 32 out, 13 tiles a row
    g2 = conv_geometry((2, 26, 26, 32), (3, 3, 32, 64), 1, "valid")
    dz = rng.standard_normal(g2.y_shape, dtype=np.float32)
    w2 = rng.standard_normal(g2.w_shape, dtype=np.float32)
    dx = _aligned_empty(g2.x_shape, offset)
    _C.conv2d_backward_data(dz, w2, g2.as_tuple(), dx)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w2, g2), rtol=RTOL, atol=_tol(9 * g2.filters))


def test_backward_filter_split_reduction(rng):
    """Enough pixels (>= 4*KC) that the threads split the reduction and sum private partials."""
    g = conv_geometry((9, 30, 30, 5), (3, 3, 5, 7), 1, "same")
    assert g.gemm_m >= 4 * 512
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    dw, db = _C.conv2d_backward_filter(x, dz, g.as_tuple())
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(g.gemm_m))


def test_out_buffers_are_written_in_place(rng):
    g = conv_geometry((2, 6, 6, 3), (3, 3, 3, 4), 1, "same")
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    y = np.full(g.y_shape, np.nan, np.float32)
    out = _C.conv2d_forward(x, w, None, g.as_tuple(), 0, y)
    assert out is y
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, None, g), rtol=RTOL, atol=_tol(g.gemm_k))


# ----------------------------------------------------------------------------- vs TensorFlow
@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _tf_padding(g):
    return [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]]


def _expand_dilated(w, g):
    """TF's CPU conv gradients refuse dilation > 1 (and tf.nn.conv2d dilation with stride):
    a dilated kernel equals a dense kernel of the effective size with zeros between taps."""
    we = np.zeros((g.k_h_eff, g.k_w_eff, g.in_c, g.filters), np.float32)
    we[::g.dil_h, ::g.dil_w] = w
    return we


@settings(max_examples=120)
@given(conv_cases())
def test_conv_matches_tensorflow_values_and_gradients(tf, case):
    g, x, w, b, dz = _arrays(case)
    act = case["act"]
    xt, wt = tf.constant(x), tf.constant(_expand_dilated(w, g))
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        # Pads applied with tf.pad, then a VALID conv: TF 2.21's oneDNN conv with an explicit
        # all-zero padding list returned uninitialised rows for some strided shapes here.
        z = tf.nn.conv2d(tf.pad(xt, _tf_padding(g)), wt, strides=[1, g.stride_h, g.stride_w, 1],
                         padding="VALID")
        loss = tf.reduce_sum(z * tf.constant(dz))
    dx_tf, dw_tf = tape.gradient(loss, [xt, wt])
    dw_tf = dw_tf.numpy()[::g.dil_h, ::g.dil_w]
    zb = z.numpy() + (b if b is not None else 0)
    y_tf = {"linear": zb, "relu": np.maximum(zb, 0), "sigmoid": tf.sigmoid(zb).numpy(),
            "tanh": np.tanh(zb)}[act]
    y = ops.conv2d(x, w, b, case["strides"], case["padding"], case["dilation"], act, backend="cpp")
    np.testing.assert_allclose(y, y_tf, rtol=RTOL, atol=_tol(g.gemm_k))
    dx = ops.conv2d_backward_data(dz, w, g.x_shape, geometry=g, backend="cpp")
    dw, db = ops.conv2d_backward_filter(x, dz, g.w_shape, geometry=g, backend="cpp")
    np.testing.assert_allclose(dx, dx_tf.numpy(), rtol=RTOL, atol=_tol(g.k_h * g.k_w * g.filters))
    np.testing.assert_allclose(dw, dw_tf, rtol=RTOL, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, dz.sum(axis=(0, 1, 2)), rtol=RTOL, atol=_tol(g.gemm_m))


@settings(max_examples=40)
@given(m=st.sampled_from((1, 3, 13, 25)), k=st.sampled_from((1, 7, 64, 600)),
       n=st.sampled_from((1, 10, 33, 70)), bias=st.booleans(),
       act=st.sampled_from(ACTS + ("softmax",)), seed=st.integers(0, 2**16))
def test_dense_matches_tensorflow_and_reference(tf, m, k, n, bias, act, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    b = rng.standard_normal(n, dtype=np.float32) if bias else None
    dy = rng.standard_normal((m, n), dtype=np.float32)
    y = ops.dense(x, w, b, act, backend="cpp")
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        z = tf.matmul(xt, wt) + (tf.constant(b) if b is not None else 0.0)
        y_tf = {"linear": tf.identity, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
                "softmax": tf.nn.softmax}[act](z)
        loss = tf.reduce_sum(y_tf * tf.constant(dy))
    dx_tf, dw_tf = tape.gradient(loss, [xt, wt])
    np.testing.assert_allclose(y, y_tf.numpy(), rtol=RTOL, atol=_tol(k))
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=RTOL, atol=_tol(k))
    dx, dw, db = ops.dense_backward(x, w, dy, y, act, backend="cpp")
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, act)
    np.testing.assert_allclose(dx, dx_tf.numpy(), rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, dw_tf.numpy(), rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(m))


def test_dense_mnist_shape_long_reduction(rng):
    """128x9216 → 128 (the MNIST dense layer): 18 reduction blocks, 4 column panels."""
    x = rng.standard_normal((128, 9216), dtype=np.float32)
    w = rng.standard_normal((9216, 128), dtype=np.float32) / np.float32(96)
    b = rng.standard_normal(128, dtype=np.float32)
    y = _C.dense_forward(x, w, b, 1)
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, "relu"), rtol=RTOL, atol=_tol(9216))
    dy = rng.standard_normal((128, 128), dtype=np.float32)
    dx, dw, db = _C.dense_backward(x, w, dy, y, 1)
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, "relu")
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=_tol(128))
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(128))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(128))


@pytest.mark.parametrize("m,k,n", [(128, 9216, 128), (1, 130, 1), (7, 200, 33), (13, 1000, 70),
                                   (37, 777, 130), (6, 129, 64), (50, 4100, 17)])
@pytest.mark.parametrize("act", ACTS + ("softmax",))
def test_dense_backward_k_blocks(m, k, n, act, rng):
    """Dense backward with K split into 64-feature blocks (v2_direct on AVX-512: one block owns its
    dx columns and dw rows): MNIST shape, ragged M / K / N against the register tiles and panels,
    every activation (softmax's dz comes from activation_backward), via ops (64-byte aligned
    outputs: streaming stores) and via _C with misaligned output views (plain stores)."""
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    y = ref.dense_forward(x, w, b, act).astype(np.float32)
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, act)
    dx, dw, db = ops.dense_backward(x, w, dy, y, act, backend="cpp")
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(m))
    if act == "softmax":
        return
    # Output views one float past a 64-byte boundary (still element-aligned, C-contiguous).
    buf = np.full(m * k + n * k + n + 64, np.nan, np.float32)
    base = (-buf.ctypes.data % 64) // 4 + 1
    odx = buf[base:base + m * k].reshape(m, k)
    odw = buf[base + m * k:base + m * k + k * n].reshape(k, n)
    odb = buf[base + m * k + k * n:base + m * k + k * n + n]
    _C.dense_backward(x, w, dy, y if act != "linear" else None, CODES[act], odx, odw, odb)
    np.testing.assert_allclose(odx, rdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(odw, rdw, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(odb, rdb, rtol=RTOL, atol=_tol(m))
    assert np.isnan(buf[:base]).all() and np.isnan(buf[base + m * k + k * n + n:]).all()  # nothing outside


@pytest.mark.parametrize("m,k,n", [(1, 2300, 70), (7, 4100, 1), (37, 2111, 130), (128, 2048, 16)])
@pytest.mark.parametrize("act", ACTS)
def test_dense_long_reduction_k_split(m, k, n, act, rng):
    """K >> M, N: the K-split path (private partials per K group, bias + activation on the sum),
    with ragged K blocks, row tiles and column panels."""
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    for b in (None, rng.standard_normal(n, dtype=np.float32)):
        y = _C.dense_forward(x, w, b, CODES[act])
        np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=RTOL, atol=_tol(k))


@pytest.mark.parametrize("m,k,n", [(1, 9216, 128), (1, 128, 10), (5, 300, 65), (3, 1, 16), (8, 9216, 128),
                                   (7, 3000, 17), (11, 9216, 130), (6, 9000, 200)])
@pytest.mark.parametrize("act", ACTS)
def test_dense_forward_few_rows(tf, m, k, n, act, rng):
    """Fewer rows than one GEMM register tile (M < 12, batch-1 inference): the direct 1..6-row
    tiles over x and w read in place.  MNIST's 9216 -> 128 and 128 -> 10 at batch 1 and 8, ragged
    panels (N = 65, 130, 200: a masked last vector), K = 1, a 6 + 5 row split; (11, 9216, 130)
    and (6, 9000, 200) are above the serial threshold (two threads share the items); inputs one
    float past a 64-byte boundary (unaligned loads)."""
    for aligned in (True, False):
        xb = np.empty(m * k + 16, np.float32)
        wb = np.empty(k * n + 16, np.float32)
        off = (0 if aligned else 1)
        xo = (-xb.ctypes.data % 64) // 4 + off
        wo = (-wb.ctypes.data % 64) // 4 + off
        x = xb[xo:xo + m * k].reshape(m, k)
        w = wb[wo:wo + k * n].reshape(k, n)
        x[...] = rng.standard_normal((m, k), dtype=np.float32)
        w[...] = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
        for b in (None, rng.standard_normal(n, dtype=np.float32)):
            y = _C.dense_forward(x, w, b, CODES[act])
            np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=RTOL, atol=_tol(k))
            if act == "linear":   # and TensorFlow's matmul on the same inputs
                z = tf.matmul(tf.constant(x), tf.constant(w)).numpy() + (b if b is not None else 0)
                np.testing.assert_allclose(y, z, rtol=RTOL, atol=_tol(k))


@settings(max_examples=30)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), scale=st.sampled_from((1.0, 30.0, 1e3)),
       seed=st.integers(0, 2**16))
def test_softmax_and_its_backward(rows, cols, scale, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    y = ops.softmax(z, backend="cpp")
    np.testing.assert_allclose(y, ref.softmax(z.astype(np.float64)), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    dy = rng.standard_normal((rows, cols), dtype=np.float32)
    dz = ops.activation_backward(dy, y, "softmax", backend="cpp")
    np.testing.assert_allclose(dz, ref.activation_backward(dy, y, "softmax"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_elementwise_activation_backward(act, rng):
    dy = rng.standard_normal((3, 4, 5), dtype=np.float32)
    y = ref.activate(rng.standard_normal((3, 4, 5)), act).astype(np.float32)
    out = ops.activation_backward(dy, y, act, backend="cpp")
    np.testing.assert_allclose(out, ref.activation_backward(dy, y, act), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- re-entrancy
def test_concurrent_calls_from_python_threads():
    """Several Python threads at once (the GIL is released inside), different shapes each,
    every result checked: no shared scratch between calls."""
    cases = []
    for i in range(8):
        rng = np.random.default_rng(100 + i)
        n, h, c, f = 1 + i % 3, 9 + i, (1, 3, 17, 8)[i % 4], (5, 33, 70, 16)[i % 4]
        g = conv_geometry((n, h, h + 1, c), (3, 1 + i % 3, c, f), 1 + i % 2, "same", 1)
        cases.append((g, rng.standard_normal(g.x_shape, dtype=np.float32),
                      rng.standard_normal(g.w_shape, dtype=np.float32),
                      rng.standard_normal(g.y_shape, dtype=np.float32)))

    def work(case):
        g, x, w, dz = case
        out = []
        for _ in range(3):
            y = _C.conv2d_forward(x, w, None, g.as_tuple(), 3)
            dx = _C.conv2d_backward_data(dz, w, g.as_tuple())
            dw, db = _C.conv2d_backward_filter(x, dz, g.as_tuple())
            out.append((y, dx, dw, db))
        return out

    with cf.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(work, cases))
    for (g, x, w, dz), res in zip(cases, results):
        want = (ref.conv2d_forward(x, w, None, g, "tanh"), ref.conv2d_backward_data(dz, w, g),
                *ref.conv2d_backward_filter(x, dz, g))
        for got in res:
            for a, r in zip(got, want):
                np.testing.assert_allclose(a, r, rtol=RTOL, atol=_tol(g.gemm_m))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def conv_args(rng):
    g = conv_geometry((2, 6, 7, 3), (3, 3, 3, 4), 1, "valid")
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32)
    return g, x, w, b


def test_wrong_dtype_raises_type_error_never_converts(conv_args):
    g, x, w, b = conv_args
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        _C.conv2d_forward(x.astype(np.float64), w, b, g.as_tuple(), 0)
    with pytest.raises(TypeError, match="w must be float32, got int16"):
        _C.conv2d_forward(x, w.astype(np.int16), b, g.as_tuple(), 0)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        _C.conv2d_forward(x.tolist(), w, b, g.as_tuple(), 0)
    with pytest.raises(TypeError, match="y must be float32"):
        _C.conv2d_forward(x, w, b, g.as_tuple(), 0, np.empty(g.y_shape, np.float64))
    with pytest.raises(TypeError, match="float32"):
        _C.dense_forward(np.ones((2, 3)), np.ones((3, 4), np.float32), None, 0)


def test_wrong_shapes_and_layouts_raise_value_error(conv_args):
    g, x, w, b = conv_args
    t = g.as_tuple()
    with pytest.raises(ValueError, match=r"x has shape \(2, 6, 8, 3\), expected \(2, 6, 7, 3\)"):
        _C.conv2d_forward(np.zeros((2, 6, 8, 3), np.float32), w, b, t, 0)
    with pytest.raises(ValueError, match=r"b has shape \(5,\), expected \(4,\)"):
        _C.conv2d_forward(x, w, np.zeros(5, np.float32), t, 0)
    with pytest.raises(ValueError, match="y has shape"):
        _C.conv2d_forward(x, w, b, t, 0, np.empty((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.conv2d_forward(np.asfortranarray(x), w, b, t, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        big = np.zeros((2, 6, 14, 3), np.float32)
        _C.conv2d_forward(big[:, :, ::2], w, b, t, 0)
    ro = np.empty(g.y_shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _C.conv2d_forward(x, w, b, t, 0, ro)
    with pytest.raises(ValueError, match="dz has shape"):
        _C.conv2d_backward_data(np.zeros((2, 4, 5, 5), np.float32), w, t)
    with pytest.raises(ValueError, match="dw has shape"):
        _C.conv2d_backward_filter(x, np.zeros(g.y_shape, np.float32), t, np.empty((3, 3, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"w has shape \(4, 4\), expected \(3, 4\)"):
        _C.dense_forward(np.zeros((2, 3), np.float32), np.zeros((4, 4), np.float32), None, 0)
    with pytest.raises(ValueError, match="rank 2"):
        _C.dense_forward(np.zeros((2, 3, 1), np.float32), np.zeros((3, 4), np.float32), None, 0)
    with pytest.raises(ValueError, match="y \\(the forward output\\) is needed"):
        _C.dense_backward(np.zeros((2, 3), np.float32), np.zeros((3, 4), np.float32),
                          np.zeros((2, 4), np.float32), None, 1)


def test_outputs_may_not_alias_inputs(conv_args):
    g, x, w, b = conv_args
    z = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="overlaps input z"):
        _C.softmax(z, z)
    ny = int(np.prod(g.y_shape))
    buf = np.zeros(ny + x.size, np.float32)
    dz, dx = buf[:ny].reshape(g.y_shape), buf[ny - 1:ny - 1 + x.size].reshape(g.x_shape)  # one float shared
    with pytest.raises(ValueError, match="output dx overlaps input dz"):
        _C.conv2d_backward_data(dz, w, g.as_tuple(), dx)
    with pytest.raises(ValueError, match="outputs dx and dw overlap"):
        xs = np.zeros((2, 3), np.float32)
        ws = np.zeros((3, 4), np.float32)
        both = np.zeros(6 + 12, np.float32)
        _C.dense_backward(xs, ws, np.zeros((2, 4), np.float32), None, 0, both[:6].reshape(2, 3),
                          both[4:16].reshape(3, 4))


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t[:16], "17 fields"),
    (lambda t: t[:15] + (t[15] + 1,) + t[16:], "out_h/out_w do not match"),
    (lambda t: (t[0], t[1], t[2], t[3], t[4], t[5], t[6], 0) + t[8:], "stride < 1"),
    (lambda t: (t[0], 1) + t[2:], "kernel larger than padded input|out_h/out_w"),
    (lambda t: (-1,) + t[1:], "out of range"),
    (lambda t: (2**40,) + t[1:], "out of range"),
])
def test_bad_geometry_raises(conv_args, mutate, match):
    g, x, w, b = conv_args
    with pytest.raises(ValueError, match=match):
        _C.conv2d_forward(x, w, b, mutate(g.as_tuple()), 0)


def test_bad_geometry_types_and_activation_codes(conv_args):
    g, x, w, b = conv_args
    with pytest.raises(TypeError, match="geometry"):
        _C.conv2d_forward(x, w, b, "geometry", 0)
    with pytest.raises(TypeError, match="field 3 must be an int"):
        _C.conv2d_forward(x, w, b, g.as_tuple()[:3] + (3.0,) + g.as_tuple()[4:], 0)
    with pytest.raises(ValueError, match="activation code must be 0..3"):
        _C.conv2d_forward(x, w, b, g.as_tuple(), 4)
    with pytest.raises(ValueError, match="activation code must be 0..4"):
        _C.activation_backward(np.zeros(3, np.float32), np.zeros(3, np.float32), -1)
    with pytest.raises(ValueError, match="softmax needs rank-2"):
        _C.activation_backward(np.zeros(3, np.float32), np.zeros(3, np.float32), 4)


def test_geometry_must_match_the_buffers_not_the_other_way_round(rng):
    """A self-consistent geometry for a *bigger* input is refused against a smaller buffer."""
    g_small = conv_geometry((1, 5, 5, 2), (3, 3, 2, 2))
    g_big = conv_geometry((1, 9, 9, 2), (3, 3, 2, 2))
    x = rng.standard_normal(g_small.x_shape, dtype=np.float32)
    w = rng.standard_normal(g_small.w_shape, dtype=np.float32)
    with pytest.raises(ValueError, match="x has shape"):
        _C.conv2d_forward(x, w, None, g_big.as_tuple(), 0)


def test_empty_batch_and_backward_filter_of_nothing():
    g = conv_geometry((0, 5, 5, 2), (3, 3, 2, 4))
    y = _C.conv2d_forward(np.zeros(g.x_shape, np.float32), np.ones(g.w_shape, np.float32), None,
                          g.as_tuple(), 0)
    assert y.shape == (0, 3, 3, 4)
    dw, db = _C.conv2d_backward_filter(np.zeros(g.x_shape, np.float32), np.zeros(g.y_shape, np.float32),
                                       g.as_tuple())
    assert not dw.any() and not db.any()


# ----------------------------------------------------------------------------- backend
def test_backend_status_and_variants():
    from dlconv import backends
    be = backends.get("cpp")
    ok, why = be.cpu_status()
    assert ok and _C.build_info()["simd"] in why
    assert be.conv_variants(False) == ("cpu_v3_winograd", "cpu_v2_regblock", "cpu_v1_packgemm")
    # Winograd (F(2x2, 3x3) and F(2x2, 5x5)) only runs 3x3 and 5x5 stride-1 undilated kernels with C >= 8, F >= 16.
    assert be.conv_variants(False, conv_geometry((1, 28, 28, 1), (3, 3, 1, 32))) == (
        "cpu_v2_regblock", "cpu_v1_packgemm")
    assert be.conv_variants(False, conv_geometry((1, 9, 9, 16), (3, 3, 16, 16), strides=2)) == (
        "cpu_v2_regblock", "cpu_v1_packgemm")
    assert be.conv_variants(True) == ("cuda_v3_regblock", "cuda_v2_gemmtile", "cuda_v1_direct")
    x = np.ones((1, 4, 4, 1), np.float32)
    w = np.ones((3, 3, 1, 1), np.float32)
    y = ops.conv2d(x, w, backend="cpp", variant="cpu_v1_packgemm")
    np.testing.assert_array_equal(y[0, :, :, 0], np.full((2, 2), 9.0, np.float32))
    with pytest.raises(ValueError, match="variant must be one of"):
        ops.conv2d(x, w, backend="cpp", variant="cuda_v1_direct")
    # Winograd asked for a geometry it cannot run: refused before any launch, in Python and in C++.
    with pytest.raises(ValueError, match="variant must be one of"):
        ops.conv2d(x, w, backend="cpp", variant="cpu_v3_winograd")
    with pytest.raises(ValueError, match=r"variant cpu_v3_winograd \(3\) cannot run"):
        _C.conv2d_forward(x, w, None, conv_geometry(x.shape, w.shape).as_tuple(), 0, variant=3)


@pytest.mark.parametrize("xs,ws,strides,padding,dilation", [
    ((3, 13, 11, 9), (3, 3, 9, 17), 1, "same", 1),          # Winograd-eligible, ragged C and F
    ((2, 26, 26, 32), (3, 3, 32, 64), 1, "valid", 1),       # the MNIST conv2 shape (small batch)
    ((2, 28, 28, 1), (3, 3, 1, 32), 1, "valid", 1),         # conv1: C = 1
    ((3, 9, 10, 5), (2, 3, 5, 7), 2, ((1, 0), (2, 1)), 1),  # stride 2, asymmetric pads
    ((1, 11, 9, 4), (3, 3, 4, 70), 1, "same", 2),           # dilation 2, F past a 64-filter block
])
@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh"])
def test_every_cpu_forward_variant_matches_reference(xs, ws, strides, padding, dilation, act):
    from dlconv import backends
    g = conv_geometry(xs, ws, strides, padding, dilation)
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    b = rng.standard_normal(ws[3]).astype(np.float32)
    want = ref.conv2d_forward(x, w, b, g, act)
    variants = backends.get("cpp").conv_variants(False, g)
    assert "cpu_v1_packgemm" in variants
    for v in variants:
        got = ops.conv2d(x, w, b, strides, padding, dilation, act, backend="cpp", variant=v)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(g.gemm_k), err_msg=v)


def test_stream_handle_parsing():
    import ctypes

    class NumbaLike:
        handle = ctypes.c_void_p(1234)

    class TorchLike:
        cuda_stream = 5678

    assert cpp_backend.stream_handle(None) == 0
    assert cpp_backend.stream_handle(0) == 0
    assert cpp_backend.stream_handle(NumbaLike()) == 1234
    assert cpp_backend.stream_handle(TorchLike()) == 5678

    class CupyLike:          # cupy.cuda.Stream: .ptr and the CUDA stream protocol
        ptr = 4321

        def __cuda_stream__(self):
            return (0, 4321)

    class PtrOnly:           # older CuPy: .ptr only
        ptr = 999

    class ProtocolOnly:      # cuda.core / cuda-python style
        def __cuda_stream__(self):
            return (0, 31337)

    class NullProtocol:      # the legacy default stream as NULL
        def __cuda_stream__(self):
            return (0, None)

    class BadProtocol:
        def __cuda_stream__(self):
            return 31337

    assert cpp_backend.stream_handle(CupyLike()) == 4321
    assert cpp_backend.stream_handle(PtrOnly()) == 999
    assert cpp_backend.stream_handle(ProtocolOnly()) == 31337
    assert cpp_backend.stream_handle(NullProtocol()) == 0
    with pytest.raises(TypeError, match=r"__cuda_stream__\(\) must return \(version, handle\)"):
        cpp_backend.stream_handle(BadProtocol())
    with pytest.raises(TypeError, match="stream"):
        cpp_backend.stream_handle("default")
    with pytest.raises(ValueError, match="stream handle must be >= 0"):
        cpp_backend.stream_handle(-1)


def test_resolve_axis_is_the_only_source_of_pads():
    """The C++ side checks but never derives: an out size from shapes.resolve_axis passes."""
    pt, pb, oh = resolve_axis(11, 4, 3, 2, "same")
    g = conv_geometry((1, 11, 11, 1), (4, 4, 1, 1), 3, "same", 2)
    assert (g.pad_top, g.pad_bottom, g.out_h) == (pt, pb, oh)
    y = _C.conv2d_forward(np.ones(g.x_shape, np.float32), np.ones(g.w_shape, np.float32), None,
                          g.as_tuple(), 0)
    np.testing.assert_allclose(y, ref.conv2d_forward(np.ones(g.x_shape), np.ones(g.w_shape), None, g))
