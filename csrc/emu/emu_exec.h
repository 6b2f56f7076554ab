// emu_exec.h — the execution engine of the CUDA-runtime stand-in (included by cuda_emu.h, which
// documents what it emulates): limits of the emulated device, the barrier, a block's state, the
// block threads, __syncthreads, per-block shared memory, warp exchanges, the "device" allocation
// registry, and launch(), which runs a kernel's blocks one at a time, one host thread per CUDA thread.
#pragma once

#ifndef DLCONV_EMU_TYPES_DONE
#error "include cuda_emu.h (or <cuda_runtime.h> from csrc/emu/include), not emu_exec.h"
#endif

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
