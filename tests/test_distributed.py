"""dlconv layers inside each framework's own distributed engine, with several worker
processes on loopback: the MNIST CNN (dlconv.models.cnn, or the same net on dlconv.torch's
ops), dropout included, trains a few tiny steps and every worker ends with the same
parameters, equal to one process training on the same global batches.  Every wait has a
timeout; workers this test started are killed if they outlive it, and a worker that dies
fails the test with its output."""

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
# The MNIST CNN (dlconv.models.cnn) on tiny batches, a few steps: each test stays well under a
# minute on a loaded 2-core machine (the time goes into starting the frameworks, not the steps).
GLOBAL_BATCH, STEPS = 8, 2
RANKS = 2

# Keras Dropout draws its masks from a per-layer SeedGenerator (state [seed, counter]).  Each
# rank reseeds its dropout layers with seeds of its own, so the ranks draw different masks (as
# a real multi-worker run does) that a single process can reproduce: it runs each rank's half
# of the global batch with that rank's generator states and averages the two gradients, which
# is what the all-reduce gives the workers.  The initializers are seeded the same everywhere
# (models.cnn(seed=7)), so every process starts from identical weights (checked).
KERAS_DROPOUT = """
import keras
def dropouts(m):
    return [l for l in m.layers if isinstance(l, keras.layers.Dropout)]
def seed_dropout(m, rank):
    for i, l in enumerate(dropouts(m)):
        st = l.seed_generator.state
        st.assign(keras.ops.convert_to_tensor([1000 * (rank + 1) + i, 0], dtype=st.dtype))
def dropout_states(m):
    return [keras.ops.convert_to_numpy(l.seed_generator.state.value) for l in dropouts(m)]
def set_dropout_states(m, states):
    for l, st in zip(dropouts(m), states):
        l.seed_generator.state.assign(keras.ops.convert_to_tensor(st, dtype=l.seed_generator.state.dtype))
"""


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


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "KERAS_BACKEND")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0", **kw)
    return env


def _rows(step, rank, world):
    """This rank's share of global batch `step` (every world-th row)."""
    return f"slice({step} * {GLOBAL_BATCH} + {rank}, ({step} + 1) * {GLOBAL_BATCH}, {world})"


# ----------------------------------------------------------------------------- TensorFlow
TF_MODEL = """
import json, os, sys
import numpy as np
import tensorflow as tf
from dlconv import models
""" + KERAS_DROPOUT + """
rng = np.random.default_rng(0)
x = rng.random(({n}, 28, 28, 1), dtype=np.float32)
y = rng.integers(0, 10, {n})
loss_fn = keras.losses.SparseCategoricalCrossentropy()
LR = 0.05
RANKS = {ranks}
"""


def _tf_worker(index, ports, out):
    cfg = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    code = TF_MODEL.format(n=GLOBAL_BATCH * STEPS, ranks=RANKS) + f"""
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds={WORKER_TIMEOUT_S // 2}))
with strategy.scope():
    m = models.cnn(backend="cpp", seed=7)
seed_dropout(m, {index})
np.savez({out!r} + ".init.npz", *m.get_weights())
# A custom loop with the strategy's own all-reduce, not model.fit: Keras 3's fit and
# train_on_batch under MultiWorkerMirroredStrategy fail before the first step for stock layers
# too (keras-team/keras#20585, tensorflow/tensorflow#72388; checked at the end of this worker).

@tf.function
def step(xb, yb):
    def replica(xb, yb):
        with tf.GradientTape() as tape:
            # Keras scales a loss computed under a strategy by 1 / replicas itself
            loss = loss_fn(yb, m(xb, training=True))
        return tape.gradient(loss, m.trainable_variables)
    per_replica = strategy.run(replica, (xb, yb))
    for v, g in zip(m.trainable_variables, per_replica):   # all-reduced across the workers
        v.assign_sub(LR * strategy.reduce("SUM", g, axis=None))

for s in range({STEPS}):
    rows = {_rows("s", index, RANKS)}
    step(tf.constant(x[rows]), tf.constant(y[rows]))
np.savez({out!r}, *m.get_weights())
print("replicas", strategy.num_replicas_in_sync)

# The upstream limitation, on a stock model: if Keras' own fit works here one day, this says so.
with strategy.scope():
    stock = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    stock.compile(optimizer="sgd", loss="mse")
try:
    stock.fit(np.ones((8, 4), np.float32), np.zeros((8, 2), np.float32), batch_size=8, verbose=0)
    print("STOCK_FIT ok")
except Exception as exc:
    print("STOCK_FIT failed:", type(exc).__name__, str(exc).splitlines()[0][:120])
"""
    return code, _env(TF_CONFIG=json.dumps(cfg))


def test_tensorflow_multi_worker_mirrored_two_workers(tmp_path):
    """The MNIST CNN (dropout included, seeded per rank) under MultiWorkerMirroredStrategy with 2
    workers on 127.0.0.1, in a custom loop with the strategy's all-reduce.  Keras 3.15's
    model.fit / train_on_batch cannot run under this strategy, stock layers included:
    keras-team/keras#20585 (open) and tensorflow/tensorflow#72388 — Keras reduces a PerReplica
    value it cannot convert, then per-replica scalar metrics along axis 0 ("Invalid reduction
    dimension 0 for input with 0 dimensions").  Each worker checks that on a stock Dense model
    too, so the day Keras fixes it this test says so."""
    pytest.importorskip("tensorflow")
    ports = free_ports(RANKS)
    outs = [tmp_path / f"w{i}.npz" for i in range(RANKS)]
    jobs = [_tf_worker(i, ports, str(outs[i])) for i in range(RANKS)]
    single = TF_MODEL.format(n=GLOBAL_BATCH * STEPS, ranks=RANKS) + f"""
m = models.cnn(backend="cpp", seed=7)
np.savez({str(tmp_path / 'single.npz')!r} + ".init.npz", *m.get_weights())
states = []
for r in range(RANKS):
    seed_dropout(m, r)
    states.append(dropout_states(m))
for s in range({STEPS}):
    grads = []
    for r in range(RANKS):                 # rank r's half, with rank r's dropout generators
        rows = {_rows("s", "r", RANKS)}
        set_dropout_states(m, states[r])
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.constant(y[rows]), m(tf.constant(x[rows]), training=True))
        grads.append(tape.gradient(loss, m.trainable_variables))
        states[r] = dropout_states(m)
    for v, g0, g1 in zip(m.trainable_variables, *grads):
        v.assign_sub(LR * (g0 + g1) / RANKS)
np.savez({str(tmp_path / 'single.npz')!r}, *m.get_weights())
"""
    stdout = run_workers([c for c, _ in jobs] + [single], [e for _, e in jobs] + [_env()])
    assert "replicas 2" in stdout[0] and "replicas 2" in stdout[1], stdout
    for out in stdout[:RANKS]:
        assert "STOCK_FIT failed" in out, ("Keras' fit under MultiWorkerMirroredStrategy works now "
                                           "(keras-team/keras#20585 fixed?): use model.fit here", out)
    w = [np.load(p) for p in outs]
    ref = np.load(tmp_path / "single.npz")
    init = [np.load(str(p) + ".init.npz") for p in outs + [tmp_path / "single.npz"]]
    assert len(ref.files) == 8     # the CNN's 4 kernels and 4 biases
    for k in ref.files:
        for i in (1, 2):
            np.testing.assert_array_equal(init[0][k], init[i][k], err_msg=f"initial {k} differs")
        assert not np.array_equal(w[0][k], init[0][k]), f"{k} did not train"
        np.testing.assert_array_equal(w[0][k], w[1][k], err_msg=f"workers differ in {k}")
        np.testing.assert_allclose(w[0][k], ref[k], rtol=1e-4, atol=1e-5,
                                   err_msg=f"2 workers vs 1 process: {k}")


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
import torch.nn.functional as F
torch.set_num_threads(1)
rank, world, port, kind, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
RANKS, GB = {ranks}, {gb}
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.random(({n}, 28, 28, 1), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, 10, {n}))

if kind == "plain":
    # The MNIST CNN on dlconv.torch's ops (NHWC, HWIO): conv 32 relu, conv 64 relu, max-pool 2,
    # dropout 0.25, dense 128 relu, dropout 0.5, dense 10 (logits); dropout masks from a
    # generator per rank.
    import dlconv.torch as dt

    def drop(h, p, gen):
        return h * (torch.rand(h.shape, generator=gen) >= p).to(h.dtype) / (1 - p)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(7)
            P = lambda *shape, s: torch.nn.Parameter(torch.randn(*shape, generator=g) * s)
            self.w1, self.b1 = P(3, 3, 1, 32, s=0.3), torch.nn.Parameter(torch.zeros(32))
            self.w2, self.b2 = P(3, 3, 32, 64, s=0.06), torch.nn.Parameter(torch.zeros(64))
            self.w3, self.b3 = P(9216, 128, s=0.01), torch.nn.Parameter(torch.zeros(128))
            self.w4, self.b4 = P(128, 10, s=0.1), torch.nn.Parameter(torch.zeros(10))

        def forward(self, x, gen):
            h = dt.conv2d(x, self.w1, self.b1, activation="relu", backend="cpp")
            h = dt.conv2d(h, self.w2, self.b2, activation="relu", backend="cpp")
            h = F.max_pool2d(h.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            h = drop(h, 0.25, gen).reshape(h.shape[0], -1)
            h = drop(dt.dense(h, self.w3, self.b3, activation="relu", backend="cpp"), 0.5, gen)
            return dt.dense(h, self.w4, self.b4, backend="cpp")
    model = Net()
    gens = [torch.Generator().manual_seed(1000 * (r + 1)) for r in range(RANKS)]

    def loss_of(net, r, rows):
        return F.cross_entropy(net(x[rows], gens[r]), y[rows])
else:
    from dlconv import models
{keras_dropout}
    model = models.cnn(backend="cpp", seed=7)            # ends in softmax: the loss takes log
    states = []
    for r in range(RANKS):
        seed_dropout(model, r)
        states.append(dropout_states(model))

    def loss_of(net, r, rows):
        set_dropout_states(model, states[r])
        loss = F.nll_loss(torch.log(net(x[rows], training=True)), y[rows])
        states[r] = dropout_states(model)
        return loss

if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank,
                            world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    # DDP broadcasts rank 0's parameters at construction (the dropout generators' states too,
    # for Keras): each rank's own generator state is set in loss_of, after it.
    net = torch.nn.parallel.DistributedDataParallel(model)
else:
    net = model
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.05)
for s in range({steps}):
    opt.zero_grad()
    if world > 1:      # this rank's share; DDP all-reduces (averages) the gradients in backward
        loss = loss_of(net, rank, slice(s * GB + rank, (s + 1) * GB, world))
    else:              # one process: every rank's share with that rank's dropout, averaged
        loss = sum(loss_of(net, r, slice(s * GB + r, (s + 1) * GB, RANKS)) for r in range(RANKS)) / RANKS
    loss.backward()
    opt.step()
np.savez(out, *[p.detach().numpy() for p in params])
if world > 1:
    dist.destroy_process_group()
print("done", rank)
"""


def _torch_code(kind):
    # KERAS_DROPOUT's lines are indented into the else branch of the worker
    dropout = "\n".join("    " + ln if ln else ln for ln in KERAS_DROPOUT.splitlines())
    return TORCH_WORKER.format(n=GLOBAL_BATCH * STEPS, steps=STEPS, gb=GLOBAL_BATCH, ranks=RANKS,
                               keras_dropout=dropout)


@pytest.mark.parametrize("kind", ["plain", "keras"])
def test_torch_ddp_two_processes_gloo(kind, tmp_path):
    """The MNIST CNN — on dlconv.torch's ops ("plain") or models.cnn on the Keras torch backend
    ("keras") — under DistributedDataParallel (gloo, 2 processes on loopback), dropout seeded
    per rank; one process reproduces both ranks' shares and averages."""
    pytest.importorskip("torch")
    code = _torch_code(kind)
    (port,) = free_ports(1)
    env = _env(KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    outs = [tmp_path / f"r{r}.npz" for r in range(2)] + [tmp_path / "single.npz"]
    codes = [f"import sys; sys.argv = ['w', '{r}', '{w}', '{port}', '{kind}', '{o}']\n" + code
             for r, w, o in ((0, 2, outs[0]), (1, 2, outs[1]), (0, 1, outs[2]))]
    run_workers(codes, [env] * 3)
    w0, w1, ref = (np.load(p) for p in outs)
    assert len(ref.files) == 8     # the CNN's 4 kernels and 4 biases
    for k in ref.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=f"ranks differ in {k}")
        np.testing.assert_allclose(w0[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=f"DDP vs 1 process: {k}")


# ----------------------------------------------------------------------------- JAX
JAX_WORKER = """
import json, os, sys
import numpy as np
devices = int(sys.argv[1]); out = sys.argv[2]
import jax, jax.numpy as jnp, keras
import dlconv.layers as dl, dlconv.jax as dj
assert len(jax.devices()) == devices, jax.devices()
rng = np.random.default_rng(0)
x = rng.random(({n}, 28, 28, 1), dtype=np.float32)
y = rng.integers(0, 10, {n})
import contextlib
from dlconv import models
from dlconv.bridges import jax_sharding
on_mesh = contextlib.nullcontext()
if devices > 1:
    dist = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(dist)
    on_mesh = jax.set_mesh(dist.device_mesh.backend_mesh)    # dlconv's calls get the batch rule
# One program over the global batch (JAX is single-controller): the dropout masks are drawn
# for the whole batch from the same seed, whatever the sharding (threefry is partitionable).
m = models.cnn(backend="cpp", seed=7)
m.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
with on_mesh:
    m.fit(x, y, batch_size={gb}, epochs=1, shuffle=False, verbose=0)
weights = m.get_weights()
print("FIT_PARTITIONED", json.dumps({{k: dict(v) for k, v in jax_sharding.PARTITIONED.items()}}))

# a jitted step with the batch sharded over the devices, through dlconv's custom VJP: under a
# mesh each device runs the FFI calls on its own rows (dlconv.bridges.jax_sharding)
rng1 = np.random.default_rng(1)
w = jnp.asarray(rng1.standard_normal((3, 3, 1, 4)), jnp.float32)
b = jnp.asarray(rng1.standard_normal(4), jnp.float32)
wd = jnp.asarray(rng1.standard_normal((14 * 14 * 4, 10)) * 0.05, jnp.float32)
xs = jnp.asarray(x[:{gb}])

def loss(w, b, wd, xb):
    h = dj.conv2d(xb, w, b, strides=2, padding="same", activation="tanh", backend="cpp")
    p = dj.dense(h.reshape(h.shape[0], -1), wd, activation="softmax", backend="cpp")
    return jnp.sum(jnp.log(p[:, 0]))

step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
if devices > 1:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    xs = jax.device_put(xs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    replicated = step.lower(w, b, wd, xs).compile().as_text()  # no mesh: XLA replicates the calls
    with jax.set_mesh(mesh):
        hlo = step.lower(w, b, wd, xs).compile().as_text()
        grads = step(w, b, wd, xs)
    calls = {{l.split('custom_call_target="')[1].split('"')[0]: l.split("=")[1].split("custom-call")[0].strip()
             for l in hlo.splitlines() if 'custom_call_target="dlconv' in l}}
    print("HLO", json.dumps({{"all_gather": "all-gather" in hlo, "all_reduce": "all-reduce" in hlo,
                             "replicated_all_gather": "all-gather" in replicated, "calls": calls,
                             "dx_sharding": str(grads[3].sharding.spec)}}))
else:
    grads = step(w, b, wd, xs)
np.savez(out, *weights, *[np.asarray(a) for a in grads])
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
    assert len(one.files) == 12     # the CNN's 8 weights and the sharded step's 4 gradients
    for k in one.files:
        scale = max(float(np.abs(one[k]).max()), 1e-30)
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"2 devices vs 1: {k}")
    # The compiled sharded step (conv → dense softmax): every dlconv custom call sees its
    # device's 4 of the 8 rows,
    # the weight/bias gradients are all-reduced, x is never all-gathered, dx stays sharded.
    hlo = json.loads(stdout[0].split("HLO", 1)[1].splitlines()[0])
    half = GLOBAL_BATCH // 2
    assert hlo["calls"]["dlconv_conv2d_forward"].startswith(f"f32[{half},"), hlo
    assert hlo["calls"]["dlconv_conv2d_backward_data"].startswith(f"f32[{half},"), hlo
    assert hlo["calls"]["dlconv_dense_forward"].startswith(f"f32[{half},"), hlo
    assert "dlconv_conv2d_backward_filter" in hlo["calls"] and "dlconv_dense_backward" in hlo["calls"], hlo
    assert hlo["all_reduce"] and not hlo["all_gather"], hlo
    assert "batch" in hlo["dx_sharding"], hlo
    # Without a mesh XLA treats the custom calls as replicated: it all-gathers the batch first.
    assert hlo["replicated_all_gather"], hlo
    # Keras' DataParallel fit under its mesh: XLA partitioned dlconv's calls over the 2 devices.
    fit = json.loads(stdout[0].split("FIT_PARTITIONED", 1)[1].splitlines()[0])
    for name in ("conv2d_forward", "conv2d_backward_filter", "dense_forward", "dense_backward"):
        assert fit.get(name, {}).get("2", 0) >= 1, fit


def test_a_port_in_use_fails_clearly(tmp_path):
    """The rendezvous port is held by another socket: torch.distributed's store cannot bind it
    and the worker exits non-zero within its timeout; the harness reports it (no hang)."""
    pytest.importorskip("torch")
    code = _torch_code("plain")
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
