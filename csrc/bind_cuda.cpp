// bind_cuda.cpp — pybind11 module dlconv._C_cuda: the CUDA C++ kernels (cuda_conv.cu, cuda_dense.cu).
//
// Arrays are CUDA device arrays passed as any object with __cuda_array_interface__ (Numba device
// arrays, CuPy, torch); C++ reads the interface itself — pointer, shape, typestr, strides, read-only
// flag — and checks every one against the geometry before a launch: no copies, no trust.
// `stream` is a CUDA stream handle as an int (numba: stream.handle.value; torch:
// torch.cuda.current_stream().cuda_stream; 0 = the default stream).  Launches are asynchronous.
// Producer streams (CAI v3): an array whose interface names a `stream` other than the launch
// stream was written (or is still being written) there; before the launch, an event recorded on
// that stream is waited on by the launch stream (cudaEventRecord + cudaStreamWaitEvent: the host
// does not block).  Handles 1 (legacy default stream) and 0 (the default stream, which is the legacy
// one in this build) count as the same stream; 2 is cudaStreamPerThread.
//   conv2d_forward(x, w, b|None, geometry, act, y, variant=3, stream=0)   variant: the code of a
//     CONV_VARIANTS entry (1 cuda_v1_direct, 2 cuda_v2_gemmtile, 3 cuda_v3_regblock)
//   CONV_VARIANTS   the CUDA variant table of conv_variants.h (a tuple of dicts)
//   conv2d_backward_data(dz, w, geometry, dx, stream=0)
//   conv2d_backward_filter(x, dz, geometry, dw, db|None, stream=0)
//   dense_forward(x, w, b|None, act, y, stream=0)
//   dense_backward(x, w, dy, y|None, act, dx|None, dw|None, db|None, stream=0)
//   softmax(z, out, stream=0);  activation_backward(dy, y, act, out, stream=0)   (act 4 = softmax)
//   xla_ffi_handlers() -> {target name: PyCapsule}   the XLA FFI handlers of ffi_cuda.cpp (XLA's
//     stream, for dlconv.bridges.jax; empty when built without the XLA FFI headers)
// Errors: TypeError (not a CUDA float32 array), ValueError (shape, layout, overlap, geometry),
// RuntimeError naming the kernel for anything CUDA reports (no GPU, bad pointer, launch failure).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bind_common.h"
#include "cuda_kernels.h"
#ifdef DLCONV_XLA_FFI
#include "ffi_cuda.h"
#endif
#include "geometry.h"

namespace py = pybind11;
using dlconv::ConvGeometry;
using dlconv::bind::shape_str;
using Shape = std::vector<int64_t>;

namespace dlconv {
std::vector<std::string> cuda_devices(std::string* why);
int cuda_runtime_version();
}  // namespace dlconv

namespace {

// CAI `stream` entry absent or None: nothing to wait for.
constexpr int64_t NO_STREAM = -1;
// CAI v3 stream values with a fixed meaning (0 is disallowed by the protocol: read as default).
constexpr uintptr_t CAI_LEGACY_STREAM = 1;

struct DevArg {
    float* ptr = nullptr;
    int64_t bytes = 0;
    const char* name = "";
    int64_t stream = NO_STREAM;  // the producer's stream from __cuda_array_interface__
};

// Read and check obj.__cuda_array_interface__: float32 ('<f4'), C-contiguous, exactly `shape`,
// writeable for outputs, non-null and 4-byte aligned.  (Where the memory lives: require_device.)
DevArg dev_checked(const char* kernel, const char* name, const py::handle& obj, const Shape& shape, bool output) {
    const std::string who = std::string("dlconv CUDA ") + kernel + ": " + name;
    if (obj.is_none() || !py::hasattr(obj, "__cuda_array_interface__"))
        throw py::type_error(who + " must be a CUDA array (an object with __cuda_array_interface__), got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    py::dict cai = obj.attr("__cuda_array_interface__");
    const std::string typestr = cai["typestr"].cast<std::string>();
    if (typestr != "<f4" && typestr != "=f4" && typestr != "|f4")
        throw py::type_error(who + " must be float32 ('<f4'), got typestr '" + typestr + "' (no silent conversion)");
    Shape got;
    for (auto s : cai["shape"].cast<py::tuple>()) got.push_back(s.cast<int64_t>());
    if (got != shape)
        throw std::invalid_argument(who + " has shape " + shape_str(got) + ", expected " + shape_str(shape));
    int64_t count = 1;
    for (auto s : got) count *= s;
    if (cai.contains("strides") && !cai["strides"].is_none()) {
        auto st = cai["strides"].cast<py::tuple>();
        int64_t expect = 4;
        for (ssize_t d = ssize_t(got.size()) - 1; d >= 0; --d) {
            if (got[d] != 1 && st[d].cast<int64_t>() != expect)
                throw std::invalid_argument(who + " must be C-contiguous (strides " +
                                            std::string(py::str(st)) + ")");
            expect *= got[d];
        }
    }
    if (cai.contains("mask") && !cai["mask"].is_none())
        throw std::invalid_argument(who + " must not be a masked array");
    auto data = cai["data"].cast<py::tuple>();
    const uintptr_t p = data[0].cast<uintptr_t>();
    const bool readonly = data[1].cast<bool>();
    if (output && readonly) throw std::invalid_argument(who + " is read-only");
    DevArg a;
    a.ptr = reinterpret_cast<float*>(p);
    a.bytes = count * 4;
    a.name = name;
    if (cai.contains("stream") && !cai["stream"].is_none()) {
        const int64_t st = cai["stream"].cast<int64_t>();
        if (st < 0) throw std::invalid_argument(who + " has a negative CAI stream " + std::to_string(st));
        a.stream = st;
    }
    if (count == 0) return a;
    if (p == 0) throw std::invalid_argument(who + " has a null data pointer");
    if (p % 4) throw std::invalid_argument(who + " is not aligned to 4 bytes");
    return a;
}

// After every metadata check passed: each non-empty buffer must be memory the CUDA runtime knows
// as device or managed memory (a host pointer would fault inside the kernel).  Without a driver or
// GPU this is where the call stops, with a RuntimeError naming the kernel.
// All buffers must be on one device, which becomes this host thread's current device for the launch.
void require_device(const char* kernel, std::initializer_list<const DevArg*> args) {
    int device = -1;
    for (const DevArg* a : args) {
        if (!a->ptr || !a->bytes) continue;
        cudaPointerAttributes attr;
        cudaError_t e = cudaPointerGetAttributes(&attr, a->ptr);
        if (e != cudaSuccess) {
            cudaGetLastError();
            throw std::runtime_error(std::string("dlconv CUDA kernel ") + kernel + ": cannot query " + a->name +
                                     " (" + cudaGetErrorName(e) + ": " + cudaGetErrorString(e) + ")");
        }
        if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
            throw std::invalid_argument(std::string("dlconv CUDA ") + kernel + ": " + a->name +
                                        " is not CUDA device memory");
        if (device >= 0 && attr.device != device)
            throw std::invalid_argument(std::string("dlconv CUDA ") + kernel + ": " + a->name + " is on device " +
                                        std::to_string(attr.device) + ", other buffers on device " +
                                        std::to_string(device));
        device = attr.device;
    }
    if (device >= 0) {
        cudaError_t e = cudaSetDevice(device);
        if (e != cudaSuccess) {
            cudaGetLastError();
            throw std::runtime_error(std::string("dlconv CUDA kernel ") + kernel + ": cudaSetDevice(" +
                                     std::to_string(device) + ") failed: " + cudaGetErrorString(e));
        }
    }
}

DevArg dev_optional(const char* kernel, const char* name, const py::object& obj, const Shape& shape, bool output) {
    if (obj.is_none()) return DevArg{};
    return dev_checked(kernel, name, obj, shape, output);
}

bool overlap(const DevArg& a, const DevArg& b) {
    if (!a.ptr || !b.ptr || !a.bytes || !b.bytes) return false;
    auto a0 = reinterpret_cast<uintptr_t>(a.ptr), b0 = reinterpret_cast<uintptr_t>(b.ptr);
    return a0 < b0 + uintptr_t(b.bytes) && b0 < a0 + uintptr_t(a.bytes);
}

void no_alias(const char* kernel, std::initializer_list<std::pair<const char*, const DevArg*>> outs,
              std::initializer_list<std::pair<const char*, const DevArg*>> ins) {
    for (auto o = outs.begin(); o != outs.end(); ++o) {
        for (auto& i : ins)
            if (overlap(*o->second, *i.second))
                throw std::invalid_argument(std::string("dlconv CUDA ") + kernel + ": output " + o->first +
                                            " overlaps input " + i.first);
        for (auto q = o + 1; q != outs.end(); ++q)
            if (overlap(*o->second, *q->second))
                throw std::invalid_argument(std::string("dlconv CUDA ") + kernel + ": outputs " + o->first +
                                            " and " + q->first + " overlap");
    }
}

Shape cai_shape(const char* kernel, const char* name, const py::handle& obj, size_t rank) {
    if (obj.is_none() || !py::hasattr(obj, "__cuda_array_interface__"))
        throw py::type_error(std::string("dlconv CUDA ") + kernel + ": " + name +
                             " must be a CUDA array (an object with __cuda_array_interface__)");
    Shape s;
    for (auto d : obj.attr("__cuda_array_interface__")["shape"].cast<py::tuple>()) s.push_back(d.cast<int64_t>());
    if (rank && s.size() != rank)
        throw std::invalid_argument(std::string("dlconv CUDA ") + kernel + ": " + name + " must have rank " +
                                    std::to_string(rank) + ", got shape " + shape_str(s));
    return s;
}

cudaStream_t to_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_cuda(cudaError_t e, const char* kernel, const std::string& what) {
    if (e != cudaSuccess) {
        cudaGetLastError();
        throw std::runtime_error(std::string("dlconv CUDA kernel ") + kernel + ": " + what + " failed: " +
                                 cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
    }
}

bool same_stream(uintptr_t a, uintptr_t b) {
    auto legacy = [](uintptr_t s) { return s == 0 || s == CAI_LEGACY_STREAM; };
    return a == b || (legacy(a) && legacy(b));
}

// Make `launch` wait for the work already queued on every producer stream of `args` (each distinct
// stream once).  Called without the GIL, after every check, just before the launch.
void order_after_producers(const char* kernel, uintptr_t launch, std::initializer_list<const DevArg*> args) {
    std::vector<uintptr_t> done;
    for (const DevArg* a : args) {
        if (a->stream == NO_STREAM || !a->ptr || !a->bytes) continue;
        const uintptr_t p = uintptr_t(a->stream);
        if (same_stream(p, launch)) continue;
        bool seen = false;
        for (uintptr_t d : done) seen = seen || same_stream(d, p);
        if (seen) continue;
        done.push_back(p);
        cudaEvent_t ev;
        check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), kernel,
                   "cudaEventCreateWithFlags (producer stream)");
        cudaError_t e = cudaEventRecord(ev, to_stream(p));
        if (e == cudaSuccess) e = cudaStreamWaitEvent(to_stream(launch), ev, 0);
        cudaEventDestroy(ev);  // released once the wait is satisfied
        check_cuda(e, kernel, std::string("waiting for the producer stream of ") + a->name);
    }
}

Shape xs(const ConvGeometry& g) { return {g.batch, g.in_h, g.in_w, g.in_c}; }
Shape ws(const ConvGeometry& g) { return {g.k_h, g.k_w, g.group_in_c(), g.filters}; }
Shape ys(const ConvGeometry& g) { return {g.batch, g.out_h, g.out_w, g.filters}; }

void conv2d_forward(py::object x, py::object w, py::object b, py::object geometry, int act, py::object y,
                    int variant, uintptr_t stream) {
    const char* K = "conv2d_forward";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    dlconv::bind::check_activation(K, act, 3);
    dlconv::variant_by_code(dlconv::CUDA_CONV_VARIANTS, variant, "CUDA conv2d_forward", false);
    DevArg ax = dev_checked(K, "x", x, xs(g), false), aw = dev_checked(K, "w", w, ws(g), false);
    DevArg ab = dev_optional(K, "b", b, {g.filters}, false), ay = dev_checked(K, "y", y, ys(g), true);
    no_alias(K, {{"y", &ay}}, {{"x", &ax}, {"w", &aw}, {"b", &ab}});
    require_device(K, {&ax, &aw, &ab, &ay});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&ax, &aw, &ab, &ay});
    dlconv::cuda::conv2d_forward(g, ax.ptr, aw.ptr, ab.ptr, act, ay.ptr, variant, to_stream(stream));
}

void conv2d_backward_data(py::object dz, py::object w, py::object geometry, py::object dx, uintptr_t stream) {
    const char* K = "conv2d_backward_data";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    DevArg adz = dev_checked(K, "dz", dz, ys(g), false), aw = dev_checked(K, "w", w, ws(g), false);
    DevArg adx = dev_checked(K, "dx", dx, xs(g), true);
    no_alias(K, {{"dx", &adx}}, {{"dz", &adz}, {"w", &aw}});
    require_device(K, {&adz, &aw, &adx});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&adz, &aw, &adx});
    dlconv::cuda::conv2d_backward_data(g, adz.ptr, aw.ptr, adx.ptr, to_stream(stream));
}

void conv2d_backward_filter(py::object x, py::object dz, py::object geometry, py::object dw, py::object db,
                            uintptr_t stream) {
    const char* K = "conv2d_backward_filter";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    DevArg ax = dev_checked(K, "x", x, xs(g), false), adz = dev_checked(K, "dz", dz, ys(g), false);
    DevArg adw = dev_checked(K, "dw", dw, ws(g), true), adb = dev_optional(K, "db", db, {g.filters}, true);
    no_alias(K, {{"dw", &adw}, {"db", &adb}}, {{"x", &ax}, {"dz", &adz}});
    require_device(K, {&ax, &adz, &adw, &adb});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&ax, &adz, &adw, &adb});
    dlconv::cuda::conv2d_backward_filter(g, ax.ptr, adz.ptr, adw.ptr, adb.ptr, to_stream(stream));
}

void dense_forward(py::object x, py::object w, py::object b, int act, py::object y, uintptr_t stream) {
    const char* K = "dense_forward";
    dlconv::bind::check_activation(K, act, 3);
    const Shape sx = cai_shape(K, "x", x, 2), sw = cai_shape(K, "w", w, 2);
    const int64_t M = sx[0], Kf = sx[1], N = sw[1];
    DevArg ax = dev_checked(K, "x", x, {M, Kf}, false), aw = dev_checked(K, "w", w, {Kf, N}, false);
    DevArg ab = dev_optional(K, "b", b, {N}, false), ay = dev_checked(K, "y", y, {M, N}, true);
    no_alias(K, {{"y", &ay}}, {{"x", &ax}, {"w", &aw}, {"b", &ab}});
    require_device(K, {&ax, &aw, &ab, &ay});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&ax, &aw, &ab, &ay});
    dlconv::cuda::dense_forward(M, Kf, N, ax.ptr, aw.ptr, ab.ptr, act, ay.ptr, to_stream(stream));
}

void dense_backward(py::object x, py::object w, py::object dy, py::object y, int act, py::object dx, py::object dw,
                    py::object db, uintptr_t stream) {
    const char* K = "dense_backward";
    dlconv::bind::check_activation(K, act, 3);
    const Shape sx = cai_shape(K, "x", x, 2), sw = cai_shape(K, "w", w, 2);
    const int64_t M = sx[0], Kf = sx[1], N = sw[1];
    DevArg ax = dev_checked(K, "x", x, {M, Kf}, false), aw = dev_checked(K, "w", w, {Kf, N}, false);
    DevArg ady = dev_checked(K, "dy", dy, {M, N}, false);
    if (act != 0 && y.is_none())
        throw std::invalid_argument("dlconv CUDA dense_backward: y (the forward output) is needed for activation " +
                                    std::to_string(act));
    DevArg ayy = dev_optional(K, "y", y, {M, N}, false);
    DevArg adx = dev_optional(K, "dx", dx, {M, Kf}, true), adw = dev_optional(K, "dw", dw, {Kf, N}, true);
    DevArg adb = dev_optional(K, "db", db, {N}, true);
    no_alias(K, {{"dx", &adx}, {"dw", &adw}, {"db", &adb}}, {{"x", &ax}, {"w", &aw}, {"dy", &ady}, {"y", &ayy}});
    require_device(K, {&ax, &aw, &ady, &ayy, &adx, &adw, &adb});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&ax, &aw, &ady, &ayy, &adx, &adw, &adb});
    dlconv::cuda::dense_backward(M, Kf, N, ax.ptr, aw.ptr, ady.ptr, ayy.ptr, act, adx.ptr, adw.ptr, adb.ptr,
                                 to_stream(stream));
}

void softmax(py::object z, py::object out, uintptr_t stream) {
    const char* K = "softmax";
    const Shape s = cai_shape(K, "z", z, 2);
    DevArg az = dev_checked(K, "z", z, s, false), ao = dev_checked(K, "out", out, s, true);
    no_alias(K, {{"out", &ao}}, {{"z", &az}});
    require_device(K, {&az, &ao});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&az, &ao});
    dlconv::cuda::softmax(s[0], s[1], az.ptr, ao.ptr, to_stream(stream));
}

void activation_backward(py::object dy, py::object y, int act, py::object out, uintptr_t stream) {
    const char* K = "activation_backward";
    dlconv::bind::check_activation(K, act, 4);
    const Shape s = cai_shape(K, "dy", dy, act == 4 ? 2 : 0);
    DevArg ady = dev_checked(K, "dy", dy, s, false), ay = dev_checked(K, "y", y, s, false);
    DevArg ao = dev_checked(K, "out", out, s, true);
    no_alias(K, {{"out", &ao}}, {{"dy", &ady}, {"y", &ay}});
    int64_t rows = 1, cols = 1;
    if (act == 4) { rows = s[0]; cols = s[1]; }
    else for (auto d : s) cols *= d;
    require_device(K, {&ady, &ay, &ao});
    py::gil_scoped_release nogil;
    order_after_producers(K, stream, {&ady, &ay, &ao});
    dlconv::cuda::activation_backward(rows, cols, ady.ptr, ay.ptr, act, ao.ptr, to_stream(stream));
}

py::dict build_info() {
    py::dict d;
    d["archs"] = DLCONV_CUDA_ARCHS;
    int v = dlconv::cuda_runtime_version();
    d["cudart"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10) + " (static)";
    py::list names;
    for (const auto& v : dlconv::CUDA_CONV_VARIANTS) names.append(v.name);
    d["conv_variants"] = py::tuple(names);
    return d;
}

// The table's codes are the launcher's enum (cuda_kernels.h): one name <-> code map.
static_assert(dlconv::CUDA_CONV_VARIANTS[0].code == dlconv::cuda::V1_DIRECT &&
                  dlconv::CUDA_CONV_VARIANTS[1].code == dlconv::cuda::V2_SMEM_TILED &&
                  dlconv::CUDA_CONV_VARIANTS[2].code == dlconv::cuda::V3_IMPLICIT_GEMM,
              "conv_variants.h CUDA_CONV_VARIANTS codes must match cuda_kernels.h ConvVariant");

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "dlconv CUDA C++ kernels; see csrc/bind_cuda.cpp for the API";
    m.def("build_info", &build_info, "How this extension was compiled (architectures, cudart, variants).");
    m.def("devices", [] {
        std::string why;
        return dlconv::cuda_devices(&why);
    }, "GPUs visible to the CUDA runtime (empty when there is no driver or GPU).");
    m.def("devices_why", [] {
        std::string why;
        dlconv::cuda_devices(&why);
        return why;
    }, "Why no GPU is visible (empty string when some are).");
    m.attr("CONV_VARIANTS") = dlconv::bind::variants_to_py(dlconv::CUDA_CONV_VARIANTS);
    m.def("xla_ffi_handlers", [] {
              py::dict d;
#ifdef DLCONV_XLA_FFI
              for (const auto& [name, fn] : dlconv::xffi::cuda_handlers()) d[name] = py::capsule(fn);
#endif
              return d;
          },
          "XLA FFI handlers of the CUDA kernels (target name -> PyCapsule for "
          "jax.ffi.register_ffi_target(..., platform='CUDA')); empty when built without the XLA FFI headers.");
    m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("geometry"),
          py::arg("activation"), py::arg("y"), py::arg("variant") = 3, py::arg("stream") = 0,
          "y = act(conv2d(x, w) + b) on `stream`; variant: a CONV_VARIANTS code (1 cuda_v1_direct, "
          "2 cuda_v2_gemmtile, 3 cuda_v3_regblock).");
    m.def("conv2d_backward_data", &conv2d_backward_data, py::arg("dz"), py::arg("w"), py::arg("geometry"),
          py::arg("dx"), py::arg("stream") = 0, "dx from dz (gradient of the linear output) and w.");
    m.def("conv2d_backward_filter", &conv2d_backward_filter, py::arg("x"), py::arg("dz"), py::arg("geometry"),
          py::arg("dw"), py::arg("db"), py::arg("stream") = 0, "dw (and db unless None) from x and dz.");
    m.def("dense_forward", &dense_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("activation"),
          py::arg("y"), py::arg("stream") = 0, "y = act(x @ w + b).");
    m.def("dense_backward", &dense_backward, py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("y"),
          py::arg("activation"), py::arg("dx"), py::arg("dw"), py::arg("db"), py::arg("stream") = 0,
          "dx, dw, db (each None = skip) of y = act(x @ w + b) given dL/dy and y.");
    m.def("split_k_splits", &dlconv::cuda::split_k_splits, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("sms"),
          "K splits the dense GEMM C[M, N] = A[M, K] B[K, N] gets on `sms` SMs (1 = no split).");
    m.def("_set_split_k", &dlconv::cuda::set_split_k_override, py::arg("splits"),
          "Test hook: force this many K splits in every dense GEMM (0 = the heuristic).");
    m.def("softmax", &softmax, py::arg("z"), py::arg("out"), py::arg("stream") = 0, "Row-wise softmax.");
    m.def("activation_backward", &activation_backward, py::arg("dy"), py::arg("y"), py::arg("activation"),
          py::arg("out"), py::arg("stream") = 0, "dL/dz from dL/dy and the activation output y (4 = softmax).");
}
