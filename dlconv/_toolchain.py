"""The build's toolchain facts, shared by setup.py (dlconv._C, dlconv._C_cuda) and dlconv.tf_ops
(the TensorFlow op library built on first use): where nvcc and the CUDA toolkit are, which SASS
targets to compile, which x86 SIMD flags this machine takes.

Standard library only, and no import of the package: setup.py cannot import dlconv at build time,
so it loads this file by its path (importlib.util.spec_from_file_location).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

DEFAULT_CUDA_ARCHS = "80;90"  # A100 and H100 SASS; PTX of the last one serves newer GPUs


def _cuda_home():
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


def find_nvcc():
    """nvcc on PATH or in $CUDA_HOME/bin ($CUDA_PATH too), else None."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    home = _cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


def cuda_root(nvcc: str) -> str:
    """The toolkit root: $CUDA_HOME, else what nvcc itself reports as TOP (nvcc may be a
    wrapper script outside the toolkit), else the folder above nvcc's bin/."""
    home = _cuda_home()
    if home and os.path.isdir(os.path.join(home, "include")):
        return home
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line.split("=", 1)[1].strip())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_archs():
    """SASS targets from DLCONV_CUDA_ARCHS ("80;90" by default; PTX is added for the last)."""
    return [a for a in os.environ.get("DLCONV_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a]


def simd():
    """(compiler flags, macros) for the x86 SIMD this machine and the compiler both have:
    -mavx2/-mfma (DLCONV_HAVE_AVX2), -mavx512f (DLCONV_HAVE_AVX512, unless DLCONV_AVX512=0);
    none with DLCONV_NATIVE=0 or off x86."""
    if os.environ.get("DLCONV_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return [], []
    have = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    flags, macros = [], []
    if {"avx2", "fma"} <= have:
        flags += ["-mavx2", "-mfma"]
        macros.append(("DLCONV_HAVE_AVX2", "1"))
    if "avx512f" in have and os.environ.get("DLCONV_AVX512", "1") != "0":
        flags += ["-mavx512f"]
        macros.append(("DLCONV_HAVE_AVX512", "1"))
    return flags, macros
