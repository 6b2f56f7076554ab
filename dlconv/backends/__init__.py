"""Backend registry: ``"reference"`` (NumPy), ``"numba"``, ``"cpp"``.

A backend is an object with the methods of :class:`dlconv.backends.base.Backend`.  It
receives arrays that :mod:`dlconv.ops` has already validated and a geometry that
:mod:`dlconv.shapes` has already resolved, and picks its CUDA or CPU kernels from where
the data lives (``on_device``).  Backends never import TensorFlow.

Backends are created lazily: importing this module imports neither Numba nor the
compiled extensions.
"""

from __future__ import annotations

import importlib
from typing import Dict

from .base import Backend, BackendUnavailable

__all__ = ["Backend", "BackendUnavailable", "get", "names", "available", "auto"]

# name -> "module:attribute" of the Backend subclass
_REGISTRY = {
    "reference": "dlconv.backends.reference:ReferenceBackend",
    "numba": "dlconv.backends.numba_backend:NumbaBackend",
    "cpp": "dlconv.backends.cpp_backend:CppBackend",
}
_INSTANCES: Dict[str, Backend] = {}


def names():
    return tuple(_REGISTRY)


def get(name: str) -> Backend:
    """The backend called ``name``; ValueError for an unknown name, BackendUnavailable
    (a RuntimeError) naming the reason when it cannot run here."""
    if isinstance(name, Backend):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {names()} (or 'auto'), got {name!r}")
    inst = _INSTANCES.get(name)
    if inst is None:
        mod, attr = _REGISTRY[name].split(":")
        inst = getattr(importlib.import_module(mod), attr)()
        _INSTANCES[name] = inst
    return inst


def available() -> Dict[str, dict]:
    """For each backend: ``{"cpu": (ok, why), "cuda": (ok, why), "variants": [...]}``.

    ``why`` says what is missing when ``ok`` is False, or what runs when it is True.
    """
    out = {}
    for name in names():
        try:
            b = get(name)
        except Exception as exc:  # import failure of an optional piece: report, never raise
            out[name] = {"cpu": (False, f"{type(exc).__name__}: {exc}"),
                         "cuda": (False, f"{type(exc).__name__}: {exc}"), "variants": []}
            continue
        out[name] = {"cpu": b.cpu_status(), "cuda": b.cuda_status(),
                     "variants": list(b.conv_variants(on_device=False)),
                     "cuda_variants": list(b.conv_variants(on_device=True))}
    return out


#: Preference order of "auto": fastest first on each side (see the benchmark table).
AUTO_ORDER = {False: ("cpp", "numba", "reference"), True: ("cpp", "numba")}


def auto(on_device: bool = False) -> Backend:
    """The fastest backend usable for data on the host (False) or on a CUDA device (True)."""
    tried = []
    for name in AUTO_ORDER[on_device]:
        try:
            b = get(name)
            ok, why = b.cuda_status() if on_device else b.cpu_status()
        except Exception as exc:
            ok, why = False, str(exc)
        if ok:
            return b
        tried.append(f"{name}: {why}")
    raise BackendUnavailable("no backend can run on the " + ("CUDA device" if on_device else "CPU")
                             + " here (" + "; ".join(tried) + ")")
