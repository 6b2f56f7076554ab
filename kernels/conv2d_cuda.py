"""conv2d forward on CUDA with Numba: a numbered progression in the style of the SGEMM
tutorials.  NHWC activations, HWIO weights; the geometry arrives as scalar ints in
``ConvGeometry.FIELDS`` order (``g.as_tuple()``), int64 on the device.

Every variant computes::

    y[n, oh, ow, k] = act( b[k] + sum_{kh, kw, c} x[n, ih, iw, c] * w[kh, kw, c, k] )
    ih = oh * stride_h - pad_top  + kh * dil_h
    iw = ow * stride_w - pad_left + kw * dil_w       (ih, iw outside x read as 0)

Grouped convolution (``g.groups = G``, w of shape (KH, KW, C/G, K)): filter k reads the
input channels ``c0 + c``, ``c0 = (k // (K/G)) * (C/G)``, ``c < C/G`` — a channel offset per
thread in cuda_v1_direct, which is the variant grouped geometries run (depthwise included); v2 and
v3 take the trailing ``groups`` argument for the shared field order and run G = 1 only.

cuda_v1_direct
    One thread owns one output element (n, oh, ow, k); k is the fastest index of the flat
    thread id, so a warp writes 32 consecutive floats of y and reads 32 consecutive
    weights w[kh, kw, c, k:k+32] while x[n, ih, iw, c] is a broadcast.  Padding: the
    taps with ih or iw outside the input are skipped by one guard.  Ragged edge: threads
    past the last element return.  Launch: 1-D grid of cdiv(N*OH*OW*K, V1_THREADS) blocks.

cuda_v2_halotile
    One block owns a V2_TILE_H x V2_TILE_W patch of output pixels of one image and a slice
    of V2_TILE_K filters; one thread owns one (pixel, filter) of it.  Channels are taken in
    chunks of ``cc``: per chunk the block stages in shared memory the input tile with its
    halo, ``halo_h = (V2_TILE_H-1)*stride_h + (k_h-1)*dil_h + 1`` rows by ``halo_w``
    columns by cc channels (layout [hh][ww][c]), and the filter slice w[:, :, c0:c0+cc,
    k0:k0+V2_TILE_K] (layout [kh][kw][c][kk]); then each thread reads its taps from shared
    memory: hh = ty*stride_h + kh*dil_h.  Padding and the ragged edge are one guard in the
    staging loop: a halo element outside x, or a filter past K, is stored as 0; threads
    whose output lies past the edge still stage and sync, and only skip the store.
    ``cc`` is chosen by the launcher so both tiles fit V2_SMEM_X / V2_SMEM_W floats; a
    geometry whose single-channel halo does not fit is refused with ValueError.
    Launch: grid (N * cdiv(OH, V2_TILE_H) * cdiv(OW, V2_TILE_W), cdiv(K, V2_TILE_K)) (the
    unbounded count on x: grid.y/z stop at 65535), V2_TILE_H*V2_TILE_W*V2_TILE_K threads.

cuda_v3_regblock
    The convolution as the GEMM ``Y[M, K] = A[M, R] @ W[R, K]`` with M = N*OH*OW pixels
    and R = KH*KW*C, where A (im2col) is never materialised: A[m, r] is computed from the
    index map when a tile is staged.  One block owns a V3_BM x V3_BN tile of Y; one
    thread owns a V3_TM x V3_TN sub-tile held in registers (cuda.local.array).  The
    reduction runs over R in slices of V3_BK: the block stages A[m0:m0+BM, r0:r0+BK]
    (transposed, [r][m]) and W[r0:r0+BK, k0:k0+BN] in shared memory, syncs, and every
    thread does BK rank-1 updates of its TM x TN accumulators from TM + TN register
    operands.  m → (n, oh, ow) and r → (kh, kw, c) with r = (kh*KW + kw)*C + c, the row
    of HWIO weights viewed as (R, K).  Padding, the ragged M/K edges and the ragged last
    R slice are all one guard in the staging loops (value 0).  Launch: grid
    (cdiv(M, V3_BM), cdiv(K, V3_BN)), (V3_BM/V3_TM)*(V3_BN/V3_TN) threads.

All three are deterministic: each output is summed by one thread in a fixed order.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from dlconv import variants as _variants

from .cuda_common import activate, cdiv, dummy_bias, stream_or_default

__all__ = ["VARIANTS", "launch_v1", "launch_v2", "launch_v3", "forward", "v2_channel_chunk"]

#: Variants, default (fastest by design: register blocking + shared memory reuse) first: the
#: forward entries of the one Numba CUDA table (:data:`dlconv.variants.NUMBA_CUDA`), highest
#: number first.
VARIANTS = _variants.forward_by_number(_variants.NUMBA_CUDA)

#: v1: threads per block; 128 = 4 warps, enough to hide latency with any occupancy limit.
V1_THREADS = 128

#: v2: output tile per block.  4 x 4 pixels x 8 filters = 128 threads; a 3x3 stride-1
#: halo is 6 x 6, so each staged input element is reused by up to 9 pixels x 8 filters.
V2_TILE_H = 4
V2_TILE_W = 4
V2_TILE_K = 8
V2_THREADS = V2_TILE_H * V2_TILE_W * V2_TILE_K
#: v2: shared-memory capacity (floats) of the input halo tile and the filter slice:
#: 16 KiB each, 32 KiB per block, leaving room for several resident blocks per SM.
V2_SMEM_X = 4096
V2_SMEM_W = 4096

#: v3: block tile of Y (pixels x filters) and reduction slice.  32 x 32 with 4 x 4 per
#: thread = 64 threads and 16 accumulators per thread; BK = 8 keeps both shared tiles at
#: 1 KiB so a block never limits occupancy by shared memory.
V3_BM = 32
V3_BN = 32
V3_BK = 8
V3_TM = 4
V3_TN = 4
V3_THREADS = (V3_BM // V3_TM) * (V3_BN // V3_TN)


# ----------------------------------------------------------------------------- cuda_v1_direct
@cuda.jit
def _v1_kernel(x, w, b, y, has_bias, act,
               batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
               p_t, p_b, p_l, p_r, out_h, out_w, groups):
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx >= batch * out_h * out_w * filters:
        return
    k = idx % filters
    cg = in_c // groups                      # channels per group; filter k reads offset c0
    c0 = (k // (filters // groups)) * cg
    t = idx // filters
    ow = t % out_w
    t = t // out_w
    oh = t % out_h
    n = t // out_h
    acc = np.float32(0.0)
    for kh in range(k_h):
        ih = oh * s_h - p_t + kh * d_h
        if ih >= 0 and ih < in_h:
            for kw in range(k_w):
                iw = ow * s_w - p_l + kw * d_w
                if iw >= 0 and iw < in_w:
                    for c in range(cg):
                        acc += x[n, ih, iw, c0 + c] * w[kh, kw, c, k]
    if has_bias:
        acc += b[k]
    y[n, oh, ow, k] = activate(acc, act)


def launch_v1(x, w, b, g, act: int, stream=None, out=None):
    """cuda_v1_direct: x, w, b (or None) Numba device arrays, g a ConvGeometry, act a code.

    Returns y (a new device array of shape g.y_shape, or ``out``)."""
    s = stream_or_default(stream)
    y = cuda.device_array(g.y_shape, np.float32, stream=s) if out is None else out
    total = g.batch * g.out_h * g.out_w * g.filters
    bb = dummy_bias(s) if b is None else b
    _v1_kernel[cdiv(total, V1_THREADS), V1_THREADS, s](
        x, w, bb, y, b is not None, act, *g.as_tuple())
    return y


# ----------------------------------------------------------------------------- cuda_v2_halotile
@cuda.jit
def _v2_kernel(x, w, b, y, has_bias, act, cc, halo_h, halo_w,
               batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
               p_t, p_b, p_l, p_r, out_h, out_w, groups):
    xs = cuda.shared.array(V2_SMEM_X, np.float32)
    ws = cuda.shared.array(V2_SMEM_W, np.float32)
    tid = cuda.threadIdx.x
    kk = tid % V2_TILE_K
    pix = tid // V2_TILE_K
    ty = pix // V2_TILE_W
    tx = pix % V2_TILE_W
    tiles_w = (out_w + V2_TILE_W - 1) // V2_TILE_W
    tiles = ((out_h + V2_TILE_H - 1) // V2_TILE_H) * tiles_w
    n = cuda.blockIdx.x // tiles
    tile = cuda.blockIdx.x % tiles
    oh0 = (tile // tiles_w) * V2_TILE_H
    ow0 = (tile % tiles_w) * V2_TILE_W
    k0 = cuda.blockIdx.y * V2_TILE_K
    ih0 = oh0 * s_h - p_t            # input row of halo row 0 (negative inside the padding)
    iw0 = ow0 * s_w - p_l
    acc = np.float32(0.0)
    for c0 in range(0, in_c, cc):
        ncc = min(cc, in_c - c0)
        for e in range(tid, halo_h * halo_w * ncc, V2_THREADS):
            c = e % ncc
            t = e // ncc
            ih = ih0 + t // halo_w
            iw = iw0 + t % halo_w
            v = np.float32(0.0)
            if ih >= 0 and ih < in_h and iw >= 0 and iw < in_w:
                v = x[n, ih, iw, c0 + c]
            xs[e] = v
        for e in range(tid, k_h * k_w * ncc * V2_TILE_K, V2_THREADS):
            q = e % V2_TILE_K
            t = e // V2_TILE_K
            c = t % ncc
            t = t // ncc
            v = np.float32(0.0)
            if k0 + q < filters:
                v = w[t // k_w, t % k_w, c0 + c, k0 + q]
            ws[e] = v
        cuda.syncthreads()
        for kh in range(k_h):
            hh = ty * s_h + kh * d_h
            for kw in range(k_w):
                xb = (hh * halo_w + tx * s_w + kw * d_w) * ncc
                wb = (kh * k_w + kw) * ncc * V2_TILE_K + kk
                for c in range(ncc):
                    acc += xs[xb + c] * ws[wb + c * V2_TILE_K]
        cuda.syncthreads()
    oh = oh0 + ty
    ow = ow0 + tx
    k = k0 + kk
    if oh < out_h and ow < out_w and k < filters:
        if has_bias:
            acc += b[k]
        y[n, oh, ow, k] = activate(acc, act)


def v2_channel_chunk(g):
    """(cc, halo_h, halo_w) for v2: channels per staged chunk and the halo tile size.

    Raises ValueError when even one channel's halo or filter slice exceeds shared memory.
    """
    halo_h = (V2_TILE_H - 1) * g.stride_h + (g.k_h - 1) * g.dil_h + 1
    halo_w = (V2_TILE_W - 1) * g.stride_w + (g.k_w - 1) * g.dil_w + 1
    cc = min(g.in_c, V2_SMEM_X // (halo_h * halo_w), V2_SMEM_W // (g.k_h * g.k_w * V2_TILE_K))
    if cc < 1:
        raise ValueError(
            f"variant 'cuda_v2_halotile' cannot stage this geometry in shared memory: halo "
            f"{halo_h}x{halo_w} (needs <= {V2_SMEM_X} floats) and kernel {g.k_h}x{g.k_w}x"
            f"{V2_TILE_K} filters (needs <= {V2_SMEM_W} floats); use 'cuda_v3_regblock'")
    return cc, halo_h, halo_w


def launch_v2(x, w, b, g, act: int, stream=None, out=None):
    """cuda_v2_halotile; same arguments as :func:`launch_v1`."""
    cc, halo_h, halo_w = v2_channel_chunk(g)
    s = stream_or_default(stream)
    y = cuda.device_array(g.y_shape, np.float32, stream=s) if out is None else out
    grid = (g.batch * cdiv(g.out_h, V2_TILE_H) * cdiv(g.out_w, V2_TILE_W),
            cdiv(g.filters, V2_TILE_K))
    bb = dummy_bias(s) if b is None else b
    _v2_kernel[grid, V2_THREADS, s](x, w, bb, y, b is not None, act, cc, halo_h, halo_w,
                                    *g.as_tuple())
    return y


# ----------------------------------------------------------------------------- cuda_v3_regblock
@cuda.jit
def _v3_kernel(x, w2, b, y2, has_bias, act,
               batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
               p_t, p_b, p_l, p_r, out_h, out_w, groups):
    """w2: weights viewed as (R, K); y2: output viewed as (M, K)."""
    a_s = cuda.shared.array((V3_BK, V3_BM), np.float32)
    b_s = cuda.shared.array((V3_BK, V3_BN), np.float32)
    acc = cuda.local.array((V3_TM, V3_TN), np.float32)
    a_r = cuda.local.array(V3_TM, np.float32)
    b_r = cuda.local.array(V3_TN, np.float32)
    tid = cuda.threadIdx.x
    tr = tid // (V3_BN // V3_TN)     # thread's row group: rows tr*TM .. tr*TM+TM-1
    tc = tid % (V3_BN // V3_TN)      # thread's column group
    m0 = cuda.blockIdx.x * V3_BM
    k0 = cuda.blockIdx.y * V3_BN
    m_total = batch * out_h * out_w
    r_total = k_h * k_w * in_c
    for i in range(V3_TM):
        for j in range(V3_TN):
            acc[i, j] = np.float32(0.0)
    for r0 in range(0, r_total, V3_BK):
        for e in range(tid, V3_BK * V3_BM, V3_THREADS):   # stage A^T: a_s[rl, ml]
            ml = e % V3_BM
            rl = e // V3_BM
            m = m0 + ml
            r = r0 + rl
            v = np.float32(0.0)
            if m < m_total and r < r_total:
                ow = m % out_w
                t = m // out_w
                oh = t % out_h
                n = t // out_h
                c = r % in_c
                t = r // in_c
                ih = oh * s_h - p_t + (t // k_w) * d_h
                iw = ow * s_w - p_l + (t % k_w) * d_w
                if ih >= 0 and ih < in_h and iw >= 0 and iw < in_w:
                    v = x[n, ih, iw, c]
            a_s[rl, ml] = v
        for e in range(tid, V3_BK * V3_BN, V3_THREADS):   # stage W: b_s[rl, kl]
            kl = e % V3_BN
            rl = e // V3_BN
            v = np.float32(0.0)
            if r0 + rl < r_total and k0 + kl < filters:
                v = w2[r0 + rl, k0 + kl]
            b_s[rl, kl] = v
        cuda.syncthreads()
        for rl in range(V3_BK):
            for i in range(V3_TM):
                a_r[i] = a_s[rl, tr * V3_TM + i]
            for j in range(V3_TN):
                b_r[j] = b_s[rl, tc * V3_TN + j]
            for i in range(V3_TM):
                for j in range(V3_TN):
                    acc[i, j] += a_r[i] * b_r[j]
        cuda.syncthreads()
    for i in range(V3_TM):
        m = m0 + tr * V3_TM + i
        if m < m_total:
            for j in range(V3_TN):
                k = k0 + tc * V3_TN + j
                if k < filters:
                    z = acc[i, j]
                    if has_bias:
                        z += b[k]
                    y2[m, k] = activate(z, act)


def launch_v3(x, w, b, g, act: int, stream=None, out=None):
    """cuda_v3_regblock; same arguments as :func:`launch_v1`."""
    s = stream_or_default(stream)
    y = cuda.device_array(g.y_shape, np.float32, stream=s) if out is None else out
    grid = (cdiv(g.gemm_m, V3_BM), cdiv(g.filters, V3_BN))
    bb = dummy_bias(s) if b is None else b
    _v3_kernel[grid, V3_THREADS, s](x, w.reshape(g.gemm_k, g.filters), bb,
                                    y.reshape(g.gemm_m, g.filters), b is not None, act,
                                    *g.as_tuple())
    return y


_LAUNCH = {"cuda_v1_direct": launch_v1, "cuda_v2_halotile": launch_v2, "cuda_v3_regblock": launch_v3}
assert set(_LAUNCH) == set(VARIANTS), "kernels/conv2d_cuda.py launchers vs dlconv.variants.NUMBA_CUDA"


def forward(x, w, b, g, act: int, variant: str = VARIANTS[0], stream=None):
    """Dispatch to a variant by name (see :data:`VARIANTS`).  Grouped geometries
    (``g.groups > 1``) run cuda_v1_direct, the one variant with per-group channel offsets.
    An old name (``v3_implicit_gemm``, ...) warns DeprecationWarning."""
    launch = _LAUNCH[_variants.canonical(variant, _variants.NUMBA_CUDA)]
    if g.groups != 1:
        launch = launch_v1
    return launch(x, w, b, g, act, stream=stream)
