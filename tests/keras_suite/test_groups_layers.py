"""Grouped and depthwise ``dlconv.layers.Conv2D`` on the current Keras backend, every dlconv
backend: values and gradients (input, kernel, bias) equal to the stock grouped Conv2D's, over
strides, dilation, same/valid, channels_first and depth multipliers; and ONE kernel call per
layer call (the layer passes ``groups`` to the op: no per-group split).  Started by
tests/test_keras_backends.py through the suite folder (one process per Keras backend).
"""

import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import cpu_backend_params  # noqa: E402  (tests/conftest.py)
from backend_grads import grads  # noqa: E402

import dlconv.layers as dl
from dlconv import ops as dlops

BACKENDS = cpu_backend_params()

#: (groups, channels, filters, kwargs): the argument sets of Keras' own grouped tests and more.
CASES = [
    (2, 4, 6, dict(kernel_size=3, strides=(2, 1), padding="same")),
    (3, 6, 9, dict(kernel_size=(3, 2), dilation_rate=(2, 1), padding="valid")),
    (4, 8, 4, dict(kernel_size=2, strides=2, padding="same", data_format="channels_first")),
    (5, 5, 5, dict(kernel_size=3, padding="same")),                   # depthwise, multiplier 1
    (3, 3, 6, dict(kernel_size=3, strides=(1, 2), padding="valid")),  # depthwise, multiplier 2
]


def _close(a, b, rtol, what):
    scale = max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups, channels, filters, kw", CASES,
                         ids=[f"g{c[0]}_c{c[1]}_f{c[2]}" for c in CASES])
def test_grouped_layer_equals_stock(backend, groups, channels, filters, kw):
    cf = kw.get("data_format") == "channels_first"
    x_shape = (2, channels, 7, 6) if cf else (2, 7, 6, channels)
    ours = dl.Conv2D(filters, groups=groups, activation="relu", backend=backend, **kw)
    stock = keras.layers.Conv2D(filters, groups=groups, activation="relu", **kw)
    ours.build(x_shape)
    stock.build(x_shape)
    rng = np.random.default_rng(groups * 100 + channels)
    stock.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in stock.get_weights()])
    ours.set_weights(stock.get_weights())
    assert tuple(ours.kernel.shape) == tuple(kw["kernel_size"] if isinstance(kw["kernel_size"], tuple)
                                             else (kw["kernel_size"],) * 2) + (channels // groups, filters)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y_stock = keras.ops.convert_to_numpy(stock(x))
    dy = rng.standard_normal(y_stock.shape).astype(np.float32)
    y1, gx1, gv1 = grads(ours, x, dy)
    y2, gx2, gv2 = grads(stock, x, dy)
    _close(y1, y2, 1e-5, "forward")
    _close(gx1, gx2, 1e-4, "dL/dx")
    for v, a, b in zip(stock.trainable_variables, gv1, gv2):
        _close(a, b, 1e-4, f"dL/d{v.path}")


def test_one_kernel_call_per_grouped_layer_call(monkeypatch):
    """The layer hands groups to the op: one conv2d call carrying all groups (the TF native
    ops bypass dlconv.ops, so the op-API path is forced with the numba backend)."""
    calls = []
    real = dlops.conv2d

    def spy(*a, **k):
        calls.append(k.get("geometry"))
        return real(*a, **k)

    monkeypatch.setattr(dlops, "conv2d", spy)
    layer = dl.Conv2D(8, 3, groups=4, padding="same", backend="numba")
    layer(np.random.default_rng(0).standard_normal((1, 5, 5, 8)).astype(np.float32))
    assert len(calls) == 1 and calls[0] is not None and calls[0].groups == 4, calls
