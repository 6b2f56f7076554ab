// driver.cpp — runs the CUDA C++ kernels, compiled for the CPU emulator (cuda_emu.h), on inputs
// written by tests/test_cuda_emu.py, through the same host launchers the Python binding calls
// (cuda_kernels.h), and writes the outputs back for the test to compare with dlconv.reference.
//
//   driver MANIFEST        one operation per line: `op key=value ...`; buffers are raw float32 files,
//                          `path@k` places the buffer k floats past a 256-byte aligned allocation
//                          (an offset, misaligned view as from a Python slice), `-` means null.
//     conv_fwd     g=<17 ints> variant= act= x= w= b= y=
//     conv_bwd_data g= dz= w= dx=
//     conv_bwd_filter g= x= dz= dw= db=
//     dense_fwd    M= K= N= act= x= w= b= y=
//     dense_bwd    M= K= N= act= x= w= dy= y= dx= dw= db=
//     softmax      rows= cols= z= out=
//     act_bwd      rows= cols= act= dy= y= out=
//     force_v3_vec g= act= x= w= b= y=        (negative control: float4 path on any alignment)
//     interblock_race                          (negative control: a race between two blocks)
//     selftest     name= n= out=               (the emulator's own checks, selftest.cu)
//
// Each buffer is its own cudaMalloc of exactly its size (ASan redzones right behind it; an offset
// buffer's lead is poisoned when it covers whole 8-byte granules); outputs are pre-filled with NaN so
// an element no thread wrote is a mismatch.  Prints "ok <line>" per operation; any error exits 2,
// any sanitizer report exits with the sanitizer's code (halt_on_error).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_kernels.h"
#include "geometry.h"

namespace dlconv {
namespace cuda {
void emu_force_v3_vec(const ConvGeometry& g, const float* x, const float* w, const float* b, int act, float* y);
void emu_interblock_race(float* out);
}  // namespace cuda
}  // namespace dlconv
void emu_selftest(const std::string& name, float* out, size_t n);

namespace {

constexpr unsigned char NAN_FILL = 0xFF;  // every float made of 0xFF bytes is a NaN
constexpr size_t ASAN_GRANULE = 8;

struct Buf {
    float* base = nullptr;
    float* p = nullptr;
    size_t n = 0, offset = 0;
    std::string path;
};

void check(cudaError_t e, const std::string& what) {
    if (e != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorName(e));
}

Buf alloc(size_t n, size_t offset) {
    Buf b;
    b.n = n;
    b.offset = offset;
    check(cudaMalloc(reinterpret_cast<void**>(&b.base), (n + offset) * sizeof(float)), "cudaMalloc");
    b.p = b.base + offset;
    if (offset && (offset * sizeof(float)) % ASAN_GRANULE == 0) DLCONV_EMU_POISON(b.base, offset * sizeof(float));
    return b;
}

void release(Buf& b) {
    if (!b.base) return;
    DLCONV_EMU_UNPOISON(b.base, b.offset * sizeof(float));
    check(cudaFree(b.base), "cudaFree");
    b = Buf{};
}

class Op {
  public:
    explicit Op(const std::string& line) {
        std::istringstream is(line);
        is >> name_;
        std::string tok;
        while (is >> tok) {
            const auto eq = tok.find('=');
            if (eq == std::string::npos) throw std::runtime_error("token without '=': " + tok);
            kv_[tok.substr(0, eq)] = tok.substr(eq + 1);
        }
    }
    ~Op() {
        for (auto& b : bufs_) release(b);
    }
    const std::string& name() const { return name_; }
    const std::string& get(const std::string& k) const {
        auto it = kv_.find(k);
        if (it == kv_.end()) throw std::runtime_error(name_ + ": missing " + k + "=");
        return it->second;
    }
    int64_t i(const std::string& k) const { return std::stoll(get(k)); }
    dlconv::ConvGeometry geometry() const {
        std::vector<int64_t> v;
        std::stringstream ss(get("g"));
        std::string t;
        while (std::getline(ss, t, ',')) v.push_back(std::stoll(t));
        if (v.size() != 17) throw std::runtime_error("g= needs 17 ints, got " + std::to_string(v.size()));
        dlconv::ConvGeometry g{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7], v[8],
                               v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16]};
        dlconv::validate_geometry(g);
        return g;
    }
    // An input of exactly n floats read from its file (null for "-").
    const float* in(const std::string& k, int64_t n) {
        std::string path;
        size_t off = 0;
        if (!spec(k, &path, &off)) return nullptr;
        std::ifstream f(path, std::ios::binary | std::ios::ate);
        if (!f) throw std::runtime_error(name_ + ": cannot read " + path);
        const auto bytes = int64_t(f.tellg());
        if (bytes != n * int64_t(sizeof(float)))
            throw std::runtime_error(name_ + ": " + k + " has " + std::to_string(bytes / 4) + " floats, needs " +
                                     std::to_string(n));
        std::vector<float> host(static_cast<size_t>(n));
        f.seekg(0);
        f.read(reinterpret_cast<char*>(host.data()), bytes);
        Buf b = alloc(size_t(n), off);
        check(cudaMemcpy(b.p, host.data(), size_t(bytes), cudaMemcpyHostToDevice), "cudaMemcpy in");
        bufs_.push_back(b);
        return b.p;
    }
    // An output of n floats, NaN-filled, written to its file by finish() (null for "-").
    float* out(const std::string& k, int64_t n) {
        std::string path;
        size_t off = 0;
        if (!spec(k, &path, &off)) return nullptr;
        Buf b = alloc(size_t(n), off);
        b.path = path;
        std::vector<unsigned char> fill(size_t(n) * sizeof(float), NAN_FILL);
        check(cudaMemcpy(b.p, fill.data(), fill.size(), cudaMemcpyHostToDevice), "cudaMemcpy fill");
        bufs_.push_back(b);
        return b.p;
    }
    void finish() {
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        for (auto& b : bufs_) {
            if (b.path.empty()) continue;
            std::vector<float> host(b.n);
            check(cudaMemcpy(host.data(), b.p, b.n * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy out");
            std::ofstream f(b.path, std::ios::binary);
            f.write(reinterpret_cast<const char*>(host.data()), std::streamsize(b.n * sizeof(float)));
            if (!f) throw std::runtime_error(name_ + ": cannot write " + b.path);
        }
    }
    cudaStream_t stream() const { return stream_; }
    void set_stream(cudaStream_t s) { stream_ = s; }

  private:
    bool spec(const std::string& k, std::string* path, size_t* off) const {
        const std::string& v = get(k);
        if (v == "-") return false;
        const auto at = v.rfind('@');
        *path = at == std::string::npos ? v : v.substr(0, at);
        *off = at == std::string::npos ? 0 : size_t(std::stoul(v.substr(at + 1)));
        return true;
    }
    std::string name_;
    std::map<std::string, std::string> kv_;
    std::vector<Buf> bufs_;
    cudaStream_t stream_ = nullptr;
};

void run(Op& op) {
    namespace C = dlconv::cuda;
    const std::string& n = op.name();
    const cudaStream_t s = op.stream();
    if (n == "conv_fwd" || n == "force_v3_vec") {
        const auto g = op.geometry();
        const float* x = op.in("x", g.x_size());
        const float* w = op.in("w", g.w_size());
        const float* b = op.in("b", g.filters);
        float* y = op.out("y", g.y_size());
        if (n == "conv_fwd")
            C::conv2d_forward(g, x, w, b, int(op.i("act")), y, int(op.i("variant")), s);
        else
            C::emu_force_v3_vec(g, x, w, b, int(op.i("act")), y);
    } else if (n == "conv_bwd_data") {
        const auto g = op.geometry();
        const float* dz = op.in("dz", g.y_size());
        const float* w = op.in("w", g.w_size());
        C::conv2d_backward_data(g, dz, w, op.out("dx", g.x_size()), s);
    } else if (n == "conv_bwd_filter") {
        const auto g = op.geometry();
        const float* x = op.in("x", g.x_size());
        const float* dz = op.in("dz", g.y_size());
        float* dw = op.out("dw", g.w_size());
        C::conv2d_backward_filter(g, x, dz, dw, op.out("db", g.filters), s);
    } else if (n == "dense_fwd") {
        const int64_t M = op.i("M"), K = op.i("K"), N = op.i("N");
        const float* x = op.in("x", M * K);
        const float* w = op.in("w", K * N);
        const float* b = op.in("b", N);
        C::dense_forward(M, K, N, x, w, b, int(op.i("act")), op.out("y", M * N), s);
    } else if (n == "dense_bwd") {
        const int64_t M = op.i("M"), K = op.i("K"), N = op.i("N");
        const float* x = op.in("x", M * K);
        const float* w = op.in("w", K * N);
        const float* dy = op.in("dy", M * N);
        const float* y = op.in("y", M * N);
        float* dx = op.out("dx", M * K);
        float* dw = op.out("dw", K * N);
        C::dense_backward(M, K, N, x, w, dy, y, int(op.i("act")), dx, dw, op.out("db", N), s);
    } else if (n == "softmax") {
        const int64_t r = op.i("rows"), c = op.i("cols");
        const float* z = op.in("z", r * c);
        C::softmax(r, c, z, op.out("out", r * c), s);
    } else if (n == "act_bwd") {
        const int64_t r = op.i("rows"), c = op.i("cols");
        const float* dy = op.in("dy", r * c);
        const float* y = op.in("y", r * c);
        C::activation_backward(r, c, dy, y, int(op.i("act")), op.out("out", r * c), s);
    } else if (n == "interblock_race") {
        float* out = nullptr;
        check(cudaMalloc(reinterpret_cast<void**>(&out), 2 * sizeof(float)), "cudaMalloc");
        check(cudaMemset(out, 0, 2 * sizeof(float)), "cudaMemset");
        C::emu_interblock_race(out);
        float v[2] = {0.f, 0.f};
        check(cudaMemcpy(v, out, sizeof v, cudaMemcpyDeviceToHost), "cudaMemcpy");
        check(cudaFree(out), "cudaFree");
        std::printf("interblock_race sum %g flag %g\n", double(v[0]), double(v[1]));
    } else if (n == "selftest") {
        const int64_t count = op.i("n");
        emu_selftest(op.get("name"), op.out("out", count), size_t(count));
    } else {
        throw std::runtime_error("unknown operation " + n);
    }
    op.finish();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MANIFEST\n", argv[0]);
        return 2;
    }
    std::ifstream f(argv[1]);
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    // Every launch goes to a non-blocking stream of its own, as the Python side's are.
    cudaStream_t stream = nullptr;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    std::string line;
    int lineno = 0;
    while (std::getline(f, line)) {
        ++lineno;
        if (line.empty() || line[0] == '#') continue;
        try {
            Op op(line);
            op.set_stream(stream);
            run(op);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "driver: line %d: %s\n", lineno, e.what());
            return 2;
        }
        std::printf("ok %d\n", lineno);
        std::fflush(stdout);
    }
    cudaStreamDestroy(stream);
    return 0;
}
