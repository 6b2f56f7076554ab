"""dlconv's TensorFlow op library: built on first use, cached per TensorFlow version, loaded.

``csrc/tf_ops.cpp`` registers graph-native TensorFlow ops (``REGISTER_OP``) whose CPU kernels
call dlconv's C++ kernels directly — no Python callback, no GIL::

    DlconvConv2D, DlconvConv2DBackpropInput, DlconvConv2DBackpropFilter, DlconvDense, DlconvDenseGrad

How it is built and found
-------------------------
The plain package does not need TensorFlow to build or import (``pip install`` builds with
build isolation, where TensorFlow is absent).  So the op library is built *on first use*, the
way PyTorch's C++ extension loader does it: :func:`load` compiles ``csrc/tf_ops.cpp`` with
``cpu_conv.cpp`` and ``cpu_dense.cpp`` against the installed TensorFlow's headers and flags
(``tf.sysconfig.get_compile_flags()`` / ``get_link_flags()``) with ``g++`` into a cache folder
keyed by the TensorFlow version and a hash of the sources, compiler and SIMD flags::

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
from importlib import metadata

__all__ = ["TFOpsUnavailable", "load", "reason", "library_path", "available", "status", "OP_NAMES",
           "SOURCES", "HEADERS"]

#: The ops the library registers (TensorFlow's Python wrappers are their snake_case names).
OP_NAMES = ("DlconvConv2D", "DlconvConv2DBackpropInput", "DlconvConv2DBackpropFilter", "DlconvDense",
            "DlconvDenseGrad")
#: Compiled into the library (relative to csrc/).
SOURCES = ("tf_ops.cpp", "cpu_conv.cpp", "cpu_conv_grouped.cpp", "cpu_dense.cpp")
#: Hashed too: a change in any header rebuilds.
HEADERS = ("geometry.h", "cpu_kernels.h", "cpu_gemm.h", "cpu_act.h", "cpu_conv_direct.h",
           "cpu_conv_winograd.h", "cpu_dense_backward.h", "cpu_conv_grouped.h")
LIB_NAME = "_dlconv_tf_ops.so"
#: Environment switch: "0" never builds or uses the library (the bridge uses callbacks).
ENV_SWITCH = "DLCONV_TF_OPS"


class TFOpsUnavailable(RuntimeError):
    """The op library cannot be built or loaded here; the message is the one-line reason."""


def _csrc() -> str:
    """The folder holding the C++ sources: the source tree's csrc/ (editable installs) or a copy
    shipped inside the package as dlconv/csrc."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.exists(os.path.join(cand, "tf_ops.cpp")):
            return cand
    raise TFOpsUnavailable(f"the C++ sources (csrc/tf_ops.cpp) are not found next to {here}")


def _simd_flags():
    """-mavx2/-mfma/-mavx512f and their macros when this CPU has them (as setup.py decides)."""
    if os.environ.get("DLCONV_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    have = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    flags = []
    if {"avx2", "fma"} <= have:
        flags += ["-mavx2", "-mfma", "-DDLCONV_HAVE_AVX2=1"]
    if "avx512f" in have and os.environ.get("DLCONV_AVX512", "1") != "0":
        flags += ["-mavx512f", "-DDLCONV_HAVE_AVX512=1"]
    return flags


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


def _key() -> str:
    """Cache folder name: TensorFlow version + hash of sources, compiler, flags, Python ABI."""
    h = hashlib.sha256()
    src = _csrc()
    for name in SOURCES + HEADERS:
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


def _build(folder: str) -> None:
    """Compile the library into ``folder`` (called under the folder's lock)."""
    import tensorflow as tf

    inc = os.path.join(_tf_dir(), "include")
    if not os.path.exists(os.path.join(inc, "tensorflow", "core", "framework", "op_kernel.h")):
        raise TFOpsUnavailable(f"TensorFlow's C++ headers are missing ({inc}/tensorflow/core/framework/op_kernel.h)")
    cxx, src = _compiler(), _csrc()
    print(f"dlconv: building the TensorFlow op library for TensorFlow {tf.__version__} (first use; "
          f"about a minute) into {folder}", file=sys.stderr, flush=True)
    cflags = list(tf.sysconfig.get_compile_flags()) + ["-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
                                                      f"-I{src}"] + _simd_flags()
    lflags = ["-shared", "-fopenmp"] + list(tf.sysconfig.get_link_flags())
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        procs, objs = [], []
        for name in SOURCES:   # one compiler per source, in parallel
            obj = os.path.join(tmp, name + ".o")
            cmd = [cxx, "-c", os.path.join(src, name), "-o", obj] + cflags
            procs.append((name, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True)))
            objs.append(obj)
        for name, cmd, p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                last = [ln for ln in out.splitlines() if "error" in ln][:1] or out.splitlines()[-1:]
                raise TFOpsUnavailable(f"compiling {name} failed ({' '.join(cmd[:1])}): "
                                       f"{last[0] if last else 'no output'}")
        tmp_lib = os.path.join(tmp, LIB_NAME)
        cmd = [cxx] + objs + ["-o", tmp_lib] + lflags
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise TFOpsUnavailable(f"linking the op library failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        info = {"tensorflow": tf.__version__, "tf_dir": _tf_dir(), "compiler": cxx, "simd": _simd_flags(),
                "compile_flags": cflags, "link_flags": lflags}
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
    try:
        return tf.load_op_library(path)
    except Exception as exc:
        raise TFOpsUnavailable(f"tf.load_op_library({path}) failed: {str(exc).splitlines()[0]}") from exc


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


def status() -> dict:
    """What ``dlconv info`` reports, without importing TensorFlow or building anything."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return {"native": False, "why": f"{ENV_SWITCH}=0: the TensorFlow bridge uses numpy_function callbacks"}
    try:
        path = library_path()
    except TFOpsUnavailable as exc:
        return {"native": False, "why": f"{exc}: the TensorFlow bridge uses numpy_function callbacks"}
    failed = os.path.join(os.path.dirname(path), "build-failed.txt")
    if os.path.exists(path):
        return {"native": True, "why": f"graph-native ops (REGISTER_OP), library {path}", "file": path}
    if os.path.exists(failed):
        with open(failed) as f:
            why = f.read().strip()
        return {"native": False, "why": f"op library build failed: {why}; the TensorFlow bridge uses "
                                        f"numpy_function callbacks"}
    return {"native": True, "why": f"graph-native ops (REGISTER_OP), built on first use into {path}",
            "file": path}


if __name__ == "__main__":   # python -m dlconv.tf_ops: build (if needed) and print the path
    try:
        load()
    except TFOpsUnavailable as exc:
        sys.exit(f"dlconv.tf_ops: {exc}")
    print(library_path())
