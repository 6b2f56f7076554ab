"""One MNIST CNN epoch through Keras with dlconv layers, on the torch and the JAX Keras
backends, beside the stock Keras model on the same backend (cuDNN on a GPU): accuracy and
median step time.  A step of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_keras_epoch.py OUT_DIR [--dry-run] [--budget-s S] [--data PATH]

Each Keras backend runs in a child process of its own (Keras fixes its backend on first
import).  Keras, namex and optree are not installed on the GPU machine: gpu_check.sh
installs them from wheels carried in ``.whl/`` first.  Data: the MNIST test set when
``--data``/``$DLCONV_MNIST``/``../shared/data/mnist`` has it (the workshop split: train on
the first 8,000 images, test on the last 2,000), else a seeded synthetic 10-class set of
28×28 images (said so in the output).  ``--dry-run`` (CPU, no GPU): 512 images, batch 64.

Writes ``OUT_DIR/gpu-keras.json`` and prints a Markdown table (gpu_check.sh appends it to
its summary).  Exit status 0 when every run trained and dlconv's accuracy is within 1 point
of the stock model's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "jax")
#: Accuracy gap to the stock model on the same backend that still passes (issue 10).
MAX_GAP = 0.01


def _synthetic(n: int, seed: int = 0):
    """A seeded 10-class stand-in for MNIST: each class a fixed random stroke pattern,
    each image its class pattern shifted by up to 2 pixels plus noise, uint8 in 0..255."""
    import numpy as np
    rng = np.random.default_rng(seed)
    protos = (rng.random((10, 28, 28)) > 0.8).astype(np.float32)
    y = rng.integers(0, 10, n)
    x = np.empty((n, 28, 28), np.float32)
    for i, c in enumerate(y):
        dy, dx = rng.integers(-2, 3, 2)
        x[i] = np.roll(np.roll(protos[c], dy, 0), dx, 1)
    x = np.clip(x * 200 + rng.normal(0, 30, x.shape), 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


def _data(path, dry: bool):
    from dlconv import data
    limit = 512 if dry else None
    try:
        ds = data.load_mnist(path, download=False, announce=False)
        if ds.is_standin:
            raise FileNotFoundError("only a stand-in was found")
        x_tr, y_tr, x_te, y_te, desc = data.training_split(ds, limit)
        return x_tr, y_tr, x_te[: (256 if dry else None)], y_te[: (256 if dry else None)], desc
    except Exception as exc:  # no MNIST on this machine: say so, use the synthetic set
        n_tr, n_te = (512, 256) if dry else (8000, 2000)
        x, y = _synthetic(n_tr + n_te)
        return (x[:n_tr], y[:n_tr], x[n_tr:], y[n_tr:],
                f"synthetic 10-class 28x28 set, seeded ({n_tr} train / {n_te} test): MNIST not "
                f"available here ({type(exc).__name__}: {exc})")


def child(keras_backend: str, data_path, dry: bool, batch: int) -> dict:
    """Train stock and dlconv CNNs one epoch each on this process' Keras backend."""
    os.environ["KERAS_BACKEND"] = keras_backend
    import keras
    import numpy as np

    from dlconv import models

    x_tr, y_tr, x_te, y_te, desc = _data(data_path, dry)
    xtr, xte = models.prepare_images(x_tr, "cnn"), models.prepare_images(x_te, "cnn")
    out = {"keras_backend": keras_backend, "keras": keras.__version__, "data": desc,
           "batch": batch, "runs": []}
    if keras_backend == "torch":
        import torch
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    else:
        import jax
        out["device"] = str(jax.devices()[0])

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.t0)

    for label, stock in (("stock keras", True), ("dlconv", False)):
        keras.utils.set_random_seed(0)
        run = {"model": label}
        try:
            model = models.compile_model(models.cnn(stock=stock, backend="auto", seed=0))
            timer = StepTimer()
            timer.times = []
            t0 = time.perf_counter()
            model.fit(xtr, y_tr, epochs=1, batch_size=batch, verbose=0, callbacks=[timer])
            run["epoch_s"] = time.perf_counter() - t0
            loss, acc = model.evaluate(xte, y_te, batch_size=256, verbose=0)
            steady = timer.times[1:] or timer.times     # the first step compiles/traces
            run.update(status="ok", accuracy=float(acc), loss=float(loss), steps=len(timer.times),
                       median_step_s=statistics.median(steady), first_step_s=timer.times[0],
                       jit=bool(model.jit_compile))
        except Exception as exc:  # reported in the table, the other run still goes
            run.update(status="error", why=f"{type(exc).__name__}: {exc}"[:400])
        out["runs"].append(run)
    return out


def _table(results) -> str:
    lines = ["| Keras backend | device | model | accuracy | median step | vs stock | epoch | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "runs" not in r:
            lines.append(f"| {r['keras_backend']} | — | — | — | — | — | — | {r.get('error', '')} |")
            continue
        stock = next((x for x in r["runs"] if x["model"] == "stock keras" and x["status"] == "ok"), None)
        for run in r["runs"]:
            if run["status"] != "ok":
                lines.append(f"| {r['keras_backend']} | {r['device']} | {run['model']} | error | | | | "
                             f"{run['why']} |")
                continue
            ratio = f"{run['median_step_s'] / stock['median_step_s']:.2f}×" if stock else "—"
            lines.append(f"| {r['keras_backend']} | {r['device']} | {run['model']} | {run['accuracy']:.4f} | "
                         f"{run['median_step_s'] * 1e3:.2f} ms | {ratio} | {run['epoch_s']:.1f} s | "
                         f"jit={run['jit']} |")
    return "\n".join(lines)


def _report(results) -> str:
    lines = ["### One MNIST CNN epoch through Keras: dlconv layers vs stock", ""]
    lines += [f"- {r['keras_backend']}: data {r['data']}; batch {r['batch']}" for r in results if "data" in r]
    return "\n".join(lines + ["", _table(results)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default=os.environ.get("OUT", "gpu-check-out"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--data", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--child", choices=BACKENDS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--table", metavar="JSON", default=None,
                   help="print the Markdown table of a gpu-keras.json and exit")
    args = p.parse_args(argv)
    if args.table:
        print(_report(json.loads(pathlib.Path(args.table).read_text())))
        return 0
    batch = args.batch or (64 if args.dry_run else 128)
    data_path = args.data or os.environ.get("DLCONV_MNIST") or str(REPO.parent / "shared" / "data" / "mnist")
    if args.child:
        print("DLCONV-KERAS-EPOCH " + json.dumps(child(args.child, data_path, args.dry_run, batch)))
        return 0
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = []
    for kb in BACKENDS:
        left = deadline - time.monotonic()
        if left < 20:
            results.append({"keras_backend": kb, "error": "time budget spent before this run"})
            continue
        cmd = [sys.executable, __file__, "--child", kb, "--data", data_path, "--batch", str(batch)]
        cmd += ["--dry-run"] if args.dry_run else []
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            results.append({"keras_backend": kb, "error": f"did not finish within {left:.0f} s"})
            continue
        sys.stderr.write(proc.stderr[-3000:])
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("DLCONV-KERAS-EPOCH ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"keras_backend": kb, "error": f"exit {proc.returncode}: {tail[:300]}"})
        else:
            results.append(json.loads(line.split(" ", 1)[1]))
    (out_dir / "gpu-keras.json").write_text(json.dumps(results, indent=2))
    print(_report(results))
    ok = True
    for r in results:
        runs = {x["model"]: x for x in r.get("runs", [])}
        s, d = runs.get("stock keras"), runs.get("dlconv")
        if not (s and d and s["status"] == d["status"] == "ok"):
            ok = False
        elif abs(d["accuracy"] - s["accuracy"]) > MAX_GAP and not args.dry_run:
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
