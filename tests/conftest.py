"""Shared test setup.

CUDA mode is chosen before anything imports numba.cuda:

* a machine with an NVIDIA driver (``/dev/nvidiactl`` or ``/proc/driver/nvidia/version``) runs the Numba CUDA kernels on the
  real GPU, and the ``gpu``-marked tests run too (MNIST-sized shapes);
* any other machine runs the Numba CUDA kernels under the simulator
  (``NUMBA_ENABLE_CUDASIM=1``: the real kernel code, one Python thread per CUDA thread, so
  shapes stay tiny), and ``gpu``-marked tests are skipped with that reason.

Set ``NUMBA_ENABLE_CUDASIM`` yourself to override.

GPU tests that do not run say so loudly: each skip names why, and the terminal summary ends
with one line counting the ``gpu``-marked tests not run and their reasons.  With
``DLCONV_REQUIRE_GPU=1`` (set by ``benchmarks/gpu_check.sh``) every ``gpu``-marked test that
would be skipped, for whatever reason, fails instead: on the GPU machine a skipped GPU test is
a hidden failure.
"""

import os

#: Signs of an NVIDIA driver (a container may expose one without the other).
_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia/version")
_HAVE_DRIVER = any(os.path.exists(p) for p in _DRIVER_PATHS)
if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if _HAVE_DRIVER else "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

# tests/keras_suite runs once per Keras backend, each in its own process started by
# tests/test_keras_backends.py (which sets DLCONV_KERAS_SUITE=1); never in this one.
collect_ignore = [] if os.environ.get("DLCONV_KERAS_SUITE") else ["keras_suite", "keras_own"]

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("dlconv", deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("dlconv")

SIMULATOR = os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
REAL_GPU = not SIMULATOR
#: Why gpu-marked tests cannot run in this process ("" when they can).
NO_GPU_WHY = "" if REAL_GPU else (
    "needs a real CUDA GPU: " +
    ("NUMBA_ENABLE_CUDASIM=1 (the Numba CUDA simulator) was set for this run"
     if _HAVE_DRIVER else
     f"no NVIDIA driver here ({' and '.join(_DRIVER_PATHS)} are absent), so this run uses the "
     "Numba CUDA simulator"))
#: DLCONV_REQUIRE_GPU=1: a gpu-marked test that would be skipped fails instead.
REQUIRE_GPU = os.environ.get("DLCONV_REQUIRE_GPU", "") == "1"

#: Where the real MNIST test set is looked for, first found wins: $DLCONV_MNIST_DIR; the
#: shared/ folder beside the project (never copied into it); a shared/ folder inside the
#: checkout (what travels to the GPU machine: gitignored, copied there for a GPU run).
_ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_CANDIDATES = [pathlib.Path(p) for p in [os.environ.get("DLCONV_MNIST_DIR")] if p] + [
    _ROOT.parent / "shared" / "data" / "mnist", _ROOT / "shared" / "data" / "mnist"]
MNIST_DIR = next((d for d in MNIST_CANDIDATES if (d / "t10k-images-idx3-ubyte.gz").exists()),
                 MNIST_CANDIDATES[0])


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    skip = pytest.mark.skip(reason=NO_GPU_WHY)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: (nodeid, reason) of every gpu-marked test that did not run, for the terminal summary.
_GPU_NOT_RUN = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "gpu" not in item.keywords or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    _GPU_NOT_RUN.append((item.nodeid, reason))
    if REQUIRE_GPU:
        report.outcome = "failed"
        report.longrepr = (f"gpu test {item.nodeid} would be skipped, and DLCONV_REQUIRE_GPU=1 "
                           f"makes that a failure: {reason}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _GPU_NOT_RUN:
        return
    reasons = {}
    for _, why in _GPU_NOT_RUN:
        reasons[why] = reasons.get(why, 0) + 1
    verdict = "FAILED (DLCONV_REQUIRE_GPU=1)" if REQUIRE_GPU else "skipped"
    terminalreporter.write_sep("=", f"{len(_GPU_NOT_RUN)} gpu-marked test(s) NOT RUN, {verdict}",
                               red=True, bold=True)
    for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  {n:4d} x {why}", red=True)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the real MNIST test set is not in any of "
                    + ", ".join(str(d) for d in MNIST_CANDIDATES) + " (it lives in shared/, not in the repo)")
    return MNIST_DIR


def cpu_backend_params():
    """One pytest param per registered backend for host arrays; a backend that cannot run
    its CPU kernels here is skipped with the reason dlconv.backends.available() gives."""
    import dlconv.backends

    avail = dlconv.backends.available()
    params = []
    for name in dlconv.backends.names():
        ok, why = avail[name]["cpu"]
        marks = () if ok else pytest.mark.skip(reason=f"backend {name!r} cannot run on the CPU here: {why}")
        params.append(pytest.param(name, marks=marks, id=name))
    return params
