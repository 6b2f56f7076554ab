"""The Numba dense kernels (dlconv.kernels.dense_cpu, dense_cuda and the NumbaBackend):
forward with fused bias + activation, softmax, backward with the derivative fused, and
activation backward, against the float64 reference and TensorFlow (tf.matmul and
tf.GradientTape) on generated shapes.  CUDA kernels run under the simulator without a GPU.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import activations as A
from dlconv import ops
from dlconv import reference as ref
from dlconv.backends import get
from dlconv.shapes import dense_geometry

try:
    import tensorflow as tf
except ImportError:  # the GPU check machine has no TensorFlow: there the reference alone judges
    tf = None

from dlconv.kernels import dense_cpu as dcpu  # noqa: E402
from dlconv.kernels import dense_cuda as dcuda  # noqa: E402
from numba import cuda  # noqa: E402

ACTS = ("linear", "relu", "sigmoid", "tanh", "softmax")


def tol(reduction: int) -> dict:
    return dict(rtol=1e-4, atol=1e-5 + 2e-6 * reduction)


def make(seed, batch, n_in, n_out, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32) if bias else None
    dy = rng.standard_normal((batch, n_out)).astype(np.float32)
    return x, w, b, dy


def tf_dense(x, w, b, act, dy):
    """TensorFlow's y = act(x @ w + b) and dL/dx, dL/dw, dL/db for upstream gradient dy."""
    xt, wt = tf.constant(x), tf.constant(w)
    bt = tf.constant(b if b is not None else np.zeros(w.shape[1], np.float32))
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        z = tf.matmul(xt, wt) + bt
        y = {"linear": lambda t: t, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
             "softmax": tf.nn.softmax}[act](z)
    grads = tape.gradient(y, [xt, wt, bt], output_gradients=tf.constant(dy))
    return y.numpy(), [g.numpy() for g in grads]


def ref_backward(x, w, dy, y, act):
    if act == "softmax":
        dz = ref.activation_backward(dy, y, "softmax")
        return ref.dense_backward(x, w, dz.astype(np.float32), y, "linear")
    return ref.dense_backward(x, w, dy, y, act)


def check(y, grads, x, w, b, dy, act):
    n_in, n_out = w.shape
    batch = x.shape[0]
    r = ref.dense_forward(x, w, b, act)
    np.testing.assert_allclose(y, r, **tol(n_in))
    ty, tgrads = tf_dense(x, w, b, act, dy) if tf is not None else (None, None)
    if ty is not None:
        np.testing.assert_allclose(y, ty, **tol(n_in))
    if grads is None:
        return
    reds = (n_out, batch, batch)
    for i, (got, want, red) in enumerate(zip(grads, ref_backward(x, w, dy, r, act), reds)):
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, **tol(red))
        if tgrads is not None:
            np.testing.assert_allclose(got, tgrads[i], **tol(red))


dense_shapes = st.tuples(st.integers(1, 9), st.integers(1, 40), st.integers(1, 40))


# ----------------------------------------------------------------------------- CPU
@settings(max_examples=60)
@given(shape=dense_shapes, act=st.sampled_from(ACTS), bias=st.booleans(), seed=st.integers(0, 999))
def test_cpu_dense_forward_backward_match_reference_and_tf(shape, act, bias, seed):
    x, w, b, dy = make(seed, *shape, bias)
    be = get("numba")
    y = be.dense_forward(x, w, b, dense_geometry(x.shape, w.shape), act, on_device=False)
    grads = be.dense_backward(x, w, dy, y, dense_geometry(x.shape, w.shape), act, on_device=False)
    check(y, grads, x, w, b, dy, act)
    # the public op gives the same numbers
    np.testing.assert_array_equal(ops.dense(x, w, b, act), y)


def test_cpu_softmax_is_stable_for_large_logits():
    z = np.array([[1000.0, 999.0, -1000.0], [-1e30, 0.0, 1e30], [3.0, 3.0, 3.0]], np.float32)
    y = dcpu.softmax(z)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y, ref.softmax(z.astype(np.float64)), atol=1e-7)


@pytest.mark.parametrize("act", ACTS[:4])
def test_cpu_activation_backward_elementwise_any_shape(act, rng):
    z = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    y = ref.activate(z.astype(np.float64), act).astype(np.float32)
    dy = rng.standard_normal(z.shape).astype(np.float32)
    got = dcpu.activation_backward(dy, y, A.code(act))
    np.testing.assert_allclose(got, ref.activation_backward(dy, y, act), rtol=1e-6, atol=1e-7)


def test_cpu_dense_mnist_head_matches_tf():
    # the MNIST model's head: flatten 5*5*64 = 1600 → 128 relu → 10 softmax, batch 128
    x, w, b, dy = make(0, 128, 1600, 128)
    x *= 0.1
    be = get("numba")
    h = be.dense_forward(x, w, b, dense_geometry(x.shape, w.shape), "relu", on_device=False)
    check(h, be.dense_backward(x, w, dy, h, dense_geometry(x.shape, w.shape), "relu", on_device=False),
          x, w, b, dy, "relu")


@pytest.mark.parametrize("batch,n_in,n_out", [
    (13, 130, 64),    # 2 full 64-column panels of dx + a 2-column one; 2 row blocks of 6 + 1 row
    (6, 6, 65),       # one 6-row block exactly; dw's second panel holds 1 column
    (5, 200, 129),    # no full row block; dw panels 64 + 64 + 1 (dz padded to 192)
    (7, 64, 128),     # exact panels
])
@pytest.mark.parametrize("act", ["linear", "relu"])
def test_cpu_dense_backward_register_tile_edges(batch, n_in, n_out, act):
    """The 6 x 64 register-tile kernels of dx and dw at ragged row blocks and panels."""
    x, w, b, dy = make(3, batch, n_in, n_out)
    be = get("numba")
    y = be.dense_forward(x, w, b, dense_geometry(x.shape, w.shape), act, on_device=False)
    check(y, be.dense_backward(x, w, dy, y, dense_geometry(x.shape, w.shape), act, on_device=False),
          x, w, b, dy, act)


def test_cpu_dense_deterministic():
    x, w, b, dy = make(5, 37, 23, 19)
    be = get("numba")
    runs = [be.dense_backward(x, w, dy, dcpu.forward(x, w, b, A.TANH), dense_geometry(x.shape, w.shape), "tanh",
                               on_device=False)
            for _ in range(2)]
    assert all(np.array_equal(a, c) for a, c in zip(*runs))


# ----------------------------------------------------------------------------- CUDA
def _dev(*arrs):
    return [None if a is None else cuda.to_device(a) for a in arrs]


@settings(max_examples=12)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(1, 20)),
       act=st.sampled_from(ACTS), bias=st.booleans(), seed=st.integers(0, 999))
def test_cuda_dense_forward_backward_match_reference_and_tf(shape, act, bias, seed):
    # sizes up to 20 cross the 16-wide tile edge (ragged second tile)
    x, w, b, dy = make(seed, *shape, bias)
    be = get("numba")
    xd, wd, bd, dyd = _dev(x, w, b, dy)
    yd = be.dense_forward(xd, wd, bd, dense_geometry(xd.shape, wd.shape), act, on_device=True)
    grads = be.dense_backward(xd, wd, dyd, yd, dense_geometry(xd.shape, wd.shape), act, on_device=True)
    check(yd.copy_to_host(), [g.copy_to_host() for g in grads], x, w, b, dy, act)


def _run_cuda(x, w, b, dy, act, splits):
    xd, wd, bd, dyd = _dev(x, w, b, dy)
    code = A.code(act)
    yd = dcuda.launch_forward(xd, wd, bd, code, splits=splits)
    grads = dcuda.launch_backward(xd, wd, dyd, yd, code, splits=splits)
    return yd.copy_to_host(), [g.copy_to_host() for g in grads]


@pytest.mark.parametrize("splits", [2, 3])
def test_cuda_dense_split_k_matches_reference_and_repeats_bitwise(splits):
    # reductions of 37 (forward), 5 (dx: fewer elements than splits x TILE) and 3 (dw);
    # ragged tiles everywhere
    x, w, b, dy = make(5, 3, 37, 5)
    y, grads = _run_cuda(x, w, b, dy, "tanh", splits)
    check(y, grads, x, w, b, dy, "tanh")
    y2, grads2 = _run_cuda(x, w, b, dy, "tanh", splits)
    assert np.array_equal(y, y2) and all(np.array_equal(g, h) for g, h in zip(grads, grads2))
    assert dcuda._plan(3, 5, 37, splits)[0] == splits      # really split: 37 > 2 x 16


def test_cuda_dense_split_k_heuristic():
    split = dcuda.split_k_splits
    assert split(128, 128, 9216, 132) == 5       # MNIST dense1 forward: 64 tiles → 320 blocks
    assert split(128, 9216, 128, 132) == 1       # dx: 4608 tiles already
    assert split(128, 10, 128, 132) == 1         # dense2: reduction too short
    assert split(16, 16, 1 << 20, 132) == 64     # at most 64 partials per element
    assert split(1024, 1024, 1 << 20, 10 ** 5) == 16   # the 16 Mi-float workspace cap
    assert split(0, 10, 1 << 20, 132) == 1       # empty outputs: no tiles, nothing to split
    assert split(10, 0, 1 << 20, 132) == 1


def test_cuda_dense_row_tiles_beyond_the_grid_limit(monkeypatch):
    # grid.y is capped (65535 on a GPU): a block then walks several row tiles.  With the cap
    # at 1, 40 rows (3 tiles) and 40 inputs (dw's 3 row tiles) need the grid-stride loop.
    monkeypatch.setattr(dcuda, "MAX_GRID_Y", 1)
    assert dcuda._plan(40, 3, 2, 1)[2][1] == 1
    x, w, b, dy = make(6, 40, 40, 3)
    for splits in (1, 2):
        y, grads = _run_cuda(x, w, b, dy, "relu", splits)
        check(y, grads, x, w, b, dy, "relu")


def test_cuda_workspace_is_reused_per_stream(monkeypatch):
    from dlconv.kernels import conv2d_backward_cuda as cbw
    from dlconv.kernels import cuda_common as cc
    from dlconv.shapes import conv_geometry

    monkeypatch.setattr(cc, "_WORKSPACES", type(cc._WORKSPACES)())
    allocs = []
    real = cuda.device_array

    def counting(*args, **kwargs):
        allocs.append(args[0] if args else kwargs.get("shape"))
        return real(*args, **kwargs)

    g = conv_geometry((2, 5, 4, 2), (2, 3, 2, 3), 1, ((1, 0), (2, 1)))
    monkeypatch.setattr(cbw, "PIXELS_PER_SPLIT", 7)          # several partial chunks
    rng = np.random.default_rng(3)
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    dy = rng.standard_normal(g.y_shape).astype(np.float32)
    xd, dyd = cuda.to_device(x), cuda.to_device(dy)
    monkeypatch.setattr(cuda, "device_array", counting)
    first = [a.copy_to_host() for a in cbw.launch_backward_filter(xd, dyd, g)]
    n_first = len(allocs)
    second = [a.copy_to_host() for a in cbw.launch_backward_filter(xd, dyd, g)]
    assert len(allocs) - n_first == 2, f"the second call allocated {allocs[n_first:]}, not just dw and db"
    assert n_first == 3                                       # dw, db and the workspace once
    assert all(np.array_equal(p, q) for p, q in zip(first, second))
    rdw, rdb = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(first[0], rdw, **tol(g.gemm_m))
    np.testing.assert_allclose(first[1], rdb, **tol(g.gemm_m))
    # another stream gets its own buffer; the same stream keeps its one
    s1, s2 = cuda.stream(), cuda.stream()
    n_before = len(allocs)
    cc.workspace(10, s1)
    cc.workspace(5, s1)
    assert len(allocs) - n_before == 1
    cc.workspace(10, s2)
    assert len(allocs) - n_before == 2 and len(cc._WORKSPACES) == 3


def test_cuda_softmax_rows_longer_than_a_warp():
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((2, 45)) * 30).astype(np.float32)
    y = dcuda.launch_softmax(cuda.to_device(z)).copy_to_host()
    np.testing.assert_allclose(y, ref.softmax(z.astype(np.float64)), rtol=1e-5, atol=1e-7)
    dy = rng.standard_normal(z.shape).astype(np.float32)
    dz = dcuda.launch_softmax_backward(*_dev(dy, y)).copy_to_host()
    np.testing.assert_allclose(dz, ref.activation_backward(dy, y, "softmax"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_cuda_activation_backward(act, rng):
    shape = (3, 4) if act == "softmax" else (2, 2, 3, 2)
    z = rng.standard_normal(shape).astype(np.float32)
    y = ref.activate(z.astype(np.float64), act).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    got = get("numba").activation_backward(*_dev(dy, y), act, on_device=True).copy_to_host()
    np.testing.assert_allclose(got, ref.activation_backward(dy, y, act), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- real GPU
@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_dense_mnist_sizes(act):
    x, w, b, dy = make(1, 128, 1600, 128)
    be = get("numba")
    xd, wd, bd, dyd = _dev(x, w, b, dy)
    yd = be.dense_forward(xd, wd, bd, dense_geometry(xd.shape, wd.shape), act, on_device=True)
    grads = be.dense_backward(xd, wd, dyd, yd, dense_geometry(xd.shape, wd.shape), act, on_device=True)
    check(yd.copy_to_host(), [g.copy_to_host() for g in grads], x, w, b, dy, act)


@pytest.mark.gpu
def test_gpu_dense_through_ops_on_a_stream():
    x, w, b, dy = make(2, 64, 100, 10)
    stream = cuda.stream()
    xd, wd, bd = [cuda.to_device(a, stream=stream) for a in (x, w, b)]
    y = ops.dense(xd, wd, bd, "softmax", stream=stream)
    assert cuda.is_cuda_array(y)
    stream.synchronize()
    np.testing.assert_allclose(y.copy_to_host(), ref.dense_forward(x, w, b, "softmax"), **tol(100))
