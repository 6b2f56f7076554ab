// cpu_dense.cpp — dense layer, softmax and activation gradients on the CPU.
//
// Forward:  y[m, n] = act(b[n] + Σ_k x[m, k] · w[k, n])  — row-major A driver of cpu_gemm.h;
//           A = x (a packed tile is MR rows of x, one memcpy each), B = w read in place,
//           bias + activation fused into the epilogue.  Threads own MR-row tiles of y.
// Backward: dz = act'(y) ⊙ dy (written in terms of the output y);
//           dx = dz · wᵀ   (row-major A driver, B = wᵀ copied once per call, weights-sized);
//           dw = xᵀ · dz   (k-major A driver: the reduction runs over the batch, A tile columns
//                           are MR consecutive features of one row of x, a memcpy);
//           db = Σ_m dz[m, :].
// Softmax:  one thread owns whole rows: max, Σ exp(z − max), normalise (numerically safe).
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_kernels.h"

namespace dlconv {
namespace cpu {

void dense_forward(i64 M, i64 K, i64 N, const float* x, const float* w, const float* b, int act, float* y) {
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
#pragma omp parallel for simd schedule(static)
    for (i64 i = 0; i < total; ++i) {
        const float v = y ? y[i] : 0.f;
        float d = 1.f;
        if (act == 1) d = v > 0.f ? 1.f : 0.f;
        else if (act == 2) d = v * (1.f - v);
        else if (act == 3) d = 1.f - v * v;
        dz[i] = dy[i] * d;
    }
}

void dense_backward(i64 M, i64 K, i64 N, const float* x, const float* w, const float* dy, const float* y,
                    int act, float* dx, float* dw, float* db) {
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
