"""Train a workshop model on MNIST, or the ECAL ResNet on generated showers (``dlconv train``).

    dlconv train --model cnn --backend cpp --epochs 2 --batch-size 128 --compare
    dlconv train --keras-backend torch        (or jax, tensorflow: Keras' backend for the run)
    dlconv train --model resnet_ecal --events 4000 --epochs 3 --compare

trains with Keras' progress bar, then prints the test accuracy and the time per epoch;
``--compare`` also trains the stock Keras twin (same seed, same initial weights, same
data and shuffling) and prints both side by side.  The data come from
:func:`dlconv.data.load_mnist` (``--data PATH`` or ``$DLCONV_MNIST`` first); when only the
10,000-image test set is available the workshop's split is used (train on its first
8,000, test on its last 2,000) and the output says so.

``--model resnet_ecal`` (:func:`dlconv.models.resnet_ecal`) trains on ``--events`` images of
:mod:`dlconv.showers` (γ vs π⁰ → γγ, generated with ``--seed``; the last quarter held out
for the test) and prints the test ROC AUC (π⁰ as the positive class) next to the accuracy.

Python API: :func:`train_model` (one run → :class:`RunResult`) and :func:`run`.
The module imports nothing heavy until a run starts (``dlconv --help`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

__all__ = ["RunResult", "train_model", "add_arguments", "run", "MODEL_NAMES", "BACKEND_NAMES"]

MODEL_NAMES = ("cnn", "dense", "wide", "deep", "resnet_ecal")
#: Models trained on generated calorimeter showers (:mod:`dlconv.showers`), not MNIST.
ECAL_MODEL_NAMES = ("resnet_ecal",)
#: Default number of generated events for ``resnet_ecal``: 3,000 train / 1,000 test, with
#: the default 2 epochs about 1.5 minutes on a busy 2-core machine and a test AUC of 0.76
#: (20,000 events and 6 epochs reach 0.91: docs/resnet_ecal.md).
DEFAULT_EVENTS = 4000
#: Default batch size; resnet_ecal's is smaller (its few thousand events then make about a
#: hundred Adam steps per epoch, and 32 is the batch of its train-step benchmark).
DEFAULT_BATCH_SIZE, ECAL_BATCH_SIZE = 128, 32
KERAS_BACKENDS = ("tensorflow", "torch", "jax")
BACKEND_NAMES = ("auto", "cpp", "numba", "reference")


@dataclasses.dataclass
class RunResult:
    """One training run: what ran, its test accuracy and loss, and seconds per epoch
    (``test_auc``: the ROC AUC of class 1 for a two-class model, else None)."""

    model: str
    label: str              # "dlconv (cpp)" or "stock keras"
    test_accuracy: float
    test_loss: float
    epoch_seconds: List[float]
    history: dict
    test_auc: Optional[float] = None

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODEL_NAMES, default="cnn",
                   help="cnn (default), dense (784-64-64-10), wide (784-512-512-10), deep; "
                        "resnet_ecal (the ECAL ResNet on generated showers)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="kernels behind the dlconv layers (default: auto, the fastest here)")
    p.add_argument("--keras-backend", choices=KERAS_BACKENDS, default=None,
                   help="Keras backend of the run (default: $KERAS_BACKEND, else tensorflow)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=2)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                   help=f"default {DEFAULT_BATCH_SIZE} ({ECAL_BATCH_SIZE} for resnet_ecal)")
    p.add_argument("--compare", action="store_true",
                   help="also train the stock Keras twin (same seed and data) and compare")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="mnist.npz or a folder of MNIST IDX files (default: $DLCONV_MNIST, "
                        "Keras' cache, Keras' download, then a stand-in)")
    p.add_argument("--offline", action="store_true",
                   help="never try Keras' download (use the stand-in when MNIST is not local)")
    p.add_argument("--limit", type=_positive_int("--limit"), default=None,
                   help="use only the first N training images")
    p.add_argument("--events", type=_positive_int("--events"), default=None,
                   help=f"resnet_ecal: generated events, a quarter held out for the test "
                        f"(default {DEFAULT_EVENTS:,})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initial weights, dropout, shuffling (and resnet_ecal's events)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _EpochTimer:
    """A Keras callback (built lazily, Keras is imported on use) recording epoch times."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._t0)

        return Timer()


def train_model(model_name: str, x_train, y_train, x_test, y_test, *, backend: str = "auto",
                stock: bool = False, epochs: int = 2, batch_size: int = 128, seed: int = 0,
                learning_rate: float = 1e-3, verbose: int = 0) -> RunResult:
    """Build model ``model_name`` (dlconv or stock twin), train it, evaluate it.

    Images are uint8 (N, 28, 28) as :func:`dlconv.data.training_split` returns them, or for
    ``resnet_ecal`` GeV images (N, H, W, 1) as :func:`dlconv.showers.training_split` does.
    The global Keras seed is set to ``seed`` first, so a dlconv run and a stock run with
    the same seed see the same initial weights, dropout masks and shuffling.
    """
    import keras
    import numpy as np

    from . import models

    keras.utils.set_random_seed(seed)
    if model_name in ECAL_MODEL_NAMES:
        from . import showers
        xtr, xte = showers.prepare(x_train), showers.prepare(x_test)
        kwargs = {"input_shape": xtr.shape[1:]}
    else:
        xtr, xte = models.prepare_images(x_train, model_name), models.prepare_images(x_test, model_name)
        kwargs = {}
    model = models.compile_model(models.build(model_name, backend=backend, stock=stock, seed=seed,
                                              **kwargs),
                                 learning_rate=learning_rate)
    timer = _EpochTimer()
    hist = model.fit(xtr, y_train, epochs=epochs, batch_size=batch_size, verbose=verbose,
                     callbacks=[timer])
    loss, acc = model.evaluate(xte, y_test, batch_size=max(batch_size, 256), verbose=0)
    auc = None
    if model.output_shape[-1] == 2:
        from .metrics import roc_auc
        prob = model.predict(xte, batch_size=max(batch_size, 256), verbose=0)
        auc = roc_auc(np.asarray(y_test), np.asarray(prob)[:, 1])
    if stock:
        label = "stock keras"
    else:
        from .runtime import resolve_backend
        label = f"dlconv ({resolve_backend(backend, False).name})"
    return RunResult(model_name, label, float(acc), float(loss), timer.times, dict(hist.history),
                     auc)


def _check_backend(name: str) -> Optional[str]:
    """None if ``name`` can run on this CPU, else the reason."""
    from . import backends

    try:
        be = backends.auto(False) if name == "auto" else backends.get(name)
        ok, why = be.cpu_status()
    except Exception as exc:  # unavailable or failed import: report it
        return f"{type(exc).__name__}: {exc}"
    return None if ok else why


def _select_keras_backend(name: Optional[str]) -> Optional[str]:
    """Make ``name`` Keras' backend for this process (before keras is imported): None when
    done, else why not."""
    if name is None:
        return None
    keras = sys.modules.get("keras")
    if keras is not None:
        current = keras.config.backend()
        return None if current == name else (
            f"keras was already imported with the {current!r} backend in this process; "
            f"run dlconv train --keras-backend {name} in a fresh one")
    os.environ["KERAS_BACKEND"] = name
    return None


def run(args) -> int:
    from . import data

    reason = _select_keras_backend(args.keras_backend)
    if reason is not None:
        print(f"dlconv train: --keras-backend {args.keras_backend}: {reason}", file=sys.stderr)
        return 2
    reason = _check_backend(args.backend)
    if reason is not None:
        print(f"dlconv train: backend {args.backend!r} cannot run on this CPU: {reason}",
              file=sys.stderr)
        return 2
    if args.model in ECAL_MODEL_NAMES:
        if args.data is not None:
            print(f"dlconv train: --data is MNIST's; --model {args.model} trains on generated "
                  f"showers (--events, --seed)", file=sys.stderr)
            return 2
        from . import showers
        n_events = DEFAULT_EVENTS if args.events is None else args.events
        if n_events < 8:
            print(f"dlconv train: --events must be at least 8 (6 train, 2 test), got {n_events}",
                  file=sys.stderr)
            return 2
        x_tr, y_tr, x_te, y_te, desc = showers.training_split(n_events, args.seed)
        if args.limit is not None and args.limit < len(x_tr):
            x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
            desc += f"; limited to the first {args.limit:,} training events"
    else:
        if args.events is not None:
            print(f"dlconv train: --events is for the generated-shower models "
                  f"{ECAL_MODEL_NAMES}, not --model {args.model}", file=sys.stderr)
            return 2
        ds = data.load_mnist(args.data, download=not args.offline)
        x_tr, y_tr, x_te, y_te, desc = data.training_split(ds, args.limit)
    print(f"data: {desc}")
    if args.batch_size is None:
        args.batch_size = ECAL_BATCH_SIZE if args.model in ECAL_MODEL_NAMES else DEFAULT_BATCH_SIZE
    import keras
    print(f"Keras backend: {keras.config.backend()}")
    print(f"model: {args.model}, {len(x_tr):,} training / {len(x_te):,} test images, "
          f"{args.epochs} epoch(s), batch size {args.batch_size}, seed {args.seed}")
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
              learning_rate=args.learning_rate, verbose=0 if args.quiet else 1)
    results = [train_model(args.model, x_tr, y_tr, x_te, y_te, backend=args.backend, **kw)]
    print(_summary(results[0]))
    if args.compare:
        results.append(train_model(args.model, x_tr, y_tr, x_te, y_te, stock=True, **kw))
        print(_summary(results[1]))
    print()
    print(format_table(results))
    return 0


def _summary(r: RunResult) -> str:
    auc = "" if r.test_auc is None else f"test AUC {r.test_auc:.4f}, "
    return f"{r.label}: test accuracy {r.test_accuracy:.4f}, {auc}{r.seconds_per_epoch:.2f} s/epoch"


def format_table(results: List[RunResult]) -> str:
    """Side-by-side table of runs (accuracy, AUC where there is one, loss, seconds per
    epoch, time ratio)."""
    base = results[-1].seconds_per_epoch
    with_auc = any(r.test_auc is not None for r in results)
    head = f"{'run':<20} {'test acc':>9}" + (f" {'test AUC':>9}" if with_auc else "") \
        + f" {'test loss':>10} {'s/epoch':>9}"
    if len(results) > 1:
        head += f" {'time vs ' + results[-1].label:>22}"
    lines = [head, "-" * len(head)]
    for r in results:
        auc = "" if not with_auc else (f" {'-':>9}" if r.test_auc is None else f" {r.test_auc:>9.4f}")
        line = (f"{r.label:<20} {r.test_accuracy:>9.4f}{auc} {r.test_loss:>10.4f} "
                f"{r.seconds_per_epoch:>9.2f}")
        if len(results) > 1:
            line += f" {r.seconds_per_epoch / base:>21.2f}x"
        lines.append(line)
    return "\n".join(lines)
