"""``backend="numba"``: the Numba kernels of :mod:`dlconv.kernels` behind the backend API.

Host (NumPy) arrays run the ``@njit(parallel=True)`` CPU kernels; CUDA arrays (Numba
device arrays, as :mod:`dlconv.arrays` hands them over) run the ``numba.cuda`` kernels on
``stream`` and come back as device arrays, with no host round trip.  Under
``NUMBA_ENABLE_CUDASIM=1`` the CUDA kernels run in Numba's simulator on the CPU.

Importing this module imports neither Numba nor TensorFlow; the kernel modules are
imported, and the kernels compiled, on first use.
"""

from __future__ import annotations

import importlib

from .. import activations as _act
from .. import variants as _variants
from .base import Backend

__all__ = ["NumbaBackend", "CPU_VARIANTS", "CUDA_VARIANTS"]

#: Conv-forward variants, default first: the forward entries of the one Numba tables,
#: :data:`dlconv.variants.NUMBA_CPU` / :data:`~dlconv.variants.NUMBA_CUDA` (plain Python:
#: listing them imports no Numba), highest number first.  ``cpu_v3_smalltile``
#: (kernels/conv2d_cpu_small.py) runs any geometry but is the default only for a geometry of
#: at most SMALL_TILE_MAX_FILTERS filters; above that ``cpu_v2_regblock`` leads.
SMALL_TILE_VARIANT = next(v.name for v in _variants.NUMBA_CPU if v.technique == "smalltile")
CPU_VARIANTS = (tuple(n for n in _variants.forward_by_number(_variants.NUMBA_CPU) if n != SMALL_TILE_VARIANT)
                + (SMALL_TILE_VARIANT,))
CUDA_VARIANTS = _variants.forward_by_number(_variants.NUMBA_CUDA)
#: Up to 32 filters the 8-pixel tile of cpu_v3_smalltile beats cpu_v2_regblock's (6 x 64, or
#: 12 x 32): 1.6-3.1x on the ResNet / issue-13 shapes and the MNIST conv1 (2-core EPYC).
SMALL_TILE_MAX_FILTERS = 32
#: Variant → the kernel module that runs it (the table's ``source``).
_CPU_FORWARD_MODULE = {v.name: v.source for v in _variants.NUMBA_CPU}


def _kernels(name: str):
    return importlib.import_module("dlconv.kernels." + name)


class NumbaBackend(Backend):
    name = "numba"

    # -- what can run here --------------------------------------------------------
    def cpu_status(self):
        try:
            import numba
        except ImportError as exc:  # numba is a dependency; report rather than raise
            return False, f"numba is not importable: {exc}"
        return True, (f"Numba {numba.__version__} CPU kernels (njit parallel, "
                      f"{numba.config.NUMBA_NUM_THREADS} threads)")

    def cuda_status(self):
        try:
            import numba
        except ImportError as exc:
            return False, f"numba is not importable: {exc}"
        if numba.config.ENABLE_CUDASIM:
            return True, ("Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): the CUDA kernels run on "
                          "the CPU, one Python thread per CUDA thread; use tiny shapes")
        try:
            from numba import cuda
            if not cuda.is_available():
                return False, "numba.cuda found no usable CUDA driver/GPU (cuda.is_available() is False)"
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            return True, f"Numba CUDA on {name} (compute capability {dev.compute_capability})"
        except Exception as exc:  # driver errors surface as many exception types
            return False, f"numba.cuda cannot start: {type(exc).__name__}: {exc}"

    def variant_table(self, on_device):
        return _variants.NUMBA_CUDA if on_device else _variants.NUMBA_CPU

    def conv_variants(self, on_device, geometry=None):
        if on_device:
            return CUDA_VARIANTS
        if geometry is not None and geometry.filters <= SMALL_TILE_MAX_FILTERS:
            return (SMALL_TILE_VARIANT,) + tuple(v for v in CPU_VARIANTS if v != SMALL_TILE_VARIANT)
        return CPU_VARIANTS

    def _variant(self, variant, on_device, geometry=None):
        names = self.conv_variants(on_device, geometry)
        if variant is None:
            return names[0]
        return self.resolve_variant(variant, on_device, geometry)

    # -- convolution ---------------------------------------------------------------
    def conv2d_forward(self, x, w, b, g, activation, *, on_device, variant=None, stream=None):
        self.require(on_device)
        v = self._variant(variant, on_device, g)
        code = _act.code(activation)
        if on_device:
            return _kernels("conv2d_cuda").forward(x, w, b, g, code, v, stream=stream)
        return _kernels(_CPU_FORWARD_MODULE[v]).forward(x, w, b, g, code, v)

    def conv2d_backward_data(self, dy, w, g, *, on_device, stream=None):
        self.require(on_device)
        if on_device:
            return _kernels("conv2d_backward_cuda").launch_backward_data(dy, w, g, stream=stream)
        return _kernels("conv2d_cpu").backward_data(dy, w, g)

    def conv2d_backward_filter(self, x, dy, g, *, on_device, stream=None):
        self.require(on_device)
        if on_device:
            return _kernels("conv2d_backward_cuda").launch_backward_filter(x, dy, g, stream=stream)
        return _kernels("conv2d_cpu").backward_filter(x, dy, g)

    # -- dense -----------------------------------------------------------------------
    def dense_forward(self, x, w, b, g, activation, *, on_device, stream=None):
        self.require(on_device)
        if activation == "softmax":
            z = self.dense_forward(x, w, b, g, "linear", on_device=on_device, stream=stream)
            return self.softmax(z, on_device=on_device, stream=stream)
        code = _act.code(activation)
        if on_device:
            return _kernels("dense_cuda").launch_forward(x, w, b, code, stream=stream)
        return _kernels("dense_cpu").forward(x, w, b, code)

    def dense_backward(self, x, w, dy, y, g, activation, *, on_device, stream=None):
        self.require(on_device)
        if activation == "softmax":
            dy = self.activation_backward(dy, y, "softmax", on_device=on_device, stream=stream)
            activation = "linear"
        code = _act.code(activation)
        if code != _act.LINEAR and y is None:
            raise ValueError(f"dense_backward needs y (the forward output) for activation "
                             f"{activation!r}")
        if on_device:
            return _kernels("dense_cuda").launch_backward(x, w, dy, y, code, stream=stream)
        return _kernels("dense_cpu").backward(x, w, dy, y, code)

    def softmax(self, z, *, on_device, stream=None):
        self.require(on_device)
        if on_device:
            return _kernels("dense_cuda").launch_softmax(z, stream=stream)
        return _kernels("dense_cpu").softmax(z)

    def activation_backward(self, dy, y, activation, *, on_device, stream=None):
        self.require(on_device)
        if activation == "softmax":
            if on_device:
                return _kernels("dense_cuda").launch_softmax_backward(dy, y, stream=stream)
            return _kernels("dense_cpu").softmax_backward(dy, y)
        code = _act.code(activation)
        if on_device:
            return _kernels("dense_cuda").launch_activation_backward(dy, y, code, stream=stream)
        return _kernels("dense_cpu").activation_backward(dy, y, code)

