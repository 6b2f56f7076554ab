"""The CUDA C++ kernels (csrc/*.cu) executed on the CPU, under sanitizers, against the NumPy reference.

csrc/emu/build.py rewrites the kernel sources mechanically (launches, ``__shared__``, barriers) and
compiles them with g++ against the project's CUDA-runtime stand-in (csrc/emu/cuda_emu.h: one thread
per CUDA thread, real barriers, per-block shared memory, warp shuffles, atomics) into a standalone
driver, once per sanitizer set (cached by source hash under build/cuda_emu):

* ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer, no recovery — every kernel and variant;
* ``tsan``: ThreadSanitizer — the barrier/shared-memory kernels, the atomics, and one of each
  grid-stride kernel (blocks share no happens-before edge, so races between blocks show too).

The dense GEMM's split-K path (cuda_dense.cu, cuda_workspace.cu) runs by the rule (long K on few
tiles, the SM count set per call), forced through the binding's override, ragged, clamped to K, for
the forward, dx and dw, each workspace NaN-filled and ASan-poisoned past splits x M x N floats; the
traced grid z of each GEMM launch is checked, the workspace cache (reuse, growth, one per stream and
host thread, eviction) and two host threads splitting on one stream at once are run under both sets.

Each run must exit 0 with no sanitizer report, and every output must match dlconv.reference.
Negative controls prove the harness can fail: every ``__syncthreads`` of every kernel, dropped one
at a time, is reported by TSan as a data race; a float4 load forced onto a misaligned input is
reported by UBSan; a workspace guarded one float short is reported by ASan; two blocks (0 and 2
of 3) adding to one float without an atomic is reported by TSan.  The stand-in is checked too (selftest.cu: shuffles, shared memory, atomics, launch limits,
and the errors it must raise).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dlconv import reference as ref
from dlconv.shapes import conv_geometry

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "emu"
BUILD_DIR = pathlib.Path(os.environ.get("DLCONV_EMU_BUILD", ROOT / "build" / "cuda_emu"))
CXX = shutil.which(os.environ.get("CXX", "g++"))

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to build the emulated CUDA kernels")

ACTS = ("linear", "relu", "sigmoid", "tanh")
CODE = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3, "softmax": 4}
RTOL, ATOL = 1e-4, 1e-4
# Sanitizers stop at the first report and make the process fail (the drivers are built with
# -fno-sanitize-recover=all); LeakSanitizer checks that the driver frees what it allocates.
# The launchers' workspace cache lives as long as the process (as a CUDA context's allocations do):
# lsan.supp exempts exactly the allocations made in dlconv::cuda::workspace.
SAN_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:exitcode=23",
    "LSAN_OPTIONS": f"suppressions={EMU / 'lsan.supp'}",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=24",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}
REPORT = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer|"
                    r"dlconv_emu: ERROR")
TIMEOUT_S = 300


def _tol(k):
    """Absolute tolerance for a sum of k products of O(1) terms in float32."""
    return ATOL * max(1.0, np.sqrt(k))


def _load_build():
    spec = importlib.util.spec_from_file_location("dlconv_emu_build", EMU / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def drivers():
    build = _load_build()
    return {s: build.build(s, str(BUILD_DIR)) for s in ("asan", "tsan")}


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """One kernel call: a manifest line, its inputs, and the reference for each output."""
    id: str
    op: str
    params: dict
    inputs: dict          # name -> (array, offset in floats)
    outputs: dict         # name -> (reference array or None for "-", offset, atol)
    tsan: bool = False
    gemm_z: tuple = None  # when set: the K splits (grid z) of each gemm_tiled launch, in order

    def knobs(self, split_k=None, sms=None, ws=None):
        """The driver's per-operation knobs: forced splits, reported SM count, workspace guard."""
        for k, v in (("split_k", split_k), ("sms", sms), ("ws", ws)):
            if v is not None:
                self.params[k] = v
        return self

    def line(self, d: pathlib.Path) -> str:
        toks = [self.op] + [f"{k}={v}" for k, v in self.params.items()]
        for name, (a, off) in self.inputs.items():
            if a is None:
                toks.append(f"{name}=-")
                continue
            p = d / f"{self.id}.{name}.in"
            np.ascontiguousarray(a, np.float32).tofile(p)
            toks.append(f"{name}={p}@{off}" if off else f"{name}={p}")
        for name, (r, off, _) in self.outputs.items():
            toks.append(f"{name}=-" if r is None else (f"{name}={d / (self.id + '.' + name + '.out')}"
                                                       + (f"@{off}" if off else "")))
        return " ".join(toks)

    def check(self, d: pathlib.Path) -> None:
        for name, (r, _, atol) in self.outputs.items():
            if r is None:
                continue
            got = np.fromfile(d / f"{self.id}.{name}.out", np.float32).reshape(r.shape)
            np.testing.assert_allclose(got, r, rtol=RTOL, atol=atol, err_msg=f"{self.id}: {name}")


def _rand(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _gstr(g):
    return ",".join(str(v) for v in g.as_tuple())


def conv_forward_case(cid, g, variant, act, rng, bias=True, offsets=(0, 0, 0, 0), tsan=False, op="conv_fwd"):
    x, w = _rand(rng, g.x_shape), _rand(rng, g.w_shape)
    b = _rand(rng, (g.filters,)) if bias else None
    params = {"g": _gstr(g), "act": CODE[act]}
    if op == "conv_fwd":
        params["variant"] = variant
    return Case(cid, op, params, {"x": (x, offsets[0]), "w": (w, offsets[1]), "b": (b, offsets[2])},
                {"y": (ref.conv2d_forward(x, w, b, g, act), offsets[3], _tol(g.gemm_k))}, tsan)


def conv_backward_data_case(cid, g, rng, tsan=False):
    dz, w = _rand(rng, g.y_shape), _rand(rng, g.w_shape)
    return Case(cid, "conv_bwd_data", {"g": _gstr(g)}, {"dz": (dz, 0), "w": (w, 0)},
                {"dx": (ref.conv2d_backward_data(dz, w, g), 0, _tol(g.k_h * g.k_w * g.filters))}, tsan)


def conv_backward_filter_case(cid, g, rng, with_db=True, tsan=False):
    x, dz = _rand(rng, g.x_shape), _rand(rng, g.y_shape)
    dw, db = ref.conv2d_backward_filter(x, dz, g)
    return Case(cid, "conv_bwd_filter", {"g": _gstr(g)}, {"x": (x, 0), "dz": (dz, 0)},
                {"dw": (dw, 0, _tol(g.gemm_m)), "db": (db if with_db else None, 0, _tol(g.gemm_m))}, tsan)


def dense_forward_case(cid, M, K, N, act, rng, bias=True, tsan=False):
    x, w = _rand(rng, (M, K)), _rand(rng, (K, N))
    b = _rand(rng, (N,)) if bias else None
    return Case(cid, "dense_fwd", {"M": M, "K": K, "N": N, "act": CODE[act]},
                {"x": (x, 0), "w": (w, 0), "b": (b, 0)}, {"y": (ref.dense_forward(x, w, b, act), 0, _tol(K))}, tsan)


def dense_backward_case(cid, M, K, N, act, rng, want=("dx", "dw", "db"), tsan=False):
    x, w, b, dy = _rand(rng, (M, K)), _rand(rng, (K, N)), _rand(rng, (N,)), _rand(rng, (M, N))
    y = ref.dense_forward(x, w, b, act)
    dx, dw, db = ref.dense_backward(x, w, dy, y, act)
    return Case(cid, "dense_bwd", {"M": M, "K": K, "N": N, "act": CODE[act]},
                {"x": (x, 0), "w": (w, 0), "dy": (dy, 0), "y": (y if act != "linear" else None, 0)},
                {"dx": (dx if "dx" in want else None, 0, _tol(N)), "dw": (dw if "dw" in want else None, 0, _tol(M)),
                 "db": (db if "db" in want else None, 0, _tol(M))}, tsan)


def softmax_case(cid, rows, cols, rng, tsan=False):
    z = 3 * _rand(rng, (rows, cols))
    return Case(cid, "softmax", {"rows": rows, "cols": cols}, {"z": (z, 0)},
                {"out": (ref.softmax(z.astype(np.float64)).astype(np.float32), 0, ATOL)}, tsan)


def activation_backward_case(cid, rows, cols, act, rng, tsan=False):
    z = _rand(rng, (rows, cols))
    y = ref.activate(z.astype(np.float64), act).astype(np.float32)
    dy = _rand(rng, (rows, cols))
    return Case(cid, "act_bwd", {"rows": rows, "cols": cols, "act": CODE[act]}, {"dy": (dy, 0), "y": (y, 0)},
                {"out": (ref.activation_backward(dy, y, act).astype(np.float32), 0, _tol(cols))}, tsan)


# Split-K (cuda_dense.cu): the launcher's arithmetic, mirrored as the oracle of the traced grid z.
G_BM = G_BN = 64
G_BK = 16


def _launched_splits(M, N, K, forced=0, sms=132):
    """Grid z of gemm_tiled for C[M, N] with reduction length K (launch_gemm)."""
    splits = forced if forced > 0 else _rule(M, N, K, sms)
    splits = min(splits, K) if K > 0 else 1
    if splits <= 1:
        return 1
    k_len = -(-(-(-K // splits)) // G_BK) * G_BK
    return -(-K // k_len)


def _rule(M, N, K, sms):
    """split_k_splits (cuda_dense.cu), for the generated cases only; test_split_k_rule pins the C++ rule."""
    tiles = -(-M // G_BM) * -(-N // G_BN)
    if tiles == 0 or tiles >= sms or K < 2 * 16 * G_BK:
        return 1
    splits = min(-(-2 * sms // tiles), K // (16 * G_BK), 64)
    if splits * M * N > 1 << 24:
        splits = (1 << 24) // (M * N)
    return max(splits, 1)


def split_cases(rng):
    """Split-K dense forward, dx and dw: by the rule (long K on few tiles), forced through the same
    override as _C_cuda._set_split_k, ragged M/N/K, clamped to K, and the reduce over many blocks.
    ws= guards each workspace at exactly splits x M x N floats (ASan reports a partial past it)."""
    out = []

    def fwd(cid, M, K, N, act, forced=0, sms=None, bias=True, tsan=False):
        z = _launched_splits(M, N, K, forced, sms or 132)
        c = dense_forward_case(cid, M, K, N, act, rng, bias=bias, tsan=tsan)
        c.gemm_z = (z,)
        out.append(c.knobs(split_k=forced or None, sms=sms, ws=z * M * N if z > 1 else None))

    def bwd(cid, M, K, N, act, want, forced=0, tsan=False):
        zs, ws = [], 0
        if "dx" in want:  # dx[M, K], reduction over N
            zs.append(_launched_splits(M, K, N, forced))
            ws = max(ws, zs[-1] * M * K)
        if "dw" in want:  # dw[K, N], reduction over M
            zs.append(_launched_splits(K, N, M, forced))
            ws = max(ws, zs[-1] * K * N)
        c = dense_backward_case(cid, M, K, N, act, rng, want=want, tsan=tsan)
        c.gemm_z = tuple(zs)
        out.append(c.knobs(split_k=forced or None, ws=ws if max(zs) > 1 else None))

    fwd("splitk_fwd_rule", 5, 600, 70, "relu", tsan=True)            # 2 tiles on 132 SMs: 2 splits of 304
    fwd("splitk_fwd_rule_sms", 5, 1100, 70, "tanh", sms=4)           # 4 SMs: 4 splits
    fwd("splitk_fwd_full_gpu", 70, 600, 70, "linear", sms=2)         # 4 tiles fill 2 SMs: no split
    fwd("splitk_fwd_forced_ragged", 70, 75, 9, "sigmoid", forced=3, bias=False, tsan=True)  # ragged K split
    fwd("splitk_fwd_forced_clamped", 3, 20, 5, "relu", forced=64)   # 64 forced, K = 20: 2 splits
    fwd("splitk_reduce_blocks", 70, 40, 70, "linear", forced=2)     # 4900 outputs: 20 reduce blocks
    bwd("splitk_dx_rule", 5, 9, 600, "tanh", ("dx",))               # reduction over N = 600
    bwd("splitk_dw_rule", 600, 9, 7, "relu", ("dw",), tsan=True)    # reduction over the batch M = 600
    bwd("splitk_bwd_forced", 37, 20, 70, "sigmoid", ("dx", "dw", "db"), forced=5, tsan=True)
    return out


# Geometries: every forward path and edge, all small.
G_VEC = conv_geometry((2, 7, 6, 8), (3, 3, 8, 12), padding="same")            # C, F % 4 == 0: v3 float4 path
G_SCALAR = conv_geometry((3, 9, 7, 3), (3, 2, 3, 5), strides=(2, 1), dilation=(1, 2),
                         padding=((1, 2), (0, 3)))                              # C = 3: scalar path; asym pad
G_TILES = conv_geometry((2, 10, 10, 4), (3, 3, 4, 68))                          # 2x2 v3 tiles, ragged F and K
G_RAGGED = conv_geometry((1, 6, 5, 5), (2, 3, 5, 70), strides=2, padding="same")  # scalar, 2 ragged F tiles
G_CHUNKS = conv_geometry((2, 13, 12, 3), (2, 2, 3, 4))                          # 264 pixels: 2 bwd-filter chunks
# Grouped: each filter reads a channel-strided slice of x (offset (k // (F/G))·(C/G)).
G_GROUPED = conv_geometry((2, 9, 8, 6), (3, 2, 2, 9), strides=(2, 1), dilation=(1, 2),
                          padding=((2, 0), (1, 3)), groups=3)                    # G = 3, Cg = 2, Fg = 3
G_DEPTHWISE = conv_geometry((2, 12, 11, 5), (3, 3, 1, 10), padding="same", groups=5)  # G = C, multiplier 2,
#                                                                                 264 pixels: 2 bwd-filter chunks
V1, V2, V3 = 1, 2, 3


def all_cases():
    rng = np.random.default_rng(20261201)
    cases = []
    for v in (V1, V2, V3):
        for act in ACTS:
            cases.append(conv_forward_case(f"fwd_v{v}_{act}_vec", G_VEC, v, act, rng, tsan=act == "linear"))
            cases.append(conv_forward_case(f"fwd_v{v}_{act}_scalar", G_SCALAR, v, act, rng,
                                            tsan=v == V3 and act == "tanh"))
        cases.append(conv_forward_case(f"fwd_v{v}_tiles", G_TILES, v, "relu", rng, tsan=v == V3))
        cases.append(conv_forward_case(f"fwd_v{v}_ragged_nobias", G_RAGGED, v, "tanh", rng, bias=False,
                                       tsan=v == V3))
        # offset views: misaligned x, w, b and y (v3 must fall back to its scalar loads)
        cases.append(conv_forward_case(f"fwd_v{v}_offset", G_VEC, v, "sigmoid", rng, offsets=(1, 2, 3, 1),
                                       tsan=v == V3))
    # the float4 path forced by hand on aligned buffers: the control kernel itself is right
    cases.append(conv_forward_case("force_v3_vec_aligned", G_VEC, V3, "relu", rng, op="force_v3_vec"))
    for name, g in (("vec", G_VEC), ("scalar", G_SCALAR), ("tiles", G_TILES), ("ragged", G_RAGGED)):
        cases.append(conv_backward_data_case(f"bwd_data_{name}", g, rng, tsan=name == "scalar"))
    cases.append(conv_backward_filter_case("bwd_filter_vec", G_VEC, rng))
    cases.append(conv_backward_filter_case("bwd_filter_scalar_nodb", G_SCALAR, rng, with_db=False))
    cases.append(conv_backward_filter_case("bwd_filter_chunks", G_CHUNKS, rng, tsan=True))
    # grouped / depthwise: every variant asked (v2, v3 run cuda_v1_direct), both backward passes
    for name, g in (("grouped", G_GROUPED), ("depthwise", G_DEPTHWISE)):
        for v in (V1, V2, V3):
            cases.append(conv_forward_case(f"{name}_fwd_v{v}", g, v, "relu", rng, tsan=v == V1 and name == "grouped"))
        cases.append(conv_backward_data_case(f"{name}_bwd_data", g, rng, tsan=name == "grouped"))
        cases.append(conv_backward_filter_case(f"{name}_bwd_filter", g, rng, tsan=name == "depthwise"))
    for act in ACTS:
        cases.append(dense_forward_case(f"dense_fwd_{act}", 5, 37, 70, act, rng, tsan=act in ("linear", "relu")))
        cases.append(dense_backward_case(f"dense_bwd_{act}", 5, 37, 70, act, rng, tsan=act in ("linear", "tanh")))
    cases.append(dense_forward_case("dense_fwd_tall_nobias", 70, 16, 8, "relu", rng, bias=False))
    cases.append(dense_backward_case("dense_bwd_dx_only", 70, 20, 9, "sigmoid", rng, want=("dx",)))
    cases.append(dense_backward_case("dense_bwd_dw_only", 70, 20, 9, "relu", rng, want=("dw",)))
    cases.append(dense_backward_case("dense_bwd_db_only", 300, 3, 9, "linear", rng, want=("db",), tsan=True))
    cases.append(softmax_case("softmax_wide", 3, 300, rng, tsan=True))
    cases.append(softmax_case("softmax_narrow", 5, 7, rng))
    for act in ACTS:
        cases.append(activation_backward_case(f"act_bwd_{act}", 3, 300, act, rng, tsan=act == "sigmoid"))
    cases.append(activation_backward_case("act_bwd_softmax", 3, 300, "softmax", rng, tsan=True))
    for c in cases:  # the unsplit dense cases: K too short for the rule on 132 SMs
        if c.op == "dense_fwd":
            c.gemm_z = (_launched_splits(c.params["M"], c.params["N"], c.params["K"]),)
        elif c.op == "dense_bwd":
            M, K, N = c.params["M"], c.params["K"], c.params["N"]
            c.gemm_z = tuple(z for name, z in (("dx", _launched_splits(M, K, N)), ("dw", _launched_splits(K, N, M)))
                             if c.outputs[name][0] is not None)
    cases += split_cases(rng)
    return cases


CASES = all_cases()


def run_driver(exe, lines, d: pathlib.Path, extra_env=None):
    d.mkdir(parents=True, exist_ok=True)
    manifest = d / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, **SAN_ENV, **(extra_env or {}))
    r = subprocess.run([exe, str(manifest)], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if "unexpected memory mapping" in r.stderr and shutil.which("setarch"):
        # TSan of GCC 12 cannot start under high-entropy ASLR (newer kernels): run without ASLR
        r = subprocess.run(["setarch", os.uname().machine, "-R", exe, str(manifest)], capture_output=True,
                           text=True, env=env, timeout=TIMEOUT_S)
    return r


@dataclasses.dataclass
class Run:
    r: subprocess.CompletedProcess
    d: pathlib.Path
    launches: dict  # case id -> the "launch ..." lines its operation made (DLCONV_EMU_TRACE)


def _run_cases(exe, cases, d):
    r = run_driver(exe, [c.line(d) for c in cases], d, {"DLCONV_EMU_TRACE": "1"})
    per_op, cur = [], []
    for line in r.stdout.splitlines():
        if line.startswith("launch "):
            cur.append(line)
        elif line.startswith("ok "):
            per_op.append(cur)
            cur = []
    return Run(r, d, {c.id: ls for c, ls in zip(cases, per_op)})


def _kernel(line):
    return line.split()[1]


def _int_args(line):
    return line.split("args=", 1)[1].split()


# Every __global__ kernel of csrc/*.cu (not the emulator's own controls and self-tests).
KERNELS = sorted({m for src in (ROOT / "csrc").glob("*.cu") for m in re.findall(
    r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", src.read_text())})


@pytest.fixture(scope="session")
def asan_run(drivers, tmp_path_factory):
    return _run_cases(drivers["asan"], CASES, tmp_path_factory.mktemp("emu_asan"))


@pytest.fixture(scope="session")
def tsan_run(drivers, tmp_path_factory):
    return _run_cases(drivers["tsan"], [c for c in CASES if c.tsan], tmp_path_factory.mktemp("emu_tsan"))


def _report(stderr: str) -> str:
    """The first sanitizer / emulator report in stderr (or its tail when there is none)."""
    m = REPORT.search(stderr)
    return stderr[max(0, m.start() - 200):m.start() + 6000] if m else stderr[-6000:]


def _assert_clean(r, n_ops):
    assert r.returncode == 0 and not REPORT.search(r.stderr), f"exit {r.returncode}; stderr:\n{_report(r.stderr)}"
    assert r.stdout.count("ok ") == n_ops, r.stdout


# ----------------------------------------------------------------------------- clean runs
def test_coverage_of_the_case_table():
    """Every launcher, every variant with every activation, both v3 paths, offsets, dense modes."""
    ops = {c.op for c in CASES}
    assert ops == {"conv_fwd", "force_v3_vec", "conv_bwd_data", "conv_bwd_filter", "dense_fwd", "dense_bwd",
                   "softmax", "act_bwd"}
    fwd = {(c.params["variant"], c.params["act"]) for c in CASES if c.op == "conv_fwd"}
    assert fwd == {(v, CODE[a]) for v in (V1, V2, V3) for a in ACTS}
    assert {c.params["act"] for c in CASES if c.op == "act_bwd"} == set(range(5))
    assert G_VEC.in_c % 4 == 0 and G_VEC.filters % 4 == 0 and G_SCALAR.in_c % 4 != 0
    assert G_CHUNKS.gemm_m > 256  # more than one BWF_CHUNK: atomics across blocks
    # TSan: every shared-memory/barrier kernel (v2, v3 both paths, the GEMM in all three operand
    # layouts, both block reductions), the cross-block atomics, and each grid-stride kernel once.
    t = {c.id for c in CASES if c.tsan}
    assert {"fwd_v2_linear_vec", "fwd_v3_linear_vec", "fwd_v3_tanh_scalar", "fwd_v3_offset", "dense_fwd_linear",
            "dense_bwd_tanh", "softmax_wide", "act_bwd_softmax", "bwd_filter_chunks", "dense_bwd_db_only",
            "fwd_v1_linear_vec", "bwd_data_scalar", "act_bwd_sigmoid", "splitk_fwd_rule", "splitk_dw_rule",
            "splitk_bwd_forced"} <= t, t
    # split-K: by the rule and forced, forward, dx and dw, with and without a split
    z = {c.id: c.gemm_z for c in CASES if c.gemm_z}
    assert z["splitk_fwd_rule"] == (2,) and z["splitk_fwd_rule_sms"] == (4,) and z["splitk_fwd_full_gpu"] == (1,)
    assert z["splitk_fwd_forced_ragged"] == (3,) and z["splitk_fwd_forced_clamped"] == (2,)
    assert z["splitk_dx_rule"] == (2,) and z["splitk_dw_rule"] == (2,) and z["splitk_bwd_forced"] == (5, 3)
    assert all(set(c.gemm_z) == {1} for c in CASES if c.op.startswith("dense") and not c.id.startswith("splitk_")
               and c.gemm_z)  # the other dense cases take the unsplit path


def _gemm_launches(ls):
    """(grid z, workspace used) of each gemm_tiled launch, and the splitk_reduce launches' split counts."""
    gemm = [(int(x.split()[2].split("=")[1].split(",")[2]), _raw_args(x)[-1] == "*")
            for x in ls if _kernel(x) == "gemm_tiled"]
    reduce = [int(_int_args(x)[2]) for x in ls if _kernel(x) == "splitk_reduce"]
    return gemm, reduce


def _raw_args(line):
    return line.split("args=", 1)[1].split()


def test_split_k_launches_match(asan_run, tsan_run):
    """Each dense case launched gemm_tiled with the K splits expected (grid z), wrote partials to the
    workspace exactly when split, and reduced them with splitk_reduce over the same split count."""
    for run in (asan_run, tsan_run):
        for c in CASES:
            if c.gemm_z is None or c.id not in run.launches:
                continue
            gemm, reduce = _gemm_launches(run.launches[c.id])
            assert [z for z, _ in gemm] == list(c.gemm_z), (c.id, run.launches[c.id])
            assert [ws for _, ws in gemm] == [z > 1 for z in c.gemm_z], (c.id, run.launches[c.id])
            assert reduce == [z for z in c.gemm_z if z > 1], (c.id, run.launches[c.id])


def test_asan_ubsan_run_is_clean(asan_run):
    _assert_clean(asan_run.r, len(CASES))


def test_tsan_run_is_clean(tsan_run):
    _assert_clean(tsan_run.r, sum(c.tsan for c in CASES))


@pytest.mark.parametrize("run", ("asan_run", "tsan_run"))
def test_every_kernel_runs(request, run):
    """Each __global__ kernel of csrc/*.cu is launched by the case table, under both sanitizer sets
    (a kernel added to csrc without a case here fails this test)."""
    launched = {_kernel(line) for ls in request.getfixturevalue(run).launches.values() for line in ls}
    assert len(KERNELS) >= 10 and set(KERNELS) <= launched, sorted(set(KERNELS) - launched)


def test_grouped_forwards_run_v1_with_the_groups_field(asan_run, tsan_run):
    """A grouped geometry runs conv_fwd_v1_direct whichever variant is asked (v2/v3 tile the
    G = 1 GEMM), and its launches carry the groups field."""
    assert G_GROUPED.groups == 3 and G_DEPTHWISE.groups == G_DEPTHWISE.in_c == 5
    seen = 0
    for run in (asan_run, tsan_run):
        for cid, ls in run.launches.items():
            if cid.startswith(("grouped_fwd_", "depthwise_fwd_")):
                assert [_kernel(x) for x in ls] == ["conv_fwd_v1_direct"], (cid, ls)
                seen += 1
    assert seen >= 6


def test_v3_takes_the_float4_path_exactly_where_it_may(asan_run, tsan_run):
    """v3's last argument is its float4 switch: on for C, F % 4 == 0 and aligned buffers, off on a
    scalar geometry and on offset (misaligned) views."""
    for run in (asan_run, tsan_run):
        for cid, ls in run.launches.items():
            if not cid.startswith("fwd_v3_"):
                continue
            (line,) = [x for x in ls if _kernel(x) == "conv_fwd_v3_igemm"]
            want = "1" if cid.endswith("_vec") or cid == "fwd_v3_tiles" else "0"
            assert _int_args(line)[-1] == want, (cid, line)
    assert sum(c.id.startswith("fwd_v3_") for c in CASES) >= 8


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_asan_outputs_match_reference(asan_run, case):
    assert asan_run.r.returncode == 0, _report(asan_run.r.stderr)
    case.check(asan_run.d)


@pytest.mark.parametrize("case", [c for c in CASES if c.tsan], ids=lambda c: c.id)
def test_tsan_outputs_match_reference(tsan_run, case):
    assert tsan_run.r.returncode == 0, _report(tsan_run.r.stderr)
    case.check(tsan_run.d)


@st.composite
def conv_geometries(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = draw(st.sampled_from((1, 3, 4, 8)))
    groups = draw(st.sampled_from(sorted({1, 2, c} & {d for d in (1, 2, c) if c % d == 0})))
    f = draw(st.sampled_from((1, 4, 5, 33, 68))) if groups == 1 else groups * draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - pads[0] - pads[1]), 9))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - pads[2] - pads[3]), 9))
    return conv_geometry((n, h, w, c), (kh, kw, c // groups, f), strides=(sh, sw), dilation=(dh, dw),
                         padding=((pads[0], pads[1]), (pads[2], pads[3])), groups=groups)


@settings(max_examples=8)
@given(g=conv_geometries(), act=st.sampled_from(ACTS), seed=st.integers(0, 2**31 - 1))
def test_generated_geometries_under_asan(drivers, tmp_path_factory, g, act, seed):
    """Stride, asymmetric padding, dilation, ragged tiles and groups (1, 2, C) drawn by hypothesis:
    all passes."""
    rng = np.random.default_rng(seed)
    cases = [conv_forward_case(f"gen_v{v}", g, v, act, rng) for v in (V1, V2, V3)]
    cases += [conv_backward_data_case("gen_bwd_data", g, rng), conv_backward_filter_case("gen_bwd_filter", g, rng)]
    run = _run_cases(drivers["asan"], cases, tmp_path_factory.mktemp("emu_gen"))
    _assert_clean(run.r, len(cases))
    for c in cases:
        c.check(run.d)


@settings(max_examples=6)
@given(M=st.integers(1, 70), K=st.integers(1, 40), N=st.integers(1, 70), act=st.sampled_from(ACTS),
       seed=st.integers(0, 2**31 - 1))
def test_generated_dense_and_softmax_under_asan(drivers, tmp_path_factory, M, K, N, act, seed):
    """Ragged dense shapes (1..70 rows/columns around the 64x64 tile, K around BK = 16)."""
    rng = np.random.default_rng(seed)
    cases = [dense_forward_case("gen_dense_fwd", M, K, N, act, rng),
             dense_backward_case("gen_dense_bwd", M, K, N, act, rng),
             # one block per softmax row: a few rows keep it quick
             softmax_case("gen_softmax", 1 + M % 5, N, rng),
             activation_backward_case("gen_act_bwd", 1 + K % 5, N, "softmax", rng)]
    run = _run_cases(drivers["asan"], cases, tmp_path_factory.mktemp("emu_gen_dense"))
    _assert_clean(run.r, len(cases))
    for c in cases:
        c.check(run.d)


# (M, N, K, sms) -> splits, worked out by hand from split_k_splits' constants (64x64 tiles, a split
# >= 16 BK = 256 long, 2 blocks per SM, <= 64 splits, <= 2^24 workspace floats).
SPLIT_RULE = {
    (128, 128, 9216, 132): 36,       # the dense forward 128x9216->128: 4 tiles, 66 wanted, 9216/256 = 36
    (5, 70, 600, 132): 2,            # 2 tiles, 132 wanted, 600/256 = 2
    (128, 128, 9216, 4): 1,          # 4 tiles fill 4 SMs
    (64, 64, 511, 132): 1,           # K < 2 x 256: too short to split
    (64, 64, 512, 132): 2,           # just long enough for two
    (1, 1, 1 << 20, 132): 64,        # 264 wanted, capped at 64 partials
    (2048, 2048, 1 << 20, 100000): 4,  # 1024 tiles, 196 wanted, 64 cap, 4 x 4 Mi floats fit 2^24
    (5760, 5760, 1 << 20, 10000): 1,   # even 2 partials of 33 Mi floats exceed the workspace cap
    (0, 70, 600, 132): 1,            # no rows, no tiles: nothing to split (was a division by zero)
}


def test_split_k_rule(drivers, tmp_path):
    keys = list(SPLIT_RULE)
    r = run_driver(drivers["asan"], [f"split_k_splits M={m} N={n} K={k} sms={s}" for m, n, k, s in keys], tmp_path)
    _assert_clean(r, len(keys))
    got = [int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("split_k_splits ")]
    assert dict(zip(keys, got)) == SPLIT_RULE
    # the generated cases' oracle agrees with the C++ rule on every pinned point
    assert {k: _rule(*k) for k in keys} == SPLIT_RULE


@pytest.mark.parametrize("san", ("asan", "tsan"))
def test_workspace_reuse(drivers, tmp_path, san):
    """The workspace cache: one buffer reused per stream, grown (old one freed) when too small, one per
    stream and per host thread (a second thread on the same stream gets its own), and bounded: 32 new
    streams add only as many buffers as the cache holds, the least recently used being freed."""
    r = run_driver(drivers[san], ["workspace_reuse"], tmp_path)
    _assert_clean(r, 1)
    checks = dict(x.split()[1:3] for x in r.stdout.splitlines() if x.startswith("workspace ") and
                  x.split()[1] != "cache_grew_by")
    assert checks == {k: "1" for k in ("reused_on_one_stream", "null_for_zero_floats", "grows_past_its_size",
                                       "kept_after_growth", "own_buffer_per_stream", "own_buffer_per_host_thread",
                                       "bounded_by_eviction")}, r.stdout


def test_split_k_reuses_the_workspace_across_operations(drivers, tmp_path):
    """Split GEMMs of growing size on one stream: the first sizes the workspace, the next reuse it, a
    bigger one grows it (stream synchronised, old buffer freed) with every partial still correct."""
    rng = np.random.default_rng(7)
    cases = []
    # 64 x 64 x 70 partials = 1.1 MiB: past the first 1 MiB buffer
    sizes = ((5, 40, 9, 2), (3, 40, 7, 2), (64, 1024, 70, 64), (5, 40, 9, 2))
    for i, (M, K, N, splits) in enumerate(sizes):
        cases.append(dense_forward_case(f"reuse{i}", M, K, N, "relu", rng).knobs(split_k=splits))
    run = _run_cases(drivers["asan"], cases, tmp_path)
    _assert_clean(run.r, len(cases))
    for c, (*_, splits) in zip(cases, sizes):
        c.check(run.d)
        assert _gemm_launches(run.launches[c.id]) == ([(splits, True)], [splits]), run.launches[c.id]


@pytest.mark.parametrize("san", ("asan", "tsan"))
def test_split_k_from_two_host_threads_on_one_stream(drivers, tmp_path, san):
    """Two host threads launch the same split dense forward on one stream at once: each gets its own
    workspace (one shared buffer would be a race TSan reports: both launches' blocks write the same
    partials), and both outputs match the reference."""
    rng = np.random.default_rng(11)
    M, K, N = 5, 600, 70
    x, w, b = _rand(rng, (M, K)), _rand(rng, (K, N)), _rand(rng, (N,))
    want = ref.dense_forward(x, w, b, "tanh")
    c = Case("threads", "dense_fwd_threads", {"M": M, "K": K, "N": N, "act": CODE["tanh"]},
             {"x": (x, 0), "w": (w, 0), "b": (b, 0)}, {"y0": (want, 0, _tol(K)), "y1": (want, 0, _tol(K))})
    run = _run_cases(drivers[san], [c], tmp_path)
    _assert_clean(run.r, 1)
    c.check(run.d)
    # the two threads' launches interleave in any order
    assert sorted(_kernel(x) for x in run.launches["threads"]) == ["gemm_tiled"] * 2 + ["splitk_reduce"] * 2
    assert all(x.split()[2] == "grid=1,2,2" for x in run.launches["threads"] if _kernel(x) == "gemm_tiled")


@settings(max_examples=4, deadline=None)
@given(M=st.integers(1, 70), K=st.integers(1, 100), N=st.integers(1, 70), forced=st.integers(2, 8),
       act=st.sampled_from(ACTS), seed=st.integers(0, 2**31 - 1))
def test_generated_split_k_under_asan(drivers, tmp_path_factory, M, K, N, forced, act, seed):
    """Ragged forced split-K forward and backward (dx, dw, db): each workspace guarded at its size."""
    rng = np.random.default_rng(seed)
    zf = _launched_splits(M, N, K, forced)
    fwd = dense_forward_case("gen_split_fwd", M, K, N, act, rng).knobs(split_k=forced, ws=zf * M * N)
    zx, zw = _launched_splits(M, K, N, forced), _launched_splits(K, N, M, forced)
    dx = dense_backward_case("gen_split_dx", M, K, N, act, rng, want=("dx", "db")).knobs(split_k=forced,
                                                                                        ws=zx * M * K)
    dw = dense_backward_case("gen_split_dw", M, K, N, act, rng, want=("dw",)).knobs(split_k=forced, ws=zw * K * N)
    cases = [fwd, dx, dw]
    run = _run_cases(drivers["asan"], cases, tmp_path_factory.mktemp("emu_gen_split"))
    _assert_clean(run.r, len(cases))
    for c, zs in zip(cases, ((zf,), (zx,), (zw,))):
        c.check(run.d)
        assert [z for z, _ in _gemm_launches(run.launches[c.id])[0]] == list(zs)


# ----------------------------------------------------------------------------- negative controls
def test_asan_reports_a_split_k_partial_past_its_workspace(drivers, tmp_path):
    """The ws= guard can fail: one float less than splits x M x N and the last partial hits poison."""
    case = dense_forward_case("ws_short", 5, 600, 70, "relu", np.random.default_rng(3)).knobs(ws=2 * 5 * 70 - 1)
    r = run_driver(drivers["asan"], [case.line(tmp_path)], tmp_path)
    assert r.returncode != 0 and "AddressSanitizer: use-after-poison" in r.stderr, r.stdout + r.stderr[-3000:]
    assert "gemm_tiled" in r.stderr.split("AddressSanitizer")[1][:3000]


def _sync_sites():
    """Every __syncthreads of the kernels, by the name rewrite.py gives it (function#k)."""
    spec = importlib.util.spec_from_file_location("dlconv_emu_rewrite", EMU / "rewrite.py")
    rw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rw)
    sites = []
    for src in sorted((ROOT / "csrc").glob("*.cu")):
        sites += re.findall(r'syncthreads\("([^"]+)"\)', rw.rewrite(src.read_text(), str(src)))
    return sites


# A TSan case whose kernel passes each barrier at least twice (a K loop of >= 2 slices, two reductions).
_SITE_CASE = {"conv_fwd_v2_smem": "fwd_v2_linear_vec", "conv_fwd_v3_igemm": "fwd_v3_tiles",
              "gemm_tiled": "dense_fwd_relu", "block_reduce": "softmax_wide"}
SYNC_SITES = _sync_sites()


def test_every_barrier_has_a_control():
    assert len(SYNC_SITES) >= 8 and {s.split("#")[0] for s in SYNC_SITES} <= set(_SITE_CASE), SYNC_SITES
    by_id = {c.id: c for c in CASES}
    for cid in _SITE_CASE.values():
        assert by_id[cid].tsan  # its clean TSan run is the control's other half
    assert G_VEC.gemm_k > 16 and G_TILES.gemm_k > 16  # >= 2 BK slices: the loop-end barriers matter


@pytest.mark.parametrize("site", SYNC_SITES)
def test_tsan_reports_a_dropped_syncthreads(drivers, tmp_path, site):
    kernel = site.split("#")[0]
    case = next(c for c in CASES if c.id == _SITE_CASE[kernel])
    r = run_driver(drivers["tsan"], [case.line(tmp_path)], tmp_path, {"DLCONV_EMU_DROP_SYNC": site})
    assert r.returncode != 0 and "WARNING: ThreadSanitizer: data race" in r.stderr, \
        f"dropping {site} went unnoticed (exit {r.returncode}):\n{r.stderr[-3000:]}"
    assert kernel in r.stderr.split("WARNING: ThreadSanitizer")[1][:4000]


def test_ubsan_reports_float4_forced_on_misaligned_input(drivers, tmp_path):
    case = conv_forward_case("force_v3_vec_misaligned", G_VEC, V3, "relu", np.random.default_rng(1),
                             offsets=(1, 0, 0, 0), op="force_v3_vec")
    r = run_driver(drivers["asan"], [case.line(tmp_path)], tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert re.search(r"runtime error: .*misaligned address .*float4.*16 byte alignment", r.stderr), r.stderr[-3000:]
    assert "conv_fwd_v3_igemm" in r.stderr


def test_tsan_reports_a_race_between_blocks(drivers, tmp_path):
    r = run_driver(drivers["tsan"], ["interblock_race"], tmp_path)
    assert r.returncode != 0 and "WARNING: ThreadSanitizer: data race" in r.stderr, r.stdout + r.stderr[-3000:]
    assert "emu_control_interblock" in r.stderr
    # the same kernel without TSan completes: the two blocks ran one after the other
    r = run_driver(drivers["asan"], ["interblock_race"], tmp_path)
    assert r.returncode == 0 and "interblock_race sum 2 flag 1" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------- the emulator itself
def _assert_lines(stdout, lines):
    for line in lines:
        assert line in stdout.splitlines(), stdout


def _lanes():
    lane = np.arange(64) % 32
    return np.stack([np.full(64, 496.0), np.where(lane % 8 < 7, lane + 1, lane),
                           np.where(lane % 16 >= 2, lane - 2, lane), (lane // 8) * 8 + 3, np.ones(64)], axis=1)


SELFTESTS = {  # name -> check(out floats, stdout); expected values from the CUDA programming guide
    "shuffles": lambda out, _: np.testing.assert_array_equal(out[:320].reshape(64, 5), _lanes()),
    "fresh_shared": lambda out, _: np.testing.assert_array_equal(np.isnan(out[:3]), True),
    "dynamic_shared": lambda out, _: np.testing.assert_array_equal(out[:64], 63 - np.arange(64)),
    "atomics": lambda out, _: (np.testing.assert_array_equal(out[0], 1024.0),
                               np.testing.assert_array_equal(out[1:2].view(np.int32), [1023])),
    "shared_float4_aligned": lambda out, _: np.testing.assert_array_equal(out[:8], 6.0),
    "bad_config": lambda _, stdout: _assert_lines(stdout, ("threads 1025: cudaErrorInvalidConfiguration",
                                                            "grid.y 65536: cudaErrorInvalidConfiguration",
                                                            "smem 49 KiB: cudaErrorInvalidValue")),
}
SELFTEST_ERRORS = {  # name -> what the report must say
    "divergent_barrier": r"dlconv_emu: ERROR: barrier divergence",
    "shared_oob": r"runtime error: index 4 out of bounds|AddressSanitizer: heap-buffer-overflow",
    "shared_too_big": r"dlconv_emu: ERROR: shared memory of the block \(53248 bytes\) exceeds 49152",
    "shared_float4_unaligned": r"runtime error: .*misaligned address .*float4",
}


def _selftest(exe, name, d):
    out = d / f"{name}.out"
    r = run_driver(exe, [f"selftest name={name} n=320 out={out}"], d)
    return r, (np.fromfile(out, np.float32) if out.exists() else None)


@pytest.mark.parametrize("san", ("asan", "tsan"))
@pytest.mark.parametrize("name", sorted(SELFTESTS))
def test_emulator_selftest(drivers, tmp_path, name, san):
    r, out = _selftest(drivers[san], name, tmp_path)
    _assert_clean(r, 1)
    SELFTESTS[name](out, r.stdout)


@pytest.mark.parametrize("name", sorted(SELFTEST_ERRORS))
def test_emulator_reports(drivers, tmp_path, name):
    r, _ = _selftest(drivers["asan"], name, tmp_path)
    assert r.returncode != 0 and re.search(SELFTEST_ERRORS[name], r.stderr), r.stdout + _report(r.stderr)


# ----------------------------------------------------------------------------- the rewrite
def _rewrite_module():
    spec = importlib.util.spec_from_file_location("dlconv_emu_rewrite", EMU / "rewrite.py")
    rw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rw)
    return rw


def test_rewrite_launches_shared_and_barriers():
    rw = _rewrite_module()
    src = """template <int T>
__global__ void __launch_bounds__(256)
k(float* y, int n) {
    __shared__ __align__(16) float a[T][T + 1];  // a comment with k<<<1, 2>>>(x)
    extern __shared__ float dyn[];
    __shared__ int count;
    __syncthreads();
    if (n) { __syncthreads(); }
}
void go(float* y, cudaStream_t s) {
    k<16><<<dim3(2, 3),
            256, 0, s>>>(y,
                         4);
    other<<<1, 32>>>();
}
"""
    out = rw.rewrite(src, "t.cu")
    assert out.count("\n") == src.count("\n")
    assert '::dlconv_emu::launch("k<16>", k<16>, ::dlconv_emu::config(dim3(2, 3),\n            256, 0, s), y,' in out
    assert '::dlconv_emu::launch("other", other, ::dlconv_emu::config(1, 32))' in out
    assert 'auto& a = ::dlconv_emu::block_shared<float[T][T + 1]>("t.cu:4:a", 16);' in out
    assert "float* dyn = ::dlconv_emu::dynamic_shared<float>();" in out
    assert 'auto& count = ::dlconv_emu::block_shared<int>("t.cu:6:count", 0);' in out
    assert out.count('syncthreads("k#1")') == 1 and out.count('syncthreads("k#2")') == 1
    assert "// a comment with k<<<1, 2>>>(x)" in out  # comments are left alone


@pytest.mark.parametrize("bad,why", [
    ("__global__ void k() { __shared__ float a[4], b[4]; }", "one declarator"),
    ("__global__ void k() { __shared__ float a[]; }", "needs sizes"),
    ("void f() { k<<<1, 2>>>; }", "without an argument list"),
    ("void f() { k<<<1>>>(); }", "1 configuration values"),
    ("void f() { k<<<1, 2>>>(a, (b); }", "unbalanced"),
])
def test_rewrite_refuses_what_it_does_not_understand(bad, why):
    rw = _rewrite_module()
    with pytest.raises(rw.RewriteError, match=re.escape(why)):
        rw.rewrite(bad, "t.cu")
