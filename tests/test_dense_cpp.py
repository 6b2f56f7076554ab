"""The C++ CPU dense kernels' long-reduction paths (csrc/cpu_dense.cpp, cpu_dense_backward.h) on
generated shapes, against the float64 reference and TensorFlow (values and gradients):

- the K-split forward (K >= 2048 and K >= 8·max(M, N)): x and w read in place, K groups with
  private partials summed in a fixed order; ragged M (row tiles of 5-6), N (masked last vector
  of a 64-column panel), K (a short last 128-row block); every activation; bias on and off;
  one thread (P = 1 group, in a child process) and the default threads;
- the v2_direct backward (K blocks of 64 handed out in grabs of 4 with prefetch): K not a
  multiple of 64 nor of 4 blocks, ragged M and N;
- both bitwise identical run to run (fixed reduction order).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import reference as ref

_C = pytest.importorskip("dlconv._C", reason="dlconv._C is not built (pip install --no-build-isolation -e .)")

ACTS = ("linear", "relu", "sigmoid", "tanh")
CODES = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
RTOL, ATOL = 1e-4, 1e-4
# The K-split path's thresholds (cpu_dense.cpp: K >= 16 * DENSE_KB and K >= 8 * max(M, N)).
KSPLIT_MIN_K = 2048
KSPLIT_K_PER_ROW = 8


def _tol(k):
    """Absolute tolerance for a sum of k products of O(1) terms in float32."""
    return ATOL * max(1.0, np.sqrt(k))


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _data(seed, m, k, n, bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    b = rng.standard_normal(n, dtype=np.float32) if bias else None
    dy = rng.standard_normal((m, n), dtype=np.float32)
    return x, w, b, dy


def _tf_dense(tf, x, w, b, act, dy):
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        z = tf.matmul(xt, wt) + (tf.constant(b) if b is not None else 0.0)
        y = {"linear": tf.identity, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh}[act](z)
        loss = tf.reduce_sum(y * tf.constant(dy))
    dx, dw = tape.gradient(loss, [xt, wt])
    return y.numpy(), dx.numpy(), dw.numpy()


@st.composite
def ksplit_shapes(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 150))
    k = max(KSPLIT_MIN_K, KSPLIT_K_PER_ROW * max(m, n)) + draw(st.integers(0, 700))
    return m, k, n


@settings(max_examples=25, deadline=None)
@given(shape=ksplit_shapes(), act=st.sampled_from(ACTS), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_ksplit_forward_and_backward_match_reference_and_tf(tf, shape, act, bias, seed):
    m, k, n = shape
    x, w, b, dy = _data(seed, m, k, n, bias)
    y = _C.dense_forward(x, w, b, CODES[act])
    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=RTOL, atol=_tol(k))
    ty, tdx, tdw = _tf_dense(tf, x, w, b, act, dy)
    np.testing.assert_allclose(y, ty, rtol=RTOL, atol=_tol(k))
    assert np.array_equal(_C.dense_forward(x, w, b, CODES[act]), y)          # run to run
    dx, dw, db = _C.dense_backward(x, w, dy, y if act != "linear" else None, CODES[act])
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, act)
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(dx, tdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, tdw, rtol=RTOL, atol=_tol(m))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 1500), n=st.integers(1, 150), act=st.sampled_from(ACTS),
       seed=st.integers(0, 2**16))
def test_backward_k_block_grabs_match_reference_and_tf(tf, m, k, n, act, seed):
    """K from 1 to 23 blocks of 64 (grabs of 4 blocks: a short last grab, a ragged last block)."""
    x, w, b, dy = _data(seed, m, k, n, True)
    y = ref.dense_forward(x, w, b, act).astype(np.float32)
    dx, dw, db = _C.dense_backward(x, w, dy, y if act != "linear" else None, CODES[act])
    rdx, rdw, rdb = ref.dense_backward(x, w, dy, y, act)
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=_tol(m))
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=_tol(m))
    # TensorFlow's gradient of the same y (its own forward from x, w, b)
    _, tdx, tdw = _tf_dense(tf, x, w, b, act, dy)
    np.testing.assert_allclose(dx, tdx, rtol=RTOL, atol=_tol(n))
    np.testing.assert_allclose(dw, tdw, rtol=RTOL, atol=_tol(m))
    again = _C.dense_backward(x, w, dy, y if act != "linear" else None, CODES[act])
    assert all(np.array_equal(p, q) for p, q in zip((dx, dw, db), again))


def test_ksplit_forward_on_one_thread():
    """OMP_NUM_THREADS=1: the K-split path runs as one group (no partial sum across groups) and
    matches the reference on the MNIST shape and ragged ones (child process: the OpenMP pool
    size is fixed at the first parallel region)."""
    code = textwrap.dedent("""
        import numpy as np
        import dlconv._C as C
        from dlconv import reference as ref
        assert C.build_info()["threads"] == 1, C.build_info()
        rng = np.random.default_rng(7)
        for (m, k, n) in [(128, 9216, 128), (37, 2111, 130), (5, 4097, 17), (13, 3000, 65)]:
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
            for act, code in (("relu", 1), ("tanh", 3)):
                for b in (None, rng.standard_normal(n, dtype=np.float32)):
                    y = C.dense_forward(x, w, b, code)
                    np.testing.assert_allclose(y, ref.dense_forward(x, w, b, act), rtol=1e-4,
                                               atol=1e-4 * np.sqrt(k))
                    assert np.array_equal(C.dense_forward(x, w, b, code), y)
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
