// cpu_conv_direct.h — pack-free ("direct") AVX-512 convolution kernels (header-only, internal;
// used by cpu_conv.cpp when the build has AVX-512, the GEMM engine of cpu_gemm.h otherwise).
//
// Why no packing: on NHWC / HWIO, for a fixed tap row kh and stride-1-in-channels data, the
// reduction index j = (kw, c) of one output pixel is a *contiguous* run of the input row
// (KW·C floats when dil_w = 1, C floats per kw otherwise), and the matching weight rows
// w[kh, kw, c, 0..F) are contiguous too.  So each (pixel tile, tap row) is a small GEMM whose A
// rows are read in place from x (row stride stride_w·C between neighbouring pixels) and whose B
// is read in place from w.  Nothing proportional to the batch is ever allocated.
//
// cpu_v2_regblock forward:  y[n, oh, ow, f] = act(b[f] + Σ_{kh, kw, c} x[n, ih, iw, c] · w[kh, kw, c, f])
//   ih = oh·stride_h − pad_top + kh·dil_h,  iw = ow·stride_w − pad_left + kw·dil_w.
//   One OpenMP work item = one output row (n, oh): all OW pixels x all F filters.
//   Register block: R pixels x NV·16 filters in R·NV zmm accumulators (R = 6 for NV = 4:
//   24 accumulators + 4 weight vectors + 1 broadcast = 29 of 32 zmm).  Per reduction step:
//   NV weight loads, R broadcasts of x, R·NV FMAs (24 FMAs = 12 cycles on two FMA ports,
//   10 loads = 5 cycles on two load ports: FMA-bound).
//   Loop order inside a row: column panel (64 filters) → tap segment (kh, or (kh, kw)) → pixel
//   tile; accumulators are stored to the output row (6 KB, L1) between segments, so a segment's
//   weights (KW·C x 64 floats = 24 KB for 3x3x32) stay in L1 across the row's pixel tiles and the
//   whole filter (73 KB) is read once per row from L2.  Bias initialises the first segment; relu
//   is applied on the last store; sigmoid / tanh by a pass over the finished row.
//   Edges: a tap row ih outside [0, H) is skipped (contributes zero); when a row's window crosses
//   the left/right padding the KH input rows it needs are first copied into a zero-padded
//   per-thread row buffer (KH·(W + pads)·C floats), so the kernel itself never tests bounds.
//   The F tail (F % 16) is one masked vector; the last pixel tiles of a row are balanced
//   (OW split into ceil(OW / R) tiles of near-equal size, R instantiated for 1..12).
//
// cpu_v2_regblock backward-filter:  dw[kh, kw, c, f] = Σ_{n, oh, ow} x[n, ih, iw, c] · dz[n, oh, ow, f]
//   Rows of dw are taken in blocks of R consecutive j = (kw, c) of one kh (dil_w = 1: j runs over
//   KW·C contiguous input floats; otherwise j = c of one kw).  Register block: R dw rows x NV·16
//   filters; per output pixel: NV loads of dz[p, :], R broadcasts of x[p + tap, j0 .. j0+R), R·NV
//   FMAs.  One work item = a chunk of whole output rows (n, oh), about FILTER_CHUNK_PIXELS pixels:
//   its dz rows are copied once into an aligned buffer (row stride a multiple of 16), and every
//   dw block sweeps the chunk (dz chunk + its x rows stay in cache across the blocks).
//   Edges: for a block, the pixels whose every tap lies inside the input form one range
//   [ow_lo, ow_hi) (register kernel); the few pixels outside it add their valid terms in a
//   vector-over-f loop; tap rows outside [0, H) are skipped.
//   Threads: items are grouped into P contiguous groups (P fixed per call from T and the weight
//   size); each group accumulates into its own dw / db partial, groups are handed out
//   dynamically, partials are summed in group order: deterministic for a given thread count.
//   db (Σ dz) is summed per chunk while the chunk is in cache.
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_act.h"
#include "cpu_gemm.h"
#include "geometry.h"

namespace dlconv {
namespace cpu {
namespace direct {

constexpr int VL = 16;          // floats per zmm
constexpr int MAX_NV = 4;       // zmm per register row: 64 filters, the widest block with R = 6
constexpr int PANEL = MAX_NV * VL;
constexpr int MAX_R = 12;       // most pixels (or dw rows) per register block (NV <= 2)
// Register rows for NV vectors per row: R·NV <= 24 accumulators leaves 4 weight vectors and a
// broadcast in the 32 zmm; 12 rows at most (more broadcast loads than FMAs beyond that).
constexpr int max_rows(int nv) { return nv >= 4 ? 6 : nv == 3 ? 8 : 12; }
// Output pixels per backward-filter work item (whole output rows): 96 = 4 rows of a 24x64 output,
// 24 KB of dz plus 6 input rows (20 KB) that stay in L1/L2 while the 48 dw blocks sweep them;
// measured 48 / 96 / 144 / 192 px: 340 / 360 / 350 / 353 GF/s.
constexpr i64 FILTER_CHUNK_PIXELS = 96;
// Budget for the per-group dw partials of backward-filter (groups beyond T only if they fit).
constexpr i64 PARTIAL_BUDGET_BYTES = i64(4) << 20;
// Groups per thread the backward-filter aims for, so a descheduled thread can be helped.
constexpr int GROUPS_PER_THREAD = 4;

alignas(64) static const float kZeros[PANEL] = {};

static inline __m512 load_v(const float* p, bool last, __mmask16 m) {
    return last ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}
static inline void store_v(float* p, __m512 v, bool last, __mmask16 m) {
    if (last) _mm512_mask_storeu_ps(p, m, v);
    else _mm512_storeu_ps(p, v);
}

// ---------------------------------------------------------------------------- forward tile
// One reduction segment of the forward: A rows a + r*as (+k), B rows b + k*ldb, kc steps.
struct Seg {
    const float* a;
    const float* b;
    i64 kc;
};
// o[r*ldo + f] = (init ? init[f] : o[r*ldo + f]) + Σ_s Σ_{k<kc_s} a_s[aoff + r*as + k] · b_s[boff + k*ldb + f]
//   for r < R, f < NV*16 (last vector masked by m); relu on store if asked.  The accumulators
//   stay in registers across all the segments (taps) of the tile.
template <int R, int NV>
static void fwd_tile(const Seg* segs, int nseg, i64 aoff, i64 as, i64 boff, i64 ldb, float* __restrict o, i64 ldo,
                     __mmask16 m, const float* init, bool relu) {
    __m512 c[R][NV];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
            c[r][v] = load_v(init ? init + v * VL : o + r * ldo + v * VL, v == NV - 1, m);
    for (int s = 0; s < nseg; ++s) {
        const float* ap[R];
        const float* a = segs[s].a + aoff;
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) ap[r] = a + r * as;
        const float* __restrict b = segs[s].b + boff;
        const i64 kc = segs[s].kc;
        for (i64 k = 0; k < kc; ++k) {
            __m512 bv[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) bv[v] = load_v(b + v * VL, v == NV - 1, m);
            b += ldb;
#pragma GCC unroll 12
            for (int r = 0; r < R; ++r) {
                const __m512 av = _mm512_set1_ps(ap[r][k]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, bv[v], c[r][v]);
            }
        }
    }
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
            store_v(o + r * ldo + v * VL, relu ? _mm512_max_ps(zero, c[r][v]) : c[r][v], v == NV - 1, m);
}

// ---------------------------------------------------------------------------- filter tile
// acc[r*ldacc + f] += Σ_{q < nrows} Σ_{p < np} xr[q][p*xs + r] · dr[q][p*F + f]
//   for r < R, f < NV*16 (last vector masked by m).
template <int R, int NV>
static void filt_tile(const float* const* xr, const float* const* dr, int nrows, i64 np, i64 xs, i64 F,
                      float* __restrict acc, i64 ldacc, __mmask16 m) {
    __m512 c[R][NV];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = load_v(acc + r * ldacc + v * VL, v == NV - 1, m);
    for (int q = 0; q < nrows; ++q) {
        const float* __restrict xp = xr[q];
        const float* __restrict dp = dr[q];
        for (i64 p = 0; p < np; ++p) {
            __m512 dv[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) dv[v] = load_v(dp + v * VL, v == NV - 1, m);
#pragma GCC unroll 12
            for (int r = 0; r < R; ++r) {
                const __m512 xv = _mm512_set1_ps(xp[r]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(xv, dv[v], c[r][v]);
            }
            xp += xs;
            dp += F;
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) store_v(acc + r * ldacc + v * VL, c[r][v], v == NV - 1, m);
}

// Dispatch tables [NV-1][R-1]; an R beyond max_rows(NV) maps to a valid (never used) kernel, so
// no over-wide block with spilled accumulators is ever instantiated.
using FwdFn = void (*)(const Seg*, int, i64, i64, i64, i64, float*, i64, __mmask16, const float*, bool);
using FiltFn = void (*)(const float* const*, const float* const*, int, i64, i64, i64, float*, i64, __mmask16);

template <int NV, int... Rs>
constexpr std::array<FwdFn, MAX_R> fwd_row(std::integer_sequence<int, Rs...>) {
    return {&fwd_tile<std::min(Rs + 1, max_rows(NV)), NV>...};
}
template <int NV, int... Rs>
constexpr std::array<FiltFn, MAX_R> filt_row(std::integer_sequence<int, Rs...>) {
    return {&filt_tile<std::min(Rs + 1, max_rows(NV)), NV>...};
}
static inline FwdFn fwd_kernel(int nv, int r) {
    static constexpr std::array<std::array<FwdFn, MAX_R>, MAX_NV> t = {
        fwd_row<1>(std::make_integer_sequence<int, MAX_R>{}), fwd_row<2>(std::make_integer_sequence<int, MAX_R>{}),
        fwd_row<3>(std::make_integer_sequence<int, MAX_R>{}), fwd_row<4>(std::make_integer_sequence<int, MAX_R>{})};
    return t[nv - 1][r - 1];
}
static inline FiltFn filt_kernel(int nv, int r) {
    static constexpr std::array<std::array<FiltFn, MAX_R>, MAX_NV> t = {
        filt_row<1>(std::make_integer_sequence<int, MAX_R>{}), filt_row<2>(std::make_integer_sequence<int, MAX_R>{}),
        filt_row<3>(std::make_integer_sequence<int, MAX_R>{}), filt_row<4>(std::make_integer_sequence<int, MAX_R>{})};
    return t[nv - 1][r - 1];
}

// Column panel [f0, f0 + 64) of F filters: vectors and the mask of the last one.
struct Panel {
    i64 f0;
    int nv;
    __mmask16 mask;
};
static inline Panel panel_at(i64 f0, i64 F) {
    const i64 cols = std::min<i64>(PANEL, F - f0);
    const int nv = int((cols + VL - 1) / VL);
    const int tail = int(cols - (nv - 1) * VL);
    return {f0, nv, __mmask16((1u << tail) - 1u)};
}

// ---------------------------------------------------------------------------- forward driver
// Where output pixel (n, oh, ow) starts in y: y + n*img + oh*row + ow*pix (floats).  The default
// is the dense NHWC output; the strided backward-data writes one sub-pixel phase of dx in place
// (img = H*W*C, row = stride_h*W*C, pix = stride_w*C, y offset to the phase's first pixel).
struct OutMap {
    i64 img, row, pix;
};
static inline OutMap dense_out(const ConvGeometry& g) {
    return {g.out_h * g.out_w * g.filters, g.out_w * g.filters, g.filters};
}

// Weight rows as the kernel reads them: 64-byte aligned, ldb a multiple of 16 floats.
// A misaligned row makes every weight load split two cache lines (measured 230 -> 198 GF/s
// per core), and NumPy only guarantees 16-byte alignment; copying weights is O(weights).
// Returns w or the copy in wcopy; ldb is the row stride of what it returns.
inline const float* aligned_weights(const ConvGeometry& g, const float* w, Buf& wcopy, i64& ldb) {
    const i64 F = g.filters, J = g.k_h * g.k_w * g.in_c;
    ldb = F;
    if (!(reinterpret_cast<uintptr_t>(w) & 63) && F % VL == 0) return w;
    ldb = (F + VL - 1) / VL * VL;
    wcopy.resize(J * ldb);
    for (i64 j = 0; j < J; ++j) {
        std::memcpy(wcopy.data + j * ldb, w + j * F, F * sizeof(float));
        std::memset(wcopy.data + j * ldb + F, 0, (ldb - F) * sizeof(float));
    }
    return wcopy.data;
}

// The rows of one forward (w as aligned_weights returns it): called by every thread of an
// enclosing parallel region, which share out the output rows (dynamic, no barrier at the end,
// so several convolutions, e.g. the phases of a strided backward-data, can share one region).
inline void forward_rows(const ConvGeometry& g, const float* x, const float* w, i64 ldb, const float* bias, int act,
                         float* y, const OutMap& om) {
    const i64 C = g.in_c, F = g.filters, OW = g.out_w, OH = g.out_h, H = g.in_h, W = g.in_w;
    const i64 KH = g.k_h, KW = g.k_w;
    // Input columns a row of outputs touches: [iw_lo, iw_hi).
    const i64 iw_lo = -g.pad_left, iw_hi = (OW - 1) * g.stride_w - g.pad_left + (KW - 1) * g.dil_w + 1;
    const bool padded = iw_lo < 0 || iw_hi > W;
    const i64 Wb = iw_hi - iw_lo;      // width of a (padded) source row, in pixels
    const bool fused_kw = g.dil_w == 1;  // (kw, c) contiguous in an input row
    const i64 as = g.stride_w * C;       // A row stride: neighbouring output pixels
    const i64 rows = g.batch * OH;
    {
        Buf rowbuf(padded ? KH * Wb * C : 0);
        std::vector<Seg> segs;
        segs.reserve(size_t(KH * KW));
        // dynamic, 8 rows a grab: a thread the OS (or a neighbour's spinning pool) preempts is helped
#pragma omp for schedule(dynamic, 8) nowait
        for (i64 t = 0; t < rows; ++t) {
            const i64 n = t / OH, oh = t - n * OH;
            float* yrow = y + n * om.img + oh * om.row;
            segs.clear();
            for (i64 kh = 0; kh < KH; ++kh) {
                const i64 ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
                if (ih < 0 || ih >= H) continue;
                const float* xrow = x + (n * H + ih) * W * C;
                const float* src;  // src + j*C = input column iw_lo + j
                if (!padded) {
                    src = xrow + iw_lo * C;
                } else {
                    float* d = rowbuf.data + kh * Wb * C;
                    const i64 j0 = std::max<i64>(0, -iw_lo), j1 = std::min<i64>(Wb, W - iw_lo);
                    if (j1 <= j0) {
                        std::memset(d, 0, Wb * C * sizeof(float));
                    } else {
                        std::memset(d, 0, j0 * C * sizeof(float));
                        std::memcpy(d + j0 * C, xrow + (iw_lo + j0) * C, (j1 - j0) * C * sizeof(float));
                        std::memset(d + j1 * C, 0, (Wb - j1) * C * sizeof(float));
                    }
                    src = d;
                }
                if (fused_kw) {
                    segs.push_back({src, w + kh * KW * C * ldb, KW * C});
                } else {
                    for (i64 kw = 0; kw < KW; ++kw)
                        segs.push_back({src + kw * g.dil_w * C, w + (kh * KW + kw) * C * ldb, C});
                }
            }
            if (segs.empty()) {  // every tap in the padding: y = act(b)
                for (i64 ow = 0; ow < OW; ++ow) {
                    float* o = yrow + ow * om.pix;
                    for (i64 f = 0; f < F; ++f) o[f] = bias ? bias[f] : 0.f;
                }
                epilogue(yrow, om.pix, OW, F, nullptr, act);
                continue;
            }
            for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                const Panel pn = panel_at(f0, F);
                const i64 ntile = (OW + max_rows(pn.nv) - 1) / max_rows(pn.nv);
                const float* init = bias ? bias + f0 : kZeros;
                for (i64 i = 0; i < ntile; ++i) {
                    const i64 ow0 = i * OW / ntile, ow1 = (i + 1) * OW / ntile;
                    fwd_kernel(pn.nv, int(ow1 - ow0))(segs.data(), int(segs.size()), ow0 * as, as, f0, ldb,
                                                      yrow + ow0 * om.pix + f0, om.pix, pn.mask, init,
                                                      act == ACT_RELU);
                }
            }
            if (act == ACT_SIGMOID || act == ACT_TANH) epilogue(yrow, om.pix, OW, F, nullptr, act);
        }
    }
}


// y = act(conv(x, w) + b) for any geometry (pads may be negative: the backward-data call crops).
inline void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, int act,
                         float* y, const OutMap* out_map = nullptr) {
    const OutMap om = out_map ? *out_map : dense_out(g);
    Buf wcopy;
    i64 ldb;
    w = aligned_weights(g, w, wcopy, ldb);
#pragma omp parallel num_threads(omp_get_max_threads())
    forward_rows(g, x, w, ldb, bias, act, y, om);
}

// ---------------------------------------------------------------------------- backward-filter driver
// gy / gact: dz is then dL/dy of the activation whose output is gy (same shape); the chunk copy
// below forms act'(gy) · dz, so the derivative costs no pass of its own.
inline void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                                 const float* gy = nullptr, int gact = ACT_LINEAR) {
    const i64 C = g.in_c, F = g.filters, OW = g.out_w, OH = g.out_h, H = g.in_h, W = g.in_w;
    const i64 KH = g.k_h, KW = g.k_w, M = KH * KW * C;
    const i64 rows = g.batch * OH;
    const i64 xs = g.stride_w * C;
    const bool fused_kw = g.dil_w == 1;
    // Row groups of dw per kh: fused -> one group of KW*C rows; else KW groups of C rows.
    const i64 glen = fused_kw ? KW * C : C, ngrp = fused_kw ? 1 : KW;
    const int T = omp_get_max_threads();
    const i64 chunk = std::max<i64>(1, FILTER_CHUNK_PIXELS / std::max<i64>(1, OW));
    const i64 items = (rows + chunk - 1) / chunk;
    const i64 by_budget = std::max<i64>(1, PARTIAL_BUDGET_BYTES / (M * F * i64(sizeof(float))));
    const i64 P = std::max<i64>(1, std::min<i64>(items, std::max<i64>(T, std::min<i64>(GROUPS_PER_THREAD * T, by_budget))));
    // dz rows of a chunk are copied into an aligned buffer with row stride Fp (a multiple of 16):
    // NumPy arrays are 16-byte aligned, and split-line vector loads cost ~15% (see forward).
    const i64 Fp = (F + VL - 1) / VL * VL;
    Buf part(P * M * Fp);
    std::vector<double> dbpart(db ? size_t(P * F) : 0, 0.0);
#pragma omp parallel num_threads(T)
    {
        std::vector<const float*> xr(static_cast<size_t>(chunk)), dr(static_cast<size_t>(chunk));
        std::vector<i64> row_n(static_cast<size_t>(chunk)), row_ih(static_cast<size_t>(chunk)), row_t(static_cast<size_t>(chunk));
        std::vector<float> dsum(static_cast<size_t>(F));
        Buf dzc(chunk * OW * Fp);
#pragma omp for schedule(dynamic, 1)
        for (i64 grp = 0; grp < P; ++grp) {
            float* acc = part.data + grp * M * Fp;
            std::memset(acc, 0, M * Fp * sizeof(float));
            for (i64 it = grp * items / P; it < (grp + 1) * items / P; ++it) {
                const i64 t0 = it * chunk, t1 = std::min(rows, t0 + chunk);
                if (Fp == F) {
                    const i64 o = t0 * OW * F;
                    dact(dz + o, gy ? gy + o : nullptr, gact, dzc.data, (t1 - t0) * OW * F);
                } else {
                    for (i64 p = 0; p < (t1 - t0) * OW; ++p) {
                        const i64 o = (t0 * OW + p) * F;
                        dact(dz + o, gy ? gy + o : nullptr, gact, dzc.data + p * Fp, F);
                        std::memset(dzc.data + p * Fp + F, 0, (Fp - F) * sizeof(float));
                    }
                }
                for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                    const Panel pn = panel_at(f0, F);
                    const int Rm = max_rows(pn.nv);
                    for (i64 kh = 0; kh < KH; ++kh) {
                        // the chunk's rows whose tap row kh is inside the input
                        int nr = 0;
                        for (i64 t = t0; t < t1; ++t) {
                            const i64 n = t / OH, oh = t - n * OH;
                            const i64 ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
                            if (ih < 0 || ih >= H) continue;
                            row_n[nr] = n;
                            row_ih[nr] = ih;
                            row_t[nr] = t;
                            ++nr;
                        }
                        if (nr == 0) continue;
                        for (i64 gi = 0; gi < ngrp; ++gi) {
                            const i64 nb = (glen + Rm - 1) / Rm;
                            for (i64 bi = 0; bi < nb; ++bi) {
                                const i64 j0 = bi * glen / nb, j1 = (bi + 1) * glen / nb;
                                const int R = int(j1 - j0);
                                // taps of the block's first and last row: kw range
                                const i64 kwa = fused_kw ? j0 / C : gi, kwb = fused_kw ? (j1 - 1) / C : gi;
                                const i64 offa = kwa * g.dil_w - g.pad_left, offb = kwb * g.dil_w - g.pad_left;
                                // pixels with every row of the block inside: ow*s + offa >= 0, ow*s + offb < W
                                i64 ow_lo = offa >= 0 ? 0 : (-offa + g.stride_w - 1) / g.stride_w;
                                i64 ow_hi = W - 1 - offb < 0 ? 0 : (W - 1 - offb) / g.stride_w + 1;
                                ow_lo = std::min(ow_lo, OW);
                                ow_hi = std::max(ow_lo, std::min(ow_hi, OW));
                                // first dw row of the block and x offset of row j0 relative to column iw = ow*s - pl
                                const i64 m0 = fused_kw ? kh * KW * C + j0 : (kh * KW + gi) * C + j0;
                                const i64 xoff = fused_kw ? j0 : gi * g.dil_w * C + j0;  // + (ow*s - pl)*C
                                float* accb = acc + m0 * Fp + f0;
                                if (ow_hi > ow_lo) {
                                    for (int q = 0; q < nr; ++q) {
                                        const float* xrow = x + (row_n[q] * H + row_ih[q]) * W * C;
                                        xr[q] = xrow + (ow_lo * g.stride_w - g.pad_left) * C + xoff;
                                        dr[q] = dzc.data + ((row_t[q] - t0) * OW + ow_lo) * Fp + f0;
                                    }
                                    filt_kernel(pn.nv, R)(xr.data(), dr.data(), nr, ow_hi - ow_lo, xs, Fp, accb, Fp,
                                                          pn.mask);
                                }
                                if (ow_lo == 0 && ow_hi == OW) continue;
                                // edge pixels: add the terms of the rows whose tap is inside
                                const i64 cols = std::min<i64>(PANEL, F - f0);
                                for (int q = 0; q < nr; ++q) {
                                    const float* xrow = x + (row_n[q] * H + row_ih[q]) * W * C;
                                    for (i64 ow = 0; ow < OW; ++ow) {
                                        if (ow == ow_lo) ow = ow_hi;
                                        if (ow >= OW) break;
                                        const float* d = dzc.data + ((row_t[q] - t0) * OW + ow) * Fp + f0;
                                        for (int r = 0; r < R; ++r) {
                                            const i64 j = j0 + r;
                                            const i64 kw = fused_kw ? j / C : gi, c = fused_kw ? j - kw * C : j;
                                            const i64 iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
                                            if (iw < 0 || iw >= W) continue;
                                            const float xv = xrow[iw * C + c];
                                            float* a = accb + r * Fp;
#pragma omp simd
                                            for (i64 f = 0; f < cols; ++f) a[f] += xv * d[f];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                if (db) {  // Σ dz over the chunk (in cache), added in double to the group's partial
                    std::fill(dsum.begin(), dsum.end(), 0.f);
                    for (i64 t = t0; t < t1; ++t)
                        for (i64 ow = 0; ow < OW; ++ow) {
                            const float* d = dzc.data + ((t - t0) * OW + ow) * Fp;
#pragma omp simd
                            for (i64 f = 0; f < F; ++f) dsum[f] += d[f];
                        }
                    double* s = dbpart.data() + grp * F;
                    for (i64 f = 0; f < F; ++f) s[f] += dsum[f];
                }
            }
        }
        // dw = Σ_groups partial, in group order (deterministic)
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; ++m) {
            float* o = dw + m * F;
            std::memcpy(o, part.data + m * Fp, F * sizeof(float));
            for (i64 p = 1; p < P; ++p) {
                const float* s = part.data + (p * M + m) * Fp;
#pragma omp simd
                for (i64 f = 0; f < F; ++f) o[f] += s[f];
            }
        }
    }
    if (db) {
        for (i64 f = 0; f < F; ++f) {
            double s = 0;
            for (i64 p = 0; p < P; ++p) s += dbpart[size_t(p * F + f)];
            db[f] = float(s);
        }
    }
}

}  // namespace direct
}  // namespace cpu
}  // namespace dlconv

#endif  // __AVX512F__
