"""Validation in dlconv.ops, through the numba and reference backends: bad input is refused
with TypeError/ValueError naming the parameter and the values before any kernel runs, and
an empty batch gives an empty result of the right shape."""

import numpy as np
import pytest

from dlconv import ops
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

BACKENDS = ("numba", "reference")


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class FakeCudaArray:
    """Looks like a CUDA array to dlconv.arrays (has __cuda_array_interface__); the mixed
    host/device check must refuse it before anything touches its memory."""

    shape = (1, 4, 4, 1)
    dtype = np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# ----------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_conv2d_rejects_non_float32(backend, dtype):
    x = np.zeros((1, 4, 4, 2), dtype)
    with pytest.raises(TypeError, match=rf"x must be float32, got {np.dtype(dtype)}"):
        ops.conv2d(x, f32(3, 3, 2, 2), backend=backend)
    with pytest.raises(TypeError, match=r"^w must be float32"):
        ops.conv2d(f32(1, 4, 4, 2), np.zeros((3, 3, 2, 2), dtype), backend=backend)
    with pytest.raises(TypeError, match=r"^b must be float32"):
        ops.conv2d(f32(1, 4, 4, 2), f32(3, 3, 2, 2), np.zeros(2, dtype), backend=backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64])
def test_dense_and_backward_reject_non_float32(backend, dtype):
    with pytest.raises(TypeError, match=r"^x must be float32"):
        ops.dense(np.zeros((2, 3), dtype), f32(3, 4), backend=backend)
    with pytest.raises(TypeError, match=r"^dy must be float32"):
        ops.dense_backward(f32(2, 3), f32(3, 4), np.zeros((2, 4), dtype), backend=backend)
    with pytest.raises(TypeError, match=r"^dy must be float32"):
        ops.conv2d_backward_data(np.zeros((1, 2, 2, 2), dtype), f32(3, 3, 1, 2), (1, 4, 4, 1),
                                 backend=backend)


def test_rejects_non_array(backend):
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        ops.conv2d(object(), f32(3, 3, 1, 1), backend=backend)


# ----------------------------------------------------------------------------- layout and rank
def test_strided_views_are_copied_once_and_computed(backend):
    """The workshop writes each neuron's weights as a row and transposes: dense(x, W.T)."""
    x = f32(1, 6, 8, 2)[:, :, ::2, :]
    w = f32(3, 3, 2, 2)
    np.testing.assert_allclose(ops.conv2d(x, w, backend=backend),
                               ref.conv2d_forward(np.ascontiguousarray(x), w, None,
                                                  conv_geometry(x.shape, w.shape)), rtol=1e-5, atol=1e-6)
    W = f32(3, 4)                    # 3 neurons, 4 inputs each
    xd = f32(2, 4)
    np.testing.assert_allclose(ops.dense(xd, W.T, backend=backend), xd @ W.T, rtol=1e-5, atol=1e-6)


def test_contiguous_and_read_only_inputs_are_not_copied():
    from dlconv.arrays import host_array

    a = f32(2, 3)
    assert host_array(a, "a") is a
    a.flags.writeable = False
    assert host_array(a, "a") is a
    t = host_array(a.T, "a")
    assert t.flags.c_contiguous and not np.shares_memory(t, a)
    np.testing.assert_array_equal(t, a.T)


def test_rejects_wrong_rank(backend):
    with pytest.raises(ValueError, match=r"x must have rank 4, got shape \(4, 4, 1\)"):
        ops.conv2d(f32(4, 4, 1), f32(3, 3, 1, 1), backend=backend)
    with pytest.raises(ValueError, match=r"w must have rank 4"):
        ops.conv2d(f32(1, 4, 4, 1), f32(3, 3, 1), backend=backend)
    with pytest.raises(ValueError, match=r"b must have rank 1"):
        ops.conv2d(f32(1, 4, 4, 1), f32(3, 3, 1, 2), f32(2, 1), backend=backend)
    with pytest.raises(ValueError, match=r"x must have rank 2"):
        ops.dense(f32(2, 3, 1), f32(3, 4), backend=backend)
    with pytest.raises(ValueError, match=r"z must have rank 2"):
        ops.softmax(f32(5), backend=backend)


# ----------------------------------------------------------------------------- shapes
def test_channel_mismatch_names_both_shapes(backend):
    with pytest.raises(ValueError, match=r"channel mismatch: x has 3 channels.*w expects 2"):
        ops.conv2d(f32(1, 5, 5, 3), f32(3, 3, 2, 4), backend=backend)
    with pytest.raises(ValueError, match=r"feature mismatch: x has 3 features.*w expects 5"):
        ops.dense(f32(2, 3), f32(5, 4), backend=backend)


def test_bias_length(backend):
    with pytest.raises(ValueError, match=r"b has shape \(3,\), expected \(4,\)"):
        ops.conv2d(f32(1, 5, 5, 2), f32(3, 3, 2, 4), f32(3), backend=backend)
    with pytest.raises(ValueError, match=r"b has shape \(5,\), expected \(4,\)"):
        ops.dense(f32(2, 3), f32(3, 4), f32(5), backend=backend)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(), r"kernel_size \(height\)=5 is larger than the padded input \(height\): 3 \+ 0 \+ 0 = 3"),
    (dict(dilation=3, padding=1), r"with dilation 3 \(effective size 13\)"),
    (dict(strides=0), r"stride.*>= 1, got 0"),
    (dict(padding=-1), r"padding.*>= 0, got -1"),
    (dict(padding="full"), r"padding must be 'valid', 'same'.*'full'"),
])
def test_impossible_geometry(backend, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ops.conv2d(f32(1, 3, 9, 1), f32(5, 5, 1, 1), backend=backend, **kwargs)


def test_backward_shapes_checked(backend):
    with pytest.raises(ValueError, match=r"dy has shape \(1, 2, 2, 2\), expected \(1, 3, 3, 2\)"):
        ops.conv2d_backward_data(f32(1, 2, 2, 2), f32(3, 3, 1, 2), (1, 5, 5, 1), backend=backend)
    with pytest.raises(ValueError, match=r"dy has shape"):
        ops.conv2d_backward_filter(f32(1, 5, 5, 1), f32(1, 2, 2, 2), (3, 3, 1, 2), backend=backend)
    with pytest.raises(ValueError, match=r"needs y \(the forward output\) for activation 'relu'"):
        ops.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), None, "relu", backend=backend)
    with pytest.raises(ValueError, match=r"y has shape \(2, 3\), expected \(2, 4\)"):
        ops.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), f32(2, 3), "tanh", backend=backend)


def test_activation_and_variant_names(backend):
    with pytest.raises(ValueError, match=r"activation must be None or one of .*'swish'"):
        ops.conv2d(f32(1, 4, 4, 1), f32(3, 3, 1, 1), activation="swish", backend=backend)
    with pytest.raises(ValueError, match=r"activation must be None or one of .*'softmax'"):
        ops.conv2d(f32(1, 4, 4, 1), f32(3, 3, 1, 1), activation="softmax", backend=backend)
    with pytest.raises(ValueError, match=r"variant must be one of .*'nope'"):
        ops.conv2d(f32(1, 4, 4, 1), f32(3, 3, 1, 1), variant="nope", backend=backend)


def test_geometry_argument_must_match(backend):
    g = conv_geometry((1, 6, 6, 2), (3, 3, 2, 3), 1, "same")
    with pytest.raises(ValueError, match=r"x has shape \(1, 5, 6, 2\) but geometry expects \(1, 6, 6, 2\)"):
        ops.conv2d(f32(1, 5, 6, 2), f32(3, 3, 2, 3), geometry=g, backend=backend)
    with pytest.raises(TypeError, match="geometry must be a dlconv.shapes.ConvGeometry"):
        ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 3), geometry=(1, 6), backend=backend)
    x, w = f32(1, 6, 6, 2), f32(3, 3, 2, 3)
    np.testing.assert_array_equal(ops.conv2d(x, w, geometry=g, backend=backend),
                                  ops.conv2d(x, w, padding="same", backend=backend))


def test_mixed_host_and_device(backend):
    with pytest.raises(ValueError, match=r"must all be on the host or all on a CUDA device: x on the device, w on the host"):
        ops.conv2d(FakeCudaArray(), f32(3, 3, 1, 1), backend=backend)
    with pytest.raises(ValueError, match=r"w, b on the host"):
        ops.conv2d(FakeCudaArray(), f32(3, 3, 1, 1), f32(1), backend=backend)


# ----------------------------------------------------------------------------- empty batch
def test_empty_batch_gives_empty_results(backend):
    x, w, b = np.zeros((0, 7, 6, 3), np.float32), f32(3, 2, 3, 5), f32(5)
    y = ops.conv2d(x, w, b, strides=2, padding="same", activation="relu", backend=backend)
    assert y.shape == (0, 4, 3, 5) and y.dtype == np.float32
    dx = ops.conv2d_backward_data(np.zeros((0, 4, 3, 5), np.float32), w, (0, 7, 6, 3), 2, "same",
                                  backend=backend)
    assert dx.shape == (0, 7, 6, 3)
    dw, db = ops.conv2d_backward_filter(x, np.zeros((0, 4, 3, 5), np.float32), w.shape, 2, "same",
                                        backend=backend)
    assert dw.shape == w.shape and db.shape == (5,) and not dw.any() and not db.any()
    z = ops.dense(np.zeros((0, 4), np.float32), f32(4, 3), f32(3), "softmax", backend=backend)
    assert z.shape == (0, 3)
    gx, gw, gb = ops.dense_backward(np.zeros((0, 4), np.float32), f32(4, 3),
                                    np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32),
                                    "sigmoid", backend=backend)
    assert gx.shape == (0, 4) and gw.shape == (4, 3) and gb.shape == (3,) and not gw.any()
    assert ops.softmax(np.zeros((0, 10), np.float32), backend=backend).shape == (0, 10)


# ----------------------------------------------------------------------------- valid input works
def test_valid_calls_agree_between_backends():
    x, w, b = f32(2, 6, 5, 3, seed=1), f32(3, 3, 3, 4, seed=2), f32(4, seed=3)
    kw = dict(strides=(2, 1), padding=((1, 0), (2, 1)), dilation=1, activation="tanh")
    g = conv_geometry(x.shape, w.shape, (2, 1), ((1, 0), (2, 1)))
    np.testing.assert_allclose(ops.conv2d(x, w, b, backend="numba", **kw),
                               ops.conv2d(x, w, b, backend="reference", **kw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.conv2d(x, w, b, backend="numba", **kw),
                               ref.conv2d_forward(x, w, b, g, "tanh"), rtol=1e-5, atol=1e-5)
    dy = f32(*g.y_shape, seed=4)
    for name in ("conv2d_backward_data",):
        a = getattr(ops, name)(dy, w, x.shape, (2, 1), ((1, 0), (2, 1)), backend="numba")
        r = getattr(ops, name)(dy, w, x.shape, (2, 1), ((1, 0), (2, 1)), backend="reference")
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    dw, db = ops.conv2d_backward_filter(x, dy, w.shape, (2, 1), ((1, 0), (2, 1)), backend="numba")
    rdw, rdb = ops.conv2d_backward_filter(x, dy, w.shape, (2, 1), ((1, 0), (2, 1)), backend="reference")
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-5)


def test_empty_host_is_aligned_contiguous_and_writable():
    from dlconv.arrays import HOST_ALIGN, empty_host

    for shape in [(128, 24, 24, 64), (3, 5), (7,), (0, 4)]:
        a = empty_host(shape)
        assert a.shape == shape and a.dtype == np.float32
        assert a.size == 0 or a.ctypes.data % HOST_ALIGN == 0
        assert a.flags.c_contiguous and a.flags.writeable


@pytest.mark.parametrize("backend", ["numba", "cpp"])
def test_host_calls_from_many_threads_are_correct(backend):
    """TensorFlow calls the ops from several threads at once; host kernels are serialised
    (each already uses every core) and every caller gets its own correct result."""
    import concurrent.futures as cf

    from dlconv import backends, ops, reference as ref
    from dlconv.shapes import conv_geometry

    ok, why = backends.get(backend).cpu_status()
    if not ok:
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    cases = []
    for i in range(6):
        r = np.random.default_rng(40 + i)
        g = conv_geometry((1 + i % 3, 7 + i, 6 + i, 2 + i), (3, 2, 2 + i, 3 + i), 1 + i % 2, "same", 1)
        cases.append((g, r.standard_normal(g.x_shape, dtype=np.float32),
                      r.standard_normal(g.w_shape, dtype=np.float32)))

    def work(case):
        g, x, w = case
        return [ops.conv2d(x, w, strides=(g.stride_h, g.stride_w), padding="same", backend=backend)
                for _ in range(4)]

    with cf.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(work, cases))
    for (g, x, w), ys in zip(cases, results):
        for y in ys:
            np.testing.assert_allclose(y, ref.conv2d_forward(x, w, None, g), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- activation in the backward passes
from conftest import cpu_backend_params  # noqa: E402


@pytest.mark.parametrize("be", cpu_backend_params())
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "linear"])
@pytest.mark.parametrize("xs,ws,strides,padding,dilation", [
    ((2, 9, 11, 16), (3, 3, 16, 24), 1, "valid", 1),            # cpp: Winograd, derivative fused
    ((3, 8, 7, 1), (3, 3, 1, 8), 1, "same", 1),                  # cpp: direct backward-filter, fused
    ((2, 10, 9, 5), (3, 2, 5, 7), 2, ((1, 0), (2, 1)), 1),       # cpp: dz formed first (stride 2)
    ((1, 12, 12, 4), (3, 3, 4, 6), 1, "same", 2),                # dilation 2
])
def test_backward_passes_take_dy_and_the_activation_output(be, act, xs, ws, strides, padding, dilation):
    """conv2d_backward_data / _filter with ``y=`` and ``activation=`` equal the passes given
    dz = act'(y) · dy, on every backend (fused inside the kernels or formed first)."""
    g = conv_geometry(xs, ws, strides, padding, dilation)
    x, w = f32(*g.x_shape, seed=1), f32(*g.w_shape, seed=2)
    dy = f32(*g.y_shape, seed=3)
    y = ref.activate(f32(*g.y_shape, seed=4), act).astype(np.float32)
    dz = ref.activation_backward(dy, y, act).astype(np.float32)
    geo = dict(strides=strides, padding=padding, dilation=dilation, backend=be)
    dx = ops.conv2d_backward_data(dy, w, g.x_shape, y=y, activation=act, **geo)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w, g), rtol=1e-4, atol=1e-4)
    dw, db = ops.conv2d_backward_filter(x, dy, g.w_shape, y=y, activation=act, **geo)
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-3)


def test_backward_activation_arguments_are_checked(backend):
    g = conv_geometry((1, 5, 5, 2), (3, 3, 2, 3))
    x, w, dy = f32(*g.x_shape), f32(*g.w_shape), f32(*g.y_shape)
    with pytest.raises(ValueError, match=r"y \(the activation's output\) is needed for activation 'relu'"):
        ops.conv2d_backward_data(dy, w, g.x_shape, activation="relu", backend=backend)
    with pytest.raises(ValueError, match=r"y has shape \(1, 3, 3, 2\), expected \(1, 3, 3, 3\)"):
        ops.conv2d_backward_filter(x, dy, g.w_shape, y=f32(1, 3, 3, 2), activation="tanh", backend=backend)
    with pytest.raises(TypeError, match="y must be float32, got float64"):
        ops.conv2d_backward_data(dy, w, g.x_shape, y=np.zeros(g.y_shape), activation="relu", backend=backend)
    with pytest.raises(ValueError, match="softmax"):
        ops.conv2d_backward_filter(x, dy, g.w_shape, y=f32(*g.y_shape), activation="softmax", backend=backend)
    # linear needs no y, and an empty batch gives empty gradients with y given too
    np.testing.assert_allclose(ops.conv2d_backward_data(dy, w, g.x_shape, activation="linear", backend=backend),
                               ref.conv2d_backward_data(dy, w, g), rtol=1e-5, atol=1e-5)
    e = conv_geometry((0, 5, 5, 2), (3, 3, 2, 3))
    dx = ops.conv2d_backward_data(np.zeros(e.y_shape, np.float32), w, e.x_shape, y=np.zeros(e.y_shape, np.float32),
                                  activation="relu", backend=backend)
    assert dx.shape == e.x_shape


# ----------------------------------------------------------------------------- host output pool
def test_host_pool_reuses_a_buffer_only_when_no_view_is_alive():
    from dlconv.arrays import HostPool

    pool = HostPool(limit_bytes=10 << 20)
    a = pool.take(1 << 20)
    b = pool.take(1 << 20)
    assert a is not None and b is not None and a is not b          # a is still referenced here
    view = a[10:20]
    del a
    c = pool.take(1 << 20)
    assert c is not view.base and c is not b                        # a's buffer lives on in view
    del view, c
    d = pool.take(1 << 20)
    assert d is not b                                               # a's (or c's) buffer came back
    assert pool.held_bytes == 3 * ((1 << 20) + 64)
    assert pool.take(8 << 20) is None                               # past the limit: caller allocates
    pool.clear()
    assert pool.held_bytes == 0


def test_empty_host_recycles_large_outputs_and_never_hands_out_a_live_one():
    from dlconv import arrays

    shape = (64, 32, 32)                   # 256 KiB: pooled
    first = arrays.empty_host(shape)
    first[...] = 7.0
    second = arrays.empty_host(shape)
    assert not np.shares_memory(first, second)
    second[...] = 3.0
    assert (first == 7.0).all()
    addr = first.ctypes.data
    del first
    third = arrays.empty_host(shape)
    assert third.ctypes.data % arrays.HOST_ALIGN == 0
    assert third.ctypes.data == addr       # the released buffer, pages already mapped
    assert (second == 3.0).all()


def test_host_pool_size_from_the_environment(monkeypatch):
    from dlconv import arrays

    monkeypatch.setenv("DLCONV_HOST_POOL_MB", "0")
    assert arrays._pool_limit() == 0
    assert arrays.HostPool(arrays._pool_limit()).take(1 << 20) is None
    monkeypatch.setenv("DLCONV_HOST_POOL_MB", "1.5")
    assert arrays._pool_limit() == 3 << 19
    monkeypatch.setenv("DLCONV_HOST_POOL_MB", "lots")
    with pytest.raises(ValueError, match="DLCONV_HOST_POOL_MB must be a number of MiB, got 'lots'"):
        arrays._pool_limit()


# ----------------------------------------------------------------------------- the host thread
def test_host_kernels_run_on_one_thread_whoever_calls():
    """Calls from many threads all run on the one dlconv-host thread (one OpenMP team),
    results and exceptions come back to each caller, a nested call runs in place, and the
    main thread runs its calls in place (no hand-over)."""
    import concurrent.futures as cf
    import threading

    host = ops.HOST_THREAD
    nested = lambda: host.run(threading.get_ident)  # noqa: E731
    with cf.ThreadPoolExecutor(4) as pool:
        seen = set(pool.map(lambda _: (host.run(threading.get_ident), host.run(nested), threading.get_ident()),
                            range(16)))
    runners = {r for r, _, _ in seen} | {n for _, n, _ in seen}
    callers = {c for _, _, c in seen}
    assert len(runners) == 1 and not runners & callers
    assert threading.current_thread() is threading.main_thread()
    assert host.run(threading.get_ident) == threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        host.run(lambda: 1 / 0)
    with cf.ThreadPoolExecutor(1) as pool:
        with pytest.raises(ZeroDivisionError):
            pool.submit(host.run, lambda: 1 / 0).result()
    # validation still happens in the caller, before any hand-over
    with pytest.raises(ValueError, match="channel"):
        ops.conv2d(f32(1, 5, 5, 2), f32(3, 3, 3, 4), backend="cpp")


def _conv_in_child(_):
    x = np.ones((2, 8, 8, 16), np.float32)
    w = np.ones((3, 3, 16, 16), np.float32)
    return float(ops.conv2d(x, w, backend="cpp").sum())


def test_host_thread_works_in_a_forked_child():
    """A forked child has no host thread (threads do not survive fork): it starts its own."""
    import multiprocessing as mp

    from dlconv import backends

    ok, why = backends.get("cpp").cpu_status()
    if not ok:
        pytest.skip(f"backend 'cpp' cannot run here: {why}")
    expected = _conv_in_child(0)                  # the parent's host thread exists now
    assert expected == 2 * 6 * 6 * 16 * 3 * 3 * 16
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(_conv_in_child, [0, 1], chunksize=1) == [expected, expected]
