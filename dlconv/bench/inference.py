"""MNIST CNN inference on Keras' TensorFlow backend at small batches (issue 12): dlconv(cpp)
vs the stock Keras model with the same weights, in this process (:func:`run_inference`).

For each batch, each of :data:`MODES` (``predict_on_batch``, a ``tf.function`` of the model,
an eager call) is warmed up, then sampled round-robin with the stock model, the order
rotating (:func:`~.timing.rotating_round_robin`), and the medians kept.  A row's ``ratio``
is dlconv's best mode over stock's best mode (< 1: dlconv is faster), the figure of issue
12's targets (:data:`~.targets.INFERENCE_TARGETS`); ``modes`` keeps every mode's medians
and ratio.  Correctness: dlconv's predictions against the stock model's, max relative error
≤ :data:`~.cases.TOLERANCE`.  The TensorFlow bridge path (graph-native ops or
``numpy_function`` callbacks) is whichever this process uses; rows say which.
``benchmarks/tf_inference.py`` runs this in a child process per path.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import List, Sequence

import numpy as np

from .cases import TOLERANCE, max_rel_error
from .report import progress_bar as _progress
from .targets import INFERENCE_TARGETS
from .timing import rotating_round_robin

#: The timed ways to run a Keras model on one batch.
MODES = ("predict_on_batch", "tf.function", "eager")
#: The batches of issue 12's inference targets.
INFERENCE_BATCHES = (1, 8)
#: Samples per mode at batch <= 8 (fewer at larger batches), and untimed calls first: with
#: fewer warm-up calls the first mode measured came out high (TensorFlow's first calls).
ROUNDS = 200
WARMUP = 50
#: The same for ``--quick``.
QUICK_ROUNDS = 40
QUICK_WARMUP = 10
#: Fewest samples per mode at any batch.
MIN_ROUNDS = 20


def bridge_path(backend: str = "cpp") -> tuple:
    """("native" | "callbacks", why the native ops are not used or "")."""
    from ..bridges import tensorflow as br

    native = br.uses_native(backend)
    return ("native" if native else "callbacks"), ("" if native else br.NATIVE_REASON)


def run_inference(backend: str = "cpp", batches: Sequence[int] = INFERENCE_BATCHES,
                  rounds: int = ROUNDS, warmup: int = WARMUP, seed: int = 0,
                  progress: bool = True) -> List[dict]:
    """One row per batch: the MNIST CNN (``dlconv.models.cnn``) with ``backend``'s layers vs
    the stock one, both on TensorFlow, every mode of :data:`MODES` timed (see the module)."""
    base = {"layer": "mnist_cnn", "pass": "inference", "device": "cpu", "backend": backend,
            "impl": f"dlconv({backend})", "status": None, "why": None, "correct": None,
            "max_rel_err": None, "tol": TOLERANCE, "median_s": None, "stock_median_s": None,
            "ratio": None, "mode": None, "stock_mode": None, "modes": {}, "rounds": None,
            "path": None, "path_why": None}
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        from .. import models

        if keras.config.backend() != "tensorflow":
            raise RuntimeError(f"Keras' backend is {keras.config.backend()!r}, not tensorflow")
        ours = models.cnn(backend=backend, seed=seed)
        stock = models.cnn(stock=True, seed=seed)
        stock.set_weights(ours.get_weights())
        path, path_why = bridge_path(backend)
    except Exception as exc:  # no TensorFlow, or the model does not build: rows say why
        return [dict(base, batch=b, status="skipped", target=INFERENCE_TARGETS.get((backend, b)),
                     target_met=None, why=f"{type(exc).__name__}: {exc}"[:300]) for b in batches]

    rng = np.random.default_rng(seed)
    bar = _progress(len(batches) * len(MODES), progress)
    rows = []
    for batch in batches:
        row = dict(base, batch=batch, path=path, path_why=path_why or None,
                   target=INFERENCE_TARGETS.get((backend, batch)), target_met=None, modes={})
        x = tf.constant(rng.random((batch, *stock.input_shape[1:]), dtype=np.float32))
        try:
            err = max_rel_error([np.asarray(ours.predict_on_batch(x))],
                                [np.asarray(stock.predict_on_batch(x))])
        except Exception as exc:  # the row shows the failure; the next batch still runs
            row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300], correct=False)
            rows.append(row)
            bar.update(len(MODES))
            continue
        row["max_rel_err"] = err if math.isfinite(err) else None
        row["correct"] = bool(err <= TOLERANCE)
        if not row["correct"]:
            row.update(status="failed", why=f"predictions differ from stock Keras: max relative "
                                            f"error {err:.3g}; not timed")
            rows.append(row)
            bar.update(len(MODES))
            continue
        fns = {}
        for name, m in (("dlconv", ours), ("stock", stock)):
            f = tf.function(m)
            fns[name] = {"predict_on_batch": lambda m=m: m.predict_on_batch(x),
                         "tf.function": lambda f=f: f(x).numpy(),
                         "eager": lambda m=m: m(x).numpy()}
        n = max(rounds // max(batch // 8, 1), min(MIN_ROUNDS, rounds))
        for mode in MODES:
            bar.set_description(f"inference batch {batch}: {mode}")
            pair = {k: fns[k][mode] for k in ("dlconv", "stock")}
            for _ in range(warmup):
                for f in pair.values():
                    f()
            t = {k: statistics.median(v) for k, v in rotating_round_robin(pair, n).items()}
            row["modes"][mode] = {"dlconv_s": t["dlconv"], "stock_s": t["stock"],
                                  "ratio": t["dlconv"] / t["stock"]}
            bar.update(1)
        mine = min(row["modes"], key=lambda m: row["modes"][m]["dlconv_s"])
        theirs = min(row["modes"], key=lambda m: row["modes"][m]["stock_s"])
        t_ours, t_stock = row["modes"][mine]["dlconv_s"], row["modes"][theirs]["stock_s"]
        row.update(status="ok", median_s=t_ours, stock_median_s=t_stock, ratio=t_ours / t_stock,
                   mode=mine, stock_mode=theirs, rounds=n)
        if row["target"] is not None:
            row["target_met"] = bool(row["ratio"] <= row["target"])
        rows.append(row)
    bar.close()
    return rows


def inference_table_rows(rows: Sequence[dict]) -> List[List[str]]:
    """Rows of the inference table: batch, impl, path, best modes, times, ratio, correct, target."""
    out = []
    for r in rows:
        ok = r["status"] == "ok"
        ms = (lambda s: f"{s * 1e3:.3f} ms" if s is not None else "—")
        target = "" if r.get("target") is None else (
            f"≤ {r['target']:g}× " + ("—" if r["target_met"] is None else ("✓" if r["target_met"] else "✗")))
        per_mode = ", ".join(f"{m} {v['ratio']:.2f}" for m, v in r.get("modes", {}).items())
        out.append([str(r["batch"]), r["impl"], r.get("path") or "—",
                    f"{r['mode']} / {r['stock_mode']}" if ok else r["status"],
                    ms(r["median_s"]), ms(r["stock_median_s"]),
                    f"{r['ratio']:.2f}" if r.get("ratio") is not None else "—",
                    "—" if r["correct"] is None else ("✓" if r["correct"] else "✗"), target,
                    per_mode if ok else (r.get("why") or "")])
    return out


INFERENCE_HEADER = ["batch", "impl", "TF path", "best mode (ours / stock)", "dlconv", "stock",
                    "time ratio", "correct", "target", "per mode (time ratio)"]


def inference_targets(rows: Sequence[dict]) -> List[dict]:
    """Target lines (as :func:`~.targets.summarize_targets`') for the rows with a target."""
    out = []
    for r in rows:
        if r.get("target") is None:
            continue
        out.append({"label": f"MNIST CNN inference, batch {r['batch']}, dlconv({r['backend']}) vs "
                             f"stock Keras (best mode, time ratio)",
                    "device": "cpu", "layer": "mnist_cnn", "pass": "inference",
                    "backend": r["backend"], "target": f"≤ {r['target']:g}× time",
                    "best_impl": r["impl"], "value": r.get("ratio"), "met": r.get("target_met"),
                    "why": r.get("why") if r.get("ratio") is None else None})
    return out


def quick_settings(quick: bool) -> dict:
    """rounds and warmup for a ``--quick`` run or a full one."""
    return dict(rounds=QUICK_ROUNDS, warmup=QUICK_WARMUP) if quick else dict(rounds=ROUNDS, warmup=WARMUP)


def table_text(rows: Sequence[dict], table) -> List[str]:
    """The inference section of a report, rendered with ``table(header, rows)``."""
    if not rows:
        return []
    return ["", "MNIST CNN inference on TensorFlow (same weights; round-robin medians; time "
                "ratio = dlconv / stock, < 1: dlconv faster):", table(INFERENCE_HEADER,
                                                                      inference_table_rows(rows))]

