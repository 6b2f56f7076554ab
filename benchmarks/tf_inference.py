"""MNIST CNN inference (and the batch-128 train step) on Keras' TensorFlow backend: dlconv(cpp)
vs the stock layers, for both TensorFlow bridge paths — the graph-native ops (dlconv.tf_ops)
and the numpy_function callbacks (DLCONV_TF_OPS=0) — each in its own child process.

In each child, the dlconv CNN (``dlconv.models.cnn(backend="cpp")``) and the stock one share
weights; every case is sampled in turn with the stock model (round robin, the order rotating:
dlconv.bench_keras._round_robin) and the medians' ratio is reported (< 1: dlconv is faster).

    python benchmarks/tf_inference.py                 # both paths, batches 1, 8, 128
    python benchmarks/tf_inference.py --paths native --rounds 300 --json out.json

A benchmark, not a test: absolute times only mean something with the machine they came from
(printed first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = ("predict_on_batch", "tf.function", "eager")


def child(args) -> dict:
    import numpy as np
    import tensorflow as tf

    from dlconv import models
    from dlconv.bench_keras import _round_robin, measure_train_step
    from dlconv.bridges import tensorflow as br

    out = {"path": "native" if br.uses_native("cpp") else "callbacks", "why": br.NATIVE_REASON,
           "inference": [], "train_step": None}
    ours = models.cnn(backend="cpp", seed=0)
    stock = models.cnn(stock=True, seed=0)
    stock.set_weights(ours.get_weights())
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = tf.constant(rng.random((batch, 28, 28, 1), dtype=np.float32))
        fns = {}
        for name, m in (("dlconv", ours), ("stock", stock)):
            f = tf.function(m)
            fns[name] = {"predict_on_batch": lambda m=m: m.predict_on_batch(x),
                         "tf.function": lambda f=f: f(x).numpy(),
                         "eager": lambda m=m: m(x).numpy()}
        err = float(np.abs(ours.predict_on_batch(x) - stock.predict_on_batch(x)).max())
        rounds = max(args.rounds // max(batch // 8, 1), 20)
        for mode in MODES:
            pair = {k: fns[k][mode] for k in ("dlconv", "stock")}
            for _ in range(args.warmup):
                for f in pair.values():
                    f()
            t = _round_robin(pair, rounds)
            out["inference"].append({"batch": batch, "mode": mode, "dlconv_s": t["dlconv"],
                                     "stock_s": t["stock"], "ratio": t["dlconv"] / t["stock"],
                                     "rounds": rounds, "max_abs_diff": err})
    if args.train_rounds:
        rows = measure_train_step(["cpp"], 128, args.train_rounds, 3)
        row = [r for r in rows if r["backend"] == "cpp"][0]
        out["train_step"] = {"batch": 128, "dlconv_s": row.get("median_s"), "stock_s": row["stock_median_s"],
                             "ratio": row.get("time_ratio"), "status": row["status"], "why": row["why"]}
    return out


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default="native,callbacks", help="native, callbacks or both (comma-separated)")
    p.add_argument("--batches", default="1,8,128", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=200, help="samples per case at batch <= 8 (fewer for larger)")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per case first (fewer warm-up calls measured the first case high)")
    p.add_argument("--train-rounds", type=int, default=15, help="train-step samples (0: skip the train step)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    results = {"machine": machine(), "paths": {}}
    print(f"machine: {results['machine']}")
    for path in args.paths.split(","):
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
        if path == "callbacks":
            env["DLCONV_TF_OPS"] = "0"
        cmd = [sys.executable, __file__, "--child", "--batches", ",".join(map(str, args.batches)),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--train-rounds", str(args.train_rounds)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or "RESULT " not in proc.stdout:
            print(f"{path}: child failed\n{proc.stderr[-2000:]}")
            return 1
        r = json.loads(proc.stdout.split("RESULT ", 1)[1])
        results["paths"][path] = r
        print(f"\nbridge path: {r['path']}" + (f" ({r['why']})" if r["why"] else ""))
        print(f"  {'batch':>5}  {'mode':<17} {'dlconv ms':>9} {'stock ms':>9} {'ratio':>6}")
        for row in r["inference"]:
            print(f"  {row['batch']:>5}  {row['mode']:<17} {row['dlconv_s'] * 1e3:9.3f} {row['stock_s'] * 1e3:9.3f} "
                  f"{row['ratio']:6.2f}")
        t = r["train_step"]
        if t:
            if t["ratio"] is None:
                print(f"  train step, batch 128: {t['status']}: {t['why']}")
            else:
                print(f"  train step, batch 128 (train_on_batch): {t['dlconv_s'] * 1e3:.1f} ms vs "
                      f"{t['stock_s'] * 1e3:.1f} ms stock, ratio {t['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
