"""The torch bridge's figures: MNIST CNN train step under Keras' torch backend, and the
per-call overhead of one dlconv op against ``torch.nn.functional.conv2d``.

Run as ``python benchmarks/torch_step.py [--rounds N] [--backend cpp] [--json out.json]``
(it sets ``KERAS_BACKEND=torch`` itself; the Keras backend is fixed per process, so it
refuses to run with another one already set).

Train step: the workshop's MNIST CNN (:func:`dlconv.models.cnn`, Adam, sparse categorical
cross-entropy), batch 128, dlconv layers vs the stock Keras layers, same seed and weights,
in the same process.  First the loss and every gradient of one batch (inference mode, so
dropout does not differ) are compared with the stock model's; then ``train_on_batch`` is
timed round-robin, one step of each model per round, the order rotating every round so
each follows the other equally often; the medians and their ratio are reported.

Per-call overhead: the forward of a 1x1 conv on a 1x1x1x1 tensor (no bias, linear), dlconv
(through ``torch.ops.dlconv.conv2d``, eager, autograd off and on) vs
``torch.nn.functional.conv2d``, median over blocks of calls, interleaved; the same kernel
called through :mod:`dlconv.ops` on NumPy arrays shows what the bridge itself adds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
    sys.exit(f"benchmarks/torch_step.py measures Keras' torch backend; KERAS_BACKEND is "
             f"{os.environ['KERAS_BACKEND']!r}")

import numpy as np  # noqa: E402

#: Largest relative gradient/loss difference accepted before a model is timed (float32
#: kernels summing in a different order than stock's).
TOLERANCE = 1e-4


def machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def train_step(rounds: int, backend: str, batch: int = 128, seed: int = 0) -> dict:
    import keras
    import torch
    from dlconv import models

    rng = np.random.default_rng(seed)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)

    def compiled(m):
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        return m

    stock = compiled(models.cnn(stock=True, seed=seed))
    ours = compiled(models.cnn(backend=backend, seed=seed))
    ours.set_weights(stock.get_weights())

    def loss_and_grads(m):
        xt = torch.from_numpy(x)
        loss = keras.losses.SparseCategoricalCrossentropy()(torch.from_numpy(y), m(xt, training=False))
        params = [v.value for v in m.trainable_variables]
        grads = torch.autograd.grad(loss, params)
        return [loss.detach().numpy()] + [g.detach().numpy() for g in grads]

    err = max(rel_err(a, b) for a, b in zip(loss_and_grads(ours), loss_and_grads(stock)))
    if not err <= TOLERANCE:
        raise SystemExit(f"dlconv({backend}) loss/gradients differ from stock Keras on torch: "
                         f"max relative error {err:.3g}")
    contenders = {"stock": stock, f"dlconv({backend})": ours}
    for m in contenders.values():
        for _ in range(3):
            m.train_on_batch(x, y)
    names = list(contenders)
    samples = {k: [] for k in names}
    for r in range(rounds):
        for j in range(len(names)):
            k = names[(r + j) % len(names)]
            t0 = time.perf_counter()
            contenders[k].train_on_batch(x, y)
            samples[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"what": "mnist_cnn train step, Keras torch backend", "batch": batch, "rounds": rounds,
            "max_rel_err": err, "median_s": med,
            "time_ratio": med[f"dlconv({backend})"] / med["stock"], "target": 0.6}


def per_call(backend: str, blocks: int = 15, calls: int = 400) -> dict:
    import torch
    import dlconv.torch as dt

    x = torch.randn(1, 1, 1, 1)
    w = torch.randn(1, 1, 1, 1)
    x_nchw, w_oihw = x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1)
    xg = x.clone().requires_grad_()
    import dlconv
    xn, wn = x.numpy(), w.numpy()
    fns = {
        "dlconv.ops on NumPy (no bridge)": lambda: dlconv.conv2d(xn, wn, backend=backend),
        "dlconv": lambda: dt.conv2d(x, w, backend=backend),
        "dlconv (autograd)": lambda: dt.conv2d(xg, w, backend=backend),
        "torch.nn.functional.conv2d": lambda: torch.nn.functional.conv2d(x_nchw, w_oihw),
    }
    samples = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(50):
            f()
    for _ in range(blocks):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            samples[k].append((time.perf_counter() - t0) / calls)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"what": "forward of a 1x1 conv on a 1x1x1x1 tensor", "median_s": med,
            "ratio": med["dlconv"] / med["torch.nn.functional.conv2d"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = {"machine": machine(), "per_call": per_call(args.backend),
           "train_step": train_step(args.rounds, args.backend)}
    print(f"machine: {out['machine']}")
    pc = out["per_call"]
    print("per-call overhead (" + pc["what"] + "): " + ", ".join(
        f"{k} {v * 1e6:.1f} us" for k, v in pc["median_s"].items()) + f"; ratio {pc['ratio']:.1f}x")
    ts = out["train_step"]
    print(f"train step (batch {ts['batch']}, {ts['rounds']} rounds, max rel err {ts['max_rel_err']:.2g}): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ts["median_s"].items())
          + f"; dlconv/stock {ts['time_ratio']:.2f} (target <= {ts['target']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
