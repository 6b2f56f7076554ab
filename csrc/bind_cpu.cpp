// bind_cpu.cpp — pybind11 module dlconv._C: the C++ CPU kernels (cpu_conv.cpp, cpu_dense.cpp).
//
// Low-level entry points (NumPy float32 C-contiguous arrays; outputs optional and, when given,
// written in place and returned; when None, allocated here):
//   conv2d_forward(x, w, b|None, geometry, act, y=None, variant=0) -> y   (0 auto, else a code of CONV_VARIANTS)
//   forward_variant_applicable(geometry, variant) -> bool
//   CONV_VARIANTS, CUDA_CONV_VARIANTS   the variant tables of conv_variants.h (tuples of dicts)
//   conv2d_backward_data(dz, w, geometry, dx=None, y=None, activation=0) -> dx
//   transposed_geometry(geometry, phase_h=0, phase_w=0) -> (fields, tap_last_h, tap_last_w, tap_step_h, tap_step_w)
//   conv2d_backward_filter(x, dz, geometry, dw=None, db=None, y=None, activation=0) -> (dw, db)
//     (activation 1-3 with y, the activation's output: dz is then dL/dy and act'(y) is applied
//      inside the kernels)
//   dense_forward(x, w, b|None, act, y=None) -> y
//   dense_backward(x, w, dy, y|None, act, dx=None, dw=None, db=None) -> (dx, dw, db)
//   softmax(z, out=None) -> out
//   activation_backward(dy, y, act, out=None) -> out          (act 4 = softmax, rank 2)
//   xla_ffi_handlers() -> {target name: PyCapsule}   the XLA FFI handlers of ffi_cpu.cpp (empty
//     when built without the XLA FFI headers), for dlconv.bridges.jax
//   keep_heap() -> (kept, why)   host_heap.h's glibc thresholds, applied on the first call of the
//     process (by it or by the JAX handler table); for dlconv.bridges.torch
// `geometry` is dlconv.shapes.ConvGeometry.as_tuple(); `act` is the code of dlconv.activations.
// No conversion ever happens: a float64 array raises TypeError, a strided view ValueError.
// The GIL is released while a kernel runs; every call owns its scratch memory (re-entrant).
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "bind_common.h"
#include "cpu_dropout.h"
#include "cpu_gemm.h"
#include "cpu_host.h"
#include "cpu_kernels.h"
#ifdef DLCONV_XLA_FFI
#include "ffi_cpu.h"
#include "ffi_pool.h"
#endif
#include "geometry.h"
#include "host_heap.h"

namespace py = pybind11;
using dlconv::ConvGeometry;
using dlconv::bind::shape_str;
using Shape = std::vector<int64_t>;

namespace {

struct Arg {
    py::array arr;
    float* ptr = nullptr;
    int64_t bytes = 0;
};

// The array `obj` must be exactly float32, C-contiguous, aligned, of shape `shape`
// (and writeable for outputs).  Returns it with its data pointer; never converts.
Arg checked(const char* kernel, const char* name, const py::handle& obj, const Shape& shape, bool output) {
    const std::string who = std::string("dlconv C++ ") + kernel + ": " + name;
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(who + " must be a numpy.ndarray of float32, got " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    Arg a;
    a.arr = py::reinterpret_borrow<py::array>(obj);
    if (!a.arr.dtype().is(py::dtype::of<float>()))
        throw py::type_error(who + " must be float32, got " + std::string(py::str(a.arr.dtype())) +
                             " (no silent conversion)");
    if (!(a.arr.flags() & py::array::c_style))
        throw std::invalid_argument(who + " must be C-contiguous");
    if (!a.arr.attr("flags").attr("aligned").cast<bool>())
        throw std::invalid_argument(who + " must be aligned to its element size");
    Shape got(a.arr.shape(), a.arr.shape() + a.arr.ndim());
    if (got != shape)
        throw std::invalid_argument(who + " has shape " + shape_str(got) + ", expected " + shape_str(shape));
    if (output && !a.arr.writeable()) throw std::invalid_argument(who + " is read-only");
    a.ptr = static_cast<float*>(const_cast<void*>(a.arr.data()));
    a.bytes = int64_t(a.arr.size()) * 4;
    return a;
}

Arg optional_in(const char* kernel, const char* name, const py::object& obj, const Shape& shape) {
    if (obj.is_none()) return Arg{};
    return checked(kernel, name, obj, shape, false);
}

Arg output(const char* kernel, const char* name, const py::object& obj, const Shape& shape) {
    if (obj.is_none()) {
        Arg a;
        a.arr = py::array_t<float>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
        a.ptr = static_cast<float*>(a.arr.mutable_data());
        a.bytes = int64_t(a.arr.size()) * 4;
        return a;
    }
    return checked(kernel, name, obj, shape, true);
}

bool overlap(const Arg& a, const Arg& b) {
    if (!a.ptr || !b.ptr || !a.bytes || !b.bytes) return false;
    auto a0 = reinterpret_cast<uintptr_t>(a.ptr), b0 = reinterpret_cast<uintptr_t>(b.ptr);
    return a0 < b0 + uintptr_t(b.bytes) && b0 < a0 + uintptr_t(a.bytes);
}

// Outputs must not share memory with inputs or with each other.
void no_alias(const char* kernel, std::initializer_list<std::pair<const char*, const Arg*>> outs,
              std::initializer_list<std::pair<const char*, const Arg*>> ins) {
    for (auto o = outs.begin(); o != outs.end(); ++o) {
        for (auto& i : ins)
            if (overlap(*o->second, *i.second))
                throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": output " + o->first +
                                            " overlaps input " + i.first);
        for (auto p = o + 1; p != outs.end(); ++p)
            if (overlap(*o->second, *p->second))
                throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": outputs " + o->first +
                                            " and " + p->first + " overlap");
    }
}

using dlconv::cpu::conv_flops;
using dlconv::cpu::SerialIfSmall;
using dlconv::cpu::SERIAL_ELEMENTS;
using dlconv::cpu::SERIAL_FLOPS;

Shape x_shape(const ConvGeometry& g) { return {g.batch, g.in_h, g.in_w, g.in_c}; }
Shape w_shape(const ConvGeometry& g) { return {g.k_h, g.k_w, g.group_in_c(), g.filters}; }
Shape y_shape(const ConvGeometry& g) { return {g.batch, g.out_h, g.out_w, g.filters}; }

int64_t dim(const char* kernel, const char* name, const py::handle& obj, int rank, int axis) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(std::string("dlconv C++ ") + kernel + ": " + name + " must be a numpy.ndarray");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.ndim() != rank)
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": " + name + " must have rank " +
                                    std::to_string(rank) + ", got " + std::to_string(a.ndim()));
    return int64_t(a.shape(axis));
}

py::array conv2d_forward(py::object x, py::object w, py::object b, py::object geometry, int act, py::object y,
                         int variant) {
    const char* K = "conv2d_forward";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    dlconv::bind::check_activation(K, act, 3);
    const dlconv::ConvVariantInfo* v =
        dlconv::variant_by_code(dlconv::CPU_CONV_VARIANTS, variant, "C++ conv2d_forward", true);
    if (!dlconv::cpu::conv2d_forward_applicable(g, variant))
        throw std::invalid_argument(std::string("dlconv C++ conv2d_forward: variant ") + (v ? v->name : "auto") + " (" +
                                    std::to_string(variant) + ") cannot run " + dlconv::geometry_str(g) +
                                    " in this build (see forward_variant_applicable)");
    Arg ax = checked(K, "x", x, x_shape(g), false), aw = checked(K, "w", w, w_shape(g), false);
    Arg ab = optional_in(K, "b", b, {g.filters});
    Arg ay = output(K, "y", y, y_shape(g));
    no_alias(K, {{"y", &ay}}, {{"x", &ax}, {"w", &aw}, {"b", &ab}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(conv_flops(g) < SERIAL_FLOPS);
        if (g.batch > 0) dlconv::cpu::conv2d_forward(g, ax.ptr, aw.ptr, ab.ptr, act, ay.ptr, variant);
    }
    return ay.arr;
}

// The activation-output argument of the backward passes: required (shape of dz) when act != 0.
Arg activation_output(const char* kernel, const py::object& y, int act, const Shape& shape) {
    dlconv::bind::check_activation(kernel, act, 3);
    if (act == 0) return Arg{};
    if (y.is_none())
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": activation " + std::to_string(act) +
                                    " needs y, the activation's output");
    return checked(kernel, "y", y, shape, false);
}

py::array conv2d_backward_data(py::object dz, py::object w, py::object geometry, py::object dx, py::object y,
                               int act) {
    const char* K = "conv2d_backward_data";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    Arg adz = checked(K, "dz", dz, y_shape(g), false), aw = checked(K, "w", w, w_shape(g), false);
    Arg ay = activation_output(K, y, act, y_shape(g));
    Arg adx = output(K, "dx", dx, x_shape(g));
    no_alias(K, {{"dx", &adx}}, {{"dz", &adz}, {"w", &aw}, {"y", &ay}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(conv_flops(g) < SERIAL_FLOPS);
        if (g.batch > 0) dlconv::cpu::conv2d_backward_data(g, adz.ptr, aw.ptr, adx.ptr, ay.ptr, act);
    }
    return adx.arr;
}

py::tuple conv2d_backward_filter(py::object x, py::object dz, py::object geometry, py::object dw, py::object db,
                                 py::object y, int act) {
    const char* K = "conv2d_backward_filter";
    const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
    Arg ax = checked(K, "x", x, x_shape(g), false), adz = checked(K, "dz", dz, y_shape(g), false);
    Arg ay = activation_output(K, y, act, y_shape(g));
    Arg adw = output(K, "dw", dw, w_shape(g)), adb = output(K, "db", db, {g.filters});
    no_alias(K, {{"dw", &adw}, {"db", &adb}}, {{"x", &ax}, {"dz", &adz}, {"y", &ay}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(conv_flops(g) < SERIAL_FLOPS);
        dlconv::cpu::conv2d_backward_filter(g, ax.ptr, adz.ptr, adw.ptr, adb.ptr, ay.ptr, act);
    }
    return py::make_tuple(adw.arr, adb.arr);
}

py::array dense_forward(py::object x, py::object w, py::object b, int act, py::object y) {
    const char* K = "dense_forward";
    dlconv::bind::check_activation(K, act, 3);
    const int64_t M = dim(K, "x", x, 2, 0), Kf = dim(K, "x", x, 2, 1), N = dim(K, "w", w, 2, 1);
    Arg ax = checked(K, "x", x, {M, Kf}, false), aw = checked(K, "w", w, {Kf, N}, false);
    Arg ab = optional_in(K, "b", b, {N});
    Arg ay = output(K, "y", y, {M, N});
    no_alias(K, {{"y", &ay}}, {{"x", &ax}, {"w", &aw}, {"b", &ab}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(2.0 * double(M) * double(Kf) * double(N) < SERIAL_FLOPS);
        dlconv::cpu::dense_forward(M, Kf, N, ax.ptr, aw.ptr, ab.ptr, act, ay.ptr);
    }
    return ay.arr;
}

py::tuple dense_backward(py::object x, py::object w, py::object dy, py::object y, int act, py::object dx,
                         py::object dw, py::object db) {
    const char* K = "dense_backward";
    dlconv::bind::check_activation(K, act, 3);
    const int64_t M = dim(K, "x", x, 2, 0), Kf = dim(K, "x", x, 2, 1), N = dim(K, "w", w, 2, 1);
    Arg ax = checked(K, "x", x, {M, Kf}, false), aw = checked(K, "w", w, {Kf, N}, false);
    Arg ady = checked(K, "dy", dy, {M, N}, false);
    if (act != 0 && y.is_none())
        throw std::invalid_argument("dlconv C++ dense_backward: y (the forward output) is needed for activation " +
                                    std::to_string(act));
    Arg ayy = optional_in(K, "y", y, {M, N});
    Arg adx = output(K, "dx", dx, {M, Kf}), adw = output(K, "dw", dw, {Kf, N}), adb = output(K, "db", db, {N});
    no_alias(K, {{"dx", &adx}, {"dw", &adw}, {"db", &adb}}, {{"x", &ax}, {"w", &aw}, {"dy", &ady}, {"y", &ayy}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(4.0 * double(M) * double(Kf) * double(N) < SERIAL_FLOPS);
        dlconv::cpu::dense_backward(M, Kf, N, ax.ptr, aw.ptr, ady.ptr, ayy.ptr, act, adx.ptr, adw.ptr, adb.ptr);
    }
    return py::make_tuple(adx.arr, adw.arr, adb.arr);
}

py::array softmax(py::object z, py::object out) {
    const char* K = "softmax";
    const int64_t R = dim(K, "z", z, 2, 0), Cn = dim(K, "z", z, 2, 1);
    Arg az = checked(K, "z", z, {R, Cn}, false);
    Arg ao = output(K, "out", out, {R, Cn});
    no_alias(K, {{"out", &ao}}, {{"z", &az}});
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(double(R) * double(Cn) < SERIAL_ELEMENTS);
        if (R > 0 && Cn > 0) dlconv::cpu::softmax(R, Cn, az.ptr, ao.ptr);
    }
    return ao.arr;
}

py::array activation_backward(py::object dy, py::object y, int act, py::object out) {
    const char* K = "activation_backward";
    dlconv::bind::check_activation(K, act, 4);
    if (!py::isinstance<py::array>(dy)) throw py::type_error("dlconv C++ activation_backward: dy must be a numpy.ndarray");
    auto a = py::reinterpret_borrow<py::array>(dy);
    Shape shape(a.shape(), a.shape() + a.ndim());
    if (act == 4 && shape.size() != 2)
        throw std::invalid_argument("dlconv C++ activation_backward: softmax needs rank-2 arrays, got shape " +
                                    shape_str(shape));
    Arg ady = checked(K, "dy", dy, shape, false), ay = checked(K, "y", y, shape, false);
    Arg ao = output(K, "out", out, shape);
    no_alias(K, {{"out", &ao}}, {{"dy", &ady}, {"y", &ay}});
    int64_t rows = 1, cols = 1;
    if (act == 4) { rows = shape[0]; cols = shape[1]; }
    else for (auto s : shape) cols *= s;
    {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
        SerialIfSmall serial(double(rows) * double(cols) < SERIAL_ELEMENTS);
        if (rows * cols > 0) dlconv::cpu::activation_backward(rows, cols, ady.ptr, ay.ptr, act, ao.ptr);
    }
    return ao.arr;
}

py::dict build_info() {
    py::dict d;
#if defined(DLCONV_HAVE_AVX512) && defined(__AVX512F__)
    d["simd"] = "avx512f+avx2+fma";
#elif defined(DLCONV_HAVE_AVX2) && defined(__AVX2__)
    d["simd"] = "avx2+fma";
#else
    d["simd"] = "scalar";
#endif
#ifdef _OPENMP
    d["openmp"] = std::to_string(_OPENMP);
#else
    d["openmp"] = "no";
#endif
    d["compiler"] = __VERSION__;
    d["register_block"] = std::to_string(dlconv::cpu::MR) + "x" + std::to_string(dlconv::cpu::NR);
    d["threads"] = omp_get_max_threads();
#ifdef DLCONV_XLA_FFI
    d["xla_ffi"] = true;
#else
    d["xla_ffi"] = false;
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "dlconv C++ CPU kernels (OpenMP + SIMD implicit GEMM); see csrc/bind_cpu.cpp for the API";
    m.def("build_info", &build_info, "How this extension was compiled (SIMD level, OpenMP, register block).");
    m.def("xla_ffi_handlers", [] {
              py::dict d;
#ifdef DLCONV_XLA_FFI
              for (const auto& [name, fn] : dlconv::xffi::cpu_handlers()) d[name] = py::capsule(fn);
#endif
              return d;
          },
          "XLA FFI handlers of the CPU kernels (target name -> PyCapsule for "
          "jax.ffi.register_ffi_target(..., platform='cpu')); empty when built without the XLA FFI headers.");
    m.def("keep_heap", [] {
        const auto& s = dlconv::heap::keep_freed_host_memory();
        return py::make_tuple(s.kept, s.why);
    }, "Keep freed host memory on glibc's heap (host_heap.h; once per process, DLCONV_KEEP_HEAP=0 opts "
       "out) -> (kept, why).");
    m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("geometry"),
          py::arg("activation"), py::arg("y") = py::none(), py::arg("variant") = 0,
          "y = act(conv2d(x, w) + b): x NHWC, w HWIO, b (filters,) or None, geometry = ConvGeometry.as_tuple(); "
          "variant 0 auto, else the code of a CONV_VARIANTS entry (1 cpu_v1_packgemm, 2 cpu_v2_regblock, "
          "3 cpu_v3_winograd).");
    m.attr("CONV_VARIANTS") = dlconv::bind::variants_to_py(dlconv::CPU_CONV_VARIANTS);
    m.attr("CUDA_CONV_VARIANTS") = dlconv::bind::variants_to_py(dlconv::CUDA_CONV_VARIANTS);
    m.def("forward_variant_applicable", [](py::object geometry, int variant) {
              dlconv::variant_by_code(dlconv::CPU_CONV_VARIANTS, variant, "C++ forward_variant_applicable", true);
              return dlconv::cpu::conv2d_forward_applicable(
                  dlconv::bind::geometry_from(geometry, "forward_variant_applicable"), variant);
          }, py::arg("geometry"), py::arg("variant"),
          "Whether conv-forward variant (a CONV_VARIANTS code) can run this geometry in this build.");
    m.def("transposed_geometry", [](py::object geometry, int64_t phase_h, int64_t phase_w) {
              const auto t = dlconv::transposed_geometry(
                  dlconv::bind::geometry_from(geometry, "transposed_geometry"), phase_h, phase_w);
              const ConvGeometry& f = t.f;
              return py::make_tuple(py::make_tuple(f.batch, f.in_h, f.in_w, f.in_c, f.filters, f.k_h, f.k_w,
                                                   f.stride_h, f.stride_w, f.dil_h, f.dil_w, f.pad_top,
                                                   f.pad_bottom, f.pad_left, f.pad_right, f.out_h, f.out_w),
                                    t.tap_last_h, t.tap_last_w, t.tap_step_h, t.tap_step_w);
          }, py::arg("geometry"), py::arg("phase_h") = 0, py::arg("phase_w") = 0,
          "geometry.h's backward-data phase record: (17 fields as TransposedGeometry.as_tuple(), tap_last_h, "
          "tap_last_w, tap_step_h, tap_step_w); the C++ mirror of dlconv.shapes.transposed_geometry.");
    m.def("conv2d_backward_data", &conv2d_backward_data, py::arg("dz"), py::arg("w"), py::arg("geometry"),
          py::arg("dx") = py::none(), py::arg("y") = py::none(), py::arg("activation") = 0,
          "dL/dx from dL/dz (the conv's linear output) and w; with activation 1-3, dz is dL/dy of that "
          "activation and y its output.");
    m.def("conv2d_backward_filter", &conv2d_backward_filter, py::arg("x"), py::arg("dz"), py::arg("geometry"),
          py::arg("dw") = py::none(), py::arg("db") = py::none(), py::arg("y") = py::none(),
          py::arg("activation") = 0,
          "(dL/dw, dL/db) from x and dL/dz; with activation 1-3, dz is dL/dy of that activation and y its output.");
    m.def("dense_forward", &dense_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("activation"),
          py::arg("y") = py::none(), "y = act(x @ w + b).");
    m.def("dense_backward", &dense_backward, py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("y"),
          py::arg("activation"), py::arg("dx") = py::none(), py::arg("dw") = py::none(),
          py::arg("db") = py::none(), "(dx, dw, db) of y = act(x @ w + b) given dL/dy and y.");
    m.def("softmax", &softmax, py::arg("z"), py::arg("out") = py::none(), "Row-wise softmax of (rows, cols).");
    m.def("activation_backward", &activation_backward, py::arg("dy"), py::arg("y"), py::arg("activation"),
          py::arg("out") = py::none(), "dL/dz from dL/dy and the activation output y (code 4 = softmax).");

    // ---- max pool (cpu_pool.h): geometry = dlconv.shapes.pool_geometry(...).as_tuple() ----------
    //   max_pool2d_forward(x, geometry, y, arg=None) -> y       (arg: int32 (N,OH,OW,C), filled when given)
    //   max_pool2d_backward(dy, geometry, dx, arg=None, x=None) -> dx   (arg: the stored index; else x, recomputed)
    //   xla_ffi_pool_handlers() -> {target name: PyCapsule}  (ffi_pool.cpp; empty without the XLA FFI headers)
    auto pool_arg = [](const char* K, const py::object& obj, const Shape& shape) -> int32_t* {
        if (obj.is_none()) return nullptr;
        if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string("dlconv C++ ") + K + ": arg must be a numpy.ndarray of int32");
        auto a = py::reinterpret_borrow<py::array>(obj);
        if (!a.dtype().is(py::dtype::of<int32_t>()))
            throw py::type_error(std::string("dlconv C++ ") + K + ": arg must be int32, got " + std::string(py::str(a.dtype())));
        if (!(a.flags() & py::array::c_style) || !a.attr("flags").attr("aligned").cast<bool>())
            throw std::invalid_argument(std::string("dlconv C++ ") + K + ": arg must be C-contiguous and aligned");
        Shape got(a.shape(), a.shape() + a.ndim());
        if (got != shape)
            throw std::invalid_argument(std::string("dlconv C++ ") + K + ": arg has shape " + shape_str(got) + ", expected " + shape_str(shape));
        return static_cast<int32_t*>(const_cast<void*>(a.data()));
    };
    m.def("max_pool2d_forward", [pool_arg](py::object x, py::object geometry, py::object y, py::object arg) {
        const char* K = "max_pool2d_forward";
        const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
        dlconv::cpu::check_pool_geometry(g, K);
        Arg ax = checked(K, "x", x, x_shape(g), false), ay = output(K, "y", y, y_shape(g));
        int32_t* ap = pool_arg(K, arg, y_shape(g));
        if (ap != nullptr && !py::reinterpret_borrow<py::array>(arg).writeable())
            throw std::invalid_argument(std::string("dlconv C++ ") + K + ": arg is read-only");
        no_alias(K, {{"y", &ay}}, {{"x", &ax}});
        {
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
            SerialIfSmall serial(double(g.x_size()) < SERIAL_ELEMENTS);
            dlconv::cpu::max_pool2d_forward(g, ax.ptr, ay.ptr, ap);
        }
        return ay.arr;
    }, py::arg("x"), py::arg("geometry"), py::arg("y") = py::none(), py::arg("arg") = py::none(),
       "Max pool y of x (TensorFlow's rules, cpu_pool.h); fills arg (int32 flat input positions) when given.");
    m.def("max_pool2d_backward", [pool_arg](py::object dy, py::object geometry, py::object dx, py::object arg,
                                            py::object x) {
        const char* K = "max_pool2d_backward";
        const ConvGeometry g = dlconv::bind::geometry_from(geometry, K);
        dlconv::cpu::check_pool_geometry(g, K);
        Arg ady = checked(K, "dy", dy, y_shape(g), false), adx = output(K, "dx", dx, x_shape(g));
        const int32_t* ap = pool_arg(K, arg, y_shape(g));
        Arg ax = optional_in(K, "x", x, x_shape(g));
        if (ap == nullptr && ax.ptr == nullptr)
            throw std::invalid_argument(std::string("dlconv C++ ") + K + ": needs arg (the stored index) or x");
        no_alias(K, {{"dx", &adx}}, {{"dy", &ady}, {"x", &ax}});
        {
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> one_at_a_time(dlconv::cpu::host_mutex());
            SerialIfSmall serial(double(g.x_size()) < SERIAL_ELEMENTS);
            if (ap != nullptr)
                dlconv::cpu::max_pool2d_backward_argmax(g, ady.ptr, ap, adx.ptr);
            else
                dlconv::cpu::max_pool2d_backward_recompute(g, ax.ptr, ady.ptr, adx.ptr);
        }
        return adx.arr;
    }, py::arg("dy"), py::arg("geometry"), py::arg("dx") = py::none(), py::arg("arg") = py::none(),
       py::arg("x") = py::none(), "dL/dx of the max pool from dy and the stored arg (or x, recomputing it).");
    m.def("xla_ffi_pool_handlers", [] {
        py::dict d;
#ifdef DLCONV_XLA_FFI
        for (const auto& [name, fn] : dlconv::xffi::pool_handlers()) d[name] = py::capsule(fn);
#endif
        return d;
    }, "The max pool's XLA FFI handlers (ffi_pool.cpp) {target name: PyCapsule}; empty without XLA FFI headers.");

    // ---- dropout (cpu_dropout.h): the mask is a function of (seed, counter, element index) ------
    //   dropout(x, rate, seed, counter, y=None) -> y   y = keep ? x / (1 - rate) : 0 (any shape,
    //     float32 C-contiguous; y may be x; the backward is the same call on dy)
    //   dropout_mask(n, rate, seed, counter) -> uint8 (n,)   the kernel's keep mask (for tests)
    m.def("dropout", [](py::object x, double rate, uint64_t seed, uint64_t counter, py::object y) {
        const char* K = "dropout";
        dlconv::cpu::check_dropout_rate(rate, K);
        if (!py::isinstance<py::array>(x))
            throw py::type_error(std::string("dlconv C++ ") + K + ": x must be a numpy.ndarray of float32");
        auto xa = py::reinterpret_borrow<py::array>(x);
        const Shape shape(xa.shape(), xa.shape() + xa.ndim());
        Arg ax = checked(K, "x", x, shape, false), ay = output(K, "y", y, shape);
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        if (ay.ptr != ax.ptr) no_alias(K, {{"y", &ay}}, {{"x", &ax}});
        {
            py::gil_scoped_release nogil;
            SerialIfSmall serial(double(n) < SERIAL_ELEMENTS);
            dlconv::cpu::dropout_forward(n, ax.ptr, rate, seed, counter, ay.ptr);
        }
        return ay.arr;
    }, py::arg("x"), py::arg("rate"), py::arg("seed"), py::arg("counter"), py::arg("y") = py::none(),
       "y = keep ? x / (1 - rate) : 0, keep drawn from (seed, counter, index) (cpu_dropout.h).");
    m.def("dropout_mask", [](int64_t n, double rate, uint64_t seed, uint64_t counter) {
        if (n < 0) throw std::invalid_argument("dlconv C++ dropout_mask: n must be >= 0");
        py::array_t<uint8_t> mask(n);
        uint8_t* p = mask.mutable_data();
        dlconv::cpu::check_dropout_rate(rate, "dropout_mask");
        {
            py::gil_scoped_release nogil;
            dlconv::cpu::dropout_mask(n, rate, seed, counter, p);
        }
        return mask;
    }, py::arg("n"), py::arg("rate"), py::arg("seed"), py::arg("counter"),
       "The dropout kernel's keep mask (1 kept) of n elements for (rate, seed, counter).");
}
