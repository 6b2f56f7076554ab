"""The torch bridge's figures: the MNIST CNN train step under Keras' torch backend and the
bridge's per-call overhead — a thin caller of :mod:`dlconv.bench.keras_backends`, the code
``dlconv bench`` runs for its torch rows (same protocol, same numbers).

Run as ``python benchmarks/torch_step.py [--rounds N] [--backends cpp,numba] [--json out.json]``
(it sets ``KERAS_BACKEND=torch`` itself; the Keras backend is fixed per process, so it
refuses to run with another one already set).

Train step: the workshop's MNIST CNN (:func:`dlconv.models.cnn`, Adam), batch 128, dlconv
layers vs the stock Keras layers from the same weights (inference outputs checked equal
first), ``train_on_batch`` timed round-robin with the order rotating, and dlconv's kernel
calls of one step timed through :mod:`dlconv.ops` in the same round-robin (the share of the
step that is dlconv's kernels).  Per-call overhead: a 1x1 conv on a 1x1x1x1 tensor through
the bridge (eager; kernel requiring grad or not) vs ``keras.ops.conv``, with the same kernel
through :mod:`dlconv.ops` on NumPy and an empty ``torch.library.custom_op`` for scale.
"""

import os
import sys

if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
    sys.exit(f"benchmarks/torch_step.py measures Keras' torch backend; KERAS_BACKEND is "
             f"{os.environ['KERAS_BACKEND']!r}")

from dlconv.bench.keras_backends import script_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(script_main("torch"))
