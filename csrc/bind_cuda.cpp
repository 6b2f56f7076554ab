// bind_cuda.cpp — pybind11 module dlconv._C_cuda: the CUDA C++ kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "geometry.h"

namespace py = pybind11;

namespace dlconv {
std::vector<std::string> cuda_devices(std::string* why);
int cuda_runtime_version();
}  // namespace dlconv

static py::dict build_info() {
    py::dict d;
    d["archs"] = DLCONV_CUDA_ARCHS;
    int v = dlconv::cuda_runtime_version();
    d["cudart"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10) + " (static)";
    return d;
}

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "dlconv CUDA C++ kernels";
    m.def("build_info", &build_info, "How this extension was compiled (architectures, cudart).");
    m.def("devices", [] {
        std::string why;
        auto d = dlconv::cuda_devices(&why);
        return d;
    }, "GPUs visible to the CUDA runtime (empty when there is no driver or GPU).");
    m.def("devices_why", [] {
        std::string why;
        dlconv::cuda_devices(&why);
        return why;
    }, "Why no GPU is visible (empty string when some are).");
}
