// ffi_cuda.h — the XLA FFI handler table of ffi_cuda.cpp (no XLA header needed to read it):
// target name → handler (an XLA_FFI_Handler*), which bind_cuda.cpp exports to Python as
// PyCapsules for jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#pragma once

#include <utility>
#include <vector>

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& cuda_handlers();

}  // namespace xffi
}  // namespace dlconv
