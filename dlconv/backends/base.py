"""The interface every backend implements.

All arrays arrive validated (float32, C-contiguous, right rank and sizes) by
:mod:`dlconv.ops`; ``g`` is the resolved :class:`dlconv.shapes.ConvGeometry`;
``activation`` is a canonical element-wise name from :mod:`dlconv.activations`
(``"linear"``, ``"relu"``, ``"sigmoid"``, ``"tanh"``).  ``on_device`` is True when the
arrays are Numba device arrays (CUDA); the backend then returns device arrays and
launches on ``stream`` (a Numba stream, or None for the default stream).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple


class BackendUnavailable(RuntimeError):
    """The backend (or its CPU/CUDA half) cannot run on this machine; the message says why."""


class Backend:
    name = "abstract"

    # -- what can run here --------------------------------------------------------
    def cpu_status(self) -> Tuple[bool, str]:
        """(usable, reason) for the CPU kernels."""
        raise NotImplementedError  # abstract: every backend overrides it

    def cuda_status(self) -> Tuple[bool, str]:
        """(usable, reason) for the CUDA kernels."""
        raise NotImplementedError  # abstract: every backend overrides it

    def conv_variants(self, on_device: bool, geometry=None) -> Sequence[str]:
        """Names of the conv-forward kernel variants, best first; with a ``geometry``, only
        those that can run it (a variant may need a 3x3 kernel, say)."""
        return ("default",)

    def require(self, on_device: bool) -> None:
        ok, why = self.cuda_status() if on_device else self.cpu_status()
        if not ok:
            where = "CUDA" if on_device else "CPU"
            raise BackendUnavailable(f"backend {self.name!r} cannot run its {where} kernels here: {why}")

    # -- convolution ---------------------------------------------------------------
    def conv2d_forward(self, x, w, b, g, activation: str, *, on_device: bool,
                       variant: Optional[str] = None, stream=None):
        raise NotImplementedError  # abstract

    def conv2d_backward_data(self, dy, w, g, *, on_device: bool, stream=None):
        raise NotImplementedError  # abstract

    def fuses_activation_grad(self, on_device: bool) -> bool:
        """Whether the conv backward passes take ``y=`` and ``activation=`` (dy then being
        dL/d(activated output)) and apply the derivative inside their kernels.  When False,
        :mod:`dlconv.ops` runs :meth:`activation_backward` first."""
        return False

    def conv2d_backward_filter(self, x, dy, g, *, on_device: bool, stream=None):
        """→ (dw with shape g.w_shape, db with shape (g.filters,))."""
        raise NotImplementedError  # abstract

    # -- dense -----------------------------------------------------------------------
    def dense_forward(self, x, w, b, activation: str, *, on_device: bool, stream=None):
        raise NotImplementedError  # abstract

    def dense_backward(self, x, w, dy, y, activation: str, *, on_device: bool, stream=None):
        """→ (dx, dw, db); dy is dL/d(output), y the forward output (after activation)."""
        raise NotImplementedError  # abstract

    def softmax(self, z, *, on_device: bool, stream=None):
        """Row-wise softmax of a (batch, classes) array."""
        raise NotImplementedError  # abstract

    def activation_backward(self, dy, y, activation: str, *, on_device: bool, stream=None):
        """dL/dz from dL/dy and the activation output y, element-wise (softmax row-wise)."""
        raise NotImplementedError  # abstract
