// cuda_device.cu — device queries for dlconv._C_cuda (no kernels here).
//
// The extension links cudart statically and never links libcuda: on a machine without a
// driver every call below returns an error code, which we report instead of crashing.
#include <cuda_runtime.h>

#include <string>
#include <vector>

namespace dlconv {

// Names of the visible GPUs ("0: NVIDIA H200 (sm_90)"); `why` gets the reason when none.
std::vector<std::string> cuda_devices(std::string* why) {
    std::vector<std::string> out;
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        if (why) *why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return out;
    }
    for (int i = 0; i < n; ++i) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) == cudaSuccess)
            out.push_back(std::to_string(i) + ": " + p.name + " (sm_" + std::to_string(p.major) +
                          std::to_string(p.minor) + ")");
    }
    if (out.empty() && why) *why = "cudaGetDeviceCount returned 0 devices";
    return out;
}

int cuda_runtime_version() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
}

}  // namespace dlconv
