// cuda_runtime.h of the CPU emulator: the kernels' `#include <cuda_runtime.h>` lands here when
// csrc/emu/include is on the include path (csrc/emu/build.py puts it there).
#pragma once
#include "../cuda_emu.h"
