// driver.cpp — runs the CUDA C++ kernels, compiled for the CPU emulator (cuda_emu.h), on inputs
// written by tests/test_cuda_emu.py, through the same host launchers the Python binding calls
// (cuda_kernels.h), and writes the outputs back for the test to compare with dlconv.reference.
//
//   driver MANIFEST        one operation per line: `op key=value ...`; buffers are raw float32 files,
//                          `path@k` places the buffer k floats past a 256-byte aligned allocation
//                          (an offset, misaligned view as from a Python slice), `-` means null.
//     conv_fwd     g=<18 ints> variant= act= x= w= b= y=
//     conv_bwd_data g= dz= w= dx=
//     conv_bwd_filter g= x= dz= dw= db=
//     dense_fwd    M= K= N= act= x= w= b= y=
//     dense_bwd    M= K= N= act= x= w= dy= y= dx= dw= db=
//     softmax      rows= cols= z= out=
//     act_bwd      rows= cols= act= dy= y= out=
//     dense_fwd_threads M= K= N= act= x= w= b= y0= y1=   (two host threads, one stream, at once)
//     split_k_splits M= N= K= sms=            (prints the split-K rule's answer)
//     workspace_reuse                          (the scratch-buffer cache: reuse, growth, per stream/thread,
//                                               eviction; prints one "workspace <check> <0|1>" line each)
//     force_v3_vec g= act= x= w= b= y=        (negative control: float4 path on any alignment)
//   Any operation also takes  split_k=<n>  (the binding's _set_split_k override for this operation),
//   sms=<n>  (the SM count the device reports for it) and  ws=<floats>  (the launcher's workspace on
//   this stream is NaN-filled and everything past its first <floats> floats is ASan-poisoned for the
//   operation: a split-K partial written or read past splits x M x N is reported).
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
#include <thread>
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
        if (v.size() != 18 && v.size() != 17)
            throw std::runtime_error("g= needs 18 ints (ConvGeometry.as_tuple(); 17: groups = 1), got " +
                                     std::to_string(v.size()));
        dlconv::ConvGeometry g{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7], v[8],
                               v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16], v.size() == 18 ? v[17] : 1};
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
    bool has(const std::string& k) const { return kv_.count(k) != 0; }
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

size_t live_bytes(const void* p) {
    std::lock_guard<std::mutex> lk(dlconv_emu::allocs().mu);
    auto it = dlconv_emu::allocs().live.find(reinterpret_cast<uintptr_t>(p));
    return it == dlconv_emu::allocs().live.end() ? 0 : it->second;
}

size_t live_count() {
    std::lock_guard<std::mutex> lk(dlconv_emu::allocs().mu);
    return dlconv_emu::allocs().live.size();
}

// ws=<floats>: the workspace the launchers will get on this stream (the same buffer: same stream,
// same host thread, no growth), NaN-filled, its tail past `floats` poisoned until the operation ends.
class WorkspaceGuard {
  public:
    WorkspaceGuard(size_t floats, cudaStream_t s) : floats_(floats) {
        p_ = dlconv::cuda::workspace(floats, s, "driver ws=");
        bytes_ = live_bytes(p_);
        std::memset(p_, NAN_FILL, bytes_);
        DLCONV_EMU_POISON(reinterpret_cast<char*>(p_) + floats * sizeof(float), bytes_ - floats * sizeof(float));
    }
    // Throws when the operation replaced the buffer (it needed more than ws= said).
    void finish(cudaStream_t s) {
        float* now = dlconv::cuda::workspace(1, s, "driver ws=");
        if (now != p_ || live_bytes(p_) != bytes_)
            throw std::runtime_error("the workspace grew past ws=" + std::to_string(floats_));
        release();
    }
    ~WorkspaceGuard() { release(); }

  private:
    void release() {
        if (p_ && live_bytes(p_) == bytes_) DLCONV_EMU_UNPOISON(p_, bytes_);
        p_ = nullptr;
    }
    size_t floats_, bytes_ = 0;
    float* p_ = nullptr;
};

// The workspace cache of cuda_workspace.cu, checked from the outside (addresses and live allocations).
void workspace_reuse(cudaStream_t s1) {
    namespace C = dlconv::cuda;
    auto say = [](const char* what, bool ok) { std::printf("workspace %s %d\n", what, int(ok)); };
    cudaStream_t s2 = nullptr;
    check(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    float* a = C::workspace(100, s1, "workspace_reuse");
    say("reused_on_one_stream", C::workspace(200, s1, "workspace_reuse") == a);
    say("null_for_zero_floats", C::workspace(0, s1, "workspace_reuse") == nullptr);
    const size_t big = live_bytes(a) / sizeof(float) + 1;  // one float more than it holds
    float* g = C::workspace(big, s1, "workspace_reuse");
    say("grows_past_its_size", live_bytes(g) >= big * sizeof(float));
    say("kept_after_growth", C::workspace(100, s1, "workspace_reuse") == g);
    float* b = C::workspace(100, s2, "workspace_reuse");
    say("own_buffer_per_stream", b != g && live_bytes(b) > 0);
    float* t = nullptr;
    std::thread other([&] { t = C::workspace(100, s1, "workspace_reuse"); });
    other.join();
    say("own_buffer_per_host_thread", t != g && t != b && live_bytes(t) > 0);
    // Fill the cache: every new (stream, thread) past its capacity frees the least recently used buffer.
    std::vector<cudaStream_t> more(32);
    const size_t before = live_count();
    for (auto& s : more) {
        check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        C::workspace(100, s, "workspace_reuse");
    }
    const size_t grown = live_count() - before;
    say("bounded_by_eviction", grown > 0 && grown < more.size());
    std::printf("workspace cache_grew_by %zu for %zu streams\n", grown, more.size());
    for (auto& s : more) check(cudaStreamDestroy(s), "cudaStreamDestroy");
    check(cudaStreamDestroy(s2), "cudaStreamDestroy");
}

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
    } else if (n == "dense_fwd_threads") {
        // Two host threads enqueue the same dense forward on ONE stream at the same time: with
        // split-K each must get its own workspace (TSan reports the partials of two launches
        // colliding in one buffer), and both results must be right.
        const int64_t M = op.i("M"), K = op.i("K"), N = op.i("N");
        const float* x = op.in("x", M * K);
        const float* w = op.in("w", K * N);
        const float* b = op.in("b", N);
        float* y[2] = {op.out("y0", M * N), op.out("y1", M * N)};
        std::string err[2];
        std::vector<std::thread> ts;
        for (int t = 0; t < 2; ++t)
            ts.emplace_back([&, t] {
                try {
                    C::dense_forward(M, K, N, x, w, b, int(op.i("act")), y[t], s);
                } catch (const std::exception& e) {
                    err[t] = e.what();
                }
            });
        for (auto& t : ts) t.join();
        for (const auto& e : err)
            if (!e.empty()) throw std::runtime_error(e);
    } else if (n == "split_k_splits") {
        std::printf("split_k_splits %lld\n",
                    static_cast<long long>(C::split_k_splits(op.i("M"), op.i("N"), op.i("K"), op.i("sms"))));
    } else if (n == "workspace_reuse") {
        workspace_reuse(s);
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
            // per-operation knobs, reset whatever happens
            struct Knobs {
                ~Knobs() {
                    dlconv::cuda::set_split_k_override(0);
                    dlconv_emu_set_sm_count(0);
                }
            } knobs;
            if (op.has("split_k")) dlconv::cuda::set_split_k_override(int(op.i("split_k")));
            if (op.has("sms")) dlconv_emu_set_sm_count(int(op.i("sms")));
            if (op.has("ws")) {
                WorkspaceGuard guard(size_t(op.i("ws")), stream);
                run(op);
                guard.finish(stream);
            } else {
                run(op);
            }
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
