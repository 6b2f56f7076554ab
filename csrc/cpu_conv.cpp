// cpu_conv.cpp — 2-D convolution on the CPU: forward, backward-data, backward-filter (+ bias grad).
//
// Which kernel runs (first that applies):
//   grouped      (cpu_conv_grouped.cpp): every geometry with groups != 1, all three passes.
//   (Winograd reports a non-finite result, from ±Inf / NaN in its inputs, and the direct kernel
//    then recomputes the call: the transforms would turn Inf − Inf into NaN; cpu_conv_winograd.h.)
//   v3_winograd  (cpu_conv_winograd.h, AVX-512): 3x3 or 5x5, stride 1, dilation 1, C >= 8,
//                F >= 16 — forward, backward-data (as a forward of dz with the flipped filter)
//                and backward-filter, Winograd F(4x4, 3x3) or F(2x2, 3x3) (backward passes by
//                the output size, the forward F(2x2): winograd::tile_3x3) / F(2x2, 5x5) (5x5: every pass measured
//                faster than v2_direct, e.g. 1.7x forward and backward-data at 64x28x28x32->64).
//   v2_direct    (cpu_conv_direct.h, AVX-512): any other geometry for forward and backward-filter.
//   v2_subpixel  (cpu_conv_subpixel.h, AVX-512): backward-data of any other geometry, as one
//                v2_direct forward of dz per sub-pixel phase (stride_h·stride_w of them; stride 1:
//                one, with the flipped, transposed filter), written into dx in place.  The phase
//                geometry is dlconv.shapes.transposed_geometry, mirrored in geometry.h.
//   v1 igemm     (below, on cpu_gemm.h): builds without AVX-512.
// v1 is the implicit GEMM described next (no im2col buffer: A tiles are gathered from NHWC memory
// as the microkernel needs them).
//
// Activation derivative (backward passes called with act != linear and y, the activation's
// output): dz = act'(y) · dy (cpu_act.h) is applied where the kernel reads dz — the Winograd
// input / dz-tile loads and the direct backward-filter's chunk copy — so the Keras layers' relu
// needs no activation-backward pass and no dz array.  The other paths (igemm, the direct forward
// used for backward-data with dilation) form dz in a temporary first (ActGrad below).
//
// Forward ("cpu_igemm"):  y[m, k] = act(b[k] + Σ_j A[m, j] · w[j, k])
//   m = (n, oh, ow) output pixel (M = N·OH·OW),  j = (kh, kw, c) (K = KH·KW·C),  w is HWIO = [K, F].
//   A[m, (kh, kw, c)] = x[n, ih, iw, c],  ih = oh·stride_h − pad_top + kh·dil_h,
//                                         iw = ow·stride_w − pad_left + kw·dil_w,
//   zero when (ih, iw) falls in the padding.  For fixed (pixel, tap) the C channels are contiguous
//   in x, so packing a row of A is one memcpy (or memset for padding) per tap.
//   One OpenMP thread owns whole MR-pixel tiles of y (all F filters), static schedule.
//
// Backward-data:  dx[m', c] = Σ_{(kh, kw, k)} dz[n, oh, ow, k] · w[kh, kw, c, k]
//   m' = (n, ih, iw) input pixel; the tap (kh, kw) reached it from the output pixel
//   oh = (ih + pad_top − kh·dil_h) / stride_h, ow likewise, a term only when the division is
//   exact and 0 <= oh < OH, 0 <= ow < OW (otherwise zero: padding, stride gaps, edges).
//   B = wᵀ per tap: wt[kh, kw, k, c] (weights-sized copy per call).  Row-major A driver.
//
// Backward-filter:  dw[(kh, kw, c), k] = Σ_m A[m, (kh, kw, c)] · dz[m, k];  db[k] = Σ_m dz[m, k]
//   The same A as the forward pass, transposed: the reduction runs over the M output pixels,
//   each thread takes a slice of pixels and a private dw partial (k-major A driver).
#include <omp.h>

#include <cstring>
#include <vector>

#include "cpu_act.h"
#include "cpu_conv_direct.h"
#include "cpu_conv_grouped.h"
#include "cpu_conv_subpixel.h"
#include "cpu_conv_winograd.h"
#include "cpu_gemm.h"
#include "cpu_kernels.h"

namespace dlconv {
namespace cpu {

namespace {

// dst[0 .. kc) = A[m, k0 .. k0 + kc) of the forward im2col row of output pixel m.
inline void gather_row(const ConvGeometry& g, const float* x, i64 m, i64 k0, i64 kc, float* dst) {
    const i64 ohw = g.out_h * g.out_w;
    const i64 n = m / ohw, r = m - n * ohw, oh = r / g.out_w, ow = r - oh * g.out_w;
    const i64 ih0 = oh * g.stride_h - g.pad_top, iw0 = ow * g.stride_w - g.pad_left;
    const float* xn = x + n * g.in_h * g.in_w * g.in_c;
    const i64 C = g.in_c, kend = k0 + kc;
    for (i64 k = k0; k < kend;) {
        const i64 t = k / C, c = k - t * C, run = std::min(C - c, kend - k);
        const i64 kh = t / g.k_w, kw = t - kh * g.k_w;
        const i64 ih = ih0 + kh * g.dil_h, iw = iw0 + kw * g.dil_w;
        if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
            std::memcpy(dst + (k - k0), xn + (ih * g.in_w + iw) * C + c, run * sizeof(float));
        else
            std::memset(dst + (k - k0), 0, run * sizeof(float));
        k += run;
    }
}

// Σ over rows of a [P, F] matrix into out[F] (double accumulation, threads split the rows).
void column_sums(i64 P, i64 F, const float* a, float* out) {
    const int T = omp_get_max_threads();
    std::vector<double> part(size_t(T) * F, 0.0);
#pragma omp parallel num_threads(T)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        double* s = part.data() + size_t(tid) * F;
        for (i64 p = P * tid / nt; p < P * (tid + 1) / nt; ++p) {
            const float* row = a + p * F;
#pragma omp simd
            for (i64 j = 0; j < F; ++j) s[j] += row[j];
        }
    }
    for (i64 j = 0; j < F; ++j) {
        double s = 0;
        for (int t = 0; t < T; ++t) s += part[size_t(t) * F + j];
        out[j] = float(s);
    }
}

// dz = act'(y) · dy into a temporary (the paths that cannot apply the derivative as they read dy).
struct ActGrad {
    Buf buf;
    const float* dz;
    ActGrad(const ConvGeometry& g, const float* dy, const float* y, int act)
        : buf(act == ACT_LINEAR ? 0 : g.batch * g.out_h * g.out_w * g.filters), dz(dy) {
        if (act == ACT_LINEAR) return;
        activation_backward(1, g.batch * g.out_h * g.out_w * g.filters, dy, y, act, buf.data);
        dz = buf.data;
    }
};

}  // namespace

bool conv2d_forward_applicable(const ConvGeometry& g, int variant) {
    if (g.groups != 1) return variant == CPU_CONV_AUTO;  // grouped: cpu_conv_grouped.cpp only
    switch (variant) {
        case CPU_CONV_AUTO:
        case CPU_CONV_IGEMM: return true;
#if defined(__AVX512F__)
        case CPU_CONV_DIRECT: return true;
        case CPU_CONV_WINOGRAD: return winograd::applicable(g);
#endif
        default: return false;
    }
}

void conv2d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y,
                    int variant) {
    if (g.groups != 1) return grouped::conv_forward(g, x, w, b, act, y);
#if defined(__AVX512F__)
    if (variant == CPU_CONV_AUTO) variant = winograd::applicable(g) ? CPU_CONV_WINOGRAD : CPU_CONV_DIRECT;
    if (variant == CPU_CONV_WINOGRAD && winograd::conv_forward(g, x, w, b, act, y)) return;
    if (variant == CPU_CONV_WINOGRAD) variant = CPU_CONV_DIRECT;  // non-finite: the direct sum's ±Inf
    if (variant == CPU_CONV_DIRECT) return direct::conv_forward(g, x, w, b, act, y);
#endif
    const i64 M = g.batch * g.out_h * g.out_w, K = g.k_h * g.k_w * g.in_c, F = g.filters;
    auto pack = [&](i64 m0, int rows, i64 k0, i64 kc, float* dst) {
        for (int i = 0; i < rows; ++i) gather_row(g, x, m0 + i, k0, kc, dst + i * KCP);
    };
    gemm_rowA(M, F, K, pack, w, F, y, F, b, act);
}

void conv2d_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx, const float* y,
                          int act) {
    if (g.groups != 1) return grouped::conv_backward_data(g, dz, w, dx, y, act);
    const i64 M = g.batch * g.in_h * g.in_w, C = g.in_c, F = g.filters, T = g.k_h * g.k_w;
#if defined(__AVX512F__)
    if (g.stride_h == 1 && g.stride_w == 1) {
        // Stride 1: one phase, every tap: dx = forward conv of dz with the flipped, transposed
        // filter, pads (K-1)·dil − pad (negative = crop); Winograd when it applies.
        const TransposedGeometry t = transposed_geometry(g);
        Buf wf(T * F * C);
        subpixel::phase_weights(g, t, w, wf.data);
        if (winograd::applicable(t.f) &&
            winograd::conv_backward_data(t.f, dz, wf.data, dx, y, act))
            return;
    }
    {
        const ActGrad dzg(g, dz, y, act);
        subpixel::conv_backward_data(g, dzg.dz, w, dx);  // also Winograd's non-finite fallback
        return;
    }
#endif
    const ActGrad dzg(g, dz, y, act);
    dz = dzg.dz;
    // wt[t, k, c] = w[t, c, k]: B of the GEMM, [T·F, C].
    Buf wt(T * F * C);
    for (i64 t = 0; t < T; ++t)
        for (i64 c = 0; c < C; ++c)
            for (i64 k = 0; k < F; ++k) wt.data[(t * F + k) * C + c] = w[(t * C + c) * F + k];
    const i64 hw = g.in_h * g.in_w;
    auto pack = [&](i64 m0, int rows, i64 k0, i64 kc, float* dst) {
        for (int i = 0; i < rows; ++i) {
            const i64 m = m0 + i, n = m / hw, r = m - n * hw, ih = r / g.in_w, iw = r - ih * g.in_w;
            const float* dzn = dz + n * g.out_h * g.out_w * F;
            float* d = dst + i * KCP;
            const i64 kend = k0 + kc;
            for (i64 k = k0; k < kend;) {
                const i64 t = k / F, f = k - t * F, run = std::min(F - f, kend - k);
                const i64 kh = t / g.k_w, kw = t - kh * g.k_w;
                const i64 ohn = ih + g.pad_top - kh * g.dil_h, own = iw + g.pad_left - kw * g.dil_w;
                const i64 oh = ohn / g.stride_h, ow = own / g.stride_w;
                if (ohn >= 0 && own >= 0 && oh * g.stride_h == ohn && ow * g.stride_w == own && oh < g.out_h &&
                    ow < g.out_w)
                    std::memcpy(d + (k - k0), dzn + (oh * g.out_w + ow) * F + f, run * sizeof(float));
                else
                    std::memset(d + (k - k0), 0, run * sizeof(float));
                k += run;
            }
        }
    };
    gemm_rowA(M, C, T * F, pack, wt.data, C, dx, C, nullptr, 0);
}

// The pool record of a 2x2 stride-2 valid max pool of g's output (cpu_pool.h).
static ConvGeometry pool2x2_of(const ConvGeometry& g) {
    ConvGeometry p{g.batch, g.out_h, g.out_w, g.filters, g.filters, 2, 2, 2, 2, 1, 1, 0, 0, 0, 0,
                   g.out_h / 2, g.out_w / 2};
    p.groups = g.filters;
    return p;
}

// dz of conv2d_backward_*_pool2x2 formed (the gather of max_pool2d_backward_local, relu folded).
static Buf pool2x2_dz(const ConvGeometry& g, const float* gp, const uint8_t* arg) {
    Buf dz(g.y_size());
    const ConvGeometry pg = pool2x2_of(g);
    if (pg.out_h > 0 && pg.out_w > 0) {
        max_pool2d_backward_local(pg, gp, arg, dz.data, true);
    } else {  // no window (OH or OW < 2): dz is all zero
        std::memset(dz.data, 0, g.y_size() * sizeof(float));
    }
    return dz;
}

void conv2d_backward_data_pool2x2(const ConvGeometry& g, const float* gp, const uint8_t* arg, const float* w,
                                  float* dx) {
#if defined(__AVX512F__)
    const winograd::PoolDz pd{gp, arg, g.out_h / 2, g.out_w / 2};
    if (g.groups == 1 && g.stride_h == 1 && g.stride_w == 1 && g.batch * pd.PH * pd.PW > 0) {
        const TransposedGeometry t = transposed_geometry(g);
        if (winograd::applicable(t.f)) {
            Buf wf(g.k_h * g.k_w * g.filters * g.in_c);
            subpixel::phase_weights(g, t, w, wf.data);
            if (winograd::conv_backward_data_pool(t.f, pd, wf.data, dx)) return;
        }
    }
#endif
    const Buf dz = pool2x2_dz(g, gp, arg);  // elsewhere, and after a non-finite Winograd result
    conv2d_backward_data(g, dz.data, w, dx);
}

void conv2d_backward_filter_pool2x2(const ConvGeometry& g, const float* x, const float* gp, const uint8_t* arg,
                                    float* dw, float* db) {
#if defined(__AVX512F__)
    const winograd::PoolDz pd{gp, arg, g.out_h / 2, g.out_w / 2};
    if (g.groups == 1 && winograd::applicable(g) && g.batch * pd.PH * pd.PW > 0 &&
        winograd::conv_backward_filter_pool(g, x, pd, dw, db))
        return;
#endif
    const Buf dz = pool2x2_dz(g, gp, arg);
    conv2d_backward_filter(g, x, dz.data, dw, db);
}

void conv2d_forward_relu_maxpool2x2(const ConvGeometry& g, const float* x, const float* w, const float* b, float* y,
                                    uint8_t* arg) {
    const ConvGeometry pg = pool2x2_of(g);
    check_pool_geometry(pg, "conv2d_forward_relu_maxpool2x2");
    if (g.batch == 0 || pg.out_h == 0 || pg.out_w == 0) return;
#if defined(__AVX512F__)
    if (g.groups == 1 && g.k_h == 3 && winograd::applicable(g) && winograd::conv_forward_relu_maxpool2x2(g, x, w, b, y, arg))
        return;
#endif
    Buf conv(g.y_size());  // elsewhere (and after a non-finite result): the two kernels
    conv2d_forward(g, x, w, b, ACT_RELU, conv.data, CPU_CONV_AUTO);
    max_pool2d_forward_local(pg, conv.data, y, arg);
}

void conv2d_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                            const float* y, int act) {
    if (g.groups != 1) return grouped::conv_backward_filter(g, x, dz, dw, db, y, act);
#if defined(__AVX512F__)
    if (!winograd::applicable(g) || !winograd::conv_backward_filter(g, x, dz, dw, db, y, act))
        direct::conv_backward_filter(g, x, dz, dw, db, y, act);  // also when Winograd saw ±Inf / NaN
    return;
#endif
    const ActGrad dzg(g, dz, y, act);
    dz = dzg.dz;
    const i64 M = g.k_h * g.k_w * g.in_c, F = g.filters, P = g.batch * g.out_h * g.out_w;
    auto pack = [&](i64 m0, i64 mrows, i64 p0, i64 pc, float* dst) {
        const i64 rtiles = (mrows + MR - 1) / MR;
        alignas(64) float seg[MC];
        std::memset(seg + mrows, 0, (rtiles * MR - mrows) * sizeof(float));
        for (i64 p = 0; p < pc; ++p) {
            gather_row(g, x, p0 + p, m0, mrows, seg);
            for (i64 r = 0; r < rtiles; ++r) std::memcpy(dst + (r * pc + p) * MR, seg + r * MR, MR * sizeof(float));
        }
    };
    gemm_kmajorA(M, F, P, pack, dz, F, dw, F);
    if (db) column_sums(P, F, dz, db);
}

}  // namespace cpu
}  // namespace dlconv
