// conv_variants.h — the variant tables of the two C++ conv kernel sets, defined once.
//
// Names follow dlconv's one scheme {cpu,cuda}_v{N}_{technique}: v1 is the naive / portable
// baseline of its set, higher numbers add a technique, and a technique word means one thing in
// every kernel set (dlconv/variants.py lists the vocabulary; the Numba sets use the same words):
//   direct    the defining sum, one output (or one dx / dw element) per thread or loop iteration
//   packgemm  implicit GEMM on packed (gathered) A tiles with a portable C++ microkernel
//   regblock  implicit GEMM read in place, each thread owning a register block of outputs
//   subpixel  backward-data as one forward conv of dz per stride phase
//   winograd  Winograd minimal filtering
//   gemmtile  implicit GEMM on 16x16 shared-memory tiles, one output per thread
//
// Exported unchanged through pybind11: dlconv._C.CONV_VARIANTS (CPU; bind_cpu.cpp),
// dlconv._C_cuda.CONV_VARIANTS (CUDA; bind_cuda.cpp) and dlconv._C.CUDA_CONV_VARIANTS (the same
// CUDA table, so a build without CUDA can still name the CUDA variants).  dlconv.backends.
// cpp_backend, dlconv bench, dlconv info and dlconv.locate read them from there; the bindings and
// the XLA FFI handlers map a launcher code to a name, and reject an unknown code, through
// variant_by_code below.  `code` is the integer the forward launcher takes (cpu_kernels.h
// CpuConvVariant, cuda_kernels.h ConvVariant); NOT_SELECTABLE marks a path the dispatch picks by
// itself (a backward pass).  `aliases`: the names of the previous release, accepted with a
// DeprecationWarning for one release (comma-separated; empty when the name is unchanged).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace dlconv {

struct ConvVariantInfo {
    const char* name;         // {cpu,cuda}_v{N}_{technique}
    int number;               // N
    int code;                 // forward launcher code, or NOT_SELECTABLE
    const char* technique;
    const char* passes;       // comma-separated: forward, backward-data, backward-filter
    const char* applies;      // which geometries / builds it can run
    const char* default_rule; // when the dispatch picks it with no variant asked for
    const char* description;  // one line
    const char* source;       // the file that implements it
    const char* aliases;      // previous names, comma-separated
};

constexpr int NOT_SELECTABLE = -1;

// C++ CPU (cpu_conv.cpp's dispatch; codes = cpu_kernels.h CpuConvVariant).  Grouped geometries
// (groups > 1) run cpu_conv_grouped.cpp whatever the variant.
inline constexpr ConvVariantInfo CPU_CONV_VARIANTS[] = {
    {"cpu_v1_packgemm", 1, 1, "packgemm", "forward,backward-data,backward-filter",
     "any geometry, every build",
     "the default for every pass in a build without AVX-512",
     "implicit GEMM: A tiles gathered from NHWC into a packed buffer, portable C++ microkernel",
     "cpu_conv.cpp + cpu_gemm.h", "cpu_v1_igemm"},
    {"cpu_v2_regblock", 2, 2, "regblock", "forward,backward-filter",
     "any geometry, AVX-512 builds",
     "forward and backward-filter when cpu_v3_winograd does not apply (and its non-finite fallback)",
     "pack-free implicit GEMM on NHWC/HWIO in place, up to 6 pixels x 64 filters in 24 zmm accumulators",
     "cpu_conv_direct.h", "cpu_v2_direct"},
    {"cpu_v2_subpixel", 2, NOT_SELECTABLE, "subpixel", "backward-data",
     "any geometry, AVX-512 builds",
     "backward-data when cpu_v3_winograd does not apply (and its non-finite fallback)",
     "dx as one cpu_v2_regblock forward of dz per stride phase (stride 1: one, flipped filter)",
     "cpu_conv_subpixel.h", ""},
    {"cpu_v3_winograd", 3, 3, "winograd", "forward,backward-data,backward-filter",
     "3x3 or 5x5 (square), stride 1, dilation 1, C >= 8, F >= 16, AVX-512 builds (backward-data: its stride-1 dz forward)",
     "every pass whose geometry it applies to; 3x3 backward passes take 4x4 output tiles unless the output is too small for them to pay, the forward 2x2 (cpu_conv_winograd.h tile_3x3)",
     "Winograd F(4x4, 3x3) / F(2x2, 3x3) and F(2x2, 5x5): 36, 16 or 36 transformed positions, one batched GEMM per position",
     "cpu_conv_winograd.h", ""},
};

// C++ CUDA (cuda_conv.cu; codes = cuda_kernels.h ConvVariant).  Grouped forwards run
// cuda_v1_direct whatever variant is asked.
inline constexpr ConvVariantInfo CUDA_CONV_VARIANTS[] = {
    {"cuda_v1_direct", 1, 1, "direct", "forward,backward-data,backward-filter",
     "any geometry (the only one for groups > 1)",
     "backward-data and backward-filter; forward of grouped geometries",
     "one thread per output element (forward, dx) or per dw element and pixel chunk (atomicAdd)",
     "cuda_conv.cu", "v1_direct"},
    {"cuda_v2_gemmtile", 2, 2, "gemmtile", "forward",
     "any geometry with groups = 1",
     "never (a step of the progression)",
     "implicit GEMM, 16x16 tiles of A (gathered) and w staged in shared memory, one output per thread",
     "cuda_conv.cu", "v2_smem_tiled"},
    {"cuda_v3_regblock", 3, 3, "regblock", "forward",
     "any geometry with groups = 1",
     "forward (groups = 1)",
     "implicit GEMM, 64x64 block tile, 4x4 register block per thread, BK=16 shared-memory slices, float4 loads",
     "cuda_conv.cu", "v3_implicit_gemm"},
};

template <size_t N>
constexpr size_t table_size(const ConvVariantInfo (&)[N]) { return N; }

// The names of a table, as "name (code), ..." for error messages (selectable entries only).
template <size_t N>
std::string variant_codes_str(const ConvVariantInfo (&table)[N]) {
    std::string out;
    for (size_t i = 0; i < N; ++i) {
        if (table[i].code == NOT_SELECTABLE) continue;
        if (!out.empty()) out += ", ";
        out += std::string(table[i].name) + " (" + std::to_string(table[i].code) + ")";
    }
    return out;
}

// The entry whose forward launcher code is `code`; std::invalid_argument (→ ValueError) naming the
// valid codes otherwise.  `allow_auto`: 0 means "the dispatch's default" and returns nullptr.
template <size_t N>
const ConvVariantInfo* variant_by_code(const ConvVariantInfo (&table)[N], int code, const char* kernel,
                                       bool allow_auto) {
    if (allow_auto && code == 0) return nullptr;
    for (size_t i = 0; i < N; ++i)
        if (table[i].code != NOT_SELECTABLE && table[i].code == code) return &table[i];
    throw std::invalid_argument(std::string("dlconv ") + kernel + ": variant must be one of " +
                                (allow_auto ? "0 (auto), " : "") + variant_codes_str(table) + ", got " +
                                std::to_string(code));
}

}  // namespace dlconv
