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
min(cdiv(rows, TILE), MAX_GRID_Y), splits), block (TILE, TILE); a block walks the row tiles
blockIdx.y, blockIdx.y + gridDim.y, ... (grid-stride: any batch size launches).

Split-K: when the output has too few tiles to fill the GPU (the dense forward 128x9216 →
128 is 8 x 8 = 64 blocks on 132 SMs, each walking 576 serial slices), blockIdx.z owns the
reduction range [z*k_len, (z+1)*k_len) and stores its raw sums at part[z, row, col] in the
stream's cached workspace; :func:`_sum_splits_kernel` then adds part[0..splits) in that fixed
order (one thread per output element) and applies bias + activation: deterministic, no
atomics.  With one split the matmul kernel writes the output with its epilogue directly.
The split count: :func:`split_k_splits` (the same rule as the C++ cuda_dense.cu).

db: one thread per column o, summing over the batch in order.  Softmax and softmax
backward: one block of ROW_THREADS threads per row; each thread strides over the row,
then a fixed shared-memory tree reduction (max, then the sum of exp) — deterministic.
Activation backward: one thread per element, 1-D grid.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from .cuda_common import (MAX_GRID_Y, activate, cdiv, derivative_from_output, dummy_bias, sm_count,
                          stream_or_default, workspace)

__all__ = ["launch_forward", "launch_softmax", "launch_backward", "launch_activation_backward",
           "launch_softmax_backward", "split_k_splits"]

#: Matmul tile edge: 16 x 16 = 256 threads, two 1 KiB shared tiles; each staged element
#: is reused 16 times.
TILE = 16
#: Threads per softmax row: one warp, so the tree reduction is 5 levels; rows longer than
#: 32 are strided over.
ROW_THREADS = 32
#: Threads per block for element-wise kernels.
ELEM_THREADS = 256
#: Split-K: a split keeps at least 16 TILE slices (enough work per block to amortise its
#: partial store and the extra reduce pass) ...
SPLIT_K_MIN_LEN = 16 * TILE
#: ... and the splits aim at two resident 256-thread blocks per SM ...
SPLIT_K_BLOCKS_PER_SM = 2
#: ... never more than 64 partials per element (the reduce pass reads each one) ...
SPLIT_K_MAX = 64
#: ... nor a workspace above 16 Mi floats (64 MiB).
SPLIT_K_MAX_WORKSPACE = 1 << 24


def split_k_splits(rows: int, cols: int, red: int, sms: int) -> int:
    """K splits of a (rows x cols) output with reduction length ``red`` on ``sms`` SMs: 1
    when the output is empty, its tiles already fill the SMs or the reduction is short (the
    rule of split_k_splits in csrc/cuda_dense.cu)."""
    tiles = cdiv(rows, TILE) * cdiv(cols, TILE)
    if tiles == 0 or tiles >= sms or red < 2 * SPLIT_K_MIN_LEN:
        return 1
    splits = min(cdiv(SPLIT_K_BLOCKS_PER_SM * sms, tiles), red // SPLIT_K_MIN_LEN, SPLIT_K_MAX)
    if rows * cols > 0:
        splits = min(splits, SPLIT_K_MAX_WORKSPACE // (rows * cols))
    return max(1, splits)


def _plan(rows, cols, red, splits):
    """(splits, k_len, grid) of a matmul launch; ``splits`` None = :func:`split_k_splits`."""
    if splits is None:
        splits = split_k_splits(rows, cols, red, sm_count())
    splits = max(1, min(int(splits), max(red, 1), MAX_GRID_Y))
    k_len = cdiv(cdiv(red, splits), TILE) * TILE if splits > 1 else max(red, 1)
    splits = max(1, cdiv(red, k_len))
    return splits, k_len, (cdiv(cols, TILE), min(cdiv(rows, TILE), MAX_GRID_Y), splits)


@cuda.jit
def _sum_splits_kernel(part, b, out, has_bias, act):
    """out[i, o] = act(b[o] + sum_z part[z, i, o]), z in order (grid-stride, 1-D)."""
    n_r, n_c = out.shape
    e = cuda.grid(1)
    while e < n_r * n_c:
        i = e // n_c
        o = e % n_c
        acc = np.float32(0.0)
        for z in range(part.shape[0]):
            acc += part[z, i, o]
        if has_bias:
            acc += b[o]
        out[i, o] = activate(acc, act)
        e += cuda.gridsize(1)


def _run_matmul(kernel, args, out, rows, cols, red, s, splits, b=None, act=0):
    """Launch ``kernel(*args, target, k_len, epilogue, b, has_bias, act)`` over ``out``
    (rows x cols), split-K through the workspace when that pays."""
    sp, k_len, grid = _plan(rows, cols, red, splits)
    bb = dummy_bias(s) if b is None else b
    if sp == 1:
        kernel[grid, (TILE, TILE), s](*args, out.reshape(1, rows, cols), k_len, True, bb, b is not None, act)
        return
    part = workspace(sp * rows * cols, s).reshape(sp, rows, cols)
    kernel[grid, (TILE, TILE), s](*args, part, k_len, False, bb, False, 0)
    _sum_splits_kernel[cdiv(rows * cols, ELEM_THREADS), ELEM_THREADS, s](part, bb, out, b is not None, act)


@cuda.jit
def _forward_kernel(x, w, out, k_len, epilogue, b, has_bias, act):
    """out[z, i, o] = sum_{p in split z} x[i, p] * w[p, o]; with the epilogue (one split)
    out[0, i, o] = act(b[o] + the whole sum)."""
    xs = cuda.shared.array((TILE, TILE), np.float32)
    ws = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    z = cuda.blockIdx.z
    o = cuda.blockIdx.x * TILE + tx
    n_b, n_in = x.shape
    n_out = w.shape[1]
    p_lo = z * k_len
    p_hi = min(n_in, p_lo + k_len)
    for r0 in range(cuda.blockIdx.y * TILE, n_b, cuda.gridDim.y * TILE):
        i = r0 + ty
        acc = np.float32(0.0)
        for p0 in range(p_lo, p_hi, TILE):
            xs[ty, tx] = x[i, p0 + tx] if (i < n_b and p0 + tx < p_hi) else np.float32(0.0)
            ws[ty, tx] = w[p0 + ty, o] if (p0 + ty < p_hi and o < n_out) else np.float32(0.0)
            cuda.syncthreads()
            for q in range(TILE):
                acc += xs[ty, q] * ws[q, tx]
            cuda.syncthreads()
        if i < n_b and o < n_out:
            if epilogue:
                if has_bias:
                    acc += b[o]
                acc = activate(acc, act)
            out[z, i, o] = acc


def launch_forward(x, w, b, act: int, stream=None, splits=None):
    """``act(x @ w + b)`` for device arrays (b may be None); returns a device array.
    ``splits`` forces the number of K splits (None: :func:`split_k_splits`)."""
    s = stream_or_default(stream)
    n_b, n_in = x.shape
    n_out = w.shape[1]
    y = cuda.device_array((n_b, n_out), np.float32, stream=s)
    _run_matmul(_forward_kernel, (x, w), y, n_b, n_out, n_in, s, splits, b, act)
    return y


@cuda.jit
def _dx_kernel(dy, y, w, act, out, k_len, epilogue, b, has_bias, act_out):
    """out[z, i, p] = sum_{o in split z} dy[i, o] * act'(y[i, o]) * w[p, o]."""
    ds = cuda.shared.array((TILE, TILE), np.float32)
    ws = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    z = cuda.blockIdx.z
    p = cuda.blockIdx.x * TILE + tx
    n_b, n_out = dy.shape
    n_in = w.shape[0]
    o_lo = z * k_len
    o_hi = min(n_out, o_lo + k_len)
    for r0 in range(cuda.blockIdx.y * TILE, n_b, cuda.gridDim.y * TILE):
        i = r0 + ty
        acc = np.float32(0.0)
        for o0 in range(o_lo, o_hi, TILE):
            v = np.float32(0.0)
            if i < n_b and o0 + tx < o_hi:
                v = dy[i, o0 + tx] * derivative_from_output(y[i, o0 + tx], act)
            ds[ty, tx] = v
            # needed: ws[q, tx] = w[p, o0 + q].  Loaded along o (coalesced): thread (ty, tx)
            # reads w[pb + ty, o0 + tx] and stores it transposed at ws[tx, ty].
            pr = cuda.blockIdx.x * TILE + ty
            ws[tx, ty] = w[pr, o0 + tx] if (pr < n_in and o0 + tx < o_hi) else np.float32(0.0)
            cuda.syncthreads()
            for q in range(TILE):
                acc += ds[ty, q] * ws[q, tx]
            cuda.syncthreads()
        if i < n_b and p < n_in:
            out[z, i, p] = acc


@cuda.jit
def _dw_kernel(x, dy, y, act, out, k_len, epilogue, b, has_bias, act_out):
    """out[z, p, o] = sum_{i in split z} x[i, p] * dy[i, o] * act'(y[i, o])."""
    xs = cuda.shared.array((TILE, TILE), np.float32)
    ds = cuda.shared.array((TILE, TILE), np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    z = cuda.blockIdx.z
    o = cuda.blockIdx.x * TILE + tx
    n_b, n_in = x.shape
    n_out = dy.shape[1]
    i_lo = z * k_len
    i_hi = min(n_b, i_lo + k_len)
    for r0 in range(cuda.blockIdx.y * TILE, n_in, cuda.gridDim.y * TILE):
        p = r0 + ty
        acc = np.float32(0.0)
        for i0 in range(i_lo, i_hi, TILE):
            # needed: xs[q, ty] = x[i0 + q, p].  Loaded along p (coalesced): thread (ty, tx)
            # reads x[i0 + ty, pb + tx] into xs[ty, tx].
            pc = r0 + tx
            xs[ty, tx] = x[i0 + ty, pc] if (i0 + ty < i_hi and pc < n_in) else np.float32(0.0)
            v = np.float32(0.0)
            if i0 + ty < i_hi and o < n_out:
                v = dy[i0 + ty, o] * derivative_from_output(y[i0 + ty, o], act)
            ds[ty, tx] = v
            cuda.syncthreads()
            for q in range(TILE):
                acc += xs[q, ty] * ds[q, tx]
            cuda.syncthreads()
        if p < n_in and o < n_out:
            out[z, p, o] = acc


@cuda.jit
def _db_kernel(dy, y, db, act):
    o = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if o >= dy.shape[1]:
        return
    acc = np.float32(0.0)
    for i in range(dy.shape[0]):
        acc += dy[i, o] * derivative_from_output(y[i, o], act)
    db[o] = acc


def launch_backward(x, w, dy, y, act: int, stream=None, splits=None):
    """(dx, dw, db) device arrays for ``y = act(x @ w + b)``; y is unused when act is 0.
    ``splits`` forces the K splits of both matmuls (None: :func:`split_k_splits`)."""
    s = stream_or_default(stream)
    n_b, n_in = x.shape
    n_out = w.shape[1]
    yy = dy if y is None else y           # act 0 never reads it
    dx = cuda.device_array((n_b, n_in), np.float32, stream=s)
    _run_matmul(_dx_kernel, (dy, yy, w, act), dx, n_b, n_in, n_out, s, splits)
    dw = cuda.device_array((n_in, n_out), np.float32, stream=s)
    _run_matmul(_dw_kernel, (x, dy, yy, act), dw, n_in, n_out, n_b, s, splits)
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
