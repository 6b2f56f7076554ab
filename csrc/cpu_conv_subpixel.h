// cpu_conv_subpixel.h — backward-data cpu_v2_subpixel: dx of a convolution of any stride, dilation
// and padding as stride_h·stride_w stride-1 forward convolutions of dz, one per sub-pixel phase
// (header-only, internal; cpu_conv.cpp uses it when the build has AVX-512).
//
// Computes  dx[n, ih, iw, c] = Σ_{kh, kw, k} dz[n, oh, ow, k] · w[kh, kw, c, k]
//   over the taps with oh = (ih + pad_top − kh·dil_h) / stride_h exact and inside [0, OH)
//   (ow likewise).  The generic gather (v1, cpu_conv.cpp) tests every tap of every dx pixel for
//   that exact division; at stride 2 three taps in four miss, and each miss is a memset.
//
// Index map (dlconv.shapes.transposed_geometry, mirrored in geometry.h): the dx pixels of phase
//   (rh, rw) are ih = rh + stride_h·q, iw = rw + stride_w·p.  Only the taps
//   kh = tap_last_h − j·tap_step_h (j < taps_h) reach them, from oh = q − pad' + j·dil', so
//   dx[n, rh + s_h·q, rw + s_w·p, c] = Σ_{j, i, k} dz[n, q − pad_top' + j·dil_h', p − pad_left' + i·dil_w', k]
//                                                · wf[j, i, k, c],
//   wf[j, i, k, c] = w[tap_last_h − j·tap_step_h, tap_last_w − i·tap_step_w, c, k]:
//   the cpu_v2_regblock forward (cpu_conv_direct.h) of dz with the phase's sub-filter, every tap of
//   which hits.  Stride 1 is one phase with every tap (the flipped, transposed filter).
//
// What a thread owns: the direct forward's work item, one row of the phase's output — here one
//   dx row ih of one image, every s_w-th pixel of it, all C channels — written in place through
//   an OutMap (pixel stride s_w·C, row stride s_h·W·C), so no phase buffer and no scatter pass.
//   All phases share one parallel region: a thread takes rows (dynamic) of one phase, then of
//   the next, with no barrier between phases (direct::forward_rows, narrow_rows, zero_rows).
// Edges: the phase convolution's pads may be negative (it crops dz) or positive (dz padding, the
//   ragged right/bottom edge); the direct kernel's zero-padded row buffer handles both.  A phase
//   no tap reaches (kernel smaller than the stride, dilation sharing a factor with the stride)
//   is zero-filled; a phase with no dx pixel (H < stride) is skipped.
// Memory per call: the sub-filters of all phases (the taps partition the filter: about the weights' size,
//   twice with the aligned copy), and per thread one padded row buffer.
//
// Narrow variant (dx channels C <= NARROW_MAX_C, the input gradient of a stem on a 1-3-channel
//   image): the direct kernel's vectors run over C and would use C of 16 lanes.  narrow_tile
//   vectorises over the dz channels k instead: acc[r][c] (one zmm per (pixel, dx channel)) +=
//   dz[pixel r + tap, k-vector] · wk[tap, c, k-vector], reduced across lanes at the end of the
//   tile.  Register block: R pixels x C channels, R·C <= NARROW_ACC accumulators.  What a thread
//   owns: one phase output row (n, q), all its pixels and channels.  Edges: the dz rows the row
//   needs are copied into a zero-padded per-thread buffer (row stride Fp = F rounded up to 16,
//   the pad lanes zero), so neither the taps nor the k tail test bounds; a tap row outside dz is
//   skipped.
#pragma once

#if defined(__AVX512F__)

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_conv_direct.h"
#include "cpu_gemm.h"
#include "geometry.h"

namespace dlconv {
namespace cpu {
namespace subpixel {

// wf[j, i, k, c] of phase t (HWIO of the phase convolution: F input channels, C filters).
inline void phase_weights(const ConvGeometry& g, const TransposedGeometry& t, const float* w, float* wf) {
    const i64 C = g.in_c, F = g.filters;
    for (i64 j = 0; j < t.f.k_h; ++j)
        for (i64 i = 0; i < t.f.k_w; ++i) {
            const i64 kh = t.tap_last_h - j * t.tap_step_h, kw = t.tap_last_w - i * t.tap_step_w;
            const float* src = w + (kh * g.k_w + kw) * C * F;
            float* dst = wf + (j * t.f.k_w + i) * F * C;
            for (i64 c = 0; c < C; ++c)
                for (i64 k = 0; k < F; ++k) dst[k * C + c] = src[c * F + k];
        }
}

// Where phase t's output pixel (n, q, p) lies in dx: dx + (rh·W + rw)·C + n·H·W·C + q·s_h·W·C + p·s_w·C.
inline direct::OutMap phase_map(const ConvGeometry& g) {
    return {g.in_h * g.in_w * g.in_c, g.stride_h * g.in_w * g.in_c, g.stride_w * g.in_c};
}

// dx[...phase t...] = 0 (no tap reaches these pixels): called by every thread of an enclosing
// parallel region (static share of the rows, no barrier at the end).
inline void zero_rows(const ConvGeometry& g, const TransposedGeometry& t, float* dx) {
    const i64 C = g.in_c, rows = g.batch * t.f.out_h;
    const direct::OutMap om = phase_map(g);
    float* base = dx + (t.phase_h * g.in_w + t.phase_w) * C;
#pragma omp for schedule(static) nowait
    for (i64 r = 0; r < rows; ++r) {
        const i64 n = r / t.f.out_h, q = r - n * t.f.out_h;
        float* row = base + n * om.img + q * om.row;
        for (i64 p = 0; p < t.f.out_w; ++p) std::memset(row + p * om.pix, 0, C * sizeof(float));
    }
}

// ---------------------------------------------------------------------------- narrow variant
using direct::VL;
// Most dx channels the narrow variant takes: at 8 the direct kernel already fills half its lanes.
constexpr i64 NARROW_MAX_C = 8;
// Accumulators of one narrow register block (R·C zmm), leaving C weight vectors + 1 dz vector.
constexpr int NARROW_ACC = 16;
constexpr int narrow_rows(int c) { return NARROW_ACC / c; }
constexpr int NARROW_MAX_R = NARROW_ACC;

// out[r*pix + c] = Σ_{j < nrows} Σ_{i < taps_w} Σ_{kv} rows[j][(r + i*dil)*Fp + kv*16 ..] ·
//                  wk[(jt[j]*taps_w + i)*C*Fp + c*Fp + kv*16 ..]   for r < R, c < C.
template <int C, int R>
static void narrow_tile(const float* const* rows, const i64* jt, int nrows, i64 taps_w, i64 dil, i64 Fp,
                        const float* __restrict wk, float* __restrict out, i64 pix) {
    __m512 acc[R][C];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int j = 0; j < nrows; ++j) {
        for (i64 i = 0; i < taps_w; ++i) {
            const float* __restrict a = rows[j] + i * dil * Fp;
            const float* __restrict b = wk + (jt[j] * taps_w + i) * C * Fp;
            for (i64 kv = 0; kv < Fp; kv += VL) {
                __m512 wv[C];
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) wv[c] = _mm512_load_ps(b + c * Fp + kv);
#pragma GCC unroll 16
                for (int r = 0; r < R; ++r) {
                    const __m512 dv = _mm512_load_ps(a + r * Fp + kv);
#pragma GCC unroll 8
                    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(dv, wv[c], acc[r][c]);
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) out[r * pix + c] = _mm512_reduce_add_ps(acc[r][c]);
}

using NarrowFn = void (*)(const float* const*, const i64*, int, i64, i64, i64, const float*, float*, i64);
template <int C, int... Rs>
constexpr std::array<NarrowFn, NARROW_MAX_R> narrow_row(std::integer_sequence<int, Rs...>) {
    return {&narrow_tile<C, std::min(Rs + 1, narrow_rows(C))>...};
}
static inline NarrowFn narrow_kernel(i64 c, int r) {
    static constexpr std::array<std::array<NarrowFn, NARROW_MAX_R>, NARROW_MAX_C> t = {
        narrow_row<1>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<2>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<3>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<4>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<5>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<6>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<7>(std::make_integer_sequence<int, NARROW_MAX_R>{}),
        narrow_row<8>(std::make_integer_sequence<int, NARROW_MAX_R>{})};
    return t[c - 1][r - 1];
}

// wk[j, i, c, k] = w[tap_last_h - j*step_h, tap_last_w - i*step_w, c, k] of phase t, k padded
// to Fp with zeros (the narrow variant's sub-filter).
inline void narrow_weights(const ConvGeometry& g, const TransposedGeometry& t, const float* w, Buf& wk) {
    const i64 C = g.in_c, F = g.filters, Fp = (F + VL - 1) / VL * VL;
    const i64 TW = t.f.k_w, TH = t.f.k_h;
    wk.resize(TH * TW * C * Fp);
    for (i64 j = 0; j < TH; ++j)
        for (i64 i = 0; i < TW; ++i)
            for (i64 c = 0; c < C; ++c) {
                const i64 kh = t.tap_last_h - j * t.tap_step_h, kw = t.tap_last_w - i * t.tap_step_w;
                float* d = wk.data + ((j * TW + i) * C + c) * Fp;
                std::memcpy(d, w + ((kh * g.k_w + kw) * C + c) * F, F * sizeof(float));
                std::memset(d + F, 0, (Fp - F) * sizeof(float));
            }
}

// Phase t of dx (C <= NARROW_MAX_C) from dz and its narrow_weights: called by every thread of
// an enclosing parallel region, which share out the rows (dynamic, no barrier at the end).
inline void narrow_rows(const ConvGeometry& g, const TransposedGeometry& t, const float* dz, const Buf& wk,
                        float* dx) {
    const ConvGeometry& f = t.f;  // in = dz (F channels), filters = C
    const i64 C = g.in_c, F = g.filters, Fp = (F + VL - 1) / VL * VL;
    const i64 OW = f.out_w, TW = f.k_w, TH = f.k_h;
    const i64 Wb = OW + (TW - 1) * f.dil_w;  // buffer columns: dz columns -pad_left .. -pad_left + Wb
    const direct::OutMap om = phase_map(g);
    float* base = dx + (t.phase_h * g.in_w + t.phase_w) * C;
    const int Rm = narrow_rows(int(C));
    const i64 rows = g.batch * f.out_h;
    {
        Buf buf(TH * Wb * Fp);
        std::vector<const float*> rp(static_cast<size_t>(TH));
        std::vector<i64> jt(static_cast<size_t>(TH));
        std::vector<const float*> tp(static_cast<size_t>(TH));
#pragma omp for schedule(dynamic, 8) nowait
        for (i64 row = 0; row < rows; ++row) {
            const i64 n = row / f.out_h, q = row - n * f.out_h;
            float* orow = base + n * om.img + q * om.row;
            int nr = 0;
            for (i64 j = 0; j < TH; ++j) {
                const i64 ih = q - f.pad_top + j * f.dil_h;
                if (ih < 0 || ih >= f.in_h) continue;
                const float* src = dz + (n * f.in_h + ih) * f.in_w * F;
                float* d = buf.data + nr * Wb * Fp;
                // buffer columns [b0, b1) hold dz columns b - pad_left inside [0, in_w)
                const i64 b0 = std::min(Wb, std::max<i64>(0, f.pad_left));
                const i64 b1 = std::max(b0, std::min(Wb, f.in_w + f.pad_left));
                std::memset(d, 0, b0 * Fp * sizeof(float));
                if (Fp == F) {  // one run
                    std::memcpy(d + b0 * Fp, src + (b0 - f.pad_left) * F, (b1 - b0) * F * sizeof(float));
                } else {
                    for (i64 b = b0; b < b1; ++b) {
                        std::memcpy(d + b * Fp, src + (b - f.pad_left) * F, F * sizeof(float));
                        std::memset(d + b * Fp + F, 0, (Fp - F) * sizeof(float));
                    }
                }
                std::memset(d + b1 * Fp, 0, (Wb - b1) * Fp * sizeof(float));
                rp[nr] = d;
                jt[nr] = j;
                ++nr;
            }
            if (nr == 0) {
                for (i64 p = 0; p < OW; ++p) std::memset(orow + p * om.pix, 0, C * sizeof(float));
                continue;
            }
            const i64 ntile = (OW + Rm - 1) / Rm;
            for (i64 it = 0; it < ntile; ++it) {
                const i64 p0 = it * OW / ntile, p1 = (it + 1) * OW / ntile;
                for (int j = 0; j < nr; ++j) tp[j] = rp[j] + p0 * Fp;
                narrow_kernel(C, int(p1 - p0))(tp.data(), jt.data(), nr, TW, f.dil_w, Fp, wk.data,
                                                orow + p0 * om.pix, om.pix);
            }
        }
    }
}

// dx from dz (already multiplied by the activation derivative) and w, any stride.  The direct
// phases are prepared first (sub-filters, aligned) and then run in one parallel region, each
// thread taking rows of one phase after another (no barrier between phases).
inline void conv_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx) {
    const direct::OutMap om = phase_map(g);
    std::vector<TransposedGeometry> phases;
    for (i64 rh = 0; rh < g.stride_h; ++rh)
        for (i64 rw = 0; rw < g.stride_w; ++rw) {
            const TransposedGeometry t = transposed_geometry(g, rh, rw);
            if (t.f.out_h > 0 && t.f.out_w > 0) phases.push_back(t);  // else: no dx pixel in the phase
        }
    const size_t P = phases.size();
    std::vector<Buf> wf(P), wcopy(P);
    const bool narrow = g.in_c <= NARROW_MAX_C;
    std::vector<const float*> wp(P, nullptr);
    std::vector<i64> ldb(P, 0);
    for (size_t i = 0; i < P; ++i) {
        if (phases[i].empty()) continue;
        if (narrow) {
            narrow_weights(g, phases[i], w, wf[i]);
            continue;
        }
        wf[i].resize(phases[i].f.k_h * phases[i].f.k_w * g.in_c * g.filters);
        phase_weights(g, phases[i], w, wf[i].data);
        wp[i] = direct::aligned_weights(phases[i].f, wf[i].data, wcopy[i], ldb[i]);
    }
#pragma omp parallel num_threads(omp_get_max_threads())
    for (size_t i = 0; i < P; ++i) {
        const TransposedGeometry& t = phases[i];
        if (t.empty()) zero_rows(g, t, dx);  // no tap reaches the phase
        else if (narrow) narrow_rows(g, t, dz, wf[i], dx);
        else direct::forward_rows(t.f, dz, wp[i], ldb[i], nullptr, ACT_LINEAR,
                                  dx + (t.phase_h * g.in_w + t.phase_w) * g.in_c, om);
    }
}

}  // namespace subpixel
}  // namespace cpu
}  // namespace dlconv

#endif  // __AVX512F__
