"""CUDA streams as dlconv sees them: handles, producer streams, and ordering after them.

Every device kernel runs on the *launch stream*: the ``stream=`` the caller passed to
:mod:`dlconv.ops` (a Numba, torch or CuPy stream, anything with ``__cuda_stream__``, or an
int handle), else the default stream.  An input may have been written on another stream, its
*producer stream*:

* ``__cuda_array_interface__`` (CAI v3) names it in its ``stream`` entry (None: nothing to
  wait for; 1: the legacy default stream; 2: the per-thread default stream; other: a handle);
* a ``__dlpack__`` producer is told the consumer's stream (``__dlpack__(stream=...)``) and
  orders its own work before it, as the DLPack protocol asks.

Before a launch, the launch stream waits for each distinct producer stream that is not itself
(an event recorded on the producer, waited on by the launch stream: the host never blocks).
The C++ binding (``csrc/bind_cuda.cpp``) does the same for callers of ``dlconv._C_cuda``.

Importing this module imports no Numba; the waits do.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stream_handle", "cai_stream", "same_stream", "producers_to_wait_for",
           "dlpack_stream_arg", "order_after_producers", "LEGACY_DEFAULT", "PER_THREAD_DEFAULT"]

#: CAI v3 / DLPack stream values with a fixed meaning.
LEGACY_DEFAULT = 1
PER_THREAD_DEFAULT = 2

#: Where a stream object keeps its handle, tried in this order after ``__cuda_stream__``:
#: Numba (``handle``: a ctypes pointer or a cuda-python ``CUstream``), torch (``cuda_stream``),
#: CuPy (``ptr``).
_HANDLE_ATTRS = ("handle", "cuda_stream", "ptr")


def _as_handle(value, stream):
    value = getattr(value, "value", value)  # ctypes c_void_p → int or None (NULL)
    if value is None:
        return 0
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"cannot read a handle from stream {stream!r}: got {value!r}")
    try:
        handle = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"cannot read a handle from stream {stream!r}") from None
    if handle < 0:
        raise ValueError(f"stream handle must be >= 0, got {handle} from {stream!r}")
    return handle


def stream_handle(stream) -> int:
    """A CUDA stream as an integer handle (0 = the default stream).

    Accepts None/0, an int, anything with the CUDA stream protocol ``__cuda_stream__()``
    (returning ``(version, handle)``: CuPy, cuda-python, recent Numba), a Numba stream
    (``stream.handle``), a torch stream (``cuda_stream``) or a CuPy stream (``ptr``).
    """
    if stream is None:
        return 0
    if isinstance(stream, (bool, np.bool_)):
        raise TypeError(f"stream must be a CUDA stream or an int handle, got {stream!r}")
    if isinstance(stream, (int, np.integer)):
        if stream < 0:
            raise ValueError(f"stream handle must be >= 0, got {stream}")
        return int(stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        got = protocol() if callable(protocol) else protocol
        if not (isinstance(got, tuple) and len(got) == 2):
            raise TypeError(f"{type(stream).__name__}.__cuda_stream__() must return (version, handle), "
                            f"got {got!r}")
        return _as_handle(got[1], stream)
    for attr in _HANDLE_ATTRS:
        handle = getattr(stream, attr, None)
        if handle is not None:
            return _as_handle(handle, stream)
    raise TypeError(f"stream must be a CUDA stream (Numba, torch, CuPy, or any object with "
                    f"__cuda_stream__) or an int handle, got {type(stream).__name__}")


def cai_stream(a):
    """The producer stream named by ``a.__cuda_array_interface__`` (CAI v3), or None."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if not isinstance(cai, dict):
        return None
    s = cai.get("stream")
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
        raise ValueError(f"__cuda_array_interface__ 'stream' must be None or a handle >= 1, got {s!r}")
    return int(s)


def _canonical(handle: int, per_thread_default: bool) -> int:
    """Handle 0 (Numba's and cudart's default stream, and CAI's disallowed 0) → the default
    stream it stands for: the legacy one, or the per-thread one where that is configured."""
    if handle == 0:
        return PER_THREAD_DEFAULT if per_thread_default else LEGACY_DEFAULT
    return handle


def same_stream(a: int, b: int, per_thread_default: bool = False) -> bool:
    return _canonical(a, per_thread_default) == _canonical(b, per_thread_default)


def producers_to_wait_for(producers, launch: int, per_thread_default: bool = False):
    """The distinct producer handles (None entries ignored) that the launch stream must wait
    for, in first-seen order: every one that is not the launch stream itself."""
    out = []
    for p in producers:
        if p is None or same_stream(p, launch, per_thread_default):
            continue
        if not any(same_stream(p, q, per_thread_default) for q in out):
            out.append(p)
    return out


def dlpack_stream_arg(launch: int, per_thread_default: bool = False) -> int:
    """The ``stream=`` to pass to ``__dlpack__`` so that the producer orders its work before
    the launch stream (DLPack: 1 = legacy default, 2 = per-thread default, else the handle)."""
    return _canonical(launch, per_thread_default)


def _per_thread_default() -> bool:
    from numba import config
    return bool(getattr(config, "CUDA_PER_THREAD_DEFAULT_STREAM", False))


def numba_stream(stream):
    """``stream`` as a Numba stream object (None → Numba's default stream)."""
    from numba import cuda
    if stream is None:
        return cuda.default_stream()
    if isinstance(stream, cuda.cudadrv.driver.Stream):
        return stream
    handle = stream_handle(stream)
    return cuda.default_stream() if handle == 0 else cuda.external_stream(handle)


def order_after_producers(producers, stream) -> int:
    """Make the launch ``stream`` wait for the work queued so far on each producer stream
    (handles, None entries ignored) that is not the launch stream; → the number of waits.
    Host-side it only enqueues: an event recorded on the producer, waited on by the launch
    stream."""
    pt = _per_thread_default()
    waits = producers_to_wait_for(producers, stream_handle(stream), pt)
    if not waits:
        return 0
    from numba import cuda
    launch = numba_stream(stream)
    for p in waits:
        ev = cuda.event(timing=False)
        ev.record(stream=cuda.external_stream(_canonical(p, pt)))
        ev.wait(stream=launch)
    return len(waits)
