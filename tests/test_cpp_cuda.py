"""The CUDA C++ kernels (dlconv._C_cuda, backend="cpp" on device arrays).

Everywhere: the extension is built when nvcc exists, imports without a GPU, says why no device
is usable, and checks every argument (shape, dtype, layout, overlap, geometry) before it would
launch anything — exercised with fake ``__cuda_array_interface__`` objects, which need no GPU.

``@pytest.mark.gpu`` (skipped by conftest without a real GPU, with that reason): every CUDA
kernel and conv variant against the NumPy reference on MNIST-sized shapes, with Numba device
arrays on a non-default stream, and with torch / CuPy tensors when those are importable.
"""

from __future__ import annotations

import gzip
import itertools
import os
import shutil

import numpy as np
import pytest

from conftest import REAL_GPU
from dlconv import ops
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

NVCC = shutil.which("nvcc") or (
    os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")))
CUDA_BUILD_OFF = os.environ.get("DLCONV_CUDA") == "0"

try:
    from dlconv import _C_cuda
except ImportError as exc:  # reported by test_extension_is_built_when_nvcc_exists
    _C_cuda = None
    _IMPORT_ERROR = str(exc)

needs_ext = pytest.mark.skipif(_C_cuda is None, reason="dlconv._C_cuda is not built (no nvcc, or DLCONV_CUDA=0)")
ACTS = ("linear", "relu", "sigmoid", "tanh")
VARIANTS = ("cuda_v3_regblock", "cuda_v2_gemmtile", "cuda_v1_direct")


def _codes():
    """name → launcher code, from the one C++ CUDA table (csrc/conv_variants.h)."""
    return {r["name"]: r["code"] for r in _C_cuda.CONV_VARIANTS}


# ----------------------------------------------------------------------------- build + status
@pytest.mark.skipif(not NVCC or CUDA_BUILD_OFF, reason="nvcc not found or DLCONV_CUDA=0: the CUDA "
                                                      "extension is legitimately absent")
def test_extension_is_built_when_nvcc_exists():
    assert _C_cuda is not None, f"nvcc exists but dlconv._C_cuda does not import: {_IMPORT_ERROR}"
    info = _C_cuda.build_info()
    # the archs asked for at build time (setup.py's default "80;90"; gpu_check.sh asks for
    # its GPU's only), not a hard-coded list
    requested = os.environ.get("DLCONV_CUDA_ARCHS", "80;90").split(";")
    assert sorted(info["archs"].split()) == sorted(a.strip() for a in requested if a.strip())
    assert info["cudart"].endswith("(static)")
    assert set(info["conv_variants"]) == set(VARIANTS)
    assert _codes() == {"cuda_v1_direct": 1, "cuda_v2_gemmtile": 2, "cuda_v3_regblock": 3}
    # the CPU extension exports the same table, so a build without CUDA still names them
    from dlconv import _C
    assert _C.CUDA_CONV_VARIANTS == _C_cuda.CONV_VARIANTS


@needs_ext
@pytest.mark.skipif(REAL_GPU, reason="this machine has a GPU; the no-device path is tested elsewhere")
def test_no_gpu_is_reported_with_a_reason():
    from dlconv import backends
    assert _C_cuda.devices() == []
    why = _C_cuda.devices_why()
    assert why.startswith("cuda")  # e.g. "cudaErrorInsufficientDriver: ..." / "cudaErrorNoDevice: ..."
    ok, reason = backends.get("cpp").cuda_status()
    assert not ok and why in reason
    assert backends.available()["cpp"]["cuda"][0] is False


# ----------------------------------------------------------------------------- argument checks
class FakeCuda:
    """An object that *claims* to be CUDA memory (nothing is ever read from it)."""

    _next = itertools.count(1)

    def __init__(self, shape, typestr="<f4", readonly=False, strides=None, ptr=None):
        if ptr is None:
            ptr = next(self._next) << 32  # far apart: never overlapping
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, readonly),
                                         "strides": strides, "version": 3}


@pytest.fixture
def conv_fakes():
    g = conv_geometry((2, 9, 8, 3), (3, 3, 3, 5), 2, "same")
    return g, FakeCuda(g.x_shape), FakeCuda(g.w_shape), FakeCuda((g.filters,)), FakeCuda(g.y_shape)


def _launch_refused(fn, kernel):
    """Valid metadata but fake memory: RuntimeError naming the kernel without a GPU (the runtime
    cannot even be queried), ValueError 'not CUDA device memory' with one."""
    if REAL_GPU:
        with pytest.raises(ValueError, match=f"{kernel}.*not CUDA device memory"):
            fn()
    else:
        with pytest.raises(RuntimeError, match=f"dlconv CUDA kernel {kernel}"):
            fn()


@needs_ext
def test_every_entry_point_checks_then_refuses_fake_memory(conv_fakes):
    g, x, w, b, y = conv_fakes
    t = g.as_tuple()
    for v in (1, 2, 3):
        _launch_refused(lambda: _C_cuda.conv2d_forward(x, w, b, t, 1, y, v, 0), "conv2d_forward")
    _launch_refused(lambda: _C_cuda.conv2d_backward_data(FakeCuda(g.y_shape), w, t, FakeCuda(g.x_shape)),
                    "conv2d_backward_data")
    _launch_refused(lambda: _C_cuda.conv2d_backward_filter(x, FakeCuda(g.y_shape), t, FakeCuda(g.w_shape),
                                                           FakeCuda((g.filters,))), "conv2d_backward_filter")
    F = FakeCuda
    _launch_refused(lambda: _C_cuda.dense_forward(F((4, 7)), F((7, 3)), None, 2, F((4, 3))), "dense_forward")
    _launch_refused(lambda: _C_cuda.dense_backward(F((4, 7)), F((7, 3)), F((4, 3)), F((4, 3)), 3, F((4, 7)),
                                                   F((7, 3)), F((3,))), "dense_backward")
    _launch_refused(lambda: _C_cuda.softmax(F((4, 10)), F((4, 10))), "softmax")
    _launch_refused(lambda: _C_cuda.activation_backward(F((4, 10)), F((4, 10)), 4, F((4, 10))),
                    "activation_backward")


@needs_ext
def test_shape_dtype_layout_errors_come_before_any_cuda_call(conv_fakes):
    g, x, w, b, y = conv_fakes
    t = g.as_tuple()
    with pytest.raises(ValueError, match=r"y has shape \(2, 5, 4, 4\), expected \(2, 5, 4, 5\)"):
        _C_cuda.conv2d_forward(x, w, b, t, 0, FakeCuda((2, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"b has shape \(4,\), expected \(5,\)"):
        _C_cuda.conv2d_forward(x, w, FakeCuda((4,)), t, 0, y)
    with pytest.raises(TypeError, match="x must be float32"):
        _C_cuda.conv2d_forward(FakeCuda(g.x_shape, typestr="<f8"), w, b, t, 0, y)
    with pytest.raises(TypeError, match="must be a CUDA array"):
        _C_cuda.conv2d_forward(np.zeros(g.x_shape, np.float32), w, b, t, 0, y)
    with pytest.raises(TypeError, match="must be a CUDA array"):
        _C_cuda.conv2d_forward(x, w, b, t, 0, None)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C_cuda.conv2d_forward(FakeCuda(g.x_shape, strides=(4, 4, 4, 4)), w, b, t, 0, y)
    with pytest.raises(ValueError, match="read-only"):
        _C_cuda.conv2d_forward(x, w, b, t, 0, FakeCuda(g.y_shape, readonly=True))
    with pytest.raises(ValueError, match="null data pointer"):
        _C_cuda.conv2d_forward(FakeCuda(g.x_shape, ptr=0), w, b, t, 0, y)
    with pytest.raises(ValueError, match="aligned"):
        _C_cuda.conv2d_forward(FakeCuda(g.x_shape, ptr=(1 << 40) + 2), w, b, t, 0, y)
    with pytest.raises(ValueError, match=r"variant must be one of cuda_v1_direct \(1\), cuda_v2_gemmtile \(2\)"):
        _C_cuda.conv2d_forward(x, w, b, t, 0, y, 4)
    with pytest.raises(ValueError, match="activation code must be 0..3"):
        _C_cuda.conv2d_forward(x, w, b, t, 7, y)
    with pytest.raises(ValueError, match="out_h/out_w do not match"):
        _C_cuda.conv2d_forward(x, w, b, t[:15] + (t[15] + 1, t[16]), 0, y)
    with pytest.raises(ValueError, match="output y overlaps input x"):
        base = 1 << 44
        _C_cuda.conv2d_forward(FakeCuda(g.x_shape, ptr=base), w, b, t, 0, FakeCuda(g.y_shape, ptr=base + 64))
    with pytest.raises(ValueError, match="needed for activation"):
        _C_cuda.dense_backward(FakeCuda((2, 3)), FakeCuda((3, 4)), FakeCuda((2, 4)), None, 1, None, None, None)
    with pytest.raises(ValueError, match="rank 2"):
        _C_cuda.softmax(FakeCuda((2, 3, 4)), FakeCuda((2, 3, 4)))
    with pytest.raises(ValueError, match=r"w has shape \(4, 3\), expected \(7, 3\)"):
        _C_cuda.dense_forward(FakeCuda((2, 7)), FakeCuda((4, 3)), None, 0, FakeCuda((2, 3)))


@needs_ext
def test_empty_buffers_need_no_device_and_launch_nothing():
    """A zero-size softmax passes every check and returns without touching CUDA."""
    _C_cuda.softmax(FakeCuda((0, 10), ptr=0), FakeCuda((0, 10), ptr=0))


# ----------------------------------------------------------------------------- on a real GPU
CONV_CASES = [  # (x_shape, w_shape, strides, padding, dilation): MNIST-sized
    ((16, 28, 28, 1), (3, 3, 1, 32), 1, "valid", 1),             # MNIST conv1
    ((16, 26, 26, 32), (3, 3, 32, 64), 1, "valid", 1),           # MNIST conv2 (float4 path of v3)
    ((5, 28, 28, 3), (5, 5, 3, 17), 2, "same", 1),               # odd channels: scalar path
    ((3, 28, 27, 17), (3, 3, 17, 33), 1, ((2, 1), (0, 3)), 2),   # asymmetric pads, dilation
    ((7, 14, 14, 8), (2, 3, 8, 70), (3, 2), "same", 1),          # ragged tiles in both directions
]


@pytest.fixture(scope="module")
def cuda():
    from numba import cuda as nb_cuda
    return nb_cuda


def _mnist_images(mnist_dir, n):
    with gzip.open(mnist_dir / "t10k-images-idx3-ubyte.gz", "rb") as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16)
    return (data[: n * 784].reshape(n, 28, 28, 1) / np.float32(255)).astype(np.float32)


def _tol(k):
    return 1e-4 * max(1.0, np.sqrt(k))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_conv_forward_variants_match_reference(cuda, case, variant, rng):
    x_shape, w_shape, s, p, d = case
    g = conv_geometry(x_shape, w_shape, s, p, d)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32)
    stream = cuda.stream()
    xd, wd, bd = (cuda.to_device(a, stream=stream) for a in (x, w, b))
    for act in ACTS:
        yd = ops.conv2d(xd, wd, bd, s, p, d, act, backend="cpp", variant=variant, stream=stream)
        y = yd.copy_to_host(stream=stream)
        stream.synchronize()
        np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, g, act), rtol=1e-4, atol=_tol(g.gemm_k))
    # without bias, default stream, straight into the extension
    yd = cuda.device_array(g.y_shape, np.float32)
    _C_cuda.conv2d_forward(xd, wd, None, g.as_tuple(), 0, yd, _codes()[variant], 0)
    np.testing.assert_allclose(yd.copy_to_host(), ref.conv2d_forward(x, w, None, g), rtol=1e-4,
                               atol=_tol(g.gemm_k))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES)
def test_gpu_conv_backward_matches_reference(cuda, case, rng):
    x_shape, w_shape, s, p, d = case
    g = conv_geometry(x_shape, w_shape, s, p, d)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    stream = cuda.stream()
    xd, wd, dzd = (cuda.to_device(a, stream=stream) for a in (x, w, dz))
    dx = ops.conv2d_backward_data(dzd, wd, g.x_shape, geometry=g, backend="cpp", stream=stream)
    dw, db = ops.conv2d_backward_filter(xd, dzd, g.w_shape, geometry=g, backend="cpp", stream=stream)
    dx, dw, db = (a.copy_to_host(stream=stream) for a in (dx, dw, db))
    stream.synchronize()
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dz, w, g), rtol=1e-4,
                               atol=_tol(g.k_h * g.k_w * g.filters))
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=_tol(g.gemm_m))
    np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=_tol(g.gemm_m))


@pytest.mark.gpu
def test_gpu_conv1_on_real_mnist_images(cuda, mnist_dir, rng):
    x = _mnist_images(mnist_dir, 32)
    w = rng.standard_normal((3, 3, 1, 32), dtype=np.float32)
    b = rng.standard_normal(32, dtype=np.float32)
    g = conv_geometry(x.shape, w.shape)
    for variant in VARIANTS:
        y = ops.conv2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), activation="relu",
                       backend="cpp", variant=variant).copy_to_host()
        np.testing.assert_allclose(y, ref.conv2d_forward(x, w, b, g, "relu"), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(128, 9216, 128), (128, 128, 10), (13, 37, 70)])
@pytest.mark.parametrize("act", ACTS + ("softmax",))
def test_gpu_dense_forward_backward_match_reference(cuda, m, k, n, act, rng):
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    xd, wd, bd, dyd = (cuda.to_device(a) for a in (x, w, b, dy))
    yd = ops.dense(xd, wd, bd, act, backend="cpp")
    y = yd.copy_to_host()
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=1e-4, atol=_tol(k))
    dx, dw, db = (a.copy_to_host() for a in ops.dense_backward(xd, wd, dyd, yd, act, backend="cpp"))
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, act)
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=_tol(m))
    np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=_tol(m))


@needs_ext
def test_split_k_heuristic():
    """The dense GEMM splits its reduction only when its output tiles leave SMs idle."""
    split = _C_cuda.split_k_splits
    assert split(128, 128, 9216, 132) == 36      # MNIST dense1 forward: 4 tiles → 144 blocks
    assert split(128, 9216, 128, 132) == 1       # dense1 dx: 288 tiles already
    assert split(9216, 128, 128, 132) == 1       # dense1 dw
    assert split(128, 10, 128, 132) == 1         # dense2: K too short to split
    assert split(128, 128, 9216, 4) == 1         # 4 tiles on 4 SMs: no split
    assert split(1024, 1024, 1 << 20, 10000) == 16   # the 16 Mi-float workspace cap
    assert split(64, 64, 1 << 20, 1000) == 64    # at most 64 partials per element
    assert split(0, 70, 600, 132) == 1           # no output tiles: no split (was a division by zero)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("m,k,n", [(13, 600, 70), (2, 37, 5), (65, 129, 64)])
def test_gpu_dense_split_k_forced(cuda, splits, m, k, n, rng):
    """Forced split-K on ragged shapes: same results as the reference, bitwise repeatable."""
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    xd, wd, bd, dyd = (cuda.to_device(a) for a in (x, w, b, dy))
    _C_cuda._set_split_k(splits)
    try:
        runs = []
        for _ in range(2):
            yd = ops.dense(xd, wd, bd, "tanh", backend="cpp")
            runs.append([yd.copy_to_host()] + [a.copy_to_host() for a in
                                               ops.dense_backward(xd, wd, dyd, yd, "tanh", backend="cpp")])
    finally:
        _C_cuda._set_split_k(0)
    y, dx, dw, db = runs[0]
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, "tanh"), rtol=1e-4, atol=_tol(k))
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, "tanh")
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=_tol(m))
    assert all(np.array_equal(p, q) for p, q in zip(runs[0][:3], runs[1][:3]))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(128, 10), (3, 1000), (1, 1)])
def test_gpu_softmax_and_activation_backward(cuda, rows, cols, rng):
    z = (rng.standard_normal((rows, cols)) * 20).astype(np.float32)
    y = ops.softmax(cuda.to_device(z), backend="cpp").copy_to_host()
    np.testing.assert_allclose(y, ref.softmax(z.astype(np.float64)), rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal((rows, cols), dtype=np.float32)
    for act in ACTS + ("softmax",):
        yy = y if act == "softmax" else ref.activate(z.astype(np.float64), act).astype(np.float32)
        got = ops.activation_backward(cuda.to_device(dy), cuda.to_device(yy), act, backend="cpp").copy_to_host()
        np.testing.assert_allclose(got, ref.activation_backward(dy, yy, act), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_backend_status_and_kernel_errors(cuda):
    from dlconv import backends
    ok, why = backends.get("cpp").cuda_status()
    assert ok, why
    # a host pointer claimed as device memory is refused before launch
    host = np.zeros((2, 3), np.float32)
    fake = FakeCuda((2, 3), ptr=host.ctypes.data)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        _C_cuda.softmax(fake, cuda.device_array((2, 3), np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("lib", ["torch", "cupy"])
def test_gpu_foreign_tensors_without_copies(lib, rng):
    mod = pytest.importorskip(lib, reason=f"{lib} is not installed")
    if lib == "torch" and not mod.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    g = conv_geometry((4, 28, 28, 3), (3, 3, 3, 8), 1, "same")
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    if lib == "torch":
        xt, wt = mod.from_numpy(x).cuda(), mod.from_numpy(w).cuda()
        stream = mod.cuda.current_stream()
    else:
        xt, wt = mod.asarray(x), mod.asarray(w)
        stream = mod.cuda.get_current_stream()
    y = mod.empty(g.y_shape, dtype=mod.float32, device="cuda") if lib == "torch" else \
        mod.empty(g.y_shape, dtype=mod.float32)
    from dlconv.backends.cpp_backend import stream_handle
    _C_cuda.conv2d_forward(xt, wt, None, g.as_tuple(), 1, y, 3, stream_handle(stream))
    got = y.cpu().numpy() if lib == "torch" else mod.asnumpy(y)
    np.testing.assert_allclose(got, ref.conv2d_forward(x, w, None, g, "relu"), rtol=1e-4, atol=1e-3)
    # and through the op API (ops turns them into Numba views, no copy)
    y2 = ops.conv2d(xt, wt, activation="relu", padding="same", backend="cpp").copy_to_host()
    np.testing.assert_allclose(y2, got, rtol=1e-5, atol=1e-5)
