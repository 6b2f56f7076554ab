// cpu_conv_winograd.h — v3_winograd: 3x3 and 5x5, stride-1, dilation-1 convolution as Winograd
// F(4x4, 3x3), F(2x2, 3x3) and F(2x2, 5x5) on AVX-512 (header-only, internal; cpu_conv.cpp picks
// it when applicable()).  One templated body serves all three: the tile type T (Tiles<m, r>
// below) fixes the output tile m (4 or 2), the filter size r, the input tile α = m + r − 1 (4 or
// 6), the E = α² transformed positions and the transform matrices, all compile-time constants.
// 3x3 backward passes take F(4x4) or F(2x2) per geometry (tile_3x3 below: F(4x4) unless the
// output is so small that 4x4 tiles mostly compute past its edge); the 3x3 forward and 5x5 always
// F(2x2) (the forward: F(4x4) turns exact zeros into ~1e-8, which flips relu/max-pool ties).
//
// Math (Lavin & Gray 2016; Toom-Cook points as in Barabasz et al. 2020, "Error analysis and
// improving the accuracy of Winograd convolution for deep neural networks"): an m x m output tile Y
// of one filter is A^T [ Σ_c (G g_c G^T) ⊙ (B^T d_c B) ] A, d_c the α x α input patch of channel
// c, g_c the r x r filter.  For points p_0..p_{α−2} and ∞: A^T[i][j] = p_j^i (column ∞: e_{m−1}),
// G[j][k] = p_j^k / Π_{l≠j}(p_j − p_l) (row ∞: e_{r−1}), B^T the unique matrix that makes the
// identity exact (tests/test_cpu_winograd5.py derives all three with rationals and checks them).
//   F(2x2, 3x3), points 0, 1, −1, ∞:
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1],
//     A^T = [1 1 1 0; 0 1 -1 -1].
//   F(2x2, 5x5), points 0, 1, −1, 2, −½, ∞:
//     B^T = [1  3/2  -2  -3/2   1  0;      G = [    1      0      0      0      0;
//            0  -1  -5/2 -1/2   1  0;             -1/3   -1/3   -1/3   -1/3   -1/3;
//            0   1   1/2 -5/2   1  0;              1/3   -1/3    1/3   -1/3    1/3;
//            0 -1/2  -1   1/2   1  0;              1/15   2/15   4/15   8/15  16/15;
//            0   2   -1   -2    1  0;            -16/15   8/15  -4/15   2/15  -1/15;
//            0   1   3/2  -2  -3/2 1],                 0      0      0      0      1],
//     A^T = [1 1 1 1 1 0; 0 1 -1 2 -1/2 1].
//   F(4x4, 3x3), the same points (so the same B^T as F(2x2, 5x5)):
//     G = the first three columns of F(2x2, 5x5)'s G,
//     A^T = [1 1 1 1 1 0; 0 1 -1 2 -1/2 0; 0 1 1 4 1/4 0; 0 1 -1 8 -1/8 1].
//   B^T and A^T entries are small multiples of ½ (exact in float); the thirds and fifteenths sit
//   in G, so only the weight transform rounds them (once per call).
// So the r²·m² multiply-adds per (m x m output tile, c, f) of the direct form become E: for each
// of the E transformed positions e, a GEMM  M_e[tile, f] = Σ_c V_e[tile, c] · U_e[c, f]  (F(2x2,
// 3x3): 36 → 16, 2.25x fewer; F(4x4, 3x3): 144 → 36, 4x fewer; F(2x2, 5x5): 100 → 36, 2.78x
// fewer; the transforms are a few adds / FMAs per entry).  Measured (1 thread, load ~7) F(4x4)
// takes 0.66-0.85x F(2x2)'s time in every pass of MNIST conv2 and the ecal 3x3 shapes, not the
// 0.56x of the position count: its transforms (α = 6: 36 inputs, spilled) cost as much per tile
// as the GEMMs save, and the patch loads wait on memory (a software prefetch of the next
// block's patches, into L2 while the current block's outputs are stored, measured no faster).
// Where the time goes (2026-12-03, Intel Xeon, 2 threads, MNIST conv2 at batch 128, each stage
// switched off in turn): the F(2x2) forward 4.7 ms, of which the E GEMMs ~2.9-3.6 ms (~340
// GFLOP/s, 83% of the machine's NumPy-matmul roof), input transform ~0.9, output ~0.7; the
// F(4x4) backward-data 5.5 ms: GEMMs ~2.2, input transform ~2.4 (dy's 19 MB read through 6x6
// patches; padding the V and M strides against cache-set conflicts measured no faster).  The
// input transform then loaded all α² entries into a staging array before transforming; loading
// them column by column into the first stage (transform_patch) took a 6x6 patch of 64 channels
// from ~480-510 to ~380-430 ns (one thread, a microbenchmark of the same header), and MNIST
// conv2's backward-data from 8.1 to 6.5 ms in a tf.function (2 threads, a busier machine); the
// MNIST TF train step, builds alternated: dlconv 39.7 / 43.7 / 40.0 ms before, 36.4-37.6 after.
// Why F(2x2, 5x5) and not F(4x4, 5x5) (8x8 tiles, 2.25x fewer multiplies again): with points
// 0, ±1, ±2, ±½, ∞ its float32 error (the transforms simulated in NumPy over random patches,
// C = 64) is ~6x F(2x2, 5x5)'s, and its M (64 positions x 12 tiles x 64 filters, 196 KB) plus
// V no longer stay in L2 per thread.  Of the F(2x2, 5x5) point sets tried (0 ±1 ±2 / 0 ±1 ±½ /
// 0 ±1 2 ½ / 0 ±1 2 −½) 0, ±1, 2, −½ gave the smallest error (~2x below 0, ±1, ±2).
// F(4x4, 3x3)'s points were chosen the same way (float32 simulation, C = 64, worst error / max |y|):
// 0, ±1, 2, −½: 2.4e-6; 0, ±1, −2, ½: 3.0e-6; 0, ±1, ±2 (Lavin's): ~7e-6; 0, ±1, ±½: ~7e-6;
// F(2x2, 3x3): 0.3e-6 (tests/test_cpu_winograd43.py's docstring).
// Rounding: ‖B^T‖∞ = 7, ‖G‖∞ = 31/15, ‖A^T‖∞ = 5.5 for 5x5 (2, 1.5, 3 for F(2x2, 3x3); 7, 28/15,
// 11.125 for F(4x4, 3x3)) amplify the few roundings of each transform; the worst error relative to
// max |y| measured on the tests is ~1.4e-6 for F(2x2, 5x5) at C = 32 (the direct kernel: ~0.8e-6;
// F(2x2, 3x3): ~0.8e-6; F(4x4, 3x3): ~2.8e-6 (backward-data, C up to 64), below the layer tests'
// relative 1e-5 against the stock Keras layer).  tests/test_cpu_winograd5.py derives a componentwise
// bound from the matrices and checks it; tests/test_cpu_winograd43.py the same for both 3x3 tiles.
//
// Index map: output tile (n, th, tw) covers y[n, m·th..m·th+m−1, m·tw..m·tw+m−1, :]; its input
//   patch is x[n, m·th − pad_top + (0..α−1), m·tw − pad_left + (0..α−1), :]  (zero outside).
// Work item (one OpenMP thread, dynamic, BLOCKS_PER_GRAB at a time): TILE_BLOCK consecutive
//   tiles t of the flattened grid, t = (n·th_n + th)·tw_n + tw (a block may straddle tile rows and
//   images), all F filters.  Per block: input transform (vectors over c) → V[E][TILE_BLOCK][Cp];
//   per 64-filter panel and per register tile of R tiles (R = 6 for 64 filters, 12 for <= 32):
//   the E GEMMs in one gemm_e call (A = V_e rows in place, B = U_e, K = C, accumulators from
//   zero) → M[R][E][64] (a tile's E positions contiguous for its output transform), then at once
//   its output transform + bias + relu, stored with the ragged bottom rows / right columns (OH, OW
//   not multiples of m) and the F tail masked out; non-temporal stores when y is 64-byte aligned
//   and F % 16 == 0 (every store a whole line).
// Edges: a patch inside the input is read from one base pointer (row stride W·C, pixel stride
//   C); a patch across the padding gets one pointer per entry, entries outside the input point
//   at a zero pixel (Cp zero floats), so the transform itself never tests bounds.
// Backward-data runs this forward on dy; with gy / gact the patch loads apply the activation
//   derivative act'(gy) on the fly (the padding entries stay zero: 0 · act' = 0).
// Both backward passes of a relu conv whose output is 2x2 max pooled can instead read dy from the
//   pool's gradient and arg (PoolDz below): each dy value formed as it is loaded, never stored.
// Memory per call: U (E·C·Fp floats, E/r² of the weights), the zero pixel, per thread V
//   (E·12·Cp) and M (E·12·64; F(4x4) at C = 64: 110 KB each, inside the 1 MB L2 per core):
//   never proportional to the batch.
// Non-finite values: the transforms subtract (d0 − d2, m1 − m2 − m3), so an ±Inf in x, w or dz
//   becomes Inf − Inf = NaN where the direct sum gives ±Inf.  Both entry points therefore watch
//   their results before the activation (one FMA per stored vector: acc += r · 0 is NaN from the
//   first ±Inf or NaN on and stays NaN) and return false when any was non-finite; the caller
//   then recomputes with the direct kernel (cpu_conv.cpp).  A non-finite input always reaches a
//   non-finite pre-activation result (every column of B^T, G and A^T has a nonzero entry, so
//   every d, g and M entry reaches some transformed entry), so finite data pay one FMA per
//   output vector and non-finite data get the direct kernel's (TensorFlow's) ±Inf / NaN.
//   Cheaper than an isfinite pass over x before the call (that pass alone is ~2% of a one-thread
//   conv2 forward, the watch is within noise), and it also catches ±Inf / NaN in w and dz and
//   overflow inside the transforms.
#pragma once

#if defined(__AVX512F__)

#include <cstdlib>
#include <limits>

#include "cpu_act.h"
#include "cpu_conv_direct.h"
#include "cpu_pool.h"

namespace dlconv {
namespace cpu {
namespace winograd {

using direct::PANEL;
using direct::VL;

// ---------------------------------------------------------------------------- tile types
// F(m x m, r x r): the matrices of the header, row-major.
template <int M, int R>
struct Tiles;
template <>
struct Tiles<2, 3> {
    static constexpr int m = 2, r = 3, alpha = 4;
    static constexpr float BT[alpha][alpha] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
    static constexpr float G[alpha][r] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
    static constexpr float AT[m][alpha] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <>
struct Tiles<2, 5> {
    static constexpr int m = 2, r = 5, alpha = 6;
    static constexpr float BT[alpha][alpha] = {{1, 1.5f, -2, -1.5f, 1, 0},     {0, -1, -2.5f, -0.5f, 1, 0},
                                               {0, 1, 0.5f, -2.5f, 1, 0},      {0, -0.5f, -1, 0.5f, 1, 0},
                                               {0, 2, -1, -2, 1, 0},           {0, 1, 1.5f, -2, -1.5f, 1}};
    static constexpr float G[alpha][r] = {{1, 0, 0, 0, 0},
                                          {-1.f / 3, -1.f / 3, -1.f / 3, -1.f / 3, -1.f / 3},
                                          {1.f / 3, -1.f / 3, 1.f / 3, -1.f / 3, 1.f / 3},
                                          {1.f / 15, 2.f / 15, 4.f / 15, 8.f / 15, 16.f / 15},
                                          {-16.f / 15, 8.f / 15, -4.f / 15, 2.f / 15, -1.f / 15},
                                          {0, 0, 0, 0, 1}};
    static constexpr float AT[m][alpha] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -0.5f, 1}};
};
// F(4x4, 3x3), points 0, 1, −1, 2, −½, ∞ (the header's choice): B^T is F(2x2, 5x5)'s (same
// points, same α = 6); G is the first three columns of its G; A^T has rows p_j^0..p_j^3.
template <>
struct Tiles<4, 3> {
    static constexpr int m = 4, r = 3, alpha = 6;
    static constexpr float BT[alpha][alpha] = {{1, 1.5f, -2, -1.5f, 1, 0},     {0, -1, -2.5f, -0.5f, 1, 0},
                                               {0, 1, 0.5f, -2.5f, 1, 0},      {0, -0.5f, -1, 0.5f, 1, 0},
                                               {0, 2, -1, -2, 1, 0},           {0, 1, 1.5f, -2, -1.5f, 1}};
    static constexpr float G[alpha][r] = {{1, 0, 0},
                                          {-1.f / 3, -1.f / 3, -1.f / 3},
                                          {1.f / 3, -1.f / 3, 1.f / 3},
                                          {1.f / 15, 2.f / 15, 4.f / 15},
                                          {-16.f / 15, 8.f / 15, -4.f / 15},
                                          {0, 0, 1}};
    static constexpr float AT[m][alpha] = {{1, 1, 1, 1, 1, 0},
                                           {0, 1, -1, 2, -0.5f, 0},
                                           {0, 1, 1, 4, 0.25f, 0},
                                           {0, 1, -1, 8, -0.125f, 1}};
};
using F2x3 = Tiles<2, 3>;
using F4x3 = Tiles<4, 3>;
using F2x5 = Tiles<2, 5>;

// Matrix views with compile-time entries: at(i, j), rows x cols.
template <class T>
struct MatBT {
    static constexpr int rows = T::alpha, cols = T::alpha;
    static constexpr float at(int i, int j) { return T::BT[i][j]; }
};
template <class T>
struct MatG {
    static constexpr int rows = T::alpha, cols = T::r;
    static constexpr float at(int i, int j) { return T::G[i][j]; }
};
template <class T>
struct MatAT {
    static constexpr int rows = T::m, cols = T::alpha;
    static constexpr float at(int i, int j) { return T::AT[i][j]; }
};
template <class Mx>
struct Transposed {
    static constexpr int rows = Mx::cols, cols = Mx::rows;
    static constexpr float at(int i, int j) { return Mx::at(j, i); }
};

// ---------------------------------------------------------------------------- transforms
// Row o of Mx times a vector of cols zmm: the zero entries vanish at compile time, ±1 entries are
// adds / subtracts, others one FMA with a broadcast constant.  The sum starts at the first +1
// entry (else the first nonzero one), so d2 − d1 costs one subtract, not a negate and an add.
template <class Mx, int o>
constexpr int lead_term() {
    for (int j = 0; j < Mx::cols; ++j)
        if (Mx::at(o, j) == 1.0f) return j;
    for (int j = 0; j < Mx::cols; ++j)
        if (Mx::at(o, j) != 0.0f) return j;
    return -1;
}
template <class Mx, int o, int j>
static inline __m512 add_term(__m512 acc, __m512 v) {
    constexpr float c = Mx::at(o, j);
    if constexpr (j == lead_term<Mx, o>() || c == 0.0f) return acc;
    else if constexpr (c == 1.0f) return _mm512_add_ps(acc, v);
    else if constexpr (c == -1.0f) return _mm512_sub_ps(acc, v);
    else return _mm512_fmadd_ps(_mm512_set1_ps(c), v, acc);
}
template <class Mx, int o, int... j>
static inline __m512 row_dot(const __m512* in, int is, std::integer_sequence<int, j...>) {
    constexpr int s = lead_term<Mx, o>();
    static_assert(s >= 0, "a transform matrix row is all zeros");
    __m512 acc = Mx::at(o, s) == 1.0f ? in[s * is] : _mm512_mul_ps(_mm512_set1_ps(Mx::at(o, s)), in[s * is]);
    ((acc = add_term<Mx, o, j>(acc, in[j * is])), ...);
    return acc;
}
template <class Mx, int... o>
static inline void apply_rows(const __m512* in, int is, __m512* out, int os, std::integer_sequence<int, o...>) {
    ((out[o * os] = row_dot<Mx, o>(in, is, std::make_integer_sequence<int, Mx::cols>{})), ...);
}
// out (rows x rows, row-major) = Mx · in · Mx^T for in (cols x cols, row-major).
template <class Mx>
static inline void transform2(const __m512* in, __m512* out) {
    constexpr int R = Mx::rows, C = Mx::cols;
    __m512 t[R * C];  // Mx · in
    for (int s = 0; s < C; ++s) apply_rows<Mx>(in + s, C, t + s, C, std::make_integer_sequence<int, R>{});
    for (int r = 0; r < R; ++r) apply_rows<Mx>(t + r * C, 1, out + r * R, 1, std::make_integer_sequence<int, R>{});
}

// Output tiles per block (one work item) of the flattened (n, th, tw) tile grid: 12 = two 6-tile
// register tiles of the 6x64 block, or one 12-tile register tile of the 12x32 block (F <= 32,
// e.g. backward-data into 32 channels).  Blocks cross tile-row boundaries, so a 13-tile row (a
// 26-wide output) leaves no 1-tile remainder that would run the 1xNV block at a fraction of its
// speed.  V (E x 12 x C floats: 24 KB at 3x3, C = 32; 54 KB at 5x5, C = 32) stays in L1/L2.
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

// The kernel sizes with a tile type (square, stride 1, undilated).
inline bool tile_kernel(const ConvGeometry& g) {
    return g.k_h == g.k_w && (g.k_h == F2x3::r || g.k_h == F2x5::r) && g.stride_h == 1 && g.stride_w == 1 &&
           g.dil_h == 1 && g.dil_w == 1;
}
inline bool applicable(const ConvGeometry& g) {
    return tile_kernel(g) && g.in_c >= MIN_IN_CHANNELS && g.filters >= MIN_FILTERS;
}

static inline __mmask16 tail_mask(i64 left) {
    return left >= VL ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// U[e][c][f] = (G g G^T)[e] for g = w[:, :, c, f]; f padded to Fp with zeros.  Called inside
// the caller's parallel region: the channels are shared out, the loop ends in a barrier.
template <class T>
inline void transform_weights(const ConvGeometry& g, const float* w, float* U, i64 Fp) {
    constexpr int r = T::r, E = T::alpha * T::alpha;
    const i64 C = g.in_c, F = g.filters;
#pragma omp for schedule(static)
    for (i64 c = 0; c < C; ++c) {
        for (i64 f0 = 0; f0 < Fp; f0 += VL) {
            const __mmask16 m = tail_mask(F - f0);
            __m512 k[r * r], u[E];
            for (int i = 0; i < r * r; ++i) k[i] = _mm512_maskz_loadu_ps(m, w + (i * C + c) * F + f0);
            transform2<MatG<T>>(k, u);
            for (int e = 0; e < E; ++e) _mm512_store_ps(U + (e * C + c) * Fp + f0, u[e]);
        }
    }
}

// dz of a relu conv read from the gradient of its output's 2x2 stride-2 valid max pool, never
// formed: dz[n, oh, ow, f] = gp[n, oh/2, ow/2, f] where arg there (cpu_pool.h's uint8 local arg)
// equals the tap (oh % 2)·2 + ow % 2, else 0; 0 past 2·PH / 2·PW (pixels in no window).  A set
// LOCAL_NOT_POSITIVE bit (the member was not > 0: relu' = 0) matches no tap.  Exactly the dz
// that max_pool2d_backward_local(relu = true) writes, so every result is bit-identical to that
// gather followed by the linear pass.  arg must hold at least C bytes (N·PH·PW >= 1): pixels in
// no window read arg's first pixel with tap -1, which matches nothing.
struct PoolDz {
    const float* gp;     // [N, PH, PW, C] float32, dL/d(pool output)
    const uint8_t* arg;  // [N, PH, PW, C] uint8
    i64 PH, PW;
    // The source of pixel (n, h, w) of dz ([N, 2·PH (+1), 2·PW (+1), C]).
    void at(i64 n, i64 h, i64 w, i64 C, const float** p, const uint8_t** a, int* tap) const {
        if (h < 2 * PH && w < 2 * PW) {
            const i64 off = ((n * PH + h / 2) * PW + w / 2) * C;
            *p = gp + off, *a = arg + off, *tap = int((h & 1) * 2 + (w & 1));
        } else {
            *p = gp, *a = arg, *tap = -1;
        }
    }
};
// 16 channels of one dz pixel from its PoolDz source: a masked load of gp where arg == tap
// (lanes past `left` channels neither compared nor loaded; their arg bytes are not read).
static inline __m512 pool_dz_load(const float* p, const uint8_t* a, int tap, i64 left, __mmask16 m) {
    __m128i ab;
    if (left >= VL) {
        ab = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
    } else {  // the channel tail: the 16-byte load could run past arg's end
        alignas(16) uint8_t tb[16] = {};
        std::memcpy(tb, a, size_t(left));
        ab = _mm_load_si128(reinterpret_cast<const __m128i*>(tb));
    }
    const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(m, _mm512_cvtepu8_epi32(ab), _mm512_set1_epi32(tap));
    return _mm512_maskz_loadu_ps(hit, p);
}

// V[e·es + c] = (B^T d B)[e] for the α x α patch d, all C channels, entry (r, s) of d given by
// load(r·α + s, c0, mask) (16 channels from c0; transform_patch below says where from).
template <class T, class Load>
static inline void transform_patch_of(i64 C, const Load& load, float* v, i64 es) {
    constexpr int a = T::alpha, E = a * a;
    using Rows = std::make_integer_sequence<int, a>;
    for (i64 c0 = 0; c0 < C; c0 += VL) {
        const __mmask16 m = tail_mask(C - c0);
        // B^T d B as transform2 computes it, the patch loaded column by column into the first
        // stage (t = B^T d) and each row of the second stored as it is formed: no staging copy
        // of d (measured ~15% faster per patch than loading all 36 entries first, F(4x4), C = 64).
        __m512 t[E];
#pragma GCC unroll 6
        for (int sc = 0; sc < a; ++sc) {
            __m512 col[a];
#pragma GCC unroll 6
            for (int r = 0; r < a; ++r) col[r] = load(r * a + sc, c0, m);
            apply_rows<MatBT<T>>(col, 1, t + sc, a, Rows{});
        }
#pragma GCC unroll 6
        for (int r = 0; r < a; ++r) {
            __m512 o[a];
            apply_rows<MatBT<T>>(t + r * a, 1, o, 1, Rows{});
#pragma GCC unroll 6
            for (int sc = 0; sc < a; ++sc) _mm512_store_ps(v + (r * a + sc) * es + c0, o[sc]);
        }
    }
}

// transform_patch_of for the α x α patch at input (n, ih0.., iw0..); entries outside the input
// are zero.  With gact != linear x is dL/dy and gy the activation's output: d = act'(gy) · x
// (the zero entries stay zero).  With pd (backward-data of a relu conv whose output is max
// pooled) x is unused and d is read from the pool's gradient (PoolDz).  zpix: Cp zero floats.
template <class T>
static inline void transform_patch(const ConvGeometry& g, const float* x, const float* gy, int gact,
                                   const float* zpix, i64 n, i64 ih0, i64 iw0, float* v, i64 es,
                                   const PoolDz* pd = nullptr) {
    constexpr int a = T::alpha, E = a * a;
    const i64 C = g.in_c, H = g.in_h, W = g.in_w;
    // Patch inside the input (most tiles): entry (r, s) at base + (r·W + s)·C, one pointer.
    // Across the padding: one pointer per entry, the zero pixel where it falls outside.
    const bool inside = ih0 >= 0 && ih0 + a <= H && iw0 >= 0 && iw0 + a <= W;
    if (pd) {
        const float* src[E];
        const uint8_t* asrc[E];
        int tap[E];
        for (int r = 0; r < a; ++r)
            for (int s = 0; s < a; ++s) {
                const i64 ih = ih0 + r, iw = iw0 + s, e = r * a + s;
                if (inside || (ih >= 0 && ih < H && iw >= 0 && iw < W)) pd->at(n, ih, iw, C, &src[e], &asrc[e], &tap[e]);
                else src[e] = pd->gp, asrc[e] = pd->arg, tap[e] = -1;
            }
        transform_patch_of<T>(C, [&](int e, i64 c0, __mmask16 m) {
            return pool_dz_load(src[e] + c0, asrc[e] + c0, tap[e], C - c0, m);
        }, v, es);
        return;
    }
    const i64 off = ((n * H + ih0) * W + iw0) * C;  // may be negative: only added to
    const float* src[E];
    const float* gsrc[E];  // gy at the same entries (the zero pixel stays zero: 0 · act' = 0)
    for (int r = 0; r < a; ++r)
        for (int s = 0; s < a; ++s) {
            const i64 ih = ih0 + r, iw = iw0 + s;
            const bool in = inside || (ih >= 0 && ih < H && iw >= 0 && iw < W);
            src[r * a + s] = in ? x + off + (r * W + s) * C : zpix;
            gsrc[r * a + s] = in && gact != ACT_LINEAR ? gy + off + (r * W + s) * C : zpix;
        }
    if (gact == ACT_LINEAR) {
        transform_patch_of<T>(C, [&](int e, i64 c0, __mmask16 m) { return _mm512_maskz_loadu_ps(m, src[e] + c0); },
                              v, es);
        return;
    }
    transform_patch_of<T>(C, [&](int e, i64 c0, __mmask16 m) {
        return act_grad(_mm512_maskz_loadu_ps(m, src[e] + c0), _mm512_maskz_loadu_ps(m, gsrc[e] + c0), gact);
    }, v, es);
}

// ---------------------------------------------------------------------------- E GEMMs
// The E GEMMs of one register tile in one call: for e < E,
//   Mb[e·ms + r·rs + f] = Σ_{c < C} V[e·vs + r·Cp + c] · U[e·us + c·Fp + f0 + f],  r < R, f < NV·16
// on the R x NV·16 register block of cpu_conv_direct.h (R·NV <= 24 zmm accumulators, NV weight
// vectors, one broadcast).  One call instead of E fwd_tile calls: accumulators start from zero
// registers (no init loads), and no per-GEMM call/prologue (K = C is only 32..64 steps here).
template <int E, int R, int NV>
static void gemm_e(const float* __restrict V, i64 vs, i64 Cp, const float* __restrict U, i64 us, i64 Fp, i64 C,
                   float* __restrict Mb, i64 ms, i64 rs, __mmask16 m) {
    using direct::load_v;
    for (int e = 0; e < E; ++e) {
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
            for (int v = 0; v < NV; ++v) _mm512_store_ps(o + r * rs + v * VL, c[r][v]);
    }
}
using GemmEFn = void (*)(const float*, i64, i64, const float*, i64, i64, i64, float*, i64, i64, __mmask16);
template <int E, int NV, int... Rs>
constexpr std::array<GemmEFn, direct::MAX_R> gemm_e_row(std::integer_sequence<int, Rs...>) {
    return {&gemm_e<E, std::min(Rs + 1, direct::max_rows(NV)), NV>...};
}
template <int E>
static inline GemmEFn gemm_e_kernel(int nv, int r) {
    using S = std::make_integer_sequence<int, direct::MAX_R>;
    static constexpr std::array<std::array<GemmEFn, direct::MAX_R>, direct::MAX_NV> t = {
        gemm_e_row<E, 1>(S{}), gemm_e_row<E, 2>(S{}), gemm_e_row<E, 3>(S{}), gemm_e_row<E, 4>(S{})};
    return t[nv - 1][r - 1];
}

// True when every stored value is finite before the activation (NaN-watch accumulator, per
// thread, of one vector; any unordered lane means a non-finite value was seen).
static inline bool all_finite(__m512 acc) { return _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q) == 0; }

// gy / gact (backward-data of an activated layer): x is then dL/dy of the activation whose output
// is gy (same shape as x), and the kernel reads x as act'(gy) · x while it loads the patches, so
// dL/dz is never written out.  gact = ACT_LINEAR (gy unused) for a plain forward.
// Returns false when a result was non-finite (y then holds Winograd's values: recompute).
// pool_y / pool_arg (F(2x2) with relu only; y is then not written): the 2x2 stride-2 valid max
// pool of the relu'd output instead, each 2x2 output tile being one pool window — pool_y
// [N, OH/2, OW/2, F] and pool_arg the window tap (+ LOCAL_NOT_POSITIVE), by cpu_pool.h's rules
// (max_pool2d_forward_local: first member, then a strictly greater one; the max skips NaN).
// Tiles past an odd OH / OW are in no window: they only feed the non-finite watch.
template <class T>
inline bool conv_forward_tiles(const ConvGeometry& g, const float* x, const float* w, const float* bias, int act,
                               float* y, const float* gy, int gact, float* pool_y = nullptr,
                               uint8_t* pool_arg = nullptr, const PoolDz* pd = nullptr) {
    using direct::max_rows;
    using direct::Panel;
    using direct::panel_at;
    constexpr int m = T::m, E = T::alpha * T::alpha;
    const i64 C = g.in_c, F = g.filters, OH = g.out_h, OW = g.out_w;
    const i64 Cp = (C + VL - 1) / VL * VL, Fp = (F + VL - 1) / VL * VL;
    const i64 th_n = (OH + m - 1) / m, tw_n = (OW + m - 1) / m, tile_img = th_n * tw_n, tiles = g.batch * tile_img;
    const i64 blocks = (tiles + TILE_BLOCK - 1) / TILE_BLOCK;
    // Non-temporal output stores when every vector store covers one whole 64-byte line of y.
    const bool stream = STREAM_OUTPUT && (reinterpret_cast<uintptr_t>(y) & 63) == 0 && F % VL == 0 &&
                        (act == ACT_LINEAR || act == ACT_RELU) && !pool_y;
    const i64 PH = OH / 2, PW = OW / 2;  // pool_y's height and width
    Buf U(E * C * Fp), zrow(Cp);  // zrow: the zero "input pixel" every padding tap points at
    std::memset(zrow.data, 0, Cp * sizeof(float));
    const int nthreads = omp_get_max_threads();
    bool finite = true;
#pragma omp parallel num_threads(nthreads) reduction(&& : finite)
    {
        Buf V(E * TILE_BLOCK * Cp), Mb(E * TILE_BLOCK * PANEL);
        const __m512 zero = _mm512_setzero_ps();
        __m512 watch = zero;  // NaN once a non-finite pre-activation value was stored
        transform_weights<T>(g, w, U.data, Fp);
#pragma omp for schedule(dynamic, BLOCKS_PER_GRAB)
        for (i64 blk = 0; blk < blocks; ++blk) {
            const i64 t0 = blk * TILE_BLOCK, nt = std::min(TILE_BLOCK, tiles - t0);
            // ---- input transform: V[e][i][c] = (B^T d B)[e], d = α x α patch of tile t0 + i
            for (i64 i = 0; i < nt; ++i) {
                const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n, tw = r0 - th * tw_n;
                transform_patch<T>(g, x, gy, gact, zrow.data, n, m * th - g.pad_top, m * tw - g.pad_left,
                                   V.data + i * Cp, TILE_BLOCK * Cp, pd);
            }
            for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                const Panel pn = panel_at(f0, F);
                const i64 Rm = max_rows(pn.nv), nrt = (nt + Rm - 1) / Rm;
                for (i64 q = 0; q < nrt; ++q) {  // register tiles of near-equal size; then its outputs
                    const i64 i0 = q * nt / nrt, i1 = (q + 1) * nt / nrt;
                    // ---- E GEMMs: Mb[i][e][f] = Σ_c V[e][i][c] · U[e][c][f0 + f]
                    gemm_e_kernel<E>(pn.nv, int(i1 - i0))(V.data + i0 * Cp, TILE_BLOCK * Cp, Cp, U.data + f0, C * Fp,
                                                          Fp, C, Mb.data + i0 * E * PANEL, PANEL, E * PANEL, pn.mask);
                    // ---- output transform: Y = A^T M A (+ bias, relu), ragged edges masked
                    for (i64 i = i0; i < i1; ++i) {
                        const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n;
                        const i64 oh0 = m * th, ow0 = m * (r0 - th * tw_n);
                        const i64 nrow = std::min<i64>(m, OH - oh0), ncol = std::min<i64>(m, OW - ow0);
                        float* yt = y + ((n * OH + oh0) * OW + ow0) * F + f0;
                        for (int v = 0; v < pn.nv; ++v) {
                            const __mmask16 mk = v == pn.nv - 1 ? pn.mask : __mmask16(0xFFFF);
                            const float* mp = Mb.data + i * E * PANEL + v * VL;
                            __m512 mm[E], o[m * m];
                            for (int e = 0; e < E; ++e) mm[e] = _mm512_load_ps(mp + e * PANEL);
                            transform2<MatAT<T>>(mm, o);
                            const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + f0 + v * VL) : zero;
                            if constexpr (m == 2) {
                                if (pool_y) {
                                    __m512 rl[4];
                                    for (int k = 0; k < 4; ++k) {
                                        const __m512 z = _mm512_add_ps(o[k], b);
                                        if ((k >> 1) < nrow && (k & 1) < ncol) watch = _mm512_fmadd_ps(z, zero, watch);
                                        rl[k] = _mm512_max_ps(zero, z);  // relu as TensorFlow (NaN stays)
                                    }
                                    if (nrow < 2 || ncol < 2) continue;  // past an odd OH / OW: no window
                                    __m512 cur = rl[0], ymax = _mm512_max_ps(rl[0], _mm512_set1_ps(std::numeric_limits<float>::lowest()));
                                    __m512i idx = _mm512_setzero_si512();
                                    for (int k = 1; k < 4; ++k) {
                                        const __mmask16 gt = _mm512_cmp_ps_mask(rl[k], cur, _CMP_GT_OQ);
                                        cur = _mm512_mask_mov_ps(cur, gt, rl[k]);
                                        idx = _mm512_mask_mov_epi32(idx, gt, _mm512_set1_epi32(k));
                                        ymax = _mm512_max_ps(rl[k], ymax);  // a NaN member is skipped
                                    }
                                    const __mmask16 not_pos = _mm512_cmp_ps_mask(cur, zero, _CMP_NGT_UQ);
                                    idx = _mm512_mask_or_epi32(idx, not_pos, idx, _mm512_set1_epi32(LOCAL_NOT_POSITIVE));
                                    const i64 po = ((n * PH + oh0 / 2) * PW + ow0 / 2) * F + f0 + v * VL;
                                    _mm512_mask_storeu_ps(pool_y + po, mk, ymax);
                                    const __m128i ab = _mm512_cvtepi32_epi8(idx);
                                    if (mk == __mmask16(0xFFFF)) {
                                        _mm_storeu_si128(reinterpret_cast<__m128i*>(pool_arg + po), ab);
                                    } else {  // the F tail (a masked byte store needs AVX-512 BW)
                                        alignas(16) uint8_t tb[16];
                                        _mm_store_si128(reinterpret_cast<__m128i*>(tb), ab);
                                        for (int l = 0; l < 16 && ((mk >> l) & 1); ++l) pool_arg[po + l] = tb[l];
                                    }
                                    continue;
                                }
                            }
                            for (i64 a = 0; a < nrow; ++a) {
                                float* yp = yt + a * OW * F + v * VL;
                                for (i64 s = 0; s < ncol; ++s) {
                                    const __m512 z = _mm512_add_ps(o[a * m + s], b);
                                    watch = _mm512_fmadd_ps(z, zero, watch);
                                    // relu as TensorFlow: max(0, NaN) is NaN (the 2nd operand)
                                    const __m512 r = act == ACT_RELU ? _mm512_max_ps(zero, z) : z;
                                    if (stream) _mm512_stream_ps(yp + s * F, r);
                                    else _mm512_mask_storeu_ps(yp + s * F, mk, r);
                                }
                            }
                        }
                    }
                }
            }
            if (act == ACT_SIGMOID || act == ACT_TANH) {
                for (i64 i = 0; i < nt; ++i) {
                    const i64 t = t0 + i, n = t / tile_img, r0 = t - n * tile_img, th = r0 / tw_n;
                    const i64 oh0 = m * th, ow0 = m * (r0 - th * tw_n);
                    for (i64 a = 0; a < std::min<i64>(m, OH - oh0); ++a)
                        epilogue(y + ((n * OH + oh0 + a) * OW + ow0) * F, F, std::min<i64>(m, OW - ow0), F, nullptr, act);
                }
            }
        }
        if (stream) _mm_sfence();  // non-temporal stores visible before the caller reads y
        finite = all_finite(watch);
    }
    return finite;
}

// ---------------------------------------------------------------------------- 3x3 tile choice
// Output tile of a 3x3 pass: 4 (F(4x4, 3x3)) or 2 (F(2x2, 3x3)).  TILE_ENV ("2" or "4") forces
// it, for measuring one against the other in one process (dlconv bench / tests); otherwise the
// default rule below.
constexpr const char* TILE_ENV = "DLCONV_CPU_WINOGRAD_TILE";
enum class Pass { forward, backward_data, backward_filter };
inline int forced_tile() {
    const char* e = std::getenv(TILE_ENV);
    return e && (e[0] == '2' || e[0] == '4') && e[1] == 0 ? e[0] - '0' : 0;
}
// Default rule: F(4x4) when its transformed positions, weighted by their measured relative cost,
// are fewer than F(2x2)'s: 36 · ⌈OH/4⌉⌈OW/4⌉ · F4_POSITION_COST < 16 · ⌈OH/2⌉⌈OW/2⌉.  Large
// outputs always take F(4x4) (24x24: 0.56 of F(2x2)'s positions, measured 0.66-0.85x of its time
// in every pass of MNIST conv2 and the ecal 3x3 shapes, 1 thread); small ones, where 4x4 tiles
// would mostly compute past the edge (OH = OW = 2 or 6), keep F(2x2).  The same rule for both
// backward passes (backward-data: on its transposed geometry's output, i.e. dx); the forward: below.
constexpr double F4_POSITION_COST = 4.0 / 3.0;  // F(4x4) time per position / F(2x2)'s, conv2 (0.75 / 0.5625)
//
// The forward keeps F(2x2) (measured on the MNIST train step, issue 12): where a 3x3 input patch
// is all zero (MNIST's black background after conv1's relu, dead relu regions) and the bias is 0,
// the exact output is exactly 0, and so is the direct kernel's (TensorFlow's).  F(4x4)'s
// transforms (entries 3/2, 5/2, ½ that round) leak the tile's other, nonzero inputs into it: a
// 2.6e-8 where the exact value is 0.  After relu and a max pool that is no longer a tie of zeros:
// the pool's gradient moves to that pixel and relu' lets it through, and one such flip in a batch
// gave conv2's dw and db 4e-3 relative error against the float64 reference (stock TF: 9e-6).
// Keeping those exact zeros is not enough (tried 2026-12-03, Intel Xeon: F(4x4) forward with
// every all-zero window set to exactly act(bias); 3.7 ms vs F(2x2)'s 5.0 ms for MNIST conv2 at
// batch 128, 2 threads): the flip at the bench's seed 0 was an output whose exact value is
// −1.1e-8 (Σ|x||w| = 0.63), which F(4x4) rounds to +2.6e-8 and F(2x2) to −1.8e-8.  F(4x4)'s
// larger rounding puts more near-zero outputs on the wrong side of 0: against the float64
// reference the train step's gradients differed by 4.0e-3 / 4.4e-3 at seeds 0 / 6, F(2x2)'s by
// 6.8e-6 / 5.6e-6 (stock TF: 9e-6 / 4.8e-3).  So the forward keeps F(2x2).
// The backward passes' outputs (dx, dw, db) meet no such discontinuity downstream: their F(4x4)
// error stays ~2e-6 of the largest entry, so they take the rule below.
inline int tile_3x3(const ConvGeometry& g, Pass p) {
    if (const int t = forced_tile()) return t;
    if (p == Pass::forward) return F2x3::m;
    auto cdiv = [](i64 a, i64 b) { return (a + b - 1) / b; };
    const double pos4 = double(F4x3::alpha * F4x3::alpha) * double(cdiv(g.out_h, 4) * cdiv(g.out_w, 4));
    const double pos2 = double(F2x3::alpha * F2x3::alpha) * double(cdiv(g.out_h, 2) * cdiv(g.out_w, 2));
    return pos4 * F4_POSITION_COST < pos2 ? F4x3::m : F2x3::m;
}

inline bool forward_pass(const ConvGeometry& g, const float* x, const float* w, const float* bias, int act,
                         float* y, const float* gy, int gact, Pass p, const PoolDz* pd = nullptr) {
    if (g.k_h == F2x5::r) return conv_forward_tiles<F2x5>(g, x, w, bias, act, y, gy, gact, nullptr, nullptr, pd);
    return tile_3x3(g, p) == F4x3::m ? conv_forward_tiles<F4x3>(g, x, w, bias, act, y, gy, gact, nullptr, nullptr, pd)
                                     : conv_forward_tiles<F2x3>(g, x, w, bias, act, y, gy, gact, nullptr, nullptr, pd);
}
inline bool conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* bias, int act,
                         float* y) {
    return forward_pass(g, x, w, bias, act, y, nullptr, ACT_LINEAR, Pass::forward);
}
// Backward-data as the forward of dz (t: the transposed geometry, wf: the flipped, transposed
// filter; cpu_conv.cpp), act'(y) applied to dz on the fly when act != linear.
// relu, then the 2x2 stride-2 valid max pool (conv_forward_tiles' pool_y / pool_arg), with the
// F(2x2) forward whatever tile_3x3 says (its tiles are the pool windows); 3x3 only.  False when
// a result was non-finite (pool_y, pool_arg then hold Winograd's values: recompute).
inline bool conv_forward_relu_maxpool2x2(const ConvGeometry& g, const float* x, const float* w, const float* bias,
                                         float* pool_y, uint8_t* pool_arg) {
    return conv_forward_tiles<F2x3>(g, x, w, bias, ACT_RELU, nullptr, nullptr, ACT_LINEAR, pool_y, pool_arg);
}
inline bool conv_backward_data(const ConvGeometry& t, const float* dz, const float* wf, float* dx, const float* y,
                               int act) {
    return forward_pass(t, dz, wf, nullptr, ACT_LINEAR, dx, y, act, Pass::backward_data);
}
// The same with dz read from a max pool's gradient (PoolDz; linear: the relu's derivative is in
// the pool's arg).  t.in_h / in_w are the conv output's height and width.
inline bool conv_backward_data_pool(const ConvGeometry& t, const PoolDz& pd, const float* wf, float* dx) {
    return forward_pass(t, nullptr, wf, nullptr, ACT_LINEAR, dx, nullptr, ACT_LINEAR, Pass::backward_data, &pd);
}

// ---------------------------------------------------------------------------- backward-filter
// dw (r x r per (c, f)) = Σ_tiles G^T [ (B^T d B) ⊙ (A z A^T) ] G  — the transpose of the forward
// identity (y = A^T [(G g G^T) ⊙ (B^T d B)] A is linear in g), where z is the 2x2 tile of dz
// (zero past OH / OW) and d its α x α input patch (F(2x2, 3x3): A z A^T rows/cols z0, z0 + z1,
// z0 − z1, −z1).
//   M_e[c, f] = Σ_tiles V_e[tile, c] · Z_e[tile, f]: E GEMMs whose reduction runs over tiles,
//   on the R x 64 backward-filter register block of cpu_conv_direct.h (broadcast V, load Z rows).
// Work item: filter_tiles<T>() consecutive tiles of the flattened (n, th, tw) tile grid: V and Z
//   of the chunk (E x tiles x Cp and E x tiles x Fp floats) are built once, then swept by the GEMMs.
// Threads: chunks are cut into P contiguous groups, handed out dynamically; a group owns an
//   M partial (E·C·Fp floats) and a db partial; partials are summed in group order
//   (deterministic for a given thread count), then dw = G^T M G per (c, 16 filters).
// Tiles x positions per chunk: 48 tiles at F(2x2, 3x3) (48-step reductions amortise the block's
//   loads, V + Z = 48 x 16 x (Cp + Fp) floats); α = 6 keeps the same chunk size in floats (21
//   tiles; 12, 32 and 48 measured no better for F(4x4, 3x3)).
constexpr i64 FILTER_CHUNK_ENTRIES = 48 * 16;
template <class T>
constexpr i64 filter_tiles() { return FILTER_CHUNK_ENTRIES / (T::alpha * T::alpha); }
constexpr int FILTER_GROUPS_PER_THREAD = 4;
constexpr i64 FILTER_PARTIAL_BUDGET = i64(8) << 20;

// gy / gact: dz is then dL/dy of the activation whose output is gy (same shape), read as
// act'(gy) · dz when the Z tiles are formed (db sums the same values).
// Returns false when a dw value was non-finite (dw, db then hold Winograd's values: recompute).
template <class T>
inline bool conv_backward_filter_tiles(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                                       const float* gy, int gact, const PoolDz* pd = nullptr) {
    using direct::filt_kernel;
    using direct::max_rows;
    using direct::Panel;
    using direct::panel_at;
    constexpr int m = T::m, r = T::r, E = T::alpha * T::alpha;
    constexpr i64 NT = filter_tiles<T>();
    const i64 C = g.in_c, F = g.filters, OH = g.out_h, OW = g.out_w;
    const i64 Cp = (C + VL - 1) / VL * VL, Fp = (F + VL - 1) / VL * VL;
    const i64 th_n = (OH + m - 1) / m, tw_n = (OW + m - 1) / m, tiles = g.batch * th_n * tw_n;
    const i64 chunks = (tiles + NT - 1) / NT;
    const int nthreads = omp_get_max_threads();
    const i64 by_budget = std::max<i64>(1, FILTER_PARTIAL_BUDGET / (E * C * Fp * i64(sizeof(float))));
    const i64 P = std::max<i64>(
        1, std::min<i64>(chunks, std::max<i64>(nthreads, std::min<i64>(FILTER_GROUPS_PER_THREAD * nthreads, by_budget))));
    Buf part(P * E * C * Fp), zpix(Cp);
    std::memset(zpix.data, 0, Cp * sizeof(float));
    std::vector<double> dbpart(db ? size_t(P * Fp) : 0, 0.0);
    bool finite = true;
#pragma omp parallel num_threads(nthreads) reduction(&& : finite)
    {
        Buf V(E * NT * Cp), Z(E * NT * Fp), dsum(Fp);
        const float* xr[1];
        const float* dr[1];
#pragma omp for schedule(dynamic, 1)
        for (i64 grp = 0; grp < P; ++grp) {
            float* Mg = part.data + grp * E * C * Fp;
            std::memset(Mg, 0, E * C * Fp * sizeof(float));
            std::memset(dsum.data, 0, Fp * sizeof(float));
            for (i64 ch = grp * chunks / P; ch < (grp + 1) * chunks / P; ++ch) {
                const i64 t0 = ch * NT, nt = std::min(NT, tiles - t0);
                for (i64 i = 0; i < nt; ++i) {
                    const i64 t = t0 + i, n = t / (th_n * tw_n), r0 = t - n * th_n * tw_n;
                    const i64 th = r0 / tw_n, tw = r0 - th * tw_n;
                    // ---- V: input transform of the α x α patch (zero outside the input)
                    transform_patch<T>(g, x, nullptr, ACT_LINEAR, zpix.data, n, m * th - g.pad_top,
                                       m * tw - g.pad_left, V.data + i * Cp, NT * Cp);
                    // ---- Z: A z A^T of the 2x2 dz tile (zero past OH / OW); db += Σ z
                    i64 zo[m * m];  // element offsets of the tile's dz pixels, -1 past OH / OW
                    const float* zp[m * m];  // with pd: each pixel's PoolDz source
                    const uint8_t* za[m * m];
                    int ztap[m * m];
                    for (int a = 0; a < m; ++a)
                        for (int b = 0; b < m; ++b) {
                            const i64 oh = m * th + a, ow = m * tw + b;
                            zo[a * m + b] = (oh < OH && ow < OW) ? ((n * OH + oh) * OW + ow) * F : -1;
                            if (pd && zo[a * m + b] >= 0) pd->at(n, oh, ow, F, &zp[a * m + b], &za[a * m + b], &ztap[a * m + b]);
                        }
                    const i64 fs = NT * Fp;
                    for (i64 f0 = 0; f0 < F; f0 += VL) {
                        const __mmask16 mk = tail_mask(F - f0);
                        __m512 z[m * m], az[E];
                        for (int k = 0; k < m * m; ++k) {
                            if (zo[k] < 0) {
                                z[k] = _mm512_setzero_ps();
                                continue;
                            }
                            if (pd) {
                                z[k] = pool_dz_load(zp[k] + f0, za[k] + f0, ztap[k], F - f0, mk);
                                continue;
                            }
                            z[k] = _mm512_maskz_loadu_ps(mk, dz + zo[k] + f0);
                            if (gact != ACT_LINEAR) z[k] = act_grad(z[k], _mm512_maskz_loadu_ps(mk, gy + zo[k] + f0), gact);
                        }
                        if (db) {
                            __m512 s = _mm512_load_ps(dsum.data + f0);
                            for (int k = 0; k < m * m; ++k) s = _mm512_add_ps(s, z[k]);
                            _mm512_store_ps(dsum.data + f0, s);
                        }
                        transform2<Transposed<MatAT<T>>>(z, az);
                        for (int e = 0; e < E; ++e) _mm512_store_ps(Z.data + i * Fp + f0 + e * fs, az[e]);
                    }
                }
                // ---- E GEMMs over the chunk's tiles: Mg[e][c][f] += Σ_i V[e][i][c] · Z[e][i][f]
                for (i64 f0 = 0; f0 < F; f0 += PANEL) {
                    const Panel pn = panel_at(f0, F);
                    const i64 Rm = max_rows(pn.nv), nb = (C + Rm - 1) / Rm;
                    for (int e = 0; e < E; ++e) {
                        dr[0] = Z.data + e * NT * Fp + f0;
                        for (i64 bi = 0; bi < nb; ++bi) {
                            const i64 c0 = bi * C / nb, c1 = (bi + 1) * C / nb;
                            xr[0] = V.data + e * NT * Cp + c0;
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
                const __mmask16 mk = tail_mask(F - f0);
                __m512 M[E], o[r * r];
                for (int e = 0; e < E; ++e) {
                    __m512 acc = _mm512_load_ps(part.data + (e * C + c) * Fp + f0);
                    for (i64 p = 1; p < P; ++p)
                        acc = _mm512_add_ps(acc, _mm512_load_ps(part.data + ((p * E + e) * C + c) * Fp + f0));
                    M[e] = acc;
                }
                transform2<Transposed<MatG<T>>>(M, o);
                for (int k = 0; k < r * r; ++k) {
                    watch = _mm512_mask3_fmadd_ps(o[k], zero, watch, mk);  // lanes past F keep theirs
                    _mm512_mask_storeu_ps(dw + (k * C + c) * F + f0, mk, o[k]);
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

inline bool conv_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                                 const float* gy = nullptr, int gact = ACT_LINEAR, const PoolDz* pd = nullptr) {
    if (g.k_h == F2x5::r) return conv_backward_filter_tiles<F2x5>(g, x, dz, dw, db, gy, gact, pd);
    return tile_3x3(g, Pass::backward_filter) == F4x3::m
               ? conv_backward_filter_tiles<F4x3>(g, x, dz, dw, db, gy, gact, pd)
               : conv_backward_filter_tiles<F2x3>(g, x, dz, dw, db, gy, gact, pd);
}
// The same with dz read from a max pool's gradient (PoolDz; linear).
inline bool conv_backward_filter_pool(const ConvGeometry& g, const float* x, const PoolDz& pd, float* dw, float* db) {
    return conv_backward_filter(g, x, nullptr, dw, db, nullptr, ACT_LINEAR, &pd);
}

}  // namespace winograd
}  // namespace cpu
}  // namespace dlconv

#endif  // __AVX512F__
