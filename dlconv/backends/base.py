"""The interface every backend implements.

All arrays arrive validated (float32, C-contiguous, right rank and sizes) by
:mod:`dlconv.ops`; ``g`` is the resolved :class:`dlconv.shapes.ConvGeometry` (conv) or
:class:`dlconv.shapes.DenseGeometry` (dense), never re-derived by a backend;
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

    def variant_table(self, on_device: bool):
        """The kernel set's variant table (:class:`dlconv.variants.Variant` records, every pass),
        empty for a backend without variants."""
        return ()

    def default_variant(self, on_device: bool, geometry=None) -> Optional[str]:
        """The conv-forward variant the dispatch runs when none is asked for (None: no variants)."""
        names = tuple(self.conv_variants(on_device, geometry))
        return names[0] if names and self.variant_table(on_device) else None

    def resolve_variant(self, variant: Optional[str], on_device: bool, geometry=None) -> Optional[str]:
        """``variant``'s current name (an old name warns DeprecationWarning, naming the new one);
        ValueError naming the valid ones when it is unknown or cannot run ``geometry``."""
        if variant is None:
            return None
        from .. import variants as _variants
        names = tuple(self.conv_variants(on_device, geometry))
        where = (f"for backend {self.name!r} on the {'CUDA device' if on_device else 'CPU'}"
                 + (" for this geometry" if geometry is not None else ""))
        table = [v for v in self.variant_table(on_device) if v.name in names]
        if not table:
            if variant in names:
                return variant
            raise ValueError(f"variant must be one of {names} {where}, got {variant!r}")
        # Old names resolve over the whole table, so an inapplicable one is named as such.
        try:
            new = _variants.canonical(variant, self.variant_table(on_device), where, stacklevel=4)
        except ValueError:
            new = None
        if new not in names:
            raise ValueError(f"variant must be one of {names} {where}, got {variant!r}")
        return new

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
    def dense_forward(self, x, w, b, g, activation: str, *, on_device: bool, stream=None):
        """``g``: the resolved :class:`dlconv.shapes.DenseGeometry` (output shape ``g.y_shape``)."""
        raise NotImplementedError  # abstract

    def dense_backward(self, x, w, dy, y, g, activation: str, *, on_device: bool, stream=None):
        """→ (dx, dw, db) with shapes g.x_shape, g.w_shape, (g.out_features,); dy is
        dL/d(output), y the forward output (after activation), g the DenseGeometry."""
        raise NotImplementedError  # abstract

    def softmax(self, z, *, on_device: bool, stream=None):
        """Row-wise softmax of a (batch, classes) array."""
        raise NotImplementedError  # abstract

    def activation_backward(self, dy, y, activation: str, *, on_device: bool, stream=None):
        """dL/dz from dL/dy and the activation output y, element-wise (softmax row-wise)."""
        raise NotImplementedError  # abstract
