"""One thin bridge per Keras backend, over the one op API (:mod:`dlconv.ops`).

=============  ==========================================  ===========================
Keras backend  module                                      custom-op mechanism
=============  ==========================================  ===========================
tensorflow     :mod:`dlconv.bridges.tensorflow`            ``REGISTER_OP`` native ops
                                                           (:mod:`dlconv.tf_ops`), else
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
``conv2d_transpose(x, kernel, *, strides, padding, output_padding, dilation, backend, out_shape)``
    (Keras' Conv2DTranspose, linear, no bias: the backward-data kernels forward)

and ``SUPPORTS_JIT`` (whether Keras may compile a step holding the op).  A bridge converts
tensors (zero-copy where the framework allows), passes the framework's stream and registers
gradients; geometry, backend choice and fusion decisions come from :mod:`dlconv.runtime`.
Importing this package imports no framework; :func:`load` imports one bridge.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import metadata

__all__ = ["BRIDGES", "MECHANISMS", "REQUIRES", "load", "unsupported_reason", "status"]

#: Keras backend name → the bridge module that runs dlconv ops on it.
BRIDGES = {
    "tensorflow": "dlconv.bridges.tensorflow",
    "torch": "dlconv.bridges.torch",
    "jax": "dlconv.bridges.jax",
}


#: Keras backend → how its bridge attaches dlconv's kernels.
MECHANISMS = {
    "tensorflow": "REGISTER_OP native ops (dlconv.tf_ops), numpy_function callbacks otherwise",
    "torch": "torch.library.custom_op (dlconv:: ops) + register_autograd",
    "jax": "jax.custom_vjp over jax.ffi handlers (pure_callback for numba/reference)",
}
#: Keras backend → (distribution, oldest version the bridge supports).
REQUIRES = {"tensorflow": ("tensorflow", "2.16"), "torch": ("torch", "2.4"), "jax": ("jax", "0.5")}


def _release(version: str):
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def status() -> dict:
    """Keras backend → ``(usable, why)``: whether dlconv.layers can run on it here, read from
    package metadata (imports no framework)."""
    out = {}
    try:
        keras_version = metadata.version("keras")
    except metadata.PackageNotFoundError:
        keras_version = None
    for name, (dist, oldest) in REQUIRES.items():
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        if keras_version is None:
            out[name] = (False, "keras is not installed")
        elif version is None or importlib.util.find_spec(dist) is None:
            extra = "" if name == "tensorflow" else f" (pip install 'dlconv[{name}]')"
            out[name] = (False, f"{dist} is not installed{extra}")
        elif _release(version) < _release(oldest):
            out[name] = (False, f"{dist} {version} is older than {oldest}, the oldest the bridge supports")
        else:
            out[name] = (True, f"{dist} {version}, keras {keras_version}: {MECHANISMS[name]}")
    return out


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
