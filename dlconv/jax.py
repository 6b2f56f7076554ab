"""dlconv's kernels for plain JAX: differentiable, jittable ``conv2d`` and ``dense``.

``import dlconv.jax`` imports JAX (``import dlconv`` does not).  The functions are the
``jax.custom_vjp`` functions of :mod:`dlconv.bridges.jax` (the ones Keras' JAX backend runs):
on the CPU with backend "cpp" each call is an XLA FFI custom call into dlconv's C++ kernels
(no Python per call inside ``jax.jit``); the numba and reference backends run through
``jax.pure_callback``.  ``jax.grad`` runs dlconv's backward kernels; ``jax.vmap`` loops over
the mapped axis (``vmap_method="sequential"``).

Layout: NHWC activations and HWIO weights, as dlconv's op API and ``jax.lax.conv_general_dilated``
with ``dimension_numbers=("NHWC", "HWIO", "NHWC")``.

>>> import jax, jax.numpy as jnp, dlconv.jax as dj
>>> x = jnp.ones((8, 28, 28, 1)); w = jnp.ones((3, 3, 1, 32))
>>> y = jax.jit(lambda x, w: dj.conv2d(x, w, padding="same", activation="relu"))(x, w)
>>> y.shape
(8, 28, 28, 32)

Every array must be float32 (TypeError otherwise: nothing is cast silently); shapes that do
not fit raise :mod:`dlconv.shapes`' ValueError when the call is traced.
"""

from __future__ import annotations

from .bridges import jax as _bridge
from .shapes import normalize_pair

__all__ = ["conv2d", "dense"]


def conv2d(x, w, b=None, strides=1, padding="valid", dilation=1, activation=None, backend="auto",
           groups=1):
    """``act(conv2d(x, w) + b)``: x ``(batch, height, width, channels)``, w ``(kernel_h,
    kernel_w, channels, filters)``, b ``(filters,)`` or None → ``(batch, out_h, out_w, filters)``.

    ``strides`` and ``dilation``: an int or a (height, width) pair.  ``padding``: ``"valid"``,
    ``"same"`` (TensorFlow's rule), an int, ``(pad_h, pad_w)`` or ``((top, bottom), (left,
    right))``.  ``activation``: None/"linear", "relu", "sigmoid" or "tanh" (fused into the
    kernel).  ``backend``: "auto", "cpp", "numba" or "reference".  ``groups=G``: grouped
    convolution, w ``(kernel_h, kernel_w, channels / G, filters)`` (G = channels: depthwise).
    """
    return _bridge.conv2d(x, w, b, strides=normalize_pair("strides", strides), padding=padding,
                          dilation=normalize_pair("dilation", dilation),
                          activation=activation or "linear", backend=backend, groups=groups)


def dense(x, w, b=None, activation=None, backend="auto"):
    """``act(x @ w + b)``: x ``(batch, in)``, w ``(in, out)``, b ``(out,)`` or None.

    ``activation``: None/"linear", "relu", "sigmoid", "tanh" or "softmax" (row-wise).
    """
    return _bridge.dense(x, w, b, activation=activation or "linear", backend=backend)
