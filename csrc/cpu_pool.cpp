// cpu_pool.cpp — 2-D max pool, NHWC, forward and backward on the CPU (rules: cpu_pool.h).
//
// Index map: output (n, oh, ow, c) reads x[n, ih, iw, c] for ih = oh*stride_h - pad_top + kh,
// iw = ow*stride_w - pad_left + kw; only in-bounds taps are window members, so the kh/kw ranges
// are clipped per output ([kh_lo, kh_hi) below) and padding is never read.  Every window has a
// member: check_pool_geometry requires each pad < its pool size (what "valid"/"same" give).
//
// Forward: one OpenMP thread owns one output row (n, oh): all OW x C outputs of it.  Channels are
//   the SIMD axis: 16 lanes of AVX-512 per vector (NHWC: a window member's 16 channels are one
//   contiguous load), a scalar loop for the C % 16 tail (and for every channel without AVX-512).
//   Per lane two running values: `cur`/`idx` (the gradient's choice: the first member, then a
//   strictly greater one: vcmpps GT_OQ, false for NaN) and `ymax` = max(v, ymax) from the lowest
//   float32 (vmaxps returns its second operand when one is NaN, so NaN members are skipped).
// Backward, stored index (max_pool2d_backward_argmax): a gather, race-free without atomics: one
//   thread owns one input row (n, ih) of dx and, per pixel, adds the dy of every output whose
//   window covers it and whose arg is that pixel (oh in [ceil((ih+pad_top-k_h+1)/stride_h),
//   floor((ih+pad_top)/stride_h)], ow alike): ceil(k/s)^2 windows per pixel, one for 2x2/2.
//   The "local" variants (max_pool2d_{forward,backward}_local, the TensorFlow op's) store the
//   window tap kh*k_w + kw as uint8 instead of the int32 position (vpmovdb on the way out,
//   vpmovzxbd on the way in) and compare it with (ih - oh*stride_h + pad_top)*k_w + (iw -
//   ow*stride_w + pad_left): the same gather, a quarter of the index traffic.  Bit 7
//   (LOCAL_NOT_POSITIVE) marks a chosen member that is not > 0 (<= 0 or NaN): the backward masks
//   it off, or, with `relu`, lets such an entry match nothing (relu' of the pooled relu output,
//   folded in at no cost).
// Backward, recomputed (max_pool2d_backward_recompute): when windows do not overlap (stride >=
//   pool on both axes) one thread owns output row (n, oh) and the input rows from its window's
//   top to the next window's top: it zeroes them, recomputes each window's arg from x and stores
//   dy there (one scalar store per channel: each dx element has at most one window).  Overlapping windows: the arg is recomputed into a temporary and
//   gathered as above.
// Launch: `#pragma omp parallel for` over N*OH (or N*H) rows, dynamic in POOL_CHUNK_ROWS chunks.
#include "cpu_pool.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dlconv {
namespace cpu {

namespace {

using i64 = int64_t;

// The output of a window with no member above it (all -Inf / NaN): TensorFlow's initial value.
constexpr float POOL_LOWEST = std::numeric_limits<float>::lowest();
// Rows handed to an OpenMP thread at a time.  Dynamic, not static: the pass is memory-bound and
// short (a few ms), so one preempted thread of a static split holds the whole step up on a busy
// machine (measured: 2 threads 6x slower than 1 at load 12); 8 rows of MNIST's pool (~100 KB of x)
// make the hand-out cost negligible.
constexpr int POOL_CHUNK_ROWS = 8;
#if defined(__AVX512F__)
// Channels per AVX-512 vector (16 float32 lanes).
constexpr i64 LANES = 16;
#endif

inline i64 ceil_div_nonneg(i64 a, i64 b) { return (a + b - 1) / b; }

// The clipped tap range [lo, hi) of the window starting at `start` (may be < 0) on an axis of `n`.
inline void taps(i64 start, i64 k, i64 n, i64* lo, i64* hi) {
    *lo = std::max<i64>(0, -start);
    *hi = std::min<i64>(k, n - start);
}

// The arg (and, when y != null, the max) of the window of output (n, oh, ow) for channels
// [0, C), written to arg_out[C] / y_out[C]: the flat input position ih*W + iw (int32_t), or the
// window tap kh*k_w + kw (uint8_t: the "local" arg, a quarter of the traffic).
template <class ArgT>
void window(const ConvGeometry& g, const float* xn, i64 oh, i64 ow, float* y_out, ArgT* arg_out) {
    constexpr bool LOCAL = sizeof(ArgT) == 1;
    const i64 W = g.in_w, C = g.in_c;
    const i64 h0 = oh * g.stride_h - g.pad_top, w0 = ow * g.stride_w - g.pad_left;
    i64 kh_lo, kh_hi, kw_lo, kw_hi;
    taps(h0, g.k_h, g.in_h, &kh_lo, &kh_hi);
    taps(w0, g.k_w, W, &kw_lo, &kw_hi);
    const i64 p0 = (h0 + kh_lo) * W + (w0 + kw_lo);
    // What arg records for tap (kh, kw) at input position p.
    auto code = [&](i64 kh, i64 kw, i64 p) { return LOCAL ? kh * g.k_w + kw : p; };
    const i64 a0 = code(kh_lo, kw_lo, p0);
    i64 c = 0;
#if defined(__AVX512F__)
    const __m512 lowest = _mm512_set1_ps(POOL_LOWEST);
    for (; c + LANES <= C; c += LANES) {
        __m512 cur = _mm512_loadu_ps(xn + p0 * C + c);
        __m512 ymax = _mm512_max_ps(cur, lowest);
        __m512i idx = _mm512_set1_epi32(int32_t(a0));
        for (i64 kh = kh_lo; kh < kh_hi; ++kh)
            for (i64 kw = kw_lo; kw < kw_hi; ++kw) {
                const i64 p = (h0 + kh) * W + (w0 + kw);
                if (p == p0) continue;
                const __m512 v = _mm512_loadu_ps(xn + p * C + c);
                const __mmask16 gt = _mm512_cmp_ps_mask(v, cur, _CMP_GT_OQ);
                cur = _mm512_mask_mov_ps(cur, gt, v);
                idx = _mm512_mask_mov_epi32(idx, gt, _mm512_set1_epi32(int32_t(code(kh, kw, p))));
                ymax = _mm512_max_ps(v, ymax);
            }
        if (y_out) _mm512_storeu_ps(y_out + c, ymax);
        if (arg_out) {
            if constexpr (LOCAL) {
                const __mmask16 not_pos = _mm512_cmp_ps_mask(cur, _mm512_setzero_ps(), _CMP_NGT_UQ);
                idx = _mm512_mask_or_epi32(idx, not_pos, idx, _mm512_set1_epi32(LOCAL_NOT_POSITIVE));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(arg_out + c), _mm512_cvtepi32_epi8(idx));
            } else
                _mm512_storeu_si512(arg_out + c, idx);
        }
    }
#endif
    for (; c < C; ++c) {
        float cur = xn[p0 * C + c];
        float ymax = cur > POOL_LOWEST ? cur : POOL_LOWEST;
        i64 idx = a0;
        for (i64 kh = kh_lo; kh < kh_hi; ++kh)
            for (i64 kw = kw_lo; kw < kw_hi; ++kw) {
                const i64 p = (h0 + kh) * W + (w0 + kw);
                const float v = xn[p * C + c];
                if (v > cur) {
                    cur = v;
                    idx = code(kh, kw, p);
                }
                if (v > ymax) ymax = v;
            }
        if (y_out) y_out[c] = ymax;
        if (LOCAL && !(cur > 0.0f)) idx |= LOCAL_NOT_POSITIVE;
        if (arg_out) arg_out[c] = ArgT(idx);
    }
}

template <class ArgT>
void forward_impl(const ConvGeometry& g, const float* x, float* y, ArgT* arg) {
    const i64 OH = g.out_h, OW = g.out_w, C = g.in_c, HWC = g.in_h * g.in_w * C;
#pragma omp parallel for schedule(dynamic, POOL_CHUNK_ROWS)
    for (i64 r = 0; r < g.batch * OH; ++r) {
        const i64 n = r / OH, oh = r % OH;
        for (i64 ow = 0; ow < OW; ++ow) {
            const i64 o = (r * OW + ow) * C;
            window<ArgT>(g, x + n * HWC, oh, ow, y ? y + o : nullptr, arg ? arg + o : nullptr);
        }
    }
}

}  // namespace

void check_pool_geometry(const ConvGeometry& g, const char* kernel) {
    validate_geometry(g);
    auto fail = [&](const std::string& what) {
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": not a pool geometry (" + what +
                                    "): " + geometry_str(g));
    };
    if (g.groups != g.in_c || g.filters != g.in_c) fail("groups and filters must equal the channels");
    if (g.dil_h != 1 || g.dil_w != 1) fail("dilation must be 1");
    if (g.pad_top >= g.k_h || g.pad_bottom >= g.k_h || g.pad_left >= g.k_w || g.pad_right >= g.k_w)
        fail("every pad must be smaller than the pool size (a window of padding only has no member)");
    if (g.in_h * g.in_w > std::numeric_limits<int32_t>::max())
        fail("in_h * in_w must fit the int32 arg index");
}

void max_pool2d_forward(const ConvGeometry& g, const float* x, float* y, int32_t* arg) {
    check_pool_geometry(g, "max_pool2d_forward");
    if (g.batch == 0) return;
    forward_impl<int32_t>(g, x, y, arg);
}

namespace {

// The gather of max_pool2d_backward_argmax / _local: arg holds flat positions (int32_t) or window
// taps (uint8_t), compared per covering output with what this input pixel is to that window.
// relu (local only): entries whose chosen member was not > 0 match nothing (relu' folded in);
// otherwise LOCAL_NOT_POSITIVE is masked off before the comparison.
template <class ArgT>
void backward_gather(const ConvGeometry& g, const float* dy, const ArgT* arg, float* dx, bool relu = false) {
    constexpr bool LOCAL = sizeof(ArgT) == 1;
    const int32_t keep = LOCAL && !relu ? int32_t(LOCAL_NOT_POSITIVE - 1) : -1;   // bits compared
    const i64 H = g.in_h, W = g.in_w, C = g.in_c, OH = g.out_h, OW = g.out_w;
#pragma omp parallel for schedule(dynamic, POOL_CHUNK_ROWS)
    for (i64 r = 0; r < g.batch * H; ++r) {
        const i64 n = r / H, ih = r % H;
        const i64 oh_lo = ceil_div_nonneg(std::max<i64>(ih + g.pad_top - g.k_h + 1, 0), g.stride_h);
        const i64 oh_hi = std::min<i64>(OH - 1, (ih + g.pad_top) / g.stride_h);
        const float* dyn = dy + n * OH * OW * C;
        const ArgT* an = arg + n * OH * OW * C;
        for (i64 iw = 0; iw < W; ++iw) {
            const i64 ow_lo = ceil_div_nonneg(std::max<i64>(iw + g.pad_left - g.k_w + 1, 0), g.stride_w);
            const i64 ow_hi = std::min<i64>(OW - 1, (iw + g.pad_left) / g.stride_w);
            // This pixel as arg records it for the window of (oh, ow).
            auto code = [&](i64 oh, i64 ow) -> int32_t {
                return LOCAL ? int32_t((ih - oh * g.stride_h + g.pad_top) * g.k_w + (iw - ow * g.stride_w + g.pad_left))
                             : int32_t(ih * W + iw);
            };
            float* dxp = dx + (r * W + iw) * C;
            i64 c = 0;
#if defined(__AVX512F__)
            for (; c + LANES <= C; c += LANES) {
                __m512 acc = _mm512_setzero_ps();
                for (i64 oh = oh_lo; oh <= oh_hi; ++oh)
                    for (i64 ow = ow_lo; ow <= ow_hi; ++ow) {
                        const i64 o = (oh * OW + ow) * C + c;
                        __m512i a;
                        if constexpr (LOCAL)
                            a = _mm512_and_si512(
                                _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(an + o))),
                                _mm512_set1_epi32(keep));
                        else
                            a = _mm512_loadu_si512(an + o);
                        const __mmask16 m = _mm512_cmpeq_epi32_mask(a, _mm512_set1_epi32(code(oh, ow)));
                        acc = _mm512_mask_add_ps(acc, m, acc, _mm512_loadu_ps(dyn + o));
                    }
                _mm512_storeu_ps(dxp + c, acc);
            }
#endif
            for (; c < C; ++c) {
                float acc = 0.0f;
                for (i64 oh = oh_lo; oh <= oh_hi; ++oh)
                    for (i64 ow = ow_lo; ow <= ow_hi; ++ow) {
                        const i64 o = (oh * OW + ow) * C + c;
                        if ((int32_t(an[o]) & keep) == code(oh, ow)) acc += dyn[o];
                    }
                dxp[c] = acc;
            }
        }
    }
}

}  // namespace

void max_pool2d_backward_argmax(const ConvGeometry& g, const float* dy, const int32_t* arg, float* dx) {
    check_pool_geometry(g, "max_pool2d_backward");
    backward_gather<int32_t>(g, dy, arg, dx);
}

void max_pool2d_forward_local(const ConvGeometry& g, const float* x, float* y, uint8_t* arg) {
    check_pool_geometry(g, "max_pool2d_forward_local");
    if (g.k_h * g.k_w > MAX_LOCAL_TAPS)
        throw std::invalid_argument("dlconv C++ max_pool2d_forward_local: a " + std::to_string(g.k_h) + "x" +
                                    std::to_string(g.k_w) + " pool has more taps than a uint8 arg holds (" +
                                    std::to_string(MAX_LOCAL_TAPS) + ")");
    if (g.batch == 0) return;
    forward_impl<uint8_t>(g, x, y, arg);
}

void max_pool2d_backward_local(const ConvGeometry& g, const float* dy, const uint8_t* arg, float* dx, bool relu) {
    check_pool_geometry(g, "max_pool2d_backward_local");
    if (g.k_h * g.k_w > MAX_LOCAL_TAPS)
        throw std::invalid_argument("dlconv C++ max_pool2d_backward_local: a " + std::to_string(g.k_h) + "x" +
                                    std::to_string(g.k_w) + " pool has more taps than a uint8 arg holds (" +
                                    std::to_string(MAX_LOCAL_TAPS) + ")");
    backward_gather<uint8_t>(g, dy, arg, dx, relu);
}

void max_pool2d_backward_recompute(const ConvGeometry& g, const float* x, const float* dy, float* dx) {
    check_pool_geometry(g, "max_pool2d_backward");
    if (g.batch == 0) return;
    if (g.stride_h < g.k_h || g.stride_w < g.k_w) {  // overlapping windows: recompute, then gather
        std::vector<int32_t> arg(static_cast<size_t>(g.y_size()));
        forward_impl<int32_t>(g, x, nullptr, arg.data());
        max_pool2d_backward_argmax(g, dy, arg.data(), dx);
        return;
    }
    const i64 H = g.in_h, W = g.in_w, C = g.in_c, OH = g.out_h, OW = g.out_w, HWC = H * W * C;
#pragma omp parallel for schedule(dynamic, POOL_CHUNK_ROWS)
    for (i64 r = 0; r < g.batch * OH; ++r) {
        const i64 n = r / OH, oh = r % OH;
        // The input rows this output row owns: from its window's top to the next one's.
        const i64 lo = oh == 0 ? 0 : std::clamp<i64>(oh * g.stride_h - g.pad_top, 0, H);
        const i64 hi = oh == OH - 1 ? H : std::clamp<i64>((oh + 1) * g.stride_h - g.pad_top, 0, H);
        float* dxn = dx + n * HWC;
        if (hi > lo) std::memset(dxn + lo * W * C, 0, size_t((hi - lo) * W * C) * sizeof(float));
        std::vector<int32_t> idx(static_cast<size_t>(C));
        for (i64 ow = 0; ow < OW; ++ow) {
            window<int32_t>(g, x + n * HWC, oh, ow, nullptr, idx.data());
            const float* d = dy + (r * OW + ow) * C;
            for (i64 c = 0; c < C; ++c) dxn[i64(idx[size_t(c)]) * C + c] = d[c];
        }
    }
}

}  // namespace cpu
}  // namespace dlconv
