// ffi_common.h — argument checks shared by the XLA FFI handlers (ffi_cpu.cpp in dlconv._C,
// ffi_cuda.cpp in dlconv._C_cuda), the FFI twin of bind_common.h.
//
// The JAX bridge (dlconv/bridges/jax.py) resolves the geometry with dlconv.shapes at trace time
// and passes it as one int64 array attribute "geometry" in ConvGeometry.FIELDS order; activations
// are the integer codes of dlconv.activations (attribute "act").  C++ never trusts its caller: the
// record is re-validated and every buffer's dtype and dimensions are checked against it.  Every
// failure — a check, or an exception from a kernel — comes back to XLA as an ffi::Error (which JAX
// raises as a Python exception naming the handler, buffer and values); nothing escapes as a C++
// exception and nothing aborts.
#pragma once

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "geometry.h"
#include "xla/ffi/api/ffi.h"

namespace dlconv {
namespace xffi {

namespace ffi = xla::ffi;
using Shape = std::vector<int64_t>;

// The "act" codes of dlconv.activations the handlers take.
constexpr int64_t MAX_ELEMENTWISE = 3;  // linear, relu, sigmoid, tanh
constexpr int64_t SOFTMAX = 4;          // activation_backward's row-wise code

inline std::string shape_str(ffi::Span<const int64_t> s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}
inline std::string shape_str(const Shape& s) { return shape_str(ffi::Span<const int64_t>(s)); }

inline ffi::Error invalid(const char* kernel, const std::string& what) {
    return ffi::Error::InvalidArgument(std::string("dlconv XLA FFI ") + kernel + ": " + what);
}

// `buf` must be float32 with exactly the dimensions `shape`.
inline ffi::Error check(const char* kernel, const char* name, const ffi::AnyBuffer& buf, const Shape& shape) {
    if (buf.element_type() != ffi::DataType::F32)
        return invalid(kernel, std::string(name) + " must be float32, got XLA dtype code " +
                                   std::to_string(int(buf.element_type())) + " (no silent conversion)");
    const auto dims = buf.dimensions();
    if (!(dims == ffi::Span<const int64_t>(shape)))
        return invalid(kernel, std::string(name) + " has shape " + shape_str(dims) + ", expected " + shape_str(shape));
    return ffi::Error::Success();
}

// The rank-2 buffer's two dimensions (for the dense handlers, whose sizes come from the buffers).
inline ffi::Error dims2(const char* kernel, const char* name, const ffi::AnyBuffer& buf, int64_t* rows,
                        int64_t* cols) {
    const auto dims = buf.dimensions();
    if (dims.size() != 2)
        return invalid(kernel, std::string(name) + " must have rank 2, got shape " + shape_str(dims));
    *rows = dims[0];
    *cols = dims[1];
    return ffi::Error::Success();
}

// The "geometry" attribute → a validated ConvGeometry (the rules of dlconv.shapes, re-checked).
inline ffi::Error geometry_from(const char* kernel, ffi::Span<const int64_t> v, ConvGeometry* g) {
    if (v.size() != size_t(GEOMETRY_FIELDS) && v.size() != size_t(GEOMETRY_FIELDS_UNGROUPED))
        return invalid(kernel, "geometry must have " + std::to_string(GEOMETRY_FIELDS) +
                                   " fields (ConvGeometry.FIELDS; or 17 fields: groups = 1), got " +
                                   std::to_string(v.size()));
    for (size_t i = 0; i < v.size(); ++i)
        if (v[i] < 0 || v[i] > MAX_FIELD)
            return invalid(kernel, "geometry field " + std::to_string(i) + " = " + std::to_string(v[i]) +
                                       " is out of range");
    *g = ConvGeometry{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7], v[8],
                      v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16],
                      v.size() > size_t(GEOMETRY_FIELDS_UNGROUPED) ? v[17] : 1};
    try {
        validate_geometry(*g);
    } catch (const std::exception& e) {
        return invalid(kernel, e.what());
    }
    return ffi::Error::Success();
}

inline ffi::Error check_activation(const char* kernel, int64_t act, int64_t max_code) {
    if (act < 0 || act > max_code)
        return invalid(kernel, "activation code must be 0.." + std::to_string(max_code) +
                                   " (linear, relu, sigmoid, tanh" + (max_code > 3 ? ", softmax" : "") +
                                   "), got " + std::to_string(act));
    return ffi::Error::Success();
}

inline Shape x_shape(const ConvGeometry& g) { return {g.batch, g.in_h, g.in_w, g.in_c}; }
inline Shape w_shape(const ConvGeometry& g) { return {g.k_h, g.k_w, g.group_in_c(), g.filters}; }
inline Shape y_shape(const ConvGeometry& g) { return {g.batch, g.out_h, g.out_w, g.filters}; }

// The one optional trailing argument (bias, or the activation's output y) from RemainingArgs:
// null when absent; an error when present but of the wrong dtype/shape, or when more are given.
inline ffi::Error optional_arg(const char* kernel, const char* name, const ffi::RemainingArgs& rest,
                               const Shape& shape, const float** ptr) {
    *ptr = nullptr;
    if (rest.size() == 0) return ffi::Error::Success();
    if (rest.size() > 1)
        return invalid(kernel, "takes at most one optional argument (" + std::string(name) + "), got " +
                                   std::to_string(rest.size()));
    auto buf = rest.get<ffi::AnyBuffer>(0);
    if (!buf.has_value()) return invalid(kernel, std::string(name) + " is not a buffer");
    if (auto err = check(kernel, name, buf.value(), shape); err.failure()) return err;
    *ptr = static_cast<const float*>(buf.value().untyped_data());
    return ffi::Error::Success();
}

// The conv forward's buffers, the same on every platform: x, w, the optional bias b and y, each
// float32 with the dimensions the record implies.
inline ffi::Error conv_forward_buffers(const char* kernel, const ConvGeometry& g, const ffi::AnyBuffer& x,
                                       const ffi::AnyBuffer& w, const ffi::RemainingArgs& rest,
                                       const ffi::AnyBuffer& y, const float** b) {
    if (auto err = check(kernel, "x", x, x_shape(g)); err.failure()) return err;
    if (auto err = check(kernel, "w", w, w_shape(g)); err.failure()) return err;
    if (auto err = optional_arg(kernel, "b", rest, {g.filters}, b); err.failure()) return err;
    return check(kernel, "y", y, y_shape(g));
}

// y, the activation's output, from the optional trailing argument: required unless act is 0 (linear);
// `missing` is the message when it is absent.
inline ffi::Error activation_output(const char* kernel, const ffi::RemainingArgs& rest, const Shape& shape,
                                    int64_t act, const std::string& missing, const float** y) {
    if (auto err = optional_arg(kernel, "y", rest, shape, y); err.failure()) return err;
    if (act != 0 && *y == nullptr) return invalid(kernel, missing);
    return ffi::Error::Success();
}
inline std::string conv_missing_y(int64_t act) {
    return "activation " + std::to_string(act) + " needs y, the activation's output";
}

// The dense operands x (M, K) and w (K, N), float32; the sizes come from the buffers.
inline ffi::Error dense_operands(const char* kernel, const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, int64_t* M,
                                 int64_t* K, int64_t* N) {
    int64_t Kw = 0;
    if (auto err = dims2(kernel, "x", x, M, K); err.failure()) return err;
    if (auto err = dims2(kernel, "w", w, &Kw, N); err.failure()) return err;
    if (auto err = check(kernel, "x", x, {*M, *K}); err.failure()) return err;
    return check(kernel, "w", w, {*K, *N});
}

// dense_backward's buffers after dense_operands: dy (M, N), the optional y (needed unless act is 0),
// and the outputs dx (M, K), dw (K, N), db (N,).
inline ffi::Error dense_backward_buffers(const char* kernel, int64_t M, int64_t K, int64_t N, int64_t act,
                                         const ffi::AnyBuffer& dy, const ffi::RemainingArgs& rest,
                                         const ffi::AnyBuffer& dx, const ffi::AnyBuffer& dw,
                                         const ffi::AnyBuffer& db, const float** y) {
    if (auto err = check(kernel, "dy", dy, {M, N}); err.failure()) return err;
    if (auto err = activation_output(kernel, rest, {M, N}, act,
                                     "y (the forward output) is needed for activation " + std::to_string(act), y);
        err.failure())
        return err;
    if (auto err = check(kernel, "dx", dx, {M, K}); err.failure()) return err;
    if (auto err = check(kernel, "dw", dw, {K, N}); err.failure()) return err;
    return check(kernel, "db", db, {N});
}

// softmax's z and out: rank 2, float32, the same (R, C).
inline ffi::Error softmax_buffers(const char* kernel, const ffi::AnyBuffer& z, const ffi::AnyBuffer& out, int64_t* R,
                                  int64_t* C) {
    if (auto err = dims2(kernel, "z", z, R, C); err.failure()) return err;
    if (auto err = check(kernel, "z", z, {*R, *C}); err.failure()) return err;
    return check(kernel, "out", out, {*R, *C});
}

// activation_backward's dy, y and dz: float32, all of dy's shape (rank 2 for SOFTMAX), viewed as
// rows x cols: the rows of a softmax, or one row of every element.
inline ffi::Error activation_backward_buffers(const char* kernel, int64_t act,
                                              const ffi::AnyBuffer& dy, const ffi::AnyBuffer& y,
                                              const ffi::AnyBuffer& dz, int64_t* rows, int64_t* cols) {
    const auto d = dy.dimensions();
    const Shape shape(d.begin(), d.end());
    if (act == SOFTMAX && shape.size() != 2)
        return invalid(kernel, "softmax needs rank-2 arrays, got shape " + shape_str(shape));
    if (auto err = check(kernel, "dy", dy, shape); err.failure()) return err;
    if (auto err = check(kernel, "y", y, shape); err.failure()) return err;
    if (auto err = check(kernel, "dz", dz, shape); err.failure()) return err;
    *rows = 1;
    *cols = 1;
    if (act == SOFTMAX) {
        *rows = shape[0];
        *cols = shape[1];
    } else {
        for (auto s : shape) *cols *= s;
    }
    return ffi::Error::Success();
}

// The targets' signatures (buffers, then attributes, as in ffi_cpu.cpp's list), written once:
// each takes what the platform binds first (nothing on the CPU, the stream on CUDA), so a
// target's CPU and CUDA handlers cannot drift apart (the JAX bridge calls both the same way).
namespace sig {
using B = ffi::AnyBuffer;
using Geo = ffi::Span<const int64_t>;
template <typename Bd>
auto conv2d_forward(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().RemainingArgs().template Ret<B>()
        .template Attr<Geo>("geometry").template Attr<int64_t>("act").template Attr<int64_t>("variant");
}
template <typename Bd>
auto conv2d_backward_data(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().RemainingArgs().template Ret<B>()
        .template Attr<Geo>("geometry").template Attr<int64_t>("act");
}
template <typename Bd>
auto conv2d_backward_filter(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().RemainingArgs().template Ret<B>().template Ret<B>()
        .template Attr<Geo>("geometry").template Attr<int64_t>("act");
}
template <typename Bd>
auto dense_forward(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().RemainingArgs().template Ret<B>()
        .template Attr<int64_t>("act");
}
template <typename Bd>
auto dense_backward(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().template Arg<B>().RemainingArgs().template Ret<B>()
        .template Ret<B>().template Ret<B>().template Attr<int64_t>("act");
}
template <typename Bd>
auto softmax(Bd b) {
    return std::move(b).template Arg<B>().template Ret<B>();
}
template <typename Bd>
auto activation_backward(Bd b) {
    return std::move(b).template Arg<B>().template Arg<B>().template Ret<B>().template Attr<int64_t>("act");
}
}  // namespace sig

// Runs `fn` (a kernel call), turning any exception into an ffi::Error naming the kernel.
template <typename F>
ffi::Error guarded(const char* kernel, F&& fn) {
    try {
        fn();
    } catch (const std::invalid_argument& e) {
        return invalid(kernel, e.what());
    } catch (const std::exception& e) {
        return ffi::Error::Internal(std::string("dlconv XLA FFI ") + kernel + ": " + e.what());
    } catch (...) {
        return ffi::Error::Internal(std::string("dlconv XLA FFI ") + kernel + ": unknown C++ exception");
    }
    return ffi::Error::Success();
}

#define DLCONV_FFI_TRY(expr)                      \
    do {                                          \
        if (auto _e = (expr); _e.failure()) return _e; \
    } while (0)

inline const float* in_ptr(const ffi::AnyBuffer& b) { return static_cast<const float*>(b.untyped_data()); }
template <typename R>
float* out_ptr(R& r) {
    return static_cast<float*>(r->untyped_data());
}

}  // namespace xffi
}  // namespace dlconv
