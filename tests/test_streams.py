"""Streams: handles of every kind of stream object, which producer streams a launch waits for,
the stream handed to a DLPack producer, and — on a real GPU — a producer on one non-blocking
stream and dlconv's kernels on another, which read the input only after the producer wrote it.

Everywhere (no GPU needed): the decisions of dlconv.streams, with fake stream and array objects.
``gpu``-marked: the race itself, through ops (Numba and C++ backends) and through dlconv._C_cuda
directly (which reads the CAI ``stream`` entry itself).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import pytest

from dlconv import streams
from dlconv import reference as ref
from dlconv.shapes import conv_geometry


class FakeStreamArray:
    def __init__(self, stream, version=3):
        self.__cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (1 << 32, False),
                                         "version": version, "strides": None}
        if stream is not ...:
            self.__cuda_array_interface__["stream"] = stream


def test_stream_handle_of_each_kind():
    class NumbaLike:
        handle = ctypes.c_void_p(77)

    class TorchLike:
        cuda_stream = 78

    class CupyLike:
        ptr = 79

        def __cuda_stream__(self):
            return (0, 79)

    assert [streams.stream_handle(s) for s in (None, 0, 5, NumbaLike(), TorchLike(), CupyLike())] == \
        [0, 0, 5, 77, 78, 79]
    with pytest.raises(TypeError, match="stream must be a CUDA stream"):
        streams.stream_handle(object())
    with pytest.raises(TypeError, match="stream must be a CUDA stream or an int handle"):
        streams.stream_handle(True)


def test_cai_stream_entry():
    assert streams.cai_stream(FakeStreamArray(...)) is None          # CAI v2: no entry
    assert streams.cai_stream(FakeStreamArray(None)) is None         # v3, nothing to wait for
    assert streams.cai_stream(FakeStreamArray(1)) == 1               # legacy default stream
    assert streams.cai_stream(FakeStreamArray(0xABC0)) == 0xABC0
    assert streams.cai_stream(np.zeros(2)) is None                   # host array
    with pytest.raises(ValueError, match="'stream' must be None or a handle"):
        streams.cai_stream(FakeStreamArray(-3))


def test_which_producers_are_waited_for():
    wait = streams.producers_to_wait_for
    # nothing to wait for: no producer, the launch stream itself, the legacy default as 0 or 1
    assert wait([None, None], 0x100) == []
    assert wait([0x100], 0x100) == []
    assert wait([1], 0) == [] and wait([0], 1) == []
    # another stream: once, however many inputs came from it
    assert wait([0x200, None, 0x200, 0x300], 0x100) == [0x200, 0x300]
    # a non-blocking launch stream must wait for the legacy default stream too
    assert wait([1], 0x100) == [1]
    # the per-thread default stream is not the legacy one ...
    assert wait([2], 0) == [2]
    # ... unless Numba is configured for per-thread default streams, where 0 means 2
    assert wait([2], 0, per_thread_default=True) == []
    assert wait([1], 0, per_thread_default=True) == [1]


def test_dlpack_consumer_stream_argument():
    assert streams.dlpack_stream_arg(0) == streams.LEGACY_DEFAULT
    assert streams.dlpack_stream_arg(0, per_thread_default=True) == streams.PER_THREAD_DEFAULT
    assert streams.dlpack_stream_arg(0x1234) == 0x1234


def test_dlpack_producer_is_told_the_consumer_stream(monkeypatch):
    from dlconv import arrays

    seen = []

    class Producer:
        def __dlpack__(self, stream=None):
            seen.append(stream)
            raise RuntimeError("stop here: only the stream argument is under test")

    class Stream:
        cuda_stream = 0x5150

    for stream, want in ((None, 1), (Stream(), 0x5150)):
        with pytest.raises(RuntimeError, match="stop here"):
            arrays.dlpack_view(Producer(), "x", stream)
        assert seen[-1] == want


# ----------------------------------------------------------------------------- on a real GPU
#: How long the producer's kernel sleeps before it writes its output: far longer than a launch
#: on the other stream takes, so that a consumer that does not wait reads the old contents.
SLEEP_NS = 1_000_000
SLEEPS = 60          # ~60 ms in all (nanosleep's 1 ms maximum per call)
STALE = np.float32(-7.0)


@functools.lru_cache(maxsize=None)
def _slow_writer():
    """A kernel that sleeps ~SLEEPS ms in every thread, then copies src to dst (flat arrays)."""
    from numba import cuda

    @cuda.jit
    def slow_copy(src, dst):
        i = cuda.grid(1)
        if i < src.size:
            for _ in range(SLEEPS):
                cuda.nanosleep(SLEEP_NS)
            dst[i] = src[i]
    return slow_copy


def _race_setup(shape, rng):
    """(truth, device array filled with STALE that a slow kernel on stream A overwrites with
    truth, stream A, stream B): A and B are non-blocking streams."""
    from numba import cuda

    truth = rng.standard_normal(shape).astype(np.float32)
    a, b = cuda.stream(), cuda.stream()   # Numba's streams are created non-blocking
    src = cuda.to_device(truth)
    dst = cuda.to_device(np.full(shape, STALE, np.float32))
    cuda.synchronize()
    n = truth.size
    _slow_writer()[(n + 127) // 128, 128, a](src.reshape(n), dst.reshape(n))
    return truth, dst.bind(a), a, b     # bound to A: its CAI names stream A as the producer


@pytest.mark.gpu
def test_gpu_race_control_a_naive_reader_sees_stale_data(rng):
    """The race window is real: a copy on stream B that does not wait reads STALE."""
    from numba import cuda

    truth, dst, a, b = _race_setup((64,), rng)
    out = cuda.device_array(dst.shape, np.float32, stream=b)
    out.copy_to_device(dst, stream=b)
    early = out.copy_to_host(stream=b)
    b.synchronize()
    a.synchronize()
    assert (early == STALE).any(), "the race window did not open: this test cannot detect a missing wait"
    np.testing.assert_array_equal(dst.copy_to_host(), truth)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["numba", "cpp"])
def test_gpu_ops_wait_for_the_producer_stream(backend, rng):
    from dlconv import ops

    g = conv_geometry((4, 10, 10, 3), (3, 3, 3, 5), 1, "same")
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    from numba import cuda
    wd = cuda.to_device(w)
    cuda.synchronize()
    x, xd, a, b = _race_setup(g.x_shape, rng)
    y = ops.conv2d(xd, wd, padding="same", backend=backend, stream=b)
    got = y.copy_to_host(stream=b)
    b.synchronize()
    np.testing.assert_allclose(got, ref.conv2d_forward(x, w, None, g), rtol=1e-4, atol=1e-4)
    x2, xd2, a2, b2 = _race_setup((8, 33), rng)
    w2 = rng.standard_normal((33, 6)).astype(np.float32)
    y2 = ops.dense(xd2, cuda.to_device(w2), activation="relu", backend=backend, stream=b2)
    got2 = y2.copy_to_host(stream=b2)
    b2.synchronize()
    np.testing.assert_allclose(got2, ref.dense_forward(x2, w2, None, "relu"), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_cpp_binding_reads_the_cai_stream_itself(rng):
    """dlconv._C_cuda called directly with a Numba array bound to producer stream A and a
    launch on stream B: the binding makes B wait for A."""
    pytest.importorskip("dlconv._C_cuda", reason="dlconv._C_cuda is not built")
    from numba import cuda

    from dlconv import _C_cuda

    z, zd, a, b = _race_setup((16, 40), rng)
    out = cuda.device_array(z.shape, np.float32, stream=b)
    _C_cuda.softmax(zd, out, streams.stream_handle(b))
    got = out.copy_to_host(stream=b)
    b.synchronize()
    np.testing.assert_allclose(got, ref.softmax(z.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("lib", ["cupy", "torch"])
def test_gpu_foreign_producer_streams(lib, rng):
    """A CuPy array (CAI v3 names CuPy's current stream) or a torch tensor (DLPack, told our
    stream) written on a non-blocking stream of its own, consumed on a Numba stream."""
    mod = pytest.importorskip(lib, reason=f"{lib} is not installed")
    from numba import cuda

    from dlconv import ops

    g = conv_geometry((2, 9, 9, 4), (3, 3, 4, 8), 1, "valid")
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    b = cuda.stream()
    if lib == "cupy":
        s = mod.cuda.Stream(non_blocking=True)
        with s:                             # CuPy's CAI names the *current* stream: s
            xt = mod.asarray(x)
            for _ in range(200):            # keep stream s busy for a while
                xt = xt * 1.0
            wt = mod.asarray(w)
            y = ops.conv2d(xt, wt, backend="numba", stream=b)
    else:
        if not mod.cuda.is_available():
            pytest.fail("torch has no CUDA on the GPU machine")
        s = mod.cuda.Stream()
        with mod.cuda.stream(s):
            xt = mod.from_numpy(x).cuda(non_blocking=False)
            for _ in range(200):
                xt = xt * 1.0
        wt = mod.from_numpy(w).cuda()
        xt = _DlpackOnly(xt)                # exercise the DLPack path, not torch's CAI v2
        with mod.cuda.stream(s):            # torch orders s's work before our stream b
            y = ops.conv2d(xt, wt, backend="numba", stream=b)
    got = y.copy_to_host(stream=b)
    b.synchronize()
    np.testing.assert_allclose(got, ref.conv2d_forward(x, w, None, g), rtol=1e-4, atol=1e-4)


class _DlpackOnly:
    """A torch tensor seen only through DLPack."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()
