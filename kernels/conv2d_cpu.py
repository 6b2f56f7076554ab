"""conv2d on the CPU with Numba (``@njit(parallel=True)``): forward (two variants),
backward-data and backward-filter.  NHWC activations, HWIO weights, geometry ``g`` from
:mod:`dlconv.shapes` (nothing here re-derives a pad or an output size).

Index map (every kernel below; rows of the input outside ``[0, in_h)`` are zero padding)::

    y[n, oh, ow, k] = act( b[k] + sum_{kh, kw, c} x[n, ih, iw, c] * w[kh, kw, c, k] )
    ih = oh * stride_h - pad_top  + kh * dil_h
    iw = ow * stride_w - pad_left + kw * dil_w

NaN and ±Inf propagate as in TensorFlow: relu(NaN) is NaN (cpu_common.activate and
vbias_act select 0 only for z < 0).

Variants of the forward pass, fastest first:

``cpu_v2_regblock``  implicit GEMM with a register-blocked micro-kernel.  The (pixel, tap)x(tap,
    filter) product ``Y[M, K] = X_im2col[M, R] @ W[R, K]`` (M = N*OH*OW, R = KH*KW*C) is
    formed without materialising im2col: NHWC/HWIO let the kernel read both operands in
    place.  The A-row of pixel (n, oh, ow) at tap (kh, kw) is ``x[n, ih, iw:iw+C]`` and the
    B-row of (kh, kw, c) is ``w[kh, kw, c, :]``, both contiguous.  One ``prange`` iteration
    owns one output row (n, oh) and one panel of MICRO_NR filters (MNIST conv2: 128*24 =
    3072 items); the micro-kernel keeps MICRO_MR pixels x MICRO_NR filters as 6 x 4
    explicit f32x16 accumulators (24 zmm registers, see cpu_common) and, per input channel,
    loads 4 weight vectors and broadcasts one input value per pixel into 4 FMAs.  It streams
    over (kw, c) for one kh at a time, so the kh-slice of the weight panel (KW*C*NR floats,
    24 KiB for 3x3x32x64) stays in L1 while every pixel block of the row reuses it; the
    row's partial sums wait in a small (OW, NR) row buffer between kh slices.  Weights:
    read in place when K is a multiple of MICRO_NR and w is 64-byte aligned, else one
    aligned copy per call with the filters zero-padded to a multiple of MICRO_NR (row
    stride ``ldw``); every weight vector load then covers exactly one cache line.  Padding:
    the input is copied once into a zero-padded buffer (only when some pad > 0), so the
    micro-kernel has no bounds checks.  Ragged edges: only the first K filters are stored
    (full panels with linear/relu: bias + activation on vectors; otherwise the scalar
    epilogue); the last OW % MICRO_MR pixels of a row go through a one-pixel (4-vector) loop,
    and a pointwise convolution (1x1, stride 1, unpadded) runs with its pixels regrouped into
    longer rows so that fewer of them do (:func:`_pointwise_rows`, bit-identical).
    K <= 32 filters (MNIST conv1; backward-data into 32 channels) take the narrow kernel
    instead: the same 24 accumulators as NARROW_MR = 12 pixels x 32 filters (2 weight
    vectors, 12 broadcasts, 24 FMAs per channel), so no FMA is spent on a half-empty panel.
``cpu_v1_direct``  one ``prange`` iteration per output row (n, oh), one output pixel at a
    time, a K-vector accumulator, taps outside the input skipped by one explicit guard.

Grouped convolution (``g.groups > 1``, depthwise included) runs the kernels of
:mod:`conv2d_grouped_cpu` instead, whatever the variant.

Backward-data: dx[n, ih, iw, c] sums w[kh, kw, c, k] * dy[n, oh, ow, k] over the taps
whose ``t = ih + pad_top - kh*dil_h`` is divisible by stride_h with ``oh = t / stride_h`` in
``[0, out_h)`` (same for w).  Stride 1 with pads no larger than the dilated kernel and more
than 8 dx channels runs a forward kernel on a "full" correlation of dy with the flipped,
transposed weights: cpu_v3_smalltile's 8-pixel tile (:mod:`.conv2d_cpu_small`) for up to 16
dx channels, and for up to 32 when the narrow tile's one-pixel ragged edge would cost more
(:func:`_small_tile_beats_narrow`), else cpu_v2_regblock's micro-kernel; every other
geometry runs the sub-pixel decomposition of :mod:`.conv2d_subpixel_cpu` (one stride-1
convolution per phase, only the taps that hit).  The gather kernel
(:func:`backward_data_gather`: each dx row owned by one iteration, every tap tested for the
exact division) is kept as the naive variant for tests and benchmarks.

Backward-filter: the same GEMM transposed, dw[(kh, kw, c), k] = sum over pixels of
X_im2col[m, (kh, kw, c)] * dy[m, k].  Four routes, chosen by :func:`_bwf_tile_shape` and
:func:`_bwf_segment_shape`:

- channel-blocked tile (default): one iteration owns (chunk of output rows (n, oh), tap
  (kh, kw), a block of RB consecutive input channels, a panel of NV*16 filters) and reduces
  the chunk's pixels in order on an RB x NV f32x16 register tile (BWF_TILES: 6 x 4, 8 x 2 or
  16 x 1 by K), the RB broadcasts of a pixel at one address + 0..RB-1.  Split-K: the output
  rows are cut into fixed chunks of about BWF_CHUNK_PIXELS pixels (at most BWF_CHUNKS),
  their partials added in chunk order.  Padding: x is read in place; a tap skips the rows
  whose ih is padding and runs over the columns [ow_lo, ow_hi) whose iw is inside x
  (:func:`_bwf_tap_table`), so the padded pixels' zero products are never formed.  Ragged
  edges: channels padded to a multiple of RB (the padding rows read the next floats of x,
  with slack at the end, and are dropped; taken only when they are at most
  BWF_MAX_PAD_FRACTION of the rows), filters to NV*16 (dy copied with zero columns).  db
  comes from the same launch: the tap-0, block-0 items also sum their chunk's dy rows.
- row-segment tile (:func:`backward_filter_segments`: few input channels, e.g. a 1-channel
  stem, where the channel blocks would be mostly padding; dil_w == 1): the same kernel with
  one "tap" per kh whose rows are the KW*C contiguous floats j = kw*C + c of a zero-padded
  copy of x (cheap at few channels), padded to a multiple of RB (BWF_SEGMENT_ROWS: also 8
  and 4 rows) within BWF_MAX_PAD_FRACTION.
- K a multiple of MICRO_NR with KH*KW*C a multiple of MICRO_MR (MNIST conv2: 64 filters, 288
  rows): the forward's 6 x 64 tile over rows j = (kh, kw, c) at per-row x offsets; BWF_CHUNKS
  fixed pixel chunks, one iteration per chunk sweeping every 6-row block (dy rows in L2).
- otherwise (neither tile applies: few channels at dil_w > 1, or segments mostly padding):
  one iteration owns dw[kh, kw, c0:c0+CB, :] and reduces over every (n, oh, ow) in order.
db is summed over fixed chunks of pixels, then the chunks in order.  Results never depend
on the number of threads.

Integers are int64 (Numba's int), so flat indices cannot overflow.  Launch geometry: the
``prange`` loops are split by Numba's threading layer over all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlconv import variants as _variants
from dlconv.arrays import HOST_ALIGN, empty_host  # 64-byte aligned: TensorFlow adopts it without a copy

from .cpu_common import (FASTMATH, LANES, MICRO_MR, MICRO_NR, MICRO_NV, activate,
                         stack_micro_tile, vbias_act, vbroadcast, vfma, vload, vstore, vzero)

__all__ = ["VARIANTS", "forward", "launch_gemm", "launch_direct", "backward_data",
           "backward_filter", "weight_matrix", "pad_input"]

#: Forward variants of this module: its entries of the one Numba CPU table
#: (:data:`dlconv.variants.NUMBA_CPU`; names, passes, rules), highest number first.
VARIANTS = _variants.forward_by_number(_variants.NUMBA_CPU, "conv2d_cpu")

#: Input channels per work item of the backward-filter kernel for filter counts that are not
#: a multiple of 64: the (CB, K) accumulator stays in L1 (16 x 64 floats = 4 KiB).
BWF_CHANNEL_BLOCK = 16
#: Fixed pixel chunks of the backward-filter reduction (one partial dw each, added in chunk
#: order): 64 chunks of the MNIST conv2 batch are 1,152 pixels, whose dy rows (295 KB) stay in
#: L2 while every row block of dw sweeps them.
BWF_CHUNKS = 64
#: Fixed number of pixel chunks for db: partial sums are added in chunk order, so the
#: result does not depend on the thread count.
DB_CHUNKS = 16


# ----------------------------------------------------------------------------- helpers
def pad_input(x: np.ndarray, g) -> np.ndarray:
    """x, or a copy zero-padded by the geometry's four pads (only when one is > 0)."""
    if g.pad_top == 0 and g.pad_bottom == 0 and g.pad_left == 0 and g.pad_right == 0:
        return x
    xp = np.zeros((g.batch, g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right,
                   g.in_c), np.float32)
    xp[:, g.pad_top:g.pad_top + g.in_h, g.pad_left:g.pad_left + g.in_w, :] = x
    return xp


def weight_matrix(w: np.ndarray):
    """HWIO weights as a 64-byte aligned ``(KH*KW*C, ldw)`` float32 matrix and ``ldw``, the
    filter count rounded up to MICRO_NR (padding columns are zero).  w itself when it
    already is one (K % MICRO_NR == 0, C-contiguous, aligned), else one copy."""
    k_h, k_w, c, k = w.shape
    r = k_h * k_w * c
    ldw = -(-k // MICRO_NR) * MICRO_NR
    if (ldw == k and w.dtype == np.float32 and w.flags.c_contiguous
            and w.ctypes.data % HOST_ALIGN == 0):
        return w.reshape(r, k), ldw
    wm = empty_host((r, ldw))
    wm[:, :k] = w.reshape(r, k)
    wm[:, k:] = 0.0
    return wm, ldw


def _bias(b, k):
    """b as the flat C-contiguous float32 array the kernels index (zeros for no bias)."""
    return np.zeros(k, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)


# ----------------------------------------------------------------------------- cpu_v2_regblock
@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _gemm_kernel(xf, wm, b, yf, n_img, hp, wpad, c_in, k_h, k_w, k_out, ldw, out_h, out_w,
                 s_h, s_w, d_h, d_w, act):
    """xf: padded input, flat (N, HP, WP, C); wm: weight matrix, flat (KH*KW*C, ldw) with
    ldw a multiple of MICRO_NR.  Item (n, oh, kb) writes y[n, oh, :, kb*NR:(kb+1)*NR]."""
    mr = MICRO_MR
    nr = MICRO_NR
    nv = MICRO_NV
    n_full = out_w // mr
    k_blocks = ldw // nr
    for item in prange(n_img * out_h * k_blocks):
        kb = item % k_blocks
        row = item // k_blocks
        n = row // out_h
        oh = row % out_h
        acc = stack_micro_tile()                       # acc[p*nv + v]: pixel p, filters v*16..
        rowbuf = np.empty(out_w * nr, np.float32)      # the row's (OW, NR) partial sums
        for kh in range(k_h):
            ih = oh * s_h + kh * d_h                   # padded coordinates: always inside
            for blk in range(n_full):
                ow0 = blk * mr
                if kh == 0:                            # first slice starts the sums
                    for i in range(mr * nv):
                        acc[i] = vzero()
                else:
                    for i in range(mr * nv):
                        acc[i] = vload(rowbuf, ow0 * nr + i * LANES)
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow0 * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * ldw + kb * nr
                    for c in range(c_in):
                        wo = w0 + c * ldw              # B-row w[kh, kw, c, kb*NR:(kb+1)*NR]
                        w_0 = vload(wm, wo)
                        w_1 = vload(wm, wo + LANES)
                        w_2 = vload(wm, wo + 2 * LANES)
                        w_3 = vload(wm, wo + 3 * LANES)
                        for p in range(mr):
                            xv = vbroadcast(xf, x0 + p * s_w * c_in + c)
                            acc[p * nv + 0] = vfma(xv, w_0, acc[p * nv + 0])
                            acc[p * nv + 1] = vfma(xv, w_1, acc[p * nv + 1])
                            acc[p * nv + 2] = vfma(xv, w_2, acc[p * nv + 2])
                            acc[p * nv + 3] = vfma(xv, w_3, acc[p * nv + 3])
                for i in range(mr * nv):
                    vstore(rowbuf, ow0 * nr + i * LANES, acc[i])
            for ow in range(n_full * mr, out_w):       # ragged right edge, one pixel at a time
                r0 = ow * nr
                if kh == 0:
                    a_0 = vzero()
                    a_1 = vzero()
                    a_2 = vzero()
                    a_3 = vzero()
                else:
                    a_0 = vload(rowbuf, r0)
                    a_1 = vload(rowbuf, r0 + LANES)
                    a_2 = vload(rowbuf, r0 + 2 * LANES)
                    a_3 = vload(rowbuf, r0 + 3 * LANES)
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * ldw + kb * nr
                    for c in range(c_in):
                        wo = w0 + c * ldw
                        xv = vbroadcast(xf, x0 + c)
                        a_0 = vfma(xv, vload(wm, wo), a_0)
                        a_1 = vfma(xv, vload(wm, wo + LANES), a_1)
                        a_2 = vfma(xv, vload(wm, wo + 2 * LANES), a_2)
                        a_3 = vfma(xv, vload(wm, wo + 3 * LANES), a_3)
                vstore(rowbuf, r0, a_0)
                vstore(rowbuf, r0 + LANES, a_1)
                vstore(rowbuf, r0 + 2 * LANES, a_2)
                vstore(rowbuf, r0 + 3 * LANES, a_3)
        kn = min(nr, k_out - kb * nr)                  # ragged filter panel: store the first kn
        if kn == nr and act <= 1:                      # full panel, linear/relu: vector epilogue
            b_0 = vload(b, kb * nr)
            b_1 = vload(b, kb * nr + LANES)
            b_2 = vload(b, kb * nr + 2 * LANES)
            b_3 = vload(b, kb * nr + 3 * LANES)
            for ow in range(out_w):
                y0 = ((n * out_h + oh) * out_w + ow) * k_out + kb * nr
                r0 = ow * nr
                vstore(yf, y0, vbias_act(vload(rowbuf, r0), b_0, act))
                vstore(yf, y0 + LANES, vbias_act(vload(rowbuf, r0 + LANES), b_1, act))
                vstore(yf, y0 + 2 * LANES, vbias_act(vload(rowbuf, r0 + 2 * LANES), b_2, act))
                vstore(yf, y0 + 3 * LANES, vbias_act(vload(rowbuf, r0 + 3 * LANES), b_3, act))
            continue
        for ow in range(out_w):
            y0 = ((n * out_h + oh) * out_w + ow) * k_out + kb * nr
            for j in range(kn):
                yf[y0 + j] = activate(rowbuf[ow * nr + j] + b[kb * nr + j], act)


#: Pixels per register tile of the narrow kernel (K <= 32 filters): the same 24 accumulators
#: as 12 pixels x 32 filters (2 f32x16 each) instead of 6 x 64, so no FMA is spent on padding.
NARROW_MR = 12
NARROW_NR = 2 * LANES


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _gemm_narrow_kernel(xf, wm, b, yf, n_img, hp, wpad, c_in, k_h, k_w, k_out, out_h, out_w,
                        s_h, s_w, d_h, d_w, act):
    """cpu_v2_regblock for K <= 32 filters (MNIST conv1, and backward-data into 32 channels).

    xf: padded input, flat (N, HP, WP, C); wm: weight matrix, flat (KH*KW*C, 32), filters
    zero-padded to 32.  Item (n, oh) writes y[n, oh, :, :]; per input channel of a tap:
    2 weight vectors, 12 pixel broadcasts, 24 FMAs.  Otherwise as :func:`_gemm_kernel`.
    """
    mr = NARROW_MR
    nr = NARROW_NR
    n_full = out_w // mr
    for row in prange(n_img * out_h):
        n = row // out_h
        oh = row % out_h
        acc = stack_micro_tile()                       # acc[p*2 + v]: pixel p, filters v*16..
        rowbuf = np.empty(out_w * nr, np.float32)
        for kh in range(k_h):
            ih = oh * s_h + kh * d_h
            for blk in range(n_full):
                ow0 = blk * mr
                if kh == 0:
                    for i in range(mr * 2):
                        acc[i] = vzero()
                else:
                    for i in range(mr * 2):
                        acc[i] = vload(rowbuf, ow0 * nr + i * LANES)
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow0 * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * nr
                    for c in range(c_in):
                        w_0 = vload(wm, w0 + c * nr)
                        w_1 = vload(wm, w0 + c * nr + LANES)
                        for p in range(mr):
                            xv = vbroadcast(xf, x0 + p * s_w * c_in + c)
                            acc[p * 2 + 0] = vfma(xv, w_0, acc[p * 2 + 0])
                            acc[p * 2 + 1] = vfma(xv, w_1, acc[p * 2 + 1])
                for i in range(mr * 2):
                    vstore(rowbuf, ow0 * nr + i * LANES, acc[i])
            for ow in range(n_full * mr, out_w):       # ragged right edge, one pixel at a time
                r0 = ow * nr
                if kh == 0:
                    a_0 = vzero()
                    a_1 = vzero()
                else:
                    a_0 = vload(rowbuf, r0)
                    a_1 = vload(rowbuf, r0 + LANES)
                for kw in range(k_w):
                    x0 = ((n * hp + ih) * wpad + ow * s_w + kw * d_w) * c_in
                    w0 = (kh * k_w + kw) * c_in * nr
                    for c in range(c_in):
                        xv = vbroadcast(xf, x0 + c)
                        a_0 = vfma(xv, vload(wm, w0 + c * nr), a_0)
                        a_1 = vfma(xv, vload(wm, w0 + c * nr + LANES), a_1)
                vstore(rowbuf, r0, a_0)
                vstore(rowbuf, r0 + LANES, a_1)
        y_row = (n * out_h + oh) * out_w * k_out
        if k_out == nr and act <= 1:                   # 32 filters, linear/relu: vector epilogue
            b_0 = vload(b, 0)
            b_1 = vload(b, LANES)
            for ow in range(out_w):
                vstore(yf, y_row + ow * nr, vbias_act(vload(rowbuf, ow * nr), b_0, act))
                vstore(yf, y_row + ow * nr + LANES, vbias_act(vload(rowbuf, ow * nr + LANES), b_1, act))
            continue
        for ow in range(out_w):
            for j in range(k_out):
                yf[y_row + ow * k_out + j] = activate(rowbuf[ow * nr + j] + b[j], act)


#: Longest row a pointwise convolution's pixels are regrouped into (:func:`_pointwise_rows`):
#: a multiple of MICRO_MR and NARROW_MR, and its (192, 64) row buffer (48 KiB) about L1.
POINTWISE_ROW_PIXELS = 192
#: Fewest regrouped rows: items enough for the prange split over the cores to stay even.
POINTWISE_MIN_ROWS = 64


def _pointwise_rows(g):
    """For a pointwise convolution (1x1, stride 1, no padding: every output pixel reads only
    its own input pixel) the same convolution on longer rows, or None: the N*H*W pixels as
    (N*H*W / W', 1, W') with W' the divisor of N*H*W up to POINTWISE_ROW_PIXELS (leaving at
    least POINTWISE_MIN_ROWS rows) whose row leaves the smallest fraction of pixels to the
    register tile's one-pixel ragged loop, when that is smaller than for the rows as they are
    (16-pixel rows: 4 of 16 ragged at 6 pixels per block).  Each pixel's sum is formed in the
    same order either way: the result is bit-identical."""
    from dlconv.shapes import conv_geometry
    if (g.k_h, g.k_w, g.stride_h, g.stride_w, g.groups) != (1, 1, 1, 1, 1) or max(
            g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) > 0:
        return None
    mr = NARROW_MR if g.filters <= NARROW_NR else MICRO_MR
    m = g.batch * g.out_h * g.out_w

    def ragged(w):
        return (w % mr) / w

    best = min((d for d in range(1, POINTWISE_ROW_PIXELS + 1)
                if m % d == 0 and m // d >= POINTWISE_MIN_ROWS), key=lambda d: (ragged(d), -d),
               default=None)
    if best is None or ragged(best) >= ragged(g.out_w):
        return None
    return conv_geometry((m // best, 1, best, g.in_c), (1, 1, g.in_c, g.filters), 1, "valid", 1)


def launch_gemm(x: np.ndarray, w: np.ndarray, b, g, act: int, out=None) -> np.ndarray:
    """``cpu_v2_regblock`` forward: x NHWC, w HWIO, b (K,) or None, g a ConvGeometry, act a code.

    ``out`` (optional) is a float32 C-contiguous array of shape g.y_shape to write into.
    A pointwise convolution runs on the longer rows of :func:`_pointwise_rows`.
    """
    rows = _pointwise_rows(g)
    if rows is not None and x.flags.c_contiguous and (out is None or out.flags.c_contiguous):
        y = launch_gemm(x.reshape(rows.x_shape), w, b, rows, act,
                        None if out is None else out.reshape(rows.y_shape))
        return y.reshape(g.y_shape)
    xp = np.ascontiguousarray(pad_input(x, g), dtype=np.float32)
    y = empty_host(g.y_shape) if out is None else out
    if g.filters <= NARROW_NR:
        wm = np.zeros((g.k_h * g.k_w * g.in_c, NARROW_NR), np.float32)
        wm[:, :g.filters] = w.reshape(-1, g.filters)
        _gemm_narrow_kernel(xp.reshape(-1), wm.reshape(-1), _bias(b, g.filters), y.reshape(-1),
                            g.batch, xp.shape[1], xp.shape[2], g.in_c, g.k_h, g.k_w, g.filters,
                            g.out_h, g.out_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w, act)
        return y
    wm, ldw = weight_matrix(w)
    _gemm_kernel(xp.reshape(-1), wm.reshape(-1), _bias(b, g.filters), y.reshape(-1),
                 g.batch, xp.shape[1], xp.shape[2], g.in_c, g.k_h, g.k_w, g.filters, ldw,
                 g.out_h, g.out_w, g.stride_h, g.stride_w, g.dil_h, g.dil_w, act)
    return y


# ----------------------------------------------------------------------------- cpu_v1_direct
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _direct_kernel(x, w, b, y, s_h, s_w, d_h, d_w, p_t, p_l, act):
    n_img, in_h, in_w, c_in = x.shape
    k_h, k_w, _, k_out = w.shape
    out_h, out_w = y.shape[1], y.shape[2]
    for row in prange(n_img * out_h):
        n = row // out_h
        oh = row % out_h
        acc = np.empty(k_out, np.float32)
        for ow in range(out_w):
            acc[:] = b
            for kh in range(k_h):
                ih = oh * s_h - p_t + kh * d_h
                if ih < 0 or ih >= in_h:               # tap in the top/bottom padding
                    continue
                for kw in range(k_w):
                    iw = ow * s_w - p_l + kw * d_w
                    if iw < 0 or iw >= in_w:           # tap in the left/right padding
                        continue
                    for c in range(c_in):
                        xv = x[n, ih, iw, c]
                        for k in range(k_out):
                            acc[k] += xv * w[kh, kw, c, k]
            for k in range(k_out):
                y[n, oh, ow, k] = activate(acc[k], act)


def launch_direct(x: np.ndarray, w: np.ndarray, b, g, act: int, out=None) -> np.ndarray:
    """``cpu_v1_direct`` forward; same arguments as :func:`launch_gemm`."""
    y = empty_host(g.y_shape) if out is None else out
    _direct_kernel(x, w, _bias(b, g.filters), y, g.stride_h, g.stride_w, g.dil_h, g.dil_w,
                   g.pad_top, g.pad_left, act)
    return y


_LAUNCH = {"cpu_v2_regblock": launch_gemm, "cpu_v1_direct": launch_direct}
assert set(_LAUNCH) == set(VARIANTS), "kernels/conv2d_cpu.py launchers vs dlconv.variants.NUMBA_CPU"


def forward(x, w, b, g, act: int, variant: str = VARIANTS[0]) -> np.ndarray:
    """Dispatch to a forward variant by name (see :data:`VARIANTS`; an old name warns)."""
    variant = _variants.canonical(variant, [v for v in _variants.NUMBA_CPU if v.name in VARIANTS])
    launch = _LAUNCH[variant]
    if g.groups != 1:   # grouped / depthwise: one kernel for every variant (conv2d_grouped_cpu)
        from . import conv2d_grouped_cpu
        return conv2d_grouped_cpu.forward(x, w, b, g, act)
    return launch(x, w, b, g, act)


# ----------------------------------------------------------------------------- backward-data
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bwd_data_kernel(dy, wt, dx, s_h, s_w, d_h, d_w, p_t, p_l):
    """wt: weights transposed to (KH, KW, K, C) so the inner loop runs over contiguous c."""
    n_img, in_h, in_w, c_in = dx.shape
    k_h, k_w, k_out, _ = wt.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    for row in prange(n_img * in_h):
        n = row // in_h
        ih = row % in_h
        acc = np.empty(c_in, np.float32)
        for iw in range(in_w):
            acc[:] = 0.0
            for kh in range(k_h):
                th = ih + p_t - kh * d_h               # = oh * s_h when tap kh reads row ih
                if th < 0 or th % s_h != 0 or th // s_h >= out_h:
                    continue
                oh = th // s_h
                for kw in range(k_w):
                    tw = iw + p_l - kw * d_w
                    if tw < 0 or tw % s_w != 0 or tw // s_w >= out_w:
                        continue
                    ow = tw // s_w
                    for k in range(k_out):
                        dv = dy[n, oh, ow, k]
                        for c in range(c_in):
                            acc[c] += dv * wt[kh, kw, k, c]
            dx[n, ih, iw, :] = acc


#: Cost of one pixel of the narrow kernel's one-pixel ragged loop (2 FMA chains, latency-bound),
#: in pixels of its 12-pixel blocks: measured ~2 (stride-1 3x3 backward-data into 32 channels,
#: 26 and 30 pixels wide, 2-core Xeon).
NARROW_RAGGED_PIXEL_COST = 2


def _small_tile_beats_narrow(k: int, out_w: int) -> bool:
    """Whether cpu_v3_smalltile's 8-pixel tile (its last block overlapping the one before) does
    less work than the narrow 12 x 32 tile (its OW % 12 last pixels one at a time) on rows
    ``out_w`` wide with ``k`` <= 32 filters.  Up to 16 filters always: the narrow tile would
    spend half of its FMAs on zero filters.  Per whole-block pixel the two cost about the same
    (measured within 10%); a tie goes to the narrow tile (12 broadcasts per 2 weight loads)."""
    from .conv2d_cpu_small import PANEL16, PANEL32, SMALL_MR
    if k > PANEL32:
        return False
    if k <= PANEL16:
        return True
    narrow = (out_w // NARROW_MR) * NARROW_MR + NARROW_RAGGED_PIXEL_COST * (out_w % NARROW_MR)
    small = -(-out_w // SMALL_MR) * SMALL_MR if out_w >= SMALL_MR else NARROW_RAGGED_PIXEL_COST * out_w
    return small < narrow


def backward_data(dy: np.ndarray, w: np.ndarray, g) -> np.ndarray:
    """dL/dx (shape g.x_shape) from dL/dz (shape g.y_shape) and HWIO weights."""
    from dlconv.shapes import conv_geometry, transposed_geometry

    if g.groups != 1:
        from . import conv2d_grouped_cpu
        return conv2d_grouped_cpu.backward_data(dy, w, g)

    from . import conv2d_subpixel_cpu
    if g.stride_h == 1 and g.stride_w == 1 and g.in_c > conv2d_subpixel_cpu.NARROW_MAX_C:
        # dx = "full" correlation of dy with the flipped weights, channels swapped:
        # dx[n, ih, iw, c] = sum dy[n, ih + pad_top - kh*dil, ...] * w[kh, kw, c, k]; the pads
        # are dlconv.shapes.transposed_geometry's (the C++ kernels use the same record), and
        # this forward kernel takes them only when none is negative (a crop).
        t = transposed_geometry(g)
        if min(t.pad_top, t.pad_bottom, t.pad_left, t.pad_right) >= 0:
            wf = np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))
            gt = conv_geometry(dy.shape, wf.shape, 1, ((t.pad_top, t.pad_bottom), (t.pad_left, t.pad_right)),
                               (t.dil_h, t.dil_w))
            assert (gt.out_h, gt.out_w) == (g.in_h, g.in_w)
            if _small_tile_beats_narrow(g.in_c, g.in_w):
                from . import conv2d_cpu_small
                return conv2d_cpu_small.launch(dy, wf, None, gt, 0)
            return launch_gemm(dy, wf, None, gt, 0)
    # stride > 1, a crop at stride 1, or few dx channels (the pixel-vectorised narrow kernel:
    # MNIST conv1): the sub-pixel decomposition, one stride-1 convolution per phase
    return conv2d_subpixel_cpu.backward_data(dy, w, g)


def backward_data_gather(dy: np.ndarray, w: np.ndarray, g) -> np.ndarray:
    """The gather kernel alone (any stride), for tests and benchmarks."""
    wt = np.ascontiguousarray(w.transpose(0, 1, 3, 2))
    dx = empty_host(g.x_shape)
    _bwd_data_kernel(dy, wt, dx, g.stride_h, g.stride_w, g.dil_h, g.dil_w, g.pad_top, g.pad_left)
    return dx


# ----------------------------------------------------------------------------- backward-filter
@njit(inline="always")
def _next_pixel(n, oh, ow, out_h, out_w):
    """(n, oh, ow) of the output pixel after (n, oh, ow) in NHW order."""
    ow += 1
    if ow == out_w:
        ow = 0
        oh += 1
        if oh == out_h:
            oh = 0
            n += 1
    return n, oh, ow


@njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
def _bwd_filter_kernel(xf, dyf, part, offs, n_img, hp, wpad, c_in, out_h, out_w, s_h, s_w, ldf,
                       n_chunks):
    """Partial dw per pixel chunk on the 6 x 64 f32x16 register tile.

    dw is a GEMM: rows j = (kh, kw, c) (M = KH*KW*C), columns the ldf = K filters (a multiple
    of 64: whole panels), reduction over the output pixels m = (n, oh, ow):
    dw[j, k] = sum_m x[n, oh*s_h + kh*d_h, ow*s_w + kw*d_w, c] * dy[m, k] (x padded: every
    tap inside).  Item = one of n_chunks fixed, contiguous pixel ranges; inside it, for each
    block of MICRO_MR rows and 64-wide panel, 24 accumulators run over the chunk's pixels in
    order (per pixel 4 vector loads of dy, 6 broadcasts of x at the rows' offsets ``offs``, 24
    FMAs) and land in ``part[chunk]``; the chunk's dy rows stay in L2 across the row blocks.
    The caller adds the partials in chunk order: deterministic for any thread count.
    """
    mr = MICRO_MR
    nr = MICRO_NR
    nv = MICRO_NV
    m_rows = offs.size
    n_pix = n_img * out_h * out_w
    n_panels = ldf // nr
    n_full = m_rows // mr
    step = (n_pix + n_chunks - 1) // n_chunks
    for ch in prange(n_chunks):
        m0 = ch * step
        m1 = min(n_pix, m0 + step)
        pbase = ch * m_rows * ldf
        for rb in range(n_full + (1 if m_rows % mr else 0)):
            j0 = rb * mr
            rows = min(mr, m_rows - j0)
            for pn in range(n_panels):
                k0 = pn * nr
                n = m0 // (out_h * out_w)
                r = m0 - n * out_h * out_w
                oh0 = r // out_w
                ow0 = r - oh0 * out_w
                if rows == mr:
                    acc = stack_micro_tile()
                    for i in range(mr * nv):
                        acc[i] = vzero()
                    oh = oh0
                    ow = ow0
                    for m in range(m0, m1):
                        xb = ((n * hp + oh * s_h) * wpad + ow * s_w) * c_in
                        d0 = m * ldf + k0
                        z_0 = vload(dyf, d0)
                        z_1 = vload(dyf, d0 + LANES)
                        z_2 = vload(dyf, d0 + 2 * LANES)
                        z_3 = vload(dyf, d0 + 3 * LANES)
                        for q in range(mr):
                            xv = vbroadcast(xf, xb + offs[j0 + q])
                            acc[q * nv + 0] = vfma(xv, z_0, acc[q * nv + 0])
                            acc[q * nv + 1] = vfma(xv, z_1, acc[q * nv + 1])
                            acc[q * nv + 2] = vfma(xv, z_2, acc[q * nv + 2])
                            acc[q * nv + 3] = vfma(xv, z_3, acc[q * nv + 3])
                        n, oh, ow = _next_pixel(n, oh, ow, out_h, out_w)
                    for q in range(mr):
                        o = pbase + (j0 + q) * ldf + k0
                        vstore(part, o, acc[q * nv + 0])
                        vstore(part, o + LANES, acc[q * nv + 1])
                        vstore(part, o + 2 * LANES, acc[q * nv + 2])
                        vstore(part, o + 3 * LANES, acc[q * nv + 3])
                    continue
                for q in range(rows):          # the last, short row block: one row at a time
                    n = m0 // (out_h * out_w)
                    oh = oh0
                    ow = ow0
                    off = offs[j0 + q]
                    a_0 = vzero()
                    a_1 = vzero()
                    a_2 = vzero()
                    a_3 = vzero()
                    for m in range(m0, m1):
                        xv = vbroadcast(xf, ((n * hp + oh * s_h) * wpad + ow * s_w) * c_in + off)
                        d0 = m * ldf + k0
                        a_0 = vfma(xv, vload(dyf, d0), a_0)
                        a_1 = vfma(xv, vload(dyf, d0 + LANES), a_1)
                        a_2 = vfma(xv, vload(dyf, d0 + 2 * LANES), a_2)
                        a_3 = vfma(xv, vload(dyf, d0 + 3 * LANES), a_3)
                        n, oh, ow = _next_pixel(n, oh, ow, out_h, out_w)
                    o = pbase + (j0 + q) * ldf + k0
                    vstore(part, o, a_0)
                    vstore(part, o + LANES, a_1)
                    vstore(part, o + 2 * LANES, a_2)
                    vstore(part, o + 3 * LANES, a_3)


#: Register tiles of the channel-blocked backward-filter kernel, by f32x16 vectors of filters
#: per panel (NV): rows = consecutive input channels of one tap (RB), so that the RB x
#: broadcasts of a pixel share one address (no per-row offset registers).  NV=4 keeps the
#: forward's 6 x 64 tile (24 accumulators); NV=2 (K <= 32) and NV=1 (K <= 16) hold 16
#: accumulators (8 x 32, 16 x 16): 2 or 1 dy loads + 8 or 16 broadcasts per 16 FMAs.
BWF_TILES = {4: MICRO_MR, 2: 8, 1: 16}
#: Pixels per chunk of the channel-blocked kernel's split-K (whole output rows: 512 // OW
#: rows, at least one): 512 pixels of dy are 32-128 KiB (K = 16..64), L2-resident while every
#: (tap, channel block, panel) item of the chunk sweeps them; the chunk count (at most
#: BWF_CHUNKS) follows from the geometry alone.
BWF_CHUNK_PIXELS = 512
#: Channel padding the channel-blocked kernel accepts: rows computed for padding channels
#: are wasted, so it runs only when they are at most a quarter of the rows (else the kernels
#: above: the 6 x 64 offset-row tile or the (kh, kw, channel block) kernel).
BWF_MAX_PAD_FRACTION = 0.25


def _make_bwf_tile_kernel(rb: int, nv: int):
    """The channel-blocked backward-filter kernel for an rb x (nv*16) register tile (rb, nv
    are compile-time constants of the closure: the tile loops unroll into registers)."""

    @njit(parallel=True, fastmath=FASTMATH, boundscheck=False, cache=True)
    def kernel(xf, dyf, part, dbpart, taps, n_img, in_h, in_w, c_in, cpad, out_h, out_w,
               s_h, s_w, p_t, p_l, ldf, n_chunks):
        """part[ch, t*cpad + c, k] = sum over the output rows (n, oh) of chunk ch and the
        pixels ow of tap t = (kh, kw) that land inside x of
        x[n, oh*s_h - p_t + kh*d_h, ow*s_w - p_l + kw*d_w, c] * dy[n, oh, ow, k], and
        dbpart[ch, k] = sum over the chunk's pixels of dy[n, oh, ow, k] (by the tap-0,
        block-0 items).  taps[t] = (kh*d_h, kw*d_w, first ow, end ow): the tap's pixels inside
        x in width (height is tested per row).  Item = (chunk, tap, block of rb channels,
        panel of nv*16 filters)."""
        n_cb = cpad // rb
        n_taps = taps.shape[0]
        nr = nv * LANES
        n_panels = ldf // nr
        n_rows = n_img * out_h
        step = (n_rows + n_chunks - 1) // n_chunks
        per_chunk = n_taps * n_cb * n_panels
        ones = np.ones(LANES, np.float32)
        for item in prange(n_chunks * per_chunk):
            ch = item // per_chunk
            rest = item - ch * per_chunk
            t = rest // (n_cb * n_panels)
            cb = (rest // n_panels) % n_cb
            k0 = (rest % n_panels) * nr
            dh, dw, ow_lo, ow_hi = taps[t, 0], taps[t, 1], taps[t, 2], taps[t, 3]
            r0 = ch * step
            r1 = min(n_rows, r0 + step)
            acc = stack_micro_tile()                   # acc[q*nv + v]: channel q, filters v*16..
            zt = stack_micro_tile()                    # the pixel's nv dy vectors
            for i in range(rb * nv):
                acc[i] = vzero()
            for row in range(r0, r1):
                n = row // out_h
                ih = (row - n * out_h) * s_h - p_t + dh
                if ih < 0 or ih >= in_h:               # the tap's row is padding
                    continue
                xb = ((n * in_h + ih) * in_w + ow_lo * s_w - p_l + dw) * c_in + cb * rb
                d0 = (row * out_w + ow_lo) * ldf + k0
                for ow in range(ow_lo, ow_hi):
                    for v in range(nv):
                        zt[v] = vload(dyf, d0 + v * LANES)
                    for q in range(rb):
                        xv = vbroadcast(xf, xb + q)
                        for v in range(nv):
                            acc[q * nv + v] = vfma(xv, zt[v], acc[q * nv + v])
                    xb += s_w * c_in
                    d0 += ldf
            o = (ch * n_taps + t) * cpad + cb * rb
            for q in range(rb):
                for v in range(nv):
                    vstore(part, (o + q) * ldf + k0 + v * LANES, acc[q * nv + v])
            if t == 0 and cb == 0:                     # db: the chunk's dy rows, still in L2
                one = vload(ones, 0)                   # dy * 1 + sum: an exact add
                for v in range(nv):
                    zt[v] = vzero()
                for m in range(r0 * out_w, r1 * out_w):
                    for v in range(nv):
                        zt[v] = vfma(vload(dyf, m * ldf + k0 + v * LANES), one, zt[v])
                for v in range(nv):
                    vstore(dbpart, ch * ldf + k0 + v * LANES, zt[v])

    return kernel


#: Rows of the row-segment tiles (:func:`backward_filter_segments`), by NV; the one that pads
#: a segment least is used (a tie: the taller).  8 rows x 1 vector (K <= 16): 8 accumulators
#: still cover the FMA latency (4 cycles x 2 FMAs per cycle), and a stem's 7-float segment
#: (7x7 taps on 1 channel) pads to 8 rows instead of 16.  4 rows (8 or 4 accumulators, at
#: worst half the FMA rate) take the 3-float segments of a 3x3 stem (the MNIST conv1).
BWF_SEGMENT_ROWS = {4: (MICRO_MR,), 2: (8, 4), 1: (16, 8, 4)}
#: The compiled tile kernels, by (rb, nv): each one signature, cached on disk.
_BWF_TILE_KERNELS = {(rb, nv): _make_bwf_tile_kernel(rb, nv)
                     for nv, rbs in BWF_SEGMENT_ROWS.items() for rb in set(rbs) | {BWF_TILES[nv]}}


def _bwf_tile_shape(g, always: bool = False):
    """(nv, rb, cpad, ldf) of the channel-blocked backward-filter kernel for g, or None when
    its channel padding would exceed BWF_MAX_PAD_FRACTION of the rows, or when the 6 x 64
    offset-row kernel has no ragged block (K a multiple of 64, KH*KW*C of 6).  ``always``:
    the shape even then (tests run the kernel on every geometry)."""
    k = g.filters
    if not always and k % MICRO_NR == 0 and (g.k_h * g.k_w * g.in_c) % MICRO_MR == 0:
        return None                  # whole 6 x 64 tiles of the offset-row kernel (MNIST conv2)
    nv = 4 if k % MICRO_NR == 0 or k > 2 * LANES else (2 if k > LANES else 1)
    rb = BWF_TILES[nv]
    cpad = -(-g.in_c // rb) * rb
    if not always and cpad - g.in_c > BWF_MAX_PAD_FRACTION * cpad:
        return None
    ldf = -(-k // (nv * LANES)) * nv * LANES
    return nv, rb, cpad, ldf


def _bwf_tap_table(g) -> np.ndarray:
    """(KH*KW, 4) int64: per tap t = (kh, kw) of the channel-blocked kernel, kh*d_h, kw*d_w and
    the output columns [ow_lo, ow_hi) whose input column ow*s_w - p_l + kw*d_w lies in x."""
    kh, kw = np.meshgrid(np.arange(g.k_h), np.arange(g.k_w), indexing="ij")
    dh, dw = (kh * g.dil_h).reshape(-1), (kw * g.dil_w).reshape(-1)
    first = np.minimum(g.out_w, np.maximum(0, -(-(g.pad_left - dw) // g.stride_w)))
    end = np.minimum(g.out_w, (g.in_w - 1 + g.pad_left - dw) // g.stride_w + 1)
    return np.stack([dh, dw, first, np.maximum(first, end)], axis=1).astype(np.int64)


def backward_filter_tiled(x: np.ndarray, dy: np.ndarray, g, shape=None):
    """(dw with shape g.w_shape, db) on the channel-blocked register tile (split-K over fixed
    chunks of output rows, the partials added in chunk order: deterministic for any thread
    count).  ``shape`` as :func:`_bwf_tile_shape` returns it (computed when None; it must
    not be None).  x is read in place (no padded copy): each tap skips its padding rows and
    runs over its in-bounds columns only."""
    nv, rb, cpad, ldf = shape or _bwf_tile_shape(g)
    k, c = g.filters, g.in_c
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if cpad > c:                     # the last block reads cpad - c floats past a pixel: slack
        xs = np.empty(xf.size + cpad - c, np.float32)
        xs[:xf.size] = xf
        xs[xf.size:] = 0.0
        xf = xs
    dyf = _dy_panel(dy, k, ldf)
    n_rows = g.batch * g.out_h
    rows_per_chunk = max(1, BWF_CHUNK_PIXELS // g.out_w)
    n_chunks = max(1, min(BWF_CHUNKS, -(-n_rows // rows_per_chunk)))
    taps = _bwf_tap_table(g)
    rows = taps.shape[0] * cpad
    part = np.empty((n_chunks, rows, ldf), np.float32)
    dbpart = np.empty((n_chunks, ldf), np.float32)
    _BWF_TILE_KERNELS[rb, nv](xf, dyf.reshape(-1), part.reshape(-1), dbpart.reshape(-1), taps,
                          g.batch, g.in_h, g.in_w, c, cpad, g.out_h, g.out_w, g.stride_h,
                          g.stride_w, g.pad_top, g.pad_left, ldf, n_chunks)
    db = _sum_rows_in_order(dbpart)[:k].copy()
    dw = empty_host(g.w_shape)
    if cpad == c and ldf == k:
        _sum_chunks(part, dw.reshape(-1, k))
        return dw, db
    full = np.empty((rows, ldf), np.float32)
    _sum_chunks(part, full)
    dw[...] = full.reshape(g.k_h, g.k_w, cpad, ldf)[:, :, :c, :k]
    return dw, db


def _dy_panel(dy: np.ndarray, k: int, ldf: int) -> np.ndarray:
    """dy as (pixels, ldf) rows for the backward-filter tiles: a view where ldf == k, else a
    copy with zero columns up to ldf (a ragged filter panel)."""
    dyf = np.ascontiguousarray(dy, dtype=np.float32).reshape(-1, k)
    if ldf == k:
        return dyf
    dyp = np.zeros((dyf.shape[0], ldf), np.float32)
    dyp[:, :k] = dyf
    return dyp


def _bwf_segment_shape(g, always: bool = False):
    """(nv, rb, spad, ldf) of the row-segment tile for g, or None: it runs where the
    channel-blocked tile would pad too many channels (few input channels: a stem), with
    dil_w == 1 so that the KW*C dw rows of one kh are one contiguous segment (kw*C + c) of
    the padded input row; spad is that segment padded to a multiple of rb (the rows of
    BWF_SEGMENT_ROWS[nv] that pad least), accepted while the padding is at most
    BWF_MAX_PAD_FRACTION.  ``always``: the shape whenever dil_w == 1 (tests)."""
    if g.dil_w != 1 or (not always and _bwf_tile_shape(g) is not None):
        return None
    k = g.filters
    nv = 4 if k % MICRO_NR == 0 or k > 2 * LANES else (2 if k > LANES else 1)
    seg = g.k_w * g.in_c
    rb = min(BWF_SEGMENT_ROWS[nv], key=lambda r: (-(-seg // r) * r, -r))
    spad = -(-seg // rb) * rb
    if not always and spad - seg > BWF_MAX_PAD_FRACTION * spad:
        return None
    return nv, rb, spad, -(-k // (nv * LANES)) * nv * LANES


def backward_filter_segments(x: np.ndarray, dy: np.ndarray, g, shape=None):
    """(dw, db) on the channel-blocked tile kernel with one "tap" per kh whose rows are the
    segment j = kw*C + c of a zero-padded copy of x (padded coordinates: every row inside;
    a copy that is cheap where this runs, few input channels).  part[ch, kh*spad + j, k]
    holds dw[kh, kw, c, k]; rows j >= KW*C read the next floats (slack at the end) and are
    dropped.  ``shape`` as :func:`_bwf_segment_shape` returns it (it must not be None)."""
    nv, rb, spad, ldf = shape or _bwf_segment_shape(g)
    k, c = g.filters, g.in_c
    seg = g.k_w * c
    hp, wpad = g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right
    n_x = g.batch * hp * wpad * c
    xf = np.zeros(n_x + spad - seg, np.float32)        # the padded x, then the slack
    xf[:n_x].reshape(g.batch, hp, wpad, c)[:, g.pad_top:g.pad_top + g.in_h,
                                           g.pad_left:g.pad_left + g.in_w] = x
    dyf = _dy_panel(dy, k, ldf)
    n_rows = g.batch * g.out_h
    n_chunks = max(1, min(BWF_CHUNKS, -(-n_rows // max(1, BWF_CHUNK_PIXELS // g.out_w))))
    taps = np.zeros((g.k_h, 4), np.int64)             # (kh*d_h, 0, every output column)
    taps[:, 0] = np.arange(g.k_h) * g.dil_h
    taps[:, 3] = g.out_w
    part = np.empty((n_chunks, g.k_h * spad, ldf), np.float32)
    dbpart = np.empty((n_chunks, ldf), np.float32)
    _BWF_TILE_KERNELS[rb, nv](xf, dyf.reshape(-1), part.reshape(-1), dbpart.reshape(-1), taps,
                              g.batch, hp, wpad, c, spad, g.out_h, g.out_w, g.stride_h,
                              g.stride_w, 0, 0, ldf, n_chunks)
    db = _sum_rows_in_order(dbpart)[:k].copy()
    full = np.empty((g.k_h * spad, ldf), np.float32)
    _sum_chunks(part, full)
    dw = empty_host(g.w_shape)
    dw[...] = full.reshape(g.k_h, spad, ldf)[:, :seg, :k].reshape(g.w_shape)
    return dw, db


@njit(fastmath=FASTMATH, cache=True)
def _sum_rows_in_order(a):
    """a[0] + a[1] + ... (rows added in order)."""
    out = a[0].copy()
    for i in range(1, a.shape[0]):
        out += a[i]
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bwd_filter_channel_kernel(x, dy, dw, s_h, s_w, d_h, d_w, p_t, p_l, cb):
    """dw for filter counts that are not a multiple of 64 (the MNIST conv1: 32), where the
    register tile would first need dy copied with padded rows.  Item = (kh, kw, a block of cb
    input channels): a (cb, K) accumulator in L1 reduced over every output pixel in order."""
    n_img, in_h, in_w, c_in = x.shape
    k_h, k_w, _, k_out = dw.shape
    out_h, out_w = dy.shape[1], dy.shape[2]
    n_cb = (c_in + cb - 1) // cb
    for item in prange(k_h * k_w * n_cb):
        kh = item // (k_w * n_cb)
        kw = (item // n_cb) % k_w
        c0 = (item % n_cb) * cb
        c1 = min(c0 + cb, c_in)
        acc = np.zeros((c1 - c0, k_out), np.float32)
        for n in range(n_img):
            for oh in range(out_h):
                ih = oh * s_h - p_t + kh * d_h
                if ih < 0 or ih >= in_h:
                    continue
                for ow in range(out_w):
                    iw = ow * s_w - p_l + kw * d_w
                    if iw < 0 or iw >= in_w:
                        continue
                    for c in range(c0, c1):
                        xv = x[n, ih, iw, c]
                        for k in range(k_out):
                            acc[c - c0, k] += xv * dy[n, oh, ow, k]
        dw[kh, kw, c0:c1, :] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bias_grad_kernel(dy2, chunks):
    """db[k] = sum_m dy2[m, k]: fixed chunks of rows, then the chunks added in order."""
    m, k_out = dy2.shape
    part = np.zeros((chunks, k_out), np.float32)
    step = (m + chunks - 1) // chunks
    for ch in prange(chunks):
        for i in range(ch * step, min(m, (ch + 1) * step)):
            for k in range(k_out):
                part[ch, k] += dy2[i, k]
    db = np.zeros(k_out, np.float32)
    for ch in range(chunks):
        for k in range(k_out):
            db[k] += part[ch, k]
    return db


def bias_grad(dy2: np.ndarray) -> np.ndarray:
    """Column sums of a (rows, K) float32 array, deterministic."""
    return _bias_grad_kernel(dy2, DB_CHUNKS)


def backward_filter(x: np.ndarray, dy: np.ndarray, g):
    """(dL/dw with shape g.w_shape, dL/db with shape (g.filters,)) from x and dL/dz."""
    if g.groups != 1:
        from . import conv2d_grouped_cpu
        return conv2d_grouped_cpu.backward_filter(x, dy, g)
    tile = _bwf_tile_shape(g)
    if tile is not None:
        return backward_filter_tiled(x, dy, g, tile)
    seg = _bwf_segment_shape(g)
    if seg is not None:
        return backward_filter_segments(x, dy, g, seg)
    db = bias_grad(dy.reshape(-1, g.filters))
    k = g.filters
    if k % MICRO_NR:
        dw = empty_host(g.w_shape)
        _bwd_filter_channel_kernel(x, dy, dw, g.stride_h, g.stride_w, g.dil_h, g.dil_w, g.pad_top,
                                   g.pad_left, min(BWF_CHANNEL_BLOCK, g.in_c))
        return dw, db
    xp = pad_input(x, g)
    hp, wpad = xp.shape[1], xp.shape[2]
    n_pix = g.batch * g.out_h * g.out_w
    # x offset of each dw row j = (kh, kw, c) from a pixel's window origin (padded x)
    kh, kw, c = np.meshgrid(np.arange(g.k_h), np.arange(g.k_w), np.arange(g.in_c), indexing="ij")
    offs = ((kh * g.dil_h * wpad + kw * g.dil_w) * g.in_c + c).reshape(-1).astype(np.int64)
    n_chunks = max(1, min(BWF_CHUNKS, n_pix))
    part = np.empty((n_chunks, offs.size, k), np.float32)
    _bwd_filter_kernel(xp.reshape(-1), dy.reshape(-1), part.reshape(-1), offs, g.batch, hp, wpad,
                       g.in_c, g.out_h, g.out_w, g.stride_h, g.stride_w, k, n_chunks)
    dw = empty_host(g.w_shape)
    _sum_chunks(part, dw.reshape(-1, k))
    return dw, db


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _sum_chunks(part, out):
    """out = part[0] + part[1] + ... in chunk order (rows shared out across threads)."""
    n_chunks, m, n = part.shape
    for j in prange(m):
        for k in range(n):
            s = part[0, j, k]
            for ch in range(1, n_chunks):
                s += part[ch, j, k]
            out[j, k] = s
