"""The end-to-end training step on Keras' TensorFlow backend: dlconv layers vs the stock
Keras layers, same weights, checked, then timed round-robin (:func:`run_train_step`), for
each model of :data:`TRAIN_MODELS` (the MNIST CNN; the physics ResNet of the ``ecal``
suite).  The torch and JAX Keras backends: :mod:`.keras_backends`."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .cases import TOLERANCE, max_rel_error
from .report import progress_bar as _progress
from .targets import MODEL_TRAIN_TARGETS
from .timing import Settings, rotating_round_robin


#: Where the loss and gradients of a model are checked against: "stock" (the stock Keras
#: model, TF's own ops) or "reference" (the same model on dlconv's reference backend, NumPy
#: float64 inside).  The ResNet needs the reference: its 23 relu convolutions and global max
#: pool amplify summation-order differences, and measured at batch 32 (2-core AMD EPYC,
#: TF 2.21) TF's oneDNN path is the outlier: its conv2d_10 kernel gradient differs from the
#: float64 reference by 2.8e-3 relative, while dlconv(cpp) agrees with it to 1.2e-6 and TF with
#: oneDNN off (TF_ENABLE_ONEDNN_OPTS=0, Eigen) to 1.6e-6.  So ours is held to the usual
#: TOLERANCE against the reference, and stock's own error is reported beside it.
#: The MNIST CNN too (2026-12-03, Intel Xeon, TF 2.21, batch 128, seeds 0-9): a max pool of
#: relu outputs routes its gradient through a window's one positive member, so a conv2 output
#: whose exact value is within rounding of 0 decides whether a dy reaches conv2's dw and db.
#: At seed 6 stock Keras computes one such output on the wrong side of 0: its conv2 bias
#: gradient differs from the float64 reference by 4.8e-3 relative, dlconv(cpp) by 5.6e-6; with
#: stock as the oracle that seed reported dlconv as wrong.  (The reference run adds ~2 s.)
ORACLES = ("stock", "reference")


@dataclasses.dataclass(frozen=True)
class TrainModel:
    """A model whose train step the bench times: the first of ``builders`` that
    ``dlconv.models`` has, each called as ``f(backend=..., stock=..., seed=...)``;
    ``batch`` None: the run's batch.  Input shape and class count are read off the model."""

    name: str
    title: str
    builders: Tuple[str, ...]
    batch: Optional[int] = None
    #: Largest accepted max relative error of the loss and gradients against the oracle.
    tolerance: float = TOLERANCE
    #: What the loss and gradients are checked against, one of :data:`ORACLES`.
    oracle: str = "stock"

    def builder(self):
        """Imports Keras and TensorFlow."""
        import importlib
        models = importlib.import_module("dlconv.models")
        for b in self.builders:
            if getattr(models, b, None) is not None:
                return getattr(models, b)
        raise ImportError(f"dlconv.models has no {self.title} builder ({' / '.join(self.builders)})")


#: The models a train step can be timed for (rows' ``layer``), see :mod:`.suites`.
TRAIN_MODELS = {m.name: m for m in (
    TrainModel("mnist_cnn", "MNIST CNN", ("mnist_cnn", "cnn"), oracle="reference"),
    TrainModel("resnet_ecal", "ECAL ResNet", ("resnet_ecal",), batch=32, oracle="reference"),
)}


def mnist_cnn_builder():
    """``dlconv.models``' MNIST CNN builder, ``f(backend=..., stock=..., seed=...)``
    (named ``cnn`` there; ``mnist_cnn`` accepted too).  Imports Keras and TensorFlow."""
    return TRAIN_MODELS["mnist_cnn"].builder()


#: Steps per stock compile mode (tf.function, XLA) in the probe that picks the faster one.
TRAIN_PROBE_STEPS = 5


def _loss(keras, model):
    """The loss the model's head calls for: sparse categorical cross-entropy over several
    classes, binary over one; from logits unless the last layer applies softmax/sigmoid."""
    act = getattr(getattr(model.layers[-1], "activation", None), "__name__", "linear")
    probs = act in ("softmax", "sigmoid")
    if model.output_shape[-1] == 1:
        return keras.losses.BinaryCrossentropy(from_logits=not probs)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not probs)


def run_train_step(backends: Sequence[str], settings: Settings, progress: bool = True,
                   model: str = "mnist_cnn") -> List[dict]:
    """One optimizer step of ``model`` (:data:`TRAIN_MODELS`; default the MNIST CNN at
    ``settings.batch``, the ResNet at its own batch unless ``settings.batch_fixed``): dlconv
    layers vs stock Keras, random inputs of the model's input shape, random labels.

    Adam and (sparse categorical) cross-entropy (the workshop's settings).  Both models get
    the same weights.  Correctness: loss and gradients of one batch (in inference mode, so
    dropout does not differ) agree with the model's oracle (:attr:`TrainModel.oracle`: the
    stock model, or the same model on dlconv's float64 reference backend, with stock's own
    error then reported as ``stock_max_rel_err``) within :attr:`TrainModel.tolerance`.  Timing: ``model.train_on_batch`` (dropout on, the real
    step), every model sampled in turn, one step each per round
    (:attr:`Settings.train_repeats` rounds).
    The stock model is compiled with and without XLA; a short interleaved probe
    (:data:`TRAIN_PROBE_STEPS` steps each) picks the faster mode, and only that one joins the
    round-robin with ours (the probe medians are kept in ``modes``): a mode several times
    slower would otherwise leave its threads and caches behind for whichever step follows it.
    """
    tm = TRAIN_MODELS[model]
    targets = MODEL_TRAIN_TARGETS.get(model, {})
    batch = settings.batch if settings.batch_fixed or tm.batch is None else tm.batch
    rows = []
    base = {"layer": model, "pass": "train-step", "device": "cpu", "batch": batch,
            "status": None, "why": None, "median_s": None, "stock_median_s": None,
            "time_ratio": None, "correct": None, "max_rel_err": None, "target": None,
            "target_met": None, "tol": tm.tolerance}
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf
        build_cnn = tm.builder()
        probe_model = build_cnn(stock=True, seed=settings.seed)
    except Exception as exc:  # models not written yet, or no TensorFlow: the row says why
        for b in backends:
            rows.append(dict(base, impl=f"dlconv({b})", backend=b, status="skipped",
                             why=f"dlconv.models' {tm.title} unavailable: {type(exc).__name__}: {exc}"[:300],
                             target=targets.get(b)))
        return rows

    rng = np.random.default_rng(settings.seed)
    x = rng.random((batch, *probe_model.input_shape[1:]), dtype=np.float32)
    classes = int(probe_model.output_shape[-1])
    y = rng.integers(0, max(classes, 2), batch).astype(np.int32 if classes > 1 else np.float32)
    if classes == 1:
        y = y.reshape(-1, 1)
    loss_fn = _loss(keras, probe_model)
    del probe_model
    bar = _progress(1 + len(backends), progress)

    def compiled(model, jit):
        # the workshop's settings (dlconv.models.compile_model), plus the XLA switch
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn,
                      metrics=["accuracy"], jit_compile=jit)
        return model

    def loss_and_grads(model):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = tape.gradient(loss, model.trainable_variables)
        return [np.asarray(loss)] + [np.asarray(g) for g in grads]

    def warm(model):
        model.train_on_batch(x, y)                       # traces the train function
        for _ in range(settings.warmup):
            model.train_on_batch(x, y)
        return model

    def time_round_robin(models, rounds=settings.train_repeats):
        """Median step time of each model, one step of each per round, the order rotating
        (:func:`~.timing.rotating_round_robin`: the XLA model's threads and caches, say, are
        left behind for every contender equally often)."""
        samples = rotating_round_robin({k: (lambda m=m: m.train_on_batch(x, y))
                                        for k, m in models.items()}, rounds)
        return {k: (statistics.median(v), v) for k, v in samples.items()}

    bar.set_description("train step: stock Keras")
    contenders = {}
    stock_error = None
    for jit in (False, True):
        try:
            contenders["xla" if jit else "tf.function"] = warm(
                compiled(build_cnn(stock=True, seed=settings.seed), jit))
        except Exception as exc:  # XLA may be unavailable: the other mode still counts
            stock_error = f"{type(exc).__name__}: {exc}"[:300]
    bar.update(1)
    if not contenders:
        for b in backends:
            rows.append(dict(base, impl=f"dlconv({b})", backend=b, status="error",
                             why=f"stock model failed: {stock_error}", target=targets.get(b)))
        bar.close()
        return rows
    stock_mode_names = list(contenders)
    stock = build_cnn(stock=True, seed=settings.seed)
    expected = loss_and_grads(stock)
    oracle_note = None
    if tm.oracle == "reference":
        oracle = build_cnn(backend="reference", stock=False, seed=settings.seed)
        oracle.set_weights(stock.get_weights())
        stock_expected, expected = expected, loss_and_grads(oracle)
        stock_err = max_rel_error(stock_expected, expected)
        oracle_note = (f"checked against dlconv.reference (float64 inside); stock Keras itself "
                       f"differs from it by {stock_err:.2g}")

    ours_rows = {}
    for b in backends:
        bar.set_description(f"train step: dlconv({b})")
        row = dict(base, impl=f"dlconv({b})", backend=b, target=targets.get(b))
        try:
            ours = build_cnn(backend=b, stock=False, seed=settings.seed)
            ours.set_weights(stock.get_weights())
            err = max_rel_error(loss_and_grads(ours), expected)
            row["max_rel_err"] = err if math.isfinite(err) else None
            row["correct"] = bool(err <= tm.tolerance)
            if oracle_note:
                row.update(note=oracle_note, stock_max_rel_err=stock_err)
            if not row["correct"]:
                what = "dlconv.reference" if tm.oracle == "reference" else "stock Keras"
                row.update(status="failed", why=f"loss/gradients differ from {what}: max "
                                                f"relative error {err:.3g}; not timed")
            else:
                contenders[f"dlconv({b})"] = warm(compiled(ours, False))
        except Exception as exc:  # the row shows the failure; other backends still run
            row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
        ours_rows[b] = row
        bar.update(1)

    bar.set_description("train step: probing the stock model's compile modes")
    probe = time_round_robin({m: contenders[m] for m in stock_mode_names}, TRAIN_PROBE_STEPS)
    stock_mode = min(stock_mode_names, key=lambda m: probe[m][0])
    for m in stock_mode_names:
        if m != stock_mode:
            del contenders[m]
    bar.set_description(f"train step: timing {len(contenders)} models interleaved")
    timed = time_round_robin(contenders)
    t_stock = timed[stock_mode][0]
    rows.append(dict(base, impl=f"stock keras {keras.__version__} ({stock_mode})", backend="builtin",
                     status="ok", median_s=t_stock, stock_median_s=t_stock, time_ratio=1.0,
                     correct=True, modes={m: v[0] for m, v in probe.items()}))
    for b, row in ours_rows.items():
        row["stock_median_s"] = t_stock
        if f"dlconv({b})" in timed:
            t, samples = timed[f"dlconv({b})"]
            row.update(status="ok", median_s=t, samples_s=samples, time_ratio=t / t_stock)
        if row["target"] is not None:
            row["target_met"] = (None if row["time_ratio"] is None
                                 else bool(row["time_ratio"] <= row["target"]))
        rows.append(row)
    bar.close()
    return rows
