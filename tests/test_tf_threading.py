"""The TF op library's CPU threading (csrc/tf_ops.cpp's threading note): the knobs
(dlconv.tf_ops.threading_knobs), the same numbers whichever way a call runs (one-thread team or
dlconv's OpenMP team, locked or not), calls from several threads at once with small calls
unlocked, and the calling thread's OpenMP thread count restored after a one-thread call."""

import ctypes
import os
import threading

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from dlconv import reference, tf_ops  # noqa: E402
from dlconv.shapes import conv_geometry  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library

#: The defaults the threading note measured (csrc/tf_ops.cpp: SERIAL_FLOPS,
#: SERIAL_FLOPS_BACKWARD, UNLOCKED_SMALL, SERIAL_POOL_ELEMENTS).
DEFAULTS = {"serial_flops": 2e7, "serial_flops_backward": 1e8, "unlocked_small": True,
            "serial_pool_elements": 131072.0}
ALL_ONE_THREAD = {"serial_flops": 1e30, "serial_flops_backward": 1e30}
ALL_TEAM = {"serial_flops": 0.0, "serial_flops_backward": 0.0}


@pytest.fixture
def knobs():
    """Restores the library's knobs after the test, whatever it set."""
    before = tf_ops.threading_knobs()
    yield
    tf_ops.threading_knobs(**before)


def test_knobs_default_and_round_trip(knobs):
    assert tf_ops.threading_knobs() == DEFAULTS
    old = tf_ops.threading_knobs(serial_flops=5.0, serial_flops_backward=7.0, unlocked_small=False,
                                 serial_pool_elements=3.0)
    assert old == DEFAULTS
    assert tf_ops.threading_knobs(serial_flops_backward=9.0) == {
        "serial_flops": 5.0, "serial_flops_backward": 7.0, "unlocked_small": False, "serial_pool_elements": 3.0}
    assert tf_ops.threading_knobs() == {"serial_flops": 5.0, "serial_flops_backward": 9.0,
                                        "unlocked_small": False, "serial_pool_elements": 3.0}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "2e7"])
@pytest.mark.parametrize("name", ["serial_flops_backward", "serial_pool_elements"])
def test_bad_knob_values_are_refused(knobs, bad, name):
    with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
        tf_ops.threading_knobs(**{name: bad})
    assert tf_ops.threading_knobs() == DEFAULTS


# A conv of 2*4*10*10*9*8*12 = 6.9e5 flops: "small" under the defaults; the knobs move it.
N, H, W, C, F, K = 4, 10, 10, 8, 12, 3
_G = conv_geometry((N, H, W, C), (K, K, C, F), (1, 1), "same", (1, 1))
_PADS = [_G.pad_top, _G.pad_bottom, _G.pad_left, _G.pad_right]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, H, W, C)).astype(np.float32),
            rng.standard_normal((K, K, C, F)).astype(np.float32),
            rng.standard_normal(F).astype(np.float32),
            rng.standard_normal((N, _G.out_h, _G.out_w, F)).astype(np.float32))


def _passes(x, w, b, dy):
    """Forward (relu), backward-data and backward-filter through the native ops, eagerly."""
    y = LIB.dlconv_conv2d(x, w, b, pads=_PADS, activation="relu")
    dx = LIB.dlconv_conv2d_backprop_input(dy, w, y, np.array(x.shape, np.int32), pads=_PADS,
                                          activation="relu")
    dw, db = LIB.dlconv_conv2d_backprop_filter(x, dy, y, pads=_PADS, activation="relu",
                                               kernel_size=[K, K])
    return [np.asarray(t) for t in (y, dx, dw, db)]


def _expected(x, w, b, dy):
    y = reference.conv2d_forward(x, w, b, _G, "relu")
    dz = reference.activation_backward(dy, y, "relu")
    dx = reference.conv2d_backward_data(dz, w, _G)
    dw, db = reference.conv2d_backward_filter(x, dz, _G)
    return [y, dx, dw, db]


def _close(got, want):
    for g, e in zip(got, want):
        scale = max(float(np.abs(e).max()), 1e-30)
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("setting", [ALL_ONE_THREAD, ALL_TEAM, {"unlocked_small": False}],
                         ids=["one-thread", "team", "locked"])
def test_same_numbers_whichever_way_a_call_runs(knobs, setting):
    x, w, b, dy = _data()
    default = _passes(x, w, b, dy)
    tf_ops.threading_knobs(**setting)
    other = _passes(x, w, b, dy)
    _close(other, _expected(x, w, b, dy))
    _close(other, default)


def test_unlocked_calls_from_several_threads_at_once(knobs):
    tf_ops.threading_knobs(**ALL_ONE_THREAD, unlocked_small=True)
    cases = [_data(seed) for seed in range(4)]
    want = [_expected(*c) for c in cases]
    errors, start = [], threading.Barrier(len(cases))

    def worker(i):
        try:
            start.wait()
            for _ in range(5):
                _close(_passes(*cases[i]), want[i])
        except Exception as exc:   # reported by the main thread below
            errors.append(f"thread {i}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_one_thread_call_restores_the_callers_thread_count(knobs):
    # Eager CPU ops run on the calling thread: its OpenMP setting must be unchanged after a
    # one-thread call (the op library and dlconv._C share the system libgomp).
    gomp = ctypes.CDLL("libgomp.so.1")
    before = gomp.omp_get_max_threads()
    tf_ops.threading_knobs(**ALL_ONE_THREAD)
    _passes(*_data())
    assert gomp.omp_get_max_threads() == before
    tf_ops.threading_knobs(**ALL_TEAM)
    _passes(*_data())
    assert gomp.omp_get_max_threads() == before


def test_python_constants_and_info_match_the_library():
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "tf_ops.cpp")).read()
    assert f"constexpr double SERIAL_FLOPS_BACKWARD = {tf_ops.SERIAL_FLOPS_BACKWARD:.0e};".replace("e+0", "e") in src
    assert f"constexpr int SIDE_BY_SIDE_MAX_THREADS = {tf_ops.SIDE_BY_SIDE_MAX_THREADS};" in src
    assert "constexpr bool UNLOCKED_SMALL = true;" in src
    assert f"constexpr double SERIAL_POOL_ELEMENTS = {tf_ops.SERIAL_POOL_ELEMENTS};" in src
    assert DEFAULTS == {"serial_flops": tf_ops.SERIAL_FLOPS, "serial_flops_backward": tf_ops.SERIAL_FLOPS_BACKWARD,
                        "unlocked_small": True, "serial_pool_elements": tf_ops.SERIAL_POOL_ELEMENTS}


@pytest.mark.parametrize("team, backward", [("2", True), ("4", False)])
def test_info_names_the_backward_threshold_where_it_applies(monkeypatch, team, backward):
    monkeypatch.delenv(tf_ops.THREADING_SWITCH, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", team)
    text = tf_ops.threads_used()
    assert ("conv backward passes below 1e8" in text) is backward
    assert "without the lock" in text and f"OpenMP team of {team} threads" in text
