// ffi_cpu.cpp — XLA FFI handlers (platform "cpu") for the C++ CPU kernels, part of dlconv._C when
// it is built against the XLA FFI headers (DLCONV_XLA_FFI; setup.py takes them from jaxlib).
//
// JAX calls them through jax.ffi.ffi_call (dlconv/bridges/jax.py): inside a jitted step XLA runs
// the handler itself, on one of its threads, with no Python in between.  Each handler calls the
// same kernel entry points as bind_cpu.cpp (cpu_kernels.h) on XLA's buffers, in place; outputs are
// buffers XLA allocated.  Buffers are checked here (dtype float32, dimensions the geometry implies)
// and any failure returns an ffi::Error (ffi_common.h).
//
// Targets (attributes in brackets; [y]/[b] are optional trailing arguments):
//   dlconv_conv2d_forward          x, w, [b]          -> y        {geometry, act, variant}
//   dlconv_conv2d_backward_data    dz, w, [y]         -> dx       {geometry, act}
//   dlconv_conv2d_backward_filter  x, dz, [y]         -> dw, db   {geometry, act}
//   dlconv_dense_forward           x, w, [b]          -> y        {act}
//   dlconv_dense_backward          x, w, dy, [y]      -> dx, dw, db  {act}
//   dlconv_softmax                 z                  -> out
//   dlconv_activation_backward     dy, y              -> dz       {act}  (4 = softmax, rank 2)
// As in bind_cpu.cpp, act 1-3 with y on the conv backward passes means dz holds dL/dy and act'(y)
// is applied inside the kernels.
//
// Threading: XLA calls a handler from whichever of its threads runs the thunk: the caller's thread
// or one of its intra-op pool ("XLAEigen") threads, since independent thunks (a layer's
// backward-data and backward-filter) may start concurrently.  libgomp keeps one team of workers
// per thread that opens a parallel region, so kernels run in place there left a team behind on
// every such thread (measured: OpenMP workers named after both the main and the XLAEigen threads
// after a few Keras steps), each spinning after its regions on the same cores.  So, as
// dlconv.runtime.HostThread does for the Python way in, work that uses OpenMP is handed to one
// long-lived C++ thread, "dlconv-xla", and the XLA thread waits (asleep) for it: one team.  Small
// work (SerialIfSmall: a team of one, no workers) runs in place, so the per-call overhead of a small
// op stays a few microseconds.  Either way the kernel runs under cpu::host_mutex() — the mutex the
// pybind11 entry points take too, so a jitted step never overlaps a kernel called through
// dlconv.ops (cpu_host.h says why one at a time).  DLCONV_FFI_IN_PLACE=1 runs everything in place
// (for measuring this choice).
//
// XLA's buffers: XLA:CPU takes an execution's buffers from malloc, anew on every run: its results
// and one block for all its temporaries (the handlers' outputs among them: 63 MB for the MNIST CNN
// train step at batch 128, XLA's buffer assignment says), which glibc mapped and unmapped every step
// (15,400 page faults per step, a quarter of dlconv's JAX step).  So when the handler table is first
// asked for (the JAX bridge registering the targets), cpu_handlers() applies
// heap::keep_freed_host_memory() (host_heap.h: glibc's mmap and trim thresholds, process-wide,
// shared with the torch bridge; DLCONV_KEEP_HEAP=0 opts out; host_heap.h also says why the saving
// is not reliable for XLA, whose worker threads allocate from glibc's non-main arenas).
#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

#include "cpu_host.h"
#include "host_heap.h"
#include "cpu_kernels.h"
#include "ffi_common.h"
#include "ffi_cpu.h"

namespace ffi = xla::ffi;
using dlconv::ConvGeometry;
using namespace dlconv::xffi;  // NOLINT: the helpers of ffi_common.h

namespace {

// The one thread that runs the FFI handlers' OpenMP work (see the header).  Callers hand it one
// task at a time and sleep until it is done; an exception thrown by the task is rethrown in the
// caller.  Never destroyed (joining a thread during static destruction can hang at exit); a forked
// child, which has no such thread, starts a new one on its first call.
class KernelThread {
   public:
    static KernelThread& get() {
        static std::once_flag at_fork;
        std::call_once(at_fork, [] { pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; }); });
        std::lock_guard<std::mutex> lk(create_mutex());
        if (instance() == nullptr) instance() = new KernelThread();
        return *instance();
    }

    void run(const std::function<void()>& task) {
        std::lock_guard<std::mutex> one_caller(submit_);
        std::unique_lock<std::mutex> lk(m_);
        task_ = &task;
        error_ = nullptr;
        cv_.notify_one();
        done_cv_.wait(lk, [&] { return task_ == nullptr; });
        if (error_) std::rethrow_exception(error_);
    }

   private:
    KernelThread() : thread_([this] { loop(); }) {
        pthread_setname_np(thread_.native_handle(), "dlconv-xla");
        thread_.detach();
    }
    static KernelThread*& instance() {
        static KernelThread* p = nullptr;
        return p;
    }
    static std::mutex& create_mutex() {
        static std::mutex m;
        return m;
    }
    void loop() {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [&] { return task_ != nullptr; });
            try {
                (*task_)();
            } catch (...) {
                error_ = std::current_exception();
            }
            task_ = nullptr;
            done_cv_.notify_one();
        }
    }

    std::mutex submit_, m_;
    std::condition_variable cv_, done_cv_;
    const std::function<void()>* task_ = nullptr;
    std::exception_ptr error_;
    std::thread thread_;
};

bool in_place_always() {
    static const bool v = [] {
        const char* e = std::getenv("DLCONV_FFI_IN_PLACE");
        return e != nullptr && e[0] == '1';
    }();
    return v;
}

// One kernel call: the host lock, small work in place on this thread alone, larger work on the
// kernel thread; exceptions → ffi::Error.
template <typename F>
ffi::Error run(const char* kernel, double work, double serial_below, F&& fn) {
    const bool small = work < serial_below;
    return guarded(kernel, [&] {
        const std::function<void()> task = [&] {
            std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
            dlconv::cpu::SerialIfSmall serial(small);
            fn();
        };
        if (small || in_place_always())
            task();
        else
            KernelThread::get().run(task);
    });
}

ffi::Error conv_forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> y,
                        ffi::Span<const int64_t> geometry, int64_t act, int64_t variant) {
    const char* K = "dlconv_conv2d_forward";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    if (!dlconv::cpu::conv2d_forward_applicable(g, int(variant)))
        return invalid(K, "variant " + std::to_string(variant) + " cannot run " + dlconv::geometry_str(g) +
                              " in this build");
    const float* b = nullptr;
    DLCONV_FFI_TRY(conv_forward_buffers(K, g, x, w, rest, *y, &b));
    if (g.batch == 0) return ffi::Error::Success();
    return run(K, dlconv::cpu::conv_flops(g), dlconv::cpu::SERIAL_FLOPS, [&] {
        dlconv::cpu::conv2d_forward(g, in_ptr(x), in_ptr(w), b, int(act), out_ptr(y), int(variant));
    });
}

ffi::Error conv_backward_data(ffi::AnyBuffer dz, ffi::AnyBuffer w, ffi::RemainingArgs rest,
                              ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> geometry, int64_t act) {
    const char* K = "dlconv_conv2d_backward_data";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    DLCONV_FFI_TRY(check(K, "dz", dz, y_shape(g)));
    DLCONV_FFI_TRY(check(K, "w", w, w_shape(g)));
    const float* y = nullptr;
    DLCONV_FFI_TRY(activation_output(K, rest, y_shape(g), act, conv_missing_y(act), &y));
    DLCONV_FFI_TRY(check(K, "dx", *dx, x_shape(g)));
    if (g.batch == 0) return ffi::Error::Success();
    return run(K, dlconv::cpu::conv_flops(g), dlconv::cpu::SERIAL_FLOPS, [&] {
        dlconv::cpu::conv2d_backward_data(g, in_ptr(dz), in_ptr(w), out_ptr(dx), y, int(act));
    });
}

ffi::Error conv_backward_filter(ffi::AnyBuffer x, ffi::AnyBuffer dz, ffi::RemainingArgs rest,
                                ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> db,
                                ffi::Span<const int64_t> geometry, int64_t act) {
    const char* K = "dlconv_conv2d_backward_filter";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    DLCONV_FFI_TRY(check(K, "x", x, x_shape(g)));
    DLCONV_FFI_TRY(check(K, "dz", dz, y_shape(g)));
    const float* y = nullptr;
    DLCONV_FFI_TRY(activation_output(K, rest, y_shape(g), act, conv_missing_y(act), &y));
    DLCONV_FFI_TRY(check(K, "dw", *dw, w_shape(g)));
    DLCONV_FFI_TRY(check(K, "db", *db, {g.filters}));
    return run(K, dlconv::cpu::conv_flops(g), dlconv::cpu::SERIAL_FLOPS, [&] {
        dlconv::cpu::conv2d_backward_filter(g, in_ptr(x), in_ptr(dz), out_ptr(dw), out_ptr(db), y, int(act));
    });
}

ffi::Error dense_forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> y,
                         int64_t act) {
    const char* K = "dlconv_dense_forward";
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    int64_t M, Kf, N;
    DLCONV_FFI_TRY(dense_operands(K, x, w, &M, &Kf, &N));
    const float* b = nullptr;
    DLCONV_FFI_TRY(optional_arg(K, "b", rest, {N}, &b));
    DLCONV_FFI_TRY(check(K, "y", *y, {M, N}));
    return run(K, 2.0 * double(M) * double(Kf) * double(N), dlconv::cpu::SERIAL_FLOPS, [&] {
        dlconv::cpu::dense_forward(M, Kf, N, in_ptr(x), in_ptr(w), b, int(act), out_ptr(y));
    });
}

ffi::Error dense_backward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy, ffi::RemainingArgs rest,
                          ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> db, int64_t act) {
    const char* K = "dlconv_dense_backward";
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    int64_t M, Kf, N;
    DLCONV_FFI_TRY(dense_operands(K, x, w, &M, &Kf, &N));
    const float* y = nullptr;
    DLCONV_FFI_TRY(dense_backward_buffers(K, M, Kf, N, act, dy, rest, *dx, *dw, *db, &y));
    return run(K, 4.0 * double(M) * double(Kf) * double(N), dlconv::cpu::SERIAL_FLOPS, [&] {
        dlconv::cpu::dense_backward(M, Kf, N, in_ptr(x), in_ptr(w), in_ptr(dy), y, int(act), out_ptr(dx),
                                    out_ptr(dw), out_ptr(db));
    });
}

ffi::Error softmax(ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> out) {
    const char* K = "dlconv_softmax";
    int64_t R, C;
    DLCONV_FFI_TRY(softmax_buffers(K, z, *out, &R, &C));
    if (R * C == 0) return ffi::Error::Success();
    return run(K, double(R) * double(C), dlconv::cpu::SERIAL_ELEMENTS,
               [&] { dlconv::cpu::softmax(R, C, in_ptr(z), out_ptr(out)); });
}

ffi::Error activation_backward(ffi::AnyBuffer dy, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> dz, int64_t act) {
    const char* K = "dlconv_activation_backward";
    DLCONV_FFI_TRY(check_activation(K, act, SOFTMAX));
    int64_t rows, cols;
    DLCONV_FFI_TRY(activation_backward_buffers(K, act, dy, y, *dz, &rows, &cols));
    if (rows * cols == 0) return ffi::Error::Success();
    return run(K, double(rows) * double(cols), dlconv::cpu::SERIAL_ELEMENTS, [&] {
        dlconv::cpu::activation_backward(rows, cols, in_ptr(dy), in_ptr(y), int(act), out_ptr(dz));
    });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvConv2dForward, conv_forward, sig::conv2d_forward(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvConv2dBackwardData, conv_backward_data, sig::conv2d_backward_data(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvConv2dBackwardFilter, conv_backward_filter,
                              sig::conv2d_backward_filter(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvDenseForward, dense_forward, sig::dense_forward(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvDenseBackward, dense_backward, sig::dense_backward(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvSoftmax, softmax, sig::softmax(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvActivationBackward, activation_backward,
                              sig::activation_backward(ffi::Ffi::Bind()));

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& cpu_handlers() {
    heap::keep_freed_host_memory();
    static const std::vector<std::pair<const char*, void*>> table = {
        {"dlconv_conv2d_forward", reinterpret_cast<void*>(DlconvConv2dForward)},
        {"dlconv_conv2d_backward_data", reinterpret_cast<void*>(DlconvConv2dBackwardData)},
        {"dlconv_conv2d_backward_filter", reinterpret_cast<void*>(DlconvConv2dBackwardFilter)},
        {"dlconv_dense_forward", reinterpret_cast<void*>(DlconvDenseForward)},
        {"dlconv_dense_backward", reinterpret_cast<void*>(DlconvDenseBackward)},
        {"dlconv_softmax", reinterpret_cast<void*>(DlconvSoftmax)},
        {"dlconv_activation_backward", reinterpret_cast<void*>(DlconvActivationBackward)},
    };
    return table;
}

}  // namespace xffi
}  // namespace dlconv

// For handlers in other files (ffi_pool.cpp): the same run() — host lock, small work in place,
// OpenMP work on the one "dlconv-xla" thread — so every handler shares one OpenMP team.
namespace dlconv {
namespace xffi {

ffi::Error run_host_kernel(const char* kernel, double work, double serial_below, const std::function<void()>& fn) {
    return run(kernel, work, serial_below, fn);
}

}  // namespace xffi
}  // namespace dlconv
