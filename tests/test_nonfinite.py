"""NaN and ±Inf propagate as TensorFlow propagates them, in every kernel set and variant.

* relu is TensorFlow's: ``relu(NaN) = NaN`` (a fused relu must not hide a diverging model),
  ``relu(-Inf) = 0``, ``relu(+Inf) = +Inf``;
* relu's gradient is TensorFlow's ReluGrad ``dy * (y > 0)``: a NaN y gives 0 (for finite dy),
  a NaN or ±Inf dy gives NaN even where y <= 0;
* Winograd (cpp ``cpu_v3_winograd``, also chosen inside the cpp backward passes) gives the
  direct sum's ±Inf where its transforms alone would give Inf − Inf = NaN;
* padding terms as TensorFlow has them: absent in the forward and backward-data passes (a
  ±Inf weight never meets the zero padding), multiplied in backward-filter (0 · NaN dz is NaN
  in dw); see ``dlconv.ops._exact_with_nonfinite_weights``.

Which of NaN / +Inf / -Inf / finite an output is does not depend on the summation order, so
the comparison is exact for the class and to float32 rounding for the finite values.
"""

import numpy as np
import pytest

from dlconv import ops
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

tf = pytest.importorskip("tensorflow")

CPU_CASES = [("reference", None), ("numba", "cpu_v2_regblock"), ("numba", "cpu_v1_direct"),
             ("numba", "cpu_v3_smalltile"), ("cpp", "cpu_v3_winograd"), ("cpp", "cpu_v2_regblock"),
             ("cpp", "cpu_v1_packgemm")]
# (strides, padding, dilation): the first is Winograd's geometry (3x3, stride 1); the second
# takes the strided paths (igemm backward-data), the third the dilated direct ones.
GEOMETRIES = [(1, "same", 1), (1, "valid", 1), (2, ((1, 0), (0, 2)), 1), (1, "valid", 2)]


def assert_same_nonfinite(actual, expected, what):
    """Same NaN positions, same ±Inf positions and signs, finite values close."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert (nan_a == nan_e).all(), (f"{what}: NaN at {int((nan_a & ~nan_e).sum())} places TensorFlow "
                                    f"has none, missing at {int((nan_e & ~nan_a).sum())}")
    inf_a, inf_e = np.isinf(actual), np.isinf(expected)
    assert (inf_a == inf_e).all(), f"{what}: ±Inf at {int((inf_a != inf_e).sum())} places differ"
    assert (np.sign(actual[inf_a]) == np.sign(expected[inf_e])).all(), f"{what}: sign of Inf"
    fin = np.isfinite(expected)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=2e-4, atol=2e-4, err_msg=what)


def poisoned(shape, seed, n_nan=2, n_pinf=2, n_ninf=2):
    """A standard-normal float32 array with a few NaN, +Inf and -Inf at random places."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, n_nan + n_pinf + n_ninf, replace=False)
    flat[idx[:n_nan]] = np.nan
    flat[idx[n_nan:n_nan + n_pinf]] = np.inf
    flat[idx[n_nan + n_pinf:]] = -np.inf
    return a


def tf_conv_relu(x, w, b, strides, padding, dilation, dy):
    """TensorFlow's y = relu(conv2d(x, w) + b) and (dx, dw, db) for the upstream dy."""
    g = conv_geometry(x.shape, w.shape, strides, padding, dilation)
    xt, wt, bt = (tf.constant(a) for a in (x, w, b))
    pads = [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]]
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(xt, wt, (g.stride_h, g.stride_w), pads,
                                                   dilations=(g.dil_h, g.dil_w)), bt))
    if g.dil_h == 1 and g.dil_w == 1:
        dx, dw, db = tape.gradient(y, [xt, wt, bt], output_gradients=tf.constant(dy))
        return g, y.numpy(), dx.numpy(), dw.numpy(), db.numpy()
    # TensorFlow's CPU conv backprop refuses dilation > 1: the reference (TF's ReluGrad rule).
    dz = tf.raw_ops.ReluGrad(gradients=dy, features=y).numpy()
    dw, db = ref.conv2d_backward_filter(x, dz, g)
    return g, y.numpy(), ref.conv2d_backward_data(dz, w, g), dw, db


@pytest.mark.parametrize("strides,padding,dilation", GEOMETRIES)
@pytest.mark.parametrize("poison", ["x", "w", "dy", "all"])
@pytest.mark.parametrize("backend,variant", CPU_CASES)
def test_conv_relu_nan_inf_as_tensorflow(backend, variant, strides, padding, dilation, poison):
    shape_x, shape_w = (2, 9, 8, 16), (3, 3, 16, 16)   # C, F >= Winograd's minimum of 8, 16
    x = poisoned(shape_x, 1) if poison in ("x", "all") else poisoned(shape_x, 1, 0, 0, 0)
    w = poisoned(shape_w, 2, 1, 1, 1) if poison in ("w", "all") else poisoned(shape_w, 2, 0, 0, 0)
    b = np.random.default_rng(3).standard_normal(16).astype(np.float32)
    g = conv_geometry(shape_x, shape_w, strides, padding, dilation)
    dy = poisoned(g.y_shape, 4) if poison in ("dy", "all") else poisoned(g.y_shape, 4, 0, 0, 0)
    g, y_tf, dx_tf, dw_tf, db_tf = tf_conv_relu(x, w, b, strides, padding, dilation, dy)
    if poison != "dy":
        assert np.isnan(y_tf).any() or np.isinf(y_tf).any()      # the case is a real one
    if variant == "cpu_v3_winograd" and (strides, dilation) != (1, 1):
        variant = None                                   # Winograd runs 3x3 stride 1 only
    y = ops.conv2d(x, w, b, strides, padding, dilation, "relu", backend=backend, variant=variant)
    assert_same_nonfinite(y, y_tf, f"{backend}/{variant} forward")
    # The backward passes take dL/dy with the forward's y (cpp fuses the relu derivative).
    y = np.ascontiguousarray(y_tf)
    dx = ops.conv2d_backward_data(dy, w, shape_x, strides, padding, dilation, backend=backend,
                                  y=y, activation="relu")
    assert_same_nonfinite(dx, dx_tf, f"{backend} backward-data")
    dw, db = ops.conv2d_backward_filter(x, dy, shape_w, strides, padding, dilation,
                                        backend=backend, y=y, activation="relu")
    assert_same_nonfinite(dw, dw_tf, f"{backend} backward-filter dw")
    assert_same_nonfinite(db, db_tf, f"{backend} backward-filter db")


@pytest.mark.parametrize("variant", ["cpu_v3_winograd", None])
def test_winograd_gives_direct_sums_inf_not_nan(variant):
    """One +Inf pixel with positive weights: every output it reaches is +Inf (the issue's
    113 NaN came from Inf − Inf in the input transform), and sigmoid/linear follow."""
    x = np.ones((1, 8, 8, 16), np.float32)
    x[0, 3, 4, 5] = np.inf
    w = np.full((3, 3, 16, 16), 0.01, np.float32)
    for act in ("linear", "relu", "sigmoid"):
        y = ops.conv2d(x, w, None, 1, "same", activation=act, backend="cpp", variant=variant)
        g = conv_geometry(x.shape, w.shape, 1, "same", 1)
        assert_same_nonfinite(y, ref.conv2d_forward(x, w, None, g, act), f"winograd {act}")
        assert np.isinf(y[0, 2:5, 3:6]).all() == (act != "sigmoid")
        assert not np.isnan(y).any()


@pytest.mark.parametrize("backend", ["reference", "numba", "cpp"])
def test_dense_relu_nan_inf_as_tensorflow(backend):
    x = poisoned((6, 40), 5)
    w = poisoned((40, 24), 6, 1, 1, 1)
    b = np.random.default_rng(7).standard_normal(24).astype(np.float32)
    dy = poisoned((6, 24), 8)
    xt, wt, bt = (tf.constant(a) for a in (x, w, b))
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        y_tf = tf.nn.relu(tf.matmul(xt, wt) + bt)
    grads = tape.gradient(y_tf, [xt, wt, bt], output_gradients=tf.constant(dy))
    y = ops.dense(x, w, b, activation="relu", backend=backend)
    assert_same_nonfinite(y, y_tf.numpy(), f"{backend} dense forward")
    got = ops.dense_backward(x, w, dy, np.ascontiguousarray(y_tf.numpy()), "relu", backend=backend)
    for name, a, e in zip(("dx", "dw", "db"), got, grads):
        assert_same_nonfinite(a, e.numpy(), f"{backend} dense {name}")


@pytest.mark.parametrize("backend", ["reference", "numba", "cpp"])
def test_relu_and_its_gradient_elementwise(backend):
    z = np.array([[np.nan], [np.inf], [-np.inf], [-1.0], [0.0], [2.0]], np.float32)
    y = ops.dense(z, np.ones((1, 1), np.float32), activation="relu", backend=backend)  # one row each
    assert_same_nonfinite(y, tf.nn.relu(z).numpy(), f"{backend} relu")
    assert np.isnan(y[0, 0]) and y[1, 0] == np.inf and y[2, 0] == 0
    dy = np.array([[1.0], [1.0], [1.0], [np.nan], [np.inf], [3.0]], np.float32)
    dz = ops.activation_backward(dy, np.ascontiguousarray(tf.nn.relu(z).numpy()), "relu",
                                 backend=backend)
    expected = tf.raw_ops.ReluGrad(gradients=dy, features=tf.nn.relu(z)).numpy()
    assert_same_nonfinite(dz, expected, f"{backend} relu grad")
    assert np.isnan(dz[3, 0]) and np.isnan(dz[4, 0]) and dz[0, 0] == 0


@pytest.mark.parametrize("variant", ["cuda_v1_direct", "cuda_v2_halotile", "cuda_v3_regblock"])
def test_numba_cuda_relu_keeps_nan(variant):
    """The Numba CUDA epilogues (under the simulator here: tiny shapes)."""
    cuda = pytest.importorskip("numba.cuda")
    x = poisoned((1, 5, 5, 3), 9, 1, 1, 1)
    w = np.random.default_rng(10).standard_normal((3, 3, 3, 4)).astype(np.float32)
    g = conv_geometry(x.shape, w.shape, 1, "valid", 1)
    y = ops.conv2d(cuda.to_device(x), cuda.to_device(w), None, activation="relu",
                   variant=variant).copy_to_host()
    y_tf = tf.nn.relu(tf.nn.conv2d(x, w, 1, "VALID")).numpy()
    assert_same_nonfinite(y, y_tf, f"numba cuda {variant}")
    assert_same_nonfinite(y, ref.conv2d_forward(x, w, None, g, "relu"), "reference")
    assert np.isnan(y).any()


@pytest.mark.parametrize("backend", ["numba", "cpp"])
def test_keras_layers_keep_nan_as_stock_keras(backend):
    """A diverging model must look diverged: the dlconv layers' fused relu gives NaN where the
    stock Keras layers do (it gave 0)."""
    keras = pytest.importorskip("keras")
    if keras.config.backend() != "tensorflow":
        pytest.skip(f"this process' Keras backend is {keras.config.backend()}; the layers on the other "
                    "backends are checked against the stock layers in tests/keras_suite")
    import dlconv.layers as dl
    x = poisoned((2, 8, 8, 3), 11, 2, 1, 1)
    conv, stock = dl.Conv2D(16, 3, activation="relu", backend=backend), keras.layers.Conv2D(16, 3, activation="relu")
    stock.build(x.shape)
    conv.build(x.shape)
    conv.set_weights(stock.get_weights())
    assert_same_nonfinite(np.asarray(conv(x)), np.asarray(stock(x)), f"{backend} Conv2D")
    h = x.reshape(2, -1)
    dense, stock_d = dl.Dense(10, activation="relu", backend=backend), keras.layers.Dense(10, activation="relu")
    stock_d.build(h.shape)
    dense.build(h.shape)
    dense.set_weights(stock_d.get_weights())
    y = np.asarray(dense(h))
    assert_same_nonfinite(y, np.asarray(stock_d(h)), f"{backend} Dense")
    assert np.isnan(y).all()
