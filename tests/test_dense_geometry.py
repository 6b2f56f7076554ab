"""dlconv.ops resolves a dense call's DenseGeometry once and hands that record to the backend
(as the conv path hands over its ConvGeometry): no backend re-derives the sizes."""

import numpy as np
import pytest

from dlconv import backends, ops
from dlconv import reference as ref
from dlconv.backends.reference import ReferenceBackend
from dlconv.shapes import DenseGeometry, dense_geometry


class SpyBackend(ReferenceBackend):
    """The reference, recording the geometry record each dense call receives."""

    name = "spy"

    def __init__(self):
        self.seen = []

    def dense_forward(self, x, w, b, g, activation, *, on_device, stream=None):
        self.seen.append(("forward", g))
        return super().dense_forward(x, w, b, g, activation, on_device=on_device)

    def dense_backward(self, x, w, dy, y, g, activation, *, on_device, stream=None):
        self.seen.append(("backward", g))
        return super().dense_backward(x, w, dy, y, g, activation, on_device=on_device)


@pytest.fixture
def spy(monkeypatch):
    be = SpyBackend()
    monkeypatch.setitem(backends._REGISTRY, "spy", "tests.test_dense_geometry:SpyBackend")
    monkeypatch.setitem(backends._INSTANCES, "spy", be)
    return be


@pytest.mark.parametrize("act", ["relu", "softmax"])
def test_dense_passes_its_geometry_record_to_the_backend(spy, act):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal((7, 4)).astype(np.float32)
    b, dy = rng.standard_normal(4).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    y = ops.dense(x, w, b, activation=act, backend="spy")
    grads = ops.dense_backward(x, w, dy, y, activation=act, backend="spy")
    want = dense_geometry(x.shape, w.shape)
    assert [kind for kind, _ in spy.seen] == ["forward", "backward"]
    assert all(isinstance(g, DenseGeometry) and g == want for _, g in spy.seen)
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=1e-6)
    for got, exp in zip(grads, ref.dense_backward(x, w, dy, y, act)):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_cpp_dense_allocates_from_the_record():
    pytest.importorskip("dlconv._C")
    be = backends.get("cpp")
    x, w = np.ones((2, 5), np.float32), np.ones((5, 3), np.float32)
    g = dense_geometry(x.shape, w.shape)
    y = be.dense_forward(x, w, None, g, "linear", on_device=False)
    assert y.shape == g.y_shape and np.all(y == 5)
    dx, dw, db = be.dense_backward(x, w, np.ones(g.y_shape, np.float32), None, g, "linear", on_device=False)
    assert (dx.shape, dw.shape, db.shape) == (g.x_shape, g.w_shape, (g.out_features,))
    assert np.all(dx == 3) and np.all(dw == 2) and np.all(db == 2)
