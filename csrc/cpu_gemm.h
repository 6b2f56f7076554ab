// cpu_gemm.h — the CPU GEMM engine every C++ CPU kernel is built on (header-only, internal).
//
// C[M, N] (+)= A[M, K] · B[K, N], fp32, where A is never materialised: each kernel hands the
// driver a *packer* that writes one tile of A on demand (the implicit GEMM: for a convolution
// the packer gathers input pixels straight from NHWC memory, zero for padding).  B is read in
// place (row stride ldb); only a ragged last column panel is copied into a zero-padded panel.
//
// Register block (the microkernel): MR rows x NR = NV*VL columns of C live in MR*NV vector
// registers.  Per reduction step k it loads NV vectors of B, broadcasts MR scalars of A and does
// MR*NV FMAs.  With AVX-512 (VL=16): MR=12, NV=2 -> 24 zmm accumulators + 2 B vectors + 1
// broadcast = 27 of 32 registers; 24 independent FMAs cover the 4-cycle latency of two FMA
// ports; 14 loads per 24 FMAs stay under two loads per cycle.  AVX2 (VL=8): MR=6, NV=2 ->
// 12 ymm accumulators (the classic 6x16 block).  Without either: portable 4-wide vectors.
//
// Two layouts of a packed A tile, chosen so that *packing* is a contiguous copy:
//   row-major  A[i*KCP + k]  (i < MR, k < kc): a row of A is a run of contiguous input memory
//              (conv forward: the C channels of one pixel at one tap; dense: a row of x).
//              KCP is a compile-time stride so that the MR broadcast addresses are one base
//              register plus constant displacements.
//   k-major    A[k*MR + i]: a column of A is contiguous in memory (conv backward-filter:
//              the reduction runs over pixels, MR consecutive (tap, channel) rows of one pixel).
//
// Drivers:
//   gemm_rowA   parallel over MR-row tiles of C (OpenMP dynamic, ROW_TILES_PER_GRAB tiles a grab,
//               so a thread the OS preempts does not stall the call; with few row tiles the
//               column panels are split into groups too).  KC blocks are the outer loop (the
//               KC slab of B stays in L2 for every tile); per tile: pack A (MR x kc), then
//               every NR panel of B, the A tile (<= 25 KB) staying in L1 across panels.  A fused
//               epilogue (bias + activation) runs on the tile after the last KC block.
//   gemm_kmajorA  for long reductions (P = pixels): KC blocks of the reduction are handed out
//               dynamically, each thread accumulates a private partial C (M x N, the size of
//               the weights), partials are summed at the end; or, when C is large and the
//               reduction short (dense dw), MC-row blocks of C are handed out.  A is packed
//               MC x KC at a time (<= 768 KB, L2).
//
// Memory per call: a few tiles per thread (< 1 MB) plus at most one K x NR tail panel of B and,
// for split reductions, one M x N partial per thread: never proportional to the batch size.
// Re-entrant: every buffer is allocated inside the call; nothing static is written.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace dlconv {
namespace cpu {

using i64 = int64_t;

// ---------------------------------------------------------------------------- vectors
#if defined(__AVX512F__)
struct Vec {
    using T = __m512;
    static constexpr int L = 16;
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
    static T set1(float a) { return _mm512_set1_ps(a); }
    static T zero() { return _mm512_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
constexpr int MR = 12;  // rows of the register block: 12*2 accumulators (see header)
constexpr int NV = 2;   // vectors per row of the register block
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
    using T = __m256;
    static constexpr int L = 8;
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
    static T set1(float a) { return _mm256_set1_ps(a); }
    static T zero() { return _mm256_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};
constexpr int MR = 6;   // the 6x16 AVX2 block: 12 ymm accumulators
constexpr int NV = 2;
#else
struct Vec {
    typedef float T __attribute__((vector_size(16)));
    static constexpr int L = 4;
    static T load(const float* p) { T v; std::memcpy(&v, p, sizeof(v)); return v; }
    static void store(float* p, T v) { std::memcpy(p, &v, sizeof(v)); }
    static T set1(float a) { return T{a, a, a, a}; }
    static T zero() { return T{0, 0, 0, 0}; }
    static T fma(T a, T b, T c) { return a * b + c; }
};
constexpr int MR = 4;
constexpr int NV = 2;
#endif

constexpr int NR = NV * Vec::L;  // columns of the register block
// Reduction block: 512 covers a 3x3x32 .. 3x3x56 conv in one block, and a row-major A tile
// (MR x KCP floats, 12*528*4 = 25 KB with AVX-512) fits L1 next to a stream of B.
constexpr int KC = 512;
// Row stride of a row-major A tile: KC + 16 floats, so that rows are not 2 KB apart (L1 set
// aliasing of the MR broadcast streams).
constexpr int KCP = KC + 16;
// Rows of A packed at once by the k-major driver (multiple of every MR): 384 x 512 x 4 B
// = 768 KB worst case, L2-sized on this class of CPU.
constexpr int MC = 384;
static_assert(MC % MR == 0, "MC must be a multiple of MR");
// Row tiles a thread takes at once in the row-major driver: 8 x 12 rows amortise the dynamic
// schedule's atomic while leaving hundreds of grabs per conv to balance descheduled threads.
constexpr int ROW_TILES_PER_GRAB = 8;
// Work items per thread the row-major driver aims for (load balance when rows are few).
constexpr int ITEMS_PER_THREAD = 8;

// 64-byte aligned scratch owned by one call (never static: re-entrancy).
struct Buf {
    std::unique_ptr<float[]> p_;
    float* data = nullptr;
    explicit Buf(i64 n = 0) { resize(n); }
    void resize(i64 n) {
        if (n <= 0) { p_.reset(); data = nullptr; return; }
        p_.reset(new float[n + 16]);
        auto a = reinterpret_cast<uintptr_t>(p_.get());
        data = p_.get() + ((64 - (a & 63)) & 63) / sizeof(float);
    }
};

// ---------------------------------------------------------------------------- microkernel
// C[MR x NR] (ldc) = (accumulate ? C : 0) + sum_k A(i, k) * B[k*ldb + j], j < NR.
template <bool KMAJOR>
static inline void micro(i64 kc, const float* __restrict A, const float* __restrict B, i64 ldb,
                         float* __restrict C, i64 ldc, bool accumulate) {
    typename Vec::T c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? Vec::load(C + i * ldc + v * Vec::L) : Vec::zero();
    for (i64 k = 0; k < kc; ++k) {
        typename Vec::T b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + k * ldb + v * Vec::L);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            const typename Vec::T a = Vec::set1(KMAJOR ? A[k * MR + i] : A[i * KCP + k]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) c[i][v] = Vec::fma(a, b[v], c[i][v]);
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) Vec::store(C + i * ldc + v * Vec::L, c[i][v]);
}

// One MR x NR block of C at (Cb, ldc) with only `rows` x `cols` valid: run the microkernel on a
// local tile when the block is ragged, so it never touches memory outside C.
template <bool KMAJOR>
static inline void micro_edge(i64 kc, const float* A, const float* B, i64 ldb, float* Cb, i64 ldc,
                              int rows, int cols, bool accumulate) {
    if (rows == MR && cols == NR) {
        micro<KMAJOR>(kc, A, B, ldb, Cb, ldc, accumulate);
        return;
    }
    alignas(64) float tile[MR * NR];
    if (accumulate) {
        std::memset(tile, 0, sizeof(tile));
        for (int i = 0; i < rows; ++i) std::memcpy(tile + i * NR, Cb + i * ldc, cols * sizeof(float));
    }
    micro<KMAJOR>(kc, A, B, ldb, tile, NR, accumulate);
    for (int i = 0; i < rows; ++i) std::memcpy(Cb + i * ldc, tile + i * NR, cols * sizeof(float));
}

// Copy columns [n0, N) of rows [k0, k0+kc) of B into a zero-padded kc x NR panel.
static inline void pack_tail(const float* B, i64 ldb, i64 k0, i64 kc, i64 n0, i64 N, float* dst) {
    const i64 cols = N - n0;
    for (i64 k = 0; k < kc; ++k) {
        float* d = dst + k * NR;
        std::memcpy(d, B + (k0 + k) * ldb + n0, cols * sizeof(float));
        std::memset(d + cols, 0, (NR - cols) * sizeof(float));
    }
}

// ---------------------------------------------------------------------------- epilogue
static inline float activate1(float z, int act) {
    switch (act) {
        case 1: return z < 0.f ? 0.f : z;  // relu as TensorFlow: NaN stays NaN
        case 2: return 1.f / (1.f + std::exp(-z));
        case 3: return std::tanh(z);
        default: return z;
    }
}

// rows x N block of C (ldc): C = act(C + bias).
static inline void epilogue(float* C, i64 ldc, i64 rows, i64 N, const float* bias, int act) {
    for (i64 i = 0; i < rows; ++i) {
        float* c = C + i * ldc;
        if (bias) {
#pragma omp simd
            for (i64 j = 0; j < N; ++j) c[j] += bias[j];
        }
        if (act == 1) {
#pragma omp simd
            for (i64 j = 0; j < N; ++j) c[j] = c[j] < 0.f ? 0.f : c[j];  // NaN stays NaN
        } else if (act == 2 || act == 3) {
            for (i64 j = 0; j < N; ++j) c[j] = activate1(c[j], act);
        }
    }
}

static inline int n_blocks(i64 n, i64 block) { return int((n + block - 1) / block); }

// ---------------------------------------------------------------------------- row-major A driver
// C[M, N] = act(A · B + bias).  pack(m0, rows, k0, kc, dst) writes dst[i*KCP + k] = A[m0+i, k0+k]
// for i < rows (rows <= MR), k < kc; the driver zeroes rows >= `rows`.
template <class PackA>
void gemm_rowA(i64 M, i64 N, i64 K, PackA&& pack, const float* B, i64 ldb, float* C, i64 ldc,
               const float* bias, int act) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // empty reduction: C = act(bias)
        for (i64 i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
        epilogue(C, ldc, M, N, bias, act);
        return;
    }
    const int nkb = n_blocks(K, KC);
    const i64 kcb = (K + nkb - 1) / nkb;  // even split of K into nkb blocks of <= KC
    const i64 n_full = N / NR * NR;
    Buf tail((N > n_full) ? K * NR : 0);  // zero-padded ragged last panel of B (weights-sized)
    if (N > n_full) pack_tail(B, ldb, 0, K, n_full, N, tail.data);
    const i64 tiles = (M + MR - 1) / MR, panels = (N + NR - 1) / NR;
    // Work item = one MR-row tile x one group of column panels.  Few row tiles (dense layers:
    // batch 128 = 11 tiles) are split by columns too, so that there are >= ITEMS_PER_THREAD
    // items per thread to balance; a convolution has thousands of tiles and one group.
    const int T = omp_get_max_threads();
    const i64 groups = std::min<i64>(panels, std::max<i64>(1, (ITEMS_PER_THREAD * T + tiles - 1) / tiles));
    const i64 panels_per_group = (panels + groups - 1) / groups;
    const i64 items = tiles * groups;
    const int grab = int(std::max<i64>(1, std::min<i64>(ROW_TILES_PER_GRAB, items / (ITEMS_PER_THREAD * T))));
    // Reduction blocks outermost: all items finish block kb (an OpenMP barrier) before kb+1, so a
    // KC-row slab of B (512 x N floats, e.g. 256 KB of a 9216x128 dense weight) is read from
    // memory once and then from L2 by every row tile, instead of once per row tile.
#pragma omp parallel num_threads(T)
    {
        Buf a(MR * KCP);
        for (int kb = 0; kb < nkb; ++kb) {
            const i64 k0 = kb * kcb, kc = std::min(kcb, K - k0);
#pragma omp for schedule(dynamic, grab)
            for (i64 it = 0; it < items; ++it) {
                const i64 t = it / groups, grp = it - t * groups;
                const i64 m0 = t * MR;
                const int rows = int(std::min<i64>(MR, M - m0));
                const i64 n_lo = grp * panels_per_group * NR;
                const i64 n_hi = std::min<i64>(N, n_lo + panels_per_group * NR);
                if (n_lo >= n_hi) continue;
                float* Ct = C + m0 * ldc;
                pack(m0, rows, k0, kc, a.data);
                for (int i = rows; i < MR; ++i) std::memset(a.data + i * KCP, 0, kc * sizeof(float));
                for (i64 n0 = n_lo; n0 < n_hi; n0 += NR) {
                    if (n0 < n_full)
                        micro_edge<false>(kc, a.data, B + k0 * ldb + n0, ldb, Ct + n0, ldc, rows, NR, kb > 0);
                    else
                        micro_edge<false>(kc, a.data, tail.data + k0 * NR, NR, Ct + n0, ldc, rows, int(N - n0),
                                          kb > 0);
                }
                if (kb == nkb - 1) epilogue(Ct + n_lo, ldc, rows, n_hi - n_lo, bias ? bias + n_lo : nullptr, act);
            }
        }
    }
}

// ---------------------------------------------------------------------------- k-major A driver
// C[M, N] = A · B with a long reduction P.  pack(m0, mrows, p0, pc, dst) writes, for each
// MR-row tile r of the rows [m0, m0+mrows) (mrows <= MC): dst[r*pc*MR + p*MR + i] =
// A[m0 + r*MR + i, p0 + p], zero for rows >= mrows.  B has P rows (ldb).
template <class PackA>
void gemm_kmajorA(i64 M, i64 N, i64 P, PackA&& pack, const float* B, i64 ldb, float* C, i64 ldc) {
    if (M <= 0 || N <= 0) return;
    for (i64 i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    if (P <= 0) return;
    const int T = omp_get_max_threads();
    // Split the reduction when C is small (partials cost M*N per thread, weights-sized) and
    // there is more reduction than rows; otherwise split rows of C.
    const bool split_p = T > 1 && P >= 4 * KC && (M * N <= (i64(1) << 20) || (M + MC - 1) / MC < 2 * T);
    const i64 n_full = N / NR * NR;
    std::vector<Buf> partial(split_p ? T : 0);
    const i64 n_pb = (P + KC - 1) / KC, n_mb = (M + MC - 1) / MC;
#pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num();
        float* Cw = C;
        i64 ldw = ldc;
        if (split_p) {
            partial[tid].resize(M * N);
            Cw = partial[tid].data;
            ldw = N;
            std::memset(Cw, 0, M * N * sizeof(float));
        }
        Buf a(MC * KC), tail(N > n_full ? KC * NR : 0);
        // One work item = one MC-row block of C x one KC block of the reduction.  Dynamic
        // scheduling: a thread the OS descheduled does not hold the others up.
        auto item = [&](i64 mb, i64 pb) {
            const i64 m0 = mb * MC, mrows = std::min<i64>(MC, M - m0);
            const i64 p0 = pb * KC, pc = std::min<i64>(KC, P - p0);
            const i64 rtiles = (mrows + MR - 1) / MR;
            pack(m0, mrows, p0, pc, a.data);
            if (N > n_full) pack_tail(B, ldb, p0, pc, n_full, N, tail.data);
            for (i64 r = 0; r < rtiles; ++r) {
                const int rows = int(std::min<i64>(MR, mrows - r * MR));
                float* Ct = Cw + (m0 + r * MR) * ldw;
                const float* At = a.data + r * pc * MR;
                for (i64 n0 = 0; n0 < n_full; n0 += NR)
                    micro_edge<true>(pc, At, B + p0 * ldb + n0, ldb, Ct + n0, ldw, rows, NR, true);
                if (N > n_full)
                    micro_edge<true>(pc, At, tail.data, NR, Ct + n_full, ldw, rows, int(N - n_full), true);
            }
        };
        if (split_p) {  // threads share the reduction; each adds into its private partial
#pragma omp for schedule(dynamic, 1) nowait
            for (i64 pb = 0; pb < n_pb; ++pb)
                for (i64 mb = 0; mb < n_mb; ++mb) item(mb, pb);
        } else {        // threads own row blocks of C; each runs the whole reduction on them
#pragma omp for schedule(dynamic, 1) nowait
            for (i64 mb = 0; mb < n_mb; ++mb)
                for (i64 pb = 0; pb < n_pb; ++pb) item(mb, pb);
        }
#pragma omp barrier
        if (split_p) {
#pragma omp for schedule(static)
            for (i64 i = 0; i < M; ++i) {
                float* c = C + i * ldc;
                for (int t = 0; t < T; ++t) {
                    if (!partial[t].data) continue;  // a thread that never started
                    const float* s = partial[t].data + i * N;
#pragma omp simd
                    for (i64 j = 0; j < N; ++j) c[j] += s[j];
                }
            }
        }
    }
}

}  // namespace cpu
}  // namespace dlconv
