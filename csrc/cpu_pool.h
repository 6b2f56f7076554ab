// cpu_pool.h — entry points of the C++ CPU 2-D max pool (cpu_pool.cpp), NHWC.
//
// The geometry is dlconv.shapes.pool_geometry's record: a ConvGeometry with groups = in_c =
// filters (one window per channel), k_h x k_w the pool, dilation 1, TensorFlow's "same" split.
// Each entry point re-checks it (check_pool_geometry) and throws std::invalid_argument naming
// the field; the callers (bind_cpu.cpp, ffi_pool.cpp) check the buffers' sizes against it.
//
// Rules (TensorFlow's CPU max pool and its gradient, measured; dlconv.reference documents them):
//   y[n,oh,ow,c]   = max(lowest float32, max of the window's non-NaN members)
//   arg[n,oh,ow,c] = ih*W + iw of the window's first member (row-major kh, kw), replaced by a
//                    later member only when that one is strictly greater (ties: the first)
//   dx             = Σ over outputs of dy at their arg (overlapping windows add up)
// where the window of (oh, ow) is every in-bounds (ih, iw) = (oh*stride_h - pad_top + kh,
// ow*stride_w - pad_left + kw), 0 <= kh < k_h, 0 <= kw < k_w (padding is not a member).
#pragma once

#include <cstdint>

#include "geometry.h"

namespace dlconv {
namespace cpu {

// Throws std::invalid_argument unless g is a pool record (see above) whose positions fit int32.
void check_pool_geometry(const ConvGeometry& g, const char* kernel);

// y[N,OH,OW,C] (and, when arg is not null, arg[N,OH,OW,C] int32) from x[N,H,W,C].
void max_pool2d_forward(const ConvGeometry& g, const float* x, float* y, int32_t* arg);

// dx[N,H,W,C] from dy[N,OH,OW,C] and the forward's arg (a gather: every dx element is written).
void max_pool2d_backward_argmax(const ConvGeometry& g, const float* dy, const int32_t* arg, float* dx);

// The same two passes with a "local" arg: uint8 arg[N,OH,OW,C] = the chosen member's window tap
// kh*k_w + kw (same rule; a quarter of the int32 index's memory traffic), plus
// LOCAL_NOT_POSITIVE when that member is not > 0 (<= 0 or NaN).  The backward with relu = true
// drops those entries: dx * relu'(x) for x = a relu's output (its derivative where x > 0, as
// the conv kernels' epilogue and TensorFlow's ReluGrad take it).  Pools of more than
// MAX_LOCAL_TAPS taps throw std::invalid_argument.  Used by the TensorFlow op (tf_ops.cpp).
constexpr int64_t MAX_LOCAL_TAPS = 128;
constexpr int32_t LOCAL_NOT_POSITIVE = 128;
void max_pool2d_forward_local(const ConvGeometry& g, const float* x, float* y, uint8_t* arg);
void max_pool2d_backward_local(const ConvGeometry& g, const float* dy, const uint8_t* arg, float* dx,
                               bool relu = false);

// dx[N,H,W,C] from x and dy, recomputing each window's arg (no stored index).
void max_pool2d_backward_recompute(const ConvGeometry& g, const float* x, const float* dy, float* dx);

}  // namespace cpu
}  // namespace dlconv
