"""dlconv's TensorFlow op library: built on first use, cached per TensorFlow version, loaded.

``csrc/tf_ops.cpp`` registers graph-native TensorFlow ops (``REGISTER_OP``) whose CPU kernels
call dlconv's C++ kernels directly — no Python callback, no GIL::

    DlconvConv2D, DlconvConv2DBackpropInput, DlconvConv2DBackpropFilter, DlconvDense, DlconvDenseGrad,
    DlconvMaxPool2D, DlconvMaxPool2DGrad, DlconvConv2DMaxPool2x2, DlconvConv2DBackpropInputFromPool,
    DlconvConv2DBackpropFilterFromPool, DlconvDropout (the last six CPU only)

GPU kernels: when ``nvcc`` is found and the installed TensorFlow is a CUDA build
(``tf.sysconfig.get_build_info()['is_cuda_build']``, read without importing TensorFlow), the
library is built with ``-DGOOGLE_CUDA=1`` and linked with ``csrc/cuda_{conv,dense,workspace}.cu``
(nvcc, the ``DLCONV_CUDA_ARCHS`` of setup.py, static cudart), and every op is registered for
``DEVICE_GPU`` too: the CUDA C++ kernels on the stream TensorFlow gives the op.
``DLCONV_TF_OPS_CUDA=0`` builds without them, ``=1`` requires them.  They are compiled and
registered (tests/test_tf_ops_build.py) but have **never run**: the development machine has
no GPU, and the GPU machine has no TensorFlow.

Sources: a wheel ships csrc/'s files inside the package as ``dlconv/csrc`` (setup.py's
build_py); an editable install or a checkout reads the source tree's ``csrc/``.

How it is built and found
-------------------------
The plain package does not need TensorFlow to build or import (``pip install`` builds with
build isolation, where TensorFlow is absent).  So the op library is built *on first use*, the
way PyTorch's C++ extension loader does it: :func:`load` compiles ``tf_ops.cpp`` with the
CPU kernel sources (:data:`SOURCES`: conv, grouped conv, dense, pool, dropout; and the CUDA sources,
above) against the installed TensorFlow's headers and flags
(``tf.sysconfig.get_compile_flags()`` / ``get_link_flags()``) with ``g++`` into a cache folder
keyed by the TensorFlow version and a hash of the sources, compiler, SIMD flags and CUDA
choice::

    $DLCONV_TF_OPS_CACHE  or  $XDG_CACHE_HOME/dlconv/tf_ops  or  ~/.cache/dlconv/tf_ops
        tf2.21.0-<hash>/_dlconv_tf_ops.so   (+ build.json: versions, command)

and loads it with ``tf.load_op_library``.  The first build takes about a minute on two cores;
later processes load the cached file (milliseconds).  A different TensorFlow version or changed
sources give a different folder, hence a rebuild — a library is never loaded into a TensorFlow
it was not built for (``build.json`` is checked again before loading).  Concurrent first uses
(parallel test workers) build once, under a file lock.

If the library cannot be built or loaded (no ``g++``, no TensorFlow headers, a compile error,
``DLCONV_TF_OPS=0``), :func:`load` raises :class:`TFOpsUnavailable` with a one-line reason,
:func:`reason` returns it, and the TensorFlow bridge falls back to its ``numpy_function``
callbacks; ``dlconv info`` prints the path taken and the reason.

Deploying
---------
A SavedModel exported from a model with dlconv layers holds these ops.  In the serving process,
load the library before loading the model, either ::

    import dlconv.tf_ops; dlconv.tf_ops.load()      # builds it if needed
    tf.load_op_library(path)                         # path = dlconv.tf_ops.library_path()

A serving system (TF Serving, Triton's TensorFlow backend) needs the ``.so`` file built for its
TensorFlow version (copy the file :func:`library_path` names; its ``build.json`` says which
TensorFlow it needs) and its custom-op loading mechanism pointed at it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata

from . import _omp, _toolchain

__all__ = ["TFOpsUnavailable", "load", "reason", "library_path", "available", "status", "OP_NAMES", "CPU_ONLY_OPS",
           "threading_knobs",
           "SOURCES", "HEADERS"]

#: The ops the library registers (TensorFlow's Python wrappers are their snake_case names).
OP_NAMES = ("DlconvConv2D", "DlconvConv2DBackpropInput", "DlconvConv2DBackpropFilter", "DlconvDense",
            "DlconvDenseGrad", "DlconvMaxPool2D", "DlconvMaxPool2DGrad", "DlconvConv2DMaxPool2x2",
            "DlconvConv2DBackpropInputFromPool", "DlconvConv2DBackpropFilterFromPool", "DlconvDropout")
#: Registered for DEVICE_CPU only, also in a GOOGLE_CUDA build (the bridge takes
#: tf.nn.max_pool2d where TensorFlow sees a GPU, so the ops of a conv + pool pair stay on the CPU too).
CPU_ONLY_OPS = ("DlconvMaxPool2D", "DlconvMaxPool2DGrad", "DlconvConv2DMaxPool2x2",
                "DlconvConv2DBackpropInputFromPool", "DlconvConv2DBackpropFilterFromPool", "DlconvDropout")
#: Compiled into the library (relative to csrc/).
SOURCES = ("tf_ops.cpp", "cpu_conv.cpp", "cpu_conv_grouped.cpp", "cpu_dense.cpp", "cpu_pool.cpp",
           "cpu_dropout.cpp")
#: Hashed too: a change in any header rebuilds.
HEADERS = ("geometry.h", "cpu_kernels.h", "cpu_gemm.h", "cpu_act.h", "cpu_conv_direct.h",
           "cpu_conv_winograd.h", "cpu_dense_backward.h", "cpu_conv_grouped.h",
           "cpu_conv_subpixel.h", "cpu_pool.h", "cpu_dropout.h")
# (tests/test_tf_ops_build.py checks that every project header these sources include is here.)
#: The CUDA C++ kernels the DEVICE_GPU OpKernels call (compiled by nvcc when CUDA is used).
CUDA_SOURCES = ("cuda_conv.cu", "cuda_dense.cu", "cuda_workspace.cu")
CUDA_HEADERS = ("cuda_kernels.h", "cuda_common.cuh")
LIB_NAME = "_dlconv_tf_ops.so"
#: Environment switch: "0" never builds or uses the library (the bridge uses callbacks).
ENV_SWITCH = "DLCONV_TF_OPS"
#: "0" builds without the DEVICE_GPU kernels, "1" requires them (fails with the reason if nvcc
#: or a CUDA build of TensorFlow is missing), unset: with them when both are there.
CUDA_SWITCH = "DLCONV_TF_OPS_CUDA"


class TFOpsUnavailable(RuntimeError):
    """The op library cannot be built or loaded here; the message is the one-line reason."""


def _csrc() -> str:
    """The folder holding the C++ sources: the copy a wheel ships inside the package
    (dlconv/csrc, put there by setup.py's build_py), else the source tree's csrc/ beside the
    package (an editable install or a checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.exists(os.path.join(cand, "tf_ops.cpp")):
            return cand
    raise TFOpsUnavailable(f"the C++ sources (csrc/tf_ops.cpp) are not found next to {here}")


def _simd_flags():
    """-mavx2/-mfma/-mavx512f and their macros when this CPU has them (as setup.py decides)."""
    flags, macros = _toolchain.simd()
    return flags + [f"-D{name}={value}" for name, value in macros]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise TFOpsUnavailable("no C++ compiler found (g++ or $CXX) to build dlconv's TensorFlow op library")
    return cxx


def _tf_version() -> str:
    try:
        return metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        raise TFOpsUnavailable("tensorflow is not installed") from None


def _tf_dir() -> str:
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise TFOpsUnavailable("tensorflow is not installed")
    return list(spec.submodule_search_locations)[0]


def _tf_build_info() -> dict:
    """TensorFlow's build facts (``tf.sysconfig.get_build_info()``), read from its generated
    ``python/platform/build_info.py`` without importing TensorFlow; {} if absent."""
    path = os.path.join(_tf_dir(), "python", "platform", "build_info.py")
    spec = importlib.util.spec_from_file_location("_dlconv_tf_build_info", path)
    if spec is None or not os.path.exists(path):
        return {}
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception:   # a build_info.py we cannot read is a TensorFlow without CUDA facts
        return {}
    return dict(getattr(mod, "build_info", {}))


def cuda_plan():
    """(nvcc, "") when the library gets its DEVICE_GPU kernels, else (None, why not).

    They are built when nvcc is found and the installed TensorFlow is a CUDA build
    (``is_cuda_build`` in ``tf.sysconfig.get_build_info()``), unless ``DLCONV_TF_OPS_CUDA=0``;
    ``DLCONV_TF_OPS_CUDA=1`` makes their absence an error (:class:`TFOpsUnavailable`).
    """
    mode = os.environ.get(CUDA_SWITCH, "").strip()
    if mode == "0":
        return None, f"{CUDA_SWITCH}=0"
    nvcc, why = _toolchain.find_nvcc(), []
    if nvcc is None:
        why.append("nvcc was not found on PATH or in $CUDA_HOME/bin")
    if not _tf_build_info().get("is_cuda_build"):
        why.append("this TensorFlow is not a CUDA build (tf.sysconfig.get_build_info()['is_cuda_build'])")
    if why:
        if mode == "1":
            raise TFOpsUnavailable(f"{CUDA_SWITCH}=1 but " + " and ".join(why))
        return None, " and ".join(why)
    return nvcc, ""


def _key() -> str:
    """Cache folder name: TensorFlow version + hash of sources, compiler, flags, Python ABI,
    and whether (with which nvcc and archs) the CUDA kernels are compiled in."""
    h = hashlib.sha256()
    src = _csrc()
    nvcc, _ = cuda_plan()
    names = SOURCES + HEADERS + ((CUDA_SOURCES + CUDA_HEADERS) if nvcc else ())
    h.update(f"cuda={nvcc} archs={_toolchain.cuda_archs() if nvcc else ''}".encode())
    for name in names:
        path = os.path.join(src, name)
        if os.path.exists(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    cxx = _compiler()
    h.update(cxx.encode())
    h.update(" ".join(_simd_flags()).encode())
    h.update(sys.implementation.cache_tag.encode())
    h.update(_tf_dir().encode())
    return f"tf{_tf_version()}-{h.hexdigest()[:16]}"


def cache_root() -> str:
    root = os.environ.get("DLCONV_TF_OPS_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "dlconv", "tf_ops")
    return root


def library_path() -> str:
    """Where the library for this TensorFlow and these sources lives (built or not)."""
    return os.path.join(cache_root(), _key(), LIB_NAME)


def _failed(name, cmd, log) -> str:
    """The one-line reason of a failed compile: its first line naming an error, else its last."""
    log.seek(0)
    out = log.read().splitlines()
    last = [ln for ln in out if "error" in ln][:1] or out[-1:]
    return f"compiling {name} failed ({os.path.basename(cmd[0])}): {last[0] if last else 'no output'}"


def _compile_all(jobs, logdir):
    """Run the (name, command) compile jobs side by side; the first failure is the reason, and
    the jobs still running then are stopped (a broken compiler does not wait for nvcc)."""
    running = []
    for name, cmd in jobs:
        log = open(os.path.join(logdir, name + ".log"), "w+")   # a file: no pipe to fill up
        running.append((name, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    failure = None
    try:
        while failure is None and any(p.poll() is None for _, _, p, _ in running):
            for name, cmd, p, log in running:
                if p.poll() not in (None, 0):
                    failure = _failed(name, cmd, log)
                    break
            time.sleep(0.05)
        for name, cmd, p, log in running:
            if failure is None and p.wait() != 0:
                failure = _failed(name, cmd, log)
    finally:
        for _, _, p, log in running:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    if failure:
        raise TFOpsUnavailable(failure)


def _build(folder: str) -> None:
    """Compile the library into ``folder`` (called under the folder's lock)."""
    import tensorflow as tf

    inc = os.path.join(_tf_dir(), "include")
    if not os.path.exists(os.path.join(inc, "tensorflow", "core", "framework", "op_kernel.h")):
        raise TFOpsUnavailable(f"TensorFlow's C++ headers are missing ({inc}/tensorflow/core/framework/op_kernel.h)")
    cxx, src = _compiler(), _csrc()
    nvcc, no_cuda = cuda_plan()
    print(f"dlconv: building the TensorFlow op library for TensorFlow {tf.__version__} (first use; "
          f"about a minute) into {folder}; "
          + (f"with DEVICE_GPU kernels (nvcc {nvcc})" if nvcc else f"CPU kernels only ({no_cuda})"),
          file=sys.stderr, flush=True)
    cflags = list(tf.sysconfig.get_compile_flags()) + ["-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
                                                      f"-I{src}"] + _simd_flags()
    lflags = ["-shared", "-fopenmp"] + list(tf.sysconfig.get_link_flags())
    cuda = None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        jobs, objs = [], []
        if nvcc:
            root, archs = _toolchain.cuda_root(nvcc), _toolchain.cuda_archs()
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            for name in CUDA_SOURCES:   # as setup.py compiles them for dlconv._C_cuda
                obj = os.path.join(tmp, name + ".o")
                jobs.append((name, [nvcc, "-c", os.path.join(src, name), "-o", obj, "-O3", "-std=c++17",
                                    "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{src}", *gencode]))
                objs.append(obj)
            cudart = next((os.path.join(root, d, "libcudart_static.a")
                           for d in ("lib64", "lib", os.path.join("targets", f"{platform.machine()}-linux", "lib"))
                           if os.path.exists(os.path.join(root, d, "libcudart_static.a"))), None)
            if cudart is None:
                raise TFOpsUnavailable(f"libcudart_static.a not found under {root} (needed for the DEVICE_GPU "
                                       f"kernels; {CUDA_SWITCH}=0 builds without them)")
            # static cudart, its symbols kept out of the library's exports (TensorFlow has its own
            # libcudart; the stream handle TensorFlow passes is a driver CUstream either can use)
            lflags += [cudart, "-Wl,--exclude-libs,libcudart_static.a", "-ldl", "-lrt", "-lpthread"]
            cuda = {"nvcc": nvcc, "root": root, "archs": archs}
        for name in SOURCES:   # one compiler per source, in parallel
            obj = os.path.join(tmp, name + ".o")
            extra = []
            if cuda and name == "tf_ops.cpp":   # the DEVICE_GPU kernels and their registration
                extra = ["-DGOOGLE_CUDA=1", f"-I{os.path.join(cuda['root'], 'include')}"]
            jobs.append((name, [cxx, "-c", os.path.join(src, name), "-o", obj] + cflags + extra))
            objs.append(obj)
        hint = f" ({CUDA_SWITCH}=0 builds it without the DEVICE_GPU kernels)" if cuda else ""
        try:
            _compile_all(jobs, tmp)
        except TFOpsUnavailable as exc:   # the hint only where nvcc's part failed
            cuda_part = any(str(exc).startswith(f"compiling {n} ") for n in CUDA_SOURCES)
            raise TFOpsUnavailable(f"{exc}{hint if cuda_part else ''}") from None
        tmp_lib = os.path.join(tmp, LIB_NAME)
        cmd = [cxx] + objs + ["-o", tmp_lib] + lflags
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise TFOpsUnavailable(f"linking the op library failed: "
                                   f"{(p.stderr.strip().splitlines() or ['?'])[-1]}{hint}")
        info = {"tensorflow": tf.__version__, "tf_dir": _tf_dir(), "compiler": cxx, "simd": _simd_flags(),
                "compile_flags": cflags, "link_flags": lflags, "gpu_kernels": cuda is not None, "cuda": cuda,
                "no_cuda_reason": no_cuda}
        with open(os.path.join(folder, "build.json"), "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp_lib, os.path.join(folder, LIB_NAME))   # atomic: readers never see half a file


_lock = threading.Lock()
_module = None
_reason = None


def load():
    """The loaded op library (``tf.load_op_library``'s module), building it on first use.

    Raises :class:`TFOpsUnavailable` with the one-line reason when it cannot be built or loaded
    (the same reason on every later call: one attempt per process).
    """
    global _module, _reason
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _reason is not None:
            raise TFOpsUnavailable(_reason)
        try:
            _module = _load()
        except TFOpsUnavailable as exc:
            _reason = str(exc)
            raise
        except Exception as exc:   # anything unexpected is a reason too, never a crash
            _reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise TFOpsUnavailable(_reason) from exc
        return _module


def _load():
    if os.environ.get(ENV_SWITCH, "1") == "0":
        raise TFOpsUnavailable(f"{ENV_SWITCH}=0")
    path = library_path()
    folder = os.path.dirname(path)
    failed = os.path.join(folder, "build-failed.txt")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".lock"), "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)      # another process may be building it
            if not os.path.exists(path):
                try:
                    _build(folder)
                except TFOpsUnavailable as exc:
                    with open(failed, "w") as f:
                        f.write(str(exc) + "\n")
                    raise
                if os.path.exists(failed):
                    os.remove(failed)
    import tensorflow as tf

    with open(os.path.join(folder, "build.json")) as f:
        built_for = json.load(f).get("tensorflow")
    if built_for != tf.__version__:
        raise TFOpsUnavailable(f"{path} was built for TensorFlow {built_for}, this is {tf.__version__}")
    _omp.apply()   # the library links libgomp, which reads GOMP_SPINCOUNT when it loads (dlconv._omp)
    try:
        return tf.load_op_library(path)
    except Exception as exc:
        raise TFOpsUnavailable(f"tf.load_op_library({path}) failed: {str(exc).splitlines()[0]}") from exc


def threading_knobs(serial_flops: float | None = None, serial_flops_backward: float | None = None,
                    unlocked_small: bool | None = None, serial_pool_elements: float | None = None) -> dict:
    """The op library's CPU threading knobs (csrc/tf_ops.cpp's threading note), changed where an
    argument is given; returns the previous values as a dict with these four keys.

    ``serial_flops``: forward and dense calls below this many flops run with a one-thread
    OpenMP team on TensorFlow's thread; ``serial_flops_backward``: the same for the conv
    backward passes (TensorFlow can run a layer's backward-data and backward-filter side by
    side); ``unlocked_small``: one-thread calls skip the process-wide kernel lock, so
    TensorFlow may run two of them at once; ``serial_pool_elements``: max pools (forward or
    gradient) of fewer input elements run with a one-thread team.  For benchmarks comparing settings in one process;
    the defaults are the measured choice.  Loads the library (:func:`load`)."""
    import ctypes

    load()
    for name, v in (("serial_flops", serial_flops), ("serial_flops_backward", serial_flops_backward),
                    ("serial_pool_elements", serial_pool_elements)):
        if v is not None and not (isinstance(v, (int, float)) and float(v) >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    lib = ctypes.CDLL(library_path())
    fn = lib.dlconv_tf_ops_threading
    fn.restype = None
    dbl, i32 = ctypes.c_double, ctypes.c_int
    fn.argtypes = [dbl, dbl, i32, ctypes.POINTER(dbl), ctypes.POINTER(dbl), ctypes.POINTER(i32)]
    old = dbl(), dbl(), i32()
    fn(-1.0 if serial_flops is None else float(serial_flops),
       -1.0 if serial_flops_backward is None else float(serial_flops_backward),
       -1 if unlocked_small is None else int(bool(unlocked_small)),
       ctypes.byref(old[0]), ctypes.byref(old[1]), ctypes.byref(old[2]))
    pool = lib.dlconv_tf_ops_pool_threading
    pool.restype, pool.argtypes = dbl, [dbl]
    old_pool = pool(-1.0 if serial_pool_elements is None else float(serial_pool_elements))
    return {"serial_flops": old[0].value, "serial_flops_backward": old[1].value,
            "unlocked_small": bool(old[2].value), "serial_pool_elements": old_pool}


def available() -> bool:
    """Whether the op library is loaded or loads now (building it if needed)."""
    try:
        load()
        return True
    except TFOpsUnavailable:
        return False


def reason() -> str:
    """Why the library is unavailable ("" when it is loaded; attempts the load)."""
    try:
        load()
        return ""
    except TFOpsUnavailable as exc:
        return str(exc)


#: Below this many FLOPs a native op's CPU kernel runs on one thread (``SERIAL_FLOPS`` in
#: csrc/tf_ops.cpp, which tests/test_tf_ops.py checks against this value).
SERIAL_FLOPS = 2e7
#: The same for the conv backward passes while dlconv's OpenMP team has at most
#: ``SIDE_BY_SIDE_MAX_THREADS`` threads (csrc/tf_ops.cpp; tests/test_tf_threading.py checks).
SERIAL_FLOPS_BACKWARD = 1e8
#: Max pools (forward or gradient) of fewer input elements than this run on one thread
#: (``SERIAL_POOL_ELEMENTS`` in csrc/tf_ops.cpp).
SERIAL_POOL_ELEMENTS = 131072
SIDE_BY_SIDE_MAX_THREADS = 2
#: The library's threading switch (read once per process by csrc/tf_ops.cpp).
THREADING_SWITCH = "DLCONV_TF_THREADING"


def threads_used() -> str:
    """Which threads the native ops' CPU kernels use, as csrc/tf_ops.cpp decides it (with the
    default :func:`threading_knobs`)."""
    mode = os.environ.get(THREADING_SWITCH, "")
    mode = mode if mode in ("worker", "serial") else "openmp"
    try:
        team = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:   # unset or not a number: OpenMP's default, the CPUs this process may use
        team = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    def e(x):   # 1e8, not 1e+08
        return f"{x:.0e}".replace("e+0", "e").replace("e+", "e")

    backward = (f"conv backward passes below {e(SERIAL_FLOPS_BACKWARD)}, others below {e(SERIAL_FLOPS)}"
                if team <= SIDE_BY_SIDE_MAX_THREADS else f"below {e(SERIAL_FLOPS)}")
    small = (f"{backward} FLOPs (max pools below {SERIAL_POOL_ELEMENTS} input elements) on the calling "
             f"TensorFlow thread alone, without the lock (TensorFlow may run two side by side)")
    if mode == "serial":
        return (f"CPU kernels each on the calling TensorFlow thread alone ({THREADING_SWITCH}=serial): "
                f"{small}, larger ones one at a time (a process-wide lock)")
    where = "on the calling TensorFlow thread" if mode == "openmp" else "on one dedicated dlconv thread"
    return (f"CPU kernels: {small}; larger ones one at a time (a process-wide lock) {where} with "
            f"dlconv's OpenMP team of {team} threads ({THREADING_SWITCH}={mode}; not TensorFlow's "
            f"intra-op pool)")


def status() -> dict:
    """What ``dlconv info`` reports, without importing TensorFlow or building anything."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return {"native": False, "why": f"{ENV_SWITCH}=0: the TensorFlow bridge uses numpy_function callbacks"}
    try:
        path = library_path()
    except TFOpsUnavailable as exc:
        return {"native": False, "why": f"{exc}: the TensorFlow bridge uses numpy_function callbacks"}
    nvcc, no_cuda = cuda_plan()
    gpu = ("; DEVICE_GPU kernels too (CUDA C++ kernels on TensorFlow's stream; never run: see docs/layers.md)"
           if nvcc else f"; CPU kernels only ({no_cuda})")
    failed = os.path.join(os.path.dirname(path), "build-failed.txt")
    gpu += f"; {threads_used()}"
    if os.path.exists(path):
        return {"native": True, "why": f"graph-native ops (REGISTER_OP), library {path}{gpu}", "file": path,
                "gpu_kernels": nvcc is not None}
    if os.path.exists(failed):
        with open(failed) as f:
            why = f.read().strip()
        return {"native": False, "why": f"op library build failed: {why}; the TensorFlow bridge uses "
                                        f"numpy_function callbacks"}
    return {"native": True, "why": f"graph-native ops (REGISTER_OP), built on first use into {path}{gpu}",
            "file": path, "gpu_kernels": nvcc is not None}


if __name__ == "__main__":   # python -m dlconv.tf_ops: build (if needed) and print the path
    try:
        load()
    except TFOpsUnavailable as exc:
        sys.exit(f"dlconv.tf_ops: {exc}")
    print(library_path())
