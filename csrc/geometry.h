// geometry.h — the resolved convolution geometry, as a plain struct.
//
// Mirror of dlconv.shapes.ConvGeometry: same fields, same order (ConvGeometry.FIELDS).
// Python resolves it once (dlconv/shapes.py owns every formula); C++ never re-derives
// a pad or an output size.  It only *checks* that the record is self-consistent and
// that each buffer it is handed has exactly the size the record implies, because C++
// never trusts its caller.
#pragma once

#include <algorithm>
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
    const int64_t pads[4] = {g.pad_top, g.pad_bottom, g.pad_left, g.pad_right};
    const char* pad_names[4] = {"pad_top", "pad_bottom", "pad_left", "pad_right"};
    for (int i = 0; i < 4; ++i)
        if (pads[i] < 0) fail(std::string(pad_names[i]) + " = " + std::to_string(pads[i]) + " < 0");
    if (g.groups < 1 || g.in_c % g.groups != 0 || g.filters % g.groups != 0)
        fail("groups must be >= 1 and divide in_c and filters");
    const int64_t keh = (g.k_h - 1) * g.dil_h + 1, kew = (g.k_w - 1) * g.dil_w + 1;
    const int64_t ph = g.in_h + g.pad_top + g.pad_bottom, pw = g.in_w + g.pad_left + g.pad_right;
    if (keh > ph || kew > pw) fail("kernel larger than padded input");
    if (g.out_h != (ph - keh) / g.stride_h + 1 || g.out_w != (pw - kew) / g.stride_w + 1)
        fail("out_h/out_w do not match the other fields");
}

// ---------------------------------------------------------------------------- backward-data geometry
// Mirror of dlconv.shapes.transposed_axis / transposed_geometry (the formula and its derivation
// are documented there; tests/test_cpu_conv_stride.py checks that both give the same records).
// Backward-data of g, sub-pixel phase (phase_h, phase_w), is the stride-1 forward convolution
// `f` of dz into the dx pixels [:, phase_h::stride_h, phase_w::stride_w, :] with the sub-filter
//   wf[j, i, k, c] = w[tap_last_h - j*tap_step_h, tap_last_w - i*tap_step_w, c, k];
// f's pads may be negative (a crop of dz), f.k_h == 0 or f.k_w == 0 means no tap reaches the
// phase (those dx pixels are zero).
struct TransposedAxis {
    int64_t taps, tap_last, tap_step, dil, pad_before, pad_after, rows;
};

inline int64_t gcd64(int64_t a, int64_t b) {
    while (b) { const int64_t t = a % b; a = b; b = t; }
    return a;
}
// floor(a / b) for b > 0 (C++ division truncates toward zero).
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline TransposedAxis transposed_axis(int64_t n, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pad_before,
                                      int64_t phase) {
    if (phase < 0 || phase >= s)
        throw std::invalid_argument("dlconv C++ transposed_axis: phase must be in 0.." + std::to_string(s - 1) +
                                    " (stride " + std::to_string(s) + "), got " + std::to_string(phase));
    const int64_t g = gcd64(s, d), step = s / g;
    const int64_t rows = n > phase ? (n - phase + s - 1) / s : 0;
    int64_t kh0 = -1;
    for (int64_t kh = 0; kh < std::min(k, step); ++kh)
        if ((((phase + pad_before - kh * d) % s) + s) % s == 0) { kh0 = kh; break; }
    if (kh0 < 0) return {0, 0, step, 1, 0, 0, rows};
    const int64_t taps = (k - 1 - kh0) / step + 1, last = kh0 + (taps - 1) * step;
    const int64_t dil = taps == 1 ? 1 : d / g;
    const int64_t before = -floor_div(phase + pad_before - last * d, s);
    return {taps, last, step, dil, before, rows + (taps - 1) * dil - out - before, rows};
}

struct TransposedGeometry {
    ConvGeometry f;  // dz -> dx phase: in = (batch, out_h, out_w, filters), filters = in_c, k = taps
    int64_t phase_h, phase_w, tap_last_h, tap_last_w, tap_step_h, tap_step_w;
    bool empty() const { return f.k_h == 0 || f.k_w == 0 || f.out_h == 0 || f.out_w == 0; }
};

inline TransposedGeometry transposed_geometry(const ConvGeometry& g, int64_t phase_h = 0, int64_t phase_w = 0) {
    const TransposedAxis h = transposed_axis(g.in_h, g.out_h, g.k_h, g.stride_h, g.dil_h, g.pad_top, phase_h);
    const TransposedAxis w = transposed_axis(g.in_w, g.out_w, g.k_w, g.stride_w, g.dil_w, g.pad_left, phase_w);
    TransposedGeometry t;
    t.f = ConvGeometry{g.batch, g.out_h, g.out_w, g.filters, g.in_c, h.taps, w.taps, 1, 1, h.dil, w.dil,
                       h.pad_before, h.pad_after, w.pad_before, w.pad_after, h.rows, w.rows};
    t.phase_h = phase_h; t.phase_w = phase_w;
    t.tap_last_h = h.tap_last; t.tap_last_w = w.tap_last;
    t.tap_step_h = h.tap_step; t.tap_step_w = w.tap_step;
    return t;
}

inline void check_size(const char* kernel, const char* name, int64_t got, int64_t expected) {
    if (got != expected)
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": buffer " + name + " has " +
                                    std::to_string(got) + " elements, geometry needs " +
                                    std::to_string(expected));
}

}  // namespace dlconv
