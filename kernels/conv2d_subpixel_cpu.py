"""conv2d backward-data on the CPU with Numba for any stride: the sub-pixel decomposition
into ``stride_h * stride_w`` stride-1 convolutions of dz, one per phase, each written into
its own dx pixels (the Python/Numba twin of ``csrc/cpu_conv_subpixel.h``).

What it computes (NHWC, HWIO, geometry ``g`` from :mod:`dlconv.shapes`)::

    dx[n, ih, iw, c] = sum_{kh, kw, k} dz[n, oh, ow, k] * w[kh, kw, c, k]
    over the taps with oh = (ih + pad_top - kh*dil_h) / stride_h exact and in [0, out_h)

The generic gather (:func:`.conv2d_cpu.backward_data_gather`) tests every tap of every dx
pixel for that exact division; at stride 2 three taps in four miss.

Index map (:func:`dlconv.shapes.transposed_geometry`; nothing here re-derives it): the dx
pixels of phase (rh, rw) are ``ih = rh + stride_h*q``, ``iw = rw + stride_w*p``.  Only the
taps ``kh = tap_last_h - j*tap_step_h`` (j < taps_h) reach them, from
``oh = q - pad_top' + j*dil_h'``, so::

    dx[n, rh + s_h*q, rw + s_w*p, c] = sum_{j, i, k} dz[n, q - pad_top' + j*dil_h',
                                                        p - pad_left' + i*dil_w', k] * wf[j, i, k, c]
    wf[j, i, k, c] = w[tap_last_h - j*tap_step_h, tap_last_w - i*tap_step_w, c, k]

a stride-1 forward convolution of dz with the phase's sub-filter (every tap of which hits).

Edges: dz is copied once (NumPy: a Numba per-row slice copy ran ~4x slower) into a
zero-padded buffer shared by all phases, its origin at
``(ORG_H, ORG_W)`` = the largest positive phase pads; phase t reads it from row
``ORG_H - pad_top'`` and column ``ORG_W - pad_left'`` (a negative pad, i.e. a crop of dz, is
a larger offset).  The buffer is sized so that every tap of every phase, including the
narrow kernel's overhanging tile rows and lanes, reads inside it.  A phase no tap reaches
(kernel smaller than the stride, or dilation sharing a factor with it) is zero-filled; a
phase with no dx pixel (in_h < stride) is skipped.

Three paths by the dx channel count C:

``NARROW_MAX_C < C <= 16``, stride > 1  :func:`_wide16_kernel`: every phase in one launch,
    an 8-pixel x 16-channel register tile (the forward's ``_k16_kernel`` tile, weights
    zero-padded to 16 channels), stored straight into dx (no per-phase block, no scatter).
    One ``prange`` iteration per (n, q) does row q of every phase, so the static split's
    chunks carry equal FMAs (one launch per phase plus a scatter, on 32x32x16 -> 32 at batch
    32, took ~2 ms on 1 or 2 threads; this takes ~0.4-0.5 ms in the bench on 2 cores).
``C > 16`` (or stride 1)  the phase convolution runs on the forward's register-tiled inner
    kernels, unchanged (:mod:`.conv2d_cpu_small` ``_k16_kernel`` / ``_k32_kernel`` up to 32
    channels, :mod:`.conv2d_cpu` ``_gemm_kernel`` above): they vectorise over their filters,
    here the dx channels.  The buffer is NHWC (F channels); each phase writes a contiguous
    (N, q, p, C) block and one :func:`_scatter_phases` launch (one ``prange`` iteration per
    (phase, n, q) row) copies them all to dx[:, rh::s_h, rw::s_w, :] (stride 1: the one
    phase is written to dx directly).
``C <= NARROW_MAX_C``  (the input gradient of a stem on a 1-3 channel image) a filter-
    vectorised tile would use C of 16 lanes.  :func:`_narrow_kernel` vectorises over 16
    consecutive phase pixels p instead: dz is copied transposed, (N, F, HB, WB), so that a
    row of one dz channel is contiguous.  One ``prange`` iteration owns NARROW_ROWS phase
    rows (n, q0 .. q0+7) of one phase for every p-vector and channel c (all phases' items in
    one launch, a per-phase table giving each its geometry); its register tile is
    NARROW_ROWS f32x16 accumulators (one per row, 16 pixels each), and per (j, i, k) it
    broadcasts wf[j, i, k, c] once and loads one dz vector per row (8 FMAs).  The tile may
    overhang the phase (rows past qh, lanes past qw: they read the buffer's zero margin) and
    only the pixels inside are stored, straight into dx.

Results do not depend on the thread count (every dx element is written by one iteration,
its sum in a fixed order).  Launch geometry: ``prange`` loops split by Numba's threading
layer over all cores; the narrow and 16-channel paths are one launch, the other one launch
per phase that a tap reaches plus one scatter.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from dlconv.arrays import empty_host
from dlconv.shapes import transposed_phases

from . import conv2d_cpu_small as small
from .conv2d_cpu import _gemm_kernel, weight_matrix
from .cpu_common import FASTMATH, LANES, stack_micro_tile, vbroadcast, vfma, vload, vstore, vzero

__all__ = ["backward_data", "NARROW_MAX_C", "NARROW_ROWS"]

#: Most dx channels the pixel-vectorised narrow kernel takes: from 9 channels on, the forward's
#: filter-vectorised tiles fill more than half of their 16 lanes (as csrc/cpu_conv_subpixel.h).
NARROW_MAX_C = 8
#: Phase rows per narrow tile = independent FMA chains: 8 cover the FMA latency (4 cycles) at
#: 2 FMAs per cycle, and leave registers for the weight broadcast and loop state.
NARROW_ROWS = 8
#: dx channels the small-tile forward kernels take (their widest panels are 32 filters).
SMALL_MAX_C = 2 * LANES


# ----------------------------------------------------------------------------- helpers
def _sub_filter(w: np.ndarray, taps) -> np.ndarray:
    """wf[j, i, k, c] = w[kh[j], kw[i], c, k] of a phase whose taps are ``(kh, kw)`` (HWIO of
    the phase convolution: F inputs, C filters)."""
    kh, kw = taps
    return w[kh][:, kw].transpose(0, 1, 3, 2)


def _buffer_extent(g, phases, rows_round: int, cols_round: int):
    """(org_h, org_w, HB, WB) of the padded dz buffer every phase reads: the origin is the
    largest positive pad; HB/WB cover every phase's taps on its output rounded up to
    ``rows_round`` rows and ``cols_round`` columns (the narrow tile's overhang)."""
    org_h = max([0] + [t.pad_top for t in phases])
    org_w = max([0] + [t.pad_left for t in phases])
    hb, wb = org_h + g.out_h, org_w + g.out_w
    for t in phases:
        qh = -(-t.out_h // rows_round) * rows_round
        qw = -(-t.out_w // cols_round) * cols_round
        hb = max(hb, org_h - t.pad_top + qh - 1 + (t.taps_h - 1) * t.dil_h + 1)
        wb = max(wb, org_w - t.pad_left + qw - 1 + (t.taps_w - 1) * t.dil_w + 1)
    return org_h, org_w, hb, wb


def _fill_padded(dz, buf, org_h, org_w):
    """buf[n, org_h + oh, org_w + ow, :] = dz[n, oh, ow, :], zero elsewhere (NumPy: its
    strided copy runs at memory speed, where a Numba slice assignment per row was ~4x
    slower; only the margins are zeroed)."""
    out_h, out_w = dz.shape[1], dz.shape[2]
    buf[:, :org_h] = 0.0
    buf[:, org_h + out_h:] = 0.0
    mid = buf[:, org_h:org_h + out_h]
    mid[:, :, :org_w] = 0.0
    mid[:, :, org_w + out_w:] = 0.0
    np.copyto(mid[:, :, org_w:org_w + out_w], dz)


@njit(parallel=True, cache=True)
def _scatter_phases(yf, dx, meta, s_h, s_w):
    """dx[n, rh + s_h*q, rw + s_w*p, :] = phase t's block (N, qh, qw, C) of yf for every
    phase row; meta[t] = (first row of t in the row numbering, offset of t in yf, qh, qw, rh,
    rw), the last entry holding the total row count.  One iteration per (phase, n, q)."""
    n_img, in_h, in_w, c_in = dx.shape
    n_ph = meta.shape[0] - 1
    for row in prange(meta[n_ph, 0]):
        t = 0
        while meta[t + 1, 0] <= row:
            t += 1
        r = row - meta[t, 0]
        qh, qw, rh, rw = meta[t, 2], meta[t, 3], meta[t, 4], meta[t, 5]
        n = r // qh
        q = r - n * qh
        src = meta[t, 1] + (n * qh + q) * qw * c_in
        for p in range(qw):
            for c in range(c_in):
                dx[n, rh + s_h * q, rw + s_w * p, c] = yf[src + p * c_in + c]


@functools.lru_cache(maxsize=256)
def _plan(g, narrow: bool):
    """What a geometry's backward-data needs before any data (keyed on the path too: the
    narrow buffer's extent covers its tile overhang, so a change of NARROW_MAX_C between
    calls must not reuse the other path's plan): (live phases, whether some
    phase with dx pixels has no tap, the padded buffer's extent (org_h, org_w, HB, WB),
    each live phase's sub-filter tap indices (kh, kw))."""
    phases = [t for t in transposed_phases(g) if t.out_h > 0 and t.out_w > 0]
    live = tuple(t for t in phases if not t.empty)
    extent = (_buffer_extent(g, live, NARROW_ROWS if narrow else 1, LANES if narrow else 1)
              if live else None)
    taps = tuple((t.tap_last_h - t.tap_step_h * np.arange(t.taps_h),
                  t.tap_last_w - t.tap_step_w * np.arange(t.taps_w)) for t in live)
    return live, len(live) < len(phases), extent, taps


# ----------------------------------------------------------------------------- narrow kernel
#: Columns of the narrow kernel's per-phase table (``pt``; row n_phases holds the totals).
_PT_ITEM0, _PT_W0, _PT_R0, _PT_C0, _PT_TH, _PT_TW, _PT_DH, _PT_DW, _PT_QH, _PT_QW, _PT_RH, _PT_RW = range(12)


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _narrow_kernel(bf, wk, dxf, pt, n_img, f, hb, wb, c_in, in_h, in_w, s_h, s_w):
    """Every phase, C <= NARROW_MAX_C, in one launch.  bf: the transposed buffer, flat
    (N, F, HB, WB); wk: the phases' sub-filters, each flat (C, TH, TW, F) from offset
    pt[t, W0]; pt[t]: the phase's first item, its first buffer row / column (R0, C0), taps,
    dilations, rows / columns (QH, QW) and phase (RH, RW).  Item (phase, n, row block)
    writes dx[n, rh + s_h*q, rw + s_w*p, c] for q in the block, every p and c."""
    rr = NARROW_ROWS
    n_ph = pt.shape[0] - 1
    plane = hb * wb
    for item in prange(pt[n_ph, _PT_ITEM0]):
        t = 0
        while pt[t + 1, _PT_ITEM0] <= item:
            t += 1
        taps_h, taps_w = pt[t, _PT_TH], pt[t, _PT_TW]
        d_h, d_w = pt[t, _PT_DH], pt[t, _PT_DW]
        qh, qw = pt[t, _PT_QH], pt[t, _PT_QW]
        n_rb = -(-qh // rr)
        local = item - pt[t, _PT_ITEM0]
        n = local // n_rb
        q0 = (local % n_rb) * rr
        r0 = pt[t, _PT_R0] + q0
        n_pv = -(-qw // LANES)
        acc = stack_micro_tile()                       # acc[r]: phase row q0 + r, 16 pixels
        tile = np.empty(rr * LANES, np.float32)
        for c in range(c_in):
            for pv in range(n_pv):
                p0 = pv * LANES
                for r in range(rr):
                    acc[r] = vzero()
                for j in range(taps_h):
                    for i in range(taps_w):
                        w0 = pt[t, _PT_W0] + ((c * taps_h + j) * taps_w + i) * f
                        b0 = n * f * plane + (r0 + j * d_h) * wb + pt[t, _PT_C0] + p0 + i * d_w
                        for k in range(f):
                            wv = vbroadcast(wk, w0 + k)
                            bk = b0 + k * plane
                            for r in range(rr):
                                acc[r] = vfma(vload(bf, bk + r * wb), wv, acc[r])
                for r in range(rr):
                    vstore(tile, r * LANES, acc[r])
                for r in range(min(rr, qh - q0)):
                    ih = pt[t, _PT_RH] + s_h * (q0 + r)
                    base = ((n * in_h + ih) * in_w + pt[t, _PT_RW]) * c_in + c
                    for l in range(min(LANES, qw - p0)):
                        dxf[base + s_w * (p0 + l) * c_in] = tile[r * LANES + l]


# ----------------------------------------------------------------------------- wide kernel
#: Pixels per wide tile (f32x16 accumulators, one per pixel, 16 dx channels each).
WIDE_MR = 8


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _wide16_kernel(bf, wk, dxf, pt, n_img, q_max, f, hb, wb, c_in, in_h, in_w, s_h, s_w):
    """Every phase, NARROW_MAX_C < C <= 16, in one launch, stored straight into dx.  bf: the
    NHWC buffer, flat (N, HB, WB, F); wk: the phases' sub-filters, each flat (TH, TW, F, 16)
    (channels zero-padded to 16) from offset pt[t, W0]; pt as :func:`_narrow_kernel`'s (its
    ITEM0 column unused).  Item (n, q), q < q_max = the most rows of any phase, writes
    dx[n, rh + s_h*q, rw + s_w*p, :] for every p of every phase with a row q: one item holds
    all phases' work on that row, so the ``prange`` split's contiguous chunks carry equal
    work (items per phase would give the thread holding the 2x2-tap phase twice the FMAs of
    the other at stride 2, 3x3).  Pixels go in blocks of WIDE_MR (the last block overlaps the
    one before: the pixels both hold get the same sum, written twice by the same item)."""
    mr = WIDE_MR
    n_ph = pt.shape[0] - 1
    for item in prange(n_img * q_max):
        n = item // q_max
        q = item - n * q_max
        acc = stack_micro_tile()                       # acc[p]: pixel p0 + p, 16 channels
        tile = np.empty(mr * LANES, np.float32)
        for t in range(n_ph):
            taps_h, taps_w = pt[t, _PT_TH], pt[t, _PT_TW]
            d_h, d_w = pt[t, _PT_DH], pt[t, _PT_DW]
            qh, qw = pt[t, _PT_QH], pt[t, _PT_QW]
            if q >= qh:
                continue
            r0 = pt[t, _PT_R0] + q
            c0 = pt[t, _PT_C0]
            wt = pt[t, _PT_W0]
            dx_row = ((n * in_h + pt[t, _PT_RH] + s_h * q) * in_w + pt[t, _PT_RW]) * c_in
            if qw >= mr:
                n_blocks = -(-qw // mr)
                for blk in range(n_blocks):
                    p0 = min(blk * mr, qw - mr)
                    for p in range(mr):
                        acc[p] = vzero()
                    for j in range(taps_h):
                        for i in range(taps_w):
                            x0 = ((n * hb + r0 + j * d_h) * wb + c0 + p0 + i * d_w) * f
                            w0 = wt + (j * taps_w + i) * f * LANES
                            for k in range(f):
                                w_0 = vload(wk, w0 + k * LANES)
                                for p in range(mr):
                                    acc[p] = vfma(vbroadcast(bf, x0 + p * f + k), w_0, acc[p])
                    if c_in == LANES:
                        for p in range(mr):
                            vstore(dxf, dx_row + s_w * (p0 + p) * c_in, acc[p])
                        continue
                    for p in range(mr):
                        vstore(tile, p * LANES, acc[p])
                    for p in range(mr):
                        for c in range(c_in):
                            dxf[dx_row + s_w * (p0 + p) * c_in + c] = tile[p * LANES + c]
                continue
            for p in range(qw):                            # a row narrower than the tile
                a_0 = vzero()
                for j in range(taps_h):
                    for i in range(taps_w):
                        x0 = ((n * hb + r0 + j * d_h) * wb + c0 + p + i * d_w) * f
                        w0 = wt + (j * taps_w + i) * f * LANES
                        for k in range(f):
                            a_0 = vfma(vbroadcast(bf, x0 + k), vload(wk, w0 + k * LANES), a_0)
                vstore(tile, 0, a_0)
                for c in range(c_in):
                    dxf[dx_row + s_w * p * c_in + c] = tile[c]


# ----------------------------------------------------------------------------- launcher
def backward_data(dz: np.ndarray, w: np.ndarray, g) -> np.ndarray:
    """dL/dx (shape g.x_shape) from dL/dz (shape g.y_shape) and HWIO weights, any stride,
    dilation and padding (g.groups == 1)."""
    if g.groups != 1:
        raise ValueError(f"the sub-pixel backward-data takes groups == 1, got groups={g.groups}")
    dz = np.ascontiguousarray(dz, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    live, some_empty, extent, taps = _plan(g, g.in_c <= NARROW_MAX_C)
    dx = empty_host(g.x_shape)
    if some_empty:                                     # phases no tap reaches are zero
        dx.fill(0.0)
    if not live:
        return dx
    c_in, f = g.in_c, g.filters
    org_h, org_w, hb, wb = extent
    if c_in <= NARROW_MAX_C:
        buf = empty_host((g.batch, f, hb, wb))        # pooled: no page faults per call
        buf.fill(0.0)
        buf[:, :, org_h:org_h + g.out_h, org_w:org_w + g.out_w] = dz.transpose(0, 3, 1, 2)
        pt = np.zeros((len(live) + 1, 12), np.int64)
        wks = []
        for i, (t, tp) in enumerate(zip(live, taps)):
            wks.append(_sub_filter(w, tp).transpose(3, 0, 1, 2).reshape(-1))   # (C, TH, TW, F)
            pt[i + 1, _PT_ITEM0] = pt[i, _PT_ITEM0] + g.batch * -(-t.out_h // NARROW_ROWS)
            pt[i + 1, _PT_W0] = pt[i, _PT_W0] + wks[-1].size
            pt[i, _PT_R0:] = (org_h - t.pad_top, org_w - t.pad_left, t.taps_h, t.taps_w, t.dil_h,
                              t.dil_w, t.out_h, t.out_w, t.phase_h, t.phase_w)
        _narrow_kernel(buf.reshape(-1), np.concatenate(wks), dx.reshape(-1), pt, g.batch, f, hb,
                       wb, c_in, g.in_h, g.in_w, g.stride_h, g.stride_w)
        return dx
    if (org_h, org_w, hb, wb) == (0, 0, g.out_h, g.out_w):
        buf = dz                                       # no phase reads outside dz
    else:
        buf = empty_host((g.batch, hb, wb, f))
        _fill_padded(dz, buf, org_h, org_w)
    bflat = buf.reshape(-1)
    if c_in <= LANES and (g.stride_h > 1 or g.stride_w > 1):   # every phase, one launch
        pt = np.zeros((len(live) + 1, 12), np.int64)
        wk = np.zeros(sum(t.taps_h * t.taps_w for t in live) * f * LANES, np.float32)
        for i, (t, tp) in enumerate(zip(live, taps)):
            size = t.taps_h * t.taps_w * f * LANES
            wk[pt[i, _PT_W0]:pt[i, _PT_W0] + size].reshape(-1, LANES)[:, :c_in] = \
                _sub_filter(w, tp).reshape(-1, c_in)
            pt[i + 1, _PT_ITEM0] = pt[i, _PT_ITEM0] + g.batch * t.out_h
            pt[i + 1, _PT_W0] = pt[i, _PT_W0] + size
            pt[i, _PT_R0:] = (org_h - t.pad_top, org_w - t.pad_left, t.taps_h, t.taps_w, t.dil_h,
                              t.dil_w, t.out_h, t.out_w, t.phase_h, t.phase_w)
        _wide16_kernel(bflat, wk, dx.reshape(-1), pt, g.batch, max(t.out_h for t in live), f,
                       hb, wb, c_in, g.in_h, g.in_w, g.stride_h, g.stride_w)
        return dx
    if g.stride_h == 1 and g.stride_w == 1:           # one phase: dx itself
        t = live[0]
        _phase_forward(bflat[((org_h - t.pad_top) * wb + org_w - t.pad_left) * f:],
                       _sub_filter(w, taps[0]), dx.reshape(-1), g.batch, hb, wb, f, t, c_in)
        return dx
    meta = np.zeros((len(live) + 1, 6), np.int64)
    for i, t in enumerate(live):
        meta[i + 1, 0] = meta[i, 0] + g.batch * t.out_h
        meta[i + 1, 1] = meta[i, 1] + g.batch * t.out_h * t.out_w * c_in
        meta[i, 2:] = (t.out_h, t.out_w, t.phase_h, t.phase_w)
    yf = np.empty(meta[-1, 1], np.float32)             # every phase's (N, qh, qw, C) block
    for i, (t, tp) in enumerate(zip(live, taps)):
        xf = bflat[((org_h - t.pad_top) * wb + org_w - t.pad_left) * f:]
        _phase_forward(xf, _sub_filter(w, tp), yf[meta[i, 1]:meta[i + 1, 1]], g.batch, hb, wb,
                       f, t, c_in)
    _scatter_phases(yf, dx, meta, g.stride_h, g.stride_w)
    return dx


def _phase_forward(xf, wf, yf, n_img, hb, wb, f, t, c_in):
    """yf (flat (N, q, p, C)) = the stride-1 phase convolution of the buffer view xf with wf,
    on the forward's inner kernels (linear, no bias)."""
    args = (n_img, hb, wb, f, t.taps_h, t.taps_w, c_in)
    tail = (t.out_h, t.out_w, 1, 1, t.dil_h, t.dil_w, 0)
    if c_in <= SMALL_MAX_C:
        ldw = small._panel_width(c_in)
        wm = np.zeros((t.taps_h * t.taps_w * f, ldw), np.float32)
        wm[:, :c_in] = wf.reshape(-1, c_in)
        bias = np.zeros(ldw, np.float32)
        if ldw == small.PANEL16:
            small._k16_kernel(xf, wm.reshape(-1), bias, yf, *args, *tail)
        else:
            small._k32_kernel(xf, wm.reshape(-1), bias, yf, *args, ldw, *tail)
        return
    wm, ldw = weight_matrix(np.ascontiguousarray(wf))
    _gemm_kernel(xf, wm.reshape(-1), np.zeros(ldw, np.float32), yf, *args, ldw, *tail)
