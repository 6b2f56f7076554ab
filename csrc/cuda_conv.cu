// cuda_conv.cu — 2-D convolution on CUDA: forward as a numbered progression (names, codes and rules:
// conv_variants.h CUDA_CONV_VARIANTS, the one table), backward-data,
// backward-filter and the bias gradient.  NHWC activations, HWIO weights, geometry record g
// from dlconv.shapes (never re-derived here).
//
// The forward pass is the implicit GEMM  y[m, k] = act(b[k] + Σ_j A[m, j] · w[j, k])  with
//   m = (n, oh, ow)  (M = N·OH·OW output pixels),  j = (kh, kw, c)  (K = KH·KW·C),
//   A[m, j] = x[n, ih, iw, c],   ih = oh·stride_h − pad_top  + kh·dil_h,
//                                iw = ow·stride_w − pad_left + kw·dil_w,
//   and A[m, j] = 0 when (ih, iw) lies in the padding (one bounds test, in gather_x).
//
// cuda_v1_direct    one thread owns one output element (n, oh, ow, k), k fastest so that a warp
//                   reads 32 consecutive filters of w and writes 32 consecutive outputs.
//                   Grid-stride 1-D grid of THREADS_1D-thread blocks.
// cuda_v2_gemmtile  a 16x16 block owns a 16-pixel x 16-filter tile of y; it stages 16x16 tiles of
//                   A (gathered) and w in shared memory and each thread accumulates one output.
//                   Grid (⌈M/16⌉, ⌈F/16⌉).
// cuda_v3_regblock  a 256-thread block owns a 64x64 tile of y, each thread a 4x4 register block;
//                   BK=16 slices of A (stored transposed, As[j][m]) and w go through shared memory;
//                   the inner loop reads float4 from shared memory.  When C and F are multiples of 4
//                   and the buffers 16-byte aligned, global loads/stores are float4 (4 channels of
//                   one pixel and tap are contiguous in x).  Grid (⌈M/64⌉, ⌈F/64⌉).
// Ragged edges (m >= M, j >= K, k >= F) load zeros and skip stores: one guard per load/store.
//
// Grouped convolution (g.groups = G, w of shape (KH, KW, C/G, F)): filter k reads the input channels
// c0 + ci, c0 = (k / (F/G))·(C/G), ci < C/G — a per-thread channel offset into each NHWC pixel row.
// cuda_v1_direct, backward-data and backward-filter carry that offset (G = 1: c0 = 0, the plain sums);
// grouped forwards run cuda_v1_direct whatever variant is asked (v2/v3 tile the G = 1 GEMM).
//
// Backward-data (direct): one thread owns one dx element (n, ih, iw, c); a tap (kh, kw) reaches it
//   from oh = (ih + pad_top − kh·dil_h) / stride_h when that division is exact and 0 <= oh < OH
//   (likewise ow); it sums dz[n, oh, ow, :] · w[kh, kw, c, :].
// Backward-filter: one thread owns one dw element (kh, kw, c, k) for one chunk of >= BWF_CHUNK output
//   pixels (blockIdx.y); partial sums meet in dw with atomicAdd (dw zeroed first on the stream).
// Bias gradient: db[k] = Σ_m dz[m, k]; a thread owns one k for one chunk of pixels, atomicAdd.
#include <cuda_runtime.h>

#include <string>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace dlconv {
namespace cuda {

namespace {

constexpr int V2_TILE = 16;  // 16x16 = 256 threads, one output each; a tile row = half a warp
constexpr int V3_BM = 64;    // pixels per block tile
constexpr int V3_BN = 64;    // filters per block tile
constexpr int V3_BK = 16;    // reduction slice staged in shared memory (2 x 64x16 floats = 8 KB)
constexpr int V3_TM = 4;     // register block per thread: 4 pixels x 4 filters (float4 reads)
constexpr int V3_TN = 4;
constexpr int V3_THREADS = (V3_BM / V3_TM) * (V3_BN / V3_TN);  // 256
constexpr int V3_APAD = 4;   // As row padding: keeps float4 alignment, cuts transposed-store conflicts
constexpr int BWF_CHUNK = 256;  // output pixels per backward-filter / bias-grad partial sum
constexpr int64_t MAX_GRID_Y = 65535;

static_assert(V3_THREADS == 256, "v3 loaders assume 256 threads");

// A[m, j] of the forward implicit GEMM (0 for padding and ragged edges).
__device__ __forceinline__ float gather_x(const ConvGeometry& g, const float* __restrict__ x, int64_t m,
                                          int64_t j, int64_t M, int64_t K) {
    if (m >= M || j >= K) return 0.f;
    const int64_t c = j % g.in_c, t = j / g.in_c, kw = t % g.k_w, kh = t / g.k_w;
    const int64_t ow = m % g.out_w, r = m / g.out_w, oh = r % g.out_h, n = r / g.out_h;
    const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
    const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return 0.f;
    return x[((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c];
}

__global__ void conv_fwd_v1_direct(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ w,
                                   const float* __restrict__ b, int act, float* __restrict__ y) {
    const int64_t total = g.batch * g.out_h * g.out_w * g.filters, F = g.filters;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int64_t k = idx % F, m = idx / F;
        const int64_t ow = m % g.out_w, r = m / g.out_w, oh = r % g.out_h, n = r / g.out_h;
        const int64_t cg = g.in_c / g.groups, c0 = (k / (F / g.groups)) * cg;  // filter k's channels
        float acc = b ? b[k] : 0.f;
        for (int64_t kh = 0; kh < g.k_h; ++kh) {
            const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
            if (ih < 0 || ih >= g.in_h) continue;
            for (int64_t kw = 0; kw < g.k_w; ++kw) {
                const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
                if (iw < 0 || iw >= g.in_w) continue;
                const float* xp = x + ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c0;
                const float* wp = w + (kh * g.k_w + kw) * cg * F + k;
                for (int64_t c = 0; c < cg; ++c) acc += xp[c] * wp[c * F];
            }
        }
        y[idx] = act_forward(acc, act);
    }
}

__global__ void conv_fwd_v2_smem(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ w,
                                 const float* __restrict__ b, int act, float* __restrict__ y) {
    __shared__ float As[V2_TILE][V2_TILE + 1];  // [pixel][j]
    __shared__ float Bs[V2_TILE][V2_TILE];      // [j][filter]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t M = g.batch * g.out_h * g.out_w, K = g.k_h * g.k_w * g.in_c, F = g.filters;
    const int64_t m = int64_t(blockIdx.x) * V2_TILE + ty, n = int64_t(blockIdx.y) * V2_TILE + tx;
    float acc = 0.f;
    for (int64_t j0 = 0; j0 < K; j0 += V2_TILE) {
        As[ty][tx] = gather_x(g, x, m, j0 + tx, M, K);
        const int64_t jb = j0 + ty;
        Bs[ty][tx] = (jb < K && n < F) ? w[jb * F + n] : 0.f;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < V2_TILE; ++j) acc += As[ty][j] * Bs[j][tx];
        __syncthreads();
    }
    if (m < M && n < F) y[m * F + n] = act_forward(acc + (b ? b[n] : 0.f), act);
}

__global__ void __launch_bounds__(V3_THREADS)
conv_fwd_v3_igemm(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ w,
                  const float* __restrict__ b, int act, float* __restrict__ y, int vec) {
    __shared__ __align__(16) float As[V3_BK][V3_BM + V3_APAD];  // transposed A slice: As[j][m]
    __shared__ __align__(16) float Bs[V3_BK][V3_BN];            // w slice: Bs[j][filter]
    const int tid = threadIdx.x, tx = tid % (V3_BN / V3_TN), ty = tid / (V3_BN / V3_TN);
    const int64_t M = g.batch * g.out_h * g.out_w, K = g.k_h * g.k_w * g.in_c, F = g.filters;
    const int64_t m0 = int64_t(blockIdx.x) * V3_BM, n0 = int64_t(blockIdx.y) * V3_BN;
    float acc[V3_TM][V3_TN];
#pragma unroll
    for (int i = 0; i < V3_TM; ++i)
#pragma unroll
        for (int j = 0; j < V3_TN; ++j) acc[i][j] = 0.f;

    for (int64_t j0 = 0; j0 < K; j0 += V3_BK) {
        if (vec) {
            // A: 64 pixels x 4 float4 (4 channels of one pixel at one tap; C % 4 == 0).
            const int am = tid / 4, aq = (tid % 4) * 4;
            const int64_t m = m0 + am, j = j0 + aq;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (m < M && j < K) {
                const int64_t c = j % g.in_c, t = j / g.in_c, kw = t % g.k_w, kh = t / g.k_w;
                const int64_t ow = m % g.out_w, r = m / g.out_w, oh = r % g.out_h, n = r / g.out_h;
                const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
                const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
                if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
                    v = *reinterpret_cast<const float4*>(x + ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c);
            }
            As[aq + 0][am] = v.x;
            As[aq + 1][am] = v.y;
            As[aq + 2][am] = v.z;
            As[aq + 3][am] = v.w;
            // B: 16 rows x 16 float4 of w (F % 4 == 0, so a float4 never straddles F).
            const int bk = tid / 16, bq = (tid % 16) * 4;
            const int64_t jb = j0 + bk, n = n0 + bq;
            float4 u = make_float4(0.f, 0.f, 0.f, 0.f);
            if (jb < K && n < F) u = *reinterpret_cast<const float4*>(w + jb * F + n);
            *reinterpret_cast<float4*>(&Bs[bk][bq]) = u;
        } else {
#pragma unroll
            for (int l = 0; l < (V3_BM * V3_BK) / V3_THREADS; ++l) {
                const int idx = tid + l * V3_THREADS, am = idx / V3_BK, ak = idx % V3_BK;
                As[ak][am] = gather_x(g, x, m0 + am, j0 + ak, M, K);
            }
#pragma unroll
            for (int l = 0; l < (V3_BK * V3_BN) / V3_THREADS; ++l) {
                const int idx = tid + l * V3_THREADS, bk = idx / V3_BN, bn = idx % V3_BN;
                const int64_t jb = j0 + bk, n = n0 + bn;
                Bs[bk][bn] = (jb < K && n < F) ? w[jb * F + n] : 0.f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < V3_BK; ++k) {
            const float4 a = *reinterpret_cast<const float4*>(&As[k][ty * V3_TM]);
            const float4 bb = *reinterpret_cast<const float4*>(&Bs[k][tx * V3_TN]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {bb.x, bb.y, bb.z, bb.w};
#pragma unroll
            for (int i = 0; i < V3_TM; ++i)
#pragma unroll
                for (int j = 0; j < V3_TN; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
    const int64_t nb = n0 + tx * V3_TN;
#pragma unroll
    for (int i = 0; i < V3_TM; ++i) {
        const int64_t m = m0 + ty * V3_TM + i;
        if (m >= M) continue;
        float o[V3_TN];
#pragma unroll
        for (int j = 0; j < V3_TN; ++j) {
            const int64_t n = nb + j;
            o[j] = n < F ? act_forward(acc[i][j] + (b ? b[n] : 0.f), act) : 0.f;
        }
        if (vec && nb + V3_TN <= F) {
            *reinterpret_cast<float4*>(y + m * F + nb) = make_float4(o[0], o[1], o[2], o[3]);
        } else {
#pragma unroll
            for (int j = 0; j < V3_TN; ++j)
                if (nb + j < F) y[m * F + nb + j] = o[j];
        }
    }
}

__global__ void conv_bwd_data_direct(ConvGeometry g, const float* __restrict__ dz, const float* __restrict__ w,
                                     float* __restrict__ dx) {
    const int64_t total = g.batch * g.in_h * g.in_w * g.in_c, F = g.filters;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int64_t c = idx % g.in_c, m = idx / g.in_c;
        const int64_t iw = m % g.in_w, r = m / g.in_w, ih = r % g.in_h, n = r / g.in_h;
        // Channel c = q·cg + ci meets the filters [q·fg, (q+1)·fg) of its group through w[.., ci, k].
        const int64_t cg = g.in_c / g.groups, fg = F / g.groups, ci = c % cg, k0 = (c / cg) * fg;
        float acc = 0.f;
        for (int64_t kh = 0; kh < g.k_h; ++kh) {
            const int64_t ohn = ih + g.pad_top - kh * g.dil_h;
            if (ohn < 0 || ohn % g.stride_h != 0) continue;
            const int64_t oh = ohn / g.stride_h;
            if (oh >= g.out_h) continue;
            for (int64_t kw = 0; kw < g.k_w; ++kw) {
                const int64_t own = iw + g.pad_left - kw * g.dil_w;
                if (own < 0 || own % g.stride_w != 0) continue;
                const int64_t ow = own / g.stride_w;
                if (ow >= g.out_w) continue;
                const float* dp = dz + ((n * g.out_h + oh) * g.out_w + ow) * F + k0;
                const float* wp = w + ((kh * g.k_w + kw) * cg + ci) * F + k0;
                for (int64_t k = 0; k < fg; ++k) acc += dp[k] * wp[k];
            }
        }
        dx[idx] = acc;
    }
}

__global__ void conv_bwd_filter_chunked(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ dz,
                                        float* __restrict__ dw, int64_t chunk) {
    const int64_t F = g.filters, cg = g.in_c / g.groups, wsize = g.k_h * g.k_w * cg * F, P = g.batch * g.out_h * g.out_w;
    const int64_t p_lo = int64_t(blockIdx.y) * chunk, p_hi = min(P, p_lo + chunk);
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < wsize;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int64_t k = idx % F, r = idx / F, ci = r % cg, t = r / cg, kw = t % g.k_w, kh = t / g.k_w;
        const int64_t c = (k / (F / g.groups)) * cg + ci;  // the x channel of dw[kh, kw, ci, k]
        float acc = 0.f;
        for (int64_t p = p_lo; p < p_hi; ++p) {
            const int64_t ow = p % g.out_w, q = p / g.out_w, oh = q % g.out_h, n = q / g.out_h;
            const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
            const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
            if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
                acc += x[((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c] * dz[p * F + k];
        }
        atomicAdd(dw + idx, acc);
    }
}

// db[k] += Σ_{p in chunk} dz[p, k] · act'(y[p, k])  (y null: plain sum).  Used by conv and dense.
__global__ void column_sums_chunked(int64_t P, int64_t F, const float* __restrict__ dz, const float* __restrict__ y,
                                    int act, float* __restrict__ db, int64_t chunk) {
    const int64_t p_lo = int64_t(blockIdx.y) * chunk, p_hi = min(P, p_lo + chunk);
    for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < F; k += int64_t(gridDim.x) * blockDim.x) {
        float acc = 0.f;
        for (int64_t p = p_lo; p < p_hi; ++p) {
            const float d = dz[p * F + k];
            acc += y ? d * act_grad_from_y(y[p * F + k], act) : d;
        }
        atomicAdd(db + k, acc);
    }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Rows per partial sum: BWF_CHUNK, or more when that would need more than MAX_GRID_Y chunks.
int64_t chunk_rows(int64_t P) {
    const int64_t min_chunk = (P + MAX_GRID_Y - 1) / MAX_GRID_Y;
    return min_chunk > BWF_CHUNK ? min_chunk : BWF_CHUNK;
}

void check_grid_y(int64_t gy, const char* kernel) {
    if (gy > MAX_GRID_Y)
        throw std::invalid_argument(std::string("dlconv CUDA kernel ") + kernel + ": needs " + std::to_string(gy) +
                                    " blocks along grid y, more than " + std::to_string(MAX_GRID_Y));
}

}  // namespace

// Zero db, then db[k] = Σ_p dz[p, k] · act'(y[p, k]) over chunks of BWF_CHUNK rows.
void column_sums(int64_t P, int64_t F, const float* dz, const float* y, int act, float* db, cudaStream_t stream,
                 const char* kernel) {
    check_call(cudaMemsetAsync(db, 0, size_t(F) * sizeof(float), stream), kernel, "cudaMemsetAsync(db)");
    if (P == 0) return;
    const int64_t chunk = chunk_rows(P), chunks = (P + chunk - 1) / chunk;
    check_grid_y(chunks, kernel);
    dim3 grid(grid_1d(F), unsigned(chunks));
    column_sums_chunked<<<grid, THREADS_1D, 0, stream>>>(P, F, dz, y, act, db, chunk);
    check_launch(kernel);
}

void conv2d_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y,
                    int variant, cudaStream_t stream) {
    const int64_t M = g.batch * g.out_h * g.out_w, F = g.filters;
    if (M == 0) return;
    if (g.groups != 1 && (variant == V2_SMEM_TILED || variant == V3_IMPLICIT_GEMM))
        variant = V1_DIRECT;  // grouped: v1 carries the per-group channel offsets (v2/v3 assume G = 1)
    if (variant == V1_DIRECT) {
        conv_fwd_v1_direct<<<grid_1d(M * F), THREADS_1D, 0, stream>>>(g, x, w, b, act, y);
        check_launch("conv2d_forward cuda_v1_direct");
    } else if (variant == V2_SMEM_TILED) {
        const int64_t gy = (F + V2_TILE - 1) / V2_TILE;
        check_grid_y(gy, "conv2d_forward cuda_v2_gemmtile");
        dim3 grid(unsigned((M + V2_TILE - 1) / V2_TILE), unsigned(gy)), block(V2_TILE, V2_TILE);
        conv_fwd_v2_smem<<<grid, block, 0, stream>>>(g, x, w, b, act, y);
        check_launch("conv2d_forward cuda_v2_gemmtile");
    } else if (variant == V3_IMPLICIT_GEMM) {
        const int64_t gy = (F + V3_BN - 1) / V3_BN;
        check_grid_y(gy, "conv2d_forward cuda_v3_regblock");
        const int vec = (g.in_c % 4 == 0 && F % 4 == 0 && aligned16(x) && aligned16(w) && aligned16(y)) ? 1 : 0;
        dim3 grid(unsigned((M + V3_BM - 1) / V3_BM), unsigned(gy));
        conv_fwd_v3_igemm<<<grid, V3_THREADS, 0, stream>>>(g, x, w, b, act, y, vec);
        check_launch("conv2d_forward cuda_v3_regblock");
    } else {
        throw std::invalid_argument("dlconv CUDA conv2d_forward: unknown variant " + std::to_string(variant));
    }
}

void conv2d_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx, cudaStream_t stream) {
    const int64_t total = g.batch * g.in_h * g.in_w * g.in_c;
    if (total == 0) return;
    conv_bwd_data_direct<<<grid_1d(total), THREADS_1D, 0, stream>>>(g, dz, w, dx);
    check_launch("conv2d_backward_data");
}

void conv2d_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                            cudaStream_t stream) {
    const int64_t wsize = g.w_size(), P = g.batch * g.out_h * g.out_w;
    const char* K = "conv2d_backward_filter";
    check_call(cudaMemsetAsync(dw, 0, size_t(wsize) * sizeof(float), stream), K, "cudaMemsetAsync(dw)");
    if (P > 0) {
        const int64_t chunk = chunk_rows(P), chunks = (P + chunk - 1) / chunk;
        check_grid_y(chunks, K);
        dim3 grid(grid_1d(wsize), unsigned(chunks));
        conv_bwd_filter_chunked<<<grid, THREADS_1D, 0, stream>>>(g, x, dz, dw, chunk);
        check_launch(K);
    }
    if (db) column_sums(P, g.filters, dz, nullptr, 0, db, stream, "conv2d_backward_filter (bias gradient)");
}

}  // namespace cuda
}  // namespace dlconv
