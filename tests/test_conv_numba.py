"""The Numba conv2d kernels (dlconv.kernels.conv2d_cpu, conv2d_cuda, conv2d_backward_cuda and
the NumbaBackend) against the float64 NumPy reference and against TensorFlow (values and
gradients from tf.GradientTape) on generated shapes.

CUDA kernels run under the Numba simulator when there is no GPU (see conftest.py), so their
generated shapes are tiny.  ``gpu``-marked tests repeat the checks on MNIST-sized shapes.
TensorFlow's conv2d refuses dilation > 1 together with stride > 1, and its CPU gradients
refuse dilation > 1; those cases are checked against the reference only.
"""

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SIMULATOR
from dlconv import activations as A
from dlconv import ops
from dlconv import reference as ref
from dlconv.backends import get
from dlconv.shapes import conv_geometry

try:
    import tensorflow as tf
except ImportError:  # the GPU check machine has no TensorFlow: there the reference alone judges
    tf = None
NO_TF = pytest.mark.skipif(tf is None, reason="TensorFlow is not installed (GPU check machine)")

from dlconv.kernels import conv2d_backward_cuda as cbw  # noqa: E402
from dlconv.kernels import conv2d_cpu as ccpu  # noqa: E402
from dlconv.kernels import conv2d_cuda as ccuda  # noqa: E402
from numba import cuda  # noqa: E402

ACTS = ("linear", "relu", "sigmoid", "tanh")


def tol(reduction: int) -> dict:
    """float32 kernels vs the float64 reference: rounding grows with the reduction length."""
    return dict(rtol=1e-4, atol=1e-5 + 2e-6 * reduction)


@st.composite
def conv_cases(draw, max_hw=7, max_c=5, max_k=5, max_batch=3, max_kernel=5):
    """(geometry, padding spec, bias?, activation) for a valid convolution."""
    batch = draw(st.sampled_from([1, 2, 3][:max_batch]))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, max_k))
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["valid", "same", "explicit"]))
    if kind == "explicit":
        pad = ((draw(st.integers(0, 3)), draw(st.integers(0, 3))),
               (draw(st.integers(0, 3)), draw(st.integers(0, 3))))
    else:
        pad = kind
    # keep the kernel inside the padded input: shrink it instead of rejecting the example
    while True:
        try:
            g = conv_geometry((batch, h, w, c), (kh, kw, c, k), (sh, sw), pad, (dh, dw))
            break
        except ValueError:
            if kh > 1:
                kh -= 1
            elif kw > 1:
                kw -= 1
            elif dh > 1 or dw > 1:
                dh, dw = 1, 1
            else:
                raise
    return g, draw(st.booleans()), draw(st.sampled_from(ACTS))


def arrays(g, seed, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    b = rng.standard_normal(g.filters).astype(np.float32) if bias else None
    dy = rng.standard_normal(g.y_shape).astype(np.float32)
    return x, w, b, dy


def tf_ok(g) -> bool:
    """TensorFlow is importable, and the geometry is one tf.nn.conv2d runs (it cannot combine
    dilation > 1 with stride > 1)."""
    return tf is not None and ((g.dil_h == 1 and g.dil_w == 1) or (g.stride_h == 1 and g.stride_w == 1))


def _tf_conv(xt, wt, g):
    pads = [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]]
    return tf.nn.conv2d(xt, wt, strides=[1, g.stride_h, g.stride_w, 1], padding=pads,
                        dilations=[1, g.dil_h, g.dil_w, 1])


def test_tf_ok_is_false_without_tensorflow(monkeypatch):
    # `tf is not None and A or B` once bound as `(tf is not None and A) or B`: a stride-1
    # geometry then asked for TensorFlow on a machine without it
    g = conv_geometry((1, 6, 6, 1), (3, 3, 1, 1), 1, "valid", 2)
    monkeypatch.setitem(globals(), "tf", None)
    assert not tf_ok(g) and not tf_grads_ok(g)


def tf_forward(x, w, b, g, act):
    """TensorFlow's y = act(conv2d(x, w) + b) with explicit pads and dilations."""
    z = _tf_conv(tf.constant(x), tf.constant(w), g)
    if b is not None:
        z = z + b
    return {"linear": z, "relu": tf.nn.relu(z), "sigmoid": tf.sigmoid(z), "tanh": tf.tanh(z)}[act].numpy()


def tf_grads_ok(g) -> bool:
    """TensorFlow's CPU Conv2DBackpropInput/Filter do not support dilation > 1."""
    return tf is not None and g.dil_h == 1 and g.dil_w == 1


def tf_grads(x, w, g, dy):
    """dL/dx, dL/dw, dL/db of z = conv2d(x, w) + b for the upstream gradient dy."""
    xt, wt = tf.constant(x), tf.constant(w)
    bt = tf.zeros(g.filters)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        z = _tf_conv(xt, wt, g) + bt
    return [t.numpy() for t in tape.gradient(z, [xt, wt, bt], output_gradients=tf.constant(dy))]


def check_forward(y, x, w, b, g, act, with_tf=True):
    r = ref.conv2d_forward(x, w, b, g, act)
    assert y.shape == g.y_shape and y.dtype == np.float32
    np.testing.assert_allclose(y, r, **tol(g.gemm_k))
    if with_tf and tf_ok(g):
        ty = tf_forward(x, w, b, g, act)
        np.testing.assert_allclose(y, ty, **tol(g.gemm_k))


def check_backward(dx, dw, db, x, w, dy, g, with_tf=True):
    rdx = ref.conv2d_backward_data(dy, w, g)
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    assert dx.shape == g.x_shape and dw.shape == g.w_shape and db.shape == (g.filters,)
    red_x = g.k_h * g.k_w * g.filters
    red_w = g.gemm_m
    np.testing.assert_allclose(dx, rdx, **tol(red_x))
    np.testing.assert_allclose(dw, rdw, **tol(red_w))
    np.testing.assert_allclose(db, rdb, **tol(red_w))
    if with_tf and tf_grads_ok(g):
        tdx, tdw, tdb = tf_grads(x, w, g, dy)
        np.testing.assert_allclose(dx, tdx, **tol(red_x))
        np.testing.assert_allclose(dw, tdw, **tol(red_w))
        np.testing.assert_allclose(db, tdb, **tol(red_w))


# ----------------------------------------------------------------------------- CPU kernels
@settings(max_examples=60)
@given(case=conv_cases(max_hw=9, max_c=6, max_k=70), seed=st.integers(0, 2**16))
def test_cpu_forward_variants_match_reference_and_tf(case, seed):
    # K up to 70 crosses the 64-filter panel of cpu_v2_regblock (ragged second panel)
    g, bias, act = case
    x, w, b, _ = arrays(g, seed, bias)
    for variant in ccpu.VARIANTS:
        y = ccpu.forward(x, w, b, g, A.code(act), variant)
        check_forward(y, x, w, b, g, act)


@settings(max_examples=60)
@given(case=conv_cases(max_hw=9, max_c=6, max_k=6), seed=st.integers(0, 2**16))
def test_cpu_backward_matches_reference_and_tf(case, seed):
    g, _, _ = case
    x, w, _, dy = arrays(g, seed)
    dw, db = ccpu.backward_filter(x, dy, g)
    check_backward(ccpu.backward_data(dy, w, g), dw, db, x, w, dy, g)
    # the gather kernel alone (backward_data routes stride 1 through the GEMM kernel)
    check_backward(ccpu.backward_data_gather(dy, w, g), dw, db, x, w, dy, g, with_tf=False)


@pytest.mark.parametrize("act", ["linear", "relu", "tanh"])
@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((2, 6, 28, 1), (3, 3, 1, 32), 1, "valid", 1),            # conv1-like: 2 blocks of 12 + 2 pixels
    ((1, 5, 30, 7), (3, 3, 7, 17), 1, "same", 1),             # 17 filters: scalar epilogue
    ((2, 7, 40, 3), (2, 3, 3, 32), (1, 2), ((0, 1), (2, 0)), 1),  # stride 2: 20 wide, one block
    ((1, 6, 29, 2), (3, 3, 2, 5), 1, "valid", (1, 2)),        # dilation, 23 wide
])
def test_cpu_gemm_narrow_kernel(x_shape, w_shape, strides, padding, dilation, act):
    """K <= 32 filters: the 12 x 32 register tile, with full 12-pixel blocks (wider outputs than
    the generated cases reach) and the ragged right edge; forward and backward-data."""
    g = conv_geometry(x_shape, w_shape, strides, padding, dilation)
    x, w, b, dy = arrays(g, 5, True)
    check_forward(ccpu.forward(x, w, b, g, A.code(act)), x, w, b, g, act)
    rdx = ref.conv2d_backward_data(dy, w, g)
    np.testing.assert_allclose(ccpu.backward_data(dy, w, g), rdx, **tol(g.k_h * g.k_w * g.filters))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((2, 9, 11, 16), (3, 3, 16, 64), 1, "valid", 1),         # M = 144: 24 full row blocks
    ((3, 8, 7, 5), (3, 2, 5, 128), 2, ((1, 0), (2, 1)), 1),   # M = 30, two panels, stride 2
    ((1, 12, 12, 4), (3, 3, 4, 64), 1, "same", 2),            # dilation 2, M = 36
    ((2, 7, 7, 7), (2, 2, 7, 64), (1, 2), "valid", (2, 1)),   # M = 28: a 4-row ragged block
    ((1, 3, 3, 1), (3, 3, 1, 64), 1, "valid", 1),             # one output pixel (most chunks empty)
])
def test_cpu_backward_filter_register_tile(x_shape, w_shape, strides, padding, dilation):
    """K a multiple of 64: the chunked 6 x 64 register-tile kernel, ragged row blocks included."""
    g = conv_geometry(x_shape, w_shape, strides, padding, dilation)
    x, w, _, dy = arrays(g, 11)
    dw, db = ccpu.backward_filter(x, dy, g)
    check_backward(ccpu.backward_data(dy, w, g), dw, db, x, w, dy, g)
    again = ccpu.backward_filter(x, dy, g)
    assert np.array_equal(dw, again[0]) and np.array_equal(db, again[1])


def test_cpu_backward_stride1_large_padding_uses_subpixel():
    # pads larger than the dilated kernel: the "full correlation" route does not apply (its
    # pads would be negative); the sub-pixel path's one phase crops dz instead
    g = conv_geometry((2, 4, 5, 3), (2, 2, 3, 4), 1, ((3, 0), (0, 4)), 1)
    x, w, _, dy = arrays(g, 7)
    dw, db = ccpu.backward_filter(x, dy, g)
    check_backward(ccpu.backward_data(dy, w, g), dw, db, x, w, dy, g)


@pytest.mark.parametrize("x_shape,k", [
    ((16, 16, 16, 40), 128),  # 16-wide rows (4 of 16 ragged) regrouped into 64-pixel rows; dx too
    ((16, 16, 16, 3), 24),    # the narrow 12 x 32 tile: 16-wide rows regrouped
    ((1, 1, 67, 5), 70),      # 67 pixels (prime): no regrouping, ragged second panel
])
def test_cpu_pointwise_rows_regrouped_bit_identical(x_shape, k, monkeypatch):
    """A pointwise conv runs on longer rows (_pointwise_rows): the same bits as on its own rows,
    the reference's and TensorFlow's values; forward, into ``out``, and backward-data."""
    g = conv_geometry(x_shape, (1, 1, x_shape[3], k), 1, "valid")
    rows = ccpu._pointwise_rows(g)
    assert (rows is None) == (x_shape[2] == 67)
    if rows is not None:
        assert rows.out_w > g.out_w and rows.batch * rows.out_w == g.batch * g.out_h * g.out_w
    x, w, b, dy = arrays(g, 21)
    y = ccpu.launch_gemm(x, w, b, g, A.RELU)
    out = np.empty(g.y_shape, np.float32)
    assert ccpu.launch_gemm(x, w, b, g, A.RELU, out=out) is not None
    check_forward(y, x, w, b, g, "relu")
    dx = ccpu.backward_data(dy, w, g)
    check_backward(dx, *ccpu.backward_filter(x, dy, g), x, w, dy, g)
    monkeypatch.setattr(ccpu, "_pointwise_rows", lambda g: None)
    assert np.array_equal(y, out) and np.array_equal(y, ccpu.launch_gemm(x, w, b, g, A.RELU))
    assert np.array_equal(dx, ccpu.backward_data(dy, w, g))


def test_cpu_kernels_deterministic():
    g = conv_geometry((3, 9, 8, 5), (3, 3, 5, 7), 2, "same")
    x, w, b, dy = arrays(g, 3)
    runs = [(ccpu.forward(x, w, b, g, A.RELU), ccpu.backward_data(dy, w, g),
             *ccpu.backward_filter(x, dy, g)) for _ in range(2)]
    for a1, a2 in zip(*runs):
        assert np.array_equal(a1, a2)


def _misaligned(a):
    """A C-contiguous copy of a whose data start 4 bytes past a 64-byte boundary."""
    raw = np.empty(a.size + 32, np.float32)
    start = (-(raw.ctypes.data // 4) + 1) % 16
    out = raw[start:start + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == 4
    return out


@pytest.mark.parametrize("k", [64, 128, 70, 16])
def test_cpu_gemm_weight_matrix_in_place_copy_and_padded(k):
    # K a multiple of the 64-filter panel: aligned weights are read in place, misaligned ones
    # copied once; other K: zero-padded copy.  OW = 11 leaves a ragged 5-pixel tail after one
    # 6-pixel block; stride 2, dilation and explicit pads exercise the rest of the index map.
    from dlconv.arrays import empty_host
    for strides, pad, dil in [(1, "valid", 1), (1, "same", 1), (2, ((1, 0), (2, 1)), 1),
                              (1, ((0, 1), (1, 2)), 2)]:
        g = conv_geometry((2, 9, 13, 5), (3, 3, 5, k), strides, pad, dil)
        x, w, b, _ = arrays(g, k)
        wa = empty_host(w.shape)
        wa[...] = w
        wm, ldw = ccpu.weight_matrix(wa)
        assert ldw % ccpu.MICRO_NR == 0 and ldw >= k and wm.ctypes.data % 64 == 0
        assert np.shares_memory(wm, wa) == (k % ccpu.MICRO_NR == 0)
        np.testing.assert_array_equal(wm[:, :k], w.reshape(-1, k))
        assert not wm[:, k:].any()
        for wi, act, bias in ((wa, "relu", b), (_misaligned(w), "linear", b),
                              (wa, "tanh", None), (wa, "linear", b[::-1].copy()[::-1])):
            y = ccpu.forward(x, wi, bias, g, A.code(act), "cpu_v2_regblock")   # last: strided bias
            check_forward(y, x, w, bias, g, act, with_tf=False)


def _mnist_images(mnist_dir, n):
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16)
    return (data[:n * 784].reshape(n, 28, 28, 1).astype(np.float32) / 255.0)


@NO_TF
def test_cpu_mnist_shapes_match_tf(mnist_dir):
    """Real MNIST digits through conv1 (28x28x1 → 26x26x32) and conv2 (→ 24x24x64), valid."""
    rng = np.random.default_rng(0)
    x1 = _mnist_images(mnist_dir, 32)
    w1 = (rng.standard_normal((3, 3, 1, 32)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(32) * 0.1).astype(np.float32)
    g1 = conv_geometry(x1.shape, w1.shape)
    h = ccpu.forward(x1, w1, b1, g1, A.RELU)
    np.testing.assert_allclose(h, tf.nn.relu(tf.nn.conv2d(x1, w1, 1, "VALID") + b1).numpy(),
                               **tol(g1.gemm_k))
    w2 = (rng.standard_normal((3, 3, 32, 64)) * 0.1).astype(np.float32)
    g2 = conv_geometry(h.shape, w2.shape)
    for variant in ccpu.VARIANTS:
        y = ccpu.forward(h, w2, None, g2, A.LINEAR, variant)
        np.testing.assert_allclose(y, tf.nn.conv2d(h, w2, 1, "VALID").numpy(), **tol(g2.gemm_k))
    dy = rng.standard_normal(g2.y_shape).astype(np.float32)
    tdx, tdw, tdb = tf_grads(h, w2, g2, dy)
    dw, db = ccpu.backward_filter(h, dy, g2)
    np.testing.assert_allclose(ccpu.backward_data(dy, w2, g2), tdx, **tol(9 * 64))
    np.testing.assert_allclose(dw, tdw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, tdb, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- CUDA kernels
def _dev(*arrs):
    return [None if a is None else cuda.to_device(a) for a in arrs]


@settings(max_examples=20)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_cuda_forward_variants_match_reference_and_tf(case, seed):
    g, bias, act = case
    x, w, b, _ = arrays(g, seed, bias)
    xd, wd, bd = _dev(x, w, b)
    for variant in ccuda.VARIANTS:
        y = ccuda.forward(xd, wd, bd, g, A.code(act), variant).copy_to_host()
        check_forward(y, x, w, b, g, act)


@settings(max_examples=20)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_cuda_backward_matches_reference_and_tf(case, seed):
    g, _, _ = case
    x, w, _, dy = arrays(g, seed)
    xd, wd, dyd = _dev(x, w, dy)
    dx = cbw.launch_backward_data(dyd, wd, g).copy_to_host()
    dw, db = cbw.launch_backward_filter(xd, dyd, g)
    check_backward(dx, dw.copy_to_host(), db.copy_to_host(), x, w, dy, g)


def test_cuda_backward_filter_splits_and_is_deterministic(monkeypatch):
    # force several pixel chunks on a tiny shape: partial sums, then an ordered sum
    monkeypatch.setattr(cbw, "PIXELS_PER_SPLIT", 7)
    g = conv_geometry((2, 5, 4, 2), (2, 3, 2, 3), 1, ((1, 0), (2, 1)))
    assert cbw.filter_splits(g) > 1
    x, w, _, dy = arrays(g, 11)
    xd, dyd = _dev(x, dy)
    runs = [[a.copy_to_host() for a in cbw.launch_backward_filter(xd, dyd, g)] for _ in range(2)]
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(runs[0][0], rdw, **tol(g.gemm_m))
    np.testing.assert_allclose(runs[0][1], rdb, **tol(g.gemm_m))
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_cuda_v2_channel_chunks_and_refusal(monkeypatch):
    # a small shared buffer forces several channel chunks through the same kernel code
    g = conv_geometry((1, 5, 5, 5), (3, 3, 5, 3), 1, "same")
    cc, hh, hw = ccuda.v2_channel_chunk(g)
    assert (hh, hw) == (6, 6) and cc == 5
    x, w, b, _ = arrays(g, 5)
    y = ccuda.launch_v2(*_dev(x, w, b), g, A.TANH).copy_to_host()
    check_forward(y, x, w, b, g, "tanh", with_tf=False)
    huge = conv_geometry((1, 200, 200, 1), (60, 60, 1, 1), 1, "valid")
    with pytest.raises(ValueError, match="cuda_v2_halotile.*halo"):
        ccuda.v2_channel_chunk(huge)


def test_backend_selects_each_variant():
    be = get("numba")
    assert tuple(be.conv_variants(False)) == ccpu.VARIANTS + ("cpu_v3_smalltile",)
    assert tuple(be.conv_variants(True)) == ccuda.VARIANTS
    g = conv_geometry((1, 4, 5, 2), (2, 3, 2, 3), (1, 2), "same", 1)
    x, w, b, _ = arrays(g, 2)
    for v in ccpu.VARIANTS:
        y = be.conv2d_forward(x, w, b, g, "sigmoid", on_device=False, variant=v)
        check_forward(y, x, w, b, g, "sigmoid", with_tf=False)
        np.testing.assert_array_equal(y, ops.conv2d(x, w, b, (1, 2), "same",
                                                    activation="sigmoid", variant=v))
    xd, wd, bd = _dev(x, w, b)
    for v in ccuda.VARIANTS:
        y = be.conv2d_forward(xd, wd, bd, g, "sigmoid", on_device=True, variant=v)
        check_forward(y.copy_to_host(), x, w, b, g, "sigmoid", with_tf=False)
    with pytest.raises(ValueError, match="variant must be one of"):
        be.conv2d_forward(x, w, b, g, "linear", on_device=False, variant="cuda_v1_direct")


def test_backend_status():
    be = get("numba")
    ok, why = be.cpu_status()
    assert ok and "Numba" in why
    ok, why = be.cuda_status()
    assert ok
    if SIMULATOR:
        assert "simulator" in why


# ----------------------------------------------------------------------------- real GPU
MNIST_CONV2 = ((128, 26, 26, 32), (3, 3, 32, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ccuda.VARIANTS)
def test_gpu_mnist_conv2_forward_and_backward(variant):
    """MNIST conv2 at batch 128 against the float64 reference (the GPU machine has no
    TensorFlow; where TensorFlow is importable it is checked too)."""
    g = conv_geometry(*MNIST_CONV2)
    x, w, b, dy = arrays(g, 1)
    xd, wd, bd, dyd = _dev(x, w, b, dy)
    y = ccuda.forward(xd, wd, bd, g, A.RELU, variant).copy_to_host()
    check_forward(y, x, w, b, g, "relu")
    dx = cbw.launch_backward_data(dyd, wd, g).copy_to_host()
    dw, db = cbw.launch_backward_filter(xd, dyd, g)
    check_backward(dx, dw.copy_to_host(), db.copy_to_host(), x, w, dy, g)


@pytest.mark.gpu
def test_gpu_stride_padding_dilation_shapes():
    for strides, pad, dil in [(2, "same", 1), (1, ((2, 0), (1, 3)), 2), (3, 1, 1)]:
        g = conv_geometry((16, 28, 28, 3), (5, 5, 3, 33), strides, pad, dil)
        x, w, b, dy = arrays(g, 2)
        xd, wd, bd, dyd = _dev(x, w, b, dy)
        for variant in ccuda.VARIANTS:
            y = ccuda.forward(xd, wd, bd, g, A.TANH, variant).copy_to_host()
            check_forward(y, x, w, b, g, "tanh")
        dw, db = cbw.launch_backward_filter(xd, dyd, g)
        check_backward(cbw.launch_backward_data(dyd, wd, g).copy_to_host(), dw.copy_to_host(),
                       db.copy_to_host(), x, w, dy, g)


@pytest.mark.gpu
def test_gpu_stream_and_device_arrays_through_ops():
    g = conv_geometry((8, 12, 12, 4), (3, 3, 4, 8), 1, "same")
    x, w, b, dy = arrays(g, 3)
    stream = cuda.stream()
    xd, wd, bd = [cuda.to_device(a, stream=stream) for a in (x, w, b)]
    y = ops.conv2d(xd, wd, bd, padding="same", activation="relu", stream=stream)
    assert cuda.is_cuda_array(y)
    stream.synchronize()
    check_forward(y.copy_to_host(), x, w, b, g, "relu")


@pytest.mark.gpu
def test_gpu_torch_or_cupy_arrays_in_and_out():
    try:
        import torch
        to_dev = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    except ImportError:
        try:
            import cupy
            to_dev = cupy.asarray
        except ImportError:
            pytest.skip("neither torch nor CuPy is importable: no foreign CUDA arrays to test with")
    g = conv_geometry((4, 10, 10, 3), (3, 3, 3, 5), 2, "same")
    x, w, b, dy = arrays(g, 4)
    y = ops.conv2d(to_dev(x), to_dev(w), to_dev(b), strides=2, padding="same")
    check_forward(cuda.as_cuda_array(y).copy_to_host(), x, w, b, g, "linear")
    dx = ops.conv2d_backward_data(to_dev(dy), to_dev(w), g.x_shape, 2, "same")
    np.testing.assert_allclose(cuda.as_cuda_array(dx).copy_to_host(),
                               ref.conv2d_backward_data(dy, w, g), **tol(9 * 5))

