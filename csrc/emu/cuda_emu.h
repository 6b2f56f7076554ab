// cuda_emu.h — dlconv's own CUDA-runtime stand-in: the CUDA C++ kernels (csrc/*.cu) compiled as
// host C++ and executed on the CPU, so that AddressSanitizer, UndefinedBehaviorSanitizer and
// ThreadSanitizer can watch every load, store and barrier of the real kernel source.
//
// Files: this header (keywords, vector types, device functions, runtime API) and emu_exec.h (the
// execution engine: threads, barriers, shared memory, warps, launch).
//
// How a launch runs.  csrc/emu/rewrite.py turns `k<<<grid, block, smem, stream>>>(args...)` into
// `::dlconv_emu::launch("k", k, ::dlconv_emu::config(grid, block, smem, stream), args...)`.
// launch() checks the configuration as the CUDA runtime would (dims >= 1, <= 1024 threads per block,
// grid.y/z <= 65535, <= 48 KiB of shared memory per block; a bad one sets cudaGetLastError() and runs
// nothing), then runs the blocks ONE AT A TIME, each with one fresh host thread (a small-stack pthread)
// per CUDA thread of the block.  threadIdx/blockIdx/blockDim/gridDim are thread_locals of those
// threads; a warp is 32 consecutive linear thread ids, as on the GPU.
//   __syncthreads()  a real barrier of the block's threads (mutex + condition variable: ThreadSanitizer
//                    sees the happens-before it creates, and nothing more).  A thread that returns from
//                    the kernel leaves the barrier; at the end of a block every thread must have passed
//                    the same number of barriers, else "barrier divergence" is reported.
//   __shared__       rewritten into block_shared<T>(key, align): one heap allocation per declaration per
//                    block, shared by the block's threads, fresh for each block, filled with 0xFF bytes
//                    (a float NaN) so a read before any write shows up as a wrong result; the bytes
//                    around it are ASan-poisoned, and it is placed at exactly its declared alignment
//                    (never more: an 8-aligned float array without __align__(16) is at 8 mod 16), so a
//                    float4 access the GPU would fault on is reported by UBSan's alignment check.
//                    `extern __shared__` (dynamic) gets the launch's smem bytes, 16-byte aligned.
//   warp shuffles    __shfl{,_up,_down,_xor}_sync, __ballot/__any/__all_sync, __syncwarp: a per-warp
//                    exchange area between two barriers of the warp's lanes, PTX lane/width rules.
//   atomics          atomicAdd/Sub/Max/Min/Exch/CAS as real host atomics (__atomic builtins).
//   float4 etc.      16-byte aligned structs, so UBSan reports a float4 load from a misaligned address.
//   memory, streams  cudaMalloc = posix_memalign(256) of exactly the bytes asked (ASan redzones right
//                    behind them); cudaMemset/Memcpy(Async) run at once (a launch, too, completes before
//                    it returns); streams and events are checked handles with no concurrency.
// Blocks share no happens-before edge with each other: block b+1 starts after block b's threads have
// finished, observed through a relaxed atomic, and its threads are created by a thread that never
// synchronised with block b.  ThreadSanitizer therefore reports two blocks touching the same word
// without atomics (a race between blocks on the GPU) even though they never ran at the same time.
//
// Knobs: DLCONV_EMU_DROP_SYNC="kernel#n" makes the n-th __syncthreads of that function a no-op (the
// race check's negative control); DLCONV_EMU_SM_COUNT (default 132, an H200) is what device queries
// report; DLCONV_EMU_TRACE=1 prints each launch (name, grid, block, integer arguments).
// Build and run: csrc/emu/build.py, tests/test_cuda_emu.py; overview: csrc/emu/README.md.
//
// NOT emulated (a clean run says nothing about these): concurrency of blocks (timing-dependent
// inter-block protocols such as spin locks or grid syncs, which would deadlock here), the GPU's weak
// memory model beyond what C++ atomics and the barriers give, streams running concurrently with each
// other or with the host (a missing stream dependency is invisible: every call completes in order),
// partial-warp shuffle masks (reported as unsupported), the scheduling of divergent warps,
// texture/surface/constant memory semantics (__constant__ is a plain global), cooperative groups,
// device-side printf/malloc, fast-math precision (__expf is expf; nvcc's --use_fast_math is not
// applied), launch-bounds/register limits, launches of a kernel template whose arguments must be
// deduced or of a kernel with default arguments (the rewrite passes a plain function pointer), and
// out-of-bounds accesses that land inside another live buffer (ASan sees only what falls into a
// redzone, as compute-sanitizer memcheck sees only what falls outside every allocation).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define DLCONV_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define DLCONV_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define DLCONV_EMU_POISON(p, n) ((void)(p), (void)(n))
#define DLCONV_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// ------------------------------------------------------------------ CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__
// Every __shared__ declaration must have been rewritten by rewrite.py; one that was not fails to compile.
#define __shared__ static_assert(false, "dlconv_emu: a __shared__ declaration rewrite.py did not recognise");
#define __syncthreads() ::dlconv_emu::syncthreads("(not rewritten)")

// ------------------------------------------------------------------ vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ------------------------------------------------------------------ runtime types
enum cudaError_t : int {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorInvalidDevice = 101,
};
enum cudaMemcpyKind : int {
    cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4,
};
enum cudaMemoryType : int { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                            cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes { cudaMemoryType type; int device; void* devicePointer; void* hostPointer; };
enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxSharedMemoryPerBlock = 8,
                            cudaDevAttrWarpSize = 10, cudaDevAttrMultiProcessorCount = 16,
                            cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount, maxThreadsPerBlock, warpSize;
    size_t sharedMemPerBlock, totalGlobalMem;
};
struct CUstream_st { unsigned flags; };
struct CUevent_st { bool recorded; std::chrono::steady_clock::time_point t; };
typedef CUstream_st* cudaStream_t;
typedef CUevent_st* cudaEvent_t;
#define cudaStreamDefault 0x0
#define cudaStreamNonBlocking 0x1
#define cudaEventDefault 0x0
#define cudaEventDisableTiming 0x2
#define cudaStreamLegacy (reinterpret_cast<cudaStream_t>(0x1))
#define cudaStreamPerThread (reinterpret_cast<cudaStream_t>(0x2))

#define DLCONV_EMU_TYPES_DONE 1
#include "emu_exec.h"

// ------------------------------------------------------------------ device functions
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <class T> inline T __ldg(const T* p) { return *p; }
// CUDA's global min/max overloads, for any mix of arithmetic types.
template <class A, class B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    using C = typename std::common_type<A, B>::type;
    return C(a) < C(b) ? C(b) : C(a);
}

template <class T>
inline T atomic_rmw(T* p, T (*op)(T, T), T v) {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    T nv = op(old, v);
    while (!__atomic_compare_exchange(p, &old, &nv, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) nv = op(old, v);
    return old;
}
template <class T> inline T atomicAdd(T* p, T v) { return atomic_rmw<T>(p, [](T a, T b) { return T(a + b); }, v); }
template <class T> inline T atomicSub(T* p, T v) { return atomic_rmw<T>(p, [](T a, T b) { return T(a - b); }, v); }
template <class T> inline T atomicMax(T* p, T v) { return atomic_rmw<T>(p, [](T a, T b) { return a < b ? b : a; }, v); }
template <class T> inline T atomicMin(T* p, T v) { return atomic_rmw<T>(p, [](T a, T b) { return b < a ? b : a; }, v); }
template <class T> inline T atomicExch(T* p, T v) { return atomic_rmw<T>(p, [](T, T b) { return b; }, v); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange(p, &cmp, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T> inline T __shfl_sync(unsigned m, T v, int src, int width = warpSize) {
    return dlconv_emu::shfl(m, v, src, width, dlconv_emu::Shfl::IDX, "__shfl_sync");
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int width = warpSize) {
    return dlconv_emu::shfl(m, v, int(d), width, dlconv_emu::Shfl::UP, "__shfl_up_sync");
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int width = warpSize) {
    return dlconv_emu::shfl(m, v, int(d), width, dlconv_emu::Shfl::DOWN, "__shfl_down_sync");
}
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int lane_mask, int width = warpSize) {
    return dlconv_emu::shfl(m, v, lane_mask, width, dlconv_emu::Shfl::BFLY, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned m, int p) { return dlconv_emu::vote(m, p, "__ballot_sync"); }
inline int __any_sync(unsigned m, int p) { return dlconv_emu::vote(m, p, "__any_sync") != 0; }
inline int __all_sync(unsigned m, int p) { return dlconv_emu::vote(m, p, "__all_sync") == m; }
inline void __syncwarp(unsigned m = 0xffffffffu) { dlconv_emu::vote(m, 0, "__syncwarp"); }

// ------------------------------------------------------------------ runtime API
inline cudaError_t cudaGetLastError() {
    const cudaError_t e = dlconv_emu::tl_last_error;
    dlconv_emu::tl_last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return dlconv_emu::tl_last_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    }
    return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    void* q = nullptr;
    if (posix_memalign(&q, dlconv_emu::MALLOC_ALIGN, bytes ? bytes : 1) != 0)
        return dlconv_emu::set_error(cudaErrorMemoryAllocation);
    std::lock_guard<std::mutex> lk(dlconv_emu::allocs().mu);
    dlconv_emu::allocs().live[reinterpret_cast<uintptr_t>(q)] = bytes;
    *p = q;
    return cudaSuccess;
}
template <class T> inline cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> lk(dlconv_emu::allocs().mu);
    auto it = dlconv_emu::allocs().live.find(reinterpret_cast<uintptr_t>(p));
    if (it == dlconv_emu::allocs().live.end()) return dlconv_emu::set_error(cudaErrorInvalidDevicePointer);
    dlconv_emu::allocs().live.erase(it);
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
template <class T> inline cudaError_t cudaMallocAsync(T** p, size_t bytes, cudaStream_t s) {
    return cudaMallocAsync(reinterpret_cast<void**>(p), bytes, s);
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr) {
    if (!dlconv_emu::stream_ok(s)) return dlconv_emu::set_error(cudaErrorInvalidResourceHandle);
    if (bytes && !dlconv_emu::is_device(p, bytes)) return dlconv_emu::set_error(cudaErrorInvalidValue);
    if (bytes) std::memset(p, value, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t s = nullptr) {
    if (!dlconv_emu::stream_ok(s)) return dlconv_emu::set_error(cudaErrorInvalidResourceHandle);
    const bool dev_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool dev_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (bytes && ((dev_dst && !dlconv_emu::is_device(dst, bytes)) || (dev_src && !dlconv_emu::is_device(src, bytes))))
        return dlconv_emu::set_error(cudaErrorInvalidValue);
    if (bytes) std::memcpy(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
    const bool dev = dlconv_emu::is_device(p, 1);
    *a = cudaPointerAttributes{dev ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered, dev ? 0 : -1,
                               dev ? const_cast<void*>(p) : nullptr, nullptr};
    return cudaSuccess;
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    *s = new CUstream_st{flags};
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    return dlconv_emu::stream_ok(s) ? cudaSuccess : dlconv_emu::set_error(cudaErrorInvalidResourceHandle);
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = new CUevent_st{false, {}}; return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
    e->recorded = true;
    e->t = std::chrono::steady_clock::now();
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return cudaSuccess;
}

// One emulated device; its SM count (DLCONV_EMU_SM_COUNT, default an H200's 132) feeds any grid heuristic.
inline int emu_sm_count() {
    const char* e = std::getenv("DLCONV_EMU_SM_COUNT");
    return e ? std::atoi(e) : 132;
}
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : dlconv_emu::set_error(cudaErrorInvalidDevice); }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
    if (d != 0) return dlconv_emu::set_error(cudaErrorInvalidDevice);
    switch (a) {
        case cudaDevAttrMaxThreadsPerBlock: *v = int(dlconv_emu::MAX_THREADS_PER_BLOCK); break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(dlconv_emu::MAX_SHARED_PER_BLOCK); break;
        case cudaDevAttrWarpSize: *v = dlconv_emu::WARP; break;
        case cudaDevAttrMultiProcessorCount: *v = emu_sm_count(); break;
        case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
        case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
        default: return dlconv_emu::set_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d != 0) return dlconv_emu::set_error(cudaErrorInvalidDevice);
    *p = cudaDeviceProp{};
    std::snprintf(p->name, sizeof p->name, "dlconv CPU emulator");
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = emu_sm_count();
    p->maxThreadsPerBlock = int(dlconv_emu::MAX_THREADS_PER_BLOCK);
    p->warpSize = dlconv_emu::WARP;
    p->sharedMemPerBlock = dlconv_emu::MAX_SHARED_PER_BLOCK;
    return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
template <class F> inline cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }
