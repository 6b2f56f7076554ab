"""Grouped conv2d (``g.groups = G > 1``) on the CPU with Numba (``@njit(parallel=True)``):
forward, backward-data and backward-filter in one kernel call each.  Depthwise is G = C.

Shapes: x (N, H, W, C), w (KH, KW, Cg, F) with Cg = C / G (stock Keras' grouped kernel),
Fg = F / G.  Filter ``k`` belongs to group ``q = k // Fg`` and reads only that group's input
channels, a channel-strided slice of each NHWC pixel: offset ``q * Cg``, Cg channels::

    y[n, oh, ow, q*Fg + f] = act( b[k] + sum_{kh, kw, ci} x[n, ih, iw, q*Cg + ci] * w[kh, kw, ci, q*Fg + f] )
    ih = oh * stride_h - pad_top  + kh * dil_h
    iw = ow * stride_w - pad_left + kw * dil_w        (taps in the padding are skipped)

Forward: one ``prange`` iteration owns one output row (n, oh), one pixel at a time, an
F-float accumulator; the innermost loop runs over the Fg filters of a group (contiguous in w
and y).  Backward-data: the gather form, one iteration per input row (n, ih): the tap
(kh, kw) reached pixel (ih, iw) from ``oh = (ih + pad_top - kh*dil_h) / stride_h`` when the
division is exact and ``0 <= oh < out_h`` (likewise ow), and
``dx[n, ih, iw, q*Cg + ci] = sum_f dy[n, oh, ow, q*Fg + f] * w[kh, kw, ci, q*Fg + f]``; each
dx row has one owner: no atomics.  Backward-filter:
``dw[kh, kw, ci, k] = sum_{n, oh, ow} x[n, ih, iw, q*Cg + ci] * dy[n, oh, ow, k]`` over
GROUPED_CHUNKS fixed chunks of output pixels (a private dw each, added in chunk order: the
result does not depend on the thread count); db likewise.

The index maps (``_tap_input``: the scatter form, ``_tap_output``: the gather form) and each
pass's per-tap group nest (``_group_matvec`` / ``_group_dot`` / ``_group_outer``) are written once
as inlined ``@njit`` helpers that the three kernels call.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlconv.arrays import empty_host

from .cpu_common import FASTMATH, activate

__all__ = ["forward", "backward_data", "backward_filter", "GROUPED_CHUNKS"]

#: Fixed pixel chunks of the backward-filter reduction: enough for every core to hold one
#: and few enough that the private dw partials (KH*KW*Cg*F floats each, small for grouped
#: layers) stay cheap to add.
GROUPED_CHUNKS = 16


# ----------------------------------------------------------------------------- shared loop pieces
# Written once, inlined into each kernel below (inline="always": no call).

@njit(inline="always")
def _pixel(p, rows, cols):
    """Flat pixel p of an (N, rows, cols) grid -> (n, row, col)."""
    n = p // (rows * cols)
    r = p % (rows * cols)
    return n, r // cols, r % cols


@njit(inline="always")
def _tap_input(o, s, p, k, d, size):
    """The input index tap k of output index o reads (``o*s - p + k*d``), or -1 in the padding."""
    i = o * s - p + k * d
    return i if 0 <= i < size else -1


@njit(inline="always")
def _tap_output(i, s, p, k, d, size):
    """The output index whose tap k read input index i (the gather form), or -1 when none:
    ``(i + p - k*d) / s`` must be exact and inside [0, size)."""
    t = i + p - k * d
    if t < 0 or t % s != 0 or t // s >= size:
        return -1
    return t // s


# The per-tap group nests take the whole arrays and the tap's indices (not views of them): a view
# per tap cost the wide-group kernels ~20% (measured, G = 2 and 4, 64 -> 64 channels).
@njit(inline="always")
def _group_matvec(x, w, acc, n, ih, iw, kh, kw, groups, cg, fg):
    """Forward, one tap: ``acc[q*fg + f] += sum_ci x[n, ih, iw, q*cg + ci] * w[kh, kw, ci, q*fg + f]``."""
    for q in range(groups):
        for ci in range(cg):
            xv = x[n, ih, iw, q * cg + ci]
            for f in range(q * fg, (q + 1) * fg):
                acc[f] += xv * w[kh, kw, ci, f]


@njit(inline="always")
def _group_dot(dy, w, acc, n, oh, ow, kh, kw, groups, cg, fg):
    """Backward-data, one tap:
    ``acc[q*cg + ci] += sum_f dy[n, oh, ow, q*fg + f] * w[kh, kw, ci, q*fg + f]``."""
    for q in range(groups):
        for ci in range(cg):
            s = np.float32(0.0)
            for f in range(q * fg, (q + 1) * fg):
                s += dy[n, oh, ow, f] * w[kh, kw, ci, f]
            acc[q * cg + ci] += s


@njit(inline="always")
def _group_outer(x, dy, part, ch, n, ih, iw, oh, ow, kh, kw, groups, cg, fg):
    """Backward-filter, one tap:
    ``part[ch, kh, kw, ci, q*fg + f] += x[n, ih, iw, q*cg + ci] * dy[n, oh, ow, q*fg + f]``."""
    for q in range(groups):
        for ci in range(cg):
            xv = x[n, ih, iw, q * cg + ci]
            for f in range(q * fg, (q + 1) * fg):
                part[ch, kh, kw, ci, f] += xv * dy[n, oh, ow, f]


# ----------------------------------------------------------------------------- kernels
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _fwd_kernel(x, w, b, y, groups, s_h, s_w, d_h, d_w, p_t, p_l, act):
    n_img, in_h, in_w, c_in = x.shape
    k_h, k_w, cg, k_out = w.shape
    out_h, out_w = y.shape[1], y.shape[2]
    fg = k_out // groups
    for row in prange(n_img * out_h):
        n = row // out_h
        oh = row % out_h
        acc = np.empty(k_out, np.float32)
        for ow in range(out_w):
            acc[:] = b
            for kh in range(k_h):
                ih = _tap_input(oh, s_h, p_t, kh, d_h, in_h)
                if ih < 0:
                    continue
                for kw in range(k_w):
                    iw = _tap_input(ow, s_w, p_l, kw, d_w, in_w)
                    if iw < 0:
                        continue
                    _group_matvec(x, w, acc, n, ih, iw, kh, kw, groups, cg, fg)
            for k in range(k_out):
                y[n, oh, ow, k] = activate(acc[k], act)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bwd_data_kernel(dy, w, dx, groups, s_h, s_w, d_h, d_w, p_t, p_l):
    n_img, in_h, in_w, c_in = dx.shape
    k_h, k_w, cg, k_out = w.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    fg = k_out // groups
    for row in prange(n_img * in_h):
        n = row // in_h
        ih = row % in_h
        acc = np.empty(c_in, np.float32)
        for iw in range(in_w):
            acc[:] = 0.0
            for kh in range(k_h):
                oh = _tap_output(ih, s_h, p_t, kh, d_h, out_h)
                if oh < 0:
                    continue
                for kw in range(k_w):
                    ow = _tap_output(iw, s_w, p_l, kw, d_w, out_w)
                    if ow < 0:
                        continue
                    _group_dot(dy, w, acc, n, oh, ow, kh, kw, groups, cg, fg)
            dx[n, ih, iw, :] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bwd_filter_kernel(x, dy, part, pdb, groups, k_h, k_w, s_h, s_w, d_h, d_w, p_t, p_l):
    """part[chunk] = this chunk's dw (KH, KW, Cg, F); pdb[chunk] its db."""
    n_img, in_h, in_w, c_in = x.shape
    out_h, out_w, k_out = dy.shape[1], dy.shape[2], dy.shape[3]
    n_chunks, cg = part.shape[0], part.shape[3]
    fg = k_out // groups
    n_pix = n_img * out_h * out_w
    step = (n_pix + n_chunks - 1) // n_chunks
    for ch in prange(n_chunks):
        part[ch] = 0.0
        pdb[ch] = 0.0
        for p in range(ch * step, min(n_pix, (ch + 1) * step)):
            n, oh, ow = _pixel(p, out_h, out_w)
            for k in range(k_out):
                pdb[ch, k] += dy[n, oh, ow, k]
            for kh in range(k_h):
                ih = _tap_input(oh, s_h, p_t, kh, d_h, in_h)
                if ih < 0:
                    continue
                for kw in range(k_w):
                    iw = _tap_input(ow, s_w, p_l, kw, d_w, in_w)
                    if iw < 0:
                        continue
                    _group_outer(x, dy, part, ch, n, ih, iw, oh, ow, kh, kw, groups, cg, fg)


def _bias(b, k):
    return np.zeros(k, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)


def forward(x, w, b, g, act: int) -> np.ndarray:
    """y (shape g.y_shape) = act(grouped conv2d(x, w) + b)."""
    y = empty_host(g.y_shape)
    _fwd_kernel(x, w, _bias(b, g.filters), y, g.groups, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                g.pad_top, g.pad_left, act)
    return y


def backward_data(dy, w, g) -> np.ndarray:
    """dL/dx (shape g.x_shape) from dL/dz and the grouped weights."""
    dx = empty_host(g.x_shape)
    _bwd_data_kernel(dy, w, dx, g.groups, g.stride_h, g.stride_w, g.dil_h, g.dil_w, g.pad_top, g.pad_left)
    return dx


def backward_filter(x, dy, g):
    """(dL/dw with shape g.w_shape, dL/db) from x and dL/dz."""
    n_pix = g.batch * g.out_h * g.out_w
    chunks = max(1, min(GROUPED_CHUNKS, n_pix))
    part = np.empty((chunks,) + g.w_shape, np.float32)
    pdb = np.empty((chunks, g.filters), np.float32)
    _bwd_filter_kernel(x, dy, part, pdb, g.groups, g.k_h, g.k_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                       g.pad_top, g.pad_left)
    dw = empty_host(g.w_shape)
    dw[...] = part.sum(axis=0, dtype=np.float64)
    return dw, pdb.sum(axis=0, dtype=np.float64).astype(np.float32)
