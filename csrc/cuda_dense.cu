// cuda_dense.cu — dense layer, softmax and activation gradients on CUDA.
//
// One GEMM kernel serves the forward and both weight-side backward products:
//   C[m, n] = epi( Σ_j A(m, j) · B(j, n) ),   C row-major [M, N],
// where an operand is a strided view  X(i, j) = p[i·s0 + j·s1], optionally scaled on load by the
// activation derivative act'(y[i·s0 + j·s1]) (so dz = act'(y) ⊙ dy is never stored):
//   forward  y  = act(x·w + b):  A = x (s0 = K, s1 = 1), B = w (N, 1), epilogue bias + act;
//   dx = dz·wᵀ:                  A = dy·act'(y) (N, 1),  B(j, k) = w[k, j] (1, N);
//   dw = xᵀ·dz:                  A(k, m) = x[m, k] (1, K), B = dy·act'(y) (N, 1).
// Block tile 64x64, 256 threads, 4x4 register block per thread, BK = 16 slices in shared memory
// (the v3 structure of cuda_conv.cu with scalar, stride-aware loads: a warp reads along whichever
// index of the operand is contiguous).  Grid (⌈M/64⌉, ⌈N/64⌉, splits).  Ragged edges load zeros,
// skip stores.
// Split-K: when the output has too few tiles to fill the GPU (the dense forward 128x9216 → 128 is
// 2x2 = 4 blocks on 132 SMs, each walking all 9216 in 576 serial slices), blockIdx.z owns the
// reduction range [z·k_len, (z+1)·k_len) and writes its raw 64x64 partial to a per-stream workspace
// (cuda_workspace.cu) at part[z, m, n]; a second kernel, splitk_reduce, adds part[0..splits) in that
// fixed order (one thread per C element, grid-stride) and applies bias + activation: deterministic,
// no atomics.  splits = 1 writes C directly with the epilogue, as before.  Choice: split_k_splits.
// db = Σ_m dz[m, :] reuses column_sums (cuda_conv.cu).
// Softmax: one block owns one row (grid-stride over rows): block max, block Σ exp(z − max), scale.
// Activation backward: element-wise grid-stride kernel; softmax's row-wise form one block per row.
#include <cuda_runtime.h>

#include <string>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace dlconv {
namespace cuda {

namespace {

constexpr int G_BM = 64, G_BN = 64, G_BK = 16, G_TM = 4, G_TN = 4;  // same tile shape as conv v3
constexpr int G_THREADS = (G_BM / G_TM) * (G_BN / G_TN);            // 256
constexpr int ROW_THREADS = 256;  // threads per row of softmax: 8 warps reduce one row
constexpr int64_t MAX_GRID_Y = 65535;
constexpr int64_t MAX_ROW_BLOCKS = 65535;
// Split-K: a split keeps at least 16 BK slices (load/compute balance of a 64x64 tile) ...
constexpr int64_t SPLIT_K_MIN_LEN = 16 * G_BK;
// ... and the splits aim at two resident 256-thread blocks per SM (one wave, latency hidden) ...
constexpr int64_t SPLIT_K_BLOCKS_PER_SM = 2;
// ... but never more than 64 partials per element (the reduce pass reads each one) ...
constexpr int64_t SPLIT_K_MAX = 64;
// ... nor a workspace above 16 Mi floats (64 MiB).
constexpr int64_t SPLIT_K_MAX_WORKSPACE = int64_t(1) << 24;

struct Operand {
    const float* p;
    int64_t s0, s1;
    const float* y;  // when non-null: multiply by act'(y[same offset])
    int act;
};

__device__ __forceinline__ float load_op(const Operand& o, int64_t i, int64_t j) {
    const int64_t off = i * o.s0 + j * o.s1;
    const float v = o.p[off];
    return o.y ? v * act_grad_from_y(o.y[off], o.act) : v;
}

__global__ void __launch_bounds__(G_THREADS)
gemm_tiled(int64_t M, int64_t N, int64_t K, int64_t k_len, Operand A, Operand B, const float* __restrict__ bias,
           int act, float* __restrict__ C, float* __restrict__ part) {
    __shared__ __align__(16) float As[G_BK][G_BM + 4];  // As[j][m]
    __shared__ __align__(16) float Bs[G_BK][G_BN];      // Bs[j][n]
    const int tid = threadIdx.x, tx = tid % (G_BN / G_TN), ty = tid / (G_BN / G_TN);
    const int64_t m0 = int64_t(blockIdx.x) * G_BM, n0 = int64_t(blockIdx.y) * G_BN;
    const bool a_rows = A.s1 == 1;  // A contiguous along j: threads walk j; else walk m
    const bool b_rows = B.s1 == 1;  // B contiguous along n: threads walk n; else walk j
    float acc[G_TM][G_TN];
#pragma unroll
    for (int i = 0; i < G_TM; ++i)
#pragma unroll
        for (int j = 0; j < G_TN; ++j) acc[i][j] = 0.f;
    const int64_t k_lo = int64_t(blockIdx.z) * k_len;
    const int64_t k_hi = k_lo + k_len < K ? k_lo + k_len : K;
    for (int64_t j0 = k_lo; j0 < k_hi; j0 += G_BK) {
#pragma unroll
        for (int l = 0; l < (G_BM * G_BK) / G_THREADS; ++l) {
            const int idx = tid + l * G_THREADS;
            const int am = a_rows ? idx / G_BK : idx % G_BM, ak = a_rows ? idx % G_BK : idx / G_BM;
            const int64_t m = m0 + am, j = j0 + ak;
            As[ak][am] = (m < M && j < k_hi) ? load_op(A, m, j) : 0.f;
        }
#pragma unroll
        for (int l = 0; l < (G_BK * G_BN) / G_THREADS; ++l) {
            const int idx = tid + l * G_THREADS;
            const int bk = b_rows ? idx / G_BN : idx % G_BK, bn = b_rows ? idx % G_BN : idx / G_BK;
            const int64_t j = j0 + bk, n = n0 + bn;
            Bs[bk][bn] = (j < k_hi && n < N) ? load_op(B, j, n) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < G_BK; ++k) {
            const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * G_TM]);
            const float4 bb = *reinterpret_cast<const float4*>(&Bs[k][tx * G_TN]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {bb.x, bb.y, bb.z, bb.w};
#pragma unroll
            for (int i = 0; i < G_TM; ++i)
#pragma unroll
                for (int j = 0; j < G_TN; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < G_TM; ++i) {
        const int64_t m = m0 + ty * G_TM + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < G_TN; ++j) {
            const int64_t n = n0 + tx * G_TN + j;
            if (n >= N) continue;
            if (part)
                part[(int64_t(blockIdx.z) * M + m) * N + n] = acc[i][j];
            else
                C[m * N + n] = act_forward(acc[i][j] + (bias ? bias[n] : 0.f), act);
        }
    }
}

// C[m, n] = act(bias[n] + Σ_{z = 0..splits-1} part[z, m, n]), z in order: the split-K epilogue.
__global__ void splitk_reduce(int64_t M, int64_t N, int64_t splits, const float* __restrict__ part,
                              const float* __restrict__ bias, int act, float* __restrict__ C) {
    const int64_t total = M * N;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        float s = 0.f;
        for (int64_t z = 0; z < splits; ++z) s += part[z * total + idx];
        C[idx] = act_forward(s + (bias ? bias[idx % N] : 0.f), act);
    }
}

// Block-wide reduction of v (op 0 = sum, 1 = max); every thread gets the result.
__device__ float block_reduce(float v, int op, float* shared /* >= 32 floats */) {
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = op ? fmaxf(v, u) : v + u;
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = (blockDim.x + 31) / 32;
    __syncthreads();  // shared may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float r = shared[0];
    for (int w = 1; w < nwarps; ++w) r = op ? fmaxf(r, shared[w]) : r + shared[w];
    return r;
}

__global__ void softmax_rows(int64_t rows, int64_t cols, const float* __restrict__ z, float* __restrict__ out) {
    __shared__ float red[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* a = z + r * cols;
        float* o = out + r * cols;
        float mx = -INFINITY;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) mx = fmaxf(mx, a[j]);
        mx = block_reduce(mx, 1, red);
        float s = 0.f;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s += expf(a[j] - mx);
        s = block_reduce(s, 0, red);
        const float inv = 1.f / s;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) o[j] = expf(a[j] - mx) * inv;
    }
}

__global__ void softmax_backward_rows(int64_t rows, int64_t cols, const float* __restrict__ dy,
                                      const float* __restrict__ y, float* __restrict__ dz) {
    __shared__ float red[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* a = dy + r * cols;
        const float* s = y + r * cols;
        float dot = 0.f;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dot += a[j] * s[j];
        dot = block_reduce(dot, 0, red);
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dz[r * cols + j] = s[j] * (a[j] - dot);
    }
}

__global__ void act_backward_elementwise(int64_t n, const float* __restrict__ dy, const float* __restrict__ y,
                                         int act, float* __restrict__ dz) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dz[i] = dy[i] * act_grad_from_y(y[i], act);
}

}  // namespace

// How many K splits a GEMM of `tiles` output tiles and reduction length K gets on `sms` SMs:
// 1 when the tiles already fill the SMs or K is short; else enough splits for
// SPLIT_K_BLOCKS_PER_SM blocks per SM, each split at least SPLIT_K_MIN_LEN long, at most
// SPLIT_K_MAX, and a workspace (splits x M x N floats) within SPLIT_K_MAX_WORKSPACE.
int64_t split_k_splits(int64_t M, int64_t N, int64_t K, int64_t sms) {
    const int64_t tiles = ((M + G_BM - 1) / G_BM) * ((N + G_BN - 1) / G_BN);
    if (tiles >= sms || K < 2 * SPLIT_K_MIN_LEN) return 1;
    int64_t splits = (SPLIT_K_BLOCKS_PER_SM * sms + tiles - 1) / tiles;
    if (splits > K / SPLIT_K_MIN_LEN) splits = K / SPLIT_K_MIN_LEN;
    if (splits > SPLIT_K_MAX) splits = SPLIT_K_MAX;
    const int64_t per = M * N;
    if (per > 0 && splits * per > SPLIT_K_MAX_WORKSPACE) splits = SPLIT_K_MAX_WORKSPACE / per;
    return splits < 1 ? 1 : splits;
}

namespace {

void launch_gemm(int64_t M, int64_t N, int64_t K, Operand A, Operand B, const float* bias, int act, float* C,
                 cudaStream_t stream, const char* kernel) {
    if (M == 0 || N == 0) return;
    const int64_t gy = (N + G_BN - 1) / G_BN;
    if (gy > MAX_GRID_Y)
        throw std::invalid_argument(std::string("dlconv CUDA kernel ") + kernel + ": N = " + std::to_string(N) +
                                    " needs more than " + std::to_string(MAX_GRID_Y) + " blocks along grid y");
    const int forced = split_k_override();
    int64_t splits = forced > 0 ? forced : split_k_splits(M, N, K, sm_count(kernel));
    if (splits > K) splits = K > 0 ? K : 1;
    if (splits > MAX_GRID_Y) splits = MAX_GRID_Y;
    // equal split lengths, a multiple of G_BK so that no slice straddles two splits
    const int64_t k_len = splits > 1 ? ((K + splits - 1) / splits + G_BK - 1) / G_BK * G_BK : (K > 0 ? K : 1);
    splits = K > 0 ? (K + k_len - 1) / k_len : 1;
    dim3 grid(unsigned((M + G_BM - 1) / G_BM), unsigned(gy), unsigned(splits));
    if (splits == 1) {
        gemm_tiled<<<grid, G_THREADS, 0, stream>>>(M, N, K, k_len, A, B, bias, act, C, nullptr);
        check_launch(kernel);
        return;
    }
    float* part = workspace(size_t(splits * M * N), stream, kernel);
    gemm_tiled<<<grid, G_THREADS, 0, stream>>>(M, N, K, k_len, A, B, nullptr, 0, C, part);
    check_launch(kernel);
    splitk_reduce<<<grid_1d(M * N), THREADS_1D, 0, stream>>>(M, N, splits, part, bias, act, C);
    check_launch(kernel);
}

unsigned row_blocks(int64_t rows) { return unsigned(rows < MAX_ROW_BLOCKS ? (rows < 1 ? 1 : rows) : MAX_ROW_BLOCKS); }

}  // namespace

void dense_forward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* b, int act,
                   float* y, cudaStream_t stream) {
    launch_gemm(M, N, K, Operand{x, K, 1, nullptr, 0}, Operand{w, N, 1, nullptr, 0}, b, act, y, stream,
                "dense_forward");
}

void dense_backward(int64_t M, int64_t K, int64_t N, const float* x, const float* w, const float* dy,
                    const float* y, int act, float* dx, float* dw, float* db, cudaStream_t stream) {
    const float* ys = act ? y : nullptr;
    if (dx)  // dx[M, K] = dz[M, N] · wᵀ
        launch_gemm(M, K, N, Operand{dy, N, 1, ys, act}, Operand{w, 1, N, nullptr, 0}, nullptr, 0, dx, stream,
                    "dense_backward (dx)");
    if (dw)  // dw[K, N] = xᵀ · dz
        launch_gemm(K, N, M, Operand{x, 1, K, nullptr, 0}, Operand{dy, N, 1, ys, act}, nullptr, 0, dw, stream,
                    "dense_backward (dw)");
    if (db) column_sums(M, N, dy, ys, act, db, stream, "dense_backward (db)");
}

void softmax(int64_t rows, int64_t cols, const float* z, float* out, cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    softmax_rows<<<row_blocks(rows), ROW_THREADS, 0, stream>>>(rows, cols, z, out);
    check_launch("softmax");
}

void activation_backward(int64_t rows, int64_t cols, const float* dy, const float* y, int act, float* dz,
                         cudaStream_t stream) {
    if (rows == 0 || cols == 0) return;
    if (act == 4) {
        softmax_backward_rows<<<row_blocks(rows), ROW_THREADS, 0, stream>>>(rows, cols, dy, y, dz);
        check_launch("activation_backward (softmax)");
    } else {
        act_backward_elementwise<<<grid_1d(rows * cols), THREADS_1D, 0, stream>>>(rows * cols, dy, y, act, dz);
        check_launch("activation_backward");
    }
}

}  // namespace cuda
}  // namespace dlconv
