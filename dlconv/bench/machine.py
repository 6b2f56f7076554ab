"""The machine a run came from: CPU model and cores, GPUs, library versions
(:func:`describe_machine`), a file-name tag (:func:`machine_slug`), whether a real GPU is
present (:func:`real_gpu_present`), and the load average."""

from __future__ import annotations

import os
import re


def machine_slug(info: dict, device: str = "cpu") -> str:
    """A short file-name-safe machine tag such as ``cpu-xeon-2core`` or ``gpu-h200``."""
    if device == "cuda":
        gpu = (info.get("gpu_names") or ["gpu"])[0]
        words = [w for w in re.split(r"[^a-z0-9]+", gpu.lower())
                 if w and w not in ("nvidia", "geforce", "tesla", "sxm", "pcie")]
        return "gpu-" + ("-".join(words[:2]) or "unknown")
    brand = info.get("cpu_brand") or "cpu"
    brand = re.sub(r"\((r|tm)\)", " ", brand.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", brand)
             if w and w not in ("intel", "amd", "processor", "cpu", "core", "with", "radeon", "graphics")
             and not re.fullmatch(r"\d+(\.\d+)?ghz", w)]
    return f"cpu-{'-'.join(words[:2]) or 'unknown'}-{info.get('cores', '?')}core"


def describe_machine() -> dict:
    """CPU model and cores, GPUs, library versions: :func:`dlconv.info.info` plus py-cpuinfo."""
    import importlib
    _info = importlib.import_module("dlconv.info")   # not `from . import info`: dlconv.info is also a function

    d = {}
    try:
        d["info"] = _info.info()
    except Exception as exc:  # a broken optional piece never stops the benchmark
        d["info"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import cpuinfo
        ci = cpuinfo.get_cpu_info()
        d["cpu_brand"] = ci.get("brand_raw", "?")
        d["cpu_flags_simd"] = [f for f in ("avx2", "fma", "avx512f") if f in ci.get("flags", [])]
    except Exception:  # py-cpuinfo missing: fall back to platform
        import platform
        d["cpu_brand"] = platform.processor() or platform.machine()
    d["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    nc = d["info"].get("numba_cuda", {}) if isinstance(d["info"], dict) else {}
    if nc.get("available") and not nc.get("simulator"):
        gpus = [g.split(": ", 1)[-1] for g in nc.get("gpus", [])]
    d["gpu_names"] = gpus
    d["gpu"] = ", ".join(gpus) if gpus else "none"
    d["versions"] = d["info"].get("versions", {}) if isinstance(d["info"], dict) else {}
    d["description"] = (f"{d['cpu_brand']}, {d['cores']} cores; GPU: {d['gpu']}; "
                        + ", ".join(f"{k} {v}" for k, v in d["versions"].items()))
    return d


def real_gpu_present() -> bool:
    """True only for a real CUDA GPU seen by Numba (never the simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no numba.cuda, no driver: no GPU
        return False


def loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None
