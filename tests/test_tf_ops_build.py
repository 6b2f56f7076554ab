"""How dlconv's TensorFlow op library is built and found (dlconv.tf_ops): the DEVICE_GPU
kernels compiled in when nvcc and a CUDA build of TensorFlow are there, the switch that
turns them off or requires them, and the C++ sources a wheel ships inside the package.

The GPU kernels are compiled and registered here, but never run: this machine has no GPU and
the GPU machine has no TensorFlow (docs/layers.md, "TensorFlow's native ops").
"""

import ctypes
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dlconv import tf_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- CUDA decision
def test_cuda_switch_off_gives_cpu_kernels_only(monkeypatch):
    monkeypatch.setenv(tf_ops.CUDA_SWITCH, "0")
    assert tf_ops.cuda_plan() == (None, f"{tf_ops.CUDA_SWITCH}=0")


def test_cuda_required_without_nvcc_is_refused_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(tf_ops.CUDA_SWITCH, "1")
    monkeypatch.setenv("PATH", str(tmp_path))          # no nvcc on it
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(tf_ops.TFOpsUnavailable, match="DLCONV_TF_OPS_CUDA=1 but nvcc was not found"):
        tf_ops.cuda_plan()
    monkeypatch.delenv(tf_ops.CUDA_SWITCH)             # auto: CPU kernels only, and why
    nvcc, why = tf_ops.cuda_plan()
    assert nvcc is None and "nvcc was not found" in why


def test_cuda_required_with_a_tensorflow_without_cuda_is_refused(monkeypatch):
    monkeypatch.setenv(tf_ops.CUDA_SWITCH, "1")
    monkeypatch.setattr(tf_ops, "_tf_build_info", lambda: {"is_cuda_build": False})
    with pytest.raises(tf_ops.TFOpsUnavailable, match="not a CUDA build"):
        tf_ops.cuda_plan()


def test_build_info_is_read_without_importing_tensorflow():
    pytest.importorskip("tensorflow")
    code = ("import sys; from dlconv import tf_ops; i = tf_ops._tf_build_info(); "
            "print('is_cuda_build' in i, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_the_cuda_choice_is_part_of_the_cache_key(monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.setenv(tf_ops.CUDA_SWITCH, "0")
    cpu_only = tf_ops.library_path()
    monkeypatch.setattr(tf_ops, "cuda_plan", lambda: ("/opt/cuda/bin/nvcc", ""))
    assert tf_ops.library_path() != cpu_only


# ----------------------------------------------------------------------------- GPU kernels
def test_gpu_kernels_are_compiled_and_registered_when_cuda_is_there():
    """The library this process loads (built with -DGOOGLE_CUDA=1 against TensorFlow's headers,
    linked with csrc/cuda_*.cu compiled by nvcc) registers every op but the CPU-only ones
    (tf_ops.CPU_ONLY_OPS: the max pool) for DEVICE_GPU too."""
    tf = pytest.importorskip("tensorflow")
    nvcc, why = tf_ops.cuda_plan()
    if nvcc is None:
        pytest.skip(f"the op library is built without DEVICE_GPU kernels here: {why}")
    tf_ops.load()
    from tensorflow.python.framework import kernels

    for op in tf_ops.OP_NAMES:
        devices = {k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel}
        assert devices == ({"CPU"} if op in tf_ops.CPU_ONLY_OPS else {"CPU", "GPU"}), (op, devices)
    path = tf_ops.library_path()
    assert ctypes.CDLL(path).dlconv_tf_ops_has_gpu_kernels() == 1
    with open(os.path.join(os.path.dirname(path), "build.json")) as f:
        built = json.load(f)
    assert built["gpu_kernels"] is True and built["cuda"]["nvcc"] == nvcc
    assert any("libcudart_static.a" in flag for flag in built["link_flags"])
    assert tf_ops.status()["gpu_kernels"] is True
    # The CPU kernels of that same library still serve CPU tensors (TensorFlow sees no GPU here).
    x = tf.ones((1, 4, 4, 1))
    y = tf_ops.load().dlconv_conv2d(x, tf.ones((3, 3, 1, 2)), tf.zeros((0,)))
    assert y.shape == (1, 2, 2, 2) and float(y[0, 0, 0, 0]) == 9.0


# ----------------------------------------------------------------------------- sources in a wheel
def test_the_package_ships_the_sources_the_op_library_needs(tmp_path):
    """setup.py's build_py (what a wheel's dlconv/ holds) copies csrc/ into dlconv/csrc; from
    there tf_ops finds them, and they give the same cache key as the source tree (same bytes:
    a library built from either serves both)."""
    pytest.importorskip("tensorflow")
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "DLCONV_CUDA": "0"})
    shipped = set(os.listdir(lib / "dlconv" / "csrc"))
    needed = set(tf_ops.SOURCES + tf_ops.HEADERS + tf_ops.CUDA_SOURCES + tf_ops.CUDA_HEADERS)
    assert needed <= shipped, sorted(needed - shipped)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(lib)!r})
        import dlconv.tf_ops as t
        print(t.__file__); print(t._csrc()); print(t._key())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(tmp_path)).stdout.split()
    assert out[0] == str(lib / "dlconv" / "tf_ops.py")
    assert out[1] == str(lib / "dlconv" / "csrc")
    assert out[2] == tf_ops._key()


def test_missing_sources_are_a_reason_not_a_crash(tmp_path):
    """An installation with neither dlconv/csrc nor csrc/ beside it: the reason names what is
    missing."""
    pkg = tmp_path / "dlconv"
    pkg.mkdir()
    with open(os.path.join(ROOT, "dlconv", "tf_ops.py")) as f:
        (pkg / "tf_ops.py").write_text(f.read())
    (pkg / "__init__.py").write_text("")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import dlconv.tf_ops as t
        try:
            t._csrc()
        except t.TFOpsUnavailable as exc:
            print("REASON", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "REASON the C++ sources (csrc/tf_ops.cpp) are not found" in out


# ----------------------------------------------------------------------------- the documented deploy
def _doc_blocks(heading):
    """The ```py blocks of docs/layers.md's section `heading` (test_readme runs the ```python
    ones in-process; these two need two processes)."""
    with open(os.path.join(ROOT, "docs", "layers.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, flags=re.S)


def test_the_documented_deploy_runs_in_two_processes_and_tflite_names_the_op(tmp_path):
    tf = pytest.importorskip("tensorflow")
    blocks = _doc_blocks("Deploying with TensorFlow")
    assert len(blocks) == 2
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for i, block in enumerate(blocks):
        p = subprocess.run([sys.executable, "-c", block], cwd=str(tmp_path), env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, (f"docs block {i + 1}", p.stderr[-3000:])
    assert "keras" not in blocks[1] and "dlconv.layers" not in blocks[1]
    # TFLite does not convert dlconv's ops: the converter's error names the op.
    tf_ops.load()
    with pytest.raises(Exception, match=r"'tf\.DlconvConv2D' op is neither a custom op nor a flex op"):
        tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved")).convert()


def test_the_source_hash_covers_every_header_the_sources_include():
    # The cache key hashes SOURCES + HEADERS (+ the CUDA lists): a project header included by a
    # compiled file but missing from HEADERS would let an edited kernel reuse a stale library.
    csrc = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")
    listed = set(tf_ops.HEADERS) | set(tf_ops.CUDA_HEADERS)
    todo, seen = list(tf_ops.SOURCES + tf_ops.CUDA_SOURCES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        with open(os.path.join(csrc, name), encoding="utf-8") as f:
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.M):
                if os.path.exists(os.path.join(csrc, inc)):
                    todo.append(inc)
    included = {n for n in seen if not n.endswith((".cpp", ".cu"))}
    assert included <= listed, f"headers compiled into the op library but not hashed: {sorted(included - listed)}"
