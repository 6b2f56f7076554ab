// cpu_conv_grouped.cpp — grouped 2-D convolution (groups = G > 1) on the CPU: forward,
// backward-data, backward-filter (+ bias gradient).  Depthwise (G = C) is the case Cg = 1.
//
// Shapes: x (N, H, W, C), w (KH, KW, Cg, F) with Cg = C / G, Fg = F / G, y (N, OH, OW, F).
// Filter k belongs to group q = k / Fg and reads the input channels c = q·Cg + ci, ci < Cg:
//   y[n, oh, ow, q·Fg + f] = act(b[k] + Σ_{kh, kw, ci} x[n, ih, iw, q·Cg + ci] · w[kh, kw, ci, q·Fg + f])
//   ih = oh·stride_h − pad_top + kh·dil_h,  iw = ow·stride_w − pad_left + kw·dil_w
// Taps falling in the padding are skipped (absent, not multiplied by 0: a ±Inf weight stays out).
// In NHWC a group's channels are a slice of each pixel's row (stride 1, offset q·Cg) and its
// filters a slice of each w row (offset q·Fg): the loops below address them with those offsets,
// so no channel is copied or transposed.
//
// Innermost loops run over a contiguous run of one pixel's channels/filters, vectorised by the
// compiler: over f < Fg (grouped), or over the C channels themselves when Cg = Fg = 1
// (depthwise with multiplier 1: the dedicated `depthwise` branches, one fused multiply-add
// stream per tap).
//
// Forward:          one OpenMP thread owns whole output pixels (all F filters; a private F-float
//                   accumulator row), static schedule over N·OH·OW pixels.
// Backward-data:    gather form — one thread owns whole input pixels (n, ih, iw), all C channels:
//                   the tap (kh, kw) reached it from oh = (ih + pad_top − kh·dil_h) / stride_h when
//                   the division is exact and 0 <= oh < OH (likewise ow):
//                   dx[n, ih, iw, q·Cg + ci] = Σ dz[n, oh, ow, q·Fg + f] · w[kh, kw, ci, q·Fg + f].
// Backward-filter:  dw[kh, kw, ci, k] = Σ_{n, oh, ow} x[n, ih, iw, q·Cg + ci] · dz[n, oh, ow, k];
//                   each thread sums a contiguous slice of output pixels into a private dw
//                   (w is small for grouped layers: KH·KW·Cg·F floats), the slices then added in
//                   double.  db[k] = Σ dz[·, k] likewise.
// Activation derivative (act != linear, y = the layer's output): dz = act'(y) · dy is formed in
// a temporary first (cpu_act.h's dact), then the linear passes run.
#include "cpu_conv_grouped.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_act.h"
#include "cpu_gemm.h"

namespace dlconv {
namespace cpu {
namespace grouped {

namespace {

// dz = act'(y) · dy in a temporary when act != linear; else dy itself.
struct Dz {
    Buf buf;
    const float* p;
    Dz(const ConvGeometry& g, const float* dy, const float* y, int act) : p(dy) {
        if (act == ACT_LINEAR) return;
        const i64 n = g.batch * g.out_h * g.out_w * g.filters;
        buf.resize(n);
        dact(dy, y, act, buf.data, n);
        p = buf.data;
    }
};

}  // namespace

void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y) {
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
    const i64 M = g.batch * g.out_h * g.out_w, ohw = g.out_h * g.out_w;
    const bool depthwise = Cg == 1 && Fg == 1;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const i64 n = m / ohw, r = m - n * ohw, oh = r / g.out_w, ow = r - oh * g.out_w;
        float* acc = y + m * F;  // accumulate in place: the row is this thread's alone
        std::memset(acc, 0, F * sizeof(float));
        for (i64 kh = 0; kh < g.k_h; ++kh) {
            const i64 ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
            if (ih < 0 || ih >= g.in_h) continue;
            for (i64 kw = 0; kw < g.k_w; ++kw) {
                const i64 iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
                if (iw < 0 || iw >= g.in_w) continue;
                const float* __restrict xp = x + ((n * g.in_h + ih) * g.in_w + iw) * C;
                const float* __restrict wt = w + (kh * g.k_w + kw) * Cg * F;
                if (depthwise) {
#pragma omp simd
                    for (i64 c = 0; c < C; ++c) acc[c] += xp[c] * wt[c];
                    continue;
                }
                for (i64 q = 0; q < G; ++q) {
                    float* __restrict a = acc + q * Fg;
                    for (i64 ci = 0; ci < Cg; ++ci) {
                        const float xv = xp[q * Cg + ci];
                        const float* __restrict wr = wt + ci * F + q * Fg;
#pragma omp simd
                        for (i64 f = 0; f < Fg; ++f) a[f] += xv * wr[f];
                    }
                }
            }
        }
        epilogue(acc, F, 1, F, b, act);
    }
}

void conv_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx, const float* y,
                        int act) {
    const Dz dzt(g, dy, y, act);
    const float* dz = dzt.p;
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
    const i64 M = g.batch * g.in_h * g.in_w, hw = g.in_h * g.in_w;
    const bool depthwise = Cg == 1 && Fg == 1;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const i64 n = m / hw, r = m - n * hw, ih = r / g.in_w, iw = r - ih * g.in_w;
        float* __restrict acc = dx + m * C;
        std::memset(acc, 0, C * sizeof(float));
        for (i64 kh = 0; kh < g.k_h; ++kh) {
            const i64 ohn = ih + g.pad_top - kh * g.dil_h;
            if (ohn < 0 || ohn % g.stride_h != 0) continue;
            const i64 oh = ohn / g.stride_h;
            if (oh >= g.out_h) continue;
            for (i64 kw = 0; kw < g.k_w; ++kw) {
                const i64 own = iw + g.pad_left - kw * g.dil_w;
                if (own < 0 || own % g.stride_w != 0) continue;
                const i64 ow = own / g.stride_w;
                if (ow >= g.out_w) continue;
                const float* __restrict dp = dz + ((n * g.out_h + oh) * g.out_w + ow) * F;
                const float* __restrict wt = w + (kh * g.k_w + kw) * Cg * F;
                if (depthwise) {
#pragma omp simd
                    for (i64 c = 0; c < C; ++c) acc[c] += dp[c] * wt[c];
                    continue;
                }
                for (i64 q = 0; q < G; ++q)
                    for (i64 ci = 0; ci < Cg; ++ci) {
                        const float* __restrict wr = wt + ci * F + q * Fg;
                        const float* __restrict d = dp + q * Fg;
                        float s = 0.f;
#pragma omp simd reduction(+ : s)
                        for (i64 f = 0; f < Fg; ++f) s += d[f] * wr[f];
                        acc[q * Cg + ci] += s;
                    }
            }
        }
    }
}

void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* db,
                          const float* y, int act) {
    const Dz dzt(g, dy, y, act);
    const float* dz = dzt.p;
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
    const i64 P = g.batch * g.out_h * g.out_w, ohw = g.out_h * g.out_w, WS = g.w_size();
    const bool depthwise = Cg == 1 && Fg == 1;
    const int T = omp_get_max_threads();
    // One private dw (and db) per thread, each summing a contiguous slice of the P output pixels.
    std::vector<float> part(size_t(T) * size_t(WS + F), 0.f);
#pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        float* pw = part.data() + size_t(tid) * size_t(WS + F);
        float* pb = pw + WS;
        for (i64 p = P * tid / nt; p < P * (tid + 1) / nt; ++p) {
            const i64 n = p / ohw, r = p - n * ohw, oh = r / g.out_w, ow = r - oh * g.out_w;
            const float* __restrict dp = dz + p * F;
#pragma omp simd
            for (i64 k = 0; k < F; ++k) pb[k] += dp[k];
            for (i64 kh = 0; kh < g.k_h; ++kh) {
                const i64 ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
                if (ih < 0 || ih >= g.in_h) continue;
                for (i64 kw = 0; kw < g.k_w; ++kw) {
                    const i64 iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
                    if (iw < 0 || iw >= g.in_w) continue;
                    const float* __restrict xp = x + ((n * g.in_h + ih) * g.in_w + iw) * C;
                    float* __restrict wt = pw + (kh * g.k_w + kw) * Cg * F;
                    if (depthwise) {
#pragma omp simd
                        for (i64 c = 0; c < C; ++c) wt[c] += xp[c] * dp[c];
                        continue;
                    }
                    for (i64 q = 0; q < G; ++q)
                        for (i64 ci = 0; ci < Cg; ++ci) {
                            const float xv = xp[q * Cg + ci];
                            float* __restrict wr = wt + ci * F + q * Fg;
                            const float* __restrict d = dp + q * Fg;
#pragma omp simd
                            for (i64 f = 0; f < Fg; ++f) wr[f] += xv * d[f];
                        }
                }
            }
        }
    }
    const i64 stride = WS + F;
#pragma omp parallel for schedule(static)
    for (i64 j = 0; j < WS + F; ++j) {
        double s = 0;
        for (int t = 0; t < T; ++t) s += part[size_t(t) * size_t(stride) + size_t(j)];
        if (j < WS)
            dw[j] = float(s);
        else if (db)
            db[j - WS] = float(s);
    }
}

}  // namespace grouped
}  // namespace cpu
}  // namespace dlconv
