// cpu_conv_grouped.h — grouped and depthwise 2-D convolution on the CPU (cpu_conv_grouped.cpp).
// cpu_conv.cpp's entry points send every geometry with groups != 1 here.
#pragma once

#include "geometry.h"

namespace dlconv {
namespace cpu {
namespace grouped {

void conv_forward(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y);
void conv_backward_data(const ConvGeometry& g, const float* dz, const float* w, float* dx, const float* y, int act);
void conv_backward_filter(const ConvGeometry& g, const float* x, const float* dz, float* dw, float* db,
                          const float* y, int act);

}  // namespace grouped
}  // namespace cpu
}  // namespace dlconv
