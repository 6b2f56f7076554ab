"""Dropout (issue 10): the C++ kernel (csrc/cpu_dropout.cpp), the torch bridge's
``dlconv::dropout`` op, and dlconv.layers.Dropout on the torch Keras backend (and on TensorFlow,
its DlconvDropout op), each Keras backend in its own process (this file run as a script,
below), as tests/test_keras_backends.py does for tests/keras_suite.

Checked: the kept fraction within a binomial tolerance (6 sigma) for several rates and sizes;
kept values exactly x / float32(1 - rate), dropped ones 0 (NaN / Inf included, as
tf.nn.dropout); the gradient dy * mask / (1 - rate) (exact) and torch.autograd.gradcheck; the
mask independent of the OpenMP thread count; same (seed, counter) → same mask, another counter
→ another; torch.library.opcheck; bad rate / dtype / seed errors naming the parameter; the
layer: training=False identity, a fixed seed reproducible and each call a new mask, get_config
and .keras round trips, the stock layer where promised; on TensorFlow the same mask as on torch
(DlconvDropout, the same kernel: tests/test_tf_dropout.py for the op).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="the dropout op is the torch bridge's (pip install dlconv[torch])")
import dlconv._C as C  # noqa: E402
from dlconv.bridges import torch as tb  # noqa: E402


def _seed(s, k):
    return torch.tensor([s, k], dtype=torch.int64)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("rate", [0.01, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n", [1000, 65537, 1 << 20])
def test_kept_fraction_is_binomial(rate, n):
    for counter in range(3):
        kept = int(C.dropout_mask(n, rate, 1234, counter).sum())
        mean, sd = n * (1 - rate), np.sqrt(n * rate * (1 - rate))
        assert abs(kept - mean) <= 6 * sd + 1, (kept, mean, sd)


def test_mask_bits_are_unbiased_across_positions():
    # every position of a 64-element row (a vector's lanes) is kept about as often
    m = C.dropout_mask(64 * 20000, 0.5, 7, 0).reshape(20000, 64).mean(axis=0)
    assert np.all(np.abs(m - 0.5) < 6 * np.sqrt(0.25 / 20000))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4), rate=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**63 - 1), counter=st.integers(0, 2**31), nonfinite=st.booleans())
def test_kernel_values(shape, rate, seed, counter, nonfinite):
    rng = np.random.default_rng(counter)
    x = rng.standard_normal(shape).astype(np.float32)
    if nonfinite:
        x.flat[:: 3] = np.nan
        x.flat[1:: 5] = np.inf
    y = C.dropout(x, rate, seed, counter)
    mask = C.dropout_mask(x.size, rate, seed, counter).reshape(shape).astype(bool)
    expected = np.where(mask, x / np.float32(1 - rate), np.float32(0))
    np.testing.assert_array_equal(y, expected)          # NaN == NaN for assert_array_equal
    assert not np.isnan(y[~mask]).any()                  # a dropped NaN is 0, as in TF
    y2 = x.copy()
    C.dropout(y2, rate, seed, counter, y2)               # in place
    np.testing.assert_array_equal(y2, expected)


def test_same_seed_same_mask_new_counter_new_mask():
    a, b = C.dropout_mask(5000, 0.5, 9, 3), C.dropout_mask(5000, 0.5, 9, 3)
    np.testing.assert_array_equal(a, b)
    for other in (C.dropout_mask(5000, 0.5, 9, 4), C.dropout_mask(5000, 0.5, 10, 3)):
        agree = (a == other).mean()
        assert 0.45 < agree < 0.55                        # independent masks agree half the time


THREADS_SCRIPT = """
import sys, numpy as np, dlconv._C as C
x = np.random.default_rng(0).standard_normal(3 * 16384 + 77).astype(np.float32)
y = C.dropout(x, 0.3, 42, 5)
np.save(sys.argv[1], y)
"""


def test_independent_of_the_thread_count(tmp_path):
    outs = []
    for threads in ("1", "2", "5"):
        path = tmp_path / f"y{threads}.npy"
        env = dict(os.environ, OMP_NUM_THREADS=threads, DLCONV_THREADS=threads)
        subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(path)], check=True, env=env, timeout=300)
        outs.append(np.load(path))
    for y in outs[1:]:
        np.testing.assert_array_equal(outs[0], y)


def test_kernel_bad_inputs():
    x = np.ones((3, 4), np.float32)
    for rate in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            C.dropout(x, rate, 0, 0)
    with pytest.raises(TypeError, match="x must be float32"):
        C.dropout(x.astype(np.float64), 0.5, 0, 0)
    with pytest.raises(ValueError, match="y has shape"):
        C.dropout(x, 0.5, 0, 0, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.dropout(np.ones((4, 4), np.float32)[:, :2], 0.5, 0, 0)


# ----------------------------------------------------------------------------- the torch op
@pytest.mark.parametrize("shape", [(128, 12, 12, 64), (128, 128), (7,), (3, 5, 1)])
@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_torch_op_values_and_gradient(shape, rate):
    x = torch.randn(shape, requires_grad=True)
    seed = _seed(3, 11)
    y = tb.dropout(x, rate, seed)
    mask = torch.from_numpy(C.dropout_mask(x.numel(), rate, 3, 11).reshape(shape).astype(bool))
    keep = torch.tensor(1 - rate, dtype=torch.float32)
    assert torch.equal(y.detach(), torch.where(mask, x.detach() / keep, torch.zeros(())))
    dy = torch.randn(shape)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(gx, torch.where(mask, dy / keep, torch.zeros(())))
    # through the dispatcher (no eager fast path) the same numbers
    y2 = torch.ops.dlconv.dropout(x.detach(), rate, seed)
    assert torch.equal(y2, y.detach())


def test_torch_gradcheck():
    # gradcheck in float64 is not possible (float32 kernel): a float32 numeric check instead
    x = torch.randn(4, 9, requires_grad=True)
    seed = _seed(1, 2)
    f = lambda t: tb.dropout(t, 0.4, seed).sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x)
    eps = 1e-2
    for i in range(4):
        for j in range(9):
            e = torch.zeros_like(x)
            e[i, j] = eps
            num = (f(x.detach() + e) - f(x.detach() - e)) / (2 * eps)
            assert abs(num.item() - g[i, j].item()) < 1e-3


def test_torch_opcheck():
    x = torch.randn(6, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.dlconv.dropout.default, (x, 0.5, _seed(5, 6)))


def test_torch_compile_traces_through():
    x = torch.randn(8, 8)
    f = torch.compile(lambda t, s: tb.dropout(t, 0.5, s) * 2, backend="eager", fullgraph=True)
    assert torch.equal(f(x, _seed(1, 1)), tb.dropout(x, 0.5, _seed(1, 1)) * 2)


def test_torch_op_bad_inputs():
    x = torch.ones(3, 3)
    assert tb.dropout(x, 0.0, _seed(0, 0)) is x
    for rate in (1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="rate"):
            tb.dropout(x, rate, _seed(0, 0))
    with pytest.raises(TypeError, match="rate"):
        tb.dropout(x, "0.5", _seed(0, 0))
    with pytest.raises(TypeError, match="x"):
        tb.dropout(x.double(), 0.5, _seed(0, 0))
    with pytest.raises(ValueError, match="seed"):
        tb.dropout(x, 0.5, torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- the Keras layer
def _layer_checks_torch():
    import keras
    import dlconv.layers as dl
    x = np.random.default_rng(0).standard_normal((16, 6, 6, 8)).astype(np.float32)
    layer = dl.Dropout(0.5, seed=7)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    y1 = keras.ops.convert_to_numpy(layer(x, training=True))
    y2 = keras.ops.convert_to_numpy(layer(x, training=True))
    assert not np.array_equal(y1 == 0, y2 == 0), "each call draws a new mask"
    kept = y1 != 0
    np.testing.assert_array_equal(y1[kept], x[kept] / np.float32(0.5))
    assert abs(kept.mean() - 0.5) < 0.05
    again = dl.Dropout(0.5, seed=7)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x, training=True)), y1)  # reproducible
    # the op is what ran: its mask for the layer's first (seed, counter)
    y_op = keras.ops.convert_to_numpy(tb.dropout(torch.from_numpy(x), 0.5,
                                                 dl.Dropout(0.5, seed=7).seed_generator.next()))
    np.testing.assert_array_equal(y1, y_op)
    # gradient through the layer: dy * mask / (1 - rate)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = dl.Dropout(0.25, seed=3)(xt, training=True)
    (gx,) = torch.autograd.grad(yt, xt, torch.ones_like(yt))
    assert torch.equal(gx, torch.where(yt.detach() != 0, torch.tensor(1 / np.float32(0.75)), torch.zeros(())))
    # config and .keras round trip
    cfg = dl.Dropout(0.3, seed=5, backend="cpp", name="d").get_config()
    assert cfg["backend"] == "cpp" and cfg["rate"] == 0.3 and cfg["seed"] == 5
    clone = dl.Dropout.from_config(cfg)
    assert type(clone) is dl.Dropout and clone.get_config() == cfg
    import tempfile
    model = keras.Sequential([keras.Input((6, 6, 8)), dl.Dropout(0.5, seed=1)])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    assert type(loaded.layers[0]) is dl.Dropout and loaded.layers[0].get_config() == model.layers[0].get_config()
    # the stock layer where promised: noise_shape, another dtype, rate 1
    calls = []
    orig = tb.dropout
    tb.dropout = lambda *a: calls.append(1) or orig(*a)
    try:
        dl.Dropout(0.5, noise_shape=(16, 1, 1, 8), seed=1)(x, training=True)
        dl.Dropout(0.5, seed=1, dtype="float64")(x.astype(np.float64), training=True)
        y = dl.Dropout(1.0)(x, training=True)
        assert not calls
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(y), 0)
        dl.Dropout(0.5, seed=1)(x, training=True)
        assert calls == [1]
    finally:
        tb.dropout = orig
    with pytest.raises(ValueError, match="rate"):
        dl.Dropout(1.5)
    with pytest.raises(ValueError, match="backend"):
        dl.Dropout(0.5, backend="nope")


def _layer_checks_tensorflow():
    """The TF layer runs DlconvDropout (tests/test_tf_dropout.py): the same C++ mask as the
    torch layer's for the same seed — one dropout across the two backends."""
    import keras
    import dlconv.layers as dl
    x = np.random.default_rng(0).standard_normal((16, 6, 6, 8)).astype(np.float32)
    y = keras.ops.convert_to_numpy(dl.Dropout(0.5, seed=7)(x, training=True))
    s, k = (int(v) for v in keras.ops.convert_to_numpy(dl.Dropout(0.5, seed=7).seed_generator.next()))
    np.testing.assert_array_equal(y, C.dropout(x, 0.5, s, k))
    y_torch = tb.dropout(torch.from_numpy(x), 0.5, _seed(s, k)).numpy()
    np.testing.assert_array_equal(y, y_torch)


@pytest.mark.parametrize("keras_backend", ["torch", "tensorflow"])
def test_keras_layer(keras_backend):
    env = dict(os.environ, KERAS_BACKEND=keras_backend)
    out = subprocess.run([sys.executable, __file__, keras_backend], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "dropout layer checks passed" in out.stdout, out.stdout + out.stderr[-4000:]


if __name__ == "__main__":
    {"torch": _layer_checks_torch, "tensorflow": _layer_checks_tensorflow}[sys.argv[1]]()
    print("dropout layer checks passed")
