// cuda_workspace.cu — scratch memory of the CUDA C++ launchers (no kernels here).
//
// What it holds: one device buffer per (device, stream, host thread), reused by every launch
// from that thread on that stream, so a launch that needs scratch space (split-K partial sums)
// allocates nothing in the hot path.  Reuse is safe because the work on one stream runs in order:
// a launch that writes the buffer starts only after the previous one that read it has finished.
// Two streams never share a buffer, nor two host threads (two threads enqueueing on one stream at
// once would interleave one call's partial-sum pass between the other's two kernels; the default
// stream handles 0 and 2 also differ per thread under per-thread default streams).
//
// Growth (rare: a stream's first call, or a bigger problem): the stream is synchronised, the old
// buffer freed, a bigger one (rounded up to WORKSPACE_GRANULE) allocated.  At most MAX_WORKSPACES
// buffers are kept; past that, the least recently used is freed (cudaFree waits for the device),
// so streams that were destroyed do not leak their buffers forever.
//
// Only host runtime calls: cudaGetDevice, cudaDeviceGetAttribute, cudaMalloc, cudaFree,
// cudaStreamSynchronize.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace dlconv {
namespace cuda {

namespace {

// Buffers are sized in multiples of 1 MiB: a problem that grows a little does not reallocate.
constexpr size_t WORKSPACE_GRANULE = size_t(1) << 20;
// (stream, thread) pairs whose buffer is kept; a process rarely drives more than a few.
constexpr size_t MAX_WORKSPACES = 16;

struct Workspace {
    int device;
    uintptr_t stream;
    std::thread::id thread;
    void* ptr;
    size_t bytes;
    uint64_t last_use;
};

std::mutex g_lock;
std::vector<Workspace> g_spaces;
uint64_t g_clock = 0;
int g_split_k_override = 0;

}  // namespace

void set_split_k_override(int splits) {
    std::lock_guard<std::mutex> hold(g_lock);
    g_split_k_override = splits;
}

int split_k_override() {
    std::lock_guard<std::mutex> hold(g_lock);
    return g_split_k_override;
}

int sm_count(const char* kernel) {
    int device = 0, sms = 0;
    check_call(cudaGetDevice(&device), kernel, "cudaGetDevice");
    check_call(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), kernel,
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    return sms > 0 ? sms : 1;
}

float* workspace(size_t floats, cudaStream_t stream, const char* kernel) {
    if (floats == 0) return nullptr;
    int device = 0;
    check_call(cudaGetDevice(&device), kernel, "cudaGetDevice");
    const uintptr_t s = reinterpret_cast<uintptr_t>(stream);
    const std::thread::id thread = std::this_thread::get_id();
    const size_t need = floats * sizeof(float);
    std::lock_guard<std::mutex> hold(g_lock);
    ++g_clock;
    Workspace* mine = nullptr;
    for (auto& w : g_spaces)
        if (w.device == device && w.stream == s && w.thread == thread) mine = &w;
    if (mine && mine->bytes >= need) {
        mine->last_use = g_clock;
        return static_cast<float*>(mine->ptr);
    }
    if (mine) {  // too small: let queued work on this stream finish with it, then replace it
        check_call(cudaStreamSynchronize(stream), kernel, "cudaStreamSynchronize (workspace growth)");
        check_call(cudaFree(mine->ptr), kernel, "cudaFree (workspace growth)");
        mine->ptr = nullptr;
        mine->bytes = 0;
    } else {
        if (g_spaces.size() >= MAX_WORKSPACES) {
            size_t lru = 0;
            for (size_t i = 1; i < g_spaces.size(); ++i)
                if (g_spaces[i].last_use < g_spaces[lru].last_use) lru = i;
            check_call(cudaFree(g_spaces[lru].ptr), kernel, "cudaFree (workspace eviction)");
            g_spaces.erase(g_spaces.begin() + lru);
        }
        g_spaces.push_back(Workspace{device, s, thread, nullptr, 0, 0});
        mine = &g_spaces.back();
    }
    const size_t bytes = (need + WORKSPACE_GRANULE - 1) / WORKSPACE_GRANULE * WORKSPACE_GRANULE;
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        g_spaces.erase(g_spaces.begin() + (mine - g_spaces.data()));
        check_call(e, kernel, ("cudaMalloc of a " + std::to_string(bytes) + "-byte workspace").c_str());
    }
    mine->ptr = p;
    mine->bytes = bytes;
    mine->last_use = g_clock;
    return static_cast<float*>(p);
}

}  // namespace cuda
}  // namespace dlconv
