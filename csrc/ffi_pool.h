// ffi_pool.h — the max pool's XLA FFI handler table (ffi_pool.cpp), exported to Python by
// bind_cpu.cpp's xla_ffi_pool_handlers() for jax.ffi.register_ffi_target(..., platform="cpu"),
// and the kernel runner of ffi_cpu.cpp that those handlers share with the conv/dense ones.
#pragma once

#include <functional>
#include <utility>
#include <vector>

namespace dlconv {
namespace xffi {

const std::vector<std::pair<const char*, void*>>& pool_handlers();

}  // namespace xffi
}  // namespace dlconv
