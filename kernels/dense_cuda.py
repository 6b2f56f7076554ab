"""Dense layer on CUDA with Numba: tiled matmul with a fused bias + activation epilogue,
row-wise softmax, the backward pass with the activation derivative fused into the loads,
and element-wise activation backward.  x (B, I), w (I, O), b (O,).

Index map::

    y[i, o]  = act( b[o] + sum_p x[i, p] * w[p, o] )
    dz[i, o] = dy[i, o] * act'(y[i, o])          (never stored: recomputed where loaded)
    dx[i, p] = sum_o dz[i, o] * w[p, o]
    dw[p, o] = sum_i x[i, p] * dz[i, o]
    db[o]    = sum_i dz[i, o]

Matmul kernels (forward, dx, dw): one block owns a TILE x TILE tile of the output, one
thread one element of it (threadIdx.x along the contiguous output column, so loads and
stores coalesce).  The reduction runs in TILE-long slices: the block stages one TILE x
TILE tile of each operand in shared memory, syncs, and each thread does TILE
multiply-adds.  For dx and dw the operand tile holding dz is staged as
dy * act'(y): the derivative is applied in the same pass.  Ragged edges (any size not a
multiple of TILE): staged elements outside the operands are 0 and threads outside the
output skip the store (they still stage and sync).  Launch: grid (cdiv(cols, TILE),
cdiv(rows, TILE)), block (TILE, TILE).

db: one thread per column o, summing over the batch in order.  Softmax and softmax
backward: one block of ROW_THREADS threads per row; each thread strides over the row,
then a fixed shared-memory tree reduction (max, then the sum of exp) — deterministic.
Activation backward: one thread per element, 1-D grid.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .cuda_common import activate, cdiv, derivative_from_output, dummy_bias, stream_or_default

__all__ = ["launch_forward", "launch_softmax", "launch_backward", "launch_activation_backward",
           "launch_softmax_backward"]

#: Matmul tile edge: 16 x 16 = 256 threads, two 1 KiB shared tiles; each staged element
#: is reused 16 times.
TILE = 16
#: Threads per softmax row: one warp, so the tree reduction is 5 levels; rows longer than
#: 32 are strided over.
ROW_THREADS = 32
#: Threads per block for element-wise kernels.
ELEM_THREADS = 256


@cuda.jit
def _forward_kernel(x, w, b, y, has_bias, act):
    xs = cuda.shared.array((TILE, TILE), np.float32)
    ws = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    o = cuda.blockIdx.x * TILE + tx
    i = cuda.blockIdx.y * TILE + ty
    n_b, n_in = x.shape
    n_out = w.shape[1]
    acc = np.float32(0.0)
    for p0 in range(0, n_in, TILE):
        xs[ty, tx] = x[i, p0 + tx] if (i < n_b and p0 + tx < n_in) else np.float32(0.0)
        ws[ty, tx] = w[p0 + ty, o] if (p0 + ty < n_in and o < n_out) else np.float32(0.0)
        cuda.syncthreads()
        for q in range(TILE):
            acc += xs[ty, q] * ws[q, tx]
        cuda.syncthreads()
    if i < n_b and o < n_out:
        if has_bias:
            acc += b[o]
        y[i, o] = activate(acc, act)


def launch_forward(x, w, b, act: int, stream=None):
    """``act(x @ w + b)`` for device arrays (b may be None); returns a device array."""
    s = stream_or_default(stream)
    n_b, n_out = x.shape[0], w.shape[1]
    y = cuda.device_array((n_b, n_out), np.float32, stream=s)
    bb = dummy_bias(s) if b is None else b
    _forward_kernel[(cdiv(n_out, TILE), cdiv(n_b, TILE)), (TILE, TILE), s](
        x, w, bb, y, b is not None, act)
    return y


@cuda.jit
def _dx_kernel(dy, y, w, dx, act):
    """dx[i, p] = sum_o dy[i, o] * act'(y[i, o]) * w[p, o]."""
    ds = cuda.shared.array((TILE, TILE), np.float32)
    ws = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    p = cuda.blockIdx.x * TILE + tx
    i = cuda.blockIdx.y * TILE + ty
    n_b, n_out = dy.shape
    n_in = w.shape[0]
    acc = np.float32(0.0)
    for o0 in range(0, n_out, TILE):
        v = np.float32(0.0)
        if i < n_b and o0 + tx < n_out:
            v = dy[i, o0 + tx] * derivative_from_output(y[i, o0 + tx], act)
        ds[ty, tx] = v
        # needed: ws[q, tx] = w[p, o0 + q].  Loaded along o (coalesced): thread (ty, tx)
        # reads w[pb + ty, o0 + tx] and stores it transposed at ws[tx, ty].
        pr = cuda.blockIdx.x * TILE + ty
        ws[tx, ty] = w[pr, o0 + tx] if (pr < n_in and o0 + tx < n_out) else np.float32(0.0)
        cuda.syncthreads()
        for q in range(TILE):
            acc += ds[ty, q] * ws[q, tx]
        cuda.syncthreads()
    if i < n_b and p < n_in:
        dx[i, p] = acc


@cuda.jit
def _dw_kernel(x, dy, y, dw, act):
    """dw[p, o] = sum_i x[i, p] * dy[i, o] * act'(y[i, o])."""
    xs = cuda.shared.array((TILE, TILE), np.float32)
    ds = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    o = cuda.blockIdx.x * TILE + tx
    p = cuda.blockIdx.y * TILE + ty
    n_b, n_in = x.shape
    n_out = dy.shape[1]
    acc = np.float32(0.0)
    for i0 in range(0, n_b, TILE):
        # needed: xs[q, ty] = x[i0 + q, p].  Loaded along p (coalesced): thread (ty, tx)
        # reads x[i0 + ty, pb + tx] into xs[ty, tx].
        pc = cuda.blockIdx.y * TILE + tx
        xs[ty, tx] = x[i0 + ty, pc] if (i0 + ty < n_b and pc < n_in) else np.float32(0.0)
        v = np.float32(0.0)
        if i0 + ty < n_b and o < n_out:
            v = dy[i0 + ty, o] * derivative_from_output(y[i0 + ty, o], act)
        ds[ty, tx] = v
        cuda.syncthreads()
        for q in range(TILE):
            acc += xs[q, ty] * ds[q, tx]
        cuda.syncthreads()
    if p < n_in and o < n_out:
        dw[p, o] = acc


@cuda.jit
def _db_kernel(dy, y, db, act):
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o >= dy.shape[1]:
        return
    acc = np.float32(0.0)
    for i in range(dy.shape[0]):
        acc += dy[i, o] * derivative_from_output(y[i, o], act)
    db[o] = acc


def launch_backward(x, w, dy, y, act: int, stream=None):
    """(dx, dw, db) device arrays for ``y = act(x @ w + b)``; y is unused when act is 0."""
    s = stream_or_default(stream)
    n_b, n_in = x.shape
    n_out = w.shape[1]
    yy = dy if y is None else y           # act 0 never reads it
    dx = cuda.device_array((n_b, n_in), np.float32, stream=s)
    _dx_kernel[(cdiv(n_in, TILE), cdiv(n_b, TILE)), (TILE, TILE), s](dy, yy, w, dx, act)
    dw = cuda.device_array((n_in, n_out), np.float32, stream=s)
    _dw_kernel[(cdiv(n_out, TILE), cdiv(n_in, TILE)), (TILE, TILE), s](x, dy, yy, dw, act)
    db = cuda.device_array(n_out, np.float32, stream=s)
    _db_kernel[cdiv(n_out, ELEM_THREADS), ELEM_THREADS, s](dy, yy, db, act)
    return dx, dw, db


@cuda.jit
def _softmax_kernel(z, y):
    red = cuda.shared.array(ROW_THREADS, np.float32)
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    n_c = z.shape[1]
    m = -np.float32(np.inf)
    for j in range(t, n_c, ROW_THREADS):
        m = max(m, z[i, j])
    red[t] = m
    cuda.syncthreads()
    half = ROW_THREADS // 2
    while half > 0:
        if t < half:
            red[t] = max(red[t], red[t + half])
        cuda.syncthreads()
        half //= 2
    m = red[0]
    cuda.syncthreads()
    s = np.float32(0.0)
    for j in range(t, n_c, ROW_THREADS):
        e = math.exp(z[i, j] - m)
        y[i, j] = e
        s += e
    red[t] = s
    cuda.syncthreads()
    half = ROW_THREADS // 2
    while half > 0:
        if t < half:
            red[t] += red[t + half]
        cuda.syncthreads()
        half //= 2
    inv = np.float32(1.0) / red[0]
    for j in range(t, n_c, ROW_THREADS):
        y[i, j] *= inv


def launch_softmax(z, stream=None):
    """Row-wise softmax of a (B, classes) device array."""
    s = stream_or_default(stream)
    y = cuda.device_array(z.shape, np.float32, stream=s)
    _softmax_kernel[z.shape[0], ROW_THREADS, s](z, y)
    return y


@cuda.jit
def _softmax_backward_kernel(dy, y, dz):
    red = cuda.shared.array(ROW_THREADS, np.float32)
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    n_c = dy.shape[1]
    s = np.float32(0.0)
    for j in range(t, n_c, ROW_THREADS):
        s += dy[i, j] * y[i, j]
    red[t] = s
    cuda.syncthreads()
    half = ROW_THREADS // 2
    while half > 0:
        if t < half:
            red[t] += red[t + half]
        cuda.syncthreads()
        half //= 2
    s = red[0]
    for j in range(t, n_c, ROW_THREADS):
        dz[i, j] = y[i, j] * (dy[i, j] - s)


def launch_softmax_backward(dy, y, stream=None):
    """dL/dz = y * (dy - sum_j dy*y) row-wise, for (B, classes) device arrays."""
    s = stream_or_default(stream)
    dz = cuda.device_array(dy.shape, np.float32, stream=s)
    _softmax_backward_kernel[dy.shape[0], ROW_THREADS, s](dy, y, dz)
    return dz


@cuda.jit
def _act_backward_kernel(dy, y, dz, act):
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if e < dy.shape[0]:
        dz[e] = dy[e] * derivative_from_output(y[e], act)


def launch_activation_backward(dy, y, act: int, stream=None):
    """Element-wise dL/dz = dy * act'(y) for device arrays of any (equal) shape."""
    s = stream_or_default(stream)
    dz = cuda.device_array(dy.shape, np.float32, stream=s)
    n = dy.size
    _act_backward_kernel[cdiv(n, ELEM_THREADS), ELEM_THREADS, s](
        dy.reshape(n), y.reshape(n), dz.reshape(n), act)
    return dz
