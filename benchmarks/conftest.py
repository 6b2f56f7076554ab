"""pytest-benchmark setup for ``pytest benchmarks/`` (kept apart from the fast tests/ suite:
the root pyproject's ``testpaths = ["tests"]`` means a bare ``pytest`` never collects this).

* CUDA mode is chosen before anything imports numba.cuda, as in tests/conftest.py: a real
  GPU (``/dev/nvidiactl``) adds CUDA cases; without one there are none (the simulator is
  never timed).
* Each case checks its output against :mod:`dlconv.reference` before it is timed; a wrong
  kernel fails its test and is not timed.
* At the end, a table of medians, GFLOP/s and ratios to the built-in (measured in this same
  session: ``t_builtin / t_ours``, the faster of TensorFlow's eager and tf.function modes)
  is printed, built from the timings pytest-benchmark made.

Options of pytest-benchmark apply (``--benchmark-min-rounds``, ``--benchmark-json``, ...);
``--dlconv-batch N`` changes the batch (default 128).
"""

import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if os.path.exists("/dev/nvidiactl") else "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from dlconv import bench  # noqa: E402

#: (device, layer, pass) → {impl: median seconds}, filled by the benchmark tests.
TIMINGS = {}
#: MNIST CNN train step: impl → median seconds.
TRAIN = {}


def pytest_addoption(parser):
    parser.addoption("--dlconv-batch", type=int, default=bench.BATCH,
                     help="batch size of the dlconv benchmarks (default 128)")


@pytest.fixture(scope="session")
def batch(request):
    return request.config.getoption("--dlconv-batch")


@pytest.fixture(scope="session")
def problems(batch):
    """Inputs and reference outputs of each layer/pass, made once per session."""
    cache = {}

    def get(layer_name, pass_):
        key = (layer_name, pass_)
        if key not in cache:
            cache[key] = bench.make_problem(bench.LAYER_BY_NAME[layer_name], pass_, batch)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def tf_builtin():
    pytest.importorskip("tensorflow")
    return bench.TensorFlowBuiltin()


def record(device, layer, pass_, impl, median_s, flops, builtin=False):
    TIMINGS.setdefault((device, layer, pass_), {})[impl] = (median_s, flops, builtin)


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS and not TRAIN:
        return
    tr = terminalreporter
    tr.section("dlconv: ratio to the built-in (t_builtin / t_ours, > 1 means dlconv is faster)")
    for (device, layer, pass_), impls in TIMINGS.items():
        builtin = [t for t, _, b in impls.values() if b]
        t_b = min(builtin) if builtin else None
        for impl, (t, flops, is_b) in impls.items():
            ratio = f"{t_b / t:6.2f}x" if t_b else "   n/a"
            tr.write_line(f"{device:<4} {layer:<7} {pass_:<16} {impl:<34} {t * 1e3:10.3f} ms "
                          f"{flops / t / 1e9:8.1f} GFLOP/s  {ratio}")
    if TRAIN:
        stock = [t for k, t in TRAIN.items() if k.startswith("stock")]
        t_s = min(stock) if stock else None
        for impl, t in TRAIN.items():
            ratio = f"{t / t_s:5.2f}x time" if t_s else "n/a"
            tr.write_line(f"train step {impl:<30} {t * 1e3:10.1f} ms  ours/stock {ratio}")
