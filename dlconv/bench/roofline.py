"""The roofline: each timed case as a point of achieved GFLOP/s against arithmetic intensity
(FLOPs / bytes moved, every input and output counted once: :attr:`Problem.bytes`), under the
machine's roof — its compute peak and memory bandwidth, *measured* here by short probes
(about a second in all), never typed in:

* CPU compute: the best of a few ``N×N @ N×N`` float32 matmuls through NumPy's BLAS
  (:data:`MATMUL_N`): the practical peak of this machine's cores as a tuned GEMM reaches
  it, not the datasheet figure;
* CPU bandwidth: the best of a few copies (``z = x``) and adds (``z = x + z``) of arrays
  larger than the cache (:data:`STREAM_BYTES`), bytes read + written over the time;
* GPU (torch with CUDA present): the same matmul (TF32 off) and copy through torch, timed
  with CUDA events; without torch, the bandwidth of a Numba device-to-device copy and no
  compute roof.
"""

from __future__ import annotations

import pathlib
import time
from typing import Optional

import numpy as np

#: Matmul side of the compute probe: 2·N³ ≈ 7 GFLOP, a few tenths of a second per call on
#: two cores, large enough that BLAS runs at its steady-state rate.
MATMUL_N = 1536
#: Bytes of each array of the bandwidth probe: 48 MiB (two of them), beyond a CPU's
#: last-level cache (this machine's EPYC: 32 MiB per core complex).
STREAM_BYTES = 48 << 20
#: Timed calls per probe at the least (the best counts: the roof is what the machine can
#: reach), and the seconds a probe keeps calling after those, so that on a shared machine
#: the best call falls in a quiet moment: under 2 s for all CPU probes together, idle.
PROBE_REPEATS = 3
MATMUL_BUDGET_S = 1.0
STREAM_BUDGET_S = 0.25
#: GPU probe sizes: an 8192² matmul (1.1 TFLOP) and a 1 GiB copy.
GPU_MATMUL_N = 8192
GPU_STREAM_BYTES = 1 << 30


def _best(fn, budget_s: float, repeats: int = PROBE_REPEATS) -> tuple:
    """(fastest call's seconds, calls timed): ``repeats`` calls, then more until ``budget_s``."""
    fn()                                          # warm-up: page faults, BLAS threads
    best, n, t_end = float("inf"), 0, time.perf_counter() + budget_s
    while n < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best, n


def measure_cpu_roof() -> dict:
    """→ {peak_gflops, bandwidth_gbs, peak_how, bandwidth_how, probe_s}."""
    t_start = time.perf_counter()
    n = MATMUL_N
    a = np.full((n, n), 0.5, np.float32)          # values do not change a GEMM's speed
    b = np.full((n, n), 0.25, np.float32)
    c = np.empty((n, n), np.float32)
    t_mm, n_mm = _best(lambda: np.matmul(a, b, out=c), MATMUL_BUDGET_S)
    elems = STREAM_BYTES // 4
    x = np.ones(elems, np.float32)
    z = np.zeros(elems, np.float32)
    t_copy, n_copy = _best(lambda: np.copyto(z, x), STREAM_BUDGET_S)
    t_triad, n_triad = _best(lambda: np.add(x, z, out=z), STREAM_BUDGET_S)   # 2 reads, 1 write
    bw = max(2 * STREAM_BYTES / t_copy, 3 * STREAM_BYTES / t_triad)
    return {"peak_gflops": 2 * n ** 3 / t_mm / 1e9, "bandwidth_gbs": bw / 1e9,
            "peak_how": f"NumPy BLAS float32 matmul {n}×{n}·{n}×{n}, best of {n_mm} "
                        "(the practical peak)",
            "bandwidth_how": f"NumPy copy and add of {STREAM_BYTES >> 20} MiB float32 arrays, "
                             f"best of {n_copy} and {n_triad}",
            "probe_s": time.perf_counter() - t_start}


def measure_cuda_roof() -> Optional[dict]:
    """The GPU's roof through torch (or Numba, bandwidth only); None without a real GPU."""
    t_start = time.perf_counter()
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch sees no GPU")
    except ImportError:
        return _numba_cuda_roof(t_start)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        def timed(fn):
            fn()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(PROBE_REPEATS):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                best = min(best, s.elapsed_time(e) / 1e3)
            return best
        n = GPU_MATMUL_N
        a = torch.rand((n, n), device="cuda")
        b = torch.rand((n, n), device="cuda")
        t_mm = timed(lambda: torch.mm(a, b))
        del a, b
        src = torch.ones(GPU_STREAM_BYTES // 4, device="cuda")
        dst = torch.empty_like(src)
        t_copy = timed(lambda: dst.copy_(src))
        del src, dst
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"peak_gflops": 2 * n ** 3 / t_mm / 1e9, "bandwidth_gbs": 2 * GPU_STREAM_BYTES / t_copy / 1e9,
            "peak_how": f"torch.mm float32 {n}×{n} (cuBLAS, TF32 off), best of {PROBE_REPEATS} "
                        "(the practical peak)",
            "bandwidth_how": f"torch copy of a {GPU_STREAM_BYTES >> 20} MiB tensor, best of "
                             f"{PROBE_REPEATS}",
            "probe_s": time.perf_counter() - t_start}


def _numba_cuda_roof(t_start) -> Optional[dict]:
    from .machine import real_gpu_present
    if not real_gpu_present():
        return None
    from numba import cuda
    src = cuda.to_device(np.ones(GPU_STREAM_BYTES // 4, np.float32))
    dst = cuda.device_array_like(src)
    best = float("inf")
    for i in range(PROBE_REPEATS + 1):
        s, e = cuda.event(), cuda.event()
        s.record()
        dst.copy_to_device(src)
        e.record()
        e.synchronize()
        if i:                                     # the first copy is the warm-up
            best = min(best, cuda.event_elapsed_time(s, e) / 1e3)
    return {"peak_gflops": None, "bandwidth_gbs": 2 * GPU_STREAM_BYTES / best / 1e9,
            "peak_how": "not measured (torch is not installed: no GEMM to probe with)",
            "bandwidth_how": f"Numba device-to-device copy of {GPU_STREAM_BYTES >> 20} MiB, best of "
                             f"{PROBE_REPEATS}",
            "probe_s": time.perf_counter() - t_start}


def ensure_roof(result: dict) -> dict:
    """Measure the roof of every device with timed rows that ``result`` lacks one for
    (simulated CUDA rows have none); → ``result["roofline"]``."""
    roof = result.setdefault("roofline", {})
    devices = {r["device"] for r in result.get("rows", []) if r.get("median_s")}
    if "cpu" in devices and "cpu" not in roof:
        roof["cpu"] = measure_cpu_roof()
    if "cuda" in devices and "cuda" not in roof and result.get("kind") == "gpu":
        roof["cuda"] = measure_cuda_roof()
    return roof


def roof_lines(result: dict) -> list:
    """One line per measured roof, for the text and Markdown reports."""
    out = []
    for dev, r in (result.get("roofline") or {}).items():
        if not r:
            continue
        peak = "not measured" if r.get("peak_gflops") is None else f"{r['peak_gflops']:.0f} GFLOP/s"
        out.append(f"roof ({dev}, measured by this run): compute {peak} ({r['peak_how']}); memory "
                   f"{r['bandwidth_gbs']:.1f} GB/s ({r['bandwidth_how']})")
    return out


_MARKERS = {"builtin": ("s", "#000000"), "cpp": ("o", "#1f77b4"), "numba": ("^", "#ff7f0e"),
            "user": ("D", "#2ca02c")}
_SHORT = {"forward": "fwd", "backward-data": "bwd-data", "backward-filter": "bwd-filter",
          "backward": "bwd"}


def write_roofline(result: dict, path) -> pathlib.Path:
    """Log-log GFLOP/s against FLOP/byte: every timed row a point, the roof min(peak, bw·I)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roof = result.get("roofline") or {}
    rows = [r for r in result["rows"] if r.get("median_s") and r.get("gflops") and r.get("intensity")]
    devices = sorted({r["device"] for r in rows} | {d for d, v in roof.items() if v}) or ["cpu"]
    fig, axes = plt.subplots(1, len(devices), figsize=(7.5 * len(devices), 5.5), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        mine = [r for r in rows if r["device"] == dev]
        xs = [r["intensity"] for r in mine] or [1.0]
        rf = roof.get(dev)
        if rf and rf.get("peak_gflops"):             # the ridge point: where the roof bends
            xs.append(rf["peak_gflops"] / rf["bandwidth_gbs"])
        lo, hi = min(xs) / 4, max(xs) * 4
        ys = [r["gflops"] for r in mine]
        if rf:
            grid = np.geomspace(lo, hi, 200)
            bw = rf["bandwidth_gbs"]
            peak = rf.get("peak_gflops") or float("inf")
            ax.plot(grid, np.minimum(bw * grid, peak), color="#d62728", lw=1.5,
                    label=f"roof, measured: {bw:.1f} GB/s" + (f", {peak:.0f} GFLOP/s (practical peak)"
                                                             if np.isfinite(peak) else ""))
            ax.text(0.01, 0.99, f"compute: {rf['peak_how']}\nmemory: {rf['bandwidth_how']}\n"
                    "FLOPs are the direct convolution's (2·multiply-adds), so a Winograd kernel or a "
                    "kernel faster than the probe sits above the roof", transform=ax.transAxes,
                    fontsize=5.5, va="top")
            ys += [min(bw * hi, peak)]
        seen = set()
        for r in mine:
            m, c = _MARKERS.get(r["backend"], ("x", "#7f7f7f"))
            lab = {"builtin": "built-in", "user": "your kernel"}.get(r["backend"], r["backend"])
            ax.scatter(r["intensity"], r["gflops"], marker=m, color=c, s=28, zorder=3,
                       label=None if lab in seen else lab)
            seen.add(lab)
            ax.annotate(f"{r['layer']} {_SHORT.get(r['pass'], r['pass'])} {r['impl'].split(' (')[0][:18]}",
                        (r["intensity"], r["gflops"]), fontsize=5, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        if ys:
            ax.set_ylim(min(ys) / 3, max(ys) * 3)
        ax.set_xlabel("arithmetic intensity, FLOP / byte (inputs and outputs counted once)", fontsize=8)
        ax.set_ylabel("achieved GFLOP/s", fontsize=8)
        ax.set_title(f"{dev}: " + (result["machine"].get("gpu") if dev == "cuda"
                                   else result["machine"].get("cpu_brand", ""))[:70], fontsize=8)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"dlconv bench roofline, {result['kind']}, {result['date']} (roof measured by the "
                 f"same run)", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
