"""The Numba CPU backward passes for strided and few-filter layers: the sub-pixel
backward-data (dlconv.kernels.conv2d_subpixel_cpu, both of its paths) and the channel-blocked
backward-filter tile (conv2d_cpu.backward_filter_tiled), against the float64 NumPy reference
and TensorFlow's gradients of tf.nn.conv2d, on generated geometries: stride 1-3 in each axis
separately, asymmetric explicit padding, dilation, ragged sizes, C and F of 1, 3, 16, 17 (and
40 / 64 for the wide paths), relu fused through dlconv.ops.  TensorFlow's CPU gradients refuse
dilation > 1: those cases are checked against the reference only (tf_grads_ok)."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import ops
from dlconv import reference as ref
from dlconv.kernels import conv2d_cpu as ccpu
from dlconv.kernels import conv2d_subpixel_cpu as sub
from dlconv.shapes import conv_geometry, transposed_phases
from test_conv_numba import _tf_conv, arrays, tf, tf_grads, tf_grads_ok, tol

#: Channel / filter counts: 1 and 3 (the narrow path, a ragged 16-lane panel), 16 (one whole
#: vector), 17 (one past it), 40 (dx through the 64-filter forward tile) and 64 (whole panels).
CHANNELS = (1, 3, 16, 17, 40)
FILTERS = (1, 3, 16, 17, 64)


@st.composite
def geometries(draw, max_hw=11):
    """A valid convolution with independently drawn strides, dilations and four pads."""
    batch = draw(st.sampled_from([1, 2]))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    c, k = draw(st.sampled_from(CHANNELS)), draw(st.sampled_from(FILTERS))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["explicit", "explicit", "same", "valid"]))
    pad = (((draw(st.integers(0, 3)), draw(st.integers(0, 3))),
            (draw(st.integers(0, 3)), draw(st.integers(0, 3)))) if kind == "explicit" else kind)
    while True:   # shrink the kernel into the padded input instead of rejecting the example
        try:
            return conv_geometry((batch, h, w, c), (kh, kw, c, k), strides, pad, dil)
        except ValueError:
            if kh > 1:
                kh -= 1
            elif kw > 1:
                kw -= 1
            else:
                dil = (1, 1)


def _check_dx(dx, dy, w, g, x):
    assert dx.shape == g.x_shape and dx.dtype == np.float32
    t = tol(g.k_h * g.k_w * g.filters)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dy, w, g), **t)
    if tf_grads_ok(g):
        np.testing.assert_allclose(dx, tf_grads(x, w, g, dy)[0], **t)


@settings(max_examples=60)
@given(g=geometries(), seed=st.integers(0, 2**16))
def test_subpixel_backward_data_matches_reference_and_tf(g, seed):
    x, w, _, dy = arrays(g, seed)
    _check_dx(sub.backward_data(dy, w, g), dy, w, g, x)       # the sub-pixel kernel, any stride
    _check_dx(ccpu.backward_data(dy, w, g), dy, w, g, x)      # and the route (gemm or sub-pixel)


@settings(max_examples=60)
@given(g=geometries(), seed=st.integers(0, 2**16))
def test_backward_filter_tile_and_route_match_reference_and_tf(g, seed):
    x, w, _, dy = arrays(g, seed)
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    t = tol(g.gemm_m)
    tiled = ccpu.backward_filter_tiled(x, dy, g, ccpu._bwf_tile_shape(g, always=True))
    dw, db = ccpu.backward_filter(x, dy, g)
    runs = [tiled, (dw, db)]
    segments = ccpu._bwf_segment_shape(g, always=True)
    assert (segments is None) == (g.dil_w != 1)
    if segments is not None:     # the row-segment tile (dil_w == 1: a kh's rows are contiguous)
        runs.append(ccpu.backward_filter_segments(x, dy, g, segments))
    for got_w, got_b in runs:
        assert got_w.shape == g.w_shape and got_w.dtype == np.float32
        assert got_b.shape == (g.filters,) and got_b.dtype == np.float32
        np.testing.assert_allclose(got_w, rdw, **t)
        np.testing.assert_allclose(got_b, rdb, **t)
    if tf_grads_ok(g):
        _, tdw, tdb = tf_grads(x, w, g, dy)
        np.testing.assert_allclose(dw, tdw, **t)
        np.testing.assert_allclose(db, tdb, **t)


def check_backward_filter(run, x, w, dy, g, got):
    """``got`` = (dw, db) against the reference and TensorFlow, and ``run()`` on one Numba
    thread gives the same bits (the tiles' results do not depend on the thread count)."""
    dw, db = got
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(dw, rdw, **tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, **tol(g.gemm_m))
    if tf_grads_ok(g):
        _, tdw, tdb = tf_grads(x, w, g, dy)
        np.testing.assert_allclose(dw, tdw, **tol(g.gemm_m))
        np.testing.assert_allclose(db, tdb, **tol(g.gemm_m))
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = run()
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(dw, one[0]) and np.array_equal(db, one[1])


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((2, 32, 32, 1), (7, 7, 1, 16), 2, "same", 1),       # the ResNet's stem: 8-row segments
    ((2, 13, 40, 1), (5, 7, 1, 5), (2, 3), ((0, 4), (3, 1)), (2, 1)),  # ragged K, dil_h 2
    ((1, 9, 600, 2), (3, 3, 2, 40), 1, "same", 1),       # 6-float segments, one-row chunks
    ((3, 28, 28, 1), (3, 3, 1, 32), 1, "valid", 1),      # the MNIST conv1: 4-row segments
])
def test_backward_filter_segments_on_few_channels(x_shape, w_shape, strides, padding, dilation):
    """Few input channels: the row-segment tile is the route (the channel-blocked tile would
    pad too many channels); against the reference and TensorFlow, thread-count independent."""
    g = conv_geometry(x_shape, w_shape, strides, padding, dilation)
    assert ccpu._bwf_tile_shape(g) is None and ccpu._bwf_segment_shape(g) is not None
    x, w, _, dy = arrays(g, 17)
    dw, db = ccpu.backward_filter(x, dy, g)
    check_backward_filter(lambda: ccpu.backward_filter(x, dy, g), x, w, dy, g, (dw, db))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((2, 1, 1, 16), (4, 3, 16, 16), 1, ((3, 0), (2, 0)), 1),   # taps wholly in the padding
    ((2, 5, 6, 16), (5, 5, 16, 16), 1, ((3, 3), (4, 3)), 1),   # taps partly in it
    ((1, 3, 520, 8), (3, 3, 8, 32), 1, "same", 1),            # 520-wide rows: one row per chunk
    ((66, 1, 520, 8), (1, 3, 8, 64), 1, "same", 1),           # 66 one-row chunks: BWF_CHUNKS cap
    ((2, 11, 13, 17), (3, 3, 17, 20), (2, 3), ((0, 2), (2, 1)), (2, 1)),  # ragged C and K
])
def test_backward_filter_tile_clips_taps_and_chunks_rows(x_shape, w_shape, strides, padding,
                                                         dilation):
    """The channel-blocked tile reads x in place: each tap's padding rows and columns are
    skipped (some taps have none inside), chunks are whole output rows; against the
    reference and TensorFlow, and the same bits on 1 thread as on all."""
    g = conv_geometry(x_shape, w_shape, strides, padding, dilation)
    x, w, _, dy = arrays(g, 13)
    shape = ccpu._bwf_tile_shape(g, always=True)
    dw, db = ccpu.backward_filter_tiled(x, dy, g, shape)
    check_backward_filter(lambda: ccpu.backward_filter_tiled(x, dy, g, shape), x, w, dy, g, (dw, db))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((2, 33, 37, 1), (7, 7, 1, 16), 2, "same"),            # stem: 17x19 phases, 2 lane vectors
    ((1, 40, 21, 3), (5, 4, 3, 17), (2, 3), ((3, 1), (0, 2))),   # 3 channels, ragged F
    ((2, 17, 19, 16), (3, 3, 16, 32), 2, "same"),          # block entry: the 16-channel tile
    ((1, 15, 18, 17), (3, 3, 17, 64), (3, 2), ((2, 0), (1, 3))),  # 17 channels: 32-wide panel
    ((2, 16, 16, 40), (1, 1, 40, 33), 2, "valid"),         # 1x1 stride 2: 3 phases all zero
])
def test_strided_backward_layers_match_tf(x_shape, w_shape, strides, padding):
    """Shapes beyond the generated ones: narrow tiles of several row blocks and lane vectors,
    the forward kernels' full 8-pixel blocks, zero-filled phases; both backward passes."""
    g = conv_geometry(x_shape, w_shape, strides, padding)
    x, w, _, dy = arrays(g, 3)
    _check_dx(ccpu.backward_data(dy, w, g), dy, w, g, x)
    dw, db = ccpu.backward_filter(x, dy, g)
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(dw, rdw, **tol(g.gemm_m))
    if tf is not None:
        _, tdw, tdb = tf_grads(x, w, g, dy)
        np.testing.assert_allclose(dw, tdw, **tol(g.gemm_m))
        np.testing.assert_allclose(db, tdb, **tol(g.gemm_m))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,dilation", [
    ((3, 32, 32, 16), (3, 3, 16, 32), 2, "same", 1),        # the 16-channel tile, full rows
    ((2, 21, 23, 12), (3, 4, 12, 20), (2, 3), "same", 1),  # 12 channels: scalar stores
    ((2, 19, 30, 9), (3, 3, 9, 24), 2, ((2, 1), (0, 3)), 2),  # dilation 2: two phases zero
    ((2, 9, 13, 16), (5, 5, 16, 8), 3, "valid", 1),         # rows of 3-5 pixels: ragged loop
    ((2, 16, 16, 10), (1, 1, 10, 7), 2, "valid", 1),        # 1x1 stride 2: 3 phases all zero
])
def test_wide16_kernel_matches_reference(x_shape, w_shape, strides, padding, dilation):
    """NARROW_MAX_C < C <= 16 at stride > 1: every phase in one launch of the 16-channel
    kernel, stored straight into dx; the same bits on 1 thread as on all."""
    g = conv_geometry(x_shape, w_shape, strides, padding, dilation)
    assert sub.NARROW_MAX_C < g.in_c <= 16
    x, w, _, dy = arrays(g, 5)
    dx = sub.backward_data(dy, w, g)
    t = tol(g.k_h * g.k_w * g.filters)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dy, w, g), **t)
    np.testing.assert_allclose(dx, ccpu.backward_data_gather(dy, w, g), **t)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        one = sub.backward_data(dy, w, g)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(dx, one)


def test_zero_phases_and_no_pixel_phases():
    # 1x1 stride 3 on 2 rows: phases (0, *) hold the only taps, phase rows 1.. have no tap
    # (zero-filled), and with in_h = 2 < stride the third phase row has no dx pixel at all
    g = conv_geometry((2, 2, 7, 3), (1, 1, 3, 5), 3, "valid")
    kinds = {(t.phase_h, t.phase_w): (t.empty, t.out_h) for t in transposed_phases(g)}
    assert kinds[(0, 0)] == (False, 1) and kinds[(1, 1)] == (True, 1) and kinds[(2, 0)][1] == 0
    x, w, _, dy = arrays(g, 1)
    dx = ccpu.backward_data(dy, w, g)
    _check_dx(dx, dy, w, g, x)
    assert not dx[:, 1].any() and not dx[:, :, 1::3].any()


@pytest.mark.parametrize("c", [1, 16, 40])
def test_relu_fused_backward_through_ops_matches_tf(c):
    """activation='relu' with y: ops applies relu'(y) before the Numba kernels (this backend
    does not fuse it); stride 2 so both passes take the new kernels."""
    g = conv_geometry((2, 13, 11, c), (3, 3, c, 16), 2, "same")
    x, w, b, dy = arrays(g, c)
    y = ref.conv2d_forward(x, w, b, g, "relu").astype(np.float32)
    dz = dy * (y > 0)
    args = (g.stride_h, "same", 1)
    dx = ops.conv2d_backward_data(dy, w, g.x_shape, *args, backend="numba", y=y, activation="relu")
    dw, db = ops.conv2d_backward_filter(x, dy, g.w_shape, *args, backend="numba", y=y,
                                        activation="relu")
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w, g), **tol(9 * 16))
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, **tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, **tol(g.gemm_m))
    if tf is not None:
        xt, wt, bt = tf.constant(x), tf.constant(w), tf.constant(b)
        with tf.GradientTape() as tape:
            tape.watch([xt, wt, bt])
            out = tf.nn.relu(_tf_conv(xt, wt, g) + bt)
        tdx, tdw, tdb = tape.gradient(out, [xt, wt, bt], output_gradients=tf.constant(dy))
        np.testing.assert_allclose(dx, tdx.numpy(), **tol(9 * 16))
        np.testing.assert_allclose(dw, tdw.numpy(), **tol(g.gemm_m))
        np.testing.assert_allclose(db, tdb.numpy(), **tol(g.gemm_m))


@pytest.mark.parametrize("c", [3, 16])
def test_new_backward_kernels_do_not_depend_on_thread_count(c):
    g = conv_geometry((3, 19, 17, c), (3, 3, c, 32), 2, ((1, 0), (2, 1)))
    x, w, _, dy = arrays(g, 9)
    threads = numba.get_num_threads()
    runs = []
    for n in sorted({1, threads}):
        numba.set_num_threads(n)
        try:
            runs.append((ccpu.backward_data(dy, w, g), *ccpu.backward_filter(x, dy, g)))
        finally:
            numba.set_num_threads(threads)
    for a, b in zip(runs[0], runs[-1]):
        assert np.array_equal(a, b)


def test_subpixel_rejects_groups():
    g = conv_geometry((1, 6, 6, 4), (3, 3, 2, 4), 2, "same", groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        sub.backward_data(np.zeros(g.y_shape, np.float32), np.zeros(g.w_shape, np.float32), g)
