// cpu_act.h — the activation derivative dL/dz = act'(y) · dL/dy, written in terms of the
// activation's output y (so the pre-activation z need not be kept), for the element-wise
// activations of geometry.h:  relu: dy·(y > 0 ? 1 : 0), TensorFlow's ReluGrad (a NaN or ±Inf dy
// stays NaN even where y <= 0, and a NaN y gives 0·dy);  sigmoid: dy·y·(1 − y);
// tanh: dy·(1 − y²);  linear: dy.
// Two forms with the same arithmetic: `dact` over a run of floats (activation_backward, the
// temporaries of the unfused paths) and `act_grad` on one AVX-512 vector (the convolution
// kernels that apply the derivative as they read dy, so dz is never written to memory).
#pragma once

#include <cstring>

#include "cpu_gemm.h"
#include "geometry.h"

namespace dlconv {
namespace cpu {

// dz[i] = act'(y[i]) · dy[i] for i < n.  The switch is outside the loops so each loop is one
// vectorised stream.  y may be null for the linear activation.
inline void dact(const float* __restrict dy, const float* __restrict y, int act, float* __restrict dz, i64 n) {
    switch (act) {
        case ACT_RELU:
#pragma omp simd
            for (i64 i = 0; i < n; ++i) dz[i] = dy[i] * (y[i] > 0.f ? 1.f : 0.f);
            break;
        case ACT_SIGMOID:
#pragma omp simd
            for (i64 i = 0; i < n; ++i) dz[i] = dy[i] * (y[i] * (1.f - y[i]));
            break;
        case ACT_TANH:
#pragma omp simd
            for (i64 i = 0; i < n; ++i) dz[i] = dy[i] * (1.f - y[i] * y[i]);
            break;
        default:
            std::memcpy(dz, dy, n * sizeof(float));
    }
}

#if defined(__AVX512F__)
// One vector of the same: 16 lanes of dy and of y.  relu compares ordered (a NaN y gives
// 0·dy, as y > 0.f does above) and multiplies, so a NaN dy is never masked to 0.
static inline __m512 act_grad(__m512 dy, __m512 y, int act) {
    switch (act) {
        case ACT_RELU:
            return _mm512_mul_ps(dy, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                     _mm512_set1_ps(1.f)));
        case ACT_SIGMOID:
            return _mm512_mul_ps(dy, _mm512_mul_ps(y, _mm512_sub_ps(_mm512_set1_ps(1.f), y)));
        case ACT_TANH:
            return _mm512_mul_ps(dy, _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_mul_ps(y, y)));
        default:
            return dy;
    }
}
#endif

}  // namespace cpu
}  // namespace dlconv
