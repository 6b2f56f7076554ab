"""Build of dlconv: the Python package, the Numba kernels (kernels/ → dlconv.kernels),
the C++ CPU extension dlconv._C and, when nvcc is found, the CUDA extension dlconv._C_cuda.

Environment:
  DLCONV_CUDA=0   never build dlconv._C_cuda
  DLCONV_CUDA=1   build it, and fail the build clearly if nvcc is missing
  (unset)         build it when nvcc is on PATH or in $CUDA_HOME/bin
  DLCONV_CUDA_ARCHS="80;90"   SASS targets (PTX is added for the highest one)
  DLCONV_NATIVE=0 do not add -mavx2/-mfma/-mavx512f even if this machine has them
  DLCONV_XLA_FFI=0  build dlconv._C without the XLA FFI handlers (csrc/ffi_cpu.cpp)
  DLCONV_XLA_FFI_INCLUDE=dir  where xla/ffi/api/ffi.h lies (default: jaxlib's include/)

The XLA FFI handlers (the JAX bridge's custom calls) need only XLA's FFI headers, which ship
with jaxlib: pyproject.toml puts jaxlib in the isolated build environment, and a build
without isolation takes them from the jaxlib installed there.  They are header-only (the
handlers link nothing of jaxlib); without them dlconv._C is built without handlers and the
JAX bridge falls back to jax.pure_callback.
"""

import glob
import os
import platform
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:
    import pybind11
except ImportError:  # pragma: no cover - pyproject's build-system brings it
    sys.exit("dlconv's build needs pybind11 (pip install pybind11), which pyproject.toml declares")

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_by_path(name, relpath):
    """A module of the package, loaded by its file path (setup.py cannot import dlconv)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# nvcc, the CUDA root, the SASS targets and the SIMD flags: the facts dlconv.tf_ops uses too.
toolchain = _load_by_path("dlconv_toolchain", os.path.join("dlconv", "_toolchain.py"))


def _cuda_wanted():
    mode = os.environ.get("DLCONV_CUDA", "").strip()
    nvcc = toolchain.find_nvcc()
    if mode == "0":
        return None
    if mode == "1" and nvcc is None:
        sys.exit("DLCONV_CUDA=1 but nvcc was not found on PATH or in $CUDA_HOME/bin: "
                 "install the CUDA toolkit or unset DLCONV_CUDA")
    return nvcc


def _xla_ffi_include():
    """The folder holding xla/ffi/api/ffi.h, or (None, why not).  jaxlib is located, not
    imported (its import pulls in its whole runtime)."""
    if os.environ.get("DLCONV_XLA_FFI", "").strip() == "0":
        return None, "DLCONV_XLA_FFI=0"
    cand = os.environ.get("DLCONV_XLA_FFI_INCLUDE")
    if not cand:
        import importlib.util
        spec = importlib.util.find_spec("jaxlib")
        if spec is None or not spec.submodule_search_locations:
            return None, "jaxlib is not installed in the build environment"
        cand = os.path.join(list(spec.submodule_search_locations)[0], "include")
    if not os.path.exists(os.path.join(cand, "xla", "ffi", "api", "ffi.h")):
        return None, f"no xla/ffi/api/ffi.h under {cand}"
    return cand, ""


SIMD_FLAGS, SIMD_MACROS = toolchain.simd()
COMMON_CXX = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]


class BuildExt(build_ext):
    """build_ext that sends *.cu sources through nvcc and links static cudart."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if not cu:
            return super().build_extension(ext)
        nvcc = ext.nvcc
        cuda_root = toolchain.cuda_root(nvcc)
        objdir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        archs = toolchain.cuda_archs()
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        commands = []
        for src in cu:
            obj = os.path.join(objdir, os.path.basename(src) + ".o")
            # No --use_fast_math: it swaps expf/tanhf/division for approximations and flushes
            # denormals, so the C++ CUDA results would differ from the Numba CUDA and reference
            # ones (~1e-5 relative) for a gain no dlconv measurement has shown (the kernels are
            # bound by loads and FMAs, which fast-math does not change; FMA contraction stays on).
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Icsrc",
                   f"-DDLCONV_CUDA_ARCHS=\"{' '.join(archs)}\"", *gencode]
            commands.append((cmd, obj))
        # the .cu files are independent: compile them side by side (nvcc is single-threaded)
        import concurrent.futures

        def compile_one(job):
            print(" ".join(job[0]), flush=True)
            subprocess.check_call(job[0], cwd=HERE)
            return job[1]

        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(commands), os.cpu_count() or 1))) as ex:
            objects = list(ex.map(compile_one, commands))
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = objects + ext.extra_objects
        libdir = None
        for cand in ("lib64", "lib", os.path.join("targets", f"{platform.machine()}-linux", "lib")):
            if os.path.exists(os.path.join(cuda_root, cand, "libcudart_static.a")):
                libdir = os.path.join(cuda_root, cand)
                break
        if libdir is None:
            raise RuntimeError(f"libcudart_static.a not found under {cuda_root}")
        ext.include_dirs.append(os.path.join(cuda_root, "include"))
        # static cudart; libcuda is loaded by cudart at run time, never linked.
        ext.extra_objects.append(os.path.join(libdir, "libcudart_static.a"))
        ext.extra_link_args += ["-ldl", "-lrt", "-lpthread"]
        ext.define_macros.append(("DLCONV_CUDA_ARCHS", f"\"{' '.join(archs)}\""))
        super().build_extension(ext)


class BuildPy(build_py):
    """build_py that also ships csrc/'s C++/CUDA sources inside the package as dlconv/csrc: the
    TensorFlow op library (dlconv/tf_ops.py) is compiled from them on first use, after
    installation, and a wheel has no source tree beside it (an editable install reads csrc/)."""

    CSRC_PATTERNS = ("*.cpp", "*.h", "*.cu", "*.cuh")

    def run(self):
        super().run()
        if self.editable_mode:    # the source tree's csrc/ is found directly
            return
        dest = os.path.join(self.build_lib, "dlconv", "csrc")
        self.mkpath(dest)
        for pattern in self.CSRC_PATTERNS:
            for src in sorted(glob.glob(os.path.join(HERE, "csrc", pattern))):
                self.copy_file(src, os.path.join(dest, os.path.basename(src)))


def _extensions():
    inc = [pybind11.get_include(), os.path.join(HERE, "csrc")]
    cpu_src = sorted(glob.glob("csrc/cpu_*.cpp")) + ["csrc/bind_cpu.cpp"]
    cpu_inc, cpu_macros = list(inc), list(SIMD_MACROS)
    ffi_inc, why = _xla_ffi_include()
    if ffi_inc is not None:
        print(f"dlconv: XLA FFI handlers built into dlconv._C and dlconv._C_cuda (headers from {ffi_inc})")
        cpu_src += ["csrc/ffi_cpu.cpp", "csrc/ffi_pool.cpp"]
        cpu_inc.append(ffi_inc)
        cpu_macros.append(("DLCONV_XLA_FFI", "1"))
    else:
        print(f"dlconv: XLA FFI handlers not built ({why}); the JAX bridge will use jax.pure_callback")
    exts = [Extension("dlconv._C", cpu_src, include_dirs=cpu_inc, language="c++",
                      extra_compile_args=COMMON_CXX + SIMD_FLAGS,
                      extra_link_args=["-fopenmp"], define_macros=cpu_macros)]
    nvcc = _cuda_wanted()
    if nvcc is not None:
        cu = sorted(glob.glob("csrc/*.cu")) + ["csrc/bind_cuda.cpp"]
        cuda_inc, cuda_macros = list(inc), []
        if ffi_inc is not None:
            cu.append("csrc/ffi_cuda.cpp")
            cuda_inc.append(ffi_inc)
            cuda_macros.append(("DLCONV_XLA_FFI", "1"))
        ext = Extension("dlconv._C_cuda", cu, include_dirs=cuda_inc, language="c++",
                        define_macros=cuda_macros,
                        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"])
        ext.nvcc = nvcc
        exts.append(ext)
    else:
        print("dlconv: nvcc not used (DLCONV_CUDA=0 or not found); building without dlconv._C_cuda")
    return exts


TORCH = "torch>=2.4"
JAX = "jax>=0.5"

setup(
    name="dlconv",
    version="0.1.0",
    description="Hand-written convolution and dense kernels (Numba CUDA, C++/CUDA) as drop-in Keras layers",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dlconv", "dlconv.backends", "dlconv.bench", "dlconv.bridges", "dlconv.kernels"],
    package_dir={"dlconv": "dlconv", "dlconv.backends": "dlconv/backends", "dlconv.kernels": "kernels"},
    # The script and style that `dlconv explain --html` inlines into its page.
    package_data={"dlconv": ["explain_page.js", "explain_page.css"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "numba>=0.61",
        "numba-cuda>=0.20",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "pillow>=10",          # dlconv explain --animate writes its GIF with Pillow
        "tqdm>=4.66",
        "py-cpuinfo>=9",
        "scikit-learn>=1.4",
    ],
    extras_require={
        # The Keras torch and JAX backends: any torch with torch.library.custom_op (2.4+),
        # any JAX with the public jax.ffi API.
        "torch": [TORCH],
        "jax": [JAX],
        # The tests run the layers on all three Keras backends.  The upper bound on torch keeps
        # pip on the newest CPU build it can find locally on the project's machines (2.13.0+cpu);
        # a range admitting newer releases pulls a CUDA build of several GB.  pybind11 too: pip
        # builds in an isolated environment that has it (pyproject.toml), but a rebuild in the
        # venv (pip install --no-build-isolation -e ., benchmarks/gpu_check.sh) needs it there.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "pybind11>=2.12",
                 # drives Debian's chromium (chromium-driver) in tests/test_explain_html.py
                 "selenium>=4.10",
                 f"{TORCH},<2.14", JAX],
    },
    entry_points={"console_scripts": ["dlconv = dlconv.cli:main"]},
    zip_safe=False,
)
