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


# ----------------------------------------------------------------------------- PyTorch
TORCH_WORKER = """
import os, sys
import numpy as np
import torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world, port, kind, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.random(({n}, 12, 12, 1), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, 10, {n}))

if kind == "plain":
    import dlconv.torch as dt

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(7)
            self.w1 = torch.nn.Parameter(torch.randn(3, 3, 1, 4, generator=g) * 0.3)
            self.b1 = torch.nn.Parameter(torch.zeros(4))
            self.w2 = torch.nn.Parameter(torch.randn(400, 10, generator=g) * 0.05)
            self.b2 = torch.nn.Parameter(torch.zeros(10))

        def forward(self, x):
            h = dt.conv2d(x, self.w1, self.b1, activation="relu", backend="cpp")
            return dt.dense(h.reshape(h.shape[0], -1), self.w2, self.b2, backend="cpp")
    model = Net()
    logits = lambda m, xb: m(xb)
else:
    import keras
    import dlconv.layers as dl
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((12, 12, 1)), dl.Conv2D(4, 3, activation="relu", backend="cpp"),
                              keras.layers.Flatten(), dl.Dense(10, backend="cpp")])
    logits = lambda m, xb: m(xb)

if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    net = torch.nn.parallel.DistributedDataParallel(model)
else:
    net = model
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for s in range({steps}):
    rows = slice(s * {gb} + rank, (s + 1) * {gb}, world)     # this rank's share of the global batch
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(logits(net, x[rows]), y[rows])
    loss.backward()                                            # DDP all-reduces (averages) here
    opt.step()
np.savez(out, *[p.detach().numpy() for p in model.parameters()])
if world > 1:
    dist.destroy_process_group()
print("done", rank)
"""


@pytest.mark.parametrize("kind", ["plain", "keras"])
def test_torch_ddp_two_processes_gloo(kind, tmp_path):
    pytest.importorskip("torch")
    code = TORCH_WORKER.format(n=GLOBAL_BATCH * STEPS, steps=STEPS, gb=GLOBAL_BATCH)
    (port,) = free_ports(1)
    env = _env(KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    outs = [tmp_path / f"r{r}.npz" for r in range(2)] + [tmp_path / "single.npz"]
    codes = [f"import sys; sys.argv = ['w', '{r}', '{w}', '{port}', '{kind}', '{o}']\n" + code
             for r, w, o in ((0, 2, outs[0]), (1, 2, outs[1]), (0, 1, outs[2]))]
    run_workers(codes, [env] * 3)
    w0, w1, ref = (np.load(p) for p in outs)
    assert len(ref.files) == 4
    for k in ref.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=f"ranks differ in {k}")
        np.testing.assert_allclose(w0[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=f"DDP vs 1 process: {k}")


# ----------------------------------------------------------------------------- JAX
JAX_WORKER = """
import os, sys
import numpy as np
devices = int(sys.argv[1]); out = sys.argv[2]
import jax, jax.numpy as jnp, keras
import dlconv.layers as dl, dlconv.jax as dj
assert len(jax.devices()) == devices, jax.devices()
rng = np.random.default_rng(0)
x = rng.random(({n}, 12, 12, 1), dtype=np.float32)
y = rng.integers(0, 10, {n})
if devices > 1:
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
keras.utils.set_random_seed(7)
m = keras.Sequential([keras.Input((12, 12, 1)), dl.Conv2D(4, 3, activation="relu", backend="cpp"),
                      keras.layers.Flatten(), dl.Dense(10, activation="softmax", backend="cpp")])
m.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
m.fit(x, y, batch_size={gb}, epochs=1, shuffle=False, verbose=0)
weights = m.get_weights()

# a jitted step with the batch sharded over the devices, through dlconv's custom VJP
w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 1, 4)), jnp.float32)
xs = jnp.asarray(x[:{gb}])
if devices > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    xs = jax.device_put(xs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
loss = lambda w, xb: jnp.sum(dj.conv2d(xb, w, padding="same", activation="tanh", backend="cpp") ** 2)
g = jax.jit(jax.grad(loss))(w, xs)
np.savez(out, *weights, np.asarray(g))
print("done", devices)
"""


def test_jax_data_parallel_over_cpu_devices(tmp_path):
    pytest.importorskip("jax")
    code = JAX_WORKER.format(n=GLOBAL_BATCH * STEPS, gb=GLOBAL_BATCH)
    outs = [tmp_path / "two.npz", tmp_path / "one.npz"]
    envs = [_env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2"),
            _env(KERAS_BACKEND="jax")]
    codes = [f"import sys; sys.argv = ['w', '{d}', '{o}']\n" + code for d, o in ((2, outs[0]), (1, outs[1]))]
    stdout = run_workers(codes, envs)
    assert "done 2" in stdout[0] and "done 1" in stdout[1]
    two, one = np.load(outs[0]), np.load(outs[1])
    assert len(one.files) == 5
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=f"2 devices vs 1: {k}")


def test_a_port_in_use_fails_clearly(tmp_path):
    """The rendezvous port is held by another socket: torch.distributed's store cannot bind it
    and the worker exits non-zero within its timeout; the harness reports it (no hang)."""
    pytest.importorskip("torch")
    code = TORCH_WORKER.format(n=GLOBAL_BATCH * STEPS, steps=STEPS, gb=GLOBAL_BATCH)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        code = f"import sys; sys.argv = ['w', '0', '2', '{port}', 'plain', '{tmp_path / 'r0.npz'}']\n" + code
        with pytest.raises(pytest.fail.Exception, match=r"(?s)worker 0 exited with.*EADDRINUSE"):
            run_workers([code], [_env(OMP_NUM_THREADS="1")], timeout=120)
    finally:
        holder.close()
