"""The graph-native TensorFlow dropout (DlconvDropout in csrc/tf_ops.cpp,
dlconv.bridges.tensorflow.dropout, dlconv.layers.Dropout on the TensorFlow Keras backend):
its values are the C++ kernel's (dlconv._C.dropout, bit for bit, for int32 and int64 seeds,
eager and in tf.function with an unknown shape); the gradient is dy * mask / (1 - rate),
exact, and the op is pure (same seed → same mask, another counter → another); dropped NaN / Inf
become 0 as in tf.nn.dropout; bad attrs / seed shapes raise InvalidArgumentError naming them and
the bridge ValueError / TypeError naming the parameter; the layer: training=False is the
identity, each call a new mask, a fit graph holds DlconvDropout and no callback, the stock
layer where promised.  Also the conv backward-filter's ``alone`` attr (set on the input
layer in a fit graph): a threading hint that never changes a value.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from dlconv import _C, tf_ops  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402

CALLBACKS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def _kernel(x, rate, seed, counter):
    """The C++ kernel as the TF op runs it: the op's attr ``rate`` is a float32 (TensorFlow has
    no double attrs), so the kernel sees float32(rate), e.g. 0.9 → 0.89999998 (keep 0.10000002,
    as tf.nn.dropout's float32 1 - rate)."""
    return _C.dropout(np.ascontiguousarray(x), float(np.float32(rate)), seed, counter)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(0,), (1,), (7, 3), (2, 5, 5, 17), (3, 70000)]),
       st.sampled_from([0.01, 0.25, 0.5, 0.9]), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
       st.sampled_from([tf.int32, tf.int64]), st.booleans(), st.booleans())
def test_op_is_the_kernel_and_its_gradient_the_mask(shape, rate, seed, counter, seed_dtype, nonfinite,
                                                    in_function):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if nonfinite and x.size:
        x.flat[rng.integers(0, x.size, max(1, x.size // 10))] = rng.choice([np.nan, np.inf, -np.inf])
    dy = rng.standard_normal(shape).astype(np.float32)
    s = tf.constant([seed, counter], seed_dtype)

    def value_and_grad(t, dyt, st_):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = tf_bridge.dropout(t, rate, st_)
            loss = tf.reduce_sum(y * dyt)
        return y, tape.gradient(loss, t)

    if in_function:
        value_and_grad = tf.function(value_and_grad, input_signature=[
            tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32), tf.TensorSpec((2,), seed_dtype)])
    y, dx = value_and_grad(tf.constant(x), tf.constant(dy), s)
    want = _kernel(x, rate, seed, counter)
    np.testing.assert_array_equal(y.numpy(), want)       # bit for bit, NaN == NaN here
    rate32 = np.float32(rate)
    mask = _C.dropout_mask(x.size, float(rate32), seed, counter).reshape(shape).astype(bool)
    keep = np.float32(1.0 - float(rate32))
    kept = x[mask] / keep
    np.testing.assert_array_equal(want[mask], kept)
    np.testing.assert_array_equal(want[~mask], 0)        # NaN / Inf dropped become 0
    np.testing.assert_array_equal(dx.numpy(), _kernel(dy, rate, seed, counter))
    np.testing.assert_allclose(dx.numpy(), np.where(mask, dy / keep, 0), rtol=0)


def test_same_seed_same_mask_another_counter_another():
    x = tf.ones((64, 64))
    a = tf_bridge.dropout(x, 0.5, (5, 0)).numpy()
    np.testing.assert_array_equal(a, tf_bridge.dropout(x, 0.5, tf.constant([5, 0], tf.int32)).numpy())
    assert (a != tf_bridge.dropout(x, 0.5, (5, 1)).numpy()).any()
    assert (a != tf_bridge.dropout(x, 0.5, (6, 0)).numpy()).any()
    assert abs((a != 0).mean() - 0.5) < 0.05


def test_negative_seeds_are_taken_modulo_2_64():
    """Keras' int64 seed state may hold a negative seed; the kernel reads it as its uint64."""
    x = np.ones(1000, np.float32)
    y = tf_bridge.dropout(x, 0.3, tf.constant([-3, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(y, _kernel(x, 0.3, 2**64 - 3, 2))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rate=0.0), "attr rate must be in (0, 1), got 0"),
    (dict(rate=1.0), "attr rate must be in (0, 1), got 1"),
    (dict(rate=-0.5), "attr rate must be in (0, 1), got -0.5"),
])
def test_bad_rate_attr_raises_invalid_argument(kwargs, needle):
    with pytest.raises(tf.errors.InvalidArgumentError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LIB.dlconv_dropout(tf.ones(4), tf.constant([0, 0], tf.int64), **kwargs)


def test_bad_seed_shape_raises():
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="seed|Dimension|rank"):
        LIB.dlconv_dropout(tf.ones(4), tf.constant([0, 0, 0], tf.int64), rate=0.5)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64)])
    def unknown_seed_shape(s):
        return LIB.dlconv_dropout(tf.ones(4), s, rate=0.5)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"seed must have shape \[2\]"):
        unknown_seed_shape(tf.constant([1, 2, 3], tf.int64))


def test_bridge_refuses_bad_arguments():
    x = tf.ones((3, 3))
    for rate in (0.0, 1.0, -0.5, 2.0, True, "0.5"):
        with pytest.raises(ValueError, match="rate"):
            tf_bridge.dropout(x, rate, (0, 0))
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        tf_bridge.dropout(tf.ones((3, 3), tf.float64), 0.5, (0, 0))
    with pytest.raises(TypeError, match="x must be float32, got int32"):
        tf_bridge.dropout(tf.ones((3, 3), tf.int32), 0.5, (0, 0))
    with pytest.raises(ValueError, match=r"seed must have shape \(2,\).*\(3,\)"):
        tf_bridge.dropout(x, 0.5, tf.constant([1, 2, 3], tf.int64))
    with pytest.raises(TypeError, match="seed must be an int32 or int64 tensor.*float32"):
        tf_bridge.dropout(x, 0.5, tf.constant([1.0, 2.0]))


def test_independent_of_the_thread_count():
    """One mask whatever the OpenMP team: TensorFlow's inter-op threads and a one-thread call
    (below the pool threshold) give the bits the kernel gives."""
    x = np.random.default_rng(2).standard_normal((3, 70001)).astype(np.float32)   # 13 blocks
    want = _kernel(x, 0.4, 11, 4)
    old = tf_ops.threading_knobs(serial_pool_elements=0)          # the OpenMP team
    try:
        np.testing.assert_array_equal(tf_bridge.dropout(x, 0.4, (11, 4)).numpy(), want)
        tf_ops.threading_knobs(serial_pool_elements=1e12)          # one thread
        np.testing.assert_array_equal(tf_bridge.dropout(x, 0.4, (11, 4)).numpy(), want)
    finally:
        tf_ops.threading_knobs(**old)


# ----------------------------------------------------------------------------- the Keras layer
needs_tf_keras = pytest.mark.skipif(keras.config.backend() != "tensorflow",
                                    reason="the Keras backend of this process is not TensorFlow "
                                           "(tests/test_dropout.py covers the layer per backend)")


@needs_tf_keras
def test_layer_runs_the_op_with_the_seed_generator_draw():
    import dlconv.layers as dl
    x = np.random.default_rng(0).standard_normal((16, 6, 6, 8)).astype(np.float32)
    layer = dl.Dropout(0.5, seed=7)
    assert layer.supports_jit is False            # DlconvDropout has no XLA kernel
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    seed0 = keras.ops.convert_to_numpy(dl.Dropout(0.5, seed=7).seed_generator.next())
    y1 = keras.ops.convert_to_numpy(layer(x, training=True))
    y2 = keras.ops.convert_to_numpy(layer(x, training=True))
    s, k = (int(v) % 2**64 for v in seed0)
    np.testing.assert_array_equal(y1, _kernel(x, 0.5, s, k))
    np.testing.assert_array_equal(y2, _kernel(x, 0.5, s, k + 1))         # the counter advanced by 1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(dl.Dropout(0.5, seed=7)(x, training=True)), y1)
    # gradient through the layer: dy * mask / (1 - rate)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = dl.Dropout(0.25, seed=3)(xt, training=True)
    gx = tape.gradient(yt, xt).numpy()
    np.testing.assert_array_equal(gx, np.where(yt.numpy() != 0, np.float32(1) / np.float32(0.75), 0))


@needs_tf_keras
def test_layer_falls_back_to_the_stock_layer_where_promised(monkeypatch):
    import dlconv.layers as dl
    calls = []
    orig = tf_bridge.dropout
    monkeypatch.setattr(tf_bridge, "dropout", lambda *a: calls.append(1) or orig(*a))
    x = np.ones((4, 6, 6, 8), np.float32)
    for ours, stock in [
        (dl.Dropout(0.5, noise_shape=(4, 1, 1, 8), seed=1), keras.layers.Dropout(0.5, noise_shape=(4, 1, 1, 8), seed=1)),
        (dl.Dropout(0.5, seed=1, backend="reference"), keras.layers.Dropout(0.5, seed=1)),
        (dl.Dropout(1.0, seed=1), keras.layers.Dropout(1.0, seed=1)),
    ]:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours(x, training=True)),
                                      keras.ops.convert_to_numpy(stock(x, training=True)))
    d64 = dl.Dropout(0.5, seed=1, dtype="float64")
    d64(x.astype(np.float64), training=True)
    assert not calls
    assert dl.Dropout(0.5, backend="reference").supports_jit is True
    dl.Dropout(0.5, seed=1)(x, training=True)
    assert calls == [1]


def _graph_ops(cf):
    found = []
    for gr in [cf.graph] + list(cf.graph._functions.values()):
        found += (gr.get_operations() if hasattr(gr, "get_operations") else gr.graph.get_operations())
    return found


@needs_tf_keras
def test_fit_graph_holds_dlconv_dropout_and_the_alone_backward_filter():
    """The CNN's train step: DlconvDropout forward and backward, no callback, no stock random
    op for the dropouts; the first conv's backward-filter (its x the model input) carries
    alone=True, the second's alone=False; and alone never changes a number."""
    from dlconv import models
    model = models.compile_model(models.cnn(backend="cpp", seed=0))
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    y = np.arange(8) % 10
    hist = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    step = tf.function(model.train_step)
    cf = step.get_concrete_function((tf.TensorSpec([None, 28, 28, 1]), tf.TensorSpec([None], tf.int64)))
    ops_ = _graph_ops(cf)
    types = [op.type for op in ops_]
    assert types.count("DlconvDropout") == 4, types.count("DlconvDropout")     # 2 layers, fwd + bwd
    assert not set(types) & (CALLBACKS | {"StatelessRandomUniformV2", "RandomUniform"}), sorted(set(types))
    alone = sorted(op.get_attr("alone") for op in ops_
                   if op.type in ("DlconvConv2DBackpropFilter", "DlconvConv2DBackpropFilterFromPool"))
    assert alone == [False, True], alone          # conv2's reads the pool's gradient in place

    rng = np.random.default_rng(4)
    xin = rng.standard_normal((3, 9, 9, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 7, 7, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 6)).astype(np.float32)
    z = LIB.dlconv_conv2d(xin, w, tf.zeros(6), strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1],
                          groups=1, activation="relu")
    outs = [LIB.dlconv_conv2d_backprop_filter(xin, dy, z, kernel_size=[3, 3], strides=[1, 1], pads=[0, 0, 0, 0],
                                              dilations=[1, 1], groups=1, activation="relu", alone=a) for a in (False, True)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@needs_tf_keras
def test_fit_with_dlconv_dropout_follows_the_stock_twin_in_distribution():
    """Other masks than the stock layer's (another random stream), the same training: on the
    same data both CNNs lower the loss by a like amount (the kernels' equality under identical
    masks is tests/test_tf_ops.py's)."""
    from dlconv import models
    rng = np.random.default_rng(1)
    x = rng.random((64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    drops = []
    for stock in (False, True):
        keras.utils.set_random_seed(11)
        m = models.compile_model(models.cnn(backend="cpp", stock=stock, seed=11))
        h = m.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0).history["loss"]
        drops.append(h[0] - h[-1])
    assert drops[0] > 0 and drops[1] > 0, drops
    assert 0.5 < drops[0] / drops[1] < 2.0, drops
