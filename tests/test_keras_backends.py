"""dlconv.layers under each Keras backend, each run in a fresh pytest process (Keras fixes
its backend when it is first imported):

* tests/keras_suite — dlconv's own checks against the stock layers (values, gradients, fit,
  saving, the workshop models, the CLI, MNIST accuracy);
* tests/keras_own — Keras' own Conv2D/Dense layer tests, once with the stock classes and once
  with dlconv's: every test the stock layers pass on that backend must pass with dlconv's.
"""

import importlib.util
import os
import re
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

HERE = pathlib.Path(__file__).parent
FRAMEWORK = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}
KERAS_BACKENDS = sorted(FRAMEWORK)


def _need(keras_backend):
    if importlib.util.find_spec(FRAMEWORK[keras_backend]) is None:
        pytest.skip(f"{FRAMEWORK[keras_backend]} is not installed (pip install -e '.[test]' brings it)")


def _pytest(keras_backend, folder, junit=None, **env):
    env = dict(os.environ, KERAS_BACKEND=keras_backend, DLCONV_KERAS_SUITE="1",
               TF_CPP_MIN_LOG_LEVEL="3", **env)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / folder)]
    if junit is not None:
        cmd += [f"--junitxml={junit}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    return out, out.stdout[-6000:] + out.stderr[-3000:]


def _outcomes(junit):
    """test id → "passed" / "failed" / "skipped" from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out[name] = "failed"
        elif case.find("skipped") is not None:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out


@pytest.mark.parametrize("keras_backend", KERAS_BACKENDS)
def test_keras_suite(keras_backend):
    _need(keras_backend)
    out, tail = _pytest(keras_backend, "keras_suite")
    print(tail)
    assert out.returncode == 0, f"Keras suite on {keras_backend} failed:\n{tail}"
    closing = [ln for ln in out.stdout.splitlines() if ln.strip()][-1]
    assert re.match(r"\d+ passed", closing) and "failed" not in closing, closing


@pytest.mark.parametrize("keras_backend", KERAS_BACKENDS)
def test_keras_own_layer_tests_pass_as_for_the_stock_layers(keras_backend, tmp_path):
    _need(keras_backend)
    _pytest(keras_backend, "keras_own", tmp_path / "stock.xml", DLCONV_KERAS_OWN="stock")
    _, tail = _pytest(keras_backend, "keras_own", tmp_path / "dlconv.xml", DLCONV_KERAS_OWN="dlconv")
    stock, ours = _outcomes(tmp_path / "stock.xml"), _outcomes(tmp_path / "dlconv.xml")
    passed_stock = {t for t, o in stock.items() if o == "passed"}
    assert len(passed_stock) >= 50, (len(passed_stock), stock)
    lost = sorted(t for t in passed_stock if ours.get(t) != "passed")
    print(f"Keras' own tests on {keras_backend}: stock {len(passed_stock)}/{len(stock)} passed, "
          f"dlconv {sum(o == 'passed' for o in ours.values())}/{len(ours)}")
    assert not lost, f"pass with the stock layers but not with dlconv's on {keras_backend}: {lost}\n{tail}"


# ----------------------------------------------------------------------------- dlconv bench
def test_kernel_probe_makes_one_steps_kernel_calls():
    """The framework-free probe runs the step's dlconv kernels (each op of the step's shapes
    is called, none fails) and is repeatable."""
    from dlconv import ops
    from dlconv.bench import keras_backends as bench_keras

    calls = []
    names = ("conv2d", "dense", "dense_backward", "conv2d_backward_data", "conv2d_backward_filter")
    originals = {n: getattr(ops, n) for n in names}
    try:
        for n in names:
            setattr(ops, n, lambda *a, _n=n, **k: calls.append(_n) or originals[_n](*a, **k))
        probe = bench_keras.kernel_probe("reference", batch=2)
        probe()
    finally:
        for n, f in originals.items():
            setattr(ops, n, f)
    assert calls == ["conv2d", "conv2d", "dense", "dense", "dense_backward", "dense_backward",
                     "conv2d_backward_data", "conv2d_backward_filter", "conv2d_backward_filter"]


def test_bridge_cost_is_the_step_ratio_in_probe_units():
    from dlconv.bench import keras_backends as bench_keras

    # the torch child ran on a machine twice as slow (its probe took twice as long)
    torch_row = {"median_s": 0.20, "probe_s": 0.08}
    tf_row = {"median_s": 0.08, "probe_s": 0.04}
    cost = bench_keras.bridge_cost(torch_row, tf_row)
    assert cost["vs_tensorflow"] == pytest.approx((0.20 / 0.08) / (0.08 / 0.04))   # 1.25
    assert cost["vs_tensorflow_raw"] == pytest.approx(2.5)
    assert "probe" in cost["bridge_cost_method"]
    no_probe = bench_keras.bridge_cost({"median_s": 0.2}, tf_row)
    assert no_probe["vs_tensorflow"] == pytest.approx(2.5) and "no kernel probe" in no_probe["bridge_cost_method"]
    assert bench_keras.bridge_cost(torch_row, None) == {}


def test_step_scripts_print_the_packages_measurement():
    """benchmarks/torch_step.py and jax_step.py are thin callers of dlconv.bench.keras_backends
    (script_main); what they print comes from format_here."""
    from dlconv.bench import keras_backends as bench_keras

    for script in ("torch_step.py", "jax_step.py"):
        text = (HERE.parent / "benchmarks" / script).read_text()
        assert "script_main" in text and "round_robin" not in text and "perf_counter" not in text
    res = {"keras_backend": "torch",
           "train_rows": [{"impl": "stock keras on torch", "median_s": 0.1, "time_ratio": 1.0},
                          {"impl": "dlconv(cpp) on torch", "median_s": 0.05, "time_ratio": 0.5,
                           "probe_s": 0.02, "kernel_share": 0.4}],
           "overhead_rows": [{"status": "ok", "backend": "cpp", "dlconv_s": 2e-5, "stock_s": 1e-5,
                              "ratio": 2.0, "ops_s": 1.5e-5, "empty_op_s": 8e-6}]}
    lines = bench_keras.format_here(res)
    assert any("dlconv(cpp) on torch" in ln and "50.0 ms" in ln and "0.50x stock" in ln
               and "40% of the step" in ln for ln in lines), lines
    assert any("dlconv(cpp) 20.0 us" in ln and "(2.00x)" in ln and "empty custom op 8.0 us" in ln
               for ln in lines), lines
    assert "cores" in bench_keras.machine_line()
