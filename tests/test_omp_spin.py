"""dlconv's GOMP_SPINCOUNT default (dlconv._omp): set before libgomp loads, on every way in.

Each case runs a fresh Python (libgomp reads its environment once, when it loads) with
``OMP_DISPLAY_ENV=VERBOSE``: every libgomp instance then prints the settings it actually
took, so the tests read libgomp's own word, not dlconv's bookkeeping.  The TensorFlow case
is the one that used to miss it: the graph-native op library links libgomp and loads before
(and without) the cpp backend module that used to set the variable.
"""

import os
import re
import subprocess
import sys

import pytest

from dlconv import _omp

_DISPLAY = re.compile(r"OPENMP DISPLAY ENVIRONMENT BEGIN(.*?)OPENMP DISPLAY ENVIRONMENT END", re.S)
_SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def _run(code, **env_extra):
    """Runs ``code`` in a fresh interpreter with no OpenMP settings of ours; returns
    (stdout, spin counts every libgomp instance displayed, in load order)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (_omp.VAR, _omp.POLICY_VAR, _omp.MARK_VAR, "OMP_DISPLAY_ENV")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    spins = [int(m.group(1)) for block in _DISPLAY.findall(p.stdout + p.stderr)
             for m in _SPIN.finditer(block)]
    return p.stdout, spins


_C_AND_STATUS = ("import dlconv, dlconv._C, json; from dlconv import _omp; "
                 "print('STATUS', json.dumps(_omp.status()))")


def _status(out):
    import json
    line = next(l for l in out.splitlines() if l.startswith("STATUS "))
    return json.loads(line[len("STATUS "):])


def test_default_applies_to_the_pybind_extension():
    out, spins = _run(_C_AND_STATUS)
    assert spins == [int(_omp.SPIN_COUNT)], spins       # dlconv._C's libgomp, the only one loaded
    st = _status(out)
    assert st["source"] == "dlconv" and st["effective"] is True
    assert st["GOMP_SPINCOUNT"] == _omp.SPIN_COUNT


def test_default_applies_to_the_tensorflow_op_library():
    from dlconv import tf_ops
    if not tf_ops.available():
        pytest.skip(f"the TF op library is not available here: {tf_ops.reason()}")
    # TensorFlow imported first (it may load vendored libgomp copies itself), then dlconv.
    code = ("import tensorflow as tf; import dlconv.tf_ops as t; from dlconv import _omp; "
            "print('BEFORE', _omp.libgomp_loaded()); t.load(); print('AFTER', _omp.libgomp_loaded()); "
            "import json; print('STATUS', json.dumps(_omp.status()))")
    out, spins = _run(code)
    assert "BEFORE False" in out and "AFTER True" in out, out
    # the last instance loaded is the system libgomp the op library links
    assert spins and spins[-1] == int(_omp.SPIN_COUNT), spins
    assert _status(out)["effective"] is True


def test_users_spin_count_wins():
    out, spins = _run(_C_AND_STATUS, GOMP_SPINCOUNT="1234")
    assert spins == [1234], spins
    st = _status(out)
    assert st["source"] == "user" and "set by the user" in st["why"]


def test_users_wait_policy_is_left_alone():
    out, spins = _run(_C_AND_STATUS, OMP_WAIT_POLICY="PASSIVE")
    assert spins == [0], spins                          # PASSIVE's own spin count, not dlconv's
    st = _status(out)
    assert st["source"] == "user" and st["GOMP_SPINCOUNT"] is None and st["OMP_WAIT_POLICY"] == "PASSIVE"


def test_too_late_is_reported():
    # libgomp loaded before dlconv is imported: the variable can no longer take effect
    code = "import ctypes; ctypes.CDLL('libgomp.so.1'); " + _C_AND_STATUS
    out, spins = _run(code)
    assert spins == [300000], spins                     # libgomp's own default
    st = _status(out)
    assert st["effective"] is False and "NOT in effect" in st["why"]


def test_child_process_keeps_reporting_dlconvs_default():
    code = ("import dlconv, subprocess, sys; "
            "subprocess.run([sys.executable, '-c', " + repr(_C_AND_STATUS) + "], check=True)")
    out, spins = _run(code)
    assert spins == [int(_omp.SPIN_COUNT)], spins
    assert _status(out)["source"] == "dlconv"


def test_info_reports_the_setting():
    from dlconv import info
    d = info.info()
    assert d["openmp_spin"]["GOMP_SPINCOUNT"] == os.environ.get(_omp.VAR)
    assert "OpenMP idle spin (C++ kernels): " + d["openmp_spin"]["why"] in info.format_info(d)
