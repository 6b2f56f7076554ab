// host_heap.h — keep freed host memory on glibc's heap, once per process, for the bridges whose
// framework mallocs a step's large buffers anew on every step.
//
// Who calls it: the JAX bridge (ffi_cpu.cpp, when the handler table is first asked for: XLA:CPU
// mallocs one block for all of a run's temporaries, 63 MB for the MNIST CNN train step at batch
// 128) and the torch bridge (dlconv/bridges/torch.py at import, through dlconv._C.keep_heap():
// torch's CPU allocator is plain posix_memalign/free, so every stock op's output — the max pool,
// the dropout, the dense layers' gradients, Adam's temporaries — is a fresh malloc each step).
// TensorFlow's own allocator keeps its memory and never pays this.
//
// What it fixes: glibc serves a block above its mmap threshold (adaptive, at most 32 MiB) with a
// fresh mmap and unmaps it on free, and trims the top of the heap (brk) once more than the trim
// threshold is free there.  Either way the next step's block comes back as fresh zero pages and
// the first write to each page takes a minor fault (4 KiB each: 2,300-4,600 per torch MNIST step,
// 15,400 per JAX one before this).  keep_freed_host_memory() sets both thresholds to
// HEAP_KEEP_BYTES, process-wide: blocks up to that size come from the heap and that much free
// memory at its top is kept for reuse instead of being returned (the price: up to 1 GiB of freed
// memory stays with the process).  DLCONV_KEEP_HEAP=0 (or its older name DLCONV_JAX_KEEP_HEAP=0;
// DLCONV_KEEP_HEAP wins when both are set) leaves malloc as it is.
//
// The limit (glibc's arenas, measured with glibc 2.36): the thresholds hold for the main arena,
// which serves the main thread.  Any other thread allocates from its own arena, made of heaps of at
// most HEAP_MAX_SIZE = 64 MiB (64-bit), and there (1) a block that does not fit in one heap
// (about 64 MiB less the heap's header) is always mmapped and unmapped on free, whatever
// M_MMAP_THRESHOLD says, and (2) a heap that a free leaves empty is unmapped too (heap_trim does
// not consult M_TRIM_THRESHOLD for that), so a block that needed a heap of its own refaults every
// time.  torch's eager step allocates on the caller's thread (the main one, in Keras' fit): its
// blocks are kept.  XLA:CPU runs a jitted program on one of its worker threads, so the JAX saving
// holds only while the worker's arena has room for the block in a heap that stays mapped: never
// for a block of 64 MiB or more, and not reliably below it (tests/test_heap.py).
#pragma once

#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace dlconv {
namespace heap {

// Blocks up to this size come from (and go back to) the heap, and this much free memory at its top
// is kept: 16x the MNIST CNN step's largest block (XLA's 63 MB temporary block at batch 128), so
// steps of larger batches and models stay on the heap too; beyond it a fresh mapping's faults are
// small next to the work on a buffer that size.
constexpr int HEAP_KEEP_BYTES = 1 << 30;

// The environment switch and its older, JAX-only name (still honoured).
constexpr const char* KEEP_ENV = "DLCONV_KEEP_HEAP";
constexpr const char* KEEP_ENV_ALIAS = "DLCONV_JAX_KEEP_HEAP";

struct KeepStatus {
    bool kept;          // both thresholds were taken
    const char* why;    // what happened, for dlconv info / the tests
};

inline KeepStatus apply_keep() {
    const char* e = std::getenv(KEEP_ENV);
    const char* name = KEEP_ENV;
    if (e == nullptr) {
        e = std::getenv(KEEP_ENV_ALIAS);
        name = KEEP_ENV_ALIAS;
    }
    if (e != nullptr && e[0] == '0') {
        return {false, std::strcmp(name, KEEP_ENV) == 0 ? "DLCONV_KEEP_HEAP=0: glibc's defaults"
                                                        : "DLCONV_JAX_KEEP_HEAP=0: glibc's defaults"};
    }
#if defined(__GLIBC__)
    if (mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES) == 1 && mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES) == 1) {
        return {true, "glibc's mmap and trim thresholds raised to 1 GiB"};
    }
    return {false, "glibc refused the thresholds (mallopt returned 0)"};
#else
    return {false, "not glibc: malloc left as it is"};
#endif
}

// The settings, applied on the first call only (thread-safe: a function-local static); every later
// call returns what the first one did.
inline const KeepStatus& keep_freed_host_memory() {
    static const KeepStatus status = apply_keep();
    return status;
}

}  // namespace heap
}  // namespace dlconv
