// cuda_kernels.h — host launchers of the CUDA C++ kernels (implemented in cuda_conv.cu,
// cuda_dense.cu).  Pointers are device pointers already checked by bind_cuda.cpp against the
// geometry; every launcher enqueues on `stream` and throws std::runtime_error naming the kernel
// when CUDA reports an error.  Nothing here synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "geometry.h"

namespace dlconv {
namespace cuda {

enum ConvVariant : int { V1_DIRECT = 1, V2_SMEM_TILED = 2, V3_IMPLICIT_GEMM = 3 };

// y = act(conv(x, w) + b); b may be null.
void conv2d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y,
                    int variant, cudaStream_t stream);
void conv2d_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx, cudaStream_t stream);
// dw and db (db may be null); both are overwritten.
void conv2d_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                            cudaStream_t stream);

void dense_forward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* b, int act,
                   float* y, cudaStream_t stream);
// Any of dx, dw, db may be null (not computed).  y may be null when act is linear.
void dense_backward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* dy,
                    const float* y, int act, float* dx, float* dw, float* db, cudaStream_t stream);
void softmax(int64_t rows, int64_t cols, const float* z, float* out, cudaStream_t stream);
// act 0..3 element-wise over rows*cols, 4 = softmax row-wise.
void activation_backward(int64_t rows, int64_t cols, const float* dy, const float* y, int act, float* dz,
                         cudaStream_t stream);

// Internal (shared by cuda_conv.cu and cuda_dense.cu): zero db, then
// db[k] = Σ_p dz[p, k] · act'(y[p, k]) (y null: plain column sums of dz[P, F]).
void column_sums(int64_t P, int64_t F, const float* dz, const float* y, int act, float* db, cudaStream_t stream,
                 const char* kernel);

// Internal (cuda_workspace.cu): a scratch buffer of at least `floats` floats owned by
// `stream` (see that file: reused per stream, never shared between streams), the SM count of
// the current device, and a test hook forcing the number of K splits of the dense GEMMs
// (0 = the heuristic of cuda_dense.cu).
// K splits of the dense GEMM C[M, N] = A[M, K] B[K, N] on `sms` SMs (cuda_dense.cu).
int64_t split_k_splits(int64_t M, int64_t N, int64_t K, int64_t sms);
float* workspace(size_t floats, cudaStream_t stream, const char* kernel);
int sm_count(const char* kernel);
void set_split_k_override(int splits);
int split_k_override();

}  // namespace cuda
}  // namespace dlconv
