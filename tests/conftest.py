"""Shared test setup.

CUDA mode is chosen before anything imports numba.cuda:

* a machine with an NVIDIA driver (``/dev/nvidiactl``) runs the Numba CUDA kernels on the
  real GPU, and the ``gpu``-marked tests run too (MNIST-sized shapes);
* any other machine runs the Numba CUDA kernels under the simulator
  (``NUMBA_ENABLE_CUDASIM=1``: the real kernel code, one Python thread per CUDA thread, so
  shapes stay tiny), and ``gpu``-marked tests are skipped with that reason.

Set ``NUMBA_ENABLE_CUDASIM`` yourself to override.
"""

import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if os.path.exists("/dev/nvidiactl") else "1"
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

#: The real MNIST test set shipped beside the project (never copied into it).
MNIST_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def pytest_collection_modifyitems(config, items):
    if REAL_GPU:
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU; this run uses the Numba CUDA simulator")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    import numpy as np
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the real MNIST test set is not at {MNIST_DIR} (it lives in shared/, not in the repo)")
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
