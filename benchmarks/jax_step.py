"""Keras on JAX: the MNIST CNN train step and the JAX bridge's per-call overhead.

Run as a script (it sets ``KERAS_BACKEND=jax`` before Keras is imported, so run it in its
own process)::

    python benchmarks/jax_step.py [--batch 128] [--rounds 20] [--backends cpp,numba] [--json out.json]

1. **Train step**: ``dlconv.models.cnn`` with dlconv layers (each backend asked for) vs the
   stock Keras layers, same weights, same process, both jitted by Keras (``jit_compile``
   "auto" → XLA on JAX); ``model.train_on_batch`` timed round-robin (one step of each model
   per round, the order rotating every round), medians reported with their ratio to stock.
   Before timing, loss and gradients of one batch (inference mode) are checked against the
   stock model's.
2. **Per-call overhead**: a jitted 1x1 conv on a 1x1x1x1 tensor, dlconv (each backend: the
   cpp FFI custom call, the others' ``jax.pure_callback``) vs ``jax.lax.conv_general_dilated``;
   the median over many calls of the whole dispatch (``block_until_ready`` each).

``run()`` returns the rows as dicts (what ``dlconv bench`` can put in its table and JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

#: Relative tolerance of the dlconv model's loss and gradients vs the stock model's.
TOLERANCE = 1e-4
#: Calls per sample and samples in the per-call overhead measurement.
OVERHEAD_CALLS, OVERHEAD_SAMPLES = 200, 15


def _setup_backend():
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        raise RuntimeError(f"benchmarks/jax_step.py measures Keras on JAX, but KERAS_BACKEND="
                           f"{os.environ['KERAS_BACKEND']!r} was set in this process")
    os.environ["KERAS_BACKEND"] = "jax"


def _max_rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def train_step(backends=("cpp",), batch=128, rounds=20, warmup=3, seed=0):
    """Rows for the stock model and each dlconv backend (median seconds per step, ratio)."""
    _setup_backend()
    import jax
    import keras
    import numpy as np

    from dlconv import models

    rng = np.random.default_rng(seed)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def loss_and_grads(model):
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        def f(tv):
            pred, _ = model.stateless_call(tv, ntv, x, training=False)
            return loss_fn(y, pred)

        loss, grads = jax.jit(jax.value_and_grad(f))(tv)
        return [loss] + list(grads)

    def ready(model):
        models.compile_model(model)
        for _ in range(1 + warmup):          # the first call traces and compiles the step
            model.train_on_batch(x, y)
        return model

    stock = models.cnn(stock=True, seed=seed)
    expected = loss_and_grads(stock)
    contenders = {"stock": stock}          # compiled and warmed after the weights are copied
    rows = {"stock": {"impl": f"stock keras {keras.__version__} (jax, jit)", "backend": "builtin",
                      "keras_backend": "jax", "status": "ok"}}
    for b in backends:
        row = {"impl": f"dlconv({b})", "backend": b, "keras_backend": "jax"}
        try:
            ours = models.cnn(backend=b, seed=seed)
            ours.set_weights(stock.get_weights())
            err = max(_max_rel(a, e) for a, e in zip(loss_and_grads(ours), expected))
            row.update(max_rel_err=err, correct=err <= TOLERANCE)
            if row["correct"]:
                contenders[row["impl"]] = ours
                row["status"] = "ok"
            else:
                row.update(status="failed", why=f"loss/gradients differ from stock: {err:.3g}")
        except Exception as exc:  # the row says why; the others still run
            row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
        rows[row["impl"]] = row

    for model in contenders.values():
        ready(model)
    samples = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for j in range(len(names)):
            k = names[(r + j) % len(names)]
            t0 = time.perf_counter()
            contenders[k].train_on_batch(x, y)
            samples[k].append(time.perf_counter() - t0)
    t_stock = statistics.median(samples["stock"])
    out = []
    for k, row in rows.items():
        if k in samples:
            t = statistics.median(samples[k])
            q = statistics.quantiles(samples[k], n=4)
            row.update(median_s=t, q25_s=q[0], q75_s=q[2], stock_median_s=t_stock,
                       time_ratio=t / t_stock)
        row.update(layer="mnist_cnn", **{"pass": "train-step"}, device="cpu", batch=batch)
        out.append(row)
    return out


def per_call_overhead(backends=("cpp", "numba", "reference"), calls=OVERHEAD_CALLS,
                      samples=OVERHEAD_SAMPLES):
    """Median seconds per jitted call of a 1x1 conv on a 1x1x1x1 tensor: dlconv per backend
    (with how it is called) and jax.lax.conv_general_dilated."""
    _setup_backend()
    import jax
    import jax.numpy as jnp

    from dlconv.bridges import jax as bridge

    x = jnp.ones((1, 1, 1, 1), jnp.float32)
    w = jnp.ones((1, 1, 1, 1), jnp.float32)
    fns = {"jax.lax.conv_general_dilated": jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))}
    how = {"jax.lax.conv_general_dilated": "XLA"}
    for b in backends:
        key = f"dlconv({b})"
        fns[key] = jax.jit(lambda x, w, b=b: bridge.conv2d(
            x, w, None, strides=(1, 1), padding="valid", dilation=(1, 1), backend=b))
        how[key] = "FFI custom call" if bridge.path_for(b) == "ffi" else "jax.pure_callback"
    if "cpp" in backends and bridge.path_for("cpp") == "ffi":
        # the same kernel through jax.pure_callback (what a dlconv._C without the FFI handlers
        # does): the FFI's saving, measured
        path_for = bridge.path_for
        bridge.path_for = lambda b: "callback"
        try:
            f = jax.jit(lambda x, w: bridge.conv2d(x, w, None, strides=(1, 1), padding="valid",
                                                   dilation=(1, 1), backend="cpp"))
            f(x, w).block_until_ready()          # traced and compiled while patched
        finally:
            bridge.path_for = path_for
            bridge._conv_op.cache_clear()
        fns["dlconv(cpp, pure_callback)"] = f
        how["dlconv(cpp, pure_callback)"] = "jax.pure_callback"
    for f in fns.values():
        for _ in range(20):
            f(x, w).block_until_ready()
    times = {k: [] for k in fns}
    for _ in range(samples):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f(x, w).block_until_ready()
            times[k].append((time.perf_counter() - t0) / calls)
    base = statistics.median(times["jax.lax.conv_general_dilated"])
    return [{"impl": k, "how": how[k], "layer": "conv1x1_1x1x1x1", "pass": "forward-call",
             "keras_backend": "jax", "median_s": statistics.median(v),
             "overhead_vs_builtin_s": statistics.median(v) - base,
             "time_ratio": statistics.median(v) / base} for k, v in times.items()]


def run(backends=("cpp",), batch=128, rounds=20, warmup=3, overhead_backends=("cpp", "numba", "reference")):
    return {"train_rows": train_step(backends, batch, rounds, warmup),
            "overhead_rows": per_call_overhead(overhead_backends)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backends", default="cpp", help="dlconv backends for the train step")
    p.add_argument("--overhead-backends", default="cpp,numba,reference")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    res = run(tuple(a.backends.split(",")), a.batch, a.rounds, a.warmup,
              tuple(s for s in a.overhead_backends.split(",") if s))
    import platform
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    res["machine"] = {"cpu": model, "cores": os.cpu_count()}
    print(f"machine: {model}, {os.cpu_count()} cores")
    print(f"MNIST CNN train step, batch {a.batch}, Keras on JAX (jitted), {a.rounds} rounds round-robin")
    for r in res["train_rows"]:
        if r.get("median_s") is not None:
            print(f"  {r['impl']:34s} {r['median_s'] * 1e3:8.1f} ms  (q25-q75 {r['q25_s'] * 1e3:.1f}-"
                  f"{r['q75_s'] * 1e3:.1f})  {r['time_ratio']:.3f}x stock"
                  + (f"  max rel err {r['max_rel_err']:.2g}" if "max_rel_err" in r else ""))
        else:
            print(f"  {r['impl']:34s} {r['status']}: {r.get('why')}")
    print("per-call overhead, jitted 1x1 conv on a 1x1x1x1 tensor")
    for r in res["overhead_rows"]:
        print(f"  {r['impl']:30s} {r['how']:18s} {r['median_s'] * 1e6:8.1f} us/call "
              f"(+{r['overhead_vs_builtin_s'] * 1e6:.1f} us vs lax)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
