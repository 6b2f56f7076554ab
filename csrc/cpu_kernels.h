// cpu_kernels.h — entry points of the C++ CPU kernels (raw pointers; bind_cpu.cpp checks every
// buffer against the geometry before calling them, with the GIL released).
#pragma once

#include <cstdint>

#include "cpu_pool.h"  // max_pool2d_* (2-D max pool, NHWC)
#include "geometry.h"

namespace dlconv {
namespace cpu {

// y[N,OH,OW,K] = act(conv(x[N,H,W,C], w[KH,KW,C,K]) + b[K]); b may be null.
// Conv-forward CPU variants, a numbered progression like the CUDA ones (names, passes and rules:
// the one table CPU_CONV_VARIANTS of conv_variants.h, exported as dlconv._C.CONV_VARIANTS):
//   1 cpu_v1_packgemm   implicit GEMM with packed tiles (cpu_gemm.h; every build)
//   2 cpu_v2_regblock   pack-free AVX-512 6x64 register block on NHWC/HWIO in place (cpu_conv_direct.h)
//   3 cpu_v3_winograd   Winograd (cpu_conv_winograd.h) where winograd::applicable
//   0 auto              the best applicable: 3, else 2, else 1
enum CpuConvVariant : int { CPU_CONV_AUTO = 0, CPU_CONV_IGEMM = 1, CPU_CONV_DIRECT = 2, CPU_CONV_WINOGRAD = 3 };
// Whether `variant` can run geometry g in this build (AVX-512 for 2 and 3; 3 also needs its shape).
bool conv2d_forward_applicable(const ConvGeometry& g, int variant);
void conv2d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y,
                    int variant = CPU_CONV_AUTO);
// relu(conv2d(x, w) + b) followed by the 2x2 stride-2 valid max pool, without writing the conv's
// output: y[N, OH/2, OW/2, F] and arg (cpu_pool.h's uint8 "local" arg, bit 7 LOCAL_NOT_POSITIVE),
// exactly what conv2d_forward(act = relu) then max_pool2d_forward_local give.  Winograd F(2x2)'s
// tiles are the pool windows (3x3, stride 1, undilated, groups 1, winograd::applicable); any other
// geometry, and a non-finite result there, takes those two kernels through a scratch buffer.
void conv2d_forward_relu_maxpool2x2(const ConvGeometry& g, const float* x, const float* w, const float* b, float* y,
                                    uint8_t* arg);
// dx[N,H,W,C] from dz[N,OH,OW,K] (gradient of the linear output) and w.
// With act != ACT_LINEAR (element-wise activations only), `dz` holds dL/dy of the activation and
// y[N,OH,OW,K] its output: the kernels use act'(y) · dz, formed as they read it (Winograd, and the
// direct backward-filter) or in a temporary first (the other paths).
void conv2d_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx,
                          const float* y = nullptr, int act = ACT_LINEAR);
// dw[KH,KW,C,K] and db[K] (db may be null) from x and dz; y / act as for backward-data.
void conv2d_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                            const float* y = nullptr, int act = ACT_LINEAR);

// The two backward passes of a relu conv whose output y feeds a 2x2 stride-2 valid max pool, with
// dz read from that pool's gradient instead of a dz tensor: gp[N, OH/2, OW/2, F] = dL/d(pool
// output) and arg its uint8 local arg (cpu_pool.h, LOCAL_NOT_POSITIVE marking members not > 0).
// Exactly conv2d_backward_data / _filter (act = linear) of the dz that max_pool2d_backward_local
// (relu = true) writes, bit for bit; that dz (19 MB for MNIST conv2 at batch 128) is formed only
// where Winograd does not apply (or saw a non-finite value), as a temporary.
void conv2d_backward_data_pool2x2(const ConvGeometry& g, const float* gp, const uint8_t* arg, const float* w,
                                  float* dx);
void conv2d_backward_filter_pool2x2(const ConvGeometry& g, const float* x, const float* gp, const uint8_t* arg,
                                    float* dw, float* db);

// y[M,N] = act(x[M,K] · w[K,N] + b[N]); b may be null.
void dense_forward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* b, int act,
                   float* y);
// dz = act'(y) * dy; dx = dz · wᵀ, dw = xᵀ · dz, db = Σ_rows dz.  y may be null when act is linear.
void dense_backward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* dy,
                    const float* y, int act, float* dx, float* dw, float* db);
// Row-wise softmax of z[rows, cols].
void softmax(int64_t rows, int64_t cols, const float* z, float* out);
// dz = dL/dz from dy and the activation output y (element-wise; act 4 = softmax, row-wise over cols).
void activation_backward(int64_t rows, int64_t cols, const float* dy, const float* y, int act, float* dz);

}  // namespace cpu
}  // namespace dlconv
