"""dlconv layers inside each framework's own distributed engine, with several worker
processes on loopback: every worker ends with the same parameters, equal to one process
training on the same global batches.  Every wait has a timeout; workers this test started
are killed if they outlive it, and a worker that dies fails the test with its output."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

WORKER_TIMEOUT_S = 240
GLOBAL_BATCH, STEPS = 16, 4


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (bound once and released, so likely free)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(text, lines=25):
    """The last lines of a worker's stderr, without TensorFlow's start-up chatter."""
    keep = [ln for ln in text.splitlines() if not ln.startswith(("I0000", "W0000", "WARNING: All log"))]
    return "\n".join(keep[-lines:])


def run_workers(codes, envs, timeout=WORKER_TIMEOUT_S):
    """Start one Python process per (code, env); wait for all (bounded); return their
    stdouts.  Any worker that fails or times out fails the test with every worker's output;
    all workers still running then are killed."""
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(c)], env=e, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c, e in zip(codes, envs)]
    deadline = time.monotonic() + timeout
    outs = [None] * len(procs)
    try:
        for i, p in enumerate(procs):
            left = max(deadline - time.monotonic(), 1)
            try:
                outs[i] = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                report = "\n---\n".join(_tail(q.communicate()[1]) for q in procs)
                pytest.fail(f"worker {i} did not finish within {timeout} s; stderr tails:\n{report}")
            if p.returncode != 0:
                for q in procs:
                    q.kill()
                report = "\n---\n".join(_tail(q.communicate()[1] if q is not p else outs[i][1])
                                          for q in procs)
                pytest.fail(f"worker {i} exited with {p.returncode}; stderr tails:\n{report}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [o[0] for o in outs]


def data(n=GLOBAL_BATCH * STEPS, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 12, 12, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "KERAS_BACKEND")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0", **kw)
    return env


# ----------------------------------------------------------------------------- TensorFlow
TF_MODEL = """
import json, os, sys
import numpy as np
import keras, tensorflow as tf
import dlconv.layers as dl

def build():
    keras.utils.set_random_seed(7)
    m = keras.Sequential([keras.Input((12, 12, 1)),
                          dl.Conv2D(4, 3, activation="relu", backend="cpp"),
                          keras.layers.Flatten(),
                          dl.Dense(10, activation="softmax", backend="cpp")])
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return m

rng = np.random.default_rng(0)
x = rng.random(({n}, 12, 12, 1), dtype=np.float32)
y = rng.integers(0, 10, {n})
"""


def _tf_worker(index, ports, out):
    cfg = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    code = TF_MODEL.format(n=GLOBAL_BATCH * STEPS) + f"""
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds={WORKER_TIMEOUT_S // 2}))
with strategy.scope():
    m = build()
np.savez({out!r} + ".init.npz", *m.get_weights())
# A custom loop with the strategy's own all-reduce: Keras 3.15's fit/train_on_batch under
# this strategy fail before the first step for the stock layers too (they reduce a PerReplica
# batch, and then per-replica scalars along axis 0, which the collectives refuse).
loss_fn = keras.losses.SparseCategoricalCrossentropy()

@tf.function
def step(xb, yb):
    def replica(xb, yb):
        with tf.GradientTape() as tape:
            # Keras scales a loss computed under a strategy by 1 / replicas itself
            loss = loss_fn(yb, m(xb, training=True))
        return tape.gradient(loss, m.trainable_variables)
    per_replica = strategy.run(replica, (xb, yb))
    for v, g in zip(m.trainable_variables, per_replica):   # all-reduced across the workers
        v.assign_sub(0.1 * strategy.reduce("SUM", g, axis=None))

for s in range({STEPS}):
    rows = slice(s * {GLOBAL_BATCH} + {index}, (s + 1) * {GLOBAL_BATCH}, 2)   # this worker's half
    step(tf.constant(x[rows]), tf.constant(y[rows]))
np.savez({out!r}, *m.get_weights())
print("replicas", strategy.num_replicas_in_sync)
"""
    return code, _env(TF_CONFIG=json.dumps(cfg))


def test_tensorflow_multi_worker_mirrored_two_workers(tmp_path):
    pytest.importorskip("tensorflow")
    ports = free_ports(2)
    outs = [tmp_path / f"w{i}.npz" for i in range(2)]
    jobs = [_tf_worker(i, ports, str(outs[i])) for i in range(2)]
    single = TF_MODEL.format(n=GLOBAL_BATCH * STEPS) + f"""
m = build()
np.savez({str(tmp_path / 'single.npz')!r} + ".init.npz", *m.get_weights())
loss_fn = keras.losses.SparseCategoricalCrossentropy()
for s in range({STEPS}):
    rows = slice(s * {GLOBAL_BATCH}, (s + 1) * {GLOBAL_BATCH})
    with tf.GradientTape() as tape:
        loss = loss_fn(tf.constant(y[rows]), m(tf.constant(x[rows]), training=True))
    for v, g in zip(m.trainable_variables, tape.gradient(loss, m.trainable_variables)):
        v.assign_sub(0.1 * g)
np.savez({str(tmp_path / 'single.npz')!r}, *m.get_weights())
"""
    stdout = run_workers([c for c, _ in jobs] + [single], [e for _, e in jobs] + [_env()])
    assert "replicas 2" in stdout[0] and "replicas 2" in stdout[1], stdout
    w = [np.load(p) for p in outs]
    ref = np.load(tmp_path / "single.npz")
    init = [np.load(str(p) + ".init.npz") for p in outs + [tmp_path / "single.npz"]]
    for k in ref.files:
        np.testing.assert_array_equal(init[0][k], init[2][k], err_msg=f"initial {k} differs")
    init = None
    for k in ref.files:
        np.testing.assert_array_equal(w[0][k], w[1][k], err_msg=f"workers differ in {k}")
        np.testing.assert_allclose(w[0][k], ref[k], rtol=1e-4, atol=1e-5,
                                   err_msg=f"2 workers vs 1 process: {k}")
        init = k
    assert init is not None


def test_a_worker_whose_peer_never_comes_fails_clearly(tmp_path):
    """Worker 0 of a 2-worker cluster whose worker 1 is never started waits for its peer at
    the strategy's start-up; its own watchdog (the way a launcher's health check would) ends
    it, and the harness reports the failure instead of hanging."""
    pytest.importorskip("tensorflow")
    ports = free_ports(2)
    code, env = _tf_worker(0, ports, str(tmp_path / "w0.npz"))
    code = code.replace(f"timeout_seconds={WORKER_TIMEOUT_S // 2}", "timeout_seconds=5")
    code = "import threading, os\nthreading.Timer(20, lambda: os._exit(3)).start()\n" + code
    with pytest.raises(pytest.fail.Exception, match=r"worker 0 (exited with|did not finish)"):
        run_workers([code], [env], timeout=60)
