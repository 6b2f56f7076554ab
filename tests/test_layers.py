"""dlconv.layers against the stock Keras layers: values and gradients, per CPU backend.

Each test builds a dlconv layer and its stock twin, copies the stock weights over with
``set_weights`` and compares outputs (relative 1e-5 of the output's scale) and the
gradients with respect to the input, the kernel and the bias (tf.GradientTape).
The backend parameter covers every backend the registry knows; a backend that cannot run
on this machine's CPU yet is skipped with the registry's reason.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import dlconv.backends  # noqa: E402
from conftest import cpu_backend_params  # noqa: E402
import dlconv.layers as dl  # noqa: E402
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402
from dlconv import runtime  # noqa: E402


BACKENDS = cpu_backend_params()
RTOL = 1e-5


def assert_close(actual, expected, rtol=RTOL, what=""):
    """Relative to the scale of ``expected`` (near-zero elements are judged by that scale)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def twins(kind, input_shape, backend, rng, **kwargs):
    """(dlconv layer, stock layer) built on ``input_shape`` with identical, random weights."""
    ours_cls, stock_cls = {"conv": (dl.Conv2D, keras.layers.Conv2D),
                           "dense": (dl.Dense, keras.layers.Dense)}[kind]
    stock = stock_cls(**kwargs)
    ours = ours_cls(backend=backend, **kwargs)
    stock.build(input_shape)
    ours.build(input_shape)
    # Random weights, including a non-zero bias, so that every term is exercised.
    stock.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5
                       for w in stock.get_weights()])
    ours.set_weights(stock.get_weights())
    return ours, stock


def values_and_grads(layer, x, r):
    """(y, [dL/dx, dL/dkernel, dL/dbias...]) for L = sum(y * r)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * r)
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return y.numpy(), [g.numpy() for g in grads]


def compare(ours, stock, x, rng, what):
    y_stock = stock(tf.constant(x)).numpy()
    r = rng.standard_normal(y_stock.shape).astype(np.float32)
    y1, g1 = values_and_grads(ours, x, r)
    y2, g2 = values_and_grads(stock, x, r)
    assert_close(y1, y2, what=f"{what}: forward")
    names = ["input"] + [w.name for w in stock.trainable_weights]
    assert len(g1) == len(g2) == len(names)
    for name, a, b in zip(names, g1, g2):
        assert_close(a, b, rtol=1e-4, what=f"{what}: gradient w.r.t. {name}")


CONV_GEOMETRIES = [
    # (input NHWC, kwargs)
    ((2, 8, 8, 3), dict(filters=4, kernel_size=3)),
    ((2, 9, 9, 3), dict(filters=5, kernel_size=3, strides=2, padding="same")),
    ((2, 10, 7, 2), dict(filters=3, kernel_size=(3, 2), strides=(2, 1), padding="same")),
    ((1, 11, 10, 3), dict(filters=4, kernel_size=5, strides=3, padding="same")),
    ((2, 12, 12, 2), dict(filters=3, kernel_size=3, dilation_rate=2)),
    ((2, 9, 8, 2), dict(filters=3, kernel_size=3, dilation_rate=(2, 1), padding="same")),
    ((3, 6, 6, 4), dict(filters=2, kernel_size=1)),
    ((2, 7, 7, 3), dict(filters=4, kernel_size=3, use_bias=False, padding="same")),
    ((2, 5, 5, 1), dict(filters=6, kernel_size=5)),                  # kernel = whole image
    ((2, 28, 28, 1), dict(filters=8, kernel_size=3, activation="relu")),  # MNIST conv1
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,kwargs", CONV_GEOMETRIES,
                         ids=[f"{s}-{k}" for s, k in CONV_GEOMETRIES])
def test_conv2d_matches_stock_values_and_gradients(backend, shape, kwargs, rng):
    ours, stock = twins("conv", shape, backend, rng, **kwargs)
    x = rng.standard_normal(shape).astype(np.float32)
    compare(ours, stock, x, rng, f"Conv2D{kwargs} on {shape} [{backend}]")


ACTIVATIONS = [None, "linear", "relu", "sigmoid", "tanh", "gelu", "softmax", "elu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv2d_activations(backend, activation, rng):
    """Fused (linear, relu, sigmoid, tanh) and Keras-applied (gelu, softmax, elu) ones."""
    shape = (2, 7, 6, 3)
    ours, stock = twins("conv", shape, backend, rng, filters=4, kernel_size=3, padding="same",
                        activation=activation)
    x = rng.standard_normal(shape).astype(np.float32)
    compare(ours, stock, x, rng, f"Conv2D activation={activation} [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_channels_first(backend, rng):
    shape = (2, 3, 9, 8)  # NCHW
    ours, stock = twins("conv", shape, backend, rng, filters=4, kernel_size=3, strides=2,
                        padding="same", data_format="channels_first")
    x = rng.standard_normal(shape).astype(np.float32)
    # TensorFlow's CPU conv has no NCHW kernel, so compare with the stock layer on the
    # NHWC transpose (same weights: Keras keeps HWIO in both formats).
    stock_nhwc = keras.layers.Conv2D(filters=4, kernel_size=3, strides=2, padding="same")
    stock_nhwc.build((2, 9, 8, 3))
    stock_nhwc.set_weights(stock.get_weights())
    y = ours(tf.constant(x)).numpy()
    y_ref = stock_nhwc(tf.constant(x.transpose(0, 2, 3, 1))).numpy().transpose(0, 3, 1, 2)
    assert y.shape == ours.compute_output_shape(shape) == (2, 4, 5, 4)
    assert_close(y, y_ref, what="channels_first forward")


DENSE_CASES = [
    ((5, 7), dict(units=3)),
    ((4, 16), dict(units=10, activation="softmax")),
    ((4, 9), dict(units=6, activation="relu", use_bias=False)),
    ((3, 8), dict(units=4, activation="sigmoid")),
    ((3, 8), dict(units=4, activation="tanh")),
    ((3, 8), dict(units=4, activation="gelu")),
    ((2, 3, 6), dict(units=5, activation="relu")),  # rank 3: applied on the last axis
    ((128, 784), dict(units=64, activation="relu")),  # the dense net's first layer
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,kwargs", DENSE_CASES, ids=[f"{s}-{k}" for s, k in DENSE_CASES])
def test_dense_matches_stock_values_and_gradients(backend, shape, kwargs, rng):
    ours, stock = twins("dense", shape, backend, rng, **kwargs)
    x = rng.standard_normal(shape).astype(np.float32)
    compare(ours, stock, x, rng, f"Dense{kwargs} on {shape} [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_mode_equals_eager(backend, rng):
    """The same layer inside tf.function gives the eager values and gradients, and the
    traced output has its static shape."""
    layer, _ = twins("conv", (2, 8, 8, 2), backend, rng, filters=3, kernel_size=3,
                     strides=2, padding="same", activation="tanh")
    x = rng.standard_normal((2, 8, 8, 2)).astype(np.float32)
    r = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    shapes = []

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            shapes.append(tuple(y.shape))
            loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    y_graph, g_graph = step(tf.constant(x))
    y_eager, g_eager = values_and_grads(layer, x, r)
    assert shapes == [(2, 4, 4, 3)]
    assert_close(y_graph.numpy(), y_eager)
    for a, b in zip(g_graph, g_eager):
        assert_close(a.numpy(), b)


def test_unknown_batch_gets_static_shape():
    layer = dl.Conv2D(6, 3, strides=2, padding="same", backend="reference")

    @tf.function(input_signature=[tf.TensorSpec((None, 13, 13, 2), tf.float32)])
    def f(x):
        y = layer(x)
        assert tuple(y.shape) == (None, 7, 7, 6)
        return y

    y = f(tf.zeros((3, 13, 13, 2)))
    assert y.shape == (3, 7, 7, 6)


def test_empty_batch():
    layer = dl.Dense(4, backend="reference")
    y = layer(tf.zeros((0, 3)))
    assert y.shape == (0, 4)


@pytest.mark.parametrize("kwargs", [
    dict(filters=8, kernel_size=3), dict(filters=4, kernel_size=(5, 3), strides=(3, 2), padding="same"),
    dict(filters=2, kernel_size=3, dilation_rate=3), dict(filters=2, kernel_size=2, strides=4),
])
@pytest.mark.parametrize("shape", [(None, 28, 28, 1), (4, 17, 9, 3), (None, None, 12, 2)])
def test_compute_output_shape_matches_stock(kwargs, shape):
    ours = dl.Conv2D(backend="reference", **kwargs)
    stock = keras.layers.Conv2D(**kwargs)
    assert ours.compute_output_shape(shape) == stock.compute_output_shape(shape)


def test_same_weights_names_and_order_as_stock():
    ours, stock = dl.Conv2D(4, 3, backend="reference"), keras.layers.Conv2D(4, 3)
    ours.build((1, 5, 5, 2))
    stock.build((1, 5, 5, 2))
    assert [(w.path.split("/")[-1], w.shape) for w in ours.weights] == \
        [(w.path.split("/")[-1], w.shape) for w in stock.weights] == [("kernel", (3, 3, 2, 4)),
                                                                      ("bias", (4,))]
    d1, d2 = dl.Dense(3, backend="reference"), keras.layers.Dense(3)
    d1.build((2, 5))
    d2.build((2, 5))
    assert [(w.path.split("/")[-1], w.shape) for w in d1.weights] == \
        [(w.path.split("/")[-1], w.shape) for w in d2.weights]


def test_get_config_is_stock_plus_backend():
    ours = dl.Conv2D(4, 3, strides=2, padding="same", activation="relu", backend="reference")
    stock = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")
    c1, c2 = ours.get_config(), stock.get_config()
    assert c1.pop("backend") == "reference"
    c1.pop("name"), c2.pop("name")
    assert c1 == c2
    clone = dl.Conv2D.from_config(ours.get_config())
    assert clone.backend == "reference" and clone.strides == (2, 2)
    d = dl.Dense(7, activation="softmax", backend="reference")
    assert dl.Dense.from_config(d.get_config()).get_config() == d.get_config()
    assert keras.saving.get_registered_name(dl.Conv2D) == "dlconv>Conv2D"
    assert keras.saving.get_registered_name(dl.Dense) == "dlconv>Dense"


def test_layers_refuse_xla():
    """Keras asks every layer's supports_jit (trainer.model_supports_jit): with ours False,
    jit_compile="auto" resolves to False on any machine, and True falls back to False."""
    from keras.src.trainers.trainer import model_supports_jit

    assert dl.Conv2D(2, 3).supports_jit is False
    assert dl.Dense(2).supports_jit is False
    model = keras.Sequential([keras.Input((4,)), dl.Dense(3, backend="reference")])
    stock = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert model_supports_jit(model) is False
    assert model_supports_jit(stock) is True  # the check above is not vacuous
    model.compile(loss="mse")  # jit_compile="auto"
    assert model.jit_compile is False
    with pytest.warns(UserWarning, match="doesn't support `jit_compile=True`"):
        model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is False
    x = np.ones((4, 4), np.float32)
    model.fit(x, x[:, :3], epochs=1, verbose=0)  # runs as a tf.function, without XLA


@pytest.mark.parametrize("make,match", [
    (lambda: dl.Conv2D(4, 3, backend="cuda"), r"backend must be one of .*'cuda'"),
    (lambda: dl.Dense(4, backend=None), r"backend must be one of .*None"),
])
def test_bad_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float64_compute_dtype_refused_when_built():
    layer = dl.Conv2D(4, 3, dtype="float64")
    with pytest.raises(ValueError, match=r"compute dtype 'float64'.*float32.*lose precision"):
        layer.build((1, 8, 8, 1))
    ok = dl.Dense(4, dtype="mixed_float16")  # float16/bfloat16 compute: cast at the edges
    ok.build((1, 8))
    assert ok.kernel.dtype == "float32"


def test_non_float32_input_refused():
    layer = dl.Dense(4, backend="reference", dtype="float32")
    with pytest.raises(TypeError, match=r"inputs must be float32 .*, got int32"):
        layer.call(tf.zeros((2, 3), tf.int32))


def test_unavailable_backend_names_the_reason(monkeypatch):
    def unavailable(name):
        raise dlconv.backends.BackendUnavailable(f"backend {name!r} is switched off for this test")
    monkeypatch.setattr(runtime, "_BACKENDS", {})
    monkeypatch.setattr(dlconv.backends, "get", unavailable)
    layer = dl.Dense(2, backend="cpp")
    with pytest.raises(Exception, match="switched off for this test"):
        layer(tf.ones((1, 3)))


def test_geometry_resolved_once_per_shape(rng):
    runtime.conv_geometry_cached.cache_clear()
    layer = dl.Conv2D(3, 3, padding="same", backend="reference")
    x = tf.constant(rng.standard_normal((2, 6, 6, 1)).astype(np.float32))
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        tape.gradient(loss, layer.trainable_weights)
    info = runtime.conv_geometry_cached.cache_info()
    # 3 forwards + 3 backwards (backward-data and backward-filter each look it up): one resolution
    assert (info.misses, info.hits) == (1, 8)


@pytest.mark.parametrize("other", ["numpy", "openvino"])
def test_keras_backend_without_a_bridge_gives_clear_error(other, monkeypatch):
    """Keras' numpy and openvino backends have no dlconv bridge: Keras' answer to "which
    backend?" is replaced for the duration of the test (the backend is fixed per process)."""
    monkeypatch.setattr(keras.config, "backend", lambda: other)
    for make in (lambda: dl.Conv2D(4, 3), lambda: dl.Dense(4)):
        with pytest.raises(RuntimeError, match=rf"Keras backend '{other}' has no dlconv bridge.*"
                                               rf"jax, tensorflow, torch.*KERAS_BACKEND"):
            make()


def test_import_dlconv_stays_light():
    code = ("import sys, dlconv, dlconv.shapes, dlconv.data; "
            "print(json.dumps(sorted(m for m in ('tensorflow', 'keras', 'numba') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, timeout=120)
    assert json.loads(out.stdout) == [], out.stderr


# ----------------------------------------------------------------------------- DLPack
def test_dlpack_reader_sees_a_tensorflow_capsule():
    """The ctypes DLPack reader used on the GPU path, run on a CPU tensor's capsule."""
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = tf.constant(x)
    cap = tf.experimental.dlpack.to_dlpack(t)
    info = tf_bridge.capsule_info(cap)
    assert info["shape"] == (2, 3, 4)
    assert info["typestr"] == "<f4"
    assert info["device"] == (tf_bridge.KDL_CPU, 0)
    assert info["strides"] is None or info["strides"] == (12, 4, 1)
    view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * 24).from_address(info["ptr"]))
    np.testing.assert_array_equal(view.reshape(2, 3, 4), x)


def test_dlpack_writer_hands_our_buffer_to_tensorflow():
    """The capsule writer used on the GPU path, on host memory: TF takes our buffer without
    a copy, and its deleter releases our reference when TF is done."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4) * 1.5
    cap = tf_bridge.capsule_from_buffer(a, a.ctypes.data, a.shape, tf_bridge.KDL_CPU)
    assert len(tf_bridge._EXPORTED) >= 1
    n_before = len(tf_bridge._EXPORTED)
    t = tf.experimental.dlpack.from_dlpack(cap)
    np.testing.assert_array_equal(t.numpy(), a)
    a[0, 0] = 99.0  # shared memory: TF sees our buffer, no copy was made
    assert float(t.numpy()[0, 0]) == 99.0
    del t, cap
    import gc
    gc.collect()
    assert len(tf_bridge._EXPORTED) == n_before - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_py_function_route_used_on_gpu_machines(backend, monkeypatch, rng):
    """When TensorFlow sees a GPU the callbacks run as tf.py_function (eager tensors in,
    dispatched on where each lives).  Forced on here: host tensors must take its host
    branch and give the stock values and gradients, eagerly and inside tf.function."""
    monkeypatch.setattr(tf_bridge, "tf_sees_gpu", lambda: True)
    ours, stock = twins("conv", (2, 7, 7, 2), backend, rng, filters=3, kernel_size=3,
                        padding="same", activation="sigmoid")
    x = rng.standard_normal((2, 7, 7, 2)).astype(np.float32)
    compare(ours, stock, x, rng, f"py_function route [{backend}]")
    d1, d2 = twins("dense", (3, 5), backend, rng, units=4, activation="softmax")
    xd = rng.standard_normal((3, 5)).astype(np.float32)
    compare(d1, d2, xd, rng, f"py_function route, Dense [{backend}]")
    y_graph = tf.function(lambda t: ours(t))(tf.constant(x))
    assert_close(y_graph.numpy(), stock(tf.constant(x)).numpy())


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_host_tensors_reach_the_kernels_without_a_copy(mode, monkeypatch, rng):
    """The arrays the op API receives are the TensorFlow tensors' own buffers (same
    addresses), eagerly and inside tf.function."""
    import dlconv.ops

    seen = {}
    real = dlconv.ops.conv2d

    def spy(x, w, *args, **kwargs):
        seen["x"], seen["w"] = x.ctypes.data, w.ctypes.data
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(dlconv.ops, "conv2d", spy)
    x = tf.constant(rng.standard_normal((2, 6, 6, 3)).astype(np.float32))
    w = tf.constant(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))

    def f(x, w):
        return tf_bridge.conv2d(x, w, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                                backend="reference")

    y = (tf.function(f) if mode == "graph" else f)(x, w)
    assert y.shape == (2, 4, 4, 4)
    address = {k: tf_bridge.capsule_info(tf.experimental.dlpack.to_dlpack(t))["ptr"]
               for k, t in (("x", x), ("w", w))}
    assert seen == address


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_activation_derivative_runs_inside_the_cpp_backward_kernels(backend, mode, monkeypatch, rng):
    """With the cpp backend on the CPU the conv gradient has no activation-backward op: both
    backward passes receive dL/dy and the layer's output.  Other backends keep the separate
    op.  The gradients equal the stock layer's either way."""
    ok, why = dlconv.backends.get(backend).cpu_status()
    if not ok:
        pytest.skip(f"backend {backend!r} cannot run on the CPU here: {why}")
    from dlconv import ops as dops

    calls = []
    for name in ("activation_backward", "conv2d_backward_data", "conv2d_backward_filter"):
        real = getattr(dops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, k.get("activation")))
            return _real(*a, **k)

        monkeypatch.setattr(dops, name, spy)
    ours, stock = twins("conv", (2, 9, 9, 16), backend, rng, filters=16, kernel_size=3, activation="relu")
    x = rng.standard_normal((2, 9, 9, 16)).astype(np.float32)
    r = rng.standard_normal((2, 7, 7, 16)).astype(np.float32)

    def loss_grads(xt):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = ours(xt)
            loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, [xt] + ours.trainable_weights)

    run = tf.function(loss_grads) if mode == "graph" else loss_grads
    y, grads = run(tf.constant(x))
    y_s, grads_s = values_and_grads(stock, x, r)
    assert_close(y, y_s)
    for g, g_s in zip(grads, grads_s):
        assert_close(g, g_s)
    if backend == "cpp" and tf_bridge.uses_native("cpp"):
        # The graph-native ops (dlconv.tf_ops) never enter the Python op API; their backward ops
        # take dL/dy and y with the activation as an attr (no activation-backward op).
        assert calls == []
        if mode == "graph":
            ops = run.get_concrete_function(tf.TensorSpec(x.shape)).graph.get_operations()
            acts = {op.type: op.get_attr("activation") for op in ops if op.type.startswith("DlconvConv2D")}
            assert acts == {"DlconvConv2D": b"relu", "DlconvConv2DBackpropInput": b"relu",
                            "DlconvConv2DBackpropFilter": b"relu"}
    elif backend == "cpp":
        assert sorted(calls) == [("conv2d_backward_data", "relu"), ("conv2d_backward_filter", "relu")]
    else:
        assert sorted(calls) == [("activation_backward", None), ("conv2d_backward_data", None),
                                 ("conv2d_backward_filter", None)]
