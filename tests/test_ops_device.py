"""The op API with CUDA arrays in → CUDA arrays out, through dlconv.ops (validation,
geometry, dispatch), for the numba backend.  Under the simulator here (tiny shapes); on a
machine with a GPU the same tests run on the real device."""

import numpy as np
import pytest

import dlconv
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda provides the device arrays")


def _dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


@pytest.fixture
def case():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 7, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    return x, w, b


@pytest.mark.parametrize("variant", ["cuda_v1_direct", "cuda_v2_halotile", "cuda_v3_regblock"])
def test_conv2d_device_in_device_out(case, variant):
    x, w, b = case
    pads = ((1, 0), (0, 2))
    g = conv_geometry(x.shape, w.shape, (2, 1), pads, 1)
    stream = cuda.stream()
    y = dlconv.conv2d(_dev(x), _dev(w), _dev(b), strides=(2, 1), padding=pads, activation="tanh",
                      variant=variant, stream=stream)
    stream.synchronize()
    assert not isinstance(y, np.ndarray) and dlconv.arrays.is_cuda_array(y)
    np.testing.assert_allclose(y.copy_to_host(), ref.conv2d_forward(x, w, b, g, "tanh"),
                               rtol=1e-5, atol=1e-5)


def test_conv2d_backward_device(case):
    x, w, _ = case
    g = conv_geometry(x.shape, w.shape, 1, "same", (2, 1))
    dy = np.random.default_rng(8).standard_normal(g.y_shape).astype(np.float32)
    dx = dlconv.conv2d_backward_data(_dev(dy), _dev(w), x.shape, 1, "same", (2, 1))
    dw, db = dlconv.conv2d_backward_filter(_dev(x), _dev(dy), w.shape, 1, "same", (2, 1))
    np.testing.assert_allclose(dx.copy_to_host(), ref.conv2d_backward_data(dy, w, g), rtol=1e-4, atol=1e-4)
    dw_ref, db_ref = ref.conv2d_backward_filter(x, dy, g)
    np.testing.assert_allclose(dw.copy_to_host(), dw_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.copy_to_host(), db_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh", "softmax"])
def test_dense_device_forward_and_backward(act):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 11)).astype(np.float32)
    w = rng.standard_normal((11, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    dy = rng.standard_normal((5, 6)).astype(np.float32)
    y = dlconv.dense(_dev(x), _dev(w), _dev(b), activation=act)
    y_ref = ref.dense_forward(x, w, b, act)
    np.testing.assert_allclose(y.copy_to_host(), y_ref, rtol=1e-5, atol=1e-5)
    grads = dlconv.dense_backward(_dev(x), _dev(w), _dev(dy), y, activation=act)
    for ours, theirs in zip(grads, ref.dense_backward(x, w, dy, y_ref, act)):
        np.testing.assert_allclose(ours.copy_to_host(), theirs, rtol=1e-4, atol=1e-4)


def test_empty_batch_on_device_gives_empty_device_result():
    w = np.ones((3, 3, 2, 4), np.float32)
    y = dlconv.conv2d(_dev(np.zeros((0, 5, 5, 2), np.float32)), _dev(w), padding="same")
    assert tuple(y.shape) == (0, 5, 5, 4) and dlconv.arrays.is_cuda_array(y)


def test_mixed_host_and_device_is_refused(case):
    x, w, _ = case
    with pytest.raises(ValueError, match=r"x on the device, w on the host"):
        dlconv.conv2d(_dev(x), w)


def test_device_float64_is_refused(case):
    x, w, _ = case
    with pytest.raises(TypeError, match=r"x must be float32, got float64"):
        dlconv.conv2d(_dev(x.astype(np.float64)), _dev(w))
