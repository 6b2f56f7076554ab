"""Smoke test of the benchmark harness (dlconv.bench, benchmarks/make_table.py) on tiny shapes.

The real measurements are not tests; this checks the harness logic: correctness marking
(a wrong kernel is shown as failed and not timed), the ratio and GFLOP/s arithmetic, the
median, target marking, and the JSON / markdown / PNG outputs.
"""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from dlconv import backends, bench
from dlconv.backends.reference import ReferenceBackend

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = (
    bench.Layer("tconv", "conv", (6, 5, 2), (3, 3, 2, 3), "relu"),
    bench.Layer("tsame", "conv", (5, 6, 2), (2, 3, 2, 4), "linear", padding="same"),
    bench.Layer("tdense", "dense", (7,), (7, 4), "relu"),
    bench.Layer("tsoft", "dense", (6,), (6, 3), "softmax"),
)
FAST = bench.Settings(batch=3, repeats=3, warmup=1, min_sample_s=0.0)


class BrokenBackend(ReferenceBackend):
    """The reference with an off-by-something conv forward: must be marked failed."""

    name = "broken"

    def conv2d_forward(self, x, w, b, g, activation, *, on_device, variant=None, stream=None):
        return super().conv2d_forward(x, w, b, g, activation, on_device=on_device) + 0.5

    def conv_variants(self, on_device, geometry=None):
        return ("v1", "v2")


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "broken", "tests.test_bench:BrokenBackend")
    monkeypatch.setitem(backends._INSTANCES, "broken", BrokenBackend())
    return "broken"


def test_max_rel_error_marks_wrong_outputs():
    r = np.linspace(-2, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    assert bench.max_rel_error([r.copy()], [r]) == 0.0
    assert bench.max_rel_error([r + 1e-5], [r]) == pytest.approx(1e-5 / 3, rel=1e-2)
    assert bench.max_rel_error([r + 0.1], [r]) > bench.TOLERANCE
    assert bench.max_rel_error([r.reshape(6, 4)], [r]) == math.inf          # wrong shape
    bad = r.copy()
    bad[0, 0, 0] = np.nan
    assert bench.max_rel_error([bad], [r]) == math.inf                        # NaN
    assert bench.max_rel_error([r], [r, r]) == math.inf                       # missing output


def test_flops_of_each_pass():
    conv2 = bench.LAYER_BY_NAME["conv2"]
    g = conv2.geometry(128)
    assert conv2.flops("forward", 128) == 2 * 128 * 24 * 24 * (3 * 3 * 32) * 64 == g.flops
    assert conv2.flops("backward-filter", 128) == g.flops
    dense1 = bench.LAYER_BY_NAME["dense1"]
    assert dense1.flops("forward", 128) == 2 * 128 * 9216 * 128
    assert dense1.flops("backward", 128) == 2 * dense1.flops("forward", 128)


def test_measure_takes_the_median_after_warmup():
    calls = []
    times = iter([0.001, 0.004, 0.002, 0.009])       # calibration, then three samples

    class FakePlace(bench.HostPlace):
        def time_block(self, fn, inner):
            calls.append(inner)
            return next(times)

    t = bench.measure(lambda: None, FakePlace(), repeats=3, warmup=2, min_sample_s=0.01)
    assert t.median_s == 0.004
    assert t.samples_s == [0.004, 0.002, 0.009]
    assert calls == [1, 10, 10, 10]                   # inner = ceil(0.01 / 0.001)
    assert t.warmup == 3                              # the caller's first call + 2


def test_suite_on_tiny_shapes_marks_ratios_and_failures(broken):
    rows = bench.run_kernels(bench.plan(TINY, bench.ALL_PASSES), [bench.HostPlace()],
                             ["reference", broken], bench.ReferenceBuiltin(), FAST, progress=False)
    # every layer/pass has a built-in row, a reference row, and the broken backend's rows
    by = {}
    for r in rows:
        by.setdefault((r["layer"], r["pass"]), []).append(r)
    assert len(by) == 2 * 3 + 2 * 2
    for (layer, pass_), group in by.items():
        builtin = [r for r in group if r["is_builtin"]]
        assert len(builtin) == 1 and builtin[0]["ratio"] == 1.0 and builtin[0]["correct"]
        t_b = builtin[0]["median_s"]
        ref = [r for r in group if r["backend"] == "reference"]
        assert len(ref) == 1
        r = ref[0]
        assert r["status"] == "ok" and r["correct"] and r["max_rel_err"] <= 1e-6
        assert r["ratio"] == pytest.approx(t_b / r["median_s"])
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
        assert r["median_s"] == pytest.approx(sorted(r["samples_s"])[1])   # median of 3
        mine = [r for r in group if r["backend"] == "broken"]
        if pass_ == "forward" and layer in ("tconv", "tsame"):
            assert [m["variant"] for m in mine] == ["v1", "v2"]
            for m in mine:                             # wrong: failed, not timed, no ratio
                assert m["status"] == "failed" and m["correct"] is False
                assert m["median_s"] is None and m["ratio"] is None and m["gflops"] is None
        else:
            assert len(mine) == 1 and mine[0]["status"] == "ok"


def test_unavailable_backend_is_a_row_with_the_reason():
    rows = bench.run_kernels(bench.plan(TINY[:1], ("forward",)), [bench.HostPlace()],
                             ["reference"], None, FAST, progress=False, builtin_why="no framework")
    assert rows[0]["is_builtin"] and rows[0]["status"] == "skipped" and rows[0]["why"] == "no framework"
    assert rows[1]["status"] == "ok" and rows[1]["ratio"] is None


def _row(**kw):
    base = {"device": "cpu", "layer": "conv2", "pass": "forward", "backend": "cpp", "impl": "cpp/v1",
            "ratio": None, "why": None}
    base.update(kw)
    return base


def test_targets_use_the_best_correct_variant():
    rows = [_row(impl="cpp/v1", ratio=0.9), _row(impl="cpp/v2", ratio=1.4),
            _row(backend="numba", impl="numba/v1", ratio=0.3),
            _row(layer="dense1", impl="cpp", ratio=None, why="failed check")]
    t = {s["label"]: s for s in bench.summarize_targets(rows)}
    assert t["C++ CPU conv2 forward vs tf.nn.conv2d"]["met"] is True
    assert t["C++ CPU conv2 forward vs tf.nn.conv2d"]["best_impl"] == "cpp/v2"
    assert t["Numba CPU conv2 forward"]["met"] is False
    dense = t["C++ CPU dense 9216→128 + bias + relu"]
    assert dense["met"] is None and dense["value"] is None and "failed check" in dense["why"]
    assert "C++ CPU conv2 backward-data" not in t       # no row, no line


def _tiny_result(tmp_path, broken):
    rows = bench.run_kernels(bench.plan(TINY, ("forward",)), [bench.HostPlace()],
                             ["reference", broken], bench.ReferenceBuiltin(), FAST, progress=False)
    machine = {"description": "test machine", "cpu_brand": "Intel(R) Xeon(R) Processor", "cores": 2}
    result = bench.new_result("cpu", machine, FAST, "reference", notes=["a note"])
    result["rows"] = rows
    result["train_rows"] = [{"impl": "dlconv(cpp)", "backend": "cpp", "device": "cpu", "status": "ok",
                             "median_s": 0.2, "time_ratio": 0.8, "correct": True, "target": 1.0,
                             "target_met": True, "why": None}]
    result["targets"] = bench.summarize_targets(rows, result["train_rows"])
    return result


def test_outputs_json_markdown_png(tmp_path, broken):
    result = _tiny_result(tmp_path, broken)
    paths = bench.write_outputs(result, tmp_path / "out", "2026-11-30-cpu-test")
    d = json.loads(paths["json"].read_text())
    assert d["schema"] == bench.SCHEMA and d["kind"] == "cpu" and len(d["rows"]) == len(result["rows"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "| layer | pass | device | backend/variant |" in md
    assert "failed" in md and "✓" in md and "✗" in md
    assert "0.80×" in md and "≤ 1× met ✓" in md
    text = bench.format_text(result)
    assert "ratio" in text and "test machine" in text


def test_make_table_renders_cpu_and_says_gpu_not_measured(tmp_path, broken, capsys):
    result = _tiny_result(tmp_path, broken)
    bench.write_outputs(result, tmp_path, "2026-11-30-cpu-test")
    dry = dict(result, kind="gpu-dry-run")
    (tmp_path / "dry.json").write_text(json.dumps(dry, default=str))
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    assert mt.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### CPU (2026-11-30-cpu-test.json) — cpu — " in out
    assert "test machine" in out
    assert "### GPU — not yet measured" in out        # the dry run is not a GPU result
    assert "broken/v1 (best of 2)" not in out         # both variants failed: no "best"


def test_machine_slug():
    assert bench.machine_slug({"cpu_brand": "Intel(R) Xeon(R) Processor", "cores": 2}) == "cpu-xeon-2core"
    assert bench.machine_slug({"cpu_brand": "AMD EPYC 7B13 64-Core Processor", "cores": 8}) == \
        "cpu-epyc-7b13-8core"
    assert bench.machine_slug({"gpu_names": ["NVIDIA H200"]}, "cuda") == "gpu-h200"


def test_cli_rejects_unknown_names():
    with pytest.raises(ValueError, match="--layers"):
        bench._csv("conv1,conv9", tuple(bench.LAYER_BY_NAME), "layers")
    with pytest.raises(ValueError, match="--passes"):
        bench._csv("", bench.ALL_PASSES, "passes")


def test_tensorflow_builtin_matches_the_reference_on_tiny_shapes():
    pytest.importorskip("tensorflow")
    tf_builtin = bench.TensorFlowBuiltin()
    place = bench.HostPlace()
    for layer in TINY:
        for pass_ in layer.passes:
            problem = bench.make_problem(layer, pass_, batch=2)
            modes = tf_builtin.modes(problem, place)
            assert [m[0] for m in modes] == ["eager", "tf.function"]
            for name, fn in modes:
                out = [bench.to_host(o) for o in bench.as_tuple(fn())]
                err = bench.max_rel_error(out, problem.expected)
                assert err <= 1e-5, (layer.name, pass_, name, err)


def test_variants_for_offers_only_what_can_run_the_layer():
    from dlconv import backends, bench

    ok, why = backends.get("cpp").cpu_status()
    if not ok:
        pytest.skip(f"the cpp backend cannot run here: {why}")
    layers = {layer.name: layer for layer in bench.LAYERS}
    all_cpu = list(backends.get("cpp").conv_variants(False))
    conv1 = bench.variants_for("cpp", all_cpu, layers["conv1"], "forward", False)
    conv2 = bench.variants_for("cpp", all_cpu, layers["conv2"], "forward", False)
    assert "cpu_v3_winograd" not in conv1 and "cpu_v2_direct" in conv1   # C = 1: no Winograd
    assert conv2[0] == "cpu_v3_winograd"
    assert bench.variants_for("cpp", all_cpu, layers["conv2"], "backward-data", False) == [None]


# ----------------------------------------------------------------------------- Keras backends
def test_keras_backend_rows_say_why_when_a_framework_is_missing(monkeypatch):
    from dlconv import bench_keras, bridges

    monkeypatch.setattr(bridges, "status", lambda: {
        "tensorflow": (False, "tensorflow is not installed"),
        "torch": (False, "torch is not installed (pip install 'dlconv[torch]')"),
        "jax": (False, "jax is not installed (pip install 'dlconv[jax]')")})
    train, overhead = bench_keras.run_keras_backends(["cpp"], 8, 1, 0)
    assert [(r["keras_backend"], r["status"], r["target"]) for r in train] == [
        ("torch", "skipped", 0.6), ("jax", "skipped", 0.3)]
    assert train[0]["why"] == "torch is not installed (pip install 'dlconv[torch]')"
    assert [(r["keras_backend"], r["status"]) for r in overhead] == [
        ("torch", "skipped"), ("jax", "skipped"), ("tensorflow", "skipped")]


def test_bridge_cost_target_is_the_ratio_to_dlconvs_own_tensorflow_step():
    rows = [{"keras_backend": "torch", "backend": "cpp", "impl": "dlconv(cpp) on torch",
             "status": "ok", "median_s": 0.055, "time_ratio": 0.4, "target": 0.6,
             "target_met": True, "vs_tensorflow": 1.1, "label": "torch step"}]
    targets = bench.summarize_targets([], rows)
    assert [(t["label"], t["value"], t["met"]) for t in targets] == [
        ("torch step", 0.4, True),
        ("dlconv(cpp) train step on Keras torch vs on TensorFlow (what the bridge costs)", 1.1, True)]


def test_keras_backend_child_measures_the_bridge_overhead():
    """The child protocol end to end on the TensorFlow backend: one JSON line back, a
    1x1 conv that computed 2.0 before it was timed."""
    from dlconv import bench_keras

    res = bench_keras._child("tensorflow", ["reference"], 8, 1, 0, False, 300)
    assert "error" not in res, res
    o = res["overhead"]
    assert o["keras_backend"] == "tensorflow" and o["backend"] == "reference"
    assert 0 < o["dlconv_s"] < 0.1 and 0 < o["stock_s"] < 0.1
    assert o["ratio"] == pytest.approx(o["dlconv_s"] / o["stock_s"])
