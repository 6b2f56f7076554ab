"""Train a workshop model on MNIST with dlconv layers (``dlconv train``).

    dlconv train --model cnn --backend cpp --epochs 2 --batch-size 128 --compare
    dlconv train --keras-backend torch        (or jax, tensorflow: Keras' backend for the run)

trains with Keras' progress bar, then prints the test accuracy and the time per epoch;
``--compare`` also trains the stock Keras twin (same seed, same initial weights, same
data and shuffling) and prints both side by side.  The data come from
:func:`dlconv.data.load_mnist` (``--data PATH`` or ``$DLCONV_MNIST`` first); when only the
10,000-image test set is available the workshop's split is used (train on its first
8,000, test on its last 2,000) and the output says so.

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

MODEL_NAMES = ("cnn", "dense", "wide", "deep")
KERAS_BACKENDS = ("tensorflow", "torch", "jax")
BACKEND_NAMES = ("auto", "cpp", "numba", "reference")


@dataclasses.dataclass
class RunResult:
    """One training run: what ran, its test accuracy and loss, and seconds per epoch."""

    model: str
    label: str              # "dlconv (cpp)" or "stock keras"
    test_accuracy: float
    test_loss: float
    epoch_seconds: List[float]
    history: dict

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
                   help="cnn (default), dense (784-64-64-10), wide (784-512-512-10), deep")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                   help="kernels behind the dlconv layers (default: auto, the fastest here)")
    p.add_argument("--keras-backend", choices=KERAS_BACKENDS, default=None,
                   help="Keras backend of the run (default: $KERAS_BACKEND, else tensorflow)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=2)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=128)
    p.add_argument("--compare", action="store_true",
                   help="also train the stock Keras twin (same seed and data) and compare")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="mnist.npz or a folder of MNIST IDX files (default: $DLCONV_MNIST, "
                        "Keras' cache, Keras' download, then a stand-in)")
    p.add_argument("--offline", action="store_true",
                   help="never try Keras' download (use the stand-in when MNIST is not local)")
    p.add_argument("--limit", type=_positive_int("--limit"), default=None,
                   help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of initial weights, dropout, shuffling")
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

    Images are uint8 (N, 28, 28) as :func:`dlconv.data.training_split` returns them.
    The global Keras seed is set to ``seed`` first, so a dlconv run and a stock run with
    the same seed see the same initial weights, dropout masks and shuffling.
    """
    import keras

    from . import models

    keras.utils.set_random_seed(seed)
    model = models.compile_model(models.build(model_name, backend=backend, stock=stock, seed=seed),
                                 learning_rate=learning_rate)
    xtr, xte = models.prepare_images(x_train, model_name), models.prepare_images(x_test, model_name)
    timer = _EpochTimer()
    hist = model.fit(xtr, y_train, epochs=epochs, batch_size=batch_size, verbose=verbose,
                     callbacks=[timer])
    loss, acc = model.evaluate(xte, y_test, batch_size=max(batch_size, 256), verbose=0)
    if stock:
        label = "stock keras"
    else:
        from .runtime import resolve_backend
        label = f"dlconv ({resolve_backend(backend, False).name})"
    return RunResult(model_name, label, float(acc), float(loss), timer.times, dict(hist.history))


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
    ds = data.load_mnist(args.data, download=not args.offline)
    x_tr, y_tr, x_te, y_te, desc = data.training_split(ds, args.limit)
    print(f"data: {desc}")
    import keras
    print(f"Keras backend: {keras.config.backend()}")
    print(f"model: {args.model}, {len(x_tr):,} training / {len(x_te):,} test images, "
          f"{args.epochs} epoch(s), batch size {args.batch_size}, seed {args.seed}")
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
              learning_rate=args.learning_rate, verbose=0 if args.quiet else 1)
    results = [train_model(args.model, x_tr, y_tr, x_te, y_te, backend=args.backend, **kw)]
    print(f"{results[0].label}: test accuracy {results[0].test_accuracy:.4f}, "
          f"{results[0].seconds_per_epoch:.2f} s/epoch")
    if args.compare:
        results.append(train_model(args.model, x_tr, y_tr, x_te, y_te, stock=True, **kw))
        print(f"{results[1].label}: test accuracy {results[1].test_accuracy:.4f}, "
              f"{results[1].seconds_per_epoch:.2f} s/epoch")
    print()
    print(format_table(results))
    return 0


def format_table(results: List[RunResult]) -> str:
    """Side-by-side table of runs (accuracy, loss, seconds per epoch, time ratio)."""
    base = results[-1].seconds_per_epoch
    head = f"{'run':<20} {'test acc':>9} {'test loss':>10} {'s/epoch':>9}"
    if len(results) > 1:
        head += f" {'time vs ' + results[-1].label:>22}"
    lines = [head, "-" * len(head)]
    for r in results:
        line = (f"{r.label:<20} {r.test_accuracy:>9.4f} {r.test_loss:>10.4f} "
                f"{r.seconds_per_epoch:>9.2f}")
        if len(results) > 1:
            line += f" {r.seconds_per_epoch / base:>21.2f}x"
        lines.append(line)
    return "\n".join(lines)
