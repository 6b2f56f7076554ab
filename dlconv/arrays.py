"""Where an array lives, and the checks every array passes before any kernel launch.

Policy (the same for every backend):

* dtype: float32 only.  float64, float16 and integer arrays are **rejected** with a
  TypeError rather than converted: a silent cast would hide a copy (and, for float16,
  a precision change) from the caller.  Convert with ``x.astype(np.float32)``.
* layout: C-contiguous only.  A strided view is rejected with a ValueError (use
  ``np.ascontiguousarray``); the kernels index the flat buffer directly.
* host arrays: ``numpy.ndarray`` or anything ``np.asarray`` turns into one without a
  copy of a different dtype (e.g. a TensorFlow CPU tensor).
* device arrays: Numba device arrays, anything with ``__cuda_array_interface__``, or a
  CUDA ``__dlpack__`` capsule (torch, CuPy).  They stay on the device.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

#: DLPack device types that are CUDA memory (kDLCUDA, kDLCUDAHost, kDLCUDAManaged).
_DLPACK_CUDA = (2, 3, 13)


def _is_simulator_array(a) -> bool:
    """A device array of Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): host memory
    standing in for device memory, so that tests run the real CUDA kernel code here."""
    cls = type(a)
    return cls.__name__ == "FakeCUDAArray" and cls.__module__.startswith("numba.cuda.simulator")


def is_cuda_array(a) -> bool:
    """True for objects living in CUDA memory (no import of numba or torch needed)."""
    if hasattr(a, "__cuda_array_interface__") or _is_simulator_array(a):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None and not isinstance(a, np.ndarray):
        try:
            return int(dev()[0]) in _DLPACK_CUDA
        except Exception:  # a broken __dlpack_device__ is simply "not CUDA"
            return False
    return False


def _check(name: str, shape, dtype, contiguous: bool, rank=None):
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(shape)}")
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"{name} must be float32, got {np.dtype(dtype)} "
                        f"(dlconv does not convert silently; use {name}.astype(np.float32))")
    if not contiguous:
        raise ValueError(f"{name} must be C-contiguous (got a strided view of shape "
                         f"{tuple(shape)}); use np.ascontiguousarray({name})")


def host_array(a, name: str, rank=None) -> np.ndarray:
    """Validate a host array → a float32 C-contiguous ndarray: the same buffer when it is one
    already (read-only ones too: the kernels never write their inputs), else one contiguous
    copy (a transposed or strided view, e.g. ``dlconv.dense(x, W.T)``)."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if not isinstance(a, np.ndarray):
        if not hasattr(a, "__array__") and not hasattr(a, "__array_interface__"):
            raise TypeError(f"{name} must be a NumPy array or array-like, got {type(a).__name__}")
        a = np.asarray(a)
    _check(name, a.shape, a.dtype, True, rank)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def device_array(a, name: str, rank=None, stream=None):
    """Validate a CUDA array → a Numba device array viewing the same memory (no copy), ordered
    on the launch ``stream`` (None: the default stream): a producer stream named by its
    ``__cuda_array_interface__`` is waited on by the launch stream (an event, no host wait),
    and a ``__dlpack__`` producer is told the launch stream (:mod:`dlconv.streams`).  The
    result is bound to the launch stream, so code it is handed to next (the C++ binding reads
    the interface again) sees nothing left to wait for."""
    if _is_simulator_array(a):
        _check(name, a.shape, a.dtype, a.is_c_contiguous(), rank)
        return a
    from numba import cuda

    from . import streams

    if not cuda.is_cuda_array(a):
        if not hasattr(a, "__dlpack__"):
            raise TypeError(f"{name} is not a CUDA array")
        a = dlpack_view(a, name, stream)
    producer = streams.cai_stream(a)
    # sync=False: no host-blocking synchronisation of the producer stream (Numba's default);
    # the launch stream waits for it on the device instead.  Keeps `a` (and so the producer's
    # memory) alive.
    a = cuda.as_cuda_array(a, sync=False)
    _check(name, a.shape, a.dtype, a.is_c_contiguous(), rank)
    streams.order_after_producers([producer], stream)
    return a.bind(streams.numba_stream(stream) if stream is not None else 0)


def dlpack_view(a, name: str, stream=None):
    """A CUDA ``__dlpack__`` object → a :class:`dlconv.dlpack.CudaView` (no copy) that Numba
    accepts through ``__cuda_array_interface__``; dtype and layout are checked by the caller.
    The producer is given the consumer's (launch) stream, so it orders its pending work on
    that tensor before it (DLPack's ``stream=`` contract)."""
    from . import streams
    from .dlpack import CudaView

    consumer = streams.dlpack_stream_arg(streams.stream_handle(stream), streams._per_thread_default())
    try:
        capsule = a.__dlpack__(stream=consumer)
    except TypeError:  # producers of the older protocol take no stream argument
        capsule = a.__dlpack__()
    return CudaView(capsule, name)


def same_place(named) -> bool:
    """True if all given (name, array) pairs are on the device; ValueError if mixed."""
    where = {name: is_cuda_array(a) for name, a in named if a is not None}
    if len(set(where.values())) > 1:
        dev = [n for n, d in where.items() if d]
        host = [n for n, d in where.items() if not d]
        raise ValueError(f"arrays must all be on the host or all on a CUDA device: "
                         f"{', '.join(dev)} on the device, {', '.join(host)} on the host")
    return any(where.values())


#: Alignment of host outputs.  TensorFlow takes over a NumPy buffer without a copy only when
#: it is 64-byte aligned (its EIGEN_MAX_ALIGN_BYTES); NumPy's own allocations are 16-byte
#: aligned, which would cost a full copy of every output handed to TensorFlow.
HOST_ALIGN = 64


#: Host outputs of at least this many bytes come from :data:`HOST_POOL` (smaller ones are
#: cheap for malloc and stay in its caches).
POOL_MIN_BYTES = 1 << 18


def _loop_refs() -> int:
    """The reference count :meth:`HostPool.take` sees for a buffer nothing else refers to
    (the list's, the loop variable's and getrefcount's argument, as this Python counts them):
    measured with the same loop rather than assumed."""
    count = 0
    for raw in [np.empty(1, np.uint8)]:
        count = sys.getrefcount(raw)
    return count


#: What :meth:`HostPool.take` sees for a free buffer; any more references are live views.
_FREE_REFS = _loop_refs()


class HostPool:
    """Recycled, aligned host buffers for kernel outputs.

    Why: a fresh multi-megabyte output is a fresh ``mmap`` from malloc, so the kernel that
    fills it first takes one page fault per 4 KiB (19 MB: ~4,700 faults, several ms of
    system time in a training step, where TensorFlow frees our outputs on its own threads
    and malloc keeps returning the memory to the system).  The pool keeps released buffers
    and hands them out again with their pages already mapped.

    A buffer is reused only when nothing else refers to it: every array handed out is a view
    whose ``base`` is the pooled buffer, so a reference count of the pool's own references
    means no view is alive (TensorFlow keeps the array it adopted, and with it the buffer,
    until its tensor dies).  ``limit_bytes`` caps what the pool keeps (default 256 MiB,
    environment ``DLCONV_HOST_POOL_MB``; 0 turns pooling off); past it, outputs are plain
    allocations.  Thread-safe.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self.held_bytes = 0
        self._buffers = {}          # nbytes -> [uint8 arrays of nbytes + HOST_ALIGN]
        self._lock = threading.Lock()

    def take(self, nbytes: int):
        """A free buffer of ``nbytes + HOST_ALIGN`` bytes, or None (then allocate normally)."""
        if self.limit_bytes <= 0:
            return None
        with self._lock:
            same = self._buffers.setdefault(nbytes, [])
            for raw in same:
                if sys.getrefcount(raw) <= _FREE_REFS:
                    return raw
            size = nbytes + HOST_ALIGN
            if self.held_bytes + size > self.limit_bytes:
                return None
            raw = np.empty(size, np.uint8)
            same.append(raw)
            self.held_bytes += size
            return raw

    def clear(self) -> None:
        """Drop every pooled buffer (live views keep theirs alive until they die)."""
        with self._lock:
            self._buffers.clear()
            self.held_bytes = 0


def _pool_limit() -> int:
    raw = os.environ.get("DLCONV_HOST_POOL_MB", "256")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"DLCONV_HOST_POOL_MB must be a number of MiB, got {raw!r}") from None
    return int(max(mb, 0.0) * (1 << 20))


#: The process-wide pool :func:`empty_host` draws from.
HOST_POOL = HostPool(_pool_limit())


def empty_host(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous host array whose data start on a HOST_ALIGN boundary
    (an empty array has no data to align; NumPy may give it any address).  Arrays of
    :data:`POOL_MIN_BYTES` or more reuse a released buffer of :data:`HOST_POOL` when one is
    free.  The contents are garbage either way: every caller overwrites all of it."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = HOST_POOL.take(nbytes) if nbytes >= POOL_MIN_BYTES else None
    if raw is None:
        raw = np.empty(nbytes + HOST_ALIGN, np.uint8)
    start = (-raw.ctypes.data) % HOST_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)
