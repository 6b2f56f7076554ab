// cpu_conv_winograd.h — v3_winograd: 3x3, stride-1, dilation-1 convolution as Winograd
// F(2x2, 3x3) on AVX-512 (header-only, internal; cpu_conv.cpp picks it when applicable()).
//
// Math (Lavin & Gray 2016): a 2x2 output tile Y of one filter is A^T [ Σ_c (G g_c G^T) ⊙
// (B^T d_c B) ] A, where d_c is the 4x4 input patch of channel c, g_c the 3x3 filter and
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// So the 36 multiply-adds per (output 2x2 tile, c, f) of the direct form become 16: for each of
// the 16 transformed positions e, a GEMM  M_e[tile, f] = Σ_c V_e[tile, c] · U_e[c, f]  (2.25x
// fewer FLOPs; the transforms are additions only).  Rounding: the transforms add a few ulps
// (|G| entries ½, sums of <= 9 terms); results agree with the direct kernel to ~1e-6 relative.
//
// Index map: output tile (n, th, tw) covers y[n, 2th..2th+1, 2tw..2tw+1, :]; its input patch is
//   x[n, 2th − pad_top + (0..3), 2tw − pad_left + (0..3), :]  (zero outside the input).
// Work item (one OpenMP thread, dynamic, BLOCKS_PER_GRAB at a time): TILE_BLOCK consecutive
//   tiles t of the flattened grid, t = (n·th_n + th)·tw_n + tw (a block may straddle tile rows and
//   images), all F filters.  Per block: input transform (vectors over c) → V[16][TILE_BLOCK][Cp];
//   per 64-filter panel and per register tile of R tiles (R = 6 for 64 filters, 12 for <= 32):
//   the 16 GEMMs in one gemm16 call (A = V_e rows in place, B = U_e, K = C, accumulators from
//   zero) → M[16][R][64], then at once its output transform + bias + relu, stored with the ragged
//   bottom row / right column (odd OH, OW) and the F tail masked out; non-temporal stores when
//   y is 64-byte aligned and F % 16 == 0 (every store a whole line).
// Edges: a patch inside the input is read from one base pointer (row stride W·C, pixel stride
//   C); a patch across the padding gets one pointer per entry, entries outside the input point
//   at a zero pixel (Cp zero floats), so the transform itself never tests bounds.
// Backward-data runs this forward on dy; with gy / gact the patch loads apply the activation
//   derivative act'(gy) on the fly (the padding entries stay zero: 0 · act' = 0).
// Memory per call: U (16·C·Fp floats, 16/9 of the weights), the zero pixel, per thread V
//   (16·12·Cp) and M (16·12·64): never proportional to the batch.
// Non-finite values: the transforms subtract (d0 − d2, m1 − m2 − m3), so an ±Inf in x, w or dz
//   becomes Inf − Inf = NaN where the direct sum gives ±Inf.  Both entry points therefore watch
//   their results before the activation (one FMA per stored vector: acc += r · 0 is NaN from the
//   first ±Inf or NaN on and stays NaN) and return false when any was non-finite; the caller
//   then recomputes with the direct kernel (cpu_conv.cpp).  A non-finite input always reaches a
//   non-finite pre-activation result (every d, g and M entry has a ±1 or ½ coefficient in some
//   transformed entry), so finite data pay one FMA per output vector and non-finite data get the
//   direct kernel's (TensorFlow's) ±Inf / NaN.  Cheaper than an isfinite pass over x before
//   the call (that pass alone is ~2% of a one-thread conv2 forward, the watch is within noise),
//   and it also catches ±Inf / NaN in w and dz and overflow inside the transforms.
#pragma once

#if defined(__AVX512F__)

#include "cpu_act.h"
#include "cpu_conv_direct.h"

namespace dlconv {
namespace cpu {
namespace winograd {

using direct::PANEL;
using direct::VL;

// Output tiles per block (one work item) of the flattened (n, th, tw) tile grid: 12 = two 6-tile
// register tiles of the 6x64 block, or one 12-tile register tile of the 12x32 block (F <= 32,
// e.g. backward-data into 32 channels).  Blocks cross tile-row boundaries, so a 13-tile row (a
// 26-wide output) leaves no 1-tile remainder that would run the 1xNV block at a fraction of its
// speed.  V (16 x 12 x C floats: 24 KB at C = 32, 48 KB at C = 64) stays in L1/L2 for the GEMMs.
constexpr i64 TILE_BLOCK = 12;
// Blocks per dynamic grab: ~1800 blocks at batch 128 leave plenty to balance a preempted thread.
constexpr int BLOCKS_PER_GRAB = 2;
// Output stores bypass the caches (y is written once, 19 MB for conv2 at batch 128; a normal
// store would first read each line).  Used only when every store covers a whole 64-byte line.
constexpr bool STREAM_OUTPUT = true;
// Below these channel counts the transforms cost more than the GEMM FLOPs they save
// (conv1 of MNIST, C = 1): the direct kernel is used instead.
constexpr i64 MIN_IN_CHANNELS = 8;
constexpr i64 MIN_FILTERS = 16;

inline bool applicable(const ConvGeometry& g) {
    return g.k_h == 3 && g.k_w == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dil_h == 1 && g.dil_w == 1 &&
           g.in_c >= MIN_IN_CHANNELS && g.filters >= MIN_FILTERS;
}

// U[e][c][f] = (G g G^T)[e] for g = w[:, :, c, f]; f padded to Fp with zeros.  Called inside
// the caller's parallel region: the channels are shared out, the loop ends in a barrier.
inline void transform_weights(const ConvGeometry& g, const float* w, float* U, i64 Fp) {
    const i64 C = g.in_c, F = g.filters;
#pragma omp for schedule(static)
    for (i64 c = 0; c < C; ++c) {
        for (i64 f0 = 0; f0 < Fp; f0 += VL) {
            const __mmask16 m = F - f0 >= VL ? __mmask16(0xFFFF) : __mmask16((1u << (F - f0)) - 1u);
            __m512 k[3][3];
            for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j) k[i][j] = _mm512_maskz_loadu_ps(m, w + ((i * 3 + j) * C + c) * F + f0);
            const __m512 h = _mm512_set1_ps(0.5f);
            __m512 t[4][3];  // G g
            for (int j = 0; j < 3; ++j) {
                t[0][j] = k[0][j];
                const __m512 s = _mm512_mul_ps(h, _mm512_add_ps(k[0][j], k[2][j]));
                t[1][j] = _mm512_fmadd_ps(h, k[1][j], s);
                t[2][j] = _mm512_fnmadd_ps(h, k[1][j], s);
                t[3][j] = k[2][j];
            }
            for (int i = 0; i < 4; ++i) {  // (G g) G^T
                const __m512 s = _mm512_mul_ps(h, _mm512_add_ps(t[i][0], t[i][2]));
                const __m512 u[4] = {t[i][0], _mm512_fmadd_ps(h, t[i][1], s), _mm512_fnmadd_ps(h, t[i][1], s), t[i][2]};
                for (int j = 0; j < 4; ++j) _mm512_store_ps(U + ((i * 4 + j) * C + c) * Fp + f0, u[j]);
            }
        }
    }
}

// ---------------------------------------------------------------------------- 16 GEMMs
// The 16 GEMMs of one register tile in one call: for e < 16,
//   Mb[e·ms + r·PANEL + f] = Σ_{c < C} V[e·vs + r·Cp + c] · U[e·us + c·Fp + f0 + f],  r < R, f < NV·16
// on the R x NV·16 register block of cpu_conv_direct.h (R·NV <= 24 zmm accumulators, NV weight
// vectors, one broadcast).  One call instead of 16 fwd_tile calls: accumulators start from zero
// registers (no init loads), and no per-GEMM call/prologue (K = C is only 32..64 steps here).
template <int R, int NV>
static void gemm16(const float* __restrict V, i64 vs, i64 Cp, const float* __restrict U, i64 us, i64 Fp, i64 C,
                   float* __restrict Mb, i64 ms, __mmask16 m) {
    using direct::load_v;
    for (int e = 0; e < 16; ++e) {
        __m512 c[R][NV];
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
        const float* __restrict a = V + e * vs;
        const float* __restrict b = U + e * us;
        // unrolled 4 steps: loop overhead off the FMA ports (measured 4.1 -> 3.9 ms; 8: no better)
#pragma GCC unroll 4
        for (i64 k = 0; k < C; ++k) {
            __m512 bv[NV];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) bv[v] = load_v(b + v * VL, v == NV - 1, m);
            b += Fp;
#pragma GCC unroll 12
            for (int r = 0; r < R; ++r) {
                const __m512 av = _mm512_set1_ps(a[r * Cp + k]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, bv[v], c[r][v]);
            }
        }
        float* o = Mb + e * ms;
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) _mm512_store_ps(o + r * PANEL + v * VL, c[r][v]);
    }
}
using Gemm16Fn = void (*)(const float*, i64, i64, const float*, i64, i64, i64, float*, i64, __mmask16);
template <int NV, int... Rs>
constexpr std::array<Gemm16Fn, direct::MAX_R> gemm16_row(std::integer_sequence<int, Rs...>) {
    return {&gemm16<std::min(Rs + 1, direct::max_rows(NV)), NV>...};
}
static inline Gemm16Fn gemm16_kernel(int nv, int r) {
    using S = std::make_integer_sequence<int, direct::MAX_R>;
    static constexpr std::array<std::array<Gemm16Fn, direct::MAX_R>, direct::MAX_NV> t = {
        gemm16_row<1>(S{}), gemm16_row<2>(S{}), gemm16_row<3>(S{}), gemm16_row<4>(S{})};
    return t[nv - 1][r - 1];
}

// True when every stored value is finite before the activation (NaN-watch accumulator, per
// thread, of one vector; any unordered lane means a non-finite value was seen).
static inline bool all_finite(__m512 acc) { return _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q) == 0; }

// gy / gact (backward-data of an activated layer): x is then dL/dy of the activation whose output
// is gy (same shape as x), and the kernel reads x as act'(gy) · x while it loads the patches, so
// dL/dz is never written out.  gact = ACT_LINEAR (gy unused) for a plain forward.
// Returns false when a result was non-finite (y then holds Winograd's values: recompute).
inline bool conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, int act,
                         float* y, const float* gy = nullptr, int gact = ACT_LINEAR) {
    using direct::max_rows;
    using direct::Panel;
    using direct::panel_at;
    const i64 C = g.in_c, F = g.filters, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
    const i64 Cp = (C + VL - 1) / VL * VL, Fp = (F + VL - 1) / VL * VL;
    const i64 th_n = (OH + 1) / 2, tw_n = (OW + 1) / 2, tile_img = th_n * tw_n, tiles = g.batch * tile_img;
    const i64 blocks = (tiles + TILE_BLOCK - 1) / TILE_BLOCK;
    // Non-temporal output stores when every vector store covers one whole 64-byte line of y.
    const bool stream = STREAM_OUTPUT && (reinterpret_cast<uintptr_t>(y) & 63) == 0 && F % VL == 0 &&
                        (act == ACT_LINEAR || act == ACT_RELU);
    Buf U(16 * C * Fp), zrow(Cp);  // zrow: the zero "input pixel" every padding tap points at
    std::memset(zrow.data, 0, Cp * sizeof(float));
    const int T = omp_get_max_threads();
    bool finite = true;
#pragma omp parallel num_threads(T) reduction(&& : finite)
    {
        Buf V(16 * TILE_BLOCK * Cp), Mb(16 * TILE_BLOCK * PANEL);
        const __m512 zero = _mm512_setzero_ps();
        __m512 watch = zero;  // NaN once a non-finite pre-activation value was stored
        transform_weights(g, w, U.data, Fp);
#pragma omp for schedule(dynamic, BLOCKS_PER_GRAB)
        for (i64 blk = 0; blk < blocks; ++blk) {
            const i64 t0 = blk * TILE_BLOCK, nt = std::min(TILE_BLOCK, tiles - t0);
            // ---- input transform: V[e][i][c] = (B^T d B)[e], d = 4x4 patch of tile t0 + i
            for (i64 i = 0; i < nt; ++i) {
                const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n, tw = r0 - th * tw_n;
                const i64 ih0 = 2 * th - g.pad_top, iw0 = 2 * tw - g.pad_left;
                // Patch inside the input (most tiles): entry (r, s) at base + (r·W + s)·C, one pointer.
                // Across the padding: one pointer per entry, the zero pixel where it falls outside.
                const bool inside = ih0 >= 0 && ih0 + 4 <= H && iw0 >= 0 && iw0 + 4 <= W;
                const i64 off = ((n * H + ih0) * W + iw0) * C;  // may be negative: only added to
                const float* base = x + off;
                const float* src[4][4];
                const float* gsrc[4][4];  // gy at the same entries (the zero pixel stays zero: 0 · act' = 0)
                if (!inside)
                    for (int r = 0; r < 4; ++r)
                        for (int s = 0; s < 4; ++s) {
                            const i64 ih = ih0 + r, iw = iw0 + s;
                            const bool in = ih >= 0 && ih < H && iw >= 0 && iw < W;
                            src[r][s] = in ? base + (r * W + s) * C : zrow.data;
                            gsrc[r][s] = in && gact != ACT_LINEAR ? gy + off + (r * W + s) * C : zrow.data;
                        }
                for (i64 c0 = 0; c0 < C; c0 += VL) {
                    const __mmask16 m = C - c0 >= VL ? __mmask16(0xFFFF) : __mmask16((1u << (C - c0)) - 1u);
                    __m512 d[4][4];
                    if (inside) {
                        const float* p = base + c0;
                        for (int r = 0; r < 4; ++r)
                            for (int s = 0; s < 4; ++s) d[r][s] = _mm512_maskz_loadu_ps(m, p + (r * W + s) * C);
                        if (gact != ACT_LINEAR) {
                            const float* q = gy + off + c0;
                            for (int r = 0; r < 4; ++r)
                                for (int s = 0; s < 4; ++s)
                                    d[r][s] = act_grad(d[r][s], _mm512_maskz_loadu_ps(m, q + (r * W + s) * C), gact);
                        }
                    } else {
                        for (int r = 0; r < 4; ++r)
                            for (int s = 0; s < 4; ++s) d[r][s] = _mm512_maskz_loadu_ps(m, src[r][s] + c0);
                        if (gact != ACT_LINEAR)
                            for (int r = 0; r < 4; ++r)
                                for (int s = 0; s < 4; ++s)
                                    d[r][s] = act_grad(d[r][s], _mm512_maskz_loadu_ps(m, gsrc[r][s] + c0), gact);
                    }
                    __m512 t4[4][4];  // B^T d
                    for (int s = 0; s < 4; ++s) {
                        t4[0][s] = _mm512_sub_ps(d[0][s], d[2][s]);
                        t4[1][s] = _mm512_add_ps(d[1][s], d[2][s]);
                        t4[2][s] = _mm512_sub_ps(d[2][s], d[1][s]);
                        t4[3][s] = _mm512_sub_ps(d[1][s], d[3][s]);
                    }
                    float* v = V.data + i * Cp + c0;
                    const i64 es = TILE_BLOCK * Cp;  // stride between transformed positions e
                    for (int r = 0; r < 4; ++r) {  // (B^T d) B
                        _mm512_store_ps(v + (r * 4 + 0) * es, _mm512_sub_ps(t4[r][0], t4[r][2]));
                        _mm512_store_ps(v + (r * 4 + 1) * es, _mm512_add_ps(t4[r][1], t4[r][2]));
                        _mm512_store_ps(v + (r * 4 + 2) * es, _mm512_sub_ps(t4[r][2], t4[r][1]));
                        _mm512_store_ps(v + (r * 4 + 3) * es, _mm512_sub_ps(t4[r][1], t4[r][3]));
                    }
                }
            }
            for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                const Panel pn = panel_at(f0, F);
                const i64 Rm = max_rows(pn.nv), nrt = (nt + Rm - 1) / Rm;
                for (i64 q = 0; q < nrt; ++q) {  // register tile [i0, i1): its 16 GEMMs, then its outputs
                    const i64 i0 = q * nt / nrt, i1 = (q + 1) * nt / nrt;
                    // ---- 16 GEMMs: Mb[e][i][f] = Σ_c V[e][i][c] · U[e][c][f0 + f]
                    gemm16_kernel(pn.nv, int(i1 - i0))(V.data + i0 * Cp, TILE_BLOCK * Cp, Cp, U.data + f0, C * Fp, Fp,
                                                       C, Mb.data + i0 * PANEL, TILE_BLOCK * PANEL, pn.mask);
                    // ---- output transform: Y = A^T M A (+ bias, relu), ragged edges masked
                    for (i64 i = i0; i < i1; ++i) {
                        const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n;
                        const i64 oh0 = 2 * th, ow0 = 2 * (r0 - th * tw_n);
                        const i64 nrow = std::min<i64>(2, OH - oh0), ncol = std::min<i64>(2, OW - ow0);
                        float* yt = y + ((n * OH + oh0) * OW + ow0) * F + f0;
                        for (int v = 0; v < pn.nv; ++v) {
                            const __mmask16 m = v == pn.nv - 1 ? pn.mask : __mmask16(0xFFFF);
                            const float* mp = Mb.data + i * PANEL + v * VL;
                            __m512 mm[4][4];
                            for (int e = 0; e < 16; ++e) mm[e / 4][e % 4] = _mm512_load_ps(mp + e * TILE_BLOCK * PANEL);
                            __m512 t2[2][4];
                            for (int s = 0; s < 4; ++s) {
                                t2[0][s] = _mm512_add_ps(_mm512_add_ps(mm[0][s], mm[1][s]), mm[2][s]);
                                t2[1][s] = _mm512_sub_ps(_mm512_sub_ps(mm[1][s], mm[2][s]), mm[3][s]);
                            }
                            const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + f0 + v * VL) : _mm512_setzero_ps();
                            for (i64 a = 0; a < nrow; ++a) {
                                __m512 o[2] = {_mm512_add_ps(_mm512_add_ps(t2[a][0], t2[a][1]), _mm512_add_ps(t2[a][2], b)),
                                               _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(t2[a][1], t2[a][2]), t2[a][3]), b)};
                                float* yp = yt + a * OW * F + v * VL;
                                for (i64 s = 0; s < ncol; ++s) {
                                    watch = _mm512_fmadd_ps(o[s], zero, watch);
                                    // relu as TensorFlow: max(0, NaN) is NaN (the 2nd operand)
                                    const __m512 r = act == ACT_RELU ? _mm512_max_ps(zero, o[s]) : o[s];
                                    if (stream) _mm512_stream_ps(yp + s * F, r);
                                    else _mm512_mask_storeu_ps(yp + s * F, m, r);
                                }
                            }
                        }
                    }
                }
            }
            if (act == ACT_SIGMOID || act == ACT_TANH) {
                for (i64 i = 0; i < nt; ++i) {
                    const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n;
                    const i64 oh0 = 2 * th, ow0 = 2 * (r0 - th * tw_n);
                    for (i64 a = 0; a < std::min<i64>(2, OH - oh0); ++a)
                        epilogue(y + ((n * OH + oh0 + a) * OW + ow0) * F, F, std::min<i64>(2, OW - ow0), F, nullptr, act);
                }
            }
        }
        if (stream) _mm_sfence();  // non-temporal stores visible before the caller reads y
        finite = all_finite(watch);
    }
    return finite;
}

// ---------------------------------------------------------------------------- backward-filter
// dw (3x3 per (c, f)) = Σ_tiles G^T [ (B^T d B) ⊙ (A z A^T) ] G  — the transpose of the forward
// identity (y = A^T [(G g G^T) ⊙ (B^T d B)] A is linear in g), where z is the 2x2 tile of dz
// (zero past OH / OW) and d its 4x4 input patch:  A z A^T rows/cols  (z0, z0 + z1, z0 − z1, −z1).
//   M_e[c, f] = Σ_tiles V_e[tile, c] · Z_e[tile, f]: 16 GEMMs whose reduction runs over tiles,
//   on the R x 64 backward-filter register block of cpu_conv_direct.h (broadcast V, load Z rows).
// Work item: FILTER_TILES consecutive tiles of the flattened (n, th, tw) tile grid: V and Z of
//   the chunk (16 x 48 x Cp and 16 x 48 x Fp floats) are built once, then swept by the GEMMs.
// Threads: chunks are cut into P contiguous groups, handed out dynamically; a group owns an
//   M partial (16·C·Fp floats) and a db partial; partials are summed in group order
//   (deterministic for a given thread count), then dw = G^T M G per (c, 16 filters).
constexpr i64 FILTER_TILES = 48;  // tiles per chunk: 48-step reductions amortise the block's loads
constexpr int FILTER_GROUPS_PER_THREAD = 4;
constexpr i64 FILTER_PARTIAL_BUDGET = i64(8) << 20;

// gy / gact: dz is then dL/dy of the activation whose output is gy (same shape), read as
// act'(gy) · dz when the Z tiles are formed (db sums the same values).
// Returns false when a dw value was non-finite (dw, db then hold Winograd's values: recompute).
inline bool conv_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                                 const float* gy = nullptr, int gact = ACT_LINEAR) {
    using direct::filt_kernel;
    using direct::max_rows;
    using direct::Panel;
    using direct::panel_at;
    const i64 C = g.in_c, F = g.filters, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
    const i64 Cp = (C + VL - 1) / VL * VL, Fp = (F + VL - 1) / VL * VL;
    const i64 th_n = (OH + 1) / 2, tw_n = (OW + 1) / 2, tiles = g.batch * th_n * tw_n;
    const i64 chunks = (tiles + FILTER_TILES - 1) / FILTER_TILES;
    const int T = omp_get_max_threads();
    const i64 by_budget = std::max<i64>(1, FILTER_PARTIAL_BUDGET / (16 * C * Fp * i64(sizeof(float))));
    const i64 P = std::max<i64>(1, std::min<i64>(chunks, std::max<i64>(T, std::min<i64>(FILTER_GROUPS_PER_THREAD * T, by_budget))));
    Buf part(P * 16 * C * Fp);
    std::vector<double> dbpart(db ? size_t(P * Fp) : 0, 0.0);
    bool finite = true;
#pragma omp parallel num_threads(T) reduction(&& : finite)
    {
        Buf V(16 * FILTER_TILES * Cp), Z(16 * FILTER_TILES * Fp), dsum(Fp);
        const float* xr[1];
        const float* dr[1];
#pragma omp for schedule(dynamic, 1)
        for (i64 grp = 0; grp < P; ++grp) {
            float* Mg = part.data + grp * 16 * C * Fp;
            std::memset(Mg, 0, 16 * C * Fp * sizeof(float));
            std::memset(dsum.data, 0, Fp * sizeof(float));
            for (i64 ch = grp * chunks / P; ch < (grp + 1) * chunks / P; ++ch) {
                const i64 t0 = ch * FILTER_TILES, nt = std::min(FILTER_TILES, tiles - t0);
                for (i64 i = 0; i < nt; ++i) {
                    const i64 t = t0 + i, n = t / (th_n * tw_n), r0 = t - n * th_n * tw_n;
                    const i64 th = r0 / tw_n, tw = r0 - th * tw_n;
                    // ---- V: input transform of the 4x4 patch (zero outside the input)
                    const float* src[4][4];
                    for (int r = 0; r < 4; ++r)
                        for (int q = 0; q < 4; ++q) {
                            const i64 ih = 2 * th - g.pad_top + r, iw = 2 * tw - g.pad_left + q;
                            src[r][q] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x + ((n * H + ih) * W + iw) * C : nullptr;
                        }
                    const i64 es = FILTER_TILES * Cp;
                    for (i64 c0 = 0; c0 < C; c0 += VL) {
                        const __mmask16 m = C - c0 >= VL ? __mmask16(0xFFFF) : __mmask16((1u << (C - c0)) - 1u);
                        __m512 d[4][4];
                        for (int r = 0; r < 4; ++r)
                            for (int q = 0; q < 4; ++q)
                                d[r][q] = src[r][q] ? _mm512_maskz_loadu_ps(m, src[r][q] + c0) : _mm512_setzero_ps();
                        __m512 u[4][4];  // B^T d
                        for (int q = 0; q < 4; ++q) {
                            u[0][q] = _mm512_sub_ps(d[0][q], d[2][q]);
                            u[1][q] = _mm512_add_ps(d[1][q], d[2][q]);
                            u[2][q] = _mm512_sub_ps(d[2][q], d[1][q]);
                            u[3][q] = _mm512_sub_ps(d[1][q], d[3][q]);
                        }
                        float* v = V.data + i * Cp + c0;
                        for (int r = 0; r < 4; ++r) {
                            _mm512_store_ps(v + (r * 4 + 0) * es, _mm512_sub_ps(u[r][0], u[r][2]));
                            _mm512_store_ps(v + (r * 4 + 1) * es, _mm512_add_ps(u[r][1], u[r][2]));
                            _mm512_store_ps(v + (r * 4 + 2) * es, _mm512_sub_ps(u[r][2], u[r][1]));
                            _mm512_store_ps(v + (r * 4 + 3) * es, _mm512_sub_ps(u[r][1], u[r][3]));
                        }
                    }
                    // ---- Z: A z A^T of the 2x2 dz tile (zero past OH / OW); db += Σ z
                    i64 zo[2][2];  // element offsets of the tile's dz pixels, -1 past OH / OW
                    for (int a = 0; a < 2; ++a)
                        for (int b = 0; b < 2; ++b) {
                            const i64 oh = 2 * th + a, ow = 2 * tw + b;
                            zo[a][b] = (oh < OH && ow < OW) ? ((n * OH + oh) * OW + ow) * F : -1;
                        }
                    const i64 fs = FILTER_TILES * Fp;
                    for (i64 f0 = 0; f0 < F; f0 += VL) {
                        const __mmask16 m = F - f0 >= VL ? __mmask16(0xFFFF) : __mmask16((1u << (F - f0)) - 1u);
                        __m512 z[2][2];
                        for (int a = 0; a < 2; ++a)
                            for (int b = 0; b < 2; ++b) {
                                if (zo[a][b] < 0) {
                                    z[a][b] = _mm512_setzero_ps();
                                    continue;
                                }
                                z[a][b] = _mm512_maskz_loadu_ps(m, dz + zo[a][b] + f0);
                                if (gact != ACT_LINEAR)
                                    z[a][b] = act_grad(z[a][b], _mm512_maskz_loadu_ps(m, gy + zo[a][b] + f0), gact);
                            }
                        if (db) {
                            const __m512 s4 = _mm512_add_ps(_mm512_add_ps(z[0][0], z[0][1]), _mm512_add_ps(z[1][0], z[1][1]));
                            _mm512_store_ps(dsum.data + f0, _mm512_add_ps(_mm512_load_ps(dsum.data + f0), s4));
                        }
                        __m512 az[4][2];  // A z: rows z0, z0 + z1, z0 − z1, −z1
                        for (int b = 0; b < 2; ++b) {
                            az[0][b] = z[0][b];
                            az[1][b] = _mm512_add_ps(z[0][b], z[1][b]);
                            az[2][b] = _mm512_sub_ps(z[0][b], z[1][b]);
                            az[3][b] = _mm512_sub_ps(_mm512_setzero_ps(), z[1][b]);
                        }
                        float* zp = Z.data + i * Fp + f0;
                        for (int r = 0; r < 4; ++r) {  // (A z) A^T: columns likewise
                            _mm512_store_ps(zp + (r * 4 + 0) * fs, az[r][0]);
                            _mm512_store_ps(zp + (r * 4 + 1) * fs, _mm512_add_ps(az[r][0], az[r][1]));
                            _mm512_store_ps(zp + (r * 4 + 2) * fs, _mm512_sub_ps(az[r][0], az[r][1]));
                            _mm512_store_ps(zp + (r * 4 + 3) * fs, _mm512_sub_ps(_mm512_setzero_ps(), az[r][1]));
                        }
                    }
                }
                // ---- 16 GEMMs over the chunk's tiles: Mg[e][c][f] += Σ_i V[e][i][c] · Z[e][i][f]
                for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                    const Panel pn = panel_at(f0, F);
                    const i64 Rm = max_rows(pn.nv), nb = (C + Rm - 1) / Rm;
                    for (int e = 0; e < 16; ++e) {
                        dr[0] = Z.data + e * FILTER_TILES * Fp + f0;
                        for (i64 bi = 0; bi < nb; ++bi) {
                            const i64 c0 = bi * C / nb, c1 = (bi + 1) * C / nb;
                            xr[0] = V.data + e * FILTER_TILES * Cp + c0;
                            filt_kernel(pn.nv, int(c1 - c0))(xr, dr, 1, nt, Cp, Fp, Mg + (e * C + c0) * Fp + f0, Fp,
                                                             pn.mask);
                        }
                    }
                }
                if (db) {
                    double* sdb = dbpart.data() + grp * Fp;
                    for (i64 f = 0; f < F; ++f) sdb[f] += dsum.data[f];
                    std::memset(dsum.data, 0, Fp * sizeof(float));
                }
            }
        }
        // ---- dw = G^T (Σ_groups M) G, per (c, 16 filters); partials summed in group order
        const __m512 zero = _mm512_setzero_ps();
        __m512 watch = zero;  // NaN once a non-finite dw value was stored
#pragma omp for schedule(static)
        for (i64 c = 0; c < C; ++c) {
            for (i64 f0 = 0; f0 < F; f0 += VL) {
                const __mmask16 m = F - f0 >= VL ? __mmask16(0xFFFF) : __mmask16((1u << (F - f0)) - 1u);
                __m512 M[4][4];
                for (int e = 0; e < 16; ++e) {
                    __m512 acc = _mm512_load_ps(part.data + (e * C + c) * Fp + f0);
                    for (i64 p = 1; p < P; ++p)
                        acc = _mm512_add_ps(acc, _mm512_load_ps(part.data + ((p * 16 + e) * C + c) * Fp + f0));
                    M[e / 4][e % 4] = acc;
                }
                const __m512 h = _mm512_set1_ps(0.5f);
                __m512 t[3][4];  // G^T M: rows m0 + ½(m1 + m2),  ½(m1 − m2),  ½(m1 + m2) + m3
                for (int q = 0; q < 4; ++q) {
                    const __m512 s = _mm512_mul_ps(h, _mm512_add_ps(M[1][q], M[2][q]));
                    t[0][q] = _mm512_add_ps(M[0][q], s);
                    t[1][q] = _mm512_mul_ps(h, _mm512_sub_ps(M[1][q], M[2][q]));
                    t[2][q] = _mm512_add_ps(s, M[3][q]);
                }
                for (int kh = 0; kh < 3; ++kh) {  // (G^T M) G: columns likewise
                    const __m512 s = _mm512_mul_ps(h, _mm512_add_ps(t[kh][1], t[kh][2]));
                    const __m512 o[3] = {_mm512_add_ps(t[kh][0], s), _mm512_mul_ps(h, _mm512_sub_ps(t[kh][1], t[kh][2])),
                                         _mm512_add_ps(s, t[kh][3])};
                    for (int kw = 0; kw < 3; ++kw) {
                        watch = _mm512_mask3_fmadd_ps(o[kw], zero, watch, m);  // lanes past F keep theirs
                        _mm512_mask_storeu_ps(dw + ((kh * 3 + kw) * C + c) * F + f0, m, o[kw]);
                    }
                }
            }
        }
        finite = all_finite(watch);
    }
    if (db) {
        for (i64 f = 0; f < F; ++f) {
            double s = 0;
            for (i64 p = 0; p < P; ++p) s += dbpart[size_t(p * Fp + f)];
            db[f] = float(s);
        }
    }
    return finite;
}

}  // namespace winograd
}  // namespace cpu
}  // namespace dlconv

#endif  // __AVX512F__
