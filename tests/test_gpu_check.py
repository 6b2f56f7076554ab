"""The GPU check's pieces that run without a GPU: the shell script parses, the sanitizer
driver covers every C++ CUDA entry point (and runs every case against a NumPy stand-in), the
JUnit verdict, and DLCONV_REQUIRE_GPU=1 turning a skipped gpu test into a failure.
(``benchmarks/gpu_check.sh --dry-run OUT`` end to end takes ~2 minutes on 2 cores: it is
rehearsed by hand, not in CI.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(cmd, env=None, timeout=120):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_gpu_check_script_parses_and_documents_its_steps():
    assert _run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    helptext = _run(["bash", str(BENCH / "gpu_check.sh"), "--help"]).stdout
    for step in ("machine", "build", "info", "tests", "sanitizer", "keras", "bench"):
        assert f"#   {step} " in helptext, step
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        assert tool in helptext
    assert "at most 8" in helptext


def test_sanitizer_driver_covers_every_entry_point_and_runs_its_cases():
    r = _run([sys.executable, str(BENCH / "gpu_sanitize.py"), "--dry-run"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "15/15 cases match the reference" in r.stdout
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_sanitize
    finally:
        sys.path.pop(0)
    assert {c[0] for c in gpu_sanitize.CASES} == set(gpu_sanitize.ENTRY_POINTS)
    try:
        from dlconv import _C_cuda
    except ImportError:
        pytest.skip("dlconv._C_cuda is not built here: its exported entry points cannot be listed")
    for name in gpu_sanitize.ENTRY_POINTS:
        assert callable(getattr(_C_cuda, name))


_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{}</testsuite></testsuites>"""


@pytest.mark.parametrize("cases,rc", [
    ('<testcase classname="tests.test_a" name="test_ok"/>', 0),
    ('<testcase classname="tests.test_a" name="test_gpu_x"><skipped message="needs a real CUDA GPU"/></testcase>', 0),
    ('<testcase classname="tests.test_a" name="test_bad"><failure message="assert"/></testcase>', 1),
    ('<testcase classname="tests.test_a" name="test_err"><error message="boom"/></testcase>', 1),
    # a module with gpu tests that fails to import hides them
    ('<testcase classname="" name="tests.test_streams"><error message="collection failure"/></testcase>', 1),
    # a module without gpu tests that fails to import (needs TensorFlow) is only listed
    ('<testcase classname="" name="tests.test_layers"><error message="collection failure"/></testcase>', 0),
])
def test_junit_verdict(tmp_path, cases, rc):
    p = tmp_path / "j.xml"
    p.write_text(_JUNIT.format(cases))
    r = _run([sys.executable, str(BENCH / "gpu_check_junit.py"), str(p)])
    assert r.returncode == rc, r.stdout


def test_require_gpu_turns_a_skipped_gpu_test_into_a_failure():
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/test_streams.py::test_gpu_race_control_a_naive_reader_sees_stale_data"]
    env = {"NUMBA_ENABLE_CUDASIM": "1"}
    plain = _run(args, env={**env, "DLCONV_REQUIRE_GPU": ""})
    assert plain.returncode == 0 and "1 gpu-marked test(s) NOT RUN, skipped" in plain.stdout, plain.stdout
    strict = _run(args, env={**env, "DLCONV_REQUIRE_GPU": "1"})
    assert strict.returncode == 1, strict.stdout
    assert "DLCONV_REQUIRE_GPU=1 makes that a failure" in strict.stdout
    assert "NOT RUN, FAILED (DLCONV_REQUIRE_GPU=1)" in strict.stdout
