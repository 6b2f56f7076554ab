// tf_ops.cpp — the TensorFlow op library: dlconv's C++ CPU kernels (and, in a GOOGLE_CUDA
// build, its CUDA C++ kernels) as graph-native TF ops.
//
// Built by dlconv/tf_ops.py against the installed TensorFlow (tf.sysconfig flags) together with
// the CPU kernel sources (dlconv/tf_ops.py SOURCES), loaded with tf.load_op_library.  No Python
// runs in these ops.
// With nvcc and a CUDA build of TensorFlow it is compiled with -DGOOGLE_CUDA=1 and linked with
// cuda_conv.cu, cuda_dense.cu and cuda_workspace.cu: the same op classes are then registered for
// DEVICE_GPU too, launching on the op's stream (GpuLaunch, at the end of the namespace).  One
// op class per op validates and allocates for both devices; CpuLaunch / GpuLaunch run it.
//
// Ops (float32, NHWC activations, HWIO conv weights, (in, out) dense weights):
//   DlconvConv2D(x, w, b) -> y                      y = act(conv2d(x, w) + b)
//   DlconvConv2DBackpropInput(dy, w, y, x_shape) -> dx
//   DlconvConv2DBackpropFilter(x, dy, y) -> (dw, db)
//   DlconvDense(x, w, b) -> y                       y = act(x @ w + b), act may be softmax
//   DlconvDenseGrad(x, w, dy, y) -> (dx, dw, db)
//   DlconvMaxPool2D(x) -> (y, arg)                  Keras' MaxPooling2D, TensorFlow's rules (cpu_pool.h);
//                                                   arg: uint8 window tap kh*k_w + kw per output
//   DlconvMaxPool2DGrad(x, dy, arg) -> dx           dx from the stored arg (x: its shape only);
//                                                   relu = true: dx * relu'(x) (the conv's fused relu)
//   DlconvConv2DMaxPool2x2(x, w, b) -> (y, arg)     DlconvConv2D (relu) then a 2x2 stride-2 DlconvMaxPool2D
//                                                   in one kernel, the conv's output never written
//                                                   (opt-in, dlconv.bridges.tensorflow._fusable_relu_conv)
//   DlconvConv2DBackpropInputFromPool(pool_dy, arg, w, x_shape) -> dx
//   DlconvConv2DBackpropFilterFromPool(x, pool_dy, arg) -> (dw, db)
//                                                   a relu conv's backward ops when its output feeds a 2x2
//                                                   stride-2 DlconvMaxPool2D: dz read from that pool's
//                                                   gradient in place, never formed
//   DlconvDropout(x, seed) -> y                     y = keep ? x / (1 - rate) : 0 (cpu_dropout.h), keep a
//                                                   hash of (seed[0], seed[1], element index); its
//                                                   gradient is the same op on dy (the mask regenerated)
// `b` is a vector of `filters`/`units` values, or of length 0 for no bias.  The backward ops
// take dy = dL/dy of the activation and y, the forward output: the kernels apply act'(y)
// themselves (no dL/dz tensor, no separate activation-backward op).
//
// Geometry: resolution stays in Python (dlconv.shapes via dlconv.runtime.conv_geometry_cached).
// The attrs carry the *resolved* record without the batch: strides, dilations and the explicit
// pads (top, bottom, left, right) — "same" has already become numbers.  Given explicit pads the
// output size is the one formula csrc/geometry.h checks (out = (in + pads - k_eff) / stride + 1);
// the shape functions and the kernels form the ConvGeometry from the tensors' dims plus these
// attrs and validate it with validate_geometry, so a hand-written graph with bad attrs or shapes
// gets InvalidArgumentError naming the values, never a crash.  The max pool likewise: ksize,
// strides and the resolved pads of dlconv.shapes.pool_geometry; its record is a groups = C
// geometry (cpu_pool.h), re-checked by check_pool_geometry.  CPU only (no DEVICE_GPU kernel: the
// bridge takes tf.nn.max_pool2d whenever TensorFlow sees a GPU).
//
// Threading: dlconv's kernels parallelise with OpenMP and must run one at a time (two teams at
// once fight for the cores), so every call with a team holds one process-wide mutex; every call
// runs on the TensorFlow thread that called the op.  Small calls (below SERIAL_FLOPS; conv
// backward passes below SERIAL_FLOPS_BACKWARD while the team has <= SIDE_BY_SIDE_MAX_THREADS
// threads) run with a one-thread OpenMP team (no workers to wake) and without the mutex
// (UNLOCKED_SMALL: one core each, like any two TF ops side by side); larger ones with
// dlconv's full OpenMP team.  Measured
// against the alternatives (DLCONV_TF_THREADING, below; benchmarks/tf_inference.py): handing
// large calls to one dedicated dlconv thread (one OpenMP team, as dlconv.runtime.HostThread does
// for the Python callbacks) made batch-1 inference 9-13x slower than stock on a loaded 2-core VM
// (each hand-off is two thread wake-ups); every call single-threaded on TensorFlow's thread
// (TensorFlow's inter-op threads instead of OpenMP) was close to this default.  Train step,
// batch 128 (issue 12): the two conv backward passes of a layer single-threaded *and unlocked*,
// so TensorFlow's two inter-op threads run backward-data and backward-filter side by side,
// measured the same as this default (time ratio vs stock 0.728 vs 0.701 and 0.763 vs 0.762,
// interleaved in one process, 2-core EPYC at load 11-13): OpenMP's team stays the default.
// Batch-1 inference (same machine, per op minus an empty tf.function's call): dense 9216->128
// 81-133 us on one thread vs 98-111 us with the team; conv 32->64 26x26 128-150 vs 145-169 us;
// below SERIAL_FLOPS stays one thread, the conv (2.1e7) just above it.
// Issues 12/13 (in-step slowdown of the kernels, 2-core EPYC, every figure a ratio to stock
// interleaved in one process, benchmarks/tf_threading.py): (1) this library links libgomp and
// loaded it before the cpp backend module that sets GOMP_SPINCOUNT=10000, so TF steps ran with
// libgomp's 300000 (`pause` ~50 ns here: each idle worker spun ~15 ms after every region, all
// through a ResNet step, beside TF's own ops); dlconv._omp now sets it at `import dlconv` and
// before this library loads (a user's GOMP_SPINCOUNT / OMP_WAIT_POLICY wins; dlconv info says
// which).  Spin values compare only across processes: at load 4-9 the MNIST/ResNet ratios moved
// less than their noise (0.67-0.81 / 0.78-1.05 for 300000 and 10000 alike); at load 3.5-4.3
// MNIST 0.770, 0.734 vs 0.766, 0.738 (ratios equal) but both steps faster in absolute terms with
// 10000 (dlconv 111, 107 -> 97, 91 ms; stock, sampled right after ours, 144, 146 -> 127, 123 ms:
// the spinning worker had slowed TF's own ops); ResNet 0.828, 0.846 vs 0.753, 0.941.  (2) The ECAL
// ResNet's 3x3 convs are 3.8e7 flops at batch 32, just above SERIAL_FLOPS: ~70 team calls per
// step, each with its wake-ups and barriers.  With their backward passes on one thread and
// unlocked (TF overlaps a layer's backward-data and backward-filter; backward-filter is off
// the critical path) the ResNet ratio went 0.972 -> 0.763 (load 3.3), 1.068 -> 0.868 (load
// 8.1), 1.391 -> 1.135 (load 6.4),
// unlocking alone 0.803 -> 0.769 (load 7.0); OMP_NUM_THREADS=1 (only the lock differs) 1.134 ->
// 1.070 and 0.812 -> 0.831 (load 7): neutral.  MNIST (convs far above 1e8) 0.671 -> 0.665 (load
// 3.7), 0.722 -> 0.708, 0.733 -> 0.718, one thread 0.683 -> 0.687; MNIST inference
// (tf.function) batch 1 1.153 -> 1.088, batch 8 0.701 -> 0.691 (load 7.8-7.9; small calls no
// longer lock).  Forward convs on
// one thread too (SERIAL_FLOPS = 1e8) measured 0.735 at load 8.1 but would halve the forward's
// cores on a quiet machine (nothing runs beside a ResNet's forward chain): not taken without a
// quiet run.
// Issue 12 again (Intel Xeon 2 cores, MNIST train step, ratio to stock interleaved in one
// process, the native pool before its relu fold): both conv backward passes on one thread and
// unlocked 0.716 vs 0.717 for this default (load 2.3), 0.721 vs 0.734 (2.3), 0.707 vs 0.647
// (3.6); every call on one thread 0.726 vs 0.734, 0.754 vs 0.647; the max pool on one thread
// (SERIAL_POOL_ELEMENTS) 0.733 vs 0.731, 0.752 vs 0.709, 0.728 vs 0.734: neutral to worse, the
// defaults stay.  (A profile of the step, tf.profiler at load ~2, shows the two cores busy
// nearly throughout; TF's ops beside a team call run several times slower than in the stock
// step, e.g. Adam's Sqrt / RealDiv of dense1 2.6 / 3.8 ms vs 0.4 / 0.3 ms, but the work only
// moves between threads: little idle time is left for a scheduling change to fill.)
// A backward-filter whose layer has no backward-data pass (x a graph input: the bridge sets attr
// alone) is held to SERIAL_FLOPS, not SERIAL_FLOPS_BACKWARD: nothing runs beside it, so one
// thread would idle a core (MNIST conv1, 5e7 flops, last on the step's critical path: on one
// thread 1.9 ms in the step's profile; the step's ratio to stock 0.715 -> 0.700, Intel Xeon).
// With more than SIDE_BY_SIDE_MAX_THREADS threads one pass per core would idle the rest, so
// SERIAL_FLOPS applies there.  malloc'd scratch is not a cost: ~10 minor page faults per
// ResNet step.
#include <omp.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if GOOGLE_CUDA
#define EIGEN_USE_GPU  // Eigen::GpuDevice (the op's CUDA stream) in op_kernel.h's eigen_device<>()
#include "cuda_kernels.h"
#endif
#include "cpu_dropout.h"
#include "cpu_kernels.h"
#include "geometry.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace dlconv {
namespace tfops {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// Same thresholds as bind_cpu.cpp: below them a kernel runs on the calling thread alone
// (waking OpenMP's sleeping workers costs 0.1-0.6 ms on a virtual machine, more than the op).
constexpr double SERIAL_FLOPS = 2e7;        // ~0.1 ms on one AVX-512 core
// Conv backward passes below this (~0.5 ms on one core) run with a one-thread team when the
// OpenMP team has at most SIDE_BY_SIDE_MAX_THREADS threads: TensorFlow then runs a layer's
// backward-data and backward-filter side by side, one core each, which fills such a machine
// without the team's wake-ups and barriers (threading note: ResNet step).  With more cores one
// pass per core would leave most of them idle, and SERIAL_FLOPS applies.
constexpr double SERIAL_FLOPS_BACKWARD = 1e8;
constexpr int SIDE_BY_SIDE_MAX_THREADS = 2;
// Whether small (one-thread) calls run without the process-wide kernel lock (threading note).
constexpr bool UNLOCKED_SMALL = true;
// Max pools (forward or gradient) of fewer input elements than this run with a one-thread team
// (cpu_host.h's SERIAL_ELEMENTS, as for the pybind11 entry points: a memory-bound pass).
constexpr double SERIAL_POOL_ELEMENTS = 131072;
// Geometry fields beyond this are refused before any product is formed (no int64 overflow).
constexpr int64_t MAX_FIELD = int64_t(1) << 31;
// Activation code of softmax (dense only; geometry.h's element-wise codes are 0-3).
constexpr int ACT_SOFTMAX = 4;

// ----------------------------------------------------------------------------- threading
// One kernel at a time, process-wide (see the threading note at the top).
// DLCONV_TF_THREADING (read once): "openmp" (the default, described above), "worker" (large
// calls on one dedicated dlconv thread, the caller sleeping meanwhile) or "serial" (every call
// with a one-thread OpenMP team on TensorFlow's thread).
enum class Threading { OPENMP, WORKER, SERIAL };

Threading threading_mode() {
    const char* v = std::getenv("DLCONV_TF_THREADING");
    if (v && std::string(v) == "worker") return Threading::WORKER;
    if (v && std::string(v) == "serial") return Threading::SERIAL;
    return Threading::OPENMP;
}

class HostRunner {
   public:
    HostRunner() : mode_(threading_mode()) {
        if (mode_ == Threading::WORKER) std::thread([this] { loop(); }).detach();
    }

    // Runs fn(): in place with a one-thread team when `small` (without the process-wide
    // kernel lock when `unlocked_small`: one core each, like any two TensorFlow ops side by
    // side), else under the lock with dlconv's OpenMP team (in place, or on the dlconv thread
    // for "worker").
    void run(bool small, bool unlocked_small, const std::function<void()>& fn) {
        if (small && unlocked_small) {
            one_thread(fn);
            return;
        }
        std::lock_guard<std::mutex> busy(busy_);
        if (mode_ == Threading::SERIAL) small = true;  // large calls too, but one at a time
        if (mode_ == Threading::OPENMP && !small) {
            fn();
            return;
        }
        if (small) {
            one_thread(fn);
            return;
        }
        std::unique_lock<std::mutex> lk(m_);
        job_ = &fn;
        error_ = nullptr;
        done_ = false;
        cv_.notify_one();
        done_cv_.wait(lk, [this] { return done_; });
        if (error_) std::rethrow_exception(error_);
    }

   private:
    // fn() with this thread's OpenMP team capped at 1 (a per-thread setting), restored after.
    static void one_thread(const std::function<void()>& fn) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(1);
        struct Restore {
            int n;
            ~Restore() { omp_set_num_threads(n); }
        } restore{saved};
        fn();
    }

    void loop() {
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            cv_.wait(lk, [this] { return job_ != nullptr; });
            const std::function<void()>* job = job_;
            lk.unlock();
            std::exception_ptr err;
            try {
                (*job)();
            } catch (...) {
                err = std::current_exception();
            }
            lk.lock();
            job_ = nullptr;
            error_ = err;
            done_ = true;
            done_cv_.notify_one();
        }
    }

    Threading mode_;
    std::mutex busy_;                         // one kernel call at a time
    std::mutex m_;                            // guards job_/done_/error_
    std::condition_variable cv_, done_cv_;
    const std::function<void()>* job_ = nullptr;
    std::exception_ptr error_;
    bool done_ = false;
};

// The runner is created on first use; a forked child (which has no dlconv thread, and whose
// mutexes may be held by threads that do not exist there) starts afresh with a new one.
std::atomic<HostRunner*> g_runner{nullptr};

void forget_runner_in_child() { g_runner.store(nullptr); }  // the parent's one is leaked

HostRunner& runner() {
    HostRunner* r = g_runner.load();
    if (r) return *r;
    static std::once_flag atfork;
    std::call_once(atfork, [] { pthread_atfork(nullptr, nullptr, forget_runner_in_child); });
    HostRunner* fresh = new HostRunner();
    HostRunner* expected = nullptr;
    if (g_runner.compare_exchange_strong(expected, fresh)) return *fresh;
    // Lost a race to another first caller: `fresh` is leaked, not deleted (in "worker" mode its
    // thread is waiting on it).
    return *expected;
}

// The small-call thresholds and whether small calls skip the lock: SERIAL_FLOPS,
// SERIAL_FLOPS_BACKWARD and UNLOCKED_SMALL unless changed at run time (dlconv.tf_ops.threading_knobs, through
// dlconv_tf_ops_threading below: for benchmarks that compare settings in one process).
std::atomic<double> g_serial_flops{SERIAL_FLOPS};
std::atomic<double> g_serial_flops_backward{SERIAL_FLOPS_BACKWARD};
std::atomic<bool> g_unlocked_small{UNLOCKED_SMALL};
std::atomic<double> g_serial_pool_elements{SERIAL_POOL_ELEMENTS};

// Which threshold a call is held to: a conv backward pass (TensorFlow can run a layer's two
// side by side), a max pool or a dropout (memory-bound: its work is input elements, not flops;
// both take SERIAL_POOL_ELEMENTS) or anything else.
enum class Pass { OTHER, CONV_BACKWARD, POOL };

// Runs a kernel; a C++ exception from it becomes an error status (never escapes into TF).
void run_kernel(OpKernelContext* ctx, double flops, const std::function<void()>& fn, Pass pass = Pass::OTHER) {
    const bool side_by_side = pass == Pass::CONV_BACKWARD && omp_get_max_threads() <= SIDE_BY_SIDE_MAX_THREADS;
    const std::atomic<double>& limit = pass == Pass::POOL ? g_serial_pool_elements
                                       : side_by_side     ? g_serial_flops_backward
                                                          : g_serial_flops;
    try {
        runner().run(flops < limit.load(std::memory_order_relaxed),
                     g_unlocked_small.load(std::memory_order_relaxed), fn);
    } catch (const std::invalid_argument& e) {
        ctx->SetStatus(errors::InvalidArgument(e.what()));
    } catch (const std::exception& e) {
        ctx->SetStatus(errors::Internal("dlconv kernel failed: ", e.what()));
    }
}

// ----------------------------------------------------------------------------- attrs
struct ConvAttrs {
    int64_t stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
    int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
    int64_t groups = 1;  // grouped convolution: w is (kh, kw, C / groups, filters)
    int act = ACT_LINEAR;
};

// Activation attr → code; `allow_softmax` for dense.
Status activation_code(const std::string& name, bool allow_softmax, int* code) {
    static const char* names[] = {"linear", "relu", "sigmoid", "tanh", "softmax"};
    for (int i = 0; i < 5; ++i)
        if (name == names[i] && (i < ACT_SOFTMAX || allow_softmax)) {
            *code = i;
            return Status();
        }
    return errors::InvalidArgument("dlconv: activation must be one of linear, relu, sigmoid, tanh",
                                   allow_softmax ? ", softmax" : "", "; got '", name, "'");
}

std::string list_str(const std::vector<int64_t>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + "]";
}

Status check_list(const char* name, const std::vector<int64_t>& v, size_t n, int64_t minimum) {
    if (v.size() != n)
        return errors::InvalidArgument("dlconv: attr ", name, " must have ", n, " values, got ", list_str(v));
    for (int64_t x : v)
        if (x < minimum || x > MAX_FIELD)
            return errors::InvalidArgument("dlconv: attr ", name, " values must be in [", minimum, ", ",
                                           MAX_FIELD, "], got ", list_str(v));
    return Status();
}

// Reads and checks strides/dilations/pads/activation from a kernel construction or a shape
// inference context (both have GetAttr with the same signature).
template <class Ctx>
Status read_conv_attrs(Ctx* c, bool with_activation, ConvAttrs* a) {
    std::vector<int64_t> strides, dilations, pads;
    TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
    TF_RETURN_IF_ERROR(c->GetAttr("dilations", &dilations));
    TF_RETURN_IF_ERROR(c->GetAttr("pads", &pads));
    TF_RETURN_IF_ERROR(check_list("strides", strides, 2, 1));
    TF_RETURN_IF_ERROR(check_list("dilations", dilations, 2, 1));
    TF_RETURN_IF_ERROR(check_list("pads (top, bottom, left, right)", pads, 4, 0));
    a->stride_h = strides[0], a->stride_w = strides[1];
    a->dil_h = dilations[0], a->dil_w = dilations[1];
    a->pad_top = pads[0], a->pad_bottom = pads[1], a->pad_left = pads[2], a->pad_right = pads[3];
    int64_t groups = 1;
    TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
    if (groups < 1 || groups > MAX_FIELD)
        return errors::InvalidArgument("dlconv: attr groups must be in [1, ", MAX_FIELD, "], got ", groups);
    a->groups = groups;
    if (with_activation) {
        std::string act;
        TF_RETURN_IF_ERROR(c->GetAttr("activation", &act));
        TF_RETURN_IF_ERROR(activation_code(act, false, &a->act));
    }
    return Status();
}

// Output size along one axis from explicit pads (csrc/geometry.h's check); -1 if impossible.
int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t dil, int64_t before, int64_t after) {
    const int64_t keff = (k - 1) * dil + 1, padded = in + before + after;
    if (keff > padded) return -1;
    return (padded - keff) / stride + 1;
}

Status impossible_axis(const char* axis, int64_t in, int64_t k, int64_t dil, int64_t before, int64_t after) {
    return errors::InvalidArgument("dlconv: kernel ", axis, " ", k, " with dilation ", dil, " (effective ",
                                   (k - 1) * dil + 1, ") is larger than the padded input ", axis, ": ", in,
                                   " + ", before, " + ", after);
}

// The full record from x's NHWC dims, the kernel's (kh, kw, filters) and the attrs; validated.
Status make_geometry(const char* op, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw,
                     int64_t wc, int64_t filters, const ConvAttrs& a, ConvGeometry* g) {
    for (int64_t v : {n, h, w, c, kh, kw, wc, filters})
        if (v > MAX_FIELD) return errors::InvalidArgument("dlconv ", op, ": dimension ", v, " is out of range");
    if (c % a.groups != 0 || filters % a.groups != 0)
        return errors::InvalidArgument("dlconv ", op, ": groups = ", a.groups, " must divide the ", c,
                                       " input channels and the ", filters, " filters");
    if (wc * a.groups != c)
        return errors::InvalidArgument("dlconv ", op, ": channel mismatch: x has ", c, " channels but w expects ",
                                       wc, " x ", a.groups, " groups");
    if (h < 1 || w < 1 || c < 1 || kh < 1 || kw < 1 || filters < 1)
        return errors::InvalidArgument("dlconv ", op, ": sizes must be >= 1, got x (", n, ", ", h, ", ", w, ", ",
                                       c, "), kernel (", kh, ", ", kw, ", ", wc, ", ", filters, ")");
    const int64_t oh = out_size(h, kh, a.stride_h, a.dil_h, a.pad_top, a.pad_bottom);
    if (oh < 0) return impossible_axis("height", h, kh, a.dil_h, a.pad_top, a.pad_bottom);
    const int64_t ow = out_size(w, kw, a.stride_w, a.dil_w, a.pad_left, a.pad_right);
    if (ow < 0) return impossible_axis("width", w, kw, a.dil_w, a.pad_left, a.pad_right);
    *g = ConvGeometry{n, h, w, c, filters, kh, kw, a.stride_h, a.stride_w, a.dil_h, a.dil_w,
                      a.pad_top, a.pad_bottom, a.pad_left, a.pad_right, oh, ow, a.groups};
    try {
        validate_geometry(*g);
    } catch (const std::invalid_argument& e) {
        return errors::InvalidArgument(e.what());
    }
    return Status();
}

Status check_rank(const char* op, const char* name, const Tensor& t, int rank) {
    if (t.dims() != rank)
        return errors::InvalidArgument("dlconv ", op, ": ", name, " must have rank ", rank, ", got shape ",
                                       t.shape().DebugString());
    return Status();
}

Status check_shape(const char* op, const char* name, const Tensor& t, const TensorShape& want) {
    if (t.shape() != want)
        return errors::InvalidArgument("dlconv ", op, ": ", name, " has shape ", t.shape().DebugString(),
                                       ", expected ", want.DebugString());
    return Status();
}

// Bias: length `n`, or length 0 (no bias) → nullptr.
Status bias_ptr(const char* op, const Tensor& b, int64_t n, const float** ptr) {
    TF_RETURN_IF_ERROR(check_rank(op, "b", b, 1));
    if (b.dim_size(0) != 0 && b.dim_size(0) != n)
        return errors::InvalidArgument("dlconv ", op, ": b must have ", n, " values (or 0 for no bias), got ",
                                       b.dim_size(0));
    *ptr = b.dim_size(0) ? b.flat<float>().data() : nullptr;
    return Status();
}

const float* fptr(const Tensor& t) { return t.flat<float>().data(); }
float* fptr(Tensor* t) { return t->flat<float>().data(); }

double conv_flops(const ConvGeometry& g) {
    return 2.0 * double(g.batch) * double(g.out_h) * double(g.out_w) * double(g.k_h * g.k_w) *
           double(g.in_c / g.groups) * double(g.filters);
}

TensorShape x_shape(const ConvGeometry& g) { return TensorShape({g.batch, g.in_h, g.in_w, g.in_c}); }
TensorShape w_shape(const ConvGeometry& g) { return TensorShape({g.k_h, g.k_w, g.group_in_c(), g.filters}); }
TensorShape y_shape(const ConvGeometry& g) { return TensorShape({g.batch, g.out_h, g.out_w, g.filters}); }

// ----------------------------------------------------------------------------- shape functions
// Unknown dims stay unknown (the batch, typically); known ones give the output dims, and bad
// attrs or impossible geometry fail graph construction with the same messages as the kernels.
Status conv_out_dim(InferenceContext* c, DimensionHandle in, int64_t k, int64_t stride, int64_t dil,
                    int64_t before, int64_t after, const char* axis, DimensionHandle* out) {
    if (!c->ValueKnown(in) || k < 0) {
        *out = c->UnknownDim();
        return Status();
    }
    const int64_t o = out_size(c->Value(in), k, stride, dil, before, after);
    if (o < 0) return impossible_axis(axis, c->Value(in), k, dil, before, after);
    *out = c->MakeDim(o);
    return Status();
}

Status conv_forward_shape(InferenceContext* c) {
    ConvAttrs a;
    TF_RETURN_IF_ERROR(read_conv_attrs(c, true, &a));
    ShapeHandle x, w, b;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &w));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &b));
    DimensionHandle ch, wch;
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(w, 2), a.groups, &wch));
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 3), wch, &ch));
    const int64_t kh = c->Value(c->Dim(w, 0)), kw = c->Value(c->Dim(w, 1));
    DimensionHandle oh, ow;
    TF_RETURN_IF_ERROR(conv_out_dim(c, c->Dim(x, 1), kh, a.stride_h, a.dil_h, a.pad_top, a.pad_bottom, "height", &oh));
    TF_RETURN_IF_ERROR(conv_out_dim(c, c->Dim(x, 2), kw, a.stride_w, a.dil_w, a.pad_left, a.pad_right, "width", &ow));
    c->set_output(0, c->MakeShape({c->Dim(x, 0), oh, ow, c->Dim(w, 3)}));
    return Status();
}

Status conv_backprop_input_shape(InferenceContext* c) {
    ConvAttrs a;
    TF_RETURN_IF_ERROR(read_conv_attrs(c, true, &a));
    ShapeHandle dy, w, y, xs;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &w));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &y));
    TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(3, &xs));
    TF_RETURN_IF_ERROR(c->WithRank(xs, 4, &xs));
    c->set_output(0, xs);
    return Status();
}

Status conv_backprop_filter_shape(InferenceContext* c) {
    ConvAttrs a;
    TF_RETURN_IF_ERROR(read_conv_attrs(c, true, &a));
    std::vector<int64_t> ks;
    TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &ks));
    TF_RETURN_IF_ERROR(check_list("kernel_size", ks, 2, 1));
    ShapeHandle x, dy, y;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &y));
    DimensionHandle wc = c->Dim(x, 3);
    if (a.groups != 1) TF_RETURN_IF_ERROR(c->Divide(c->Dim(x, 3), a.groups, true, &wc));
    c->set_output(0, c->MakeShape({c->MakeDim(ks[0]), c->MakeDim(ks[1]), wc, c->Dim(dy, 3)}));
    c->set_output(1, c->Vector(c->Dim(dy, 3)));
    return Status();
}

Status dense_shape(InferenceContext* c) {
    std::string act;
    int code;
    TF_RETURN_IF_ERROR(c->GetAttr("activation", &act));
    TF_RETURN_IF_ERROR(activation_code(act, true, &code));
    ShapeHandle x, w, b;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &b));
    DimensionHandle k;
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(w, 0), &k));
    c->set_output(0, c->Matrix(c->Dim(x, 0), c->Dim(w, 1)));
    return Status();
}

Status dense_grad_shape(InferenceContext* c) {
    std::string act;
    int code;
    TF_RETURN_IF_ERROR(c->GetAttr("activation", &act));
    TF_RETURN_IF_ERROR(activation_code(act, true, &code));
    ShapeHandle x, w, dy, y;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &y));
    DimensionHandle k;
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(w, 0), &k));
    c->set_output(0, x);
    c->set_output(1, w);
    c->set_output(2, c->Vector(c->Dim(w, 1)));
    return Status();
}

// ----------------------------------------------------------------------------- device launchers
// The op classes below validate, allocate and then call Dev::<kernel>(...): CpuLaunch runs the C++
// kernels under the process lock (run_kernel); GpuLaunch (GOOGLE_CUDA builds only, at the end
// of this namespace) enqueues the CUDA C++ kernels on TensorFlow's stream for the op.
struct CpuLaunch {
    static void conv2d_forward(OpKernelContext* ctx, const ConvGeometry& g, const float* x, const float* w,
                               const float* b, int act, float* y) {
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_forward(g, x, w, b, act, y); });
    }
    static void conv2d_backward_data(OpKernelContext* ctx, const ConvGeometry& g, const float* dy, const float* w,
                                     const float* y, int act, float* dx) {
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_backward_data(g, dy, w, dx, y, act); }, Pass::CONV_BACKWARD);
    }
    // alone: no backward-data pass of this layer runs beside it (the graph's input layer), so the
    // side-by-side threshold does not apply (Conv2DBackpropFilterOp).
    static void conv2d_backward_filter(OpKernelContext* ctx, const ConvGeometry& g, const float* x, const float* dy,
                                       const float* y, int act, float* dw, float* db, bool alone) {
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_backward_filter(g, x, dy, dw, db, y, act); },
                   alone ? Pass::OTHER : Pass::CONV_BACKWARD);
    }
    static void dense_forward(OpKernelContext* ctx, int64_t M, int64_t K, int64_t N, const float* x, const float* w,
                              const float* b, int act, float* y) {
        run_kernel(ctx, 2.0 * double(M) * double(K) * double(N), [&] {
            if (act == ACT_SOFTMAX) {
                cpu::dense_forward(M, K, N, x, w, b, ACT_LINEAR, y);
                cpu::softmax(M, N, y, y);  // row-wise, reads each row before writing it
            } else {
                cpu::dense_forward(M, K, N, x, w, b, act, y);
            }
        });
    }
    static void dense_backward(OpKernelContext* ctx, int64_t M, int64_t K, int64_t N, const float* x, const float* w,
                               const float* dy, const float* y, int act, float* dx, float* dw, float* db) {
        Tensor dz;  // softmax only: dL/dz, formed row-wise first
        if (act == ACT_SOFTMAX)
            OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT, TensorShape({M, N}), &dz));
        float* dzp = act == ACT_SOFTMAX ? fptr(&dz) : nullptr;
        run_kernel(ctx, 4.0 * double(M) * double(K) * double(N), [&] {
            if (act == ACT_SOFTMAX) {
                if (M * N > 0) cpu::activation_backward(M, N, dy, y, ACT_SOFTMAX, dzp);
                cpu::dense_backward(M, K, N, x, w, dzp, nullptr, ACT_LINEAR, dx, dw, db);
            } else {
                cpu::dense_backward(M, K, N, x, w, dy, y, act, dx, dw, db);
            }
        });
    }
};

// ----------------------------------------------------------------------------- conv kernels
class ConvOpBase : public OpKernel {
   public:
    explicit ConvOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
        OP_REQUIRES_OK(ctx, read_conv_attrs(ctx, true, &attrs_));
    }

   protected:
    // The record for x's NHWC shape (n, h, w, c) and weights of shape (kh, kw, wc, filters).
    bool geometry(OpKernelContext* ctx, const char* op, const int64_t xs[4], int64_t kh, int64_t kw, int64_t wc,
                  int64_t filters, ConvGeometry* g) {
        Status s = make_geometry(op, xs[0], xs[1], xs[2], xs[3], kh, kw, wc, filters, attrs_, g);
        if (!s.ok()) ctx->SetStatus(s);
        return s.ok();
    }
    // A forward op's inputs x, w, b: the record and the bias pointer (null: no bias).
    bool forward_inputs(OpKernelContext* ctx, const char* op, ConvGeometry* g, const float** bp) {
        const Tensor &x = ctx->input(0), &w = ctx->input(1), &b = ctx->input(2);
        Status s = check_rank(op, "x", x, 4);
        if (s.ok()) s = check_rank(op, "w", w, 4);
        if (!s.ok()) {
            ctx->SetStatus(s);
            return false;
        }
        const int64_t xs[4] = {x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3)};
        if (!geometry(ctx, op, xs, w.dim_size(0), w.dim_size(1), w.dim_size(2), w.dim_size(3), g)) return false;
        s = bias_ptr(op, b, g->filters, bp);
        if (!s.ok()) ctx->SetStatus(s);
        return s.ok();
    }
    // A backward-data op's record from w and the x_shape input (int32 [4], or int64).
    bool backprop_input_geometry(OpKernelContext* ctx, const char* op, const Tensor& w, const Tensor& xs_t,
                                 ConvGeometry* g) {
        Status s = check_rank(op, "w", w, 4);
        if (s.ok() && !(xs_t.dims() == 1 && xs_t.dim_size(0) == 4))
            s = errors::InvalidArgument("dlconv ", op, ": x_shape must be a vector of 4 ints, got shape ",
                                        xs_t.shape().DebugString());
        int64_t xs[4] = {};
        for (int i = 0; s.ok() && i < 4; ++i) {
            xs[i] = xs_t.dtype() == ::tensorflow::DT_INT32 ? int64_t(xs_t.vec<int32_t>()(i)) : xs_t.vec<int64_t>()(i);
            if (xs[i] < 0) s = errors::InvalidArgument("dlconv ", op, ": x_shape[", i, "] = ", xs[i], " is negative");
        }
        if (!s.ok()) {
            ctx->SetStatus(s);
            return false;
        }
        return geometry(ctx, op, xs, w.dim_size(0), w.dim_size(1), w.dim_size(2), w.dim_size(3), g);
    }
    // A backward-filter op's record from x, the kernel size and dy's channels (dy: the conv's dz
    // or a pool's gradient, rank 4 either way).
    bool backprop_filter_geometry(OpKernelContext* ctx, const char* op, const Tensor& x, const Tensor& dy,
                                  const char* dy_name, int64_t kh, int64_t kw, ConvGeometry* g) {
        Status s = check_rank(op, "x", x, 4);
        if (s.ok()) s = check_rank(op, dy_name, dy, 4);
        if (s.ok() && x.dim_size(3) % attrs_.groups != 0)
            s = errors::InvalidArgument("dlconv ", op, ": groups = ", attrs_.groups, " must divide the ",
                                        x.dim_size(3), " input channels");
        if (!s.ok()) {
            ctx->SetStatus(s);
            return false;
        }
        const int64_t xs[4] = {x.dim_size(0), x.dim_size(1), x.dim_size(2), x.dim_size(3)};
        return geometry(ctx, op, xs, kh, kw, xs[3] / attrs_.groups, dy.dim_size(3), g);
    }
    ConvAttrs attrs_;
};

// kernel_size and alone of the backward-filter ops.
struct FilterAttrs {
    int64_t kh = 1, kw = 1;
    bool alone = false;
};
Status read_filter_attrs(OpKernelConstruction* ctx, FilterAttrs* a) {
    std::vector<int64_t> ks;
    TF_RETURN_IF_ERROR(ctx->GetAttr("kernel_size", &ks));
    TF_RETURN_IF_ERROR(check_list("kernel_size", ks, 2, 1));
    a->kh = ks[0], a->kw = ks[1];
    return ctx->GetAttr("alone", &a->alone);
}

template <class Dev>
class Conv2DOp : public ConvOpBase {
   public:
    using ConvOpBase::ConvOpBase;
    void Compute(OpKernelContext* ctx) override {
        ConvGeometry g;
        const float* bp;
        if (!forward_inputs(ctx, "DlconvConv2D", &g, &bp)) return;
        const Tensor &x = ctx->input(0), &w = ctx->input(1);
        Tensor* y = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape(g), &y));
        if (g.batch == 0) return;
        const float *xp = fptr(x), *wp = fptr(w);
        float* yp = fptr(y);
        const int act = attrs_.act;
        Dev::conv2d_forward(ctx, g, xp, wp, bp, act, yp);
    }
};

template <class Dev>
class Conv2DBackpropInputOp : public ConvOpBase {
   public:
    using ConvOpBase::ConvOpBase;
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvConv2DBackpropInput";
        const Tensor &dy = ctx->input(0), &w = ctx->input(1), &y = ctx->input(2), &xs_t = ctx->input(3);
        ConvGeometry g;
        if (!backprop_input_geometry(ctx, K, w, xs_t, &g)) return;
        OP_REQUIRES_OK(ctx, check_shape(K, "dy", dy, y_shape(g)));
        if (attrs_.act != ACT_LINEAR) OP_REQUIRES_OK(ctx, check_shape(K, "y", y, y_shape(g)));
        Tensor* dx = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape(g), &dx));
        if (g.batch == 0) return;
        const float *dyp = fptr(dy), *wp = fptr(w), *yp = attrs_.act != ACT_LINEAR ? fptr(y) : nullptr;
        float* dxp = fptr(dx);
        const int act = attrs_.act;
        Dev::conv2d_backward_data(ctx, g, dyp, wp, yp, act, dxp);
    }
};

template <class Dev>
class Conv2DBackpropFilterOp : public ConvOpBase {
   public:
    explicit Conv2DBackpropFilterOp(OpKernelConstruction* ctx) : ConvOpBase(ctx) {
        OP_REQUIRES_OK(ctx, read_filter_attrs(ctx, &fa_));
    }
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvConv2DBackpropFilter";
        const Tensor &x = ctx->input(0), &dy = ctx->input(1), &y = ctx->input(2);
        ConvGeometry g;
        if (!backprop_filter_geometry(ctx, K, x, dy, "dy", fa_.kh, fa_.kw, &g)) return;
        OP_REQUIRES_OK(ctx, check_shape(K, "dy", dy, y_shape(g)));
        if (attrs_.act != ACT_LINEAR) OP_REQUIRES_OK(ctx, check_shape(K, "y", y, y_shape(g)));
        Tensor *dw = nullptr, *db = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, w_shape(g), &dw));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.filters}), &db));
        const float *xp = fptr(x), *dyp = fptr(dy), *yp = attrs_.act != ACT_LINEAR ? fptr(y) : nullptr;
        float *dwp = fptr(dw), *dbp = fptr(db);
        const int act = attrs_.act;
        Dev::conv2d_backward_filter(ctx, g, xp, dyp, yp, act, dwp, dbp, fa_.alone);
    }

   private:
    FilterAttrs fa_;
};

// ----------------------------------------------------------------------------- dense kernels
class DenseOpBase : public OpKernel {
   public:
    explicit DenseOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
        std::string act;
        OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &act));
        OP_REQUIRES_OK(ctx, activation_code(act, true, &act_));
    }

   protected:
    // M, K, N from x (M, K) and w (K, N), checked.
    bool dims(OpKernelContext* ctx, const char* op, const Tensor& x, const Tensor& w, int64_t* M, int64_t* Kf,
              int64_t* N) {
        Status s = check_rank(op, "x", x, 2);
        if (s.ok()) s = check_rank(op, "w", w, 2);
        if (s.ok() && x.dim_size(1) != w.dim_size(0))
            s = errors::InvalidArgument("dlconv ", op, ": feature mismatch: x has ", x.dim_size(1),
                                        " features but w expects ", w.dim_size(0));
        if (!s.ok()) {
            ctx->SetStatus(s);
            return false;
        }
        *M = x.dim_size(0), *Kf = x.dim_size(1), *N = w.dim_size(1);
        return true;
    }
    int act_ = ACT_LINEAR;
};

template <class Dev>
class DenseOp : public DenseOpBase {
   public:
    using DenseOpBase::DenseOpBase;
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvDense";
        const Tensor &x = ctx->input(0), &w = ctx->input(1), &b = ctx->input(2);
        int64_t M, Kf, N;
        if (!dims(ctx, K, x, w, &M, &Kf, &N)) return;
        const float* bp;
        OP_REQUIRES_OK(ctx, bias_ptr(K, b, N, &bp));
        Tensor* y = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, N}), &y));
        if (M == 0 || N == 0) return;
        const float *xp = fptr(x), *wp = fptr(w);
        float* yp = fptr(y);
        const int act = act_;
        Dev::dense_forward(ctx, M, Kf, N, xp, wp, bp, act, yp);
    }
};

template <class Dev>
class DenseGradOp : public DenseOpBase {
   public:
    using DenseOpBase::DenseOpBase;
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvDenseGrad";
        const Tensor &x = ctx->input(0), &w = ctx->input(1), &dy = ctx->input(2), &y = ctx->input(3);
        int64_t M, Kf, N;
        if (!dims(ctx, K, x, w, &M, &Kf, &N)) return;
        OP_REQUIRES_OK(ctx, check_shape(K, "dy", dy, TensorShape({M, N})));
        if (act_ != ACT_LINEAR) OP_REQUIRES_OK(ctx, check_shape(K, "y", y, TensorShape({M, N})));
        Tensor *dx = nullptr, *dw = nullptr, *db = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, w.shape(), &dw));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({N}), &db));
        const float *xp = fptr(x), *wp = fptr(w), *dyp = fptr(dy);
        const float* yp = act_ != ACT_LINEAR ? fptr(y) : nullptr;
        float *dxp = fptr(dx), *dwp = fptr(dw), *dbp = fptr(db);
        Dev::dense_backward(ctx, M, Kf, N, xp, wp, dyp, yp, act_, dxp, dwp, dbp);
    }
};

// ----------------------------------------------------------------------------- max pool
// DlconvMaxPool2D / DlconvMaxPool2DGrad: the CPU kernels of cpu_pool.cpp, which one OpenMP
// thread per output row (forward) or input row (gradient: a gather from the stored arg) runs.
// The forward writes arg beside y, so the gradient gathers instead of recomputing each window
// (docs/layers.md: 3.8 vs 10.7 ms for MNIST's pool); arg is the uint8 window tap (the "local"
// kernels: a quarter of an int32 index's traffic), so pools have at most MAX_LOCAL_TAPS taps.
// A pool below SERIAL_POOL_ELEMENTS runs with a one-thread team and unlocked, like any small
// call (run_kernel).
struct PoolAttrs {
    int64_t k_h = 1, k_w = 1, stride_h = 1, stride_w = 1;
    int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
};

template <class Ctx>
Status read_pool_attrs(Ctx* c, PoolAttrs* a) {
    std::vector<int64_t> ksize, strides, pads;
    TF_RETURN_IF_ERROR(c->GetAttr("ksize", &ksize));
    TF_RETURN_IF_ERROR(c->GetAttr("strides", &strides));
    TF_RETURN_IF_ERROR(c->GetAttr("pads", &pads));
    TF_RETURN_IF_ERROR(check_list("ksize", ksize, 2, 1));
    TF_RETURN_IF_ERROR(check_list("strides", strides, 2, 1));
    TF_RETURN_IF_ERROR(check_list("pads (top, bottom, left, right)", pads, 4, 0));
    if (ksize[0] * ksize[1] > cpu::MAX_LOCAL_TAPS)
        return errors::InvalidArgument("dlconv: max pool attr ksize ", list_str(ksize), " has more than ",
                                       cpu::MAX_LOCAL_TAPS, " taps (the uint8 arg)");
    if (pads[0] >= ksize[0] || pads[1] >= ksize[0] || pads[2] >= ksize[1] || pads[3] >= ksize[1])
        return errors::InvalidArgument("dlconv: max pool attr pads ", list_str(pads),
                                       " must each be smaller than the pool size ", list_str(ksize),
                                       " (a window of padding only has no member)");
    *a = PoolAttrs{ksize[0], ksize[1], strides[0], strides[1], pads[0], pads[1], pads[2], pads[3]};
    return Status();
}

// The pool's record (cpu_pool.h: groups = filters = C, dilation 1) for x's NHWC dims; checked.
Status pool_geometry(const char* op, const int64_t xs[4], const PoolAttrs& a, ConvGeometry* g) {
    for (int i = 0; i < 4; ++i)
        if (xs[i] > MAX_FIELD) return errors::InvalidArgument("dlconv ", op, ": dimension ", xs[i], " is out of range");
    if (xs[1] < 1 || xs[2] < 1 || xs[3] < 1)
        return errors::InvalidArgument("dlconv ", op, ": x's height, width and channels must be >= 1, got (", xs[0],
                                       ", ", xs[1], ", ", xs[2], ", ", xs[3], ")");
    const int64_t oh = out_size(xs[1], a.k_h, a.stride_h, 1, a.pad_top, a.pad_bottom);
    if (oh < 0) return impossible_axis("height", xs[1], a.k_h, 1, a.pad_top, a.pad_bottom);
    const int64_t ow = out_size(xs[2], a.k_w, a.stride_w, 1, a.pad_left, a.pad_right);
    if (ow < 0) return impossible_axis("width", xs[2], a.k_w, 1, a.pad_left, a.pad_right);
    *g = ConvGeometry{xs[0], xs[1], xs[2], xs[3], xs[3], a.k_h, a.k_w, a.stride_h, a.stride_w, 1, 1,
                      a.pad_top, a.pad_bottom, a.pad_left, a.pad_right, oh, ow, xs[3]};
    try {
        cpu::check_pool_geometry(*g, op);
    } catch (const std::invalid_argument& e) {
        return errors::InvalidArgument(e.what());
    }
    return Status();
}

Status max_pool_shape(InferenceContext* c) {
    PoolAttrs a;
    TF_RETURN_IF_ERROR(read_pool_attrs(c, &a));
    ShapeHandle x;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
    DimensionHandle oh, ow;
    TF_RETURN_IF_ERROR(conv_out_dim(c, c->Dim(x, 1), a.k_h, a.stride_h, 1, a.pad_top, a.pad_bottom, "height", &oh));
    TF_RETURN_IF_ERROR(conv_out_dim(c, c->Dim(x, 2), a.k_w, a.stride_w, 1, a.pad_left, a.pad_right, "width", &ow));
    ShapeHandle y = c->MakeShape({c->Dim(x, 0), oh, ow, c->Dim(x, 3)});
    c->set_output(0, y);
    c->set_output(1, y);
    return Status();
}

Status max_pool_grad_shape(InferenceContext* c) {
    PoolAttrs a;
    TF_RETURN_IF_ERROR(read_pool_attrs(c, &a));
    ShapeHandle x, dy, arg;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &arg));
    TF_RETURN_IF_ERROR(c->Merge(dy, arg, &dy));
    c->set_output(0, x);
    return Status();
}

class MaxPoolOpBase : public OpKernel {
   public:
    explicit MaxPoolOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) { OP_REQUIRES_OK(ctx, read_pool_attrs(ctx, &attrs_)); }

   protected:
    bool geometry(OpKernelContext* ctx, const char* op, const Tensor& x, ConvGeometry* g) {
        Status s = check_rank(op, "x", x, 4);
        const int64_t xs[4] = {x.dims() == 4 ? x.dim_size(0) : 0, x.dims() == 4 ? x.dim_size(1) : 0,
                               x.dims() == 4 ? x.dim_size(2) : 0, x.dims() == 4 ? x.dim_size(3) : 0};
        if (s.ok()) s = pool_geometry(op, xs, attrs_, g);
        if (!s.ok()) ctx->SetStatus(s);
        return s.ok();
    }
    PoolAttrs attrs_;
};

class MaxPool2DOp : public MaxPoolOpBase {
   public:
    using MaxPoolOpBase::MaxPoolOpBase;
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvMaxPool2D";
        const Tensor& x = ctx->input(0);
        ConvGeometry g;
        if (!geometry(ctx, K, x, &g)) return;
        Tensor *y = nullptr, *arg = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape(g), &y));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, y_shape(g), &arg));
        if (g.batch == 0) return;
        const float* xp = fptr(x);
        float* yp = fptr(y);
        uint8_t* ap = arg->flat<uint8_t>().data();
        run_kernel(ctx, double(g.x_size()), [&] { cpu::max_pool2d_forward_local(g, xp, yp, ap); }, Pass::POOL);
    }
};

class MaxPool2DGradOp : public MaxPoolOpBase {
   public:
    explicit MaxPool2DGradOp(OpKernelConstruction* ctx) : MaxPoolOpBase(ctx) {
        OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
    }
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvMaxPool2DGrad";
        const Tensor &x = ctx->input(0), &dy = ctx->input(1), &arg = ctx->input(2);
        ConvGeometry g;
        if (!geometry(ctx, K, x, &g)) return;
        OP_REQUIRES_OK(ctx, check_shape(K, "dy", dy, y_shape(g)));
        OP_REQUIRES_OK(ctx, check_shape(K, "arg", arg, y_shape(g)));
        Tensor* dx = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape(g), &dx));
        if (g.batch == 0) return;
        const float* dyp = fptr(dy);
        const uint8_t* ap = arg.flat<uint8_t>().data();
        float* dxp = fptr(dx);
        // A corrupt arg (a hand-fed one) cannot write out of bounds: the gather only compares
        // it with each dx position's tap, and reads dy/arg at in-range outputs.
        const bool relu = relu_;
        run_kernel(ctx, double(g.x_size()), [&] { cpu::max_pool2d_backward_local(g, dyp, ap, dxp, relu); },
                   Pass::POOL);
    }

   private:
    bool relu_ = false;
};

// ----------------------------------------------------------------------------- conv + pool
// DlconvConv2DMaxPool2x2: relu(conv2d(x, w) + b), then the 2x2 stride-2 valid max pool, in one
// kernel call that never writes the conv's output (cpu::conv2d_forward_relu_maxpool2x2: for
// MNIST conv2 at batch 128, 19 MB the conv would write and the pool read back).  Outputs y and
// arg exactly as DlconvConv2D (activation relu) then DlconvMaxPool2D (2x2, strides 2, no pads).
// The bridge emits it for a native max pool whose input is a native relu conv's output (the
// MNIST CNN's conv2 -> MaxPooling2D); its gradient is the conv's two backward ops reading the
// pool's gradient and arg in place (DlconvConv2DBackprop{Input,Filter}FromPool).  CPU only.
class Conv2DMaxPoolOp : public ConvOpBase {
   public:
    explicit Conv2DMaxPoolOp(OpKernelConstruction* ctx) : ConvOpBase(ctx) {
        OP_REQUIRES(ctx, attrs_.act == ACT_RELU,
                    errors::InvalidArgument("dlconv DlconvConv2DMaxPool2x2: activation must be 'relu' (the pool's "
                                            "arg marks members that are not > 0 for the relu's derivative)"));
    }
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvConv2DMaxPool2x2";
        ConvGeometry g;
        const float* bp;
        if (!forward_inputs(ctx, K, &g, &bp)) return;
        const Tensor &x = ctx->input(0), &w = ctx->input(1);
        OP_REQUIRES(ctx, g.out_h >= 2 && g.out_w >= 2,
                    errors::InvalidArgument("dlconv ", K, ": the conv output ", g.out_h, "x", g.out_w,
                                            " is smaller than the 2x2 pool"));
        const TensorShape ps({g.batch, g.out_h / 2, g.out_w / 2, g.filters});
        Tensor *y = nullptr, *arg = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ps, &y));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ps, &arg));
        if (g.batch == 0) return;
        const float *xp = fptr(x), *wp = fptr(w);
        float* yp = fptr(y);
        uint8_t* ap = arg->flat<uint8_t>().data();
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_forward_relu_maxpool2x2(g, xp, wp, bp, yp, ap); });
    }
};

Status conv_max_pool_shape(InferenceContext* c) {
    TF_RETURN_IF_ERROR(conv_forward_shape(c));
    ShapeHandle y = c->output(0);
    auto half = [&](DimensionHandle d) { return c->ValueKnown(d) ? c->MakeDim(c->Value(d) / 2) : c->UnknownDim(); };
    ShapeHandle p = c->MakeShape({c->Dim(y, 0), half(c->Dim(y, 1)), half(c->Dim(y, 2)), c->Dim(y, 3)});
    c->set_output(0, p);
    c->set_output(1, p);
    return Status();
}

// ----------------------------------------------------------------------------- conv backward from a pool
// DlconvConv2DBackpropInputFromPool / DlconvConv2DBackpropFilterFromPool: the two backward passes
// of a relu DlconvConv2D whose output feeds a 2x2 stride-2 valid DlconvMaxPool2D, reading that
// pool's gradient pool_dy and arg instead of the conv's dz (cpu::conv2d_backward_*_pool2x2).  The
// same values, bit for bit, as DlconvMaxPool2DGrad (relu = true) followed by the linear backward
// ops, without the gather's output (19 MB for MNIST conv2 at batch 128, written once and read
// twice).  activation must be 'relu' (its derivative is in arg).  CPU only, like the pool.
Status pool_dy_shapes(InferenceContext* c, int dy_index, ShapeHandle* dy) {
    ShapeHandle arg;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(dy_index), 4, dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(dy_index + 1), 4, &arg));
    return c->Merge(*dy, arg, dy);
}
Status conv_backprop_input_from_pool_shape(InferenceContext* c) {
    ConvAttrs a;
    TF_RETURN_IF_ERROR(read_conv_attrs(c, true, &a));
    ShapeHandle dy, w, xs;
    TF_RETURN_IF_ERROR(pool_dy_shapes(c, 0, &dy));
    TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 4, &w));
    TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(3, &xs));
    TF_RETURN_IF_ERROR(c->WithRank(xs, 4, &xs));
    c->set_output(0, xs);
    return Status();
}
Status conv_backprop_filter_from_pool_shape(InferenceContext* c) {
    ConvAttrs a;
    TF_RETURN_IF_ERROR(read_conv_attrs(c, true, &a));
    std::vector<int64_t> ks;
    TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &ks));
    TF_RETURN_IF_ERROR(check_list("kernel_size", ks, 2, 1));
    ShapeHandle x, dy;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
    TF_RETURN_IF_ERROR(pool_dy_shapes(c, 1, &dy));
    DimensionHandle wc = c->Dim(x, 3);
    if (a.groups != 1) TF_RETURN_IF_ERROR(c->Divide(c->Dim(x, 3), a.groups, true, &wc));
    c->set_output(0, c->MakeShape({c->MakeDim(ks[0]), c->MakeDim(ks[1]), wc, c->Dim(dy, 3)}));
    c->set_output(1, c->Vector(c->Dim(dy, 3)));
    return Status();
}

class ConvFromPoolOpBase : public ConvOpBase {
   public:
    explicit ConvFromPoolOpBase(OpKernelConstruction* ctx) : ConvOpBase(ctx) {
        OP_REQUIRES(ctx, attrs_.act == ACT_RELU,
                    errors::InvalidArgument("dlconv ", ctx->def().op(), ": activation must be 'relu' (its derivative "
                                            "is read from the pool's arg)"));
    }

   protected:
    // pool_dy and arg against the conv's output of record g: [N, OH/2, OW/2, F] each.
    static Status check_pool_inputs(const char* op, const ConvGeometry& g, const Tensor& pool_dy, const Tensor& arg) {
        const TensorShape ps({g.batch, g.out_h / 2, g.out_w / 2, g.filters});
        TF_RETURN_IF_ERROR(check_shape(op, "pool_dy", pool_dy, ps));
        return check_shape(op, "arg", arg, ps);
    }
};

class Conv2DBackpropInputFromPoolOp : public ConvFromPoolOpBase {
   public:
    using ConvFromPoolOpBase::ConvFromPoolOpBase;
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvConv2DBackpropInputFromPool";
        const Tensor &pdy = ctx->input(0), &arg = ctx->input(1), &w = ctx->input(2), &xs_t = ctx->input(3);
        ConvGeometry g;
        if (!backprop_input_geometry(ctx, K, w, xs_t, &g)) return;
        OP_REQUIRES_OK(ctx, check_pool_inputs(K, g, pdy, arg));
        Tensor* dx = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape(g), &dx));
        if (g.batch == 0) return;
        const float *pp = fptr(pdy), *wp = fptr(w);
        const uint8_t* ap = arg.flat<uint8_t>().data();
        float* dxp = fptr(dx);
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_backward_data_pool2x2(g, pp, ap, wp, dxp); },
                   Pass::CONV_BACKWARD);
    }
};

class Conv2DBackpropFilterFromPoolOp : public ConvFromPoolOpBase {
   public:
    explicit Conv2DBackpropFilterFromPoolOp(OpKernelConstruction* ctx) : ConvFromPoolOpBase(ctx) {
        OP_REQUIRES_OK(ctx, read_filter_attrs(ctx, &fa_));
    }
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvConv2DBackpropFilterFromPool";
        const Tensor &x = ctx->input(0), &pdy = ctx->input(1), &arg = ctx->input(2);
        ConvGeometry g;
        if (!backprop_filter_geometry(ctx, K, x, pdy, "pool_dy", fa_.kh, fa_.kw, &g)) return;
        OP_REQUIRES_OK(ctx, check_pool_inputs(K, g, pdy, arg));
        Tensor *dw = nullptr, *db = nullptr;
        OP_REQUIRES_OK(ctx, ctx->allocate_output(0, w_shape(g), &dw));
        OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.filters}), &db));
        const float *xp = fptr(x), *pp = fptr(pdy);
        const uint8_t* ap = arg.flat<uint8_t>().data();
        float *dwp = fptr(dw), *dbp = fptr(db);
        run_kernel(ctx, conv_flops(g), [&] { cpu::conv2d_backward_filter_pool2x2(g, xp, pp, ap, dwp, dbp); },
                   fa_.alone ? Pass::OTHER : Pass::CONV_BACKWARD);
    }

   private:
    FilterAttrs fa_;
};

// ----------------------------------------------------------------------------- dropout
// DlconvDropout: cpu_dropout.cpp's kernel, OpenMP over 16384-element blocks (the mask does not
// depend on the thread count).  seed is Keras' SeedGenerator draw, an int64 (or int32) vector
// (seed, counter); each value is taken modulo 2^64 as the kernel's uint64 key.  The op is pure
// (the same x and seed give the same y), so TensorFlow may prune or fold it like any stateless
// op; a fresh mask per step comes from the seed generator's counter.  CPU only; below
// SERIAL_POOL_ELEMENTS elements on one thread and unlocked, as any small call (run_kernel).
// Tried and not kept: the MNIST CNN's pool -> Dropout fused into one op (the pool's uint8 arg
// tagged 255 where dropped; the pool's gradient gather dividing by keep, so no dropout pass over
// dy).  Bit-identical and tested, but on the Intel Xeon (2 cores, 128x24x24x64 pooled, in a
// tf.function) forward 1.63 vs 1.45 ms (the tag pass costs more than the dropout's own pass)
// and backward 1.45 vs 1.85 ms: 0.2 ms of a 34-39 ms step, below the step's run-to-run spread
// (0.74, 0.66, 0.66 fused against 0.67, 0.75, 0.67 unfused, ratio to stock): one op less.
class DropoutOp : public OpKernel {
   public:
    explicit DropoutOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
        float rate = 0.f;
        OP_REQUIRES_OK(ctx, ctx->GetAttr("rate", &rate));
        OP_REQUIRES(ctx, rate > 0.f && rate < 1.f,
                    errors::InvalidArgument("dlconv DlconvDropout: attr rate must be in (0, 1), got ", rate));
        rate_ = rate;
    }
    void Compute(OpKernelContext* ctx) override {
        const char* K = "DlconvDropout";
        const Tensor &x = ctx->input(0), &seed = ctx->input(1);
        OP_REQUIRES(ctx, seed.dims() == 1 && seed.dim_size(0) == 2,
                    errors::InvalidArgument(K, ": seed must have shape [2] (seed, counter), got ",
                                            seed.shape().DebugString()));
        uint64_t key[2];
        for (int i = 0; i < 2; ++i)
            key[i] = seed.dtype() == ::tensorflow::DT_INT64 ? uint64_t(seed.flat<int64_t>()(i))
                                                            : uint64_t(int64_t(seed.flat<int32_t>()(i)));
        Tensor* y = nullptr;
        OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
        const int64_t n = x.NumElements();
        if (n == 0) return;
        const float* xp = fptr(x);
        float* yp = fptr(y);  // may be x's buffer (forwarded): the kernel works in place
        const double rate = rate_;
        run_kernel(ctx, double(n), [&] { cpu::dropout_forward(n, xp, rate, key[0], key[1], yp); }, Pass::POOL);
    }

   private:
    double rate_ = 0.5;
};

#if GOOGLE_CUDA
// ----------------------------------------------------------------------------- GPU launchers
// The CUDA C++ kernels of csrc/cuda_*.cu on the stream TensorFlow gives this op
// (ctx->eigen_device<Eigen::GpuDevice>().stream(), the op's device-context stream), so they
// are ordered with TensorFlow's own kernels; nothing synchronises.  Tensors are device memory
// (TensorFlow allocated them), except BackpropInput's x_shape (HostMemory).  The CUDA backward
// conv kernels take dL/dz, so a non-linear activation's derivative is applied first into a
// temporary (activation_backward); dense's backward fuses it (softmax: a temporary too).  No
// process lock: work on one stream is ordered, and the kernels' scratch (cuda_workspace.cu) is
// per stream.  A CUDA error becomes an Internal status naming the kernel.
void gpu_run(OpKernelContext* ctx, const std::function<void(cudaStream_t)>& fn) {
    try {
        fn(ctx->eigen_device<Eigen::GpuDevice>().stream());
    } catch (const std::invalid_argument& e) {
        ctx->SetStatus(errors::InvalidArgument(e.what()));
    } catch (const std::exception& e) {
        ctx->SetStatus(errors::Internal("dlconv CUDA kernel failed: ", e.what()));
    }
}

// dL/dz of rows x cols from dy and y for activation `act` (a temporary on the device), or dy.
bool dz_for(OpKernelContext* ctx, int64_t rows, int64_t cols, const float* dy, const float* y, int act,
            Tensor* tmp, const float** dz) {
    *dz = dy;
    if (act == ACT_LINEAR) return true;
    Status s = ctx->allocate_temp(::tensorflow::DT_FLOAT, TensorShape({rows, cols}), tmp);
    if (!s.ok()) {
        ctx->SetStatus(s);
        return false;
    }
    float* out = fptr(tmp);
    gpu_run(ctx, [&](cudaStream_t st) { cuda::activation_backward(rows, cols, dy, y, act, out, st); });
    *dz = out;
    return ctx->status().ok();
}

struct GpuLaunch {
    static void conv2d_forward(OpKernelContext* ctx, const ConvGeometry& g, const float* x, const float* w,
                               const float* b, int act, float* y) {
        gpu_run(ctx, [&](cudaStream_t st) { cuda::conv2d_forward(g, x, w, b, act, y, cuda::V3_IMPLICIT_GEMM, st); });
    }
    static void conv2d_backward_data(OpKernelContext* ctx, const ConvGeometry& g, const float* dy, const float* w,
                                     const float* y, int act, float* dx) {
        Tensor tmp;
        const float* dz;
        if (!dz_for(ctx, g.batch * g.out_h * g.out_w, g.filters, dy, y, act, &tmp, &dz)) return;
        gpu_run(ctx, [&](cudaStream_t st) { cuda::conv2d_backward_data(g, dz, w, dx, st); });
    }
    static void conv2d_backward_filter(OpKernelContext* ctx, const ConvGeometry& g, const float* x, const float* dy,
                                       const float* y, int act, float* dw, float* db, bool /*alone*/) {
        Tensor tmp;
        const float* dz;
        if (!dz_for(ctx, g.batch * g.out_h * g.out_w, g.filters, dy, y, act, &tmp, &dz)) return;
        gpu_run(ctx, [&](cudaStream_t st) { cuda::conv2d_backward_filter(g, x, dz, dw, db, st); });
    }
    static void dense_forward(OpKernelContext* ctx, int64_t M, int64_t K, int64_t N, const float* x, const float* w,
                              const float* b, int act, float* y) {
        if (act != ACT_SOFTMAX) {
            gpu_run(ctx, [&](cudaStream_t st) { cuda::dense_forward(M, K, N, x, w, b, act, y, st); });
            return;
        }
        Tensor z;  // the softmax kernel reads z and writes y through __restrict__ pointers: not in place
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(::tensorflow::DT_FLOAT, TensorShape({M, N}), &z));
        float* zp = fptr(&z);
        gpu_run(ctx, [&](cudaStream_t st) {
            cuda::dense_forward(M, K, N, x, w, b, ACT_LINEAR, zp, st);
            cuda::softmax(M, N, zp, y, st);
        });
    }
    static void dense_backward(OpKernelContext* ctx, int64_t M, int64_t K, int64_t N, const float* x, const float* w,
                               const float* dy, const float* y, int act, float* dx, float* dw, float* db) {
        if (M == 0) {  // no rows: dw and db are zeros (dx is empty)
            gpu_run(ctx, [&](cudaStream_t st) {
                if (cudaMemsetAsync(dw, 0, size_t(K * N) * sizeof(float), st) != cudaSuccess ||
                    cudaMemsetAsync(db, 0, size_t(N) * sizeof(float), st) != cudaSuccess)
                    throw std::runtime_error("cudaMemsetAsync of dw/db failed");
            });
            return;
        }
        Tensor tmp;
        const float* dz = dy;
        if (act == ACT_SOFTMAX) {  // row-wise derivative first; the GEMMs fuse only element-wise ones
            if (!dz_for(ctx, M, N, dy, y, act, &tmp, &dz)) return;
            act = ACT_LINEAR, y = nullptr;
        }
        gpu_run(ctx, [&](cudaStream_t st) { cuda::dense_backward(M, K, N, x, w, dz, y, act, dx, dw, db, st); });
    }
};
#endif  // GOOGLE_CUDA

}  // namespace tfops
}  // namespace dlconv

// ----------------------------------------------------------------------------- registration
#define DLCONV_CONV_ATTRS                                                     \
    Attr("strides: list(int) = [1, 1]")                                       \
        .Attr("dilations: list(int) = [1, 1]")                                \
        .Attr("pads: list(int) = [0, 0, 0, 0]")                               \
        .Attr("groups: int = 1")                                              \
        .Attr("activation: {'linear', 'relu', 'sigmoid', 'tanh'} = 'linear'")

REGISTER_OP("DlconvConv2D")
    .Input("x: float")
    .Input("w: float")
    .Input("b: float")
    .Output("y: float")
    .DLCONV_CONV_ATTRS
    .SetShapeFn(dlconv::tfops::conv_forward_shape)
    .Doc("y = act(conv2d(x, w) + b): x NHWC, w HWIO, b (filters,) or (0,); pads = (top, bottom, left, right), "
         "resolved by dlconv.shapes.");

REGISTER_OP("DlconvConv2DBackpropInput")
    .Input("dy: float")
    .Input("w: float")
    .Input("y: float")
    .Input("x_shape: int32")
    .Output("dx: float")
    .DLCONV_CONV_ATTRS
    .SetShapeFn(dlconv::tfops::conv_backprop_input_shape)
    .Doc("dL/dx of DlconvConv2D from dy = dL/dy and y, its output (read only when activation != linear).");

REGISTER_OP("DlconvConv2DBackpropFilter")
    .Input("x: float")
    .Input("dy: float")
    .Input("y: float")
    .Output("dw: float")
    .Output("db: float")
    .DLCONV_CONV_ATTRS
    .Attr("kernel_size: list(int)")
    .Attr("alone: bool = false")
    .SetShapeFn(dlconv::tfops::conv_backprop_filter_shape)
    .Doc("(dL/dw, dL/db) of DlconvConv2D from x, dy = dL/dy and y (read only when activation != linear); alone: "
         "no backward-data pass of the layer runs beside it (a threading hint, never a value change).");

REGISTER_OP("DlconvDense")
    .Input("x: float")
    .Input("w: float")
    .Input("b: float")
    .Output("y: float")
    .Attr("activation: {'linear', 'relu', 'sigmoid', 'tanh', 'softmax'} = 'linear'")
    .SetShapeFn(dlconv::tfops::dense_shape)
    .Doc("y = act(x @ w + b): x (batch, in), w (in, out), b (out,) or (0,).");

REGISTER_OP("DlconvDenseGrad")
    .Input("x: float")
    .Input("w: float")
    .Input("dy: float")
    .Input("y: float")
    .Output("dx: float")
    .Output("dw: float")
    .Output("db: float")
    .Attr("activation: {'linear', 'relu', 'sigmoid', 'tanh', 'softmax'} = 'linear'")
    .SetShapeFn(dlconv::tfops::dense_grad_shape)
    .Doc("(dL/dx, dL/dw, dL/db) of DlconvDense from dy = dL/dy and y, its output.");

REGISTER_OP("DlconvMaxPool2D")
    .Input("x: float")
    .Output("y: float")
    .Output("arg: uint8")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("pads: list(int) = [0, 0, 0, 0]")
    .SetShapeFn(dlconv::tfops::max_pool_shape)
    .Doc("Max pool of x (NHWC; TensorFlow's NaN and tie rules) and arg, each output's window tap kh*k_w + kw "
         "(+128 when that member is not > 0; at most 128 taps); pads = (top, bottom, left, right), resolved by dlconv.shapes.pool_geometry, each < the "
         "pool size.");

REGISTER_OP("DlconvMaxPool2DGrad")
    .Input("x: float")
    .Input("dy: float")
    .Input("arg: uint8")
    .Output("dx: float")
    .Attr("ksize: list(int)")
    .Attr("strides: list(int)")
    .Attr("pads: list(int) = [0, 0, 0, 0]")
    .Attr("relu: bool = false")
    .SetShapeFn(dlconv::tfops::max_pool_grad_shape)
    .Doc("dL/dx of DlconvMaxPool2D from dy = dL/dy and its arg output (x: read for its shape only); relu: "
         "times relu'(x), 1 where x > 0 (x a relu's output: its dL/dz, the relu's derivative folded in).");

REGISTER_OP("DlconvConv2DMaxPool2x2")
    .Input("x: float")
    .Input("w: float")
    .Input("b: float")
    .Output("y: float")
    .Output("arg: uint8")
    .DLCONV_CONV_ATTRS
    .SetShapeFn(dlconv::tfops::conv_max_pool_shape)
    .Doc("DlconvConv2D (activation must be relu) then DlconvMaxPool2D (ksize [2, 2], strides [2, 2], no pads) in "
         "one kernel: the same y and arg, the conv's output never written.");

REGISTER_OP("DlconvConv2DBackpropInputFromPool")
    .Input("pool_dy: float")
    .Input("arg: uint8")
    .Input("w: float")
    .Input("x_shape: int32")
    .Output("dx: float")
    .DLCONV_CONV_ATTRS
    .SetShapeFn(dlconv::tfops::conv_backprop_input_from_pool_shape)
    .Doc("dL/dx of a relu DlconvConv2D whose output y feeds DlconvMaxPool2D (ksize [2, 2], strides [2, 2], no "
         "pads), from that pool's pool_dy = dL/d(pool output) and arg: DlconvConv2DBackpropInput (linear) of "
         "DlconvMaxPool2DGrad(y, pool_dy, arg, relu=true), bit for bit, without forming it.  activation: 'relu'.");

REGISTER_OP("DlconvConv2DBackpropFilterFromPool")
    .Input("x: float")
    .Input("pool_dy: float")
    .Input("arg: uint8")
    .Output("dw: float")
    .Output("db: float")
    .DLCONV_CONV_ATTRS
    .Attr("kernel_size: list(int)")
    .Attr("alone: bool = false")
    .SetShapeFn(dlconv::tfops::conv_backprop_filter_from_pool_shape)
    .Doc("(dL/dw, dL/db) of the same conv from x, pool_dy and arg, as DlconvConv2DBackpropInputFromPool.");

REGISTER_OP("DlconvDropout")
    .Input("x: float")
    .Input("seed: Tseed")
    .Output("y: float")
    .Attr("rate: float")
    .Attr("Tseed: {int32, int64} = DT_INT64")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
        ::tensorflow::shape_inference::ShapeHandle seed;
        TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &seed));
        ::tensorflow::shape_inference::DimensionHandle two;
        TF_RETURN_IF_ERROR(c->WithValue(c->Dim(seed, 0), 2, &two));
        c->set_output(0, c->input(0));
        return ::tensorflow::Status();
    })
    .Doc("Dropout of x (any shape): y = keep ? x / (1 - rate) : 0, keep a counter-based hash of (seed[0], "
         "seed[1], element index) (cpu_dropout.h; dropped NaN/Inf become 0); 0 < rate < 1.  Pure: its gradient "
         "is DlconvDropout(dy, seed).");

using ::tensorflow::DEVICE_CPU;
#define DLCONV_REGISTER(DEVICE, LAUNCH)                                                                         \
    REGISTER_KERNEL_BUILDER(Name("DlconvConv2D").Device(DEVICE), dlconv::tfops::Conv2DOp<LAUNCH>);             \
    REGISTER_KERNEL_BUILDER(Name("DlconvConv2DBackpropInput").Device(DEVICE).HostMemory("x_shape"),            \
                            dlconv::tfops::Conv2DBackpropInputOp<LAUNCH>);                                     \
    REGISTER_KERNEL_BUILDER(Name("DlconvConv2DBackpropFilter").Device(DEVICE),                                 \
                            dlconv::tfops::Conv2DBackpropFilterOp<LAUNCH>);                                    \
    REGISTER_KERNEL_BUILDER(Name("DlconvDense").Device(DEVICE), dlconv::tfops::DenseOp<LAUNCH>);               \
    REGISTER_KERNEL_BUILDER(Name("DlconvDenseGrad").Device(DEVICE), dlconv::tfops::DenseGradOp<LAUNCH>)

DLCONV_REGISTER(DEVICE_CPU, dlconv::tfops::CpuLaunch);
REGISTER_KERNEL_BUILDER(Name("DlconvMaxPool2D").Device(DEVICE_CPU), dlconv::tfops::MaxPool2DOp);
REGISTER_KERNEL_BUILDER(Name("DlconvMaxPool2DGrad").Device(DEVICE_CPU), dlconv::tfops::MaxPool2DGradOp);
REGISTER_KERNEL_BUILDER(Name("DlconvConv2DMaxPool2x2").Device(DEVICE_CPU), dlconv::tfops::Conv2DMaxPoolOp);
REGISTER_KERNEL_BUILDER(Name("DlconvConv2DBackpropInputFromPool").Device(DEVICE_CPU).HostMemory("x_shape"),
                        dlconv::tfops::Conv2DBackpropInputFromPoolOp);
REGISTER_KERNEL_BUILDER(Name("DlconvConv2DBackpropFilterFromPool").Device(DEVICE_CPU),
                        dlconv::tfops::Conv2DBackpropFilterFromPoolOp);
REGISTER_KERNEL_BUILDER(Name("DlconvDropout").Device(DEVICE_CPU).HostMemory("seed"), dlconv::tfops::DropoutOp);
#if GOOGLE_CUDA
using ::tensorflow::DEVICE_GPU;
DLCONV_REGISTER(DEVICE_GPU, dlconv::tfops::GpuLaunch);
#endif

// Build facts for dlconv info / the loader (a plain C symbol: no TF types cross it).
extern "C" __attribute__((visibility("default"))) const char* dlconv_tf_ops_build_info() {
#if defined(DLCONV_HAVE_AVX512) && defined(__AVX512F__)
    return "simd=avx512f+avx2+fma";
#elif defined(DLCONV_HAVE_AVX2) && defined(__AVX2__)
    return "simd=avx2+fma";
#else
    return "simd=scalar";
#endif
}

// The CPU threading knobs (dlconv.tf_ops.threading_knobs): a negative argument leaves that knob
// as it is; all three previous values come back through the pointers.  Calls already running keep
// the setting they started with.
extern "C" __attribute__((visibility("default"))) void dlconv_tf_ops_threading(
    double serial_flops, double serial_flops_backward, int unlocked_small, double* old_serial_flops,
    double* old_serial_flops_backward, int* old_unlocked_small) {
    namespace t = dlconv::tfops;
    *old_serial_flops = t::g_serial_flops.load();
    *old_serial_flops_backward = t::g_serial_flops_backward.load();
    *old_unlocked_small = t::g_unlocked_small.load() ? 1 : 0;
    if (serial_flops >= 0) t::g_serial_flops.store(serial_flops);
    if (serial_flops_backward >= 0) t::g_serial_flops_backward.store(serial_flops_backward);
    if (unlocked_small >= 0) t::g_unlocked_small.store(unlocked_small != 0);
}

// The max pool's one-thread threshold (input elements; dlconv.tf_ops.threading_knobs'
// serial_pool_elements): a negative argument leaves it; the previous value is returned.
extern "C" __attribute__((visibility("default"))) double dlconv_tf_ops_pool_threading(double serial_elements) {
    const double old = dlconv::tfops::g_serial_pool_elements.load();
    if (serial_elements >= 0) dlconv::tfops::g_serial_pool_elements.store(serial_elements);
    return old;
}

// Whether the DEVICE_GPU kernels were compiled in (GOOGLE_CUDA build: nvcc + a CUDA TensorFlow).
extern "C" __attribute__((visibility("default"))) int dlconv_tf_ops_has_gpu_kernels() {
#if GOOGLE_CUDA
    return 1;
#else
    return 0;
#endif
}
