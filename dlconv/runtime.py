"""What every framework bridge shares, below :mod:`dlconv.ops` and framework-free.

* :data:`HOST_THREAD` — every host kernel runs on one ``dlconv-host`` thread, one call at a time;
* :func:`conv_geometry_cached` — one :func:`dlconv.shapes.conv_geometry` per distinct shape;
* :func:`resolve_backend` — the backend object for a name on host or device, resolved once;
* :func:`fuse_activation_grad` — whether a conv backward pass may take dL/dy and the layer's
  output (the backend applies the activation derivative inside its kernels) instead of dL/dz.

The TensorFlow, torch and JAX bridges (:mod:`dlconv.bridges`) only convert tensors and
register gradients; these decisions are taken here, once, for all of them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading

from . import backends as _backends
from .shapes import conv_geometry

__all__ = ["HOST_THREAD", "HostThread", "conv_geometry_cached", "resolve_backend",
           "fuse_activation_grad"]


class HostThread:
    """Every host kernel runs on one long-lived thread, ``dlconv-host``, one call at a time.

    One at a time: each kernel already spreads over every core (OpenMP in C++,
    ``parallel=True`` in Numba); two at once only fight for the cores (TensorFlow runs
    independent ops concurrently; in a Keras training step that made each kernel 1.5-2x
    slower), and Numba's default "workqueue" threading layer must not be entered from two
    threads at once.

    One thread: libgomp keeps a separate team of worker threads for every thread that starts
    a parallel region.  TensorFlow calls the ops from whichever of its pool threads is free,
    so the kernels used to start regions from several threads, and each of them kept its own
    OpenMP workers (spinning for a while after every region) competing for the same cores.
    Run from this one thread, there is a single team.  The caller waits asleep, so the
    hand-over costs a thread wake-up each way (~30-70 us on a virtual machine).  Calls from
    the main thread (a script calling the op API, Keras run eagerly) skip the hand-over and
    run in place: that is at most one more team, and the common single-threaded use pays
    nothing.  Either way a re-entrant lock keeps the kernels one at a time.  Device kernels
    need none of this: their streams order them, and they run on the caller's thread.
    """

    def __init__(self):
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()          # guards starting the executor
        self._busy = threading.RLock()         # one kernel call at a time
        self._executor = None
        self._ident = None

    def _started(self):
        self._ident = threading.get_ident()

    def _locked(self, fn):
        with self._busy:
            return fn()

    def run(self, fn):
        """``fn()`` on the host thread (in place on the main thread); its result or
        exception comes back to the caller."""
        ident = threading.get_ident()
        if ident == self._ident or ident == threading.main_thread().ident:
            return self._locked(fn)
        ex = self._executor
        if ex is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="dlconv-host", initializer=self._started)
                ex = self._executor
        return ex.submit(self._locked, fn).result()


#: The thread every host kernel runs on (see :class:`HostThread`).
HOST_THREAD = HostThread()
if hasattr(os, "register_at_fork"):     # a forked child has no such thread: start afresh there
    os.register_at_fork(after_in_child=HOST_THREAD._reset)


# ----------------------------------------------------------------------------- caches
@functools.lru_cache(maxsize=512)
def conv_geometry_cached(x_shape, w_shape, strides, padding, dilation, groups=1):
    """:func:`dlconv.shapes.conv_geometry`, memoised: one resolution per distinct shape.

    Every argument must be hashable (tuples, strings, ints): the bridges pass the layer's
    settings as tuples.
    """
    return conv_geometry(x_shape, w_shape, strides, padding, dilation, groups)


_BACKENDS = {}


def resolve_backend(name, on_device: bool):
    """The backend object for ``name`` ("auto", a registry name, or a backend object) on
    host or device, resolved once per (name, place); raises
    :class:`dlconv.backends.BackendUnavailable` naming the reason when it cannot run there."""
    if not isinstance(name, str):
        return name
    key = (name, on_device)
    be = _BACKENDS.get(key)
    if be is None:
        if name == "auto":
            be = _backends.auto(on_device)
        else:
            be = _backends.get(name)
            be.require(on_device)
        _BACKENDS[key] = be
    return be


def fuse_activation_grad(backend, on_device: bool, activation: str) -> bool:
    """Whether a bridge should hand the conv backward passes dL/dy and the layer's output y
    (``backend`` applies ``activation``'s derivative inside its kernels: no dL/dz tensor and no
    activation-backward op) rather than dL/dz.  False for "linear" (nothing to fuse) and when
    the backend cannot run there (the forward pass raises the reason)."""
    if activation == "linear":
        return False
    try:
        return bool(resolve_backend(backend, on_device).fuses_activation_grad(on_device))
    except _backends.BackendUnavailable:
        return False
