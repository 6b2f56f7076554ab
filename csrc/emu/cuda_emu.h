// cuda_emu.h — dlconv's own CUDA-runtime stand-in: the CUDA C++ kernels (csrc/*.cu) compiled as
// host C++ and executed on the CPU, so that AddressSanitizer, UndefinedBehaviorSanitizer and
// ThreadSanitizer can watch every load, store and barrier of the real kernel source.
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

namespace dlconv_emu {

// The emulated device's limits (the GPU's, so that a launch the GPU would refuse is refused here).
constexpr int WARP = 32;
constexpr unsigned MAX_THREADS_PER_BLOCK = 1024;
constexpr unsigned MAX_BLOCK_Z = 64;
constexpr unsigned MAX_GRID_YZ = 65535;
constexpr unsigned MAX_GRID_X = 2147483647u;
constexpr size_t MAX_SHARED_PER_BLOCK = 48 * 1024;  // static + dynamic, without an opt-in attribute
constexpr size_t MALLOC_ALIGN = 256;                // cudaMalloc's guaranteed alignment
constexpr size_t DYNAMIC_SHARED_ALIGN = 16;
constexpr unsigned char SHARED_FILL = 0xFF;         // every float made of it is a NaN
// A barrier nobody completes for this long is a deadlock (divergent barrier or shuffle): report it.
constexpr int DEADLOCK_SECONDS = 120;

[[noreturn]] void fatal(const std::string& what);

class Barrier {
  public:
    void reset(int n) { expected_ = n; arrived_ = 0; }
    // Waits until `expected_` threads arrived; the last one runs `done` (under the lock) first.
    template <class F>
    void arrive_and_wait(const char* what, F&& done) {
        std::unique_lock<std::mutex> lk(m_);
        const unsigned long g = gen_;
        if (++arrived_ >= expected_) {
            done();
            release();
            return;
        }
        if (!cv_.wait_for(lk, std::chrono::seconds(DEADLOCK_SECONDS), [&] { return gen_ != g; }))
            fatal(std::string("deadlock: ") + what + " not reached by every thread within " +
                  std::to_string(DEADLOCK_SECONDS) + " s");
    }
    void arrive_and_wait(const char* what) { arrive_and_wait(what, [] {}); }
    // A thread that left the kernel no longer takes part (GPU hardware counts exited threads as arrived).
    void drop() {
        std::lock_guard<std::mutex> lk(m_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) release();
    }

  private:
    void release() { arrived_ = 0; ++gen_; cv_.notify_all(); }
    std::mutex m_;
    std::condition_variable cv_;
    int expected_ = 0, arrived_ = 0;
    unsigned long gen_ = 0;
};

struct Warp {
    Barrier bar;
    unsigned lanes = 0;  // mask of the lanes that exist (a block's last warp may be partial)
    uint64_t slot[WARP] = {};
};

struct SharedAlloc { void* raw; void* p; size_t lead, bytes; };

// Everything one block owns; fresh for each block (nothing of it links two blocks).
struct Block {
    int nthreads = 0;
    Barrier bar, end;
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<long> syncs;  // __syncthreads passed, per thread
    std::mutex shm_mu;
    std::map<std::string, SharedAlloc> shared;
    size_t shared_bytes = 0, dynamic_bytes = 0;
    void* dynamic = nullptr;
    std::atomic<int> finished{0};
};

// A pthread with a small stack: a block starts up to 1024 of them, and 8 MiB default stacks make
// thread start-up (mmap) the emulator's main cost.  Kernels keep little on the stack.
constexpr size_t THREAD_STACK = 512 * 1024;
class Thread {
  public:
    template <class F>
    explicit Thread(F f) {
        auto* fn = new std::function<void()>(std::move(f));
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, THREAD_STACK);
        const int e = pthread_create(&t_, &a, [](void* p) -> void* {
            std::unique_ptr<std::function<void()>> g(static_cast<std::function<void()>*>(p));
            (*g)();
            return nullptr;
        }, fn);
        pthread_attr_destroy(&a);
        if (e != 0) { delete fn; fatal("pthread_create failed: " + std::to_string(e)); }
    }
    Thread(Thread&& o) noexcept : t_(o.t_), live_(o.live_) { o.live_ = false; }
    Thread(const Thread&) = delete;
    ~Thread() { if (live_) fatal("a block thread was never joined"); }
    void join() { if (live_) { pthread_join(t_, nullptr); live_ = false; } }

  private:
    pthread_t t_{};
    bool live_ = true;
};

struct Config { dim3 grid, block; size_t smem; cudaStream_t stream; };
inline Config config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
    return Config{grid, block, smem, stream};
}

// Per host thread: the block and thread this OS thread is emulating.
inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_tid = 0;
inline thread_local const char* tl_kernel = "(host)";
inline thread_local cudaError_t tl_last_error = cudaSuccess;

}  // namespace dlconv_emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = dlconv_emu::WARP;

namespace dlconv_emu {

[[noreturn]] inline void fatal(const std::string& what) {
    std::fprintf(stderr,
                 "dlconv_emu: ERROR: %s [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]\n", what.c_str(),
                 tl_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::_Exit(70);
}

inline Block& block() {
    if (!tl_block) fatal("a device-only call (barrier, shuffle, __shared__) outside a kernel");
    return *tl_block;
}

// ------------------------------------------------------------------ which barriers to drop
// DLCONV_EMU_DROP_SYNC="kernel#n,..." turns the n-th __syncthreads of that function (source order,
// from 1; the site name rewrite.py gives it) into a no-op: the negative control of the race check.
inline const std::vector<std::string>& dropped_syncs() {
    static const std::vector<std::string> v = [] {
        std::vector<std::string> out;
        const char* e = std::getenv("DLCONV_EMU_DROP_SYNC");
        std::string s = e ? e : "", cur;
        for (char c : s + ",") {
            if (c == ',') { if (!cur.empty()) out.push_back(cur); cur.clear(); }
            else cur += c;
        }
        return out;
    }();
    return v;
}

inline void syncthreads(const char* site) {
    for (const auto& d : dropped_syncs())
        if (d == site) return;  // as if the line were deleted: no barrier, no happens-before
    Block& b = block();
    b.bar.arrive_and_wait("__syncthreads");
    ++b.syncs[tl_tid];
}

// ------------------------------------------------------------------ shared memory
template <class T>
T& block_shared(const char* key, size_t align) {
    static_assert(std::is_trivially_default_constructible<typename std::remove_all_extents<T>::type>::value,
                  "__shared__ of a type with a constructor");
    Block& b = block();
    std::lock_guard<std::mutex> lk(b.shm_mu);
    auto it = b.shared.find(key);
    if (it != b.shared.end()) return *static_cast<T*>(it->second.p);
    // Exactly `a`-aligned: p = raw + a with raw 2a-aligned, so p is a multiple of a and not of 2a.
    // The a lead bytes (>= 8: one ASan granule) are poisoned, and the end is the allocation's end.
    const size_t a = std::max<size_t>({align, alignof(T), 8});
    b.shared_bytes += sizeof(T);
    if (b.shared_bytes + b.dynamic_bytes > MAX_SHARED_PER_BLOCK)
        fatal("shared memory of the block (" + std::to_string(b.shared_bytes + b.dynamic_bytes) +
              " bytes) exceeds " + std::to_string(MAX_SHARED_PER_BLOCK));
    void* raw = nullptr;
    if (posix_memalign(&raw, 2 * a, a + sizeof(T)) != 0) fatal("out of host memory for __shared__");
    char* p = static_cast<char*>(raw) + a;
    std::memset(p, SHARED_FILL, sizeof(T));
    DLCONV_EMU_POISON(raw, a);
    b.shared[key] = SharedAlloc{raw, p, a, sizeof(T)};
    return *reinterpret_cast<T*>(p);
}

template <class T>
T* dynamic_shared() {
    Block& b = block();
    if (!b.dynamic) fatal("extern __shared__ used by a kernel launched with 0 bytes of dynamic shared memory");
    return static_cast<T*>(b.dynamic);
}

// ------------------------------------------------------------------ warps
inline Warp& warp_checked(unsigned mask, const char* what) {
    Block& b = block();
    Warp& w = *b.warps[tl_tid / WARP];
    if ((mask & w.lanes) != w.lanes) {
        char hex[16];
        std::snprintf(hex, sizeof hex, "%08x", mask);
        fatal(std::string(what) + ": mask 0x" + hex + " leaves out lanes of this warp (partial-warp masks are "
              "not emulated)");
    }
    return w;
}

// PTX shfl.sync: c packs the clamp (bits 0-4) and the segment mask (bits 8-12).
enum class Shfl { IDX, UP, DOWN, BFLY };
template <class T>
T shfl(unsigned mask, T v, int b, int width, Shfl mode, const char* what) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a big type");
    if (width < 1 || width > WARP || (width & (width - 1)))
        fatal(std::string(what) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
    Warp& w = warp_checked(mask, what);
    const unsigned lane = unsigned(tl_tid % WARP), seg = unsigned(WARP - width), bv = unsigned(b) & 31u;
    const unsigned cval = mode == Shfl::UP ? 0u : 31u;
    const unsigned max_lane = (lane & seg) | (cval & ~seg), min_lane = lane & seg;
    unsigned j = lane;
    bool ok = false;
    switch (mode) {
        case Shfl::UP: j = lane - bv; ok = int(lane) - int(bv) >= int(max_lane); break;
        case Shfl::DOWN: j = lane + bv; ok = j <= max_lane; break;
        case Shfl::BFLY: j = lane ^ bv; ok = j <= max_lane; break;
        case Shfl::IDX: j = min_lane | (bv & ~seg); ok = j <= max_lane; break;
    }
    if (!ok) j = lane;
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    w.bar.arrive_and_wait(what);
    if (!((w.lanes >> j) & 1u))
        fatal(std::string(what) + ": reads lane " + std::to_string(j) + ", which does not exist in this warp");
    T out;
    std::memcpy(&out, &w.slot[j], sizeof(T));
    w.bar.arrive_and_wait(what);  // nobody overwrites a slot before every lane read
    return out;
}

inline unsigned vote(unsigned mask, int pred, const char* what) {
    Warp& w = warp_checked(mask, what);
    const unsigned lane = unsigned(tl_tid % WARP);
    w.slot[lane] = pred ? 1u : 0u;
    w.bar.arrive_and_wait(what);
    unsigned bits = 0;
    for (unsigned l = 0; l < unsigned(WARP); ++l)
        if (((w.lanes >> l) & 1u) && w.slot[l]) bits |= 1u << l;
    w.bar.arrive_and_wait(what);
    return bits & mask;
}

// ------------------------------------------------------------------ memory registry
struct Allocs {
    std::mutex mu;
    std::map<uintptr_t, size_t> live;  // start -> bytes
};
inline Allocs& allocs() { static Allocs a; return a; }

inline bool is_device(const void* p, size_t bytes) {
    std::lock_guard<std::mutex> lk(allocs().mu);
    auto& m = allocs().live;
    const uintptr_t q = reinterpret_cast<uintptr_t>(p);
    auto it = m.upper_bound(q);
    if (it == m.begin()) return false;
    --it;
    return q >= it->first && q + bytes <= it->first + it->second;
}

inline cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) tl_last_error = e;
    return e;
}

inline bool stream_ok(cudaStream_t s) {
    // The default, legacy and per-thread streams, or a handle cudaStreamCreate* made (flags 0 or 1);
    // a stale or foreign handle is read as memory here, which ASan reports.
    return (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread || s->flags <= 1u);
}

// ------------------------------------------------------------------ launch
template <class Call>
void run_blocks(const char* name, const Config& c, Call&& call) {
    const unsigned nthreads = c.block.x * c.block.y * c.block.z;
    const unsigned long long nblocks = 1ull * c.grid.x * c.grid.y * c.grid.z;
    // The reaper joins every block's threads and frees the block; the launching thread only
    // publishes blocks to it (release store, acquire load: one direction) and joins it at the end,
    // so no block's threads ever synchronise with a later block's (see the header).
    struct Done {
        std::unique_ptr<Block> blk;
        std::vector<Thread> threads;
        std::atomic<bool> ready{false};
    };
    std::unique_ptr<Done[]> slots(new Done[nblocks]);
    Thread reaper([&slots, nblocks] {
        for (unsigned long long i = 0; i < nblocks; ++i) {
            Done& d = slots[i];
            while (!d.ready.load(std::memory_order_acquire))
                std::this_thread::sleep_for(std::chrono::microseconds(50));
            for (auto& t : d.threads) t.join();
            for (auto& kv : d.blk->shared) {
                DLCONV_EMU_UNPOISON(kv.second.raw, kv.second.lead);
                std::free(kv.second.raw);
            }
            if (d.blk->dynamic) {
                char* raw = static_cast<char*>(d.blk->dynamic) - DYNAMIC_SHARED_ALIGN;
                DLCONV_EMU_UNPOISON(raw, DYNAMIC_SHARED_ALIGN);
                std::free(raw);
            }
            d.blk.reset();
            d.threads.clear();
        }
    });
    for (unsigned long long lin = 0; lin < nblocks; ++lin) {
        const uint3 bid{unsigned(lin % c.grid.x), unsigned((lin / c.grid.x) % c.grid.y),
                        unsigned(lin / (1ull * c.grid.x * c.grid.y))};
        auto blk = std::make_unique<Block>();
        Block* B = blk.get();
        B->nthreads = int(nthreads);
        B->bar.reset(int(nthreads));
        B->end.reset(int(nthreads));
        B->syncs.assign(nthreads, 0);
        for (unsigned w0 = 0; w0 < nthreads; w0 += WARP) {
            auto w = std::make_unique<Warp>();
            const unsigned n = std::min<unsigned>(WARP, nthreads - w0);
            w->lanes = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
            w->bar.reset(int(n));
            B->warps.push_back(std::move(w));
        }
        if (c.smem) {
            void* raw = nullptr;
            if (posix_memalign(&raw, 2 * DYNAMIC_SHARED_ALIGN, DYNAMIC_SHARED_ALIGN + c.smem) != 0)
                fatal("out of host memory for dynamic shared memory");
            B->dynamic = static_cast<char*>(raw) + DYNAMIC_SHARED_ALIGN;
            B->dynamic_bytes = c.smem;
            std::memset(B->dynamic, SHARED_FILL, c.smem);
            DLCONV_EMU_POISON(raw, DYNAMIC_SHARED_ALIGN);
        }
        std::vector<Thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
            threads.emplace_back([&call, B, bid, t, name, c] {
                tl_block = B;
                tl_tid = int(t);
                tl_kernel = name;
                blockIdx = bid;
                threadIdx = uint3{t % c.block.x, (t / c.block.x) % c.block.y, t / (c.block.x * c.block.y)};
                blockDim = c.block;
                gridDim = c.grid;
                call();
                B->bar.drop();
                B->warps[t / WARP]->bar.drop();
                B->end.arrive_and_wait("the end of the block", [B] {
                    for (int i = 1; i < B->nthreads; ++i)
                        if (B->syncs[i] != B->syncs[0]) {
                            threadIdx = uint3{0, 0, 0};
                            fatal("barrier divergence: thread 0 passed " + std::to_string(B->syncs[0]) +
                                  " __syncthreads, linear thread " + std::to_string(i) + " passed " +
                                  std::to_string(B->syncs[i]));
                        }
                });
                B->finished.fetch_add(1, std::memory_order_relaxed);
                tl_block = nullptr;
            });
        }
        // Wait for the block through a relaxed atomic only: no happens-before edge to the next block.
        while (B->finished.load(std::memory_order_relaxed) < int(nthreads))
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        slots[lin].blk = std::move(blk);
        slots[lin].threads = std::move(threads);
        slots[lin].ready.store(true, std::memory_order_release);
    }
    reaper.join();  // every block's writes now happen-before what the host does next
}

// DLCONV_EMU_TRACE=1: one stdout line per launch, "launch NAME grid=x,y,z block=x,y,z smem=N args=..."
// with integer arguments by value (which path a kernel was told to take) and others as "*" / "{}".
template <class T>
void trace_arg(std::string& out, const T& v) {
    if constexpr (std::is_integral<T>::value) out += std::to_string(v);
    else if constexpr (std::is_floating_point<T>::value) out += std::to_string(double(v));
    else if constexpr (std::is_pointer<T>::value) out += v ? "*" : "null";
    else out += "{}";
    out += ' ';
}

inline bool tracing() {
    static const bool on = [] { const char* e = std::getenv("DLCONV_EMU_TRACE"); return e && *e == '1'; }();
    return on;
}

template <class... P, class... A>
void launch(const char* name, void (*kernel)(P...), Config c, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    const dim3 g = c.grid, b = c.block;
    const unsigned long long nthreads = 1ull * b.x * b.y * b.z;
    if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z || nthreads > MAX_THREADS_PER_BLOCK || b.z > MAX_BLOCK_Z ||
        g.x > MAX_GRID_X || g.y > MAX_GRID_YZ || g.z > MAX_GRID_YZ) {
        set_error(cudaErrorInvalidConfiguration);
        return;
    }
    if (c.smem > MAX_SHARED_PER_BLOCK || !stream_ok(c.stream)) {
        set_error(cudaErrorInvalidValue);
        return;
    }
    tracing();
    dropped_syncs();  // parsed here, on the host thread: a lazy static would link the blocks that read it
    // Kernel parameters are copied once, as into the GPU's parameter space; each thread receives its own copy.
    const std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
    if (tracing()) {
        std::string line = std::string("launch ") + name + " grid=" + std::to_string(g.x) + "," +
                           std::to_string(g.y) + "," + std::to_string(g.z) + " block=" + std::to_string(b.x) +
                           "," + std::to_string(b.y) + "," + std::to_string(b.z) +
                           " smem=" + std::to_string(c.smem) + " args=";
        std::apply([&line](const auto&... v) { (trace_arg(line, v), ...); }, params);
        std::printf("%s\n", line.c_str());
        std::fflush(stdout);
    }
    run_blocks(name, c, [&params, kernel] { std::apply(kernel, params); });
}

}  // namespace dlconv_emu

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
