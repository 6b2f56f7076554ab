"""dlconv.layers.MaxPooling2D on the current Keras backend (started per backend by
tests/test_keras_backends.py, like the rest of this folder): values and gradients equal to
the stock layer's over generated geometries (ties included), the dlconv path taken on torch
JAX and TensorFlow (stock for channels_first), config and .keras registration.
Keras' own MaxPooling2D tests run with this class in tests/keras_own.  By hand:

    DLCONV_KERAS_SUITE=1 KERAS_BACKEND=jax pytest tests/keras_suite/test_pool_layer.py
"""

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from backend_grads import grads

import dlconv.layers as dl

BACKEND = keras.config.backend()


@settings(max_examples=12, deadline=None)
@given(pool=st.tuples(st.integers(1, 3), st.integers(1, 3)), strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.sampled_from(["valid", "same"]), c=st.sampled_from([1, 3, 16, 17]), seed=st.integers(0, 999))
def test_max_pooling2d_equals_stock_values_and_gradients(pool, strides, padding, c, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (2, 7, 8, c)).astype(np.float32)        # integers: many ties
    ours = dl.MaxPooling2D(pool, strides, padding)
    stock = keras.layers.MaxPooling2D(pool, strides, padding)
    y_stock = keras.ops.convert_to_numpy(stock(x))
    dy = rng.random(y_stock.shape).astype(np.float32)
    y1, gx1, _ = grads(ours, x, dy)
    y2, gx2, _ = grads(stock, x, dy)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-6, atol=1e-6)


def test_the_dlconv_path_is_taken_where_it_should_be():
    x = np.zeros((1, 4, 4, 3), np.float32)
    bridge = dl.MaxPooling2D()._dlconv_path(keras.ops.convert_to_tensor(x))
    assert (bridge is not None) == (BACKEND in ("torch", "jax", "tensorflow"))
    cf = dl.MaxPooling2D(data_format="channels_first")
    assert cf._dlconv_path(keras.ops.convert_to_tensor(x)) is None
    y = cf(np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4))          # the stock layer's answer
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(y),
                                  keras.ops.convert_to_numpy(keras.layers.MaxPooling2D(data_format="channels_first")(
                                      np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4))))


def test_config_and_registration():
    layer = dl.MaxPooling2D(3, 2, "same", backend="cpp")
    config = layer.get_config()
    stock = keras.layers.MaxPooling2D(3, 2, "same").get_config()
    assert {k: v for k, v in config.items() if k not in ("backend", "name")} == \
        {k: v for k, v in stock.items() if k != "name"}
    assert config["backend"] == "cpp"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is dl.MaxPooling2D and again.backend == "cpp" and again.pool_size == (3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        dl.MaxPooling2D(backend="fortran")
