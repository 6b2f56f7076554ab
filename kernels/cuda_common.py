"""Device functions and launch helpers shared by the Numba CUDA kernels.

Activation codes are those of :mod:`dlconv.activations` (linear 0, relu 1, sigmoid 2,
tanh 3); constants are ``np.float32`` so every branch stays in float32 on the device.
Integers: kernel scalars arrive as int64 (Numba's int), so flat indices cannot overflow.
Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs on the CPU (one Python thread per CUDA
thread).

Scratch memory: :func:`workspace` hands out a float32 buffer cached per (device, stream,
host thread), so that the kernels' partial sums allocate nothing in the hot path (a fresh
``device_array`` per call costs a ``cuMemAlloc``, and its deferred free may synchronise the
device inside a timed loop).  Reuse on one stream is safe because that stream runs its work
in order; two streams never share a buffer, nor two host threads (two threads launching on
one stream at once could interleave one call's reduce pass between the other's kernels).
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np
from numba import cuda

__all__ = ["activate", "derivative_from_output", "cdiv", "stream_or_default", "dummy_bias",
           "workspace", "sm_count", "MAX_GRID_Y"]

#: Largest grid.y (and grid.z) a launch may ask for; bigger extents loop over it (grid-stride).
MAX_GRID_Y = 65535
#: Streams whose workspace is kept (least recently used dropped first: a destroyed stream's
#: buffer does not live forever).
MAX_WORKSPACES = 16
#: Workspaces grow in 256 Ki-float (1 MiB) steps, so a slightly bigger problem reuses them.
WORKSPACE_GRANULE = 1 << 18
#: SMs assumed under the simulator (it has no device to ask); split-K tests force splits.
SIMULATOR_SMS = 4


@cuda.jit(device=True, inline=True)
def activate(z, act):
    """act(z) for one float32 element."""
    if act == 1:
        return z if z > np.float32(0.0) else np.float32(0.0)
    if act == 2:
        return np.float32(1.0) / (np.float32(1.0) + math.exp(-z))
    if act == 3:
        return math.tanh(z)
    return z


@cuda.jit(device=True, inline=True)
def derivative_from_output(y, act):
    """d act / dz in terms of the output y = act(z)."""
    if act == 1:
        return np.float32(1.0) if y > np.float32(0.0) else np.float32(0.0)
    if act == 2:
        return y * (np.float32(1.0) - y)
    if act == 3:
        return np.float32(1.0) - y * y
    return np.float32(1.0)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints: the number of tiles covering a."""
    return -(-a // b)


def stream_or_default(stream):
    """The launch stream: the caller's, or 0 (Numba's default stream)."""
    return 0 if stream is None else stream


def dummy_bias(stream):
    """A 1-element device array passed as ``b`` when there is no bias (has_bias=0; never
    read): a view of the stream's workspace, so nothing is allocated per call."""
    return workspace(1, stream, tag="bias")


def _stream_key(stream):
    if stream is None or (isinstance(stream, int) and stream == 0):
        key = 0
    else:
        try:
            key = int(stream)            # a Numba stream: its handle (0 for the default stream)
        except TypeError:
            key = id(stream)             # the simulator's streams have no handle
    return (key, threading.get_ident())


def _simulated() -> bool:
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def _device_id():
    if _simulated():
        return 0
    return int(getattr(cuda.get_current_device(), "id", 0))


_WORKSPACES = collections.OrderedDict()
_WORKSPACE_LOCK = threading.Lock()


def workspace(n: int, stream, tag: str = "partials"):
    """A float32 device array of ``n`` elements owned by ``stream`` (see the module docs): the
    same memory on every call with the same stream and tag until a bigger one is needed.
    Its contents are garbage; the caller writes before it reads."""
    n = max(int(n), 1)
    key = (_device_id(), _stream_key(stream), tag)
    with _WORKSPACE_LOCK:
        buf = _WORKSPACES.get(key)
        if buf is None or buf.size < n:
            size = cdiv(n, WORKSPACE_GRANULE) * WORKSPACE_GRANULE if n > 1 else 1
            # the old buffer (if any) is dropped: Numba frees it after queued work is done
            buf = cuda.device_array(size, np.float32, stream=stream_or_default(stream))
            _WORKSPACES[key] = buf
            while len(_WORKSPACES) > MAX_WORKSPACES:
                _WORKSPACES.popitem(last=False)
        _WORKSPACES.move_to_end(key)
        return buf[:n]


_SM_COUNTS = {}


def sm_count() -> int:
    """Streaming multiprocessors of the current device (SIMULATOR_SMS under the simulator)."""
    if _simulated():
        return SIMULATOR_SMS
    dev_id = _device_id()
    if dev_id not in _SM_COUNTS:
        _SM_COUNTS[dev_id] = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return _SM_COUNTS[dev_id]
