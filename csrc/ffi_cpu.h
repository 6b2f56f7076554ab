// ffi_cpu.h — the XLA FFI handler table of ffi_cpu.cpp (no XLA header needed to read it):
// target name → handler (an XLA_FFI_Handler*), which bind_cpu.cpp exports to Python as
// PyCapsules for jax.ffi.register_ffi_target(name, capsule, platform="cpu").
#pragma once

#include <utility>
#include <vector>

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& cpu_handlers();

}  // namespace xffi
}  // namespace dlconv
