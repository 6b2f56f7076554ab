// cpu_host.h — how a host kernel call is run, shared by both ways into the C++ CPU kernels:
// the pybind11 entry points (bind_cpu.cpp, called by dlconv.ops on the dlconv-host thread) and
// the XLA FFI handlers (jax_ffi.cpp, called by XLA on its own threads inside a jitted step).
//
//   host_mutex()    one kernel call at a time across both ways in.  Each kernel already spreads
//                   over every core with OpenMP; two at once only fight for the cores (see
//                   dlconv.runtime.HostThread).  Python's HostThread lock orders the calls that
//                   come through dlconv.ops; XLA never takes it (it runs no Python), so this
//                   C++ mutex is the lock both ways share.  Taken with the GIL released, and
//                   never while waiting for the GIL or a Python lock: no lock-order cycle.
//   SerialIfSmall   small work runs on the calling thread alone (below).
#pragma once

#include <omp.h>

#include <mutex>

#include "geometry.h"

namespace dlconv {
namespace cpu {

// One per extension module (an inline function's static: a single instance in dlconv._C).
inline std::mutex& host_mutex() {
    static std::mutex m;
    return m;
}

// Small work runs on the calling thread alone.  Between two dlconv calls (a framework runs
// its own ops there) OpenMP's worker falls asleep; waking it costs 0.1-0.6 ms on a virtual
// machine (measured here: a 128x128 -> 10 dense + softmax took 54 us back to back and 611 us
// after a 5 ms pause), more than the whole op when the op is small.
constexpr double SERIAL_FLOPS = 2e7;           // ~0.1 ms on one AVX-512 core
constexpr double SERIAL_ELEMENTS = 131072;     // element-wise ops: ~1.5 MB moved

// Caps this thread's OpenMP team at 1 for the guard's lifetime (a per-thread setting, so
// concurrent callers do not affect each other).
class SerialIfSmall {
   public:
    explicit SerialIfSmall(bool small) : saved_(omp_get_max_threads()), on_(small) {
        if (on_) omp_set_num_threads(1);
    }
    ~SerialIfSmall() {
        if (on_) omp_set_num_threads(saved_);
    }
    SerialIfSmall(const SerialIfSmall&) = delete;
    SerialIfSmall& operator=(const SerialIfSmall&) = delete;

   private:
    int saved_;
    bool on_;
};

inline double conv_flops(const ConvGeometry& g) {
    return 2.0 * double(g.batch) * double(g.out_h) * double(g.out_w) * double(g.k_h * g.k_w) *
           double(g.in_c / g.groups) * double(g.filters);
}

}  // namespace cpu
}  // namespace dlconv
