// cuda_common.cuh — helpers shared by the CUDA C++ kernels: activations, launch checks, grids.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dlconv {
namespace cuda {

// Threads per block of the element-wise / gather kernels: 8 warps, a good default occupancy
// on sm_80/sm_90 (up to 8 resident blocks per SM at <= 32 registers per thread).
constexpr int THREADS_1D = 256;
// Cap of a grid-stride 1-D grid: far more blocks than any SM count needs; bigger work loops.
constexpr int64_t MAX_BLOCKS_1D = int64_t(1) << 20;

// Activation codes of dlconv/activations.py (0 linear, 1 relu, 2 sigmoid, 3 tanh).
__device__ __forceinline__ float act_forward(float z, int act) {
    switch (act) {
        case 1: return z < 0.f ? 0.f : z;  // relu as TensorFlow: NaN stays NaN
        case 2: return 1.f / (1.f + expf(-z));
        case 3: return tanhf(z);
        default: return z;
    }
}

// d act / dz written with the activation's output y.
__device__ __forceinline__ float act_grad_from_y(float y, int act) {
    switch (act) {
        case 1: return y > 0.f ? 1.f : 0.f;
        case 2: return y * (1.f - y);
        case 3: return 1.f - y * y;
        default: return 1.f;
    }
}

inline unsigned grid_1d(int64_t n, int threads = THREADS_1D) {
    int64_t b = (n + threads - 1) / threads;
    if (b < 1) b = 1;
    if (b > MAX_BLOCKS_1D) b = MAX_BLOCKS_1D;
    return unsigned(b);
}

// Turn the error of the launch just made into an exception naming the kernel.
inline void check_launch(const char* kernel) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        throw std::runtime_error(std::string("dlconv CUDA kernel ") + kernel + " failed to launch: " +
                                 cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

inline void check_call(cudaError_t e, const char* kernel, const char* what) {
    if (e != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(std::string("dlconv CUDA kernel ") + kernel + ": " + what + " failed: " +
                                 cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    }
}

}  // namespace cuda
}  // namespace dlconv
