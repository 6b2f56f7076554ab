"""What this installation has: versions, compiled extensions, GPUs, usable backends.

``dlconv info`` prints it; :func:`info` returns it as a dict.  Nothing here raises
because an optional piece is missing: a missing piece is reported with the reason.
TensorFlow's and Keras' versions are read from package metadata, so this does not
import TensorFlow.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from importlib import metadata

PACKAGES = ("tensorflow", "keras", "torch", "jax", "jaxlib", "numba", "numba-cuda", "numpy", "pybind11")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _extension(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:
        return {"built": False, "why": str(exc)}
    out = {"built": True, "file": getattr(mod, "__file__", "?")}
    build_info = getattr(mod, "build_info", None)
    if build_info is not None:
        out.update(build_info())
    return out


def _numba_gpus() -> dict:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return {"available": True, "simulator": True, "gpus": ["CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"]}
    try:
        from numba import cuda
    except Exception as exc:
        return {"available": False, "why": f"numba.cuda does not import: {exc}", "gpus": []}
    try:
        if not cuda.is_available():
            return {"available": False, "why": "no CUDA driver or GPU visible to Numba", "gpus": []}
        gpus = []
        for d in cuda.list_devices():
            name = d.name.decode() if isinstance(d.name, bytes) else str(d.name)
            gpus.append(f"{d.id}: {name} (cc {d.compute_capability[0]}.{d.compute_capability[1]})")
        return {"available": True, "gpus": gpus}
    except Exception as exc:
        return {"available": False, "why": str(exc), "gpus": []}


def _tf_ops_status() -> dict:
    """Which path the TensorFlow bridge takes with the cpp backend (dlconv.tf_ops; imports no TF)."""
    try:
        from . import tf_ops
        return tf_ops.status()
    except Exception as exc:  # never raise for a missing piece
        return {"native": False, "why": f"{type(exc).__name__}: {exc}"}


def _omp_status() -> dict:
    """libgomp's spin setting for dlconv's C++ kernels (dlconv._omp)."""
    from . import _omp
    return _omp.status()


def _max_pool_paths(tf_ops_status: dict | None = None) -> dict:
    """Keras backend → the path dlconv.layers.MaxPooling2D takes there (imports no framework).

    On TensorFlow the native pool ops live in the op library: where it is not there
    (``tf_ops_status["native"]`` False) the layer is the stock one, and this says so and why."""
    from .ops import MAX_POOL_PATHS
    out = dict(MAX_POOL_PATHS)
    if tf_ops_status is not None and not tf_ops_status.get("native"):
        out["tensorflow"] = ("stock keras MaxPooling2D (tf.nn.max_pool2d): the native pool ops need the "
                             f"TensorFlow op library ({tf_ops_status.get('why', 'not available')})")
    try:
        from dlconv import _C
    except ImportError:
        out["torch"] = "dlconv::max_pool2d custom op over the NumPy reference (dlconv._C not built)"
        out["jax"] = "jax.custom_vjp over jax.pure_callback into the NumPy reference (dlconv._C not built)"
        return out
    if not getattr(_C, "xla_ffi_pool_handlers", dict)():
        out["jax"] = "jax.custom_vjp over jax.pure_callback (dlconv._C has no max pool FFI handlers)"
    return out


def _dropout_paths(tf_ops_status: dict | None = None) -> dict:
    """Keras backend → the path dlconv.layers.Dropout takes there in training (no framework
    imported): stock on TensorFlow without the op library, on torch without dlconv._C."""
    from .ops import DROPOUT_PATHS
    out = dict(DROPOUT_PATHS)
    if tf_ops_status is not None and not tf_ops_status.get("native"):
        out["tensorflow"] = ("stock keras Dropout: DlconvDropout needs the TensorFlow op library "
                             f"({tf_ops_status.get('why', 'not available')})")
    if _extension("dlconv._C").get("built") is False:
        out["torch"] = "stock keras Dropout (dlconv._C not built)"
    return out


def cpu_description() -> str:
    """CPU model and core count, e.g. "Intel(R) Xeon(R) Processor, 2 cores" (py-cpuinfo)."""
    try:
        import cpuinfo
        brand = cpuinfo.get_cpu_info().get("brand_raw") or platform.processor() or platform.machine()
    except Exception:  # py-cpuinfo missing or failing: fall back to what platform knows
        brand = platform.processor() or platform.machine()
    return f"{brand}, {os.cpu_count()} cores"


def info() -> dict:
    """Everything ``dlconv info`` prints, as a JSON-serialisable dict."""
    from . import __version__, backends, bridges

    cuda_ext = _extension("dlconv._C_cuda")
    if cuda_ext.get("built"):
        try:
            from dlconv import _C_cuda
            cuda_ext["gpus"] = _C_cuda.devices()
            if not cuda_ext["gpus"]:
                cuda_ext["gpus_error"] = _C_cuda.devices_why()
        except Exception as exc:
            cuda_ext["gpus_error"] = str(exc)
    avail = backends.available()
    tf_status = _tf_ops_status()
    return {
        "dlconv": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {cpu_description()}",
        "versions": {p: _version(p) for p in PACKAGES},
        "extensions": {"dlconv._C": _extension("dlconv._C"), "dlconv._C_cuda": cuda_ext},
        "numba_cuda": _numba_gpus(),
        "keras_backends": {name: {"usable": ok, "why": why} for name, (ok, why) in bridges.status().items()},
        "tensorflow_ops": tf_status,
        "openmp_spin": _omp_status(),
        "max_pool": _max_pool_paths(tf_status),
        "dropout": _dropout_paths(tf_status),
        "backends": {name: {"cpu": {"usable": a["cpu"][0], "why": a["cpu"][1]},
                            "cuda": {"usable": a["cuda"][0], "why": a["cuda"][1]},
                            "variants": a.get("variants", []),
                            "cuda_variants": a.get("cuda_variants", [])}
                     for name, a in avail.items()},
        "variant_tables": _variant_tables(),
    }


def _variant_tables() -> dict:
    """The variant table of each kernel set (dlconv.variants; the C++ ones from the bindings)."""
    from dataclasses import asdict

    from . import backends, variants
    out = {"numba cpu": variants.NUMBA_CPU, "numba cuda": variants.NUMBA_CUDA}
    try:
        cpp = backends.get("cpp")
        out.update({"cpp cpu": cpp.variant_table(False), "cpp cuda": cpp.variant_table(True)})
    except Exception:  # the C++ backend does not import: its tables are not listed
        pass
    return {k: [asdict(v) for v in t] for k, t in out.items() if t}


def format_info(d: dict) -> str:
    lines = [f"dlconv {d['dlconv']} on Python {d['python']} ({d['machine']})", "", "versions:"]
    lines += [f"  {k:<11} {v}" for k, v in d["versions"].items()]
    lines += ["", "compiled extensions:"]
    for name, e in d["extensions"].items():
        if not e.get("built"):
            lines.append(f"  {name:<15} not built: {e.get('why')}")
            continue
        extra = {k: v for k, v in e.items() if k not in ("built", "file", "gpus", "gpus_error")}
        lines.append(f"  {name:<15} built  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        if e.get("gpus"):
            lines.append(f"  {'':<15} GPUs seen: " + ", ".join(map(str, e["gpus"])))
        elif "gpus_error" in e:
            lines.append(f"  {'':<15} GPUs seen: none ({e['gpus_error']})")
    nc = d["numba_cuda"]
    lines += ["", "GPUs seen by Numba: " + (", ".join(nc["gpus"]) if nc["gpus"] else f"none ({nc.get('why')})")]
    lines += ["", "Keras backends dlconv.layers can run on:"]
    for name, k in d["keras_backends"].items():
        lines.append(f"  {name:<10} {'yes' if k['usable'] else 'no '}  {k['why']}")
    t = d.get("tensorflow_ops")
    if t is not None:
        lines.append(f"  TensorFlow bridge (cpp backend, CPU): "
                     f"{'native ops' if t['native'] else 'numpy_function callbacks'} ({t['why']})")
    if d.get("openmp_spin"):
        lines += ["", f"OpenMP idle spin (C++ kernels): {d['openmp_spin']['why']}"]
    if d.get("max_pool"):
        lines += ["", "MaxPooling2D (dlconv.layers) per Keras backend (channels_first / GPU tensors: stock):"]
        lines += [f"  {name:<10} {path}" for name, path in d["max_pool"].items()]
    if d.get("dropout"):
        lines += ["", "Dropout (dlconv.layers, training) per Keras backend (GPU tensors, noise_shape: stock):"]
        lines += [f"  {name:<10} {path}" for name, path in d["dropout"].items()]
    lines += ["", "backends:"]
    for name, b in d["backends"].items():
        for side in ("cpu", "cuda"):
            s = b[side]
            mark = "yes" if s["usable"] else "no "
            lines.append(f"  {name:<10} {side:<5} {mark}  {s['why']}")
        if b["variants"]:
            lines.append(f"  {'':<10} conv variants (CPU): {', '.join(b['variants'])}")
        if b["cuda_variants"] and b["cuda"]["usable"]:
            lines.append(f"  {'':<10} conv variants (CUDA): {', '.join(b['cuda_variants'])}")
    tables = d.get("variant_tables") or {}
    if tables:
        lines += ["", "conv kernel variants ({cpu,cuda}_v{N}_{technique}, v1 the baseline; dlconv.variants):"]
        for kset, rows in tables.items():
            lines.append(f"  {kset}:")
            lines += [f"    {r['name']:<17} {', '.join(r['passes'])}: {r['description']}" for r in rows]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0
