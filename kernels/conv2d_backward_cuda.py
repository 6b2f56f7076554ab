"""conv2d backward passes on CUDA with Numba.  NHWC activations, HWIO weights; geometry as
scalar ints in ``ConvGeometry.FIELDS`` order (int64 on the device).  dy is dL/dz, the
gradient with respect to the convolution's linear output.

Backward-data (the transposed convolution), gather formulation::

    dx[n, ih, iw, c] = sum_{kh, kw, k} w[kh, kw, c, k] * dy[n, oh, ow, k]
    over the taps with  th = ih + pad_top - kh*dil_h  divisible by stride_h and
    oh = th / stride_h in [0, out_h)   (same for iw, kw, pad_left, dil_w, stride_w)

Grouped (``g.groups = G``, w (KH, KW, C/G, K)): channel c = q*(C/G) + ci meets only the
filters k of its group q, ``[q*(K/G), (q+1)*(K/G))``, through w[kh, kw, ci, k]; dw element
(kh, kw, ci, k) reads x channel ``(k // (K/G))*(C/G) + ci``.  G = 1 is the plain convolution.

One thread owns one dx element (c fastest, so a warp writes consecutive floats); taps
that fall between strides or outside dy are skipped by one guard, which also covers the
rows and columns of x that no window reads (dx = 0 there) and the padding.  No atomics:
deterministic.  Launch: 1-D grid of cdiv(N*H*W*C, BWD_THREADS) blocks.

Backward-filter, deterministic split reduction::

    dw[kh, kw, c, k] = sum_{n, oh, ow} x[n, ih, iw, c] * dy[n, oh, ow, k]
    db[k]            = sum_{n, oh, ow} dy[n, oh, ow, k]

The M = N*OH*OW pixels are cut into ``splits`` fixed chunks (a function of M only, see
:func:`filter_splits`).  Pass 1: thread (e, s) owns dw element e = (kh, kw, c, k) (k
fastest: coalesced dy reads, broadcast x reads) and sums chunk s in pixel order into
partial[s, e]; taps in the padding are skipped by one guard.  Pass 2: one thread per
element adds partial[0..splits) in order.  db is the same two passes over dy alone.
Results never depend on the GPU or on scheduling.  The partials live in the stream's
cached workspace (:func:`cuda_common.workspace`): per call only dw and db are allocated.
Launch: pass 1 grid (cdiv(KH*KW*C*K, BWD_THREADS), splits); pass 2 1-D grid.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .cuda_common import cdiv, stream_or_default, workspace

__all__ = ["launch_backward_data", "launch_backward_filter", "filter_splits"]

#: Threads per block for the element-wise-owned kernels here (4 warps).
BWD_THREADS = 128
#: Pixels summed by one backward-filter thread before handing over to the next chunk:
#: large enough that the partial buffer stays small, small enough that MNIST-sized M
#: (128*24*24 = 73728 → 64 chunks) fills the GPU.
PIXELS_PER_SPLIT = 1024
#: Upper bound on the chunks (bounds the partial buffer to MAX_SPLITS x weights).
MAX_SPLITS = 64


def filter_splits(g) -> int:
    """Number of pixel chunks of the split reduction (depends on the geometry only)."""
    return max(1, min(MAX_SPLITS, cdiv(g.gemm_m, PIXELS_PER_SPLIT)))


@cuda.jit
def _bwd_data_kernel(dy, w, dx,
                     batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
                     p_t, p_b, p_l, p_r, out_h, out_w, groups):
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx >= batch * in_h * in_w * in_c:
        return
    c = idx % in_c
    cg = in_c // groups
    fg = filters // groups
    k0 = (c // cg) * fg                      # the filters of channel c's group: [k0, k0 + fg)
    ci = c % cg
    t = idx // in_c
    iw = t % in_w
    t = t // in_w
    ih = t % in_h
    n = t // in_h
    acc = np.float32(0.0)
    for kh in range(k_h):
        th = ih + p_t - kh * d_h
        if th >= 0 and th % s_h == 0 and th // s_h < out_h:
            oh = th // s_h
            for kw in range(k_w):
                tw = iw + p_l - kw * d_w
                if tw >= 0 and tw % s_w == 0 and tw // s_w < out_w:
                    ow = tw // s_w
                    for k in range(k0, k0 + fg):
                        acc += dy[n, oh, ow, k] * w[kh, kw, ci, k]
    dx[n, ih, iw, c] = acc


def launch_backward_data(dy, w, g, stream=None, out=None):
    """dL/dx (device array of shape g.x_shape) from device arrays dy (g.y_shape) and w."""
    s = stream_or_default(stream)
    dx = cuda.device_array(g.x_shape, np.float32, stream=s) if out is None else out
    total = g.batch * g.in_h * g.in_w * g.in_c
    _bwd_data_kernel[cdiv(total, BWD_THREADS), BWD_THREADS, s](dy, w, dx, *g.as_tuple())
    return dx


@cuda.jit
def _bwd_filter_partial_kernel(x, dy2, part, chunk,
                               batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
                               p_t, p_b, p_l, p_r, out_h, out_w, groups):
    """dy2: dy viewed as (M, K); part: (splits, KH*KW*(C/G)*K)."""
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    sp = cuda.blockIdx.y
    cg = in_c // groups
    if e >= k_h * k_w * cg * filters:
        return
    k = e % filters
    t = e // filters
    ci = t % cg
    c = (k // (filters // groups)) * cg + ci   # the x channel: filter k's group offset + ci
    t = t // cg
    kw = t % k_w
    kh = t // k_w
    m_total = batch * out_h * out_w
    m_end = min(m_total, (sp + 1) * chunk)
    acc = np.float32(0.0)
    for m in range(sp * chunk, m_end):
        ow = m % out_w
        t = m // out_w
        oh = t % out_h
        n = t // out_h
        ih = oh * s_h - p_t + kh * d_h
        iw = ow * s_w - p_l + kw * d_w
        if ih >= 0 and ih < in_h and iw >= 0 and iw < in_w:
            acc += x[n, ih, iw, c] * dy2[m, k]
    part[sp, e] = acc


@cuda.jit
def _bias_partial_kernel(dy2, part, chunk):
    k = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    sp = cuda.blockIdx.y
    if k >= dy2.shape[1]:
        return
    acc = np.float32(0.0)
    for m in range(sp * chunk, min(dy2.shape[0], (sp + 1) * chunk)):
        acc += dy2[m, k]
    part[sp, k] = acc


@cuda.jit
def _sum_splits_kernel(part, out):
    """out[e] = sum_s part[s, e], s in order."""
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if e >= part.shape[1]:
        return
    acc = np.float32(0.0)
    for sp in range(part.shape[0]):
        acc += part[sp, e]
    out[e] = acc


def launch_backward_filter(x, dy, g, stream=None):
    """(dL/dw of shape g.w_shape, dL/db of shape (g.filters,)) as device arrays."""
    s = stream_or_default(stream)
    splits = filter_splits(g)
    chunk = cdiv(g.gemm_m, splits)
    n_w = g.gemm_k * g.filters
    dy2 = dy.reshape(g.gemm_m, g.filters)
    scratch = workspace(splits * (n_w + g.filters), s)     # both partial buffers, one workspace
    part = scratch[:splits * n_w].reshape(splits, n_w)
    part_b = scratch[splits * n_w:].reshape(splits, g.filters)
    _bwd_filter_partial_kernel[(cdiv(n_w, BWD_THREADS), splits), BWD_THREADS, s](
        x, dy2, part, chunk, *g.as_tuple())
    dw = cuda.device_array(n_w, np.float32, stream=s)
    _sum_splits_kernel[cdiv(n_w, BWD_THREADS), BWD_THREADS, s](part, dw)
    _bias_partial_kernel[(cdiv(g.filters, BWD_THREADS), splits), BWD_THREADS, s](dy2, part_b, chunk)
    db = cuda.device_array(g.filters, np.float32, stream=s)
    _sum_splits_kernel[cdiv(g.filters, BWD_THREADS), BWD_THREADS, s](part_b, db)
    return dw.reshape(g.w_shape), db
