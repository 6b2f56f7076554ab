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


def measure_train_step(backends: Sequence[str], batch: int, rounds: int, warmup: int,
                       seed: int = 0) -> List[dict]:
    """Rows for the stock CNN and the dlconv CNN on each backend, on this process' Keras."""
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
    for m in contenders.values():
        for _ in range(1 + warmup):
            m.train_on_batch(x, y)
    timed = _round_robin({k: (lambda m=m: m.train_on_batch(x, y)) for k, m in contenders.items()},
                         rounds)
    out = [{"keras_backend": kb, "backend": "builtin", "impl": f"stock keras {keras.__version__} on {kb}",
            "status": "ok", "why": None, "correct": True, "median_s": timed["stock"],
            "stock_median_s": timed["stock"], "time_ratio": 1.0, "jit": bool(stock.jit_compile)}]
    for b, row in rows.items():
        row["stock_median_s"] = timed["stock"]
        if b in timed:
            row.update(status="ok", median_s=timed[b], time_ratio=timed[b] / timed["stock"])
        out.append(row)
    return out


def measure_overhead(backend: str = "cpp") -> dict:
    """Per-call seconds of a 1×1 conv forward on a 1×1×1×1 tensor: dlconv's bridge vs
    ``keras.ops.conv`` on this process' Keras backend (both jitted on JAX)."""
    import keras

    from .. import bridges

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
    if kb == "jax":
        import jax
        fns = {n: jax.jit(f) for n, f in fns.items()}
    for f in fns.values():
        got = np.asarray(keras.ops.convert_to_numpy(_sync(f(x, k))))
        if got.shape != (1, 1, 1, 1) or float(got.ravel()[0]) != 2.0:
            raise AssertionError(f"1x1 conv gave {got!r}, expected [[[[2.]]]]")

    def block(f):
        def run():
            for _ in range(OVERHEAD_CALLS):
                _sync(f(x, k))
        return run

    timed = _round_robin({n: block(f) for n, f in fns.items()}, OVERHEAD_SAMPLES)
    per_call = {n: t / OVERHEAD_CALLS for n, t in timed.items()}
    return {"keras_backend": kb, "backend": backend, "dlconv_s": per_call["dlconv"],
            "stock_s": per_call["stock"], "ratio": per_call["dlconv"] / per_call["stock"]}


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
    result = {"keras_backend": args.keras_backend, "train_rows": [], "overhead": None}
    backends = [b for b in args.backends.split(",") if b]
    if not args.no_train_step:
        result["train_rows"] = measure_train_step(backends, args.batch, args.rounds, args.warmup)
    try:
        result["overhead"] = measure_overhead(backends[0] if backends else "cpp")
    except Exception as exc:  # reported, not fatal: the train rows still count
        result["overhead_error"] = f"{type(exc).__name__}: {exc}"[:300]
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


def run_keras_backends(backends: Sequence[str], batch: int, rounds: int, warmup: int,
                       tf_rows: Sequence[dict] = (), keras_backends: Sequence[str] = KERAS_BACKENDS,
                       timeout_s: float = 900) -> tuple:
    """(train rows, overhead rows) for each Keras backend in ``keras_backends`` (train step and
    overhead, each in a child process) plus TensorFlow's overhead; the TensorFlow train step is
    the bench's own in-process one (``tf_rows``), against which each bridge's cost is given."""
    train, overhead = [], []
    tf_step = {r["backend"]: r.get("median_s") for r in tf_rows if r.get("status") == "ok"}
    for kb in list(keras_backends) + ["tensorflow"]:
        why = _installed(kb)
        res = {"error": why} if why else _child(kb, backends, batch, rounds, warmup,
                                                kb != "tensorflow", timeout_s)
        if "error" in res:
            if kb != "tensorflow":
                train.append({"keras_backend": kb, "backend": backends[0] if backends else "cpp",
                              "impl": f"dlconv on {kb}", "status": "skipped", "why": res["error"],
                              "median_s": None, "time_ratio": None, "correct": None,
                              "target": STEP_TARGETS.get(kb), "target_met": None})
            overhead.append({"keras_backend": kb, "status": "skipped", "why": res["error"]})
            continue
        for row in res["train_rows"]:
            b = row["backend"]
            if b != "builtin":
                row["target"] = STEP_TARGETS.get(kb) if b == "cpp" else None
                row["target_met"] = (None if row["target"] is None or row.get("time_ratio") is None
                                     else bool(row["time_ratio"] <= row["target"]))
                row["label"] = f"MNIST CNN train step on Keras {kb}: dlconv({b}) vs stock (time ratio)"
                t_tf = tf_step.get(b)
                if row.get("median_s") is not None and t_tf:
                    row["vs_tensorflow"] = row["median_s"] / t_tf
            train.append(row)
        if res.get("overhead"):
            overhead.append(dict(res["overhead"], status="ok"))
        else:
            overhead.append({"keras_backend": kb, "status": "error", "why": res.get("overhead_error")})
    return train, overhead


if __name__ == "__main__":
    sys.exit(child_main())
