// selftest.cu — checks of the emulator itself (cuda_emu.h), in CUDA syntax and rewritten like the
// kernels, so that what its header promises is tested: warp shuffles and votes per the CUDA
// programming guide, fresh NaN-filled shared memory per block, dynamic shared memory, atomics,
// refused launch configurations, and the errors it must report (barrier divergence, shared memory
// past the block or over 48 KiB, a float4 on a shared array that is not 16-byte aligned).
// The driver runs one by name (`selftest name=... out=...`); tests/test_cuda_emu.py checks results.
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

constexpr int SHFL_OUT = 5;  // values per thread written by shuffles_kernel

__global__ void shuffles_kernel(float* out) {
    const int lane = threadIdx.x % 32;
    float v = float(lane), s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    float* o = out + threadIdx.x * SHFL_OUT;
    o[0] = s;                                        // 0 + 1 + ... + 31 = 496 on every lane
    o[1] = __shfl_down_sync(0xffffffffu, v, 1, 8);   // lane + 1, except the last lane of each 8
    o[2] = __shfl_up_sync(0xffffffffu, v, 2, 16);    // lane - 2, except the first 2 lanes of each 16
    o[3] = __shfl_sync(0xffffffffu, v, 3, 8);        // lane 3 of each group of 8
    o[4] = float(__ballot_sync(0xffffffffu, lane & 1) == 0xAAAAAAAAu);
}

__global__ void fresh_shared_kernel(float* out) {
    __shared__ float s[4];
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];  // before any write: must not be the last block's 7
    __syncthreads();
    s[threadIdx.x] = 7.f;
}

__global__ void dynamic_shared_kernel(float* out) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = float(threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = dyn[blockDim.x - 1 - threadIdx.x];
}

__global__ void atomics_kernel(float* out) {
    atomicAdd(out, 1.f);
    atomicMax(reinterpret_cast<int*>(out + 1), int(blockIdx.x * blockDim.x + threadIdx.x));
}

__global__ void divergent_barrier_kernel(float* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.f;
}

__global__ void shared_oob_kernel(float* out) {
    __shared__ float s[4];
    s[threadIdx.x] = 1.f;  // launched with 5 threads
    out[threadIdx.x] = 1.f;
}

__global__ void shared_too_big_kernel(float* out) {
    __shared__ float big[13 * 1024];  // 52 KiB > 48 KiB
    big[threadIdx.x] = 1.f;
    out[threadIdx.x] = big[threadIdx.x];
}

__global__ void shared_float4_kernel(float* out, int aligned) {
    __shared__ __align__(16) float a[8];
    __shared__ float u[8];  // float alignment only: the emulator places it at 8 mod 16
    float* s = aligned ? a : u;
    s[threadIdx.x] = float(threadIdx.x);
    __syncthreads();
    const float4 v = *reinterpret_cast<const float4*>(s);
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

void check(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e));
}

}  // namespace

// Runs self-test `name` writing into out (n floats); prints what the test compares.
void emu_selftest(const std::string& name, float* out, size_t n) {
    if (name == "shuffles") {
        shuffles_kernel<<<1, 64>>>(out);  // n >= 64 * SHFL_OUT
    } else if (name == "fresh_shared") {
        fresh_shared_kernel<<<3, 4>>>(out);
    } else if (name == "dynamic_shared") {
        dynamic_shared_kernel<<<1, 64, 64 * sizeof(float)>>>(out);
    } else if (name == "atomics") {
        cudaMemset(out, 0, 2 * sizeof(float));
        atomics_kernel<<<4, 256>>>(out);
    } else if (name == "bad_config") {
        divergent_barrier_kernel<<<1, 1025>>>(out);
        std::printf("threads 1025: %s\n", cudaGetErrorName(cudaGetLastError()));
        divergent_barrier_kernel<<<dim3(1, 65536), 1>>>(out);
        std::printf("grid.y 65536: %s\n", cudaGetErrorName(cudaGetLastError()));
        divergent_barrier_kernel<<<1, 1, 49 * 1024>>>(out);
        std::printf("smem 49 KiB: %s\n", cudaGetErrorName(cudaGetLastError()));
        return;
    } else if (name == "divergent_barrier") {
        divergent_barrier_kernel<<<1, 64>>>(out);
    } else if (name == "shared_oob") {
        shared_oob_kernel<<<1, 5>>>(out);
    } else if (name == "shared_too_big") {
        shared_too_big_kernel<<<1, 32>>>(out);
    } else if (name == "shared_float4_aligned") {
        shared_float4_kernel<<<1, 8>>>(out, 1);
    } else if (name == "shared_float4_unaligned") {
        shared_float4_kernel<<<1, 8>>>(out, 0);
    } else {
        throw std::runtime_error("unknown self-test " + name);
    }
    (void)n;
    check(name.c_str());
}
