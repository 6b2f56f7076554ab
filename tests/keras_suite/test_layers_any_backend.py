"""dlconv.layers on the current Keras backend (tensorflow, torch or jax): the same checks on
each — values and gradients equal to the stock layer's over generated geometries, fit,
predict/evaluate, .keras save/load in a fresh process, the workshop models, the CLI, and the
MNIST accuracy.  Started by tests/test_keras_backends.py once per backend (Keras fixes its
backend when first imported); by hand:

    DLCONV_KERAS_SUITE=1 KERAS_BACKEND=torch pytest tests/keras_suite
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from conftest import MNIST_DIR, cpu_backend_params  # noqa: E402  (tests/conftest.py)
from backend_grads import grads  # noqa: E402

import dlconv.layers as dl
from dlconv import models

BACKEND = keras.config.backend()
BACKENDS = cpu_backend_params()
FAST_BACKENDS = [p for p in BACKENDS if p.values[0] != "reference"]
CONV_ACTS = [None, "relu", "sigmoid", "tanh", "gelu"]
DENSE_ACTS = CONV_ACTS + ["softmax"]


def _close(a, b, rtol=1e-5, what=""):
    scale = max(float(np.abs(b).max()), 1e-30) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def _twins(cls_ours, cls_stock, x_shape, **kwargs):
    ours, stock = cls_ours(**kwargs), cls_stock(**{k: v for k, v in kwargs.items() if k != "backend"})
    ours.build(x_shape)
    stock.build(x_shape)
    rng = np.random.default_rng(len(str(kwargs)))
    weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in stock.get_weights()]
    stock.set_weights(weights)
    ours.set_weights(stock.get_weights())
    return ours, stock


def _check_twins(ours, stock, x, rtol=1e-5):
    rng = np.random.default_rng(7)
    y_stock = keras.ops.convert_to_numpy(stock(x))
    dy = rng.standard_normal(y_stock.shape).astype(np.float32)
    y1, gx1, gv1 = grads(ours, x, dy)
    y2, gx2, gv2 = grads(stock, x, dy)
    _close(y1, y2, rtol, "forward")
    _close(gx1, gx2, 10 * rtol, "dL/dx")
    assert len(gv1) == len(gv2)
    for v, a, b in zip(stock.trainable_variables, gv1, gv2):
        _close(a, b, 10 * rtol, f"dL/d{v.path}")


def test_the_layers_run_on_this_backend():
    layer = dl.Conv2D(2, 3, backend="reference")
    assert keras.config.backend() == BACKEND
    y = layer(np.ones((1, 5, 5, 1), np.float32))
    assert tuple(y.shape) == (1, 3, 3, 2)
    assert layer.supports_jit == (BACKEND != "tensorflow")


geometry = st.fixed_dictionaries({
    "size": st.tuples(st.integers(3, 9), st.integers(3, 9)),
    "channels": st.integers(1, 4),
    "filters": st.integers(1, 5),
    "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "step": st.sampled_from([("strides", (1, 1)), ("strides", (2, 1)), ("strides", (2, 3)),
                             ("dilation_rate", (2, 1)), ("dilation_rate", (2, 2))]),
    "padding": st.sampled_from(["valid", "same"]),
    "use_bias": st.booleans(),
    "activation": st.sampled_from(CONV_ACTS),
})


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12)
@given(g=geometry)
def test_conv2d_equals_stock_values_and_gradients(backend, g):
    h, w = g["size"]
    kh, kw = g["kernel"]
    step_name, step = g["step"]
    if g["padding"] == "valid":
        ds = step if step_name == "dilation_rate" else (1, 1)
        if (kh - 1) * ds[0] + 1 > h or (kw - 1) * ds[1] + 1 > w:
            return  # no output: nothing to compare
    x_shape = (2, h, w, g["channels"])
    ours, stock = _twins(dl.Conv2D, keras.layers.Conv2D, x_shape, filters=g["filters"],
                         kernel_size=g["kernel"], padding=g["padding"], use_bias=g["use_bias"],
                         activation=g["activation"], backend=backend, **{step_name: step})
    x = np.random.default_rng(h * w).standard_normal(x_shape).astype(np.float32)
    _check_twins(ours, stock, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", DENSE_ACTS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_equals_stock_values_and_gradients(backend, activation, use_bias):
    ours, stock = _twins(dl.Dense, keras.layers.Dense, (5, 7), units=6, activation=activation,
                         use_bias=use_bias, backend=backend)
    x = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32)
    _check_twins(ours, stock, x)


def test_dense_on_rank3_input_and_channels_first_conv():
    ours, stock = _twins(dl.Dense, keras.layers.Dense, (2, 3, 7), units=4, activation="relu",
                         backend="reference")
    _check_twins(ours, stock, np.random.default_rng(4).standard_normal((2, 3, 7)).astype(np.float32))
    ours, stock = _twins(dl.Conv2D, keras.layers.Conv2D, (2, 3, 6, 5), filters=4, kernel_size=3,
                         padding="same", data_format="channels_first", backend="reference")
    _check_twins(ours, stock, np.random.default_rng(5).standard_normal((2, 3, 6, 5)).astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cnn_predictions_and_gradients_equal_stock(backend):
    ours, stock = models.cnn(backend=backend, seed=3), models.cnn(stock=True, seed=3)
    x = np.random.default_rng(8).random((4, 28, 28, 1)).astype(np.float32)
    _close(ours.predict(x, verbose=0), stock.predict(x, verbose=0), 1e-5, "predict")
    dy = np.random.default_rng(9).standard_normal((4, 10)).astype(np.float32)
    _, gx1, gv1 = grads(ours, x, dy)
    _, gx2, gv2 = grads(stock, x, dy)
    _close(gx1, gx2, 1e-4, "dL/dx")
    for v, a, b in zip(stock.trainable_variables, gv1, gv2):
        _close(a, b, 1e-4, f"dL/d{v.path}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fit_lowers_the_loss_then_evaluate_and_predict(backend):
    rng = np.random.default_rng(0)
    x = rng.random((256, 784)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((784, 10)), axis=1)
    keras.utils.set_random_seed(0)
    model = models.compile_model(models.dense(backend=backend, seed=0))
    before = model.evaluate(x, y, verbose=0)[0]
    hist = model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    after, acc = model.evaluate(x, y, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert after < 0.6 * before, (before, after)
    assert acc > 0.5
    p = model.predict(x[:5], verbose=0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_fit_follows_the_stock_twin(monkeypatch):
    """Same seed, same data, no shuffling: the dlconv CNN's losses are the stock twin's.  On
    torch dlconv.layers.Dropout draws its masks from another random stream than the stock
    layer's (its C++ kernel, docs/layers.md), so here it is sent to the stock draw: the
    comparison is of the conv, dense and pool kernels, under identical masks."""
    import dlconv.layers as dl
    monkeypatch.setattr(dl.Dropout, "_use_dlconv", lambda self, inputs, training: False)
    rng = np.random.default_rng(1)
    x = rng.random((64, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    losses = []
    for stock in (False, True):
        keras.utils.set_random_seed(11)
        m = models.compile_model(models.cnn(backend="auto", stock=stock, seed=11))
        losses.append(m.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def _python(code, timeout=300):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=dict(os.environ, KERAS_BACKEND=BACKEND))
    assert out.returncode == 0, f"subprocess failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return out.stdout


def test_keras_file_round_trip_in_a_fresh_process(tmp_path):
    model = models.compile_model(models.cnn(backend="auto", seed=2))
    x = np.random.default_rng(2).random((4, 28, 28, 1)).astype(np.float32)
    model.fit(x, np.arange(4), epochs=1, verbose=0)
    path = tmp_path / "cnn.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    expected = model.predict(x, verbose=0)
    out = _python(f"""
        import numpy as np, keras
        import dlconv.layers
        m = keras.models.load_model({str(path)!r})
        print(keras.config.backend(), sorted({{type(l).__module__ + '.' + type(l).__name__ + ':' + l.backend
                                               for l in m.layers if hasattr(l, 'backend')}}))
        np.save({str(tmp_path / 'p.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))
    """)
    assert (f"{BACKEND} ['dlconv.layers.Conv2D:auto', 'dlconv.layers.Dense:auto', "
            f"'dlconv.layers.Dropout:auto', 'dlconv.layers.MaxPooling2D:auto']") in out
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-6, atol=1e-7)


def test_dlconv_train_cli_on_this_backend():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the real MNIST test set is not at {MNIST_DIR}")
    out = subprocess.run([sys.executable, "-m", "dlconv", "train", "--keras-backend", BACKEND,
                          "--model", "dense", "--epochs", "2", "--limit", "2000", "--quiet",
                          "--data", str(MNIST_DIR), "--backend", "auto"],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Keras backend: {BACKEND}" in out.stdout
    assert "test accuracy" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto"])
def test_cnn_accuracy_on_real_mnist(backend):
    """2 epochs of the CNN on the first 8,000 MNIST test images: >= 96% on the last 2,000,
    within 1 point of the stock twin trained with the same seed on the same backend."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the real MNIST test set is not at {MNIST_DIR}")
    from dlconv import data
    from dlconv.train import train_model
    split = data.training_split(data.load_mnist(MNIST_DIR))[:4]
    ours = train_model("cnn", *split, backend=backend, epochs=2, seed=0).test_accuracy
    stock = train_model("cnn", *split, stock=True, epochs=2, seed=0).test_accuracy
    assert ours >= 0.96, (ours, stock)
    assert abs(ours - stock) <= 0.01, (ours, stock)


# ----------------------------------------------------------------------------- drop-in
@pytest.mark.parametrize("groups,channels,filters", [(2, 4, 6), (3, 3, 3), (4, 8, 4)])
def test_grouped_conv_equals_stock(groups, channels, filters):
    """groups = G: G convolutions through the kernels; (3, 3, 3) is depthwise (G = C)."""
    ours, stock = _twins(dl.Conv2D, keras.layers.Conv2D, (2, 7, 6, channels), filters=filters,
                         kernel_size=3, strides=(2, 1), padding="same", groups=groups,
                         activation="relu", backend="auto")
    assert ours.kernel.shape == (3, 3, channels // groups, filters)
    _check_twins(ours, stock, np.random.default_rng(6).standard_normal((2, 7, 6, channels)).astype(np.float32))


@pytest.mark.parametrize("make", ["conv", "dense"])
def test_lora_equals_stock(make):
    if make == "conv":
        ours, stock = _twins(dl.Conv2D, keras.layers.Conv2D, (2, 6, 6, 3), filters=4, kernel_size=3,
                             backend="auto")
        x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
    else:
        ours, stock = _twins(dl.Dense, keras.layers.Dense, (3, 5), units=4, backend="auto")
        x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    for layer in (ours, stock):
        layer.enable_lora(2)
    rng = np.random.default_rng(2)
    for a, b in zip(ours.weights, stock.weights):   # LoRA's B starts at zero: make it count
        value = rng.standard_normal(b.shape).astype(np.float32) * 0.3
        a.assign(value)
        b.assign(value)
    assert [w.path.split("/")[-1] for w in ours.trainable_weights] == \
        [w.path.split("/")[-1] for w in stock.trainable_weights]
    _check_twins(ours, stock, x)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_returns_the_compute_dtype(policy):
    ours, stock = _twins(dl.Conv2D, keras.layers.Conv2D, (2, 6, 6, 3), filters=4, kernel_size=3,
                         activation="relu", dtype=policy, backend="auto")
    x = np.random.default_rng(3).standard_normal((2, 6, 6, 3)).astype(np.float32)
    y1, y2 = ours(x), stock(x)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y1.dtype) == compute == \
        keras.backend.standardize_dtype(y2.dtype)
    a = keras.ops.convert_to_numpy(keras.ops.cast(y1, "float32"))
    b = keras.ops.convert_to_numpy(keras.ops.cast(y2, "float32"))
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * float(np.abs(b).max()))


def test_activation_set_to_none_after_construction_is_linear():
    ours, stock = _twins(dl.Dense, keras.layers.Dense, (3, 5), units=4, activation="relu",
                         backend="auto")
    ours.activation = stock.activation = None
    x = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32)
    _check_twins(ours, stock, x)
    assert (keras.ops.convert_to_numpy(ours(x)) < 0).any()
