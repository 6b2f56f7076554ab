"""One thin bridge per Keras backend, over the one op API (:mod:`dlconv.ops`).

=============  ==========================================  ===========================
Keras backend  module                                      custom-op mechanism
=============  ==========================================  ===========================
tensorflow     :mod:`dlconv.bridges.tensorflow`            ``tf.custom_gradient`` over
                                                           ``numpy_function`` callbacks
torch          :mod:`dlconv.bridges.torch`                 ``torch.library.custom_op``
                                                           + ``register_autograd``
jax            :mod:`dlconv.bridges.jax`                   ``jax.custom_vjp`` over
                                                           ``jax.ffi`` handlers
=============  ==========================================  ===========================

Every bridge module exposes the same two functions, which :mod:`dlconv.layers` calls with
the backend's own tensors (x NHWC, kernel HWIO, bias or None):

``conv2d(x, kernel, bias, *, strides, padding, dilation, activation, backend, out_shape)``
``dense(x, kernel, bias, *, activation, backend)``   (x of rank 2)

and ``SUPPORTS_JIT`` (whether Keras may compile a step holding the op).  A bridge converts
tensors (zero-copy where the framework allows), passes the framework's stream and registers
gradients; geometry, backend choice and fusion decisions come from :mod:`dlconv.runtime`.
Importing this package imports no framework; :func:`load` imports one bridge.
"""

from __future__ import annotations

import importlib

__all__ = ["BRIDGES", "load", "unsupported_reason"]

#: Keras backend name → the bridge module that runs dlconv ops on it.
BRIDGES = {
    "tensorflow": "dlconv.bridges.tensorflow",
    "torch": "dlconv.bridges.torch",
    "jax": "dlconv.bridges.jax",
}


def unsupported_reason(keras_backend: str) -> str:
    """Why ``keras_backend`` has no bridge ("" when it has one)."""
    if keras_backend in BRIDGES:
        return ""
    return (f"the Keras backend {keras_backend!r} has no dlconv bridge (dlconv.layers runs on "
            f"{', '.join(sorted(BRIDGES))}); set KERAS_BACKEND to one of them before importing "
            f"keras (dlconv.ops works without any framework)")


def load(keras_backend: str):
    """The bridge module for ``keras_backend``; RuntimeError naming the supported ones."""
    reason = unsupported_reason(keras_backend)
    if reason:
        raise RuntimeError(reason)
    return importlib.import_module(BRIDGES[keras_backend])
