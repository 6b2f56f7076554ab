"""``dlconv info``, ``python -m dlconv info --json`` and the lightness of ``import dlconv``.

Everything that could be polluted by what other tests imported runs in a fresh
interpreter (``subprocess`` with ``sys.executable``).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

import dlconv
from dlconv import backends

ROOT = pathlib.Path(dlconv.__file__).resolve().parent
PACKAGES = ("tensorflow", "keras", "torch", "jax", "jaxlib", "numba", "numba-cuda", "numpy", "pybind11")
BACKENDS = ("reference", "numba", "cpp")
CUDA_EXT_BUILT = any(ROOT.glob("_C_cuda*.so")) or any(ROOT.glob("_C_cuda*.pyd"))


def _py(code: str, *args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, *(["-c", code] if code else []), *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def _installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------- dlconv info
def test_python_m_dlconv_info_json_reports_versions_and_backends():
    d = json.loads(_py("", "-m", "dlconv", "info", "--json").stdout)
    assert d["dlconv"] == dlconv.__version__
    assert d["python"] == ".".join(map(str, sys.version_info[:3]))
    assert d["versions"] == {p: _installed(p) for p in PACKAGES}
    assert set(d["backends"]) == set(BACKENDS)
    for name, b in d["backends"].items():
        for side in ("cpu", "cuda"):
            assert isinstance(b[side]["usable"], bool), (name, side)
            assert isinstance(b[side]["why"], str) and b[side]["why"], (name, side)
    # the NumPy reference runs anywhere; it never claims CUDA
    assert d["backends"]["reference"]["cpu"]["usable"] is True
    assert d["backends"]["reference"]["cuda"]["usable"] is False
    assert set(d["extensions"]) == {"dlconv._C", "dlconv._C_cuda"}
    for ext in d["extensions"].values():
        assert isinstance(ext["built"], bool)
        assert ext.get("file") if ext["built"] else ext.get("why")
    assert d["extensions"]["dlconv._C_cuda"]["built"] is CUDA_EXT_BUILT
    assert isinstance(d["numba_cuda"]["available"], bool) and isinstance(d["numba_cuda"]["gpus"], list)


def test_dlconv_info_text():
    exe = shutil.which("dlconv", path=str(pathlib.Path(sys.executable).parent))
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "dlconv", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"dlconv {dlconv.__version__} on Python {sys.version_info.major}.")
    for p in PACKAGES:
        assert f"  {p:<11} {_installed(p)}" in text
    for name in BACKENDS:
        for side in ("cpu", "cuda"):
            assert any(line.split()[:2] == [name, side] and line.split()[2] in ("yes", "no")
                       for line in text.splitlines()), (name, side)
    assert "dlconv._C_cuda" in text and "GPUs seen by Numba:" in text


def test_backends_available_returns_three_backends_with_statuses():
    avail = backends.available()
    assert tuple(avail) == BACKENDS == backends.names()
    for name, a in avail.items():
        for side in ("cpu", "cuda"):
            ok, why = a[side]
            assert isinstance(ok, bool) and isinstance(why, str) and why, (name, side, a[side])
        assert isinstance(a["variants"], list)
    assert avail["reference"]["cpu"][0] is True


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"backend must be one of \('reference', 'numba', 'cpp'\).*'cudnn'"):
        backends.get("cudnn")


# ----------------------------------------------------------------------------- lightness
def test_import_dlconv_imports_neither_tensorflow_nor_numba():
    code = ("import sys, dlconv\n"
            "dlconv.conv_output_size(28, 3); dlconv.conv_geometry((1, 5, 5, 1), (3, 3, 1, 1))\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'numba', 'numba.cuda', 'matplotlib') "
            "if m in sys.modules))\n")
    assert _py(code).stdout.strip() == "[]"


def test_cli_explain_and_help_stay_light():
    """``dlconv --help`` and ``dlconv explain`` import every subcommand module (cli.build_parser);
    none of them may pull in TensorFlow or Numba at import time."""
    code = ("import sys, contextlib, io\n"
            "from dlconv import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['explain', '--input', '5x5', '--padding', '1', '--at', '1,1'])\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'numba') if m in sys.modules))\n")
    assert _py(code).stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the CUDA extension
@pytest.mark.skipif(not CUDA_EXT_BUILT, reason="dlconv._C_cuda is not built in this checkout "
                                               "(no nvcc at build time, or DLCONV_CUDA=0)")
def test_cuda_extension_imports_without_a_gpu():
    code = ("import json, dlconv._C_cuda as m\n"
            "gpus = m.devices()\n"
            "print(json.dumps({'gpus': gpus, 'why': m.devices_why() if not gpus else '', "
            "'build': m.build_info()}))\n")
    d = json.loads(_py(code).stdout)
    assert isinstance(d["gpus"], list)
    assert d["build"]["archs"] and d["build"]["cudart"]
    if not d["gpus"]:
        assert d["why"], "an empty device list must come with a reason"


HIDE_CUDA_EXT = """
import importlib.abc, sys

class HideCudaExtension(importlib.abc.MetaPathFinder):
    '''Behave as if dlconv._C_cuda had never been built.'''
    def find_spec(self, name, path=None, target=None):
        if name == "dlconv._C_cuda":
            raise ModuleNotFoundError("No module named 'dlconv._C_cuda'", name=name)
        return None

sys.meta_path.insert(0, HideCudaExtension())
"""


def test_info_reports_cuda_extension_not_built_when_missing():
    code = HIDE_CUDA_EXT + (
        "import json, dlconv, dlconv.info\n"
        "d = dlconv.info.info()\n"
        "print(json.dumps({'ext': d['extensions']['dlconv._C_cuda'], "
        "'backends': sorted(d['backends']), 'text': dlconv.info.format_info(d)}))\n")
    d = json.loads(_py(code).stdout)
    assert d["ext"]["built"] is False
    assert "No module named 'dlconv._C_cuda'" in d["ext"]["why"]
    assert d["backends"] == sorted(BACKENDS)
    assert "dlconv._C_cuda  not built: No module named 'dlconv._C_cuda'" in d["text"]


def test_info_survives_sys_modules_none_for_the_cuda_extension():
    code = ("import sys, json\n"
            "sys.modules['dlconv._C_cuda'] = None\n"
            "import dlconv, dlconv.info\n"
            "d = dlconv.info.info()\n"
            "print(json.dumps(d['extensions']['dlconv._C_cuda']))\n")
    ext = json.loads(_py(code).stdout)
    assert ext["built"] is False and "dlconv._C_cuda" in ext["why"]


def test_info_lists_the_keras_backends_and_why_not(monkeypatch):
    from importlib import metadata

    from dlconv import bridges, info

    d = info.info()
    assert set(d["keras_backends"]) == {"tensorflow", "torch", "jax"}
    assert "Keras backends dlconv.layers can run on:" in info.format_info(d)
    real = metadata.version

    def without_torch(dist):
        if dist == "torch":
            raise metadata.PackageNotFoundError(dist)
        if dist == "jax":
            return "0.4.1"
        return real(dist)

    monkeypatch.setattr(metadata, "version", without_torch)
    status = bridges.status()
    assert status["torch"] == (False, "torch is not installed (pip install 'dlconv[torch]')")
    assert status["jax"] == (False, "jax 0.4.1 is older than 0.5, the oldest the bridge supports")


def test_info_says_the_tf_pool_is_stock_without_the_op_library(monkeypatch):
    """The native TF max pool lives in the op library: with it switched off, info says stock."""
    from dlconv import info as dinfo

    monkeypatch.setenv("DLCONV_TF_OPS", "0")
    paths = dinfo.info()["max_pool"]
    assert paths["tensorflow"].startswith("stock keras MaxPooling2D"), paths
    assert "DLCONV_TF_OPS=0" in paths["tensorflow"], paths
    monkeypatch.delenv("DLCONV_TF_OPS")
    if dinfo._tf_ops_status().get("native"):
        assert dinfo.info()["max_pool"]["tensorflow"].startswith("DlconvMaxPool2D"), dinfo.info()["max_pool"]
