"""dlconv.models: parameter counts, twins, fit/evaluate/predict, saving, MirroredStrategy,
and the accuracy check on real MNIST (slow)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import cpu_backend_params  # noqa: E402
import dlconv.layers as dl  # noqa: E402
from dlconv import models, shapes  # noqa: E402


BACKENDS = cpu_backend_params()
FAST_BACKENDS = [p for p in BACKENDS if p.values[0] != "reference"]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run_python(code, timeout=300):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"subprocess failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return out.stdout


# ----------------------------------------------------------------------------- structure
def test_parameter_counts():
    assert models.PARAM_COUNTS == {"dense": 55_050, "wide": 669_706, "deep": 669_816,
                                   "cnn": 1_199_882}
    by_formula = {
        "dense": shapes.dense_param_count(784, 64) + shapes.dense_param_count(64, 64)
        + shapes.dense_param_count(64, 10),
        "wide": shapes.dense_param_count(784, 512) + shapes.dense_param_count(512, 512)
        + shapes.dense_param_count(512, 10),
        "deep": shapes.dense_param_count(784, 512) + shapes.dense_param_count(512, 512)
        + shapes.dense_param_count(512, 10) + shapes.dense_param_count(10, 10),
        "cnn": shapes.conv_param_count(3, 1, 32) + shapes.conv_param_count(3, 32, 64)
        + shapes.dense_param_count(12 * 12 * 64, 128) + shapes.dense_param_count(128, 10),
    }
    for name in models.MODELS:
        ours = models.build(name, backend="reference", seed=1)
        stock = models.build(name, stock=True, seed=1)
        assert ours.count_params() == stock.count_params() == models.PARAM_COUNTS[name] \
            == by_formula[name], name


def test_cnn_layout():
    m = models.cnn(backend="reference")
    kinds = [type(layer) for layer in m.layers]
    assert kinds == [dl.Conv2D, dl.Conv2D, dl.MaxPooling2D, dl.Dropout,
                     keras.layers.Flatten, dl.Dense, dl.Dropout, dl.Dense]
    assert [layer.output.shape for layer in m.layers] == [
        (None, 26, 26, 32), (None, 24, 24, 64), (None, 12, 12, 64), (None, 12, 12, 64),
        (None, 9216), (None, 128), (None, 128), (None, 10)]
    assert [layer.rate for layer in m.layers if isinstance(layer, keras.layers.Dropout)] == [0.25, 0.5]
    assert all(layer.backend == "reference" for layer in m.layers if hasattr(layer, "backend"))
    stock = models.cnn(stock=True)
    assert not any(isinstance(layer, (dl.Conv2D, dl.Dense, dl.Dropout)) for layer in stock.layers)


def test_same_seed_same_initial_weights():
    for name in models.MODELS:
        a = models.build(name, backend="reference", seed=7).get_weights()
        b = models.build(name, stock=True, seed=7).get_weights()
        c = models.build(name, stock=True, seed=8).get_weights()
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
        assert not np.array_equal(a[0], c[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of .* got 'resnet'"):
        models.build("resnet")
    with pytest.raises(ValueError, match="backend must be one of .* got 'fast'"):
        models.cnn(backend="fast")
    with pytest.raises(TypeError, match="seed must be an int or None, got '3'"):
        models.dense(seed="3")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 28, 28\), got \(3, 784\)"):
        models.prepare_images(np.zeros((3, 784), np.uint8), "dense")
    x = models.prepare_images(np.full((2, 28, 28), 255, np.uint8), "cnn")
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32 and x.max() == 1.0


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("backend", BACKENDS)
def test_cnn_predictions_equal_stock(backend, rng):
    ours = models.cnn(backend=backend, seed=3)
    stock = models.cnn(stock=True, seed=3)
    x = rng.random((8, 28, 28, 1)).astype(np.float32)
    p1 = ours.predict(x, verbose=0)
    p2 = stock.predict(x, verbose=0)
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cnn_train_step_gradients_equal_stock(backend, rng):
    """One loss gradient through the whole CNN (dropout off) equals the stock twin's."""
    ours = models.cnn(backend=backend, seed=5)
    stock = models.cnn(stock=True, seed=5)
    x = tf.constant(rng.random((4, 28, 28, 1)).astype(np.float32))
    y = tf.constant([1, 7, 3, 0])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    grads = []
    for m in (ours, stock):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, m(x, training=False))
        grads.append(tape.gradient(loss, m.trainable_weights))
    for w, a, b in zip(stock.trainable_weights, *grads):
        a, b = a.numpy(), b.numpy()
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=w.path)


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_lowers_the_loss(backend, run_eagerly, rng):
    """model.fit with default compile arguments (jit_compile="auto"), in graph mode (the
    train step is a tf.function) and eagerly; then evaluate and predict."""
    x = rng.random((256, 784)).astype(np.float32)
    w = rng.standard_normal((784, 10))
    y = np.argmax(x @ w, axis=1)
    keras.utils.set_random_seed(0)
    model = models.dense(backend=backend, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], run_eagerly=run_eagerly)
    assert model.jit_compile is False
    before = model.evaluate(x, y, verbose=0)[0]
    hist = model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    after, acc = model.evaluate(x, y, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    assert after < 0.6 * before  # the stock twin: 2.07 -> 0.79
    assert acc > 0.5
    p = model.predict(x[:5], verbose=0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_fit_matches_stock_trajectory(rng):
    """Same seed, same data, no shuffling: the dlconv model follows the stock twin's losses."""
    x = rng.random((128, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    losses = []
    for stock in (False, True):
        keras.utils.set_random_seed(11)
        m = models.compile_model(models.cnn(backend="reference", stock=stock, seed=11))
        losses.append(m.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_train_step_runs_every_pass_on_our_kernels_once(monkeypatch, rng):
    """One fit step of the CNN calls each dlconv op once per layer, and TensorFlow prunes
    the first conv's backward-data (its input is the data: no gradient is needed)."""
    import collections

    import dlconv.ops

    calls = collections.Counter()
    for name in ("conv2d", "conv2d_backward_data", "conv2d_backward_filter",
                 "activation_backward", "dense", "dense_backward"):
        def counted(*args, _f=getattr(dlconv.ops, name), _name=name, **kwargs):
            calls[_name, tuple(args[0].shape)] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(dlconv.ops, name, counted)
    x = rng.random((8, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    model = models.compile_model(models.cnn(backend="reference", seed=0))
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # traces the train step
    calls.clear()
    model.train_on_batch(x, y)
    assert dict(calls) == {
        ("conv2d", (8, 28, 28, 1)): 1, ("conv2d", (8, 26, 26, 32)): 1,
        ("activation_backward", (8, 26, 26, 32)): 1, ("activation_backward", (8, 24, 24, 64)): 1,
        ("conv2d_backward_filter", (8, 28, 28, 1)): 1, ("conv2d_backward_filter", (8, 26, 26, 32)): 1,
        ("conv2d_backward_data", (8, 24, 24, 64)): 1,  # conv2's only: conv1's is pruned
        ("dense", (8, 9216)): 1, ("dense", (8, 128)): 1,
        ("dense_backward", (8, 9216)): 1, ("dense_backward", (8, 128)): 1,
    }


# ----------------------------------------------------------------------------- saving
def test_keras_file_round_trip_in_a_fresh_process(tmp_path, rng):
    model = models.cnn(backend="reference", seed=2)
    models.compile_model(model)
    x = rng.random((4, 28, 28, 1)).astype(np.float32)
    model.fit(x, np.arange(4), epochs=1, verbose=0)  # weights and optimizer state not initial
    path = tmp_path / "cnn.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    expected = model.predict(x, verbose=0)
    out = _run_python(f"""
        import numpy as np, keras
        import dlconv.layers
        m = keras.models.load_model({str(path)!r})
        print(sorted({{type(l).__module__ + '.' + type(l).__name__ + ':' + getattr(l, 'backend', '-')
                       for l in m.layers if hasattr(l, 'backend')}}))
        np.save({str(tmp_path / 'p.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))
    """)
    assert ("['dlconv.layers.Conv2D:reference', 'dlconv.layers.Dense:reference', "
            "'dlconv.layers.Dropout:reference', 'dlconv.layers.MaxPooling2D:reference']") in out
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)


# ----------------------------------------------------------------------------- distribute
def test_mirrored_strategy_two_cpu_replicas():
    """fit under tf.distribute.MirroredStrategy over two logical CPU devices, in a fresh
    process (logical devices must be configured before TensorFlow initialises them).
    The dlconv model and its stock twin, trained the same way, end with the same weights."""
    out = _run_python("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        import keras
        from dlconv import models
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        x = rng.random((64, 784)).astype(np.float32)
        y = rng.integers(0, 10, 64)
        weights, losses = [], []
        for stock in (False, True):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                m = models.compile_model(models.dense(backend="reference", stock=stock, seed=0))
            h = m.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
            losses.append(h.history["loss"])
            weights.append(m.get_weights())
        print("replicas", strategy.num_replicas_in_sync)
        print("losses", losses[0], losses[1])
        assert losses[0][-1] < losses[0][0]
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
        for a, b in zip(*weights):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        print("OK")
    """)
    assert "replicas 2" in out and out.strip().endswith("OK")


# ----------------------------------------------------------------------------- accuracy
@pytest.fixture(scope="module")
def workshop_split(mnist_dir):
    from dlconv import data
    x_tr, y_tr, x_te, y_te, _ = data.training_split(data.load_mnist(mnist_dir))
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def stock_cnn_accuracy(workshop_split):
    from dlconv.train import train_model
    return train_model("cnn", *workshop_split, stock=True, epochs=2, seed=0).test_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_cnn_accuracy_on_real_mnist(backend, workshop_split, stock_cnn_accuracy):
    """The CNN, 2 epochs on the first 8,000 images of the MNIST test set, scores >= 96% on
    the last 2,000 and within 1 point of the stock twin trained with the same seed."""
    from dlconv.train import train_model
    acc = train_model("cnn", *workshop_split, backend=backend, epochs=2, seed=0).test_accuracy
    assert acc >= 0.96, (backend, acc, stock_cnn_accuracy)
    assert abs(acc - stock_cnn_accuracy) <= 0.01, (backend, acc, stock_cnn_accuracy)


@pytest.mark.slow
def test_reference_backend_accuracy_dense_model(workshop_split):
    """The reference backend is slow NumPy (float64 inside): a CNN epoch with it takes
    minutes on two cores, so it is judged on the dense 784-64-64-10 model instead (same
    data, 3 epochs: a few seconds), against the stock twin with the same seed."""
    from dlconv.train import train_model
    ours = train_model("dense", *workshop_split, backend="reference", epochs=3, seed=0)
    stock = train_model("dense", *workshop_split, stock=True, epochs=3, seed=0)
    assert ours.test_accuracy >= 0.93, ours.test_accuracy
    assert abs(ours.test_accuracy - stock.test_accuracy) <= 0.01, (ours.test_accuracy,
                                                                   stock.test_accuracy)
