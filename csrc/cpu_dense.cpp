// cpu_dense.cpp — dense layer, softmax and activation gradients on the CPU.
//
// Forward:  y[m, n] = act(b[n] + Σ_k x[m, k] · w[k, n]).  Long reductions (K >= 2048 and
//           K >= 8·max(M, N), e.g. 128x9216 -> 128) take the K-split path below (AVX-512; x and
//           w read in place, K groups with private partials summed in a fixed order);
//           fewer rows than one GEMM register tile (M < MR, batch-1 inference) take one
//           direct register block of all M rows (dense_forward_few_rows: no FMAs on
//           padding rows, w read once);
//           otherwise the row-major A driver of cpu_gemm.h;
//           A = x (a packed tile is MR rows of x, one memcpy each), B = w read in place,
//           bias + activation fused into the epilogue.  Threads own MR-row tiles of y.
// Backward: dz = act'(y) ⊙ dy (written in terms of the output y);  db = Σ_m dz[m, :].
//   v2_direct (AVX-512; dz fits L2; cpu_dense_backward.h): one pass over 64-feature blocks of
//           K, each block producing its 64 columns of dx and its 64 rows of dw; w and x are read
//           once, nothing weights-sized is allocated.
//   v1 (fallback): dx = dz · wᵀ   (row-major A driver, B = wᵀ copied once per call, weights-sized);
//           dw = xᵀ · dz   (k-major A driver: the reduction runs over the batch, A tile columns
//                           are MR consecutive features of one row of x, a memcpy).
// Softmax:  one thread owns whole rows: max, Σ exp(z − max), normalise (numerically safe).
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_act.h"
#include "cpu_conv_direct.h"
#include "cpu_dense_backward.h"
#include "cpu_gemm.h"
#include "cpu_kernels.h"

namespace dlconv {
namespace cpu {

#if defined(__AVX512F__)
namespace {

// Reduction rows of w per block of the K-split dense forward: per block, every row tile of x
// sweeps the block's 128 x 64 slice of w (read in place, 32 KB: L1/L2) before the next block.
// Measured, 1 thread, 128x9216 -> 128: 64 / 128 / 256 / 512 rows: 3.32 / 3.09 / 3.25 / 3.27 ms.
constexpr i64 DENSE_KB = 128;
// Most bytes of per-group C partials the K-split path may allocate (else the GEMM driver).
constexpr i64 DENSE_PARTIAL_BUDGET = i64(8) << 20;
// K groups per thread (dynamic hand-out, so a descheduled thread can be helped).
constexpr int DENSE_GROUPS_PER_THREAD = 4;
// Rows of y per work item of the final fixed-order sum of the partials (dynamic, so a thread
// the OS preempts there is helped too): 8 rows x 128 columns x P partials = 32 KB read.
constexpr i64 DENSE_SUM_ROWS = 8;

// v2_direct dense forward for a long reduction (K >> M, N; e.g. 128 x 9216 -> 128):
//   y[m, n] = act(b[n] + Σ_g C_g[m, n]),  C_g[m, n] = Σ_{k in group g} x[m, k] · w[k, n].
//   K is cut into P contiguous groups of DENSE_KB blocks (P = 1 on one thread, else
//   DENSE_GROUPS_PER_THREAD per thread); a group (handed out dynamically) owns a private M x Np
//   partial C_g (Np = N rounded up to 16).  Per block and 64-column panel, every tile of up to 6
//   rows of x runs the 6x64 register block of cpu_conv_direct.h over the block's rows of w;
//   both read in place (x row stride K, w row stride N): nothing is packed (copying the w slice
//   to an aligned buffer cost 12 % of the call: its loads are not overlapped with FMAs, and
//   unaligned w rows measured no slower).  A ragged last panel is masked (loads and stores).
//   Partials are summed in group order (fixed for a given thread count: run-to-run
//   deterministic) with bias and activation in the same pass.  Memory: the P partials; x and w
//   are each read once per call.
bool dense_forward_ksplit(i64 M, i64 K, i64 N, const float* x, const float* w, const float* b, int act, float* y) {
    using namespace direct;
    const int T = omp_get_max_threads();
    const i64 Np = (N + VL - 1) / VL * VL;
    const i64 nkb = (K + DENSE_KB - 1) / DENSE_KB;
    const i64 P = T == 1 ? 1 : std::min<i64>(nkb, DENSE_GROUPS_PER_THREAD * T);
    if (P < T || P * M * Np * i64(sizeof(float)) > DENSE_PARTIAL_BUDGET) return false;
    Buf part(P * M * Np);
    const i64 Rm = max_rows(MAX_NV);
    const i64 ntile = (M + Rm - 1) / Rm;
    const i64 nsum = (M + DENSE_SUM_ROWS - 1) / DENSE_SUM_ROWS;
#pragma omp parallel num_threads(T)
    {
#pragma omp for schedule(dynamic, 1)
        for (i64 g = 0; g < P; ++g) {
            float* Cg = part.data + g * M * Np;
            const i64 kb0 = g * nkb / P, kb1 = (g + 1) * nkb / P;
            for (i64 kb = kb0; kb < kb1; ++kb) {
                const i64 k0 = kb * DENSE_KB;
                const Seg seg{x + k0, w + k0 * N, std::min<i64>(DENSE_KB, K - k0)};
                for (i64 f0 = 0; f0 < N; f0 += PANEL) {
                    const Panel pn = panel_at(f0, N);
                    for (i64 i = 0; i < ntile; ++i) {
                        const i64 m0 = i * M / ntile, m1 = (i + 1) * M / ntile;
                        fwd_kernel(pn.nv, int(m1 - m0))(&seg, 1, m0 * K, K, f0, N, Cg + m0 * Np + f0, Np, pn.mask,
                                                        kb == kb0 ? kZeros : nullptr, false);
                    }
                }
            }
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (i64 c = 0; c < nsum; ++c) {
            const i64 m0 = c * DENSE_SUM_ROWS, m1 = std::min<i64>(M, m0 + DENSE_SUM_ROWS);
            for (i64 m = m0; m < m1; ++m) {
                float* o = y + m * N;
                std::memcpy(o, part.data + m * Np, N * sizeof(float));
                for (i64 g = 1; g < P; ++g) {
                    const float* s = part.data + (g * M + m) * Np;
#pragma omp simd
                    for (i64 n = 0; n < N; ++n) o[n] += s[n];
                }
            }
            epilogue(y + m0 * N, N, m1 - m0, N, b, act);
        }
    }
    return true;
}

// v2_direct dense forward for fewer rows than one GEMM register tile (M < MR, e.g. batch-1
// inference): the GEMM driver computes MR = 12 rows per tile, so at M = 1 eleven twelfths of its
// FMAs would be on zero rows.  Here all M rows are one register block (cpu_conv_direct.h's
// 1..12-row kernels) over x and w read in place (row strides K and N), so w — the bulk of the
// bytes at small M — is read exactly once: M <= 6 rows x 64 columns (4 zmm per row), 7..11
// rows x 32 columns (2 zmm per row; max_rows).  One work item = one column panel (threads share
// them out, static); the last vector of a ragged panel is masked.  Bias is the accumulators'
// initial value, relu is applied on the store, sigmoid / tanh by a pass over the finished panel.
// Nothing is allocated.
static_assert(MR - 1 <= direct::max_rows(2) && direct::max_rows(direct::MAX_NV) <= direct::max_rows(3),
              "every M < MR must fit one register block of the widths few_rows_nv picks");
int few_rows_nv(i64 M) { return M <= direct::max_rows(direct::MAX_NV) ? direct::MAX_NV : 2; }

i64 few_rows_items(i64 M, i64 N) {
    const i64 width = i64(few_rows_nv(M)) * direct::VL;
    return (N + width - 1) / width;
}

void dense_forward_few_rows(i64 M, i64 K, i64 N, const float* x, const float* w, const float* b, int act, float* y) {
    using namespace direct;
    const int nv_max = few_rows_nv(M);
    const i64 width = i64(nv_max) * VL, items = few_rows_items(M, N);
#pragma omp parallel for schedule(static) if (items > 1)
    for (i64 it = 0; it < items; ++it) {
        const i64 f0 = it * width, cols = std::min<i64>(width, N - f0);
        const int nv = int((cols + VL - 1) / VL), tail = int(cols - (nv - 1) * VL);
        const Seg seg{x, w, K};
        fwd_kernel(nv, int(M))(&seg, 1, 0, K, f0, N, y + f0, N, __mmask16((1u << tail) - 1u),
                               b ? b + f0 : kZeros, act == ACT_RELU);
        if (act == ACT_SIGMOID || act == ACT_TANH) epilogue(y + f0, N, M, cols, nullptr, act);
    }
}

}  // namespace
#endif

void dense_forward(i64 M, i64 K, i64 N, const float* x, const float* w, const float* b, int act, float* y) {
#if defined(__AVX512F__)
    // Few rows: the direct tiles, unless they would leave threads idle where the K-split runs.
    const bool few = M > 0 && N > 0 && M < MR;
    if (few && few_rows_items(M, N) >= omp_get_max_threads()) return dense_forward_few_rows(M, K, N, x, w, b, act, y);
    if (M > 0 && N > 0 && K >= 16 * DENSE_KB && K >= 8 * std::max(M, N) &&
        dense_forward_ksplit(M, K, N, x, w, b, act, y))
        return;
    if (few) return dense_forward_few_rows(M, K, N, x, w, b, act, y);
#endif
    auto pack = [&](i64 m0, int rows, i64 k0, i64 kc, float* dst) {
        for (int i = 0; i < rows; ++i) std::memcpy(dst + i * KCP, x + (m0 + i) * K + k0, kc * sizeof(float));
    };
    gemm_rowA(M, N, K, pack, w, N, y, N, b, act);
}

void activation_backward(i64 rows, i64 cols, const float* dy, const float* y, int act, float* dz) {
    const i64 total = rows * cols;
    if (act == 4) {  // softmax: dz = y * (dy - Σ dy*y) per row
#pragma omp parallel for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
            const float* a = dy + r * cols;
            const float* s = y + r * cols;
            double dot = 0;
            for (i64 j = 0; j < cols; ++j) dot += double(a[j]) * s[j];
            for (i64 j = 0; j < cols; ++j) dz[r * cols + j] = float(s[j] * (a[j] - dot));
        }
        return;
    }
    // Element-wise: memory bound (12 bytes per element).  Chunks of ACT_CHUNK elements (64 KB of
    // each stream) handed out statically; dact keeps the activation switch outside the loop.
    constexpr i64 ACT_CHUNK = 16384;
    const i64 nchunk = (total + ACT_CHUNK - 1) / ACT_CHUNK;
#pragma omp parallel for schedule(static) if (nchunk > 1)
    for (i64 c = 0; c < nchunk; ++c) {
        const i64 i0 = c * ACT_CHUNK, n = std::min<i64>(ACT_CHUNK, total - i0);
        dact(dy + i0, y ? y + i0 : nullptr, act, dz + i0, n);
    }
}

void dense_backward(i64 M, i64 K, i64 N, const float* x, const float* w, const float* dy, const float* y,
                    int act, float* dx, float* dw, float* db) {
#if defined(__AVX512F__)
    if (dense_bwd::backward(M, K, N, x, w, dy, y, act, dx, dw, db, dact)) return;
#endif
    Buf dzb(act == 0 ? 0 : M * N);
    const float* dz = dy;
    if (act != 0) {
        activation_backward(M, N, dy, y, act, dzb.data);
        dz = dzb.data;
    }
    if (dx) {
        Buf wt(K * N);  // wt[n, k] = w[k, n]
        constexpr i64 TB = 32;  // transpose block: 32x32 floats = 4 KB source + 4 KB destination
#pragma omp parallel for collapse(2) schedule(static)
        for (i64 k0 = 0; k0 < K; k0 += TB)
            for (i64 n0 = 0; n0 < N; n0 += TB)
                for (i64 k = k0; k < std::min(K, k0 + TB); ++k)
                    for (i64 n = n0; n < std::min(N, n0 + TB); ++n) wt.data[n * K + k] = w[k * N + n];
        auto pack = [&](i64 m0, int rows, i64 k0, i64 kc, float* dst) {
            for (int i = 0; i < rows; ++i) std::memcpy(dst + i * KCP, dz + (m0 + i) * N + k0, kc * sizeof(float));
        };
        gemm_rowA(M, K, N, pack, wt.data, K, dx, K, nullptr, 0);
    }
    if (dw) {
        auto pack = [&](i64 m0, i64 mrows, i64 p0, i64 pc, float* dst) {
            const i64 rtiles = (mrows + MR - 1) / MR;
            for (i64 r = 0; r < rtiles; ++r) {
                const i64 rows = std::min<i64>(MR, mrows - r * MR);
                for (i64 p = 0; p < pc; ++p) {
                    float* d = dst + (r * pc + p) * MR;
                    std::memcpy(d, x + (p0 + p) * K + m0 + r * MR, rows * sizeof(float));
                    if (rows < MR) std::memset(d + rows, 0, (MR - rows) * sizeof(float));
                }
            }
        };
        gemm_kmajorA(K, N, M, pack, dz, N, dw, N);
    }
    if (db) {
        std::vector<double> s(N, 0.0);
        for (i64 m = 0; m < M; ++m)
            for (i64 n = 0; n < N; ++n) s[n] += dz[m * N + n];
        for (i64 n = 0; n < N; ++n) db[n] = float(s[n]);
    }
}

void softmax(i64 rows, i64 cols, const float* z, float* out) {
#pragma omp parallel for schedule(static)
    for (i64 r = 0; r < rows; ++r) {
        const float* a = z + r * cols;
        float* o = out + r * cols;
        float mx = a[0];
        for (i64 j = 1; j < cols; ++j) mx = std::max(mx, a[j]);
        double s = 0;
        for (i64 j = 0; j < cols; ++j) {
            o[j] = std::exp(a[j] - mx);
            s += o[j];
        }
        const float inv = float(1.0 / s);
        for (i64 j = 0; j < cols; ++j) o[j] *= inv;
    }
}

}  // namespace cpu
}  // namespace dlconv
