"""pytest-benchmark: one MNIST CNN training step (batch 128), dlconv layers vs stock Keras.

The models come from ``dlconv.models`` (its MNIST CNN builder); both are built with the
same seed, so they start from the same weights, and the dlconv model's loss and gradients (inference mode, so dropout does not
differ) are checked against the stock model's before it is timed.  The stock model is
measured with and without XLA; the summary compares against the faster.
"""

import numpy as np
import pytest

from dlconv import bench

from conftest import TRAIN

MODES = [("stock", False), ("stock", True)] + [(b, False) for b in bench.TIMED_BACKENDS]


@pytest.fixture(scope="module")
def env(batch):
    keras = pytest.importorskip("keras")
    tf = pytest.importorskip("tensorflow")
    try:
        build = bench.mnist_cnn_builder()
    except ImportError as exc:
        pytest.skip(f"dlconv.models' MNIST CNN is unavailable: {exc}")
    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    stock = build(stock=True, seed=0)

    def loss_and_grads(model):
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy()(y, model(x, training=False))
        return [np.asarray(loss)] + [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]
    return keras, build, stock, x, y, loss_and_grads(stock), loss_and_grads


@pytest.mark.parametrize("backend,jit", MODES, ids=[f"{b}{'-xla' if j else ''}" for b, j in MODES])
def test_train_step(benchmark, env, backend, jit):
    keras, build, stock, x, y, expected, loss_and_grads = env
    if backend == "stock":
        model = build(stock=True, seed=0)
    else:
        try:
            model = build(backend=backend, stock=False, seed=0)
        except Exception as exc:  # backend not usable here: skip with the reason
            pytest.skip(f"dlconv({backend}) model unavailable: {exc}")
        model.set_weights(stock.get_weights())
        err = bench.max_rel_error(loss_and_grads(model), expected)
        assert err <= bench.TOLERANCE, f"dlconv({backend}) loss/gradients differ from stock: {err:.3g}"
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit)          # the workshop's settings
    benchmark.group = "mnist_cnn train step"
    benchmark.pedantic(model.train_on_batch, args=(x, y), rounds=7, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:
        TRAIN[f"{backend}{' (xla)' if jit else ''}"] = benchmark.stats.stats.median
