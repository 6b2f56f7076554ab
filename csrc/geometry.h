// geometry.h — the resolved convolution geometry, as a plain struct.
//
// Mirror of dlconv.shapes.ConvGeometry: same fields, same order (ConvGeometry.FIELDS).
// Python resolves it once (dlconv/shapes.py owns every formula); C++ never re-derives
// a pad or an output size.  It only *checks* that the record is self-consistent and
// that each buffer it is handed has exactly the size the record implies, because C++
// never trusts its caller.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dlconv {

// Geometry fields beyond this are refused before any product is formed (no int64 overflow).
constexpr int64_t MAX_FIELD = int64_t(1) << 31;
// Number of fields of the record (ConvGeometry.FIELDS).  A record of the first 17 fields (no
// `groups`) is accepted too and means groups = 1.
constexpr int GEOMETRY_FIELDS = 18;
constexpr int GEOMETRY_FIELDS_UNGROUPED = 17;

struct ConvGeometry {
    int64_t batch, in_h, in_w, in_c, filters;
    int64_t k_h, k_w, stride_h, stride_w, dil_h, dil_w;
    int64_t pad_top, pad_bottom, pad_left, pad_right;
    int64_t out_h, out_w;
    // Grouped convolution: filter k reads input channels [(k / group_filters())·group_in_c(), +group_in_c());
    // w is (k_h, k_w, in_c / groups, filters).  Last, defaulted: 17-value initialisers mean groups = 1.
    int64_t groups = 1;

    int64_t group_in_c() const { return in_c / groups; }
    int64_t group_filters() const { return filters / groups; }
    int64_t x_size() const { return batch * in_h * in_w * in_c; }
    int64_t w_size() const { return k_h * k_w * group_in_c() * filters; }
    int64_t y_size() const { return batch * out_h * out_w * filters; }
};

// Element-wise activations fused into kernel epilogues (same codes as dlconv/activations.py).
enum Activation : int { ACT_LINEAR = 0, ACT_RELU = 1, ACT_SIGMOID = 2, ACT_TANH = 3 };

inline std::string geometry_str(const ConvGeometry& g) {
    return "x(" + std::to_string(g.batch) + "," + std::to_string(g.in_h) + "," + std::to_string(g.in_w) +
           "," + std::to_string(g.in_c) + ") w(" + std::to_string(g.k_h) + "," + std::to_string(g.k_w) + "," +
           std::to_string(g.groups > 0 ? g.in_c / g.groups : g.in_c) + "," + std::to_string(g.filters) + ") y(" +
           std::to_string(g.batch) + "," + std::to_string(g.out_h) + "," + std::to_string(g.out_w) + "," +
           std::to_string(g.filters) + ")" + (g.groups != 1 ? " groups " + std::to_string(g.groups) : "");
}

// Throws std::invalid_argument (→ Python ValueError) when the record is not a valid
// convolution geometry: the same rules as dlconv.shapes, re-checked, not re-derived.
inline void validate_geometry(const ConvGeometry& g) {
    auto fail = [&](const std::string& what) {
        throw std::invalid_argument("dlconv C++: invalid geometry (" + what + "): " + geometry_str(g));
    };
    if (g.batch < 0) fail("batch < 0");
    if (g.in_h < 1 || g.in_w < 1 || g.in_c < 1) fail("input size < 1");
    if (g.filters < 1 || g.k_h < 1 || g.k_w < 1) fail("filters or kernel size < 1");
    if (g.stride_h < 1 || g.stride_w < 1) fail("stride < 1");
    if (g.dil_h < 1 || g.dil_w < 1) fail("dilation < 1");
    if (g.pad_top < 0 || g.pad_bottom < 0 || g.pad_left < 0 || g.pad_right < 0) fail("negative padding");
    if (g.groups < 1 || g.in_c % g.groups != 0 || g.filters % g.groups != 0)
        fail("groups must be >= 1 and divide in_c and filters");
    const int64_t keh = (g.k_h - 1) * g.dil_h + 1, kew = (g.k_w - 1) * g.dil_w + 1;
    const int64_t ph = g.in_h + g.pad_top + g.pad_bottom, pw = g.in_w + g.pad_left + g.pad_right;
    if (keh > ph || kew > pw) fail("kernel larger than padded input");
    if (g.out_h != (ph - keh) / g.stride_h + 1 || g.out_w != (pw - kew) / g.stride_w + 1)
        fail("out_h/out_w do not match the other fields");
}

inline void check_size(const char* kernel, const char* name, int64_t got, int64_t expected) {
    if (got != expected)
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": buffer " + name + " has " +
                                    std::to_string(got) + " elements, geometry needs " +
                                    std::to_string(expected));
}

}  // namespace dlconv
