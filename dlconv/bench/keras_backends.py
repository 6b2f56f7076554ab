"""``dlconv bench``'s per-Keras-backend part: the MNIST CNN train step and each bridge's
per-call overhead, measured under the torch and JAX Keras backends (and TensorFlow's).

Keras fixes its backend when it is first imported, so each backend is measured in a child
process (``python -m dlconv.bench.keras_backends --keras-backend torch ...``), which prints one JSON
object; :func:`run_keras_backends` starts the children and turns their answers into rows
of the bench's train-step table.  Inside a child everything is same-process:

* **train step** — ``train_on_batch`` of the workshop CNN (batch 128, Adam), dlconv layers
  against the stock layers on the same backend, each model sampled in turn (round-robin,
  the order rotating every round), medians reported.  Both start from the same weights, and
  their inference outputs must agree within the bench's tolerance before anything is timed.
  ``model.compile``'s defaults decide compilation, as for a user: on JAX both train steps
  are jitted (dlconv's ops are ``jax.ffi`` calls), on torch both run eagerly.
* **per-call overhead** — the forward of a 1×1 convolution on a 1×1×1×1 tensor through the
  bridge, against ``keras.ops.conv`` on the same backend (jitted on JAX): what one layer call
  costs beyond its arithmetic.
* **kernel probe** — the dlconv kernel calls of one such train step (both convolutions'
  forward passes, conv2's backward-data, both backward-filter passes, both dense layers'
  forward and backward passes, with the step's shapes) made through :mod:`dlconv.ops` on
  NumPy arrays: no framework at all.  It is timed in the same round-robin as the steps, so
  each step row also says how much of it is dlconv's kernels (``probe_s``,
  ``kernel_share``) and how much is the framework around them (pooling, dropout, loss,
  optimizer, Keras' per-step Python, the bridge).

What a bridge costs (``vs_tensorflow``)
---------------------------------------
dlconv's step on torch or JAX against dlconv's own step on TensorFlow.  Keras' backend is
fixed per process, so the two steps can never share a round-robin; timing them minutes
apart, in different processes (the parent's TensorFlow step against a child's), let load
that came and went on a shared machine into the ratio.  So every backend, TensorFlow
included, is measured in a child with the same protocol (same batch, rounds, warm-up,
rotating round-robin), and each child times the framework-free kernel probe in its own
round-robin.  The probe is the same work in every process, so it measures how fast the
machine was during that child's window; the bridge cost is the ratio of the steps in probe
units::

    vs_tensorflow = (step on kb / probe in kb's child) / (step on TF / probe in TF's child)

``vs_tensorflow_raw`` (the plain ratio of the two children's medians) is kept in the JSON
next to it; on a quiet machine the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import List, Optional, Sequence

import numpy as np

from .cases import TOLERANCE  # the inference check before timing
from .targets import BRIDGE_COST_TARGET, STEP_TARGETS  # noqa: F401  (re-exported)
from .timing import rotating_round_robin

#: Keras backends measured in child processes by :func:`run_keras_backends`.
KERAS_BACKENDS = ("torch", "jax")
#: Calls per timed sample of the per-call overhead, and samples.
OVERHEAD_CALLS, OVERHEAD_SAMPLES = 200, 7


def _sync(y):
    """Wait for ``y`` (JAX dispatches asynchronously)."""
    block = getattr(y, "block_until_ready", None)
    return block() if block is not None else y


def _round_robin(fns: dict, rounds: int) -> dict:
    """Median seconds of each zero-argument callable, sampled in turn, the order rotating."""
    return {k: statistics.median(v) for k, v in rotating_round_robin(fns, rounds).items()}


def kernel_probe(backend: str, batch: int, seed: int = 0):
    """A zero-argument callable making the dlconv kernel calls of one MNIST CNN train step
    (:func:`dlconv.models.cnn`'s shapes at ``batch``) through :mod:`dlconv.ops` on NumPy
    arrays, the way the bridges call them: forward with fused activations, the conv backward
    passes taking dL/dy and y (the activation's derivative fused where the backend can), no
    backward-data for the first convolution (its input needs no gradient).  Framework-free:
    the same work in every process (see the module docstring)."""
    from .. import ops
    from ..runtime import conv_geometry_cached, resolve_backend

    be = resolve_backend(backend, False)
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    w1, b1, w2, b2 = arr(3, 3, 1, 32), arr(32), arr(3, 3, 32, 64), arr(64)
    w3, b3, w4, b4 = arr(9216, 128, scale=0.01), arr(128), arr(128, 10), arr(10)
    g1 = conv_geometry_cached(x.shape, w1.shape, (1, 1), "valid", (1, 1), 1)
    g2 = conv_geometry_cached(g1.y_shape, w2.shape, (1, 1), "valid", (1, 1), 1)
    h2 = arr(batch, 9216)            # the pooled, flattened conv2 output (pooling is not dlconv's)
    dy4 = arr(batch, 10)
    dy2 = arr(*g2.y_shape)           # dL/dy of conv2 (from the pooling gradient)

    def step():
        y1 = ops.conv2d(x, w1, b1, activation="relu", backend=be, geometry=g1)
        y2 = ops.conv2d(y1, w2, b2, activation="relu", backend=be, geometry=g2)
        y3 = ops.dense(h2, w3, b3, activation="relu", backend=be)
        y4 = ops.dense(y3, w4, b4, activation="softmax", backend=be)
        dx4, _, _ = ops.dense_backward(y3, w4, dy4, y4, activation="softmax", backend=be)
        ops.dense_backward(h2, w3, dx4, y3, activation="relu", backend=be)
        dx2 = ops.conv2d_backward_data(dy2, w2, g2.x_shape, backend=be, geometry=g2, y=y2,
                                       activation="relu")
        ops.conv2d_backward_filter(y1, dy2, g2.w_shape, backend=be, geometry=g2, y=y2,
                                   activation="relu")
        ops.conv2d_backward_filter(x, dx2, g1.w_shape, backend=be, geometry=g1, y=y1,
                                   activation="relu")

    return step


def _probe_name(backend: str) -> str:
    return f"probe({backend})"


def measure_train_step(backends: Sequence[str], batch: int, rounds: int, warmup: int,
                       seed: int = 0) -> List[dict]:
    """Rows for the stock CNN and the dlconv CNN on each backend, on this process' Keras,
    each dlconv row with its backend's kernel probe (:func:`kernel_probe`) timed in the same
    round-robin."""
    import keras

    from .. import models

    kb = keras.config.backend()
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    stock = models.compile_model(models.cnn(stock=True, seed=seed))
    expected = stock.predict(x, verbose=0, batch_size=batch)
    contenders = {"stock": stock}
    rows = {}
    for b in backends:
        row = {"keras_backend": kb, "backend": b, "impl": f"dlconv({b}) on {kb}", "status": None,
               "why": None, "correct": None, "max_rel_err": None}
        try:
            ours = models.compile_model(models.cnn(backend=b, seed=seed))
            ours.set_weights(stock.get_weights())
            got = ours.predict(x, verbose=0, batch_size=batch)
            err = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
            row.update(max_rel_err=err, correct=bool(err <= TOLERANCE), jit=bool(ours.jit_compile))
            if row["correct"]:
                contenders[b] = ours
            else:
                row.update(status="failed", why=f"outputs differ from stock Keras: max relative "
                                                f"error {err:.3g}; not timed")
        except Exception as exc:  # the row shows the failure; the other backends still run
            row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
        rows[b] = row
    fns = {k: (lambda m=m: m.train_on_batch(x, y)) for k, m in contenders.items()}
    for b in backends:
        if b in contenders:
            try:
                fns[_probe_name(b)] = kernel_probe(b, batch, seed)
            except Exception as exc:  # the row still has its step time
                rows[b]["probe_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for f in fns.values():
        for _ in range(1 + warmup):
            f()
    timed = _round_robin(fns, rounds)
    out = [{"keras_backend": kb, "backend": "builtin", "impl": f"stock keras {keras.__version__} on {kb}",
            "status": "ok", "why": None, "correct": True, "median_s": timed["stock"],
            "stock_median_s": timed["stock"], "time_ratio": 1.0, "jit": bool(stock.jit_compile)}]
    for b, row in rows.items():
        row["stock_median_s"] = timed["stock"]
        if b in timed:
            row.update(status="ok", median_s=timed[b], time_ratio=timed[b] / timed["stock"])
            probe = timed.get(_probe_name(b))
            if probe is not None:
                row.update(probe_s=probe, kernel_share=probe / timed[b])
        out.append(row)
    return out


def _empty_torch_op():
    """A ``torch.library.custom_op`` doing nothing but return a new tensor (registered once,
    in its own namespace): what the dispatcher costs any custom op, the floor of a
    dispatched call (dlconv's eager calls skip the dispatcher: see dlconv.bridges.torch)."""
    import torch
    op = getattr(getattr(torch.ops, "dlconv_bench", None), "empty", None)
    if op is not None and hasattr(op, "default"):
        return op

    @torch.library.custom_op("dlconv_bench::empty", mutates_args=(), schema="(Tensor x) -> Tensor")
    def empty(x):
        return x.new_empty(x.shape)

    @empty.register_fake
    def _(x):
        return x.new_empty(x.shape)

    return empty


def measure_overhead(backend: str = "cpp") -> dict:
    """Per-call seconds of a 1×1 conv forward on a 1×1×1×1 tensor: dlconv's bridge vs
    ``keras.ops.conv`` on this process' Keras backend (both jitted on JAX), timed in one
    round-robin with what bounds the bridge from below: the same kernel through
    :mod:`dlconv.ops` on NumPy arrays (``ops_s``: no framework), and on torch an empty
    ``torch.library.custom_op`` (``empty_op_s``: the dispatcher alone) and the bridge with a
    kernel that requires grad (``dlconv_grad_s``: the autograd.Function the layers' calls
    pay for); on JAX a jitted ``x + k`` (``empty_op_s``: one jitted dispatch)."""
    import keras

    from .. import bridges, ops
    from ..runtime import conv_geometry_cached, resolve_backend

    kb = keras.config.backend()
    bridge = bridges.load(kb)
    x = keras.ops.convert_to_tensor(np.ones((1, 1, 1, 1), np.float32))
    k = keras.ops.convert_to_tensor(np.full((1, 1, 1, 1), 2.0, np.float32))

    def ours(x, k):
        return bridge.conv2d(x, k, None, strides=(1, 1), padding="valid", dilation=(1, 1),
                             activation="linear", backend=backend, out_shape=(1, 1, 1, 1))

    def stock(x, k):
        return keras.ops.conv(x, k, strides=1, padding="valid")

    fns = {"dlconv": ours, "stock": stock}
    extra = {}
    if kb == "jax":
        import jax
        fns = {n: jax.jit(f) for n, f in fns.items()}
        extra["empty_op"] = jax.jit(lambda x, k: x + k)
    elif kb == "torch":
        import torch
        empty = _empty_torch_op()
        k_grad = k.clone().requires_grad_()
        extra["empty_op"] = lambda x, k: empty(x)
        extra["dlconv_grad"] = lambda x, k: ours(x, k_grad)
    for f in fns.values():
        got = np.asarray(keras.ops.convert_to_numpy(_sync(f(x, k))))
        if got.shape != (1, 1, 1, 1) or float(got.ravel()[0]) != 2.0:
            raise AssertionError(f"1x1 conv gave {got!r}, expected [[[[2.]]]]")
    xn, kn = np.ones((1, 1, 1, 1), np.float32), np.full((1, 1, 1, 1), 2.0, np.float32)
    g = conv_geometry_cached(xn.shape, kn.shape, (1, 1), "valid", (1, 1), 1)
    be = resolve_backend(backend, False)
    extra["ops"] = lambda x, k: ops.conv2d(xn, kn, None, activation="linear", backend=be, geometry=g)
    fns.update(extra)

    def block(f):
        def run():
            for _ in range(OVERHEAD_CALLS):
                _sync(f(x, k))
        return run

    timed = _round_robin({n: block(f) for n, f in fns.items()}, OVERHEAD_SAMPLES)
    per_call = {n: t / OVERHEAD_CALLS for n, t in timed.items()}
    out = {"keras_backend": kb, "backend": backend, "dlconv_s": per_call["dlconv"],
           "stock_s": per_call["stock"], "ratio": per_call["dlconv"] / per_call["stock"]}
    out.update({f"{n}_s": per_call[n] for n in extra})
    return out


def measure_here(backends: Sequence[str] = ("cpp",), batch: int = 128, rounds: int = 21,
                 warmup: int = 2, train_step: bool = True,
                 overhead_backends: Optional[Sequence[str]] = None) -> dict:
    """Everything a child measures, on this process' Keras backend: {"keras_backend",
    "train_rows" (:func:`measure_train_step`), "overhead" (:func:`measure_overhead` of the
    first backend), "overhead_rows" (one per ``overhead_backends``, default the first
    backend)}.  ``benchmarks/torch_step.py`` and ``benchmarks/jax_step.py`` print this."""
    import keras

    result = {"keras_backend": keras.config.backend(), "train_rows": [], "overhead": None,
              "overhead_rows": []}
    backends = [b for b in backends if b]
    if train_step:
        result["train_rows"] = measure_train_step(backends, batch, rounds, warmup)
    for b in overhead_backends or (backends[:1] or ["cpp"]):
        try:
            result["overhead_rows"].append(dict(measure_overhead(b), status="ok"))
        except Exception as exc:  # reported, not fatal: the train rows still count
            result["overhead_rows"].append({"keras_backend": result["keras_backend"], "backend": b,
                                            "status": "error", "why": f"{type(exc).__name__}: {exc}"[:300]})
    first = result["overhead_rows"][0]
    if first["status"] == "ok":
        result["overhead"] = {k: v for k, v in first.items() if k != "status"}
    else:
        result["overhead_error"] = first["why"]
    return result


def machine_line() -> str:
    """"<CPU model>, <n> cores; 1-minute load average <x>" (no Keras or framework import)."""
    import platform
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = f"; 1-minute load average {os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        load = ""
    return f"{model}, {cores} cores{load}"


def script_main(keras_backend: str, argv=None, overhead_backends: str = "cpp") -> int:
    """``benchmarks/torch_step.py`` / ``benchmarks/jax_step.py``: :func:`measure_here` on this
    process' Keras (which must be ``keras_backend``), printed, optionally written as JSON."""
    ap = argparse.ArgumentParser(description=f"MNIST CNN train step and per-call overhead on "
                                             f"Keras' {keras_backend} backend (dlconv bench's protocol)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default="cpp", help="dlconv backends for the train step")
    ap.add_argument("--overhead-backends", default=overhead_backends,
                    help="dlconv backends whose per-call overhead is measured")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    import keras
    if keras.config.backend() != keras_backend:
        raise SystemExit(f"this measures Keras' {keras_backend} backend; Keras runs on "
                         f"{keras.config.backend()!r} (set KERAS_BACKEND before it is imported)")
    res = measure_here(args.backends.split(","), args.batch, args.rounds, args.warmup,
                       overhead_backends=[b for b in args.overhead_backends.split(",") if b])
    res["machine"] = machine_line()
    print(f"machine: {res['machine']}")
    print("\n".join(format_here(res)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


def format_here(result: dict) -> List[str]:
    """Human-readable lines of a :func:`measure_here` result."""
    kb = result["keras_backend"]
    lines = [f"MNIST CNN train step on Keras {kb} (round-robin medians; kernel probe = dlconv's "
             f"kernel calls of one step through dlconv.ops, no framework)"]
    for r in result["train_rows"]:
        if r.get("median_s") is None:
            lines.append(f"  {r['impl']:34s} {r['status']}: {r.get('why')}")
            continue
        extra = (f"; probe {r['probe_s'] * 1e3:.1f} ms = {r['kernel_share']:.0%} of the step"
                 if r.get("probe_s") else "")
        lines.append(f"  {r['impl']:34s} {r['median_s'] * 1e3:8.1f} ms  {r['time_ratio']:.2f}x stock{extra}")
    lines.append("per-call overhead: forward of a 1x1 conv on a 1x1x1x1 tensor")
    for r in result["overhead_rows"]:
        if r["status"] != "ok":
            lines.append(f"  dlconv({r['backend']}): {r['status']}: {r.get('why')}")
            continue
        parts = [f"dlconv({r['backend']}) {r['dlconv_s'] * 1e6:.1f} us",
                 f"stock {r['stock_s'] * 1e6:.1f} us ({r['ratio']:.2f}x)"]
        for key, what in (("dlconv_grad_s", "dlconv, kernel requiring grad"),
                          ("ops_s", "dlconv.ops on NumPy (no framework)"),
                          ("empty_op_s", "empty custom op" if kb == "torch" else "jitted x + k")):
            if r.get(key) is not None:
                parts.append(f"{what} {r[key] * 1e6:.1f} us")
        lines.append("  " + "; ".join(parts))
    return lines


def child_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlconv.bench.keras_backends")
    p.add_argument("--keras-backend", required=True, choices=("tensorflow", "torch", "jax"))
    p.add_argument("--backends", default="cpp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-train-step", action="store_true")
    args = p.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.keras_backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" in sys.modules:
        raise SystemExit("dlconv.bench.keras_backends must run in a fresh process (keras is imported)")
    result = measure_here(args.backends.split(","), args.batch, args.rounds, args.warmup,
                          not args.no_train_step)
    print("DLCONV-BENCH-KERAS " + json.dumps(result))
    return 0


def _child(keras_backend: str, backends: Sequence[str], batch: int, rounds: int, warmup: int,
           train_step: bool, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "dlconv.bench.keras_backends", "--keras-backend", keras_backend,
           "--backends", ",".join(backends), "--batch", str(batch), "--rounds", str(rounds),
           "--warmup", str(warmup)] + ([] if train_step else ["--no-train-step"])
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"the {keras_backend} measurement did not finish within {timeout_s:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("DLCONV-BENCH-KERAS "):
            return json.loads(line.split(" ", 1)[1])
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"the {keras_backend} measurement failed (exit {out.returncode}): {tail[0][:300]}"}


def _installed(keras_backend: str) -> Optional[str]:
    from ..bridges import status
    ok, why = status()[keras_backend]
    return None if ok else why


#: The bench's note on how ``vs_tensorflow`` is measured (see the module docstring).
BRIDGE_COST_NOTE = ("bridge cost (\"× dlconv's own step on TensorFlow\"): every Keras backend, "
                    "TensorFlow included, times dlconv's step in its own child process with the "
                    "same protocol, each with a framework-free kernel probe (the step's dlconv "
                    "kernel calls through dlconv.ops) in the same round-robin; the ratio is taken "
                    "in probe units, so load that differed between the children's windows cancels "
                    "(the plain ratio is vs_tensorflow_raw in the JSON); \"dlconv kernels … of the "
                    "step\" is that probe's median")


def bridge_cost(row: dict, tf_row: Optional[dict]) -> dict:
    """``vs_tensorflow`` (probe-normalised) and ``vs_tensorflow_raw`` of a dlconv step row
    against dlconv's TensorFlow step row of the same backend, both from children (see the
    module docstring); {} when either is missing."""
    if not tf_row or row.get("median_s") is None or not tf_row.get("median_s"):
        return {}
    out = {"vs_tensorflow_raw": row["median_s"] / tf_row["median_s"],
           "tensorflow_median_s": tf_row["median_s"]}
    if row.get("probe_s") and tf_row.get("probe_s"):
        out["vs_tensorflow"] = ((row["median_s"] / row["probe_s"])
                                / (tf_row["median_s"] / tf_row["probe_s"]))
        out["bridge_cost_method"] = "probe-normalised, every backend in a child"
    else:   # no probe (it failed): the plain ratio, said so
        out["vs_tensorflow"] = out["vs_tensorflow_raw"]
        out["bridge_cost_method"] = "raw ratio of two children (no kernel probe)"
    return out


def run_keras_backends(backends: Sequence[str], batch: int, rounds: int, warmup: int,
                       tf_rows: Sequence[dict] = (), keras_backends: Sequence[str] = KERAS_BACKENDS,
                       timeout_s: float = 900) -> tuple:
    """(train rows, overhead rows) for each Keras backend in ``keras_backends`` (train step and
    overhead, each in a child process) plus TensorFlow's overhead.  TensorFlow's child also
    times dlconv's TensorFlow step with the same protocol and kernel probe: each bridge's cost
    (``vs_tensorflow``) is taken against it (module docstring).  ``tf_rows`` (the parent's
    own TensorFlow step, measured at another time) is only the fallback when that child
    could not time it."""
    train, overhead = [], []
    tf_step = {r["backend"]: r.get("median_s") for r in tf_rows if r.get("status") == "ok"}
    results = {}
    for kb in ["tensorflow"] + list(keras_backends):
        why = _installed(kb)
        results[kb] = {"error": why} if why else _child(kb, backends, batch, rounds, warmup,
                                                        bool(keras_backends), timeout_s)
    tf_child = {r["backend"]: r for r in results["tensorflow"].get("train_rows", [])
                if r.get("status") == "ok"}
    for kb in list(keras_backends) + ["tensorflow"]:
        res = results[kb]
        if "error" in res:
            if kb != "tensorflow":
                train.append({"keras_backend": kb, "backend": backends[0] if backends else "cpp",
                              "impl": f"dlconv on {kb}", "status": "skipped", "why": res["error"],
                              "median_s": None, "time_ratio": None, "correct": None,
                              "target": STEP_TARGETS.get(kb), "target_met": None})
            overhead.append({"keras_backend": kb, "status": "skipped", "why": res["error"]})
            continue
        for row in res["train_rows"] if kb != "tensorflow" else ():
            b = row["backend"]
            if b != "builtin":
                row["target"] = STEP_TARGETS.get(kb) if b == "cpp" else None
                row["target_met"] = (None if row["target"] is None or row.get("time_ratio") is None
                                     else bool(row["time_ratio"] <= row["target"]))
                row["label"] = f"MNIST CNN train step on Keras {kb}: dlconv({b}) vs stock (time ratio)"
                cost = bridge_cost(row, tf_child.get(b))
                if not cost and row.get("median_s") is not None and tf_step.get(b):
                    cost = {"vs_tensorflow": row["median_s"] / tf_step[b],
                            "bridge_cost_method": "against the parent's TensorFlow step (another "
                                                  "time: TensorFlow's child did not time it)"}
                row.update(cost)
                if row.get("kernel_share") is not None:
                    row["why"] = (f"dlconv kernels {row['probe_s'] * 1e3:.1f} ms "
                                  f"({row['kernel_share']:.0%}) of the step")
            train.append(row)
        if res.get("overhead"):
            overhead.append(dict(res["overhead"], status="ok"))
        else:
            overhead.append({"keras_backend": kb, "status": "error", "why": res.get("overhead_error")})
    return train, overhead


if __name__ == "__main__":
    sys.exit(child_main())
