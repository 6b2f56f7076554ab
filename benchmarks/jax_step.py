"""Keras on JAX: the MNIST CNN train step and the JAX bridge's per-call overhead — a thin
caller of :mod:`dlconv.bench.keras_backends`, the code ``dlconv bench`` runs for its JAX
rows (same protocol, same numbers).

Run as a script (it sets ``KERAS_BACKEND=jax`` before Keras is imported, so run it in its
own process)::

    python benchmarks/jax_step.py [--batch 128] [--rounds 21] [--backends cpp,numba]
                                  [--overhead-backends cpp,numba,reference] [--json out.json]

Train step: dlconv's MNIST CNN vs the stock layers from the same weights, both jitted by
Keras (``jit_compile`` "auto" → XLA on JAX), ``train_on_batch`` round-robin, with dlconv's
kernel calls of one step timed through :mod:`dlconv.ops` in the same round-robin.
Per-call overhead: a jitted 1x1 conv on a 1x1x1x1 tensor for each backend asked for (cpp:
an XLA FFI custom call; numba and reference: ``jax.pure_callback``) vs ``keras.ops.conv``,
with a jitted ``x + k`` (one jitted dispatch) and the kernel through :mod:`dlconv.ops` on
NumPy for scale.
"""

import os
import sys

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit(f"benchmarks/jax_step.py measures Keras on JAX; KERAS_BACKEND is "
             f"{os.environ['KERAS_BACKEND']!r}")

from dlconv.bench.keras_backends import script_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(script_main("jax", overhead_backends="cpp,numba,reference"))
