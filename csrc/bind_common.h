// bind_common.h — argument checks shared by dlconv._C and dlconv._C_cuda.
//
// C++ never trusts its caller: the geometry arrives as the 18-int tuple
// dlconv.shapes.ConvGeometry.as_tuple() and is re-validated; every buffer is checked against
// the shape that record implies before any kernel runs.  Failures raise std::invalid_argument
// (→ ValueError) or pybind11::type_error (→ TypeError) naming the kernel, the buffer and values.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "conv_variants.h"
#include "geometry.h"

namespace dlconv {
namespace bind {

namespace py = pybind11;

using ::dlconv::MAX_FIELD;
// Names of the 18 fields, in ConvGeometry.FIELDS order (dlconv/shapes.py), for error messages.
constexpr const char* GEOMETRY_FIELDS[18] = {"batch", "in_h", "in_w", "in_c", "filters", "k_h", "k_w",
                                             "stride_h", "stride_w", "dil_h", "dil_w", "pad_top",
                                             "pad_bottom", "pad_left", "pad_right", "out_h", "out_w",
                                             "groups"};

inline std::string shape_str(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + (s.size() == 1 ? ",)" : ")");
}

inline ConvGeometry geometry_from(const py::handle& obj, const char* kernel) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
        throw py::type_error(std::string("dlconv C++ ") + kernel +
                             ": geometry must be the 18-int tuple ConvGeometry.as_tuple() (or its first "
                             "17-int tuple, groups = 1)");
    auto seq = py::reinterpret_borrow<py::sequence>(obj);
    const size_t n = seq.size();
    if (n != size_t(::dlconv::GEOMETRY_FIELDS) && n != size_t(::dlconv::GEOMETRY_FIELDS_UNGROUPED))
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel +
                                    ": geometry must have 18 fields (or 17 fields: groups = 1), got " +
                                    std::to_string(n));
    int64_t v[18];
    v[17] = 1;
    for (size_t i = 0; i < n; ++i) {
        py::handle item = seq[i];
        if (!py::isinstance<py::int_>(item) || py::isinstance<py::bool_>(item))
            throw py::type_error(std::string("dlconv C++ ") + kernel + ": geometry field " + std::to_string(i) +
                                 " must be an int");
        v[i] = item.cast<int64_t>();
        if (v[i] < 0 || v[i] > MAX_FIELD)
            throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": geometry field " +
                                        std::to_string(i) + " (" + GEOMETRY_FIELDS[i] + ") = " +
                                        std::to_string(v[i]) + " is out of range 0.." + std::to_string(MAX_FIELD));
    }
    ConvGeometry g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8],
                   v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16], v[17]};
    validate_geometry(g);
    return g;
}

inline void check_activation(const char* kernel, int act, int max_code) {
    if (act < 0 || act > max_code)
        throw std::invalid_argument(std::string("dlconv C++ ") + kernel + ": activation code must be 0.." +
                                    std::to_string(max_code) + " (linear, relu, sigmoid, tanh" +
                                    (max_code > 3 ? ", softmax" : "") + "), got " + std::to_string(act));
}

// A variant table of conv_variants.h as Python data: a tuple of dicts with the struct's fields
// (passes and aliases split into tuples), the one table cpp_backend, bench, info and locate read.
template <size_t N>
py::tuple variants_to_py(const ConvVariantInfo (&table)[N]) {
    auto split = [](const char* s) {
        py::list out;
        std::string cur;
        for (const char* p = s; ; ++p) {
            if (*p == ',' || *p == '\0') {
                if (!cur.empty()) out.append(cur);
                cur.clear();
                if (*p == '\0') break;
            } else if (*p != ' ') {
                cur += *p;
            }
        }
        return py::tuple(out);
    };
    py::list rows;
    for (size_t i = 0; i < N; ++i) {
        const ConvVariantInfo& v = table[i];
        py::dict d;
        d["name"] = v.name;
        d["number"] = v.number;
        d["code"] = v.code;
        d["technique"] = v.technique;
        d["passes"] = split(v.passes);
        d["applies"] = v.applies;
        d["default"] = v.default_rule;
        d["description"] = v.description;
        d["source"] = v.source;
        d["aliases"] = split(v.aliases);
        rows.append(d);
    }
    return py::tuple(rows);
}

}  // namespace bind
}  // namespace dlconv
