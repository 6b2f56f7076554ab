"""dlconv: hand-written convolution and dense kernels (Numba CUDA, C++/CUDA via pybind11,
each with a CPU counterpart), wrapped as drop-in Keras layers.

``import dlconv`` is light: it imports neither TensorFlow nor Numba nor CUDA.  Those load
on first use (``dlconv.conv2d`` with the numba backend, ``import dlconv.layers``).

Public API
----------
Index arithmetic (:mod:`dlconv.shapes`): ``conv_output_size``, ``conv_geometry``,
``ConvGeometry``, ``conv_param_count``, ``dense_param_count``.
Ops (:mod:`dlconv.ops`): ``conv2d``, ``conv2d_backward_data``, ``conv2d_backward_filter``,
``dense``, ``dense_backward``, ``softmax``, ``activation_backward``.
Teaching: ``explain(...)``.  Machine report: ``dlconv.info.info()`` (a dict).
Keras layers: ``import dlconv.layers`` (imports TensorFlow).
"""

from __future__ import annotations

import importlib

from . import _omp
from .shapes import (ConvGeometry, DenseGeometry, conv_geometry, conv_output_size,
                     conv_param_count, dense_geometry, dense_param_count)

__version__ = "0.1.0"

# libgomp's spin default, before anything loads libgomp (dlconv._omp: why, and when it applies).
_omp.apply()

_LAZY = {
    "conv2d": "dlconv.ops", "conv2d_backward_data": "dlconv.ops",
    "conv2d_backward_filter": "dlconv.ops", "dense": "dlconv.ops", "dense_backward": "dlconv.ops",
    "softmax": "dlconv.ops", "activation_backward": "dlconv.ops",
    "conv2d_transpose": "dlconv.ops", "conv2d_transpose_backward": "dlconv.ops",
    "explain": "dlconv.explain",
}
_SUBMODULES = ("jax", "backends", "ops", "reference", "explain", "info", "layers", "models", "data",
               "bench", "cli", "kernels", "arrays", "activations", "shapes", "train", "runtime",
               "bridges", "torch", "showers", "metrics", "locate", "conv_arithmetic", "animate")

__all__ = ["ConvGeometry", "DenseGeometry", "conv_geometry", "conv_output_size", "conv_param_count",
           "dense_geometry", "dense_param_count", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        value = getattr(mod, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"dlconv.{name}")
    raise AttributeError(f"module 'dlconv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
