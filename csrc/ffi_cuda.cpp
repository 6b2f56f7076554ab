// ffi_cuda.cpp — XLA FFI handlers (platform "CUDA") for the CUDA C++ kernels, part of
// dlconv._C_cuda when it is built against the XLA FFI headers (DLCONV_XLA_FFI).
//
// Same target names, arguments and attributes as ffi_cpu.cpp (the JAX bridge registers these for
// platform "CUDA" and XLA picks the handler of the platform it compiles for).  XLA hands device
// buffers it allocated and its own stream (ffi::PlatformStream<cudaStream_t>): every launcher
// enqueues on that stream and returns — no synchronisation, no host round trip, nothing copied.
// Buffers are checked here (float32, the dimensions the geometry implies); CUDA errors the
// launchers report (std::runtime_error) come back as ffi::Error.
//
// Differences from the CPU handlers, as in bind_cuda.cpp:
//   * the conv backward passes take dL/dz only (act must be 0: the bridge forms dz with
//     dlconv_activation_backward first, dlconv.runtime.fuse_activation_grad says so on a device);
//   * conv forward variant 0 ("auto") means cuda_v3_regblock, else a code of conv_variants.h CUDA_CONV_VARIANTS;
//   * zero-sized work launches nothing (a grid of 0 blocks is a launch error): the reductions
//     (dw, db) are zeroed on the stream instead.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "conv_variants.h"
#include "cuda_kernels.h"
#include "ffi_common.h"
#include "ffi_cuda.h"

namespace ffi = xla::ffi;
using dlconv::ConvGeometry;
using namespace dlconv::xffi;  // NOLINT: the helpers of ffi_common.h

namespace {

using Stream = ffi::PlatformStream<cudaStream_t>;
// What every CUDA handler binds first: XLA's stream (the targets' signatures follow, ffi_common.h).
auto cuda_bind() { return ffi::Ffi::Bind().Ctx<Stream>(); }

ffi::Error zero(const char* kernel, const char* name, float* p, int64_t n, cudaStream_t s) {
    if (n == 0) return ffi::Error::Success();
    cudaError_t e = cudaMemsetAsync(p, 0, size_t(n) * sizeof(float), s);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return ffi::Error::Internal(std::string("dlconv XLA FFI ") + kernel + ": cudaMemsetAsync(" + name +
                                    ") failed: " + cudaGetErrorString(e));
    }
    return ffi::Error::Success();
}

ffi::Error linear_only(const char* kernel, int64_t act) {
    if (act != 0)
        return invalid(kernel, "the CUDA conv backward passes take dL/dz (act 0), got act " + std::to_string(act));
    return ffi::Error::Success();
}

ffi::Error conv_forward(cudaStream_t s, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest,
                        ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> geometry, int64_t act,
                        int64_t variant) {
    const char* K = "dlconv_conv2d_forward";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    try {
        dlconv::variant_by_code(dlconv::CUDA_CONV_VARIANTS, int(variant), K, true);
    } catch (const std::invalid_argument& e) {
        return invalid(K, e.what());
    }
    const float* b = nullptr;
    DLCONV_FFI_TRY(conv_forward_buffers(K, g, x, w, rest, *y, &b));
    if (g.batch == 0) return ffi::Error::Success();
    const int v = variant == 0 ? int(dlconv::cuda::V3_IMPLICIT_GEMM) : int(variant);
    return guarded(K, [&] { dlconv::cuda::conv2d_forward(g, in_ptr(x), in_ptr(w), b, int(act), out_ptr(y), v, s); });
}

ffi::Error conv_backward_data(cudaStream_t s, ffi::AnyBuffer dz, ffi::AnyBuffer w, ffi::RemainingArgs rest,
                              ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> geometry, int64_t act) {
    const char* K = "dlconv_conv2d_backward_data";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(linear_only(K, act));
    if (rest.size() != 0) return invalid(K, "the CUDA handler takes no y (act 0)");
    DLCONV_FFI_TRY(check(K, "dz", dz, y_shape(g)));
    DLCONV_FFI_TRY(check(K, "w", w, w_shape(g)));
    DLCONV_FFI_TRY(check(K, "dx", *dx, x_shape(g)));
    if (g.batch == 0) return ffi::Error::Success();
    return guarded(K, [&] { dlconv::cuda::conv2d_backward_data(g, in_ptr(dz), in_ptr(w), out_ptr(dx), s); });
}

ffi::Error conv_backward_filter(cudaStream_t s, ffi::AnyBuffer x, ffi::AnyBuffer dz, ffi::RemainingArgs rest,
                                ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> db,
                                ffi::Span<const int64_t> geometry, int64_t act) {
    const char* K = "dlconv_conv2d_backward_filter";
    ConvGeometry g;
    DLCONV_FFI_TRY(geometry_from(K, geometry, &g));
    DLCONV_FFI_TRY(linear_only(K, act));
    if (rest.size() != 0) return invalid(K, "the CUDA handler takes no y (act 0)");
    DLCONV_FFI_TRY(check(K, "x", x, x_shape(g)));
    DLCONV_FFI_TRY(check(K, "dz", dz, y_shape(g)));
    DLCONV_FFI_TRY(check(K, "dw", *dw, w_shape(g)));
    DLCONV_FFI_TRY(check(K, "db", *db, {g.filters}));
    if (g.batch == 0) {
        DLCONV_FFI_TRY(zero(K, "dw", out_ptr(dw), g.w_size(), s));
        return zero(K, "db", out_ptr(db), g.filters, s);
    }
    return guarded(K, [&] {
        dlconv::cuda::conv2d_backward_filter(g, in_ptr(x), in_ptr(dz), out_ptr(dw), out_ptr(db), s);
    });
}

ffi::Error dense_forward(cudaStream_t s, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> y, int64_t act) {
    const char* K = "dlconv_dense_forward";
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    int64_t M, Kf, N;
    DLCONV_FFI_TRY(dense_operands(K, x, w, &M, &Kf, &N));
    const float* b = nullptr;
    DLCONV_FFI_TRY(optional_arg(K, "b", rest, {N}, &b));
    DLCONV_FFI_TRY(check(K, "y", *y, {M, N}));
    if (M == 0) return ffi::Error::Success();
    return guarded(K, [&] { dlconv::cuda::dense_forward(M, Kf, N, in_ptr(x), in_ptr(w), b, int(act), out_ptr(y), s); });
}

ffi::Error dense_backward(cudaStream_t s, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dy,
                          ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> db, int64_t act) {
    const char* K = "dlconv_dense_backward";
    DLCONV_FFI_TRY(check_activation(K, act, MAX_ELEMENTWISE));
    int64_t M, Kf, N;
    DLCONV_FFI_TRY(dense_operands(K, x, w, &M, &Kf, &N));
    const float* y = nullptr;
    DLCONV_FFI_TRY(dense_backward_buffers(K, M, Kf, N, act, dy, rest, *dx, *dw, *db, &y));
    if (M == 0) {
        DLCONV_FFI_TRY(zero(K, "dw", out_ptr(dw), Kf * N, s));
        return zero(K, "db", out_ptr(db), N, s);
    }
    return guarded(K, [&] {
        dlconv::cuda::dense_backward(M, Kf, N, in_ptr(x), in_ptr(w), in_ptr(dy), y, int(act), out_ptr(dx),
                                     out_ptr(dw), out_ptr(db), s);
    });
}

ffi::Error softmax(cudaStream_t s, ffi::AnyBuffer z, ffi::Result<ffi::AnyBuffer> out) {
    const char* K = "dlconv_softmax";
    int64_t R, C;
    DLCONV_FFI_TRY(softmax_buffers(K, z, *out, &R, &C));
    if (R * C == 0) return ffi::Error::Success();
    return guarded(K, [&] { dlconv::cuda::softmax(R, C, in_ptr(z), out_ptr(out), s); });
}

ffi::Error activation_backward(cudaStream_t s, ffi::AnyBuffer dy, ffi::AnyBuffer y, ffi::Result<ffi::AnyBuffer> dz,
                               int64_t act) {
    const char* K = "dlconv_activation_backward";
    DLCONV_FFI_TRY(check_activation(K, act, SOFTMAX));
    int64_t rows, cols;
    DLCONV_FFI_TRY(activation_backward_buffers(K, act, dy, y, *dz, &rows, &cols));
    if (rows * cols == 0) return ffi::Error::Success();
    return guarded(K, [&] {
        dlconv::cuda::activation_backward(rows, cols, in_ptr(dy), in_ptr(y), int(act), out_ptr(dz), s);
    });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaConv2dForward, conv_forward, sig::conv2d_forward(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaConv2dBackwardData, conv_backward_data,
                              sig::conv2d_backward_data(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaConv2dBackwardFilter, conv_backward_filter,
                              sig::conv2d_backward_filter(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaDenseForward, dense_forward, sig::dense_forward(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaDenseBackward, dense_backward, sig::dense_backward(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaSoftmax, softmax, sig::softmax(cuda_bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DlconvCudaActivationBackward, activation_backward,
                              sig::activation_backward(cuda_bind()));

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& cuda_handlers() {
    static const std::vector<std::pair<const char*, void*>> table = {
        {"dlconv_conv2d_forward", reinterpret_cast<void*>(DlconvCudaConv2dForward)},
        {"dlconv_conv2d_backward_data", reinterpret_cast<void*>(DlconvCudaConv2dBackwardData)},
        {"dlconv_conv2d_backward_filter", reinterpret_cast<void*>(DlconvCudaConv2dBackwardFilter)},
        {"dlconv_dense_forward", reinterpret_cast<void*>(DlconvCudaDenseForward)},
        {"dlconv_dense_backward", reinterpret_cast<void*>(DlconvCudaDenseBackward)},
        {"dlconv_softmax", reinterpret_cast<void*>(DlconvCudaSoftmax)},
        {"dlconv_activation_backward", reinterpret_cast<void*>(DlconvCudaActivationBackward)},
    };
    return table;
}

}  // namespace xffi
}  // namespace dlconv
