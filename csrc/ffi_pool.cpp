// ffi_pool.cpp — XLA FFI handlers (platform "cpu") for the max pool (cpu_pool.h), part of dlconv._C
// when built against the XLA FFI headers (DLCONV_XLA_FFI), exported by bind_cpu.cpp as
// xla_ffi_pool_handlers() and registered by dlconv/bridges/jax.py (max_pool2d).
//
// Targets (attribute "geometry": dlconv.shapes.pool_geometry's record, ConvGeometry.FIELDS order):
//   dlconv_max_pool2d_forward            x          -> y, arg (int32)
//   dlconv_max_pool2d_backward           dy, arg    -> dx          (the stored index, a gather)
//   dlconv_max_pool2d_backward_recompute x, dy      -> dx          (arg recomputed from x)
// Every buffer is checked against the record (dtype, dimensions) and the record itself re-checked
// (geometry_from, then check_pool_geometry); failures come back as ffi::Error.  Kernels run as the
// conv/dense handlers' do: ffi_cpu.cpp's run_host_kernel (host lock; small work in place, OpenMP
// work on the one "dlconv-xla" thread).
#include <cstdint>
#include <functional>
#include <string>

#include "cpu_host.h"
#include "cpu_kernels.h"
#include "ffi_common.h"
#include "ffi_pool.h"

namespace ffi = xla::ffi;
using dlconv::ConvGeometry;
using namespace dlconv::xffi;  // NOLINT: the helpers of ffi_common.h

namespace dlconv {
namespace xffi {
// Defined in ffi_cpu.cpp.
ffi::Error run_host_kernel(const char* kernel, double work, double serial_below, const std::function<void()>& fn);
}  // namespace xffi
}  // namespace dlconv

namespace {

// `buf` must be int32 with exactly the dimensions `shape`.
ffi::Error check_i32(const char* kernel, const char* name, const ffi::AnyBuffer& buf, const Shape& shape) {
    if (buf.element_type() != ffi::DataType::S32)
        return invalid(kernel, std::string(name) + " must be int32, got XLA dtype code " +
                                   std::to_string(int(buf.element_type())));
    const auto dims = buf.dimensions();
    if (!(dims == ffi::Span<const int64_t>(shape)))
        return invalid(kernel, std::string(name) + " has shape " + shape_str(dims) + ", expected " + shape_str(shape));
    return ffi::Error::Success();
}

ffi::Error pool_geometry(const char* K, ffi::Span<const int64_t> v, ConvGeometry* g) {
    DLCONV_FFI_TRY(geometry_from(K, v, g));
    return guarded(K, [&] { dlconv::cpu::check_pool_geometry(*g, K); });
}

ffi::Error pool_forward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> arg,
                        ffi::Span<const int64_t> geometry) {
    const char* K = "dlconv_max_pool2d_forward";
    ConvGeometry g;
    DLCONV_FFI_TRY(pool_geometry(K, geometry, &g));
    DLCONV_FFI_TRY(check(K, "x", x, x_shape(g)));
    DLCONV_FFI_TRY(check(K, "y", *y, y_shape(g)));
    DLCONV_FFI_TRY(check_i32(K, "arg", *arg, y_shape(g)));
    if (g.batch == 0) return ffi::Error::Success();
    int32_t* a = static_cast<int32_t*>(arg->untyped_data());
    return run_host_kernel(K, double(g.x_size()), dlconv::cpu::SERIAL_ELEMENTS,
                           [&] { dlconv::cpu::max_pool2d_forward(g, in_ptr(x), out_ptr(y), a); });
}

ffi::Error pool_backward(ffi::AnyBuffer dy, ffi::AnyBuffer arg, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Span<const int64_t> geometry) {
    const char* K = "dlconv_max_pool2d_backward";
    ConvGeometry g;
    DLCONV_FFI_TRY(pool_geometry(K, geometry, &g));
    DLCONV_FFI_TRY(check(K, "dy", dy, y_shape(g)));
    DLCONV_FFI_TRY(check_i32(K, "arg", arg, y_shape(g)));
    DLCONV_FFI_TRY(check(K, "dx", *dx, x_shape(g)));
    if (g.batch == 0) return ffi::Error::Success();
    const int32_t* a = static_cast<const int32_t*>(arg.untyped_data());
    return run_host_kernel(K, double(g.x_size()), dlconv::cpu::SERIAL_ELEMENTS,
                           [&] { dlconv::cpu::max_pool2d_backward_argmax(g, in_ptr(dy), a, out_ptr(dx)); });
}

ffi::Error pool_backward_recompute(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                                   ffi::Span<const int64_t> geometry) {
    const char* K = "dlconv_max_pool2d_backward_recompute";
    ConvGeometry g;
    DLCONV_FFI_TRY(pool_geometry(K, geometry, &g));
    DLCONV_FFI_TRY(check(K, "x", x, x_shape(g)));
    DLCONV_FFI_TRY(check(K, "dy", dy, y_shape(g)));
    DLCONV_FFI_TRY(check(K, "dx", *dx, x_shape(g)));
    if (g.batch == 0) return ffi::Error::Success();
    return run_host_kernel(K, double(g.x_size()), dlconv::cpu::SERIAL_ELEMENTS, [&] {
        dlconv::cpu::max_pool2d_backward_recompute(g, in_ptr(x), in_ptr(dy), out_ptr(dx));
    });
}

using B = ffi::AnyBuffer;
using Geo = ffi::Span<const int64_t>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvMaxPool2dForward, pool_forward,
                              ffi::Ffi::Bind().Arg<B>().Ret<B>().Ret<B>().Attr<Geo>("geometry"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvMaxPool2dBackward, pool_backward,
                              ffi::Ffi::Bind().Arg<B>().Arg<B>().Ret<B>().Attr<Geo>("geometry"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvMaxPool2dBackwardRecompute, pool_backward_recompute,
                              ffi::Ffi::Bind().Arg<B>().Arg<B>().Ret<B>().Attr<Geo>("geometry"));

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& pool_handlers() {
    static const std::vector<std::pair<const char*, void*>> table = {
        {"dlconv_max_pool2d_forward", reinterpret_cast<void*>(DlconvMaxPool2dForward)},
        {"dlconv_max_pool2d_backward", reinterpret_cast<void*>(DlconvMaxPool2dBackward)},
        {"dlconv_max_pool2d_backward_recompute", reinterpret_cast<void*>(DlconvMaxPool2dBackwardRecompute)},
    };
    return table;
}

}  // namespace xffi
}  // namespace dlconv
