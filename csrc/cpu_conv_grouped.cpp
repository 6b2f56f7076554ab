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
// so no channel is copied or transposed.  The index maps are written once, as walkers that call
// each pass's body: output_taps (forward, backward-filter), input_taps (backward-data's gather),
// group_channels (the (q, ci) nest around the f < Fg run).
//
// Wide groups (Cg >= PACK_MIN_CG, Fg >= PACK_MIN_FG) instead run each group through cpu_conv.cpp's
// ungrouped kernels on contiguous copies of its slices (see `packed` below): one op call, G kernel
// runs inside it.
//
// Innermost loops run over a contiguous run of one pixel's channels/filters, vectorised by the
// compiler: over f < Fg (grouped), or over the C channels themselves when Cg = Fg = 1
// (depthwise with multiplier 1: depthwise_forward / depthwise_backward_data keep one pixel's
// DW_BLOCK channels in registers over all taps; backward-filter's `depthwise` branch streams).
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
#include "cpu_kernels.h"

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

// Wide groups (Cg >= PACK_MIN_CG and Fg >= PACK_MIN_FG) run group by group through the ungrouped
// kernels of cpu_conv.cpp (Winograd / direct / implicit GEMM, register-blocked), on contiguous
// copies of the group's channel slice: the copies cost O(|x| + |y| + |w|) per call against
// O(KH·KW·Cg) multiply-adds per output, so they pay once a group is a few vectors wide; narrower
// groups (depthwise, Cg or Fg of a few channels) stay on the loops below, whose inner runs the
// packed kernels' 16-wide tiles would mostly waste.
constexpr i64 PACK_MIN_CG = 8;
constexpr i64 PACK_MIN_FG = 16;

bool packed(const ConvGeometry& g) {
    return g.in_c / g.groups >= PACK_MIN_CG && g.filters / g.groups >= PACK_MIN_FG;
}

// One group's geometry: the same record with C/G channels, F/G filters, groups = 1.
ConvGeometry one_group(const ConvGeometry& g) {
    ConvGeometry o = g;
    o.in_c = g.in_c / g.groups;
    o.filters = g.filters / g.groups;
    o.groups = 1;
    return o;
}

// dst[r, 0 .. width) = src[r, off .. off + width) for rows r < rows (src row length ld).
void slice_cols(i64 rows, i64 width, const float* src, i64 ld, i64 off, float* dst) {
#pragma omp parallel for schedule(static)
    for (i64 r = 0; r < rows; ++r) std::memcpy(dst + r * width, src + r * ld + off, width * sizeof(float));
}

// dst[r, off .. off + width) = src[r, 0 .. width): the inverse.
void unslice_cols(i64 rows, i64 width, const float* src, float* dst, i64 ld, i64 off) {
#pragma omp parallel for schedule(static)
    for (i64 r = 0; r < rows; ++r) std::memcpy(dst + r * ld + off, src + r * width, width * sizeof(float));
}

// The loop nests every pass shares, each calling the pass's body (a lambda).  Walkers and bodies
// are forced inline (DLCONV_ALWAYS_INLINE): GCC's heuristics left them as calls ("call is cold"),
// which cost up to 2x on narrow groups (Cg = Fg = 4), where the body is a 4-float run.
#define DLCONV_ALWAYS_INLINE __attribute__((always_inline))
//
// Pixel p of an (N, H, W) grid → (n, h, w).
struct Pixel {
    i64 n, h, w;
};
DLCONV_ALWAYS_INLINE inline Pixel pixel(i64 p, i64 H, i64 W) {
    const i64 n = p / (H * W), r = p - n * (H * W), h = r / W;
    return {n, h, r - h * W};
}

// Scatter form (forward, backward-filter): tap(kh, kw, ih, iw) for every tap of output pixel
// (oh, ow) that lands inside the input; taps in the padding are skipped.
template <typename Tap>
DLCONV_ALWAYS_INLINE inline void output_taps(const ConvGeometry& g, i64 oh, i64 ow, Tap&& tap) {
    for (i64 kh = 0; kh < g.k_h; ++kh) {
        const i64 ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
        if (ih < 0 || ih >= g.in_h) continue;
        for (i64 kw = 0; kw < g.k_w; ++kw) {
            const i64 iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
            if (iw < 0 || iw >= g.in_w) continue;
            tap(kh, kw, ih, iw);
        }
    }
}

// Gather form (backward-data): tap(kh, kw, oh, ow) for every output pixel that input pixel
// (ih, iw) reached through tap (kh, kw): oh = (ih + pad_top − kh·dil_h) / stride_h when the
// division is exact and 0 <= oh < OH, likewise ow.
template <typename Tap>
DLCONV_ALWAYS_INLINE inline void input_taps(const ConvGeometry& g, i64 ih, i64 iw, Tap&& tap) {
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
            tap(kh, kw, oh, ow);
        }
    }
}

// One tap's work across the groups: body(q, ci) for group q < G and its input channel ci < Cg
// (the body runs its contiguous f < Fg run).
template <typename Body>
DLCONV_ALWAYS_INLINE inline void group_channels(i64 G, i64 Cg, Body&& body) {
    for (i64 q = 0; q < G; ++q)
        for (i64 ci = 0; ci < Cg; ++ci) body(q, ci);
}

// Depthwise with multiplier 1 (Cg = Fg = 1), AVX-512: channels are taken DW_BLOCK at a time, one
// pixel's block of accumulators held in one vector register over all its taps (per tap: one load
// of x, one of w, one FMA); the last block of a ragged C is masked (masked lanes never fault).
// Builds without AVX-512 use the generic loops below (Cg = Fg = 1 branches).
constexpr i64 DW_BLOCK = 16;  // floats per AVX-512 vector
// Vectors accumulated side by side (DW_CHAINS·DW_BLOCK channels per step): one FMA chain per tap
// would wait out the FMA latency (4 cycles) at every tap; 4 independent chains hide it.  Vectors
// past C are fully masked (their loads read nothing), so C < 64 costs no more time than one chain.
constexpr int DW_CHAINS = 4;

#if defined(__AVX512F__)
inline __mmask16 dw_mask(i64 nb) {
    return nb >= DW_BLOCK ? __mmask16(0xFFFF) : nb <= 0 ? __mmask16(0) : __mmask16((1u << nb) - 1u);
}

// DW_CHAINS vectors of accumulators for channels c0 .. c0 + DW_CHAINS·DW_BLOCK of one pixel
// (lanes past C masked off), started from init[c0 ..] (the bias) or 0.
struct DwBlock {
    __mmask16 k[DW_CHAINS];
    __m512 a[DW_CHAINS];
    DwBlock(i64 C, i64 c0, const float* init) {
        for (int u = 0; u < DW_CHAINS; ++u) {
            k[u] = dw_mask(C - c0 - u * DW_BLOCK);
            a[u] = init ? _mm512_maskz_loadu_ps(k[u], init + c0 + u * DW_BLOCK) : _mm512_setzero_ps();
        }
    }
    // a += p[0 ..] · q[0 ..] lane by lane (p, q already offset to c0).
    DLCONV_ALWAYS_INLINE void fma(const float* p, const float* q) {
        for (int u = 0; u < DW_CHAINS; ++u)
            a[u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k[u], p + u * DW_BLOCK),
                                   _mm512_maskz_loadu_ps(k[u], q + u * DW_BLOCK), a[u]);
    }
    void store(float* out) const {
        for (int u = 0; u < DW_CHAINS; ++u) _mm512_mask_storeu_ps(out + u * DW_BLOCK, k[u], a[u]);
    }
};

void depthwise_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y) {
    const i64 C = g.in_c, M = g.batch * g.out_h * g.out_w;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const Pixel o = pixel(m, g.out_h, g.out_w);
        for (i64 c0 = 0; c0 < C; c0 += DW_CHAINS * DW_BLOCK) {
            DwBlock acc(C, c0, b);
            output_taps(g, o.h, o.w, [&](i64 kh, i64 kw, i64 ih, i64 iw) DLCONV_ALWAYS_INLINE {
                acc.fma(x + ((o.n * g.in_h + ih) * g.in_w + iw) * C + c0, w + (kh * g.k_w + kw) * C + c0);
            });
            acc.store(y + m * C + c0);
        }
        epilogue(y + m * C, C, 1, C, nullptr, act);
    }
}

void depthwise_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx) {
    const i64 C = g.in_c, M = g.batch * g.in_h * g.in_w;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const Pixel i = pixel(m, g.in_h, g.in_w);
        for (i64 c0 = 0; c0 < C; c0 += DW_CHAINS * DW_BLOCK) {
            DwBlock acc(C, c0, nullptr);
            input_taps(g, i.h, i.w, [&](i64 kh, i64 kw, i64 oh, i64 ow) DLCONV_ALWAYS_INLINE {
                acc.fma(dz + ((i.n * g.out_h + oh) * g.out_w + ow) * C + c0, w + (kh * g.k_w + kw) * C + c0);
            });
            acc.store(dx + m * C + c0);
        }
    }
}
#endif

}  // namespace

void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y) {
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
#if defined(__AVX512F__)
    if (Cg == 1 && Fg == 1) return depthwise_forward(g, x, w, b, act, y);
#endif
    if (packed(g)) {
        const ConvGeometry o = one_group(g);
        const i64 P = g.batch * g.in_h * g.in_w, M = g.batch * g.out_h * g.out_w, R = g.k_h * g.k_w * Cg;
        Buf xs(P * Cg), ws(R * Fg), ys(M * Fg);
        for (i64 q = 0; q < G; ++q) {
            slice_cols(P, Cg, x, C, q * Cg, xs.data);
            slice_cols(R, Fg, w, F, q * Fg, ws.data);
            conv2d_forward(o, xs.data, ws.data, b ? b + q * Fg : nullptr, act, ys.data, CPU_CONV_AUTO);
            unslice_cols(M, Fg, ys.data, y, F, q * Fg);
        }
        return;
    }
    const i64 M = g.batch * g.out_h * g.out_w;
    const bool depthwise = Cg == 1 && Fg == 1;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const Pixel o = pixel(m, g.out_h, g.out_w);
        float* acc = y + m * F;  // accumulate in place: the row is this thread's alone
        std::memset(acc, 0, F * sizeof(float));
        output_taps(g, o.h, o.w, [&](i64 kh, i64 kw, i64 ih, i64 iw) DLCONV_ALWAYS_INLINE {
            const float* __restrict xp = x + ((o.n * g.in_h + ih) * g.in_w + iw) * C;
            const float* __restrict wt = w + (kh * g.k_w + kw) * Cg * F;
            if (depthwise) {
#pragma omp simd
                for (i64 c = 0; c < C; ++c) acc[c] += xp[c] * wt[c];
                return;
            }
            group_channels(G, Cg, [&](i64 q, i64 ci) DLCONV_ALWAYS_INLINE {
                float* __restrict a = acc + q * Fg;
                const float xv = xp[q * Cg + ci];
                const float* __restrict wr = wt + ci * F + q * Fg;
#pragma omp simd
                for (i64 f = 0; f < Fg; ++f) a[f] += xv * wr[f];
            });
        });
        epilogue(acc, F, 1, F, b, act);
    }
}

void conv_backward_data(const ConvGeometry& g, const float* dy, const float* w, float* dx, const float* y,
                        int act) {
    const Dz dzt(g, dy, y, act);
    const float* dz = dzt.p;
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
    const i64 M = g.batch * g.in_h * g.in_w;
#if defined(__AVX512F__)
    if (Cg == 1 && Fg == 1) return depthwise_backward_data(g, dz, w, dx);
#endif
    if (packed(g)) {
        const ConvGeometry o = one_group(g);
        const i64 Mo = g.batch * g.out_h * g.out_w, R = g.k_h * g.k_w * Cg;
        Buf dzs(Mo * Fg), ws(R * Fg), dxs(M * Cg);
        for (i64 q = 0; q < G; ++q) {
            slice_cols(Mo, Fg, dz, F, q * Fg, dzs.data);
            slice_cols(R, Fg, w, F, q * Fg, ws.data);
            conv2d_backward_data(o, dzs.data, ws.data, dxs.data, nullptr, ACT_LINEAR);
            unslice_cols(M, Cg, dxs.data, dx, C, q * Cg);
        }
        return;
    }
    const bool depthwise = Cg == 1 && Fg == 1;
#pragma omp parallel for schedule(static)
    for (i64 m = 0; m < M; ++m) {
        const Pixel i = pixel(m, g.in_h, g.in_w);
        float* __restrict acc = dx + m * C;
        std::memset(acc, 0, C * sizeof(float));
        input_taps(g, i.h, i.w, [&](i64 kh, i64 kw, i64 oh, i64 ow) DLCONV_ALWAYS_INLINE {
            const float* __restrict dp = dz + ((i.n * g.out_h + oh) * g.out_w + ow) * F;
            const float* __restrict wt = w + (kh * g.k_w + kw) * Cg * F;
            if (depthwise) {
#pragma omp simd
                for (i64 c = 0; c < C; ++c) acc[c] += dp[c] * wt[c];
                return;
            }
            group_channels(G, Cg, [&](i64 q, i64 ci) DLCONV_ALWAYS_INLINE {
                const float* __restrict wr = wt + ci * F + q * Fg;
                const float* __restrict d = dp + q * Fg;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (i64 f = 0; f < Fg; ++f) s += d[f] * wr[f];
                acc[q * Cg + ci] += s;
            });
        });
    }
}

void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dy, float* dw, float* db,
                          const float* y, int act) {
    const Dz dzt(g, dy, y, act);
    const float* dz = dzt.p;
    const i64 C = g.in_c, F = g.filters, G = g.groups, Cg = C / G, Fg = F / G;
    const i64 P = g.batch * g.out_h * g.out_w, WS = g.w_size();
    if (packed(g)) {
        const ConvGeometry o = one_group(g);
        const i64 Pin = g.batch * g.in_h * g.in_w, R = g.k_h * g.k_w * Cg;
        Buf xs(Pin * Cg), dzs(P * Fg), dws(R * Fg), dbs(Fg);
        for (i64 q = 0; q < G; ++q) {
            slice_cols(Pin, Cg, x, C, q * Cg, xs.data);
            slice_cols(P, Fg, dz, F, q * Fg, dzs.data);
            conv2d_backward_filter(o, xs.data, dzs.data, dws.data, dbs.data, nullptr, ACT_LINEAR);
            unslice_cols(R, Fg, dws.data, dw, F, q * Fg);
            if (db) std::memcpy(db + q * Fg, dbs.data, Fg * sizeof(float));
        }
        return;
    }
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
            const Pixel o = pixel(p, g.out_h, g.out_w);
            const float* __restrict dp = dz + p * F;
#pragma omp simd
            for (i64 k = 0; k < F; ++k) pb[k] += dp[k];
            output_taps(g, o.h, o.w, [&](i64 kh, i64 kw, i64 ih, i64 iw) DLCONV_ALWAYS_INLINE {
                const float* __restrict xp = x + ((o.n * g.in_h + ih) * g.in_w + iw) * C;
                float* __restrict wt = pw + (kh * g.k_w + kw) * Cg * F;
                if (depthwise) {
#pragma omp simd
                    for (i64 c = 0; c < C; ++c) wt[c] += xp[c] * dp[c];
                    return;
                }
                group_channels(G, Cg, [&](i64 q, i64 ci) DLCONV_ALWAYS_INLINE {
                    const float xv = xp[q * Cg + ci];
                    float* __restrict wr = wt + ci * F + q * Fg;
                    const float* __restrict d = dp + q * Fg;
#pragma omp simd
                    for (i64 f = 0; f < Fg; ++f) wr[f] += xv * d[f];
                });
            });
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
