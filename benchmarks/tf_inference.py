"""MNIST CNN inference (and the batch-128 train step) on Keras' TensorFlow backend: dlconv(cpp)
vs the stock layers, for both TensorFlow bridge paths — the graph-native ops (dlconv.tf_ops)
and the numpy_function callbacks (DLCONV_TF_OPS=0) — each in its own child process.

The measuring is ``dlconv bench``'s (:func:`dlconv.bench.inference.run_inference`: same
weights, every mode — predict_on_batch, tf.function, eager — sampled round robin with the
stock model, the order rotating; ratio < 1: dlconv is faster); this script only runs it once
per bridge path, each in a child process, and prints the per-mode table.

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

from dlconv.bench.inference import MODES, ROUNDS, WARMUP  # noqa: F401  (MODES re-exported)


def child(args) -> dict:
    from dlconv.bench.inference import bridge_path, run_inference
    from dlconv.bench.keras_backends import measure_train_step

    path, why = bridge_path("cpp")
    out = {"path": path, "why": why, "inference": [], "train_step": None}
    for r in run_inference("cpp", args.batches, args.rounds, args.warmup, progress=False):
        if r["status"] != "ok":
            raise RuntimeError(f"inference batch {r['batch']}: {r['status']}: {r['why']}")
        for mode, m in r["modes"].items():
            out["inference"].append({"batch": r["batch"], "mode": mode, "dlconv_s": m["dlconv_s"],
                                     "stock_s": m["stock_s"], "ratio": m["ratio"],
                                     "rounds": r["rounds"], "max_rel_err": r["max_rel_err"]})
        out["inference"].append({"batch": r["batch"], "mode": f"best ({r['mode']} / {r['stock_mode']})",
                                 "dlconv_s": r["median_s"], "stock_s": r["stock_median_s"],
                                 "ratio": r["ratio"], "rounds": r["rounds"],
                                 "max_rel_err": r["max_rel_err"]})
    if args.train_rounds:
        rows = measure_train_step(["cpp"], 128, args.train_rounds, 3)
        row = [r for r in rows if r["backend"] == "cpp"][0]
        out["train_step"] = {"batch": 128, "dlconv_s": row.get("median_s"), "stock_s": row["stock_median_s"],
                             "ratio": row.get("time_ratio"), "status": row["status"], "why": row["why"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default="native,callbacks", help="native, callbacks or both (comma-separated)")
    p.add_argument("--batches", default="1,8,128", help="batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="samples per case at batch <= 8 (fewer for larger)")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls per case first")
    p.add_argument("--train-rounds", type=int, default=15, help="train-step samples (0: skip the train step)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    from dlconv.bench.machine import describe_machine

    results = {"machine": describe_machine()["description"], "paths": {}}
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
        print(f"  {'batch':>5}  {'mode':<40} {'dlconv ms':>9} {'stock ms':>9} {'ratio':>6}")
        for row in r["inference"]:
            print(f"  {row['batch']:>5}  {row['mode']:<40} {row['dlconv_s'] * 1e3:9.3f} {row['stock_s'] * 1e3:9.3f} "
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
