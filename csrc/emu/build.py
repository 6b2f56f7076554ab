"""Build the emulated CUDA C++ kernels (csrc/*.cu on the CPU, see cuda_emu.h) into a sanitized
standalone driver: rewrite.py turns every csrc/*.cu and *.cuh into host C++ in OUT/src, g++ compiles
them with the driver, one executable per sanitizer set:

  asan  -fsanitize=address,undefined (+ float-cast-overflow), -fno-sanitize-recover=all
  tsan  -fsanitize=thread

Builds are cached under OUT/<sanitizer>-<hash of the sources, flags and compiler version>, so a
second call with unchanged sources costs nothing.

    python csrc/emu/build.py [--out build/cuda_emu] [--sanitizer asan|tsan ...]   (prints the paths)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import rewrite  # noqa: E402

CXX = os.environ.get("CXX", "g++")
# -O1: sanitizer runs want real inlining (speed) but a faithful stack; -std=c++17 as nvcc gets.
COMMON = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
SANITIZERS = {
    "asan": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}
# Kernels are CUDA sources; the driver is plain host C++ against the same stand-in.
KERNEL_SOURCES = ("cuda_conv.cu", "cuda_dense.cu", "selftest.cu")  # selftest.cu: the emulator's own checks
APPEND = {"cuda_conv.cu": os.path.join(HERE, "controls.cu")}


def _inputs() -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cuh"))
                   + glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(HERE, "*"))
                   + glob.glob(os.path.join(HERE, "include", "*")))
    return [f for f in files if os.path.isfile(f) and not f.endswith(".pyc")]


def _hash(sanitizer: str) -> str:
    h = hashlib.sha256()
    for f in _inputs():
        h.update(os.path.relpath(f, CSRC).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(" ".join([CXX] + COMMON + SANITIZERS[sanitizer]).encode())
    h.update(subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def _compile(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulated build failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")


def build(sanitizer: str, out: str) -> str:
    """Path of the driver executable for `sanitizer`, built unless a build of the same inputs exists."""
    if sanitizer not in SANITIZERS:
        raise ValueError(f"sanitizer must be one of {sorted(SANITIZERS)}, got {sanitizer!r}")
    target = os.path.join(out, f"{sanitizer}-{_hash(sanitizer)}")
    exe = os.path.join(target, "driver")
    if os.path.exists(exe):
        return exe
    tmp = target + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    # every CUDA source and header, rewritten side by side so that includes find the rewritten copy
    for f in sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cuh"))):
        name = os.path.basename(f)
        rewrite.rewrite_file(f, os.path.join(src, name), APPEND.get(name))
    rewrite.rewrite_file(os.path.join(HERE, "selftest.cu"), os.path.join(src, "selftest.cu"))
    flags = COMMON + SANITIZERS[sanitizer] + ["-I", src, "-I", os.path.join(HERE, "include"), "-I", CSRC]
    jobs = []
    for name in KERNEL_SOURCES:
        jobs.append([CXX, "-x", "c++", *flags, "-c", os.path.join(src, name), "-o", os.path.join(tmp, name + ".o")])
    jobs.append([CXX, *flags, "-c", os.path.join(HERE, "driver.cpp"),
                 "-o", os.path.join(tmp, "driver.o")])
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        list(ex.map(_compile, jobs))
    objs = [os.path.join(tmp, n + ".o") for n in KERNEL_SOURCES] + [os.path.join(tmp, "driver.o")]
    _compile([CXX, *COMMON, *SANITIZERS[sanitizer], *objs, "-o", os.path.join(tmp, "driver")])
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(CSRC), "build", "cuda_emu"))
    ap.add_argument("--sanitizer", action="append", choices=sorted(SANITIZERS))
    a = ap.parse_args(argv)
    for s in a.sanitizer or sorted(SANITIZERS):
        print(build(s, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
