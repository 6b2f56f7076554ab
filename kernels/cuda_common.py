"""Device functions and launch helpers shared by the Numba CUDA kernels.

Activation codes are those of :mod:`dlconv.activations` (linear 0, relu 1, sigmoid 2,
tanh 3); constants are ``np.float32`` so every branch stays in float32 on the device.
Integers: kernel scalars arrive as int64 (Numba's int), so flat indices cannot overflow.
Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs on the CPU (one Python thread per CUDA
thread).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

__all__ = ["activate", "derivative_from_output", "cdiv", "stream_or_default", "dummy_bias"]


@cuda.jit(device=True, inline=True)
def activate(z, act):
    """act(z) for one float32 element."""
    if act == 1:
        return np.float32(0.0) if z < np.float32(0.0) else z   # NaN stays NaN (TensorFlow)
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
    """A 1-element device array passed as ``b`` when there is no bias (has_bias=0)."""
    return cuda.device_array(1, np.float32, stream=stream)
