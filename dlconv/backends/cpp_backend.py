"""``backend="cpp"``: the C++ kernels of ``csrc/`` behind the backend API.

* Host (NumPy) arrays go to ``dlconv._C``: OpenMP + SIMD implicit-GEMM kernels
  (``csrc/cpu_*.cpp``).  Outputs are allocated here (64-byte aligned, :func:`dlconv.arrays.empty_host`) and filled in place;
  C++ re-checks every shape against the geometry record and releases the GIL while it runs.
* CUDA arrays (Numba device arrays, as :mod:`dlconv.ops` hands them over) go to
  ``dlconv._C_cuda`` (``csrc/*.cu``), which reads their ``__cuda_array_interface__`` itself,
  so nothing is copied; outputs are Numba device arrays allocated on the caller's stream and
  the kernels are launched on that stream (its handle passed as an int).

The geometry travels as ``g.as_tuple()`` (field order :attr:`ConvGeometry.FIELDS`, mirrored by
``csrc/geometry.h``); activations as the integer codes of :mod:`dlconv.activations`.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from .. import _omp
from .. import activations as _act
from .. import variants as _variants
from ..arrays import empty_host
from ..shapes import conv_geometry
from ..streams import stream_handle  # noqa: F401  (re-exported: the handle the launchers take)
from .base import Backend, BackendUnavailable

#: A 3x3 stride-1 geometry every variant can run: what conv_variants() lists without a geometry.
_PROBE_GEOMETRY = conv_geometry((1, 8, 8, 16), (3, 3, 16, 16))

#: The variant tables live in C++ (csrc/conv_variants.h) and come from the bindings:
#: ``dlconv._C.CONV_VARIANTS`` (CPU), ``dlconv._C_cuda.CONV_VARIANTS`` (CUDA; ``_C`` exports the
#: same table as ``CUDA_CONV_VARIANTS``, so a build without CUDA still names them).  Each row's
#: ``code`` is what the forward launcher takes; NOT_SELECTABLE marks a backward-only path.
NOT_SELECTABLE = -1
#: activation_backward's code for softmax (row-wise), beyond the element-wise codes.
SOFTMAX_CODE = 4


# libgomp's idle-spin default must be in place before dlconv._C loads libgomp (a busy machine:
# a 2 ms dense call took 13-21 ms with libgomp's 300000, ~5 ms with dlconv's 10000): the one rule
# for it, a user's GOMP_SPINCOUNT / OMP_WAIT_POLICY winning, lives in dlconv._omp.
_omp.apply()


def _import(name):
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        return None, f"{name} is not importable ({exc}); rebuild with pip install --no-build-isolation -e ."


class CppBackend(Backend):
    name = "cpp"

    def __init__(self):
        self._c, self._c_why = _import("dlconv._C")
        self._cuda, self._cuda_why = _import("dlconv._C_cuda")
        self._tables = {}

    # -- what can run here --------------------------------------------------------
    def cpu_status(self):
        if self._c is None:
            return False, self._c_why
        info = self._c.build_info()
        return True, (f"dlconv._C: {info['simd']}, register block {info['register_block']}, "
                      f"OpenMP {info['openmp']} with {info['threads']} threads")

    def cuda_status(self):
        if self._cuda is None:
            return False, self._cuda_why
        devices = self._cuda.devices()
        if not devices:
            return False, "dlconv._C_cuda is built but sees no GPU: " + self._cuda.devices_why()
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return False, ("Numba runs the CUDA simulator (NUMBA_ENABLE_CUDASIM=1): its arrays live in "
                           "host memory and the C++ CUDA kernels need real device arrays")
        return True, "dlconv._C_cuda on " + "; ".join(devices)

    def variant_table(self, on_device):
        """The C++ table of the CPU or CUDA kernel set (empty when neither extension is built)."""
        key = "cuda" if on_device else "cpu"
        table = self._tables.get(key)
        if table is None:
            rows = ()
            if on_device and self._cuda is not None:
                rows = self._cuda.CONV_VARIANTS
            elif self._c is not None:
                rows = self._c.CUDA_CONV_VARIANTS if on_device else self._c.CONV_VARIANTS
            table = self._tables[key] = _variants.from_cpp(rows)
        return table

    def _forward(self, on_device):
        """Selectable forward variants, highest number (the dispatch's preference) first."""
        return sorted((v for v in self.variant_table(on_device)
                       if "forward" in v.passes and v.code != NOT_SELECTABLE), key=lambda v: -v.number)

    def conv_variants(self, on_device, geometry=None):
        if on_device:
            return tuple(v.name for v in self._forward(True))
        return tuple(v.name for v in self._forward(False)
                     if self._c.forward_variant_applicable((geometry or _PROBE_GEOMETRY).as_tuple(), v.code))

    def _code(self, variant, on_device):
        return _variants.by_name(self.variant_table(on_device))[variant].code

    # -- helpers ---------------------------------------------------------------------
    def _cpu(self):
        if self._c is None:
            raise BackendUnavailable(f"backend 'cpp' cannot run its CPU kernels here: {self._c_why}")
        return self._c

    def _gpu(self):
        self.require(True)
        return self._cuda

    @staticmethod
    def _dev_empty(shape, stream):
        from numba import cuda
        return cuda.device_array(shape, dtype=np.float32, stream=stream or 0)

    # -- convolution -----------------------------------------------------------------
    def conv2d_forward(self, x, w, b, g, activation, *, on_device, variant=None, stream=None):
        code = _act.code(activation)
        if on_device:
            lib = self._gpu()
            variant = self.resolve_variant(variant, True, g) or self.default_variant(True, g)
            y = self._dev_empty(g.y_shape, stream)
            lib.conv2d_forward(x, w, b, g.as_tuple(), code, y, self._code(variant, True), stream_handle(stream))
            return y
        lib = self._cpu()
        variant = self.resolve_variant(variant, False, g)
        return lib.conv2d_forward(x, w, b, g.as_tuple(), code, empty_host(g.y_shape),
                                  variant=0 if variant is None else self._code(variant, False))

    def fuses_activation_grad(self, on_device):
        # The CPU kernels read dy through act'(y) (csrc/cpu_act.h); the CUDA ones do not.
        return not on_device

    def conv2d_backward_data(self, dy, w, g, *, on_device, stream=None, y=None, activation="linear"):
        if on_device:
            if activation != "linear":
                raise ValueError("the CUDA conv backward passes take dL/dz (activation 'linear')")
            lib = self._gpu()
            dx = self._dev_empty(g.x_shape, stream)
            lib.conv2d_backward_data(dy, w, g.as_tuple(), dx, stream_handle(stream))
            return dx
        return self._cpu().conv2d_backward_data(dy, w, g.as_tuple(), empty_host(g.x_shape), y=y,
                                                activation=_act.code(activation))

    def conv2d_backward_filter(self, x, dy, g, *, on_device, stream=None, y=None, activation="linear"):
        if on_device:
            if activation != "linear":
                raise ValueError("the CUDA conv backward passes take dL/dz (activation 'linear')")
            lib = self._gpu()
            dw = self._dev_empty(g.w_shape, stream)
            db = self._dev_empty((g.filters,), stream)
            lib.conv2d_backward_filter(x, dy, g.as_tuple(), dw, db, stream_handle(stream))
            return dw, db
        return self._cpu().conv2d_backward_filter(x, dy, g.as_tuple(), empty_host(g.w_shape),
                                                  empty_host((g.filters,)), y=y,
                                                  activation=_act.code(activation))

    # -- dense -------------------------------------------------------------------------
    def dense_forward(self, x, w, b, g, activation, *, on_device, stream=None):
        code = _act.code(activation)
        if on_device:
            lib = self._gpu()
            y = self._dev_empty(g.y_shape, stream)
            lib.dense_forward(x, w, b, code, y, stream_handle(stream))
            return y
        return self._cpu().dense_forward(x, w, b, code, empty_host(g.y_shape))

    def dense_backward(self, x, w, dy, y, g, activation, *, on_device, stream=None):
        code = _act.code(activation)
        if code == _act.LINEAR:
            y = None  # not needed; the caller may not have it
        shapes = (g.x_shape, g.w_shape, (g.out_features,))
        if on_device:
            lib = self._gpu()
            dx, dw, db = (self._dev_empty(s, stream) for s in shapes)
            lib.dense_backward(x, w, dy, y, code, dx, dw, db, stream_handle(stream))
            return dx, dw, db
        dx, dw, db = (empty_host(s) for s in shapes)
        return self._cpu().dense_backward(x, w, dy, y, code, dx, dw, db)

    def softmax(self, z, *, on_device, stream=None):
        if on_device:
            lib = self._gpu()
            out = self._dev_empty(tuple(z.shape), stream)
            lib.softmax(z, out, stream_handle(stream))
            return out
        return self._cpu().softmax(z, empty_host(z.shape))

    def activation_backward(self, dy, y, activation, *, on_device, stream=None):
        name = _act.normalize(activation)
        code = SOFTMAX_CODE if name == "softmax" else _act.code(name)
        if on_device:
            lib = self._gpu()
            out = self._dev_empty(tuple(dy.shape), stream)
            lib.activation_backward(dy, y, code, out, stream_handle(stream))
            return out
        return self._cpu().activation_backward(dy, y, code, empty_host(dy.shape))

    # -- max pool (csrc/cpu_pool.cpp; CPU only) ---------------------------------------------
    def max_pool2d_forward(self, x, g, *, on_device, with_arg=False):
        """y (and the int32 arg, flat input position per output, when ``with_arg``)."""
        if on_device:
            raise ValueError("max_pool2d has C++ CPU kernels only: x must be a host (NumPy) array")
        arg = np.empty(g.y_shape, np.int32) if with_arg else None
        y = self._cpu().max_pool2d_forward(x, g.as_tuple(), empty_host(g.y_shape), arg)
        return (y, arg) if with_arg else y

    def max_pool2d_backward(self, dy, g, *, on_device, arg=None, x=None):
        """dx from dy and the stored ``arg`` (a gather), or from ``x`` (arg recomputed)."""
        if on_device:
            raise ValueError("max_pool2d has C++ CPU kernels only: dy must be a host (NumPy) array")
        return self._cpu().max_pool2d_backward(dy, g.as_tuple(), empty_host(g.x_shape), arg, x)
