"""The TF op library's CPU threading settings on the Keras/TF train steps (issues 12 and 13):
dlconv(cpp) vs stock Keras, the MNIST CNN (batch 128) and the ECAL ResNet (batch 32).

Two kinds of setting, compared differently:

* the op library's knobs (:func:`dlconv.tf_ops.threading_knobs`: the small-call thresholds of
  forward/dense and of the conv backward passes, and whether small calls skip the kernel lock)
  change at run time, so every setting is timed in **one process, interleaved**: one step of
  the stock model and one of dlconv's per setting each round, the order rotating;
* libgomp's idle spin (``GOMP_SPINCOUNT``, :mod:`dlconv._omp`) is read once when libgomp
  loads, so each value gets its own child process (its ratio to stock is still interleaved
  inside that process); the values alternate over ``--reps`` repetitions.

    python benchmarks/tf_threading.py                          # knobs: old vs new defaults
    python benchmarks/tf_threading.py --knobs 2e7:2e7:0,2e7:1e8:1,1e8:1e8:1 --rounds 60
    python benchmarks/tf_threading.py --spins 300000,10000,0 --reps 3

A knob setting is ``FORWARD_FLOPS:BACKWARD_FLOPS:UNLOCKED`` (2e7:2e7:0 was the default before
issue 13's change, 2e7:1e8:1 is the default now).  Ratio < 1: dlconv is faster.  A benchmark,
not a test: quote the load average printed with each figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MODELS = {"mnist": ("cnn", 128), "resnet": ("resnet_ecal", 32)}


def _setup(model: str):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from dlconv import models
    name, batch = MODELS[model]
    ms = {}
    for stock in (True, False):
        m = models.build(name, backend="cpp", stock=stock, seed=0)
        models.compile_model(m)
        ms["stock" if stock else "dlconv"] = m
    rng = np.random.default_rng(0)
    x = rng.random((batch, *ms["stock"].input_shape[1:]), dtype=np.float32)
    classes = int(ms["stock"].output_shape[-1])
    y = rng.integers(0, max(classes, 2), batch).astype(np.int32 if classes > 1 else np.float32)
    if classes == 1:
        y = y.reshape(-1, 1)
    return {k: (lambda m=m: m.train_on_batch(x, y)) for k, m in ms.items()}


def _knob(text: str) -> dict:
    fwd, bwd, unlocked = text.split(":")
    return {"serial_flops": float(fwd), "serial_flops_backward": float(bwd), "unlocked_small": unlocked == "1"}


def run_knobs(model: str, settings, rounds: int, warmup: int = 5) -> dict:
    """Median step time of stock and of dlconv under each knob setting, interleaved."""
    from dlconv import tf_ops
    step = _setup(model)
    for s in settings:
        tf_ops.threading_knobs(**_knob(s))
        for _ in range(warmup):
            step["dlconv"]()
    for _ in range(warmup):
        step["stock"]()
    keys = ["stock", *settings]
    samples = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            if k != "stock":
                tf_ops.threading_knobs(**_knob(k))
            t0 = time.perf_counter()
            step["stock" if k == "stock" else "dlconv"]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mnist,resnet")
    p.add_argument("--knobs", default="2e7:2e7:0,2e7:1e8:1")
    p.add_argument("--spins", default="", help="GOMP_SPINCOUNT values, one child process each")
    p.add_argument("--reps", type=int, default=2, help="repetitions of the --spins sweep")
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args(argv)
    models = a.models.split(",")
    if a.spins:
        for rep in range(a.reps):
            for model in models:
                for spin in a.spins.split(","):
                    env = dict(os.environ, GOMP_SPINCOUNT=spin)
                    out = subprocess.run([sys.executable, __file__, "--models", model, "--knobs",
                                          a.knobs.split(",")[-1], "--rounds", str(a.rounds)],
                                         env=env, capture_output=True, text=True)
                    print(f"GOMP_SPINCOUNT={spin} rep {rep + 1}: " + (out.stdout.strip() or out.stderr[-500:]),
                          flush=True)
        return 0
    for model in models:
        med = run_knobs(model, a.knobs.split(","), a.rounds)
        head = (f"{model}: stock {med['stock'] * 1e3:.2f} ms, load {os.getloadavg()[0]:.2f}, "
                f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        print(head + "".join(f"\n    {k:>12}: {med[k] * 1e3:.2f} ms, ratio {med[k] / med['stock']:.3f}"
                             for k in a.knobs.split(",")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
