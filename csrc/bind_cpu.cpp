// bind_cpu.cpp — pybind11 module dlconv._C: the C++ CPU kernels.
#include <pybind11/pybind11.h>

#include <string>

#include "geometry.h"

namespace py = pybind11;

static py::dict build_info() {
    py::dict d;
#if defined(DLCONV_HAVE_AVX512)
    d["simd"] = "avx512f+avx2+fma";
#elif defined(DLCONV_HAVE_AVX2)
    d["simd"] = "avx2+fma";
#else
    d["simd"] = "scalar";
#endif
#ifdef _OPENMP
    d["openmp"] = std::to_string(_OPENMP);
#else
    d["openmp"] = "no";
#endif
    d["compiler"] = __VERSION__;
    return d;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "dlconv C++ CPU kernels";
    m.def("build_info", &build_info, "How this extension was compiled (SIMD level, OpenMP).");
}
