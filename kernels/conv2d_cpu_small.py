"""conv2d forward on the CPU with Numba for few filters and narrow outputs: variant
``cpu_v3_smalltile``, an implicit GEMM on an 8-pixel register tile.

What it computes (NHWC activations, HWIO weights, geometry ``g`` from :mod:`dlconv.shapes`;
nothing here re-derives a pad or a size)::

    y[n, oh, ow, k] = act( b[k] + sum_{kh, kw, c} x[n, ih, iw, c] * w[kh, kw, c, k] )
    ih = oh * stride_h - pad_top  + kh * dil_h
    iw = ow * stride_w - pad_left + kw * dil_w

Why another tile: ``cpu_v2_regblock`` (:mod:`.conv2d_cpu`) holds 6 pixels x 64 filters, or
12 pixels x 32 filters when K <= 32.  On the physics ResNet's layers (16 filters; 32 filters
on 8-pixel-wide outputs) half of those FMAs land on zero-padded filters, or every pixel of a
row falls in its one-pixel ragged loop.  Here the tile is SMALL_MR = 8 pixels of one output
row x one panel of filters: 16 filters (one f32x16 per pixel) when K <= 16, else panels of
32 (two per pixel).

What one ``prange`` iteration owns: output row (n, oh) and one filter panel, i.e.
``y[n, oh, :, panel]``.  Inside it, each block of SMALL_MR consecutive pixels is reduced over
every (kh, kw, c) in registers (8 or 16 accumulators; per input channel 1 or 2 weight vector
loads, 8 broadcasts of x at ``x0 + p * stride_w * C + c`` and 8 or 16 FMAs), then biased,
activated and stored.  No partial sum leaves the registers, so a block may be recomputed.

Edges: the input is zero-padded once (:func:`.conv2d_cpu.pad_input`, only when a pad is
> 0), so the taps need no bounds checks.  Ragged right edge: the last block starts at
``out_w - SMALL_MR`` and overlaps the one before; its overlapping pixels are recomputed with
the same FMAs in the same order and stored again with the same values.  Rows narrower than
SMALL_MR go pixel by pixel.  Ragged filter panel: weights are copied once into a (KH*KW*C,
ldw) matrix with the filters zero-padded to ldw (16, or a multiple of 32); only the first K
filters are stored (vector epilogue when the panel is full and the activation linear or
relu, else a scalar one).  Results do not depend on the thread count.

Launch geometry: ``prange`` over N*OH*panels, split by Numba's threading layer over all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlconv import variants as _variants
from dlconv.arrays import empty_host

from .conv2d_cpu import pad_input
from .cpu_common import (FASTMATH, LANES, activate, stack_micro_tile, vbias_act, vbroadcast,
                         vfma, vload, vstore, vzero)

__all__ = ["VARIANT", "SMALL_MR", "launch", "forward"]

#: This kernel's name: its entry of the one Numba CPU table (:data:`dlconv.variants.NUMBA_CPU`).
VARIANT, = _variants.forward_names(_variants.NUMBA_CPU, "conv2d_cpu_small")

#: Pixels per register tile: 8 independent accumulators per filter vector cover the FMA
#: latency (4 cycles) times the FMA issue rate (2 per cycle on AVX-512 cores), and 8 divides
#: the ResNet's output widths (16, 8) and the issue-13 shapes' (32), so no block overlaps.
SMALL_MR = 8
#: Filters of the one-vector panel (K <= 16): one f32x16 per pixel, 8 accumulators.
PANEL16 = LANES
#: Filters of the two-vector panels (K > 16): 16 accumulators + 2 weight vectors + 1
#: broadcast stay well inside the 32 zmm registers.
PANEL32 = 2 * LANES


# ----------------------------------------------------------------------------- kernels
@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _k16_kernel(xf, wm, b, yf, n_img, hp, wpad, c_in, k_h, k_w, k_out, out_h, out_w,
                s_h, s_w, d_h, d_w, act):
    """K <= 16 filters.  xf: padded input, flat (N, HP, WP, C); wm: flat (KH*KW*C, 16),
    filters zero-padded to 16; b: (16,) bias, zero-padded.  Item (n, oh) writes y[n, oh]."""
    mr = SMALL_MR
    nr = PANEL16
    n_blocks = -(-out_w // mr) if out_w >= mr else 0
    for row in prange(n_img * out_h):
        n = row // out_h
        oh = row % out_h
        acc = stack_micro_tile()                       # acc[p]: pixel p, 16 filters
        tile = np.empty(mr * nr, np.float32)           # the scalar epilogue's copy of acc
        y_row = (n * out_h + oh) * out_w * k_out
        b_0 = vload(b, 0)
        for blk in range(n_blocks):
            ow0 = min(blk * mr, out_w - mr)            # the last block overlaps: no ragged tail
            for p in range(mr):
                acc[p] = vzero()
            for kh in range(k_h):
                ih = oh * s_h + kh * d_h               # padded coordinates: always inside
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow0 * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * nr
                    for c in range(c_in):
                        w_0 = vload(wm, w0 + c * nr)   # B-row w[kh, kw, c, 0:16]
                        for p in range(mr):
                            acc[p] = vfma(vbroadcast(xf, x0 + p * s_w * c_in + c), w_0, acc[p])
            if k_out == nr and act <= 1:               # full panel, linear/relu: vector epilogue
                for p in range(mr):
                    vstore(yf, y_row + (ow0 + p) * k_out, vbias_act(acc[p], b_0, act))
                continue
            for p in range(mr):
                vstore(tile, p * nr, acc[p])
            for p in range(mr):
                for j in range(k_out):
                    yf[y_row + (ow0 + p) * k_out + j] = activate(tile[p * nr + j] + b[j], act)
        if n_blocks > 0:
            continue
        for ow in range(out_w):                        # a row narrower than the tile
            a_0 = vzero()
            for kh in range(k_h):
                ih = oh * s_h + kh * d_h
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * nr
                    for c in range(c_in):
                        a_0 = vfma(vbroadcast(xf, x0 + c), vload(wm, w0 + c * nr), a_0)
            vstore(tile, 0, a_0)
            for j in range(k_out):
                yf[y_row + ow * k_out + j] = activate(tile[j] + b[j], act)


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _k32_kernel(xf, wm, b, yf, n_img, hp, wpad, c_in, k_h, k_w, k_out, ldw, out_h, out_w,
                s_h, s_w, d_h, d_w, act):
    """K > 16 filters, in panels of 32.  wm: flat (KH*KW*C, ldw), ldw a multiple of 32,
    filters zero-padded; b: (ldw,).  Item (n, oh, kb) writes y[n, oh, :, kb*32:(kb+1)*32]."""
    mr = SMALL_MR
    nr = PANEL32
    n_blocks = -(-out_w // mr) if out_w >= mr else 0
    k_panels = ldw // nr
    for item in prange(n_img * out_h * k_panels):
        kb = item % k_panels
        row = item // k_panels
        n = row // out_h
        oh = row % out_h
        acc = stack_micro_tile()                       # acc[p*2 + v]: pixel p, filters v*16..
        tile = np.empty(mr * nr, np.float32)
        y_row = (n * out_h + oh) * out_w * k_out
        k0 = kb * nr
        kn = min(nr, k_out - k0)                       # filters of this panel that exist
        b_0 = vload(b, k0)
        b_1 = vload(b, k0 + LANES)
        for blk in range(n_blocks):
            ow0 = min(blk * mr, out_w - mr)
            for i in range(mr * 2):
                acc[i] = vzero()
            for kh in range(k_h):
                ih = oh * s_h + kh * d_h
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow0 * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * ldw + k0
                    for c in range(c_in):
                        wo = w0 + c * ldw              # B-row w[kh, kw, c, k0:k0+32]
                        w_0 = vload(wm, wo)
                        w_1 = vload(wm, wo + LANES)
                        for p in range(mr):
                            xv = vbroadcast(xf, x0 + p * s_w * c_in + c)
                            acc[p * 2 + 0] = vfma(xv, w_0, acc[p * 2 + 0])
                            acc[p * 2 + 1] = vfma(xv, w_1, acc[p * 2 + 1])
            if kn == nr and act <= 1:
                for p in range(mr):
                    y0 = y_row + (ow0 + p) * k_out + k0
                    vstore(yf, y0, vbias_act(acc[p * 2 + 0], b_0, act))
                    vstore(yf, y0 + LANES, vbias_act(acc[p * 2 + 1], b_1, act))
                continue
            for i in range(mr * 2):
                vstore(tile, i * LANES, acc[i])
            for p in range(mr):
                for j in range(kn):
                    yf[y_row + (ow0 + p) * k_out + k0 + j] = activate(tile[p * nr + j] + b[k0 + j], act)
        if n_blocks > 0:
            continue
        for ow in range(out_w):                        # a row narrower than the tile
            a_0 = vzero()
            a_1 = vzero()
            for kh in range(k_h):
                ih = oh * s_h + kh * d_h
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * ldw + k0
                    for c in range(c_in):
                        xv = vbroadcast(xf, x0 + c)
                        a_0 = vfma(xv, vload(wm, w0 + c * ldw), a_0)
                        a_1 = vfma(xv, vload(wm, w0 + c * ldw + LANES), a_1)
            vstore(tile, 0, a_0)
            vstore(tile, LANES, a_1)
            for j in range(kn):
                yf[y_row + ow * k_out + k0 + j] = activate(tile[j] + b[k0 + j], act)


# ----------------------------------------------------------------------------- launcher
def _panel_width(k: int) -> int:
    """ldw: the filters rounded up to the panel layout (16, or a multiple of 32)."""
    return PANEL16 if k <= PANEL16 else -(-k // PANEL32) * PANEL32


def launch(x: np.ndarray, w: np.ndarray, b, g, act: int, out=None) -> np.ndarray:
    """``cpu_v3_smalltile`` forward: x NHWC, w HWIO, b (K,) or None, g a ConvGeometry,
    act an activation code; ``out`` (optional) a float32 C-contiguous array of g.y_shape."""
    xp = np.ascontiguousarray(pad_input(x, g), dtype=np.float32)
    y = empty_host(g.y_shape) if out is None else out
    k = g.filters
    ldw = _panel_width(k)
    wm = np.zeros((g.k_h * g.k_w * g.in_c, ldw), np.float32)
    wm[:, :k] = np.asarray(w, np.float32).reshape(-1, k)
    bp = np.zeros(ldw, np.float32)
    if b is not None:
        bp[:k] = np.asarray(b, np.float32).reshape(k)
    args = (g.batch, xp.shape[1], xp.shape[2], g.in_c, g.k_h, g.k_w, k)
    tail = (g.out_h, g.out_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w, act)
    if ldw == PANEL16:
        _k16_kernel(xp.reshape(-1), wm.reshape(-1), bp, y.reshape(-1), *args, *tail)
    else:
        _k32_kernel(xp.reshape(-1), wm.reshape(-1), bp, y.reshape(-1), *args, ldw, *tail)
    return y


def forward(x, w, b, g, act: int, variant: str = VARIANT) -> np.ndarray:
    """The backend's entry (same arguments as :func:`.conv2d_cpu.forward`)."""
    _variants.canonical(variant, [v for v in _variants.NUMBA_CPU if v.name == VARIANT])  # old name: warns
    if g.groups != 1:   # grouped / depthwise: the one grouped kernel every variant runs
        from . import conv2d_grouped_cpu
        return conv2d_grouped_cpu.forward(x, w, b, g, act)
    return launch(x, w, b, g, act)
