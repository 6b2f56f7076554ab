"""Dense layer on the CPU with Numba (``@njit(parallel=True)``):
``y = act(x @ w + b)`` with x (B, I), w (I, O), b (O,); row-wise softmax; the backward
pass; element-wise activation backward.

Index map::

    y[i, o]  = act( b[o] + sum_p x[i, p] * w[p, o] )
    dz[i, o] = dy[i, o] * act'(y[i, o])           (act' written with the output y)
    dx[i, p] = sum_o dz[i, o] * w[p, o]
    dw[p, o] = sum_i x[i, p] * dz[i, o]
    db[o]    = sum_i dz[i, o]

Forward: one ``prange`` iteration owns DENSE_ROWS rows of y; for each p it broadcasts
x[i, p] against the contiguous row w[p, :] (the inner loop over o vectorises without
reassociation), then applies bias + activation in the same pass.  Ragged edge: the last
row block is shorter.
Backward: pass 1 computes dz (the derivative fused with the read of dy) and db over fixed
row chunks; pass 2 dx from dz and w transposed (inner loop over contiguous p); pass 3 dw,
one iteration per row p of dw reducing over i in order.  No atomics: deterministic.
Softmax: one iteration per row: max, exp and sum, scale (the max subtracted first so exp
never overflows).

Integers are int64 (Numba's int).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from dlconv.arrays import empty_host  # 64-byte aligned: TensorFlow adopts it without a copy

from .cpu_common import FASTMATH, activate, derivative_from_output

__all__ = ["forward", "softmax", "backward", "activation_backward", "softmax_backward"]

#: Rows of y per forward work item: each loaded row w[p, :] is reused for 4 rows of x,
#: and B / 4 items still give every core work at MNIST batch sizes (128 → 32 items).
DENSE_ROWS = 4
#: Fixed row chunks for db: partial sums added in chunk order (thread-count independent).
DB_CHUNKS = 16


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _forward_kernel(x, w, b, y, rows, act):
    n_b, n_in = x.shape
    n_out = w.shape[1]
    n_items = (n_b + rows - 1) // rows
    for item in prange(n_items):
        i0 = item * rows
        i1 = min(i0 + rows, n_b)
        acc = np.empty((i1 - i0, n_out), np.float32)
        for i in range(i1 - i0):
            acc[i, :] = b
        for p in range(n_in):
            for i in range(i1 - i0):
                xv = x[i0 + i, p]
                for o in range(n_out):
                    acc[i, o] += xv * w[p, o]
        for i in range(i1 - i0):
            for o in range(n_out):
                y[i0 + i, o] = activate(acc[i, o], act)


def forward(x: np.ndarray, w: np.ndarray, b, act: int) -> np.ndarray:
    """``act(x @ w + b)``; b may be None; act is an activation code."""
    y = empty_host((x.shape[0], w.shape[1]))
    bias = np.zeros(w.shape[1], np.float32) if b is None else b
    _forward_kernel(x, w, bias, y, DENSE_ROWS, act)
    return y


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _softmax_kernel(z, y):
    n_b, n_c = z.shape
    for i in prange(n_b):
        m = z[i, 0]
        for j in range(1, n_c):
            m = max(m, z[i, j])
        s = np.float32(0.0)
        for j in range(n_c):
            e = np.float32(math.exp(z[i, j] - m))
            y[i, j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(n_c):
            y[i, j] *= inv


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (B, classes) float32 array."""
    y = empty_host(z.shape)
    _softmax_kernel(z, y)
    return y


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dz_db_kernel(dy, y, dz, act, chunks):
    """dz = dy * act'(y) and the column sums of dz (fixed chunks, summed in order)."""
    n_b, n_out = dy.shape
    part = np.zeros((chunks, n_out), np.float32)
    step = (n_b + chunks - 1) // chunks
    for ch in prange(chunks):
        for i in range(ch * step, min(n_b, (ch + 1) * step)):
            for o in range(n_out):
                d = dy[i, o] * derivative_from_output(y[i, o], act)
                dz[i, o] = d
                part[ch, o] += d
    db = np.zeros(n_out, np.float32)
    for ch in range(chunks):
        for o in range(n_out):
            db[o] += part[ch, o]
    return db


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dx_kernel(dz, wt, dx):
    """dx = dz @ w.T with wt = w.T contiguous (O, I): inner loop over contiguous p."""
    n_b, n_out = dz.shape
    n_in = wt.shape[1]
    for i in prange(n_b):
        acc = np.zeros(n_in, np.float32)
        for o in range(n_out):
            d = dz[i, o]
            for p in range(n_in):
                acc[p] += d * wt[o, p]
        dx[i, :] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _dw_kernel(x, dz, dw):
    """dw = x.T @ dz: iteration p owns row dw[p, :], reducing over i in order."""
    n_b, n_in = x.shape
    n_out = dz.shape[1]
    for p in prange(n_in):
        acc = np.zeros(n_out, np.float32)
        for i in range(n_b):
            xv = x[i, p]
            for o in range(n_out):
                acc[o] += xv * dz[i, o]
        dw[p, :] = acc


def backward(x: np.ndarray, w: np.ndarray, dy: np.ndarray, y, act: int):
    """(dx, dw, db) of ``y = act(x @ w + b)``; y (forward output) is ignored when act is 0."""
    dz = empty_host(dy.shape)
    db = _dz_db_kernel(dy, dy if y is None else y, dz, act, DB_CHUNKS)
    dx = empty_host(x.shape)
    _dx_kernel(dz, np.ascontiguousarray(w.T), dx)
    dw = empty_host(w.shape)
    _dw_kernel(x, dz, dw)
    return dx, dw, db


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _act_backward_kernel(dy, y, dz, act):
    for i in prange(dy.shape[0]):
        dz[i] = dy[i] * derivative_from_output(y[i], act)


def activation_backward(dy: np.ndarray, y: np.ndarray, act: int) -> np.ndarray:
    """Element-wise dL/dz = dL/dy * act'(y) for any shape."""
    dz = empty_host(dy.shape)
    _act_backward_kernel(dy.reshape(-1), y.reshape(-1), dz.reshape(-1), act)
    return dz


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _softmax_backward_kernel(dy, y, dz):
    n_b, n_c = dy.shape
    for i in prange(n_b):
        s = np.float32(0.0)
        for j in range(n_c):
            s += dy[i, j] * y[i, j]
        for j in range(n_c):
            dz[i, j] = y[i, j] * (dy[i, j] - s)


def softmax_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dz = y * (dy - sum(dy * y)) row-wise, for a (B, classes) softmax output y."""
    dz = empty_host(dy.shape)
    _softmax_backward_kernel(dy, y, dz)
    return dz
