"""The conv + pool paths of the TF op library (docs/layers.md "Max pooling") on the MNIST CNN's
Keras/TF train step, batch 128: stock Keras; dlconv(cpp) as it traces by default (conv2's
backward ops read the pool's gradient in place); the same traced with that read switched off
("gathered": the pool's gradient gather with relu folded in, then the linear backward ops, as
before 2026-12-03); and traced with the opt-in fusion (``DLCONV_TF_FUSE_CONV_POOL=1``).  Same
weights, one process, interleaved (``--steps`` steps of each per round, the order rotating),
medians over ``--rounds`` rounds.

    python benchmarks/tf_conv_pool.py                 # 30 rounds of 3 steps
    python benchmarks/tf_conv_pool.py --rounds 60 --reps 3

Prints each model's median step and the two time ratios to stock (< 1: dlconv is faster),
with the load average before and after.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def measure(rounds: int, steps: int, batch: int = 128) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from dlconv import models
    from dlconv.bridges import tensorflow as tf_bridge

    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    stock = models.cnn(stock=True, seed=0)
    built = {"stock": stock}
    for name in ("dlconv unfused", "dlconv gathered", "dlconv fused"):
        m = models.cnn(backend="cpp", stock=False, seed=0)
        m.set_weights(stock.get_weights())
        built[name] = m
    old = os.environ.get("DLCONV_TF_FUSE_CONV_POOL")
    in_place = tf_bridge._is_pool2x2
    try:
        for name, m in built.items():
            m.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"])
            os.environ["DLCONV_TF_FUSE_CONV_POOL"] = "1" if name == "dlconv fused" else "0"
            tf_bridge._is_pool2x2 = (lambda op: False) if name == "dlconv gathered" else in_place
            for _ in range(4):                        # the first call traces, with these settings
                m.train_on_batch(x, y)
    finally:
        tf_bridge._is_pool2x2 = in_place
        if old is None:
            os.environ.pop("DLCONV_TF_FUSE_CONV_POOL", None)
        else:
            os.environ["DLCONV_TF_FUSE_CONV_POOL"] = old
    samples = {k: [] for k in built}
    names = list(built)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(steps):
                t = time.perf_counter()
                built[k].train_on_batch(x, y)
                samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3, help="steps of each model per round")
    ap.add_argument("--reps", type=int, default=1, help="repeat the whole measurement")
    args = ap.parse_args(argv)
    for _ in range(args.reps):
        load0 = os.getloadavg()[0]
        med = measure(args.rounds, args.steps)
        load1 = os.getloadavg()[0]
        s = med["stock"]
        parts = [f"{k.removeprefix('dlconv ')} {v * 1e3:.2f} ms ({v / s:.3f})" for k, v in med.items() if k != "stock"]
        print(f"stock {s * 1e3:.2f} ms, dlconv " + ", ".join(parts) + f"; load {load0:.1f} -> {load1:.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
