// cpu_dense_backward.h — v2_direct dense backward on the CPU (AVX-512; header-only, internal;
// used by cpu_dense.cpp, which falls back to the cpu_gemm.h drivers when this path declines).
//
// Computes, for y = act(x · w + b) with x[M, K], w[K, N], dy[M, N] and the forward output y:
//   dz[m, n] = dy[m, n] · act'(y[m, n])                 (act 0..3; softmax's dz comes from the caller)
//   dx[m, j] = Σ_n dz[m, n] · w[j, n]                   (dz · wᵀ)
//   dw[j, f] = Σ_m x[m, j] · dz[m, f]                   (xᵀ · dz)
//   db[f]    = Σ_m dz[m, f]                             (double sums)
// MNIST dense1: M = 128 (batch), K = 9216 (features), N = 128 (units): K >> M, N.
//
// Work split: K is cut into blocks of JB = 64 features j ∈ [j0, j0 + 64).  One block is one
// OpenMP work item and produces its 64 columns of dx *and* its 64 rows of dw; a block is owned by
// one thread, so there are no partial sums and no reduction across threads (deterministic for any
// thread count).  w and x are read from memory once, dx and dw written once; dz (64 KB for MNIST,
// L2-resident) is re-read by every block.  Nothing weights-sized is allocated.
//
// dz is formed once per call in two 64-byte aligned layouts (cheap: M·N floats):
//   dzr[m*Np + n]           row-major, Np = N rounded up to 16: the A operand of dx;
//   dzp[(p*M + m)*64 + c]   panel-major, 64-column panels p, zero-padded: the B operand of dw.
//   The panel-major copy keeps the 32 KB a dw tile streams contiguous (row-major with Np = 128
//   puts 256 B of every 512 B row into only half of the L1 sets, and it no longer fits L1).
//
// One register tile serves both products (gemm_tile<R, NV>): o[r, c] = Σ_k a[r*as + k] · b[k*64 + c],
//   R rows x NV·16 columns in R·NV zmm accumulators (R = 6, NV = 4: 24 accumulators + 4 B vectors
//   + 1 broadcast = 29 of 32 zmm).  Per k: 4 aligned loads of b, R broadcasts of a, R·NV FMAs
//   (24 FMAs = 12 cycles on two ports, 10 loads: FMA-bound).
// dx: a = dz rows (as = Np, k = n), b = the block's 64 rows of w transposed once into an aligned
//   N x 64 panel wᵀ[n, jj] (16 x 16 register transposes; 32 KB for N = 128, L1-resident);
//   output rows of dx[m, j0 .. j0+64).
// dw: a = the block's 64 columns of x transposed into an aligned 64 x Mp strip xᵀ[jj, m] (x rows
//   are 36 KB apart for MNIST, all in one L1 set: read them once, 16 rows at a time), k = m;
//   b = panel p of dzp (32 KB contiguous); output rows dw[j0+jj, p*64 .. p*64+64).
// Both tiles start from zero and store each output element exactly once, straight to dx / dw;
//   with non-temporal stores (when the destination rows are 64-byte aligned) because dx and dw
//   (4.7 MB each for MNIST) are never re-read by this call: no read-for-ownership traffic.
// Ragged edges: the last K block is narrower (panel columns past it are zero, the dx stores of
//   the last vector are masked); a ragged last N panel is masked (loads zero, stores masked); row
//   tiles of M and feature tiles of a block are balanced (ceil(len / R) tiles of near-equal size).
// Prefetch: blocks are handed out in grabs of BLOCKS_PER_GRAB consecutive blocks; during a block's
//   dx tiles its x columns are prefetched into L2 (the strip transpose reads them next), during
//   its dw tiles the next block's w rows (the panel transpose of the next block): the transposes'
//   loads from memory were not overlapped with FMAs (1 thread, MNIST: 6.6 -> 5.9 ms).
// Memory per call: the two dz copies + per thread one N x 64 panel and one 64 x Mp strip.
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_conv_direct.h"
#include "cpu_gemm.h"

namespace dlconv {
namespace cpu {
namespace dense_bwd {

using direct::max_rows;
using direct::Panel;
using direct::panel_at;
using direct::VL;

// Features per K block (= per work item): 64 = one 4-zmm panel of dx columns; the block's w rows
// (64·N floats) and x strip (64 x M) are 32 KB each for MNIST, so panel + strip fit L1/L2 and
// 9216 / 64 = 144 items balance two threads.
constexpr i64 JB = direct::PANEL;
constexpr int MAX_NV = direct::MAX_NV;
constexpr int MAX_R = direct::MAX_R;
// Most bytes of dz (both copies) the direct path keeps: every block re-reads all of dz, so it must
// stay in L2 (2 MB per core on the Xeons we target; MNIST: 2 x 64 KB).
constexpr i64 DZ_BUDGET_BYTES = i64(1) << 20;
// Consecutive K blocks per dynamic grab: the next block of a grab is known, so its inputs are
// prefetched during the current one (MNIST: 144 blocks, 36 grabs, 18 per thread to balance).
constexpr i64 BLOCKS_PER_GRAB = 4;
constexpr i64 CACHE_LINE = 64;
// Widest layer (N) taken: the per-block wᵀ panel is N x 64 floats (N = 1024: 256 KB, L2).
constexpr i64 MAX_N = 1024;

// ---------------------------------------------------------------------------- transpose
// In-register 16 x 16 transpose r[i][j] -> r[j][i]: unpack 32-bit pairs, unpack 64-bit pairs, then
// two rounds of 128-bit lane shuffles (64 shuffles per 256 floats).
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // per lane: a0 b0 a1 b1
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // per lane: a2 b2 a3 b3
    }
    for (int i = 0; i < 4; ++i) {  // afterwards r[4i+q], lane L = rows 4i..4i+3 of column 4L+q
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    __m512 o[16];
    for (int q = 0; q < 4; ++q) {  // column 4L+q = lane L of r[q], r[4+q], r[8+q], r[12+q]
        const __m512 a = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x88), b = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xDD);
        const __m512 c = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x88);
        const __m512 d = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xDD);
        o[q] = _mm512_shuffle_f32x4(a, c, 0x88);
        o[q + 4] = _mm512_shuffle_f32x4(b, d, 0x88);
        o[q + 8] = _mm512_shuffle_f32x4(a, c, 0xDD);
        o[q + 12] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = o[i];
}

// dst[n*ldd + i] = src[i*lds + n] for i < rows (<= 16), n < cols (<= 16); columns rows..15 of the
// written dst rows become zero, dst rows n >= cols are not touched.  dst must be 64-byte aligned.
static inline void transpose_block16(const float* src, i64 lds, int rows, int cols, float* dst, i64 ldd) {
    const __mmask16 cm = __mmask16((1u << cols) - 1u);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * lds) : _mm512_setzero_ps();
    transpose16(r);
    for (int i = 0; i < cols; ++i) _mm512_store_ps(dst + i * ldd, r[i]);
}

// ---------------------------------------------------------------------------- register tiles
// Store one accumulator: masked if it is the ragged last vector, else non-temporal if allowed.
static inline void put(float* p, __m512 v, bool last, __mmask16 m, bool stream) {
    if (last) _mm512_mask_storeu_ps(p, m, v);
    else if (stream) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
}

// o[r*ldo + c] = Σ_{k<kc} a[r*as + k] · b[k*JB + c]   for r < R, c < NV·16 (last vector masked by m).
template <int R, int NV>
static void gemm_tile(const float* __restrict a, i64 as, const float* __restrict b, i64 kc, float* __restrict o,
                      i64 ldo, __mmask16 m, bool stream) {
    __m512 c[R][NV];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
    for (i64 k = 0; k < kc; ++k) {
        __m512 bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + v * VL);
        b += JB;
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            const __m512 av = _mm512_set1_ps(a[r * as + k]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, bv[v], c[r][v]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) put(o + r * ldo + v * VL, c[r][v], v == NV - 1 && m != 0xFFFF, m, stream);
}

// Dispatch tables [NV-1][R-1]; R beyond max_rows(NV) maps to a valid (never used) kernel.
using TileFn = void (*)(const float*, i64, const float*, i64, float*, i64, __mmask16, bool);
template <int NV, int... Rs>
constexpr std::array<TileFn, MAX_R> tile_row(std::integer_sequence<int, Rs...>) {
    return {&gemm_tile<std::min(Rs + 1, max_rows(NV)), NV>...};
}
static inline TileFn tile_kernel(int nv, int r) {
    static constexpr std::array<std::array<TileFn, MAX_R>, MAX_NV> t = {
        tile_row<1>(std::make_integer_sequence<int, MAX_R>{}), tile_row<2>(std::make_integer_sequence<int, MAX_R>{}),
        tile_row<3>(std::make_integer_sequence<int, MAX_R>{}), tile_row<4>(std::make_integer_sequence<int, MAX_R>{})};
    return t[nv - 1][r - 1];
}
static inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// ---------------------------------------------------------------------------- driver
// The whole backward (see the header).  dact(dy_row, y_row, act, dz_row, N) forms one row of dz.
// Returns false (nothing written) when the shape is outside what this path is built for; the
// caller then runs the GEMM-engine fallback.
template <class DAct>
bool backward(i64 M, i64 K, i64 N, const float* x, const float* w, const float* dy, const float* y, int act,
              float* dx, float* dw, float* db, DAct&& dact) {
    const int T = omp_get_max_threads();
    const i64 Np = (N + VL - 1) / VL * VL;
    const i64 npan = (N + JB - 1) / JB;
    const i64 nkb = (K + JB - 1) / JB;
    const i64 Mp = (M + VL - 1) / VL * VL;  // row stride of the transposed x strip
    if (M <= 0 || N <= 0 || K <= 0 || N > MAX_N || nkb < T ||
        (M * Np + npan * M * JB) * i64(sizeof(float)) > DZ_BUDGET_BYTES)
        return false;
    Buf dzr(M * Np), dzp(npan * M * JB);
    // Non-temporal stores need 64-byte aligned rows: base aligned and a row stride of 16k floats.
    const bool stream_dx = dx && aligned64(dx) && K % VL == 0;
    const bool stream_dw = dw && aligned64(dw) && N % VL == 0;
    const i64 mtiles = (M + max_rows(MAX_NV) - 1) / max_rows(MAX_NV);
    const i64 nchunk = (nkb + BLOCKS_PER_GRAB - 1) / BLOCKS_PER_GRAB;
    // dz, its panel-major copy and db on the calling thread (M·N floats, microseconds): no barrier
    // inside the parallel region before the blocks, so a thread the OS has not scheduled yet does
    // not hold the other up (the blocks are handed out dynamically).
    for (i64 m = 0; m < M; ++m) {
        float* d = dzr.data + m * Np;
        dact(dy + m * N, y ? y + m * N : nullptr, act, d, N);
        std::memset(d + N, 0, (Np - N) * sizeof(float));
        for (i64 p = 0; p < npan; ++p) {
            float* q = dzp.data + (p * M + m) * JB;
            const i64 cols = std::min<i64>(JB, N - p * JB);
            std::memcpy(q, d + p * JB, cols * sizeof(float));
            std::memset(q + cols, 0, (JB - cols) * sizeof(float));
        }
    }
    if (db) {
        std::vector<double> s(size_t(N), 0.0);
        for (i64 m = 0; m < M; ++m) {
            const float* d = dzr.data + m * Np;
#pragma omp simd
            for (i64 n = 0; n < N; ++n) s[n] += d[n];
        }
        for (i64 n = 0; n < N; ++n) db[n] = float(s[n]);
    }
#pragma omp parallel num_threads(T)
    {
        Buf panel(dx ? N * JB : 0), strip(dw ? JB * Mp : 0);
        // Chunks of BLOCKS_PER_GRAB consecutive blocks handed out dynamically (36 grabs for MNIST:
        // a thread the OS preempts is helped by the other), so a thread knows its next block and
        // can prefetch it.
#pragma omp for schedule(dynamic, 1) nowait
        for (i64 ch = 0; ch < nchunk; ++ch) {
            const i64 kb_end = std::min<i64>(nkb, (ch + 1) * BLOCKS_PER_GRAB);
            for (i64 kb = ch * BLOCKS_PER_GRAB; kb < kb_end; ++kb) {
                const i64 j0 = kb * JB;
                const Panel pj = panel_at(j0, K);
                const int jw = int(std::min<i64>(JB, K - j0)), width = pj.nv * VL;
                // Next block's w rows (contiguous): prefetched into L2 during this block's tiles.
                const char* wnext = kb + 1 < kb_end ? reinterpret_cast<const char*>(w + (j0 + JB) * N) : nullptr;
                const i64 wbytes = wnext ? std::min<i64>(JB, K - j0 - JB) * N * i64(sizeof(float)) : 0;
                i64 wdone = 0;
                auto prefetch_w = [&](i64 upto) {  // prefetch the next block's w up to byte `upto`
                    for (; wdone < upto; wdone += CACHE_LINE) _mm_prefetch(wnext + wdone, _MM_HINT_T1);
                };
                if (dx) {
                    for (int jj = 0; jj < width; jj += VL)
                        for (i64 n0 = 0; n0 < N; n0 += VL)
                            transpose_block16(w + (j0 + jj) * N + n0, N, std::min(VL, jw - jj),
                                              int(std::min<i64>(VL, N - n0)), panel.data + n0 * JB + jj, JB);
                    for (i64 i = 0; i < mtiles; ++i) {
                        const i64 m0 = i * M / mtiles, m1 = (i + 1) * M / mtiles;
                        // This block's x columns, read by the strip transpose after these tiles.
                        if (dw)
                            for (i64 m = m0; m < m1; ++m)
                                for (int jj = 0; jj < jw; jj += VL) _mm_prefetch(reinterpret_cast<const char*>(x + m * K + j0 + jj), _MM_HINT_T1);
                        if (!dw) prefetch_w((i + 1) * wbytes / mtiles);
                        tile_kernel(pj.nv, int(m1 - m0))(dzr.data + m0 * Np, Np, panel.data, N, dx + m0 * K + j0, K,
                                                         pj.mask, stream_dx);
                    }
                }
                if (dw) {
                    for (int jj = 0; jj < jw; jj += VL)
                        for (i64 m0 = 0; m0 < M; m0 += VL)
                            transpose_block16(x + m0 * K + j0 + jj, K, int(std::min<i64>(VL, M - m0)),
                                              std::min(VL, jw - jj), strip.data + jj * Mp + m0, Mp);
                    for (i64 p = 0; p < npan; ++p) {
                        const Panel pf = panel_at(p * JB, N);
                        const i64 R = max_rows(pf.nv), jt = (jw + R - 1) / R;
                        for (i64 t = 0; t < jt; ++t) {
                            const i64 a = t * jw / jt, b = (t + 1) * jw / jt;
                            if (dx) prefetch_w((p * jt + t + 1) * wbytes / (npan * jt));
                            tile_kernel(pf.nv, int(b - a))(strip.data + a * Mp, Mp, dzp.data + p * M * JB, M,
                                                           dw + (j0 + a) * N + p * JB, N, pf.mask, stream_dw);
                        }
                    }
                }
            }
        }
        _mm_sfence();  // non-temporal stores visible before the caller (or another thread) reads
    }
    return true;
}

}  // namespace dense_bwd
}  // namespace cpu
}  // namespace dlconv

#endif  // __AVX512F__
