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
from hypothesis import given, settings, strategies as st

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
    # a fixed roof, so that write_outputs does not probe the machine (tested on its own)
    result["roofline"] = {"cpu": {"peak_gflops": 50.0, "bandwidth_gbs": 10.0, "peak_how": "test peak",
                                  "bandwidth_how": "test copy", "probe_s": 0.0}}
    return result


def test_outputs_json_markdown_png(tmp_path, broken):
    result = _tiny_result(tmp_path, broken)
    # a Keras-backend train row as keras_backends.py returns it (no layer, no device): the chart
    # once failed on it with KeyError 'device' and was silently not written
    result["train_rows"].append({"keras_backend": "torch", "backend": "cpp", "impl": "dlconv(cpp) on torch",
                                 "status": "ok", "why": None, "correct": True, "median_s": 0.3,
                                 "stock_median_s": 0.4, "time_ratio": 0.75, "jit": False})
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
    gpu = out[out.index("### GPU — not yet measured"):]
    for t in bench.TARGETS:                           # every GPU target says so, none has a figure
        if t.device == "cuda":
            assert f"| {t.label} (fp32, TF32 off) | ≥ {t.min_ratio:g}× | not yet measured |" in gpu
    assert "| 0 errors | not yet measured |" in gpu
    assert "Roofline (GFLOP/s against FLOP/byte under the roof this run measured): " \
           "`benchmarks/results/2026-11-30-cpu-test-roofline.png`" in out
    assert "broken/v1 (best of 2)" not in out         # both variants failed: no "best"


def test_readme_gpu_section_is_make_tables():
    """Until a GPU result is committed, the GPU table of docs/benchmarks.md is make_table's
    "not yet measured" text, claiming no figure."""
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    if mt.latest(mt.load_results(ROOT / "benchmarks" / "results"), "gpu") is not None:
        pytest.skip("a GPU result is committed: docs/benchmarks.md shows its figures")
    readme = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert mt.unmeasured_gpu_targets() in readme


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
    assert "cpu_v3_winograd" not in conv1 and "cpu_v2_regblock" in conv1   # C = 1: no Winograd
    assert conv2[0] == "cpu_v3_winograd"
    assert bench.variants_for("cpp", all_cpu, layers["conv2"], "backward-data", False) == [None]


# ----------------------------------------------------------------------------- Keras backends
def test_keras_backend_rows_say_why_when_a_framework_is_missing(monkeypatch):
    from dlconv import bridges
    from dlconv.bench import keras_backends as bench_keras

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
    from dlconv.bench import keras_backends as bench_keras

    res = bench_keras._child("tensorflow", ["reference"], 8, 1, 0, False, 300)
    assert "error" not in res, res
    o = res["overhead"]
    assert o["keras_backend"] == "tensorflow" and o["backend"] == "reference"
    assert 0 < o["dlconv_s"] < 0.1 and 0 < o["stock_s"] < 0.1
    assert o["ratio"] == pytest.approx(o["dlconv_s"] / o["stock_s"])


# ----------------------------------------------------------------------------- your own kernel
from dlconv import ops, shapes  # noqa: E402
from dlconv.bench import user_kernels  # noqa: E402

EXAMPLE = ROOT / "examples" / "my_conv2d.py"


def _example():
    spec = importlib.util.spec_from_file_location("my_conv2d_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.my_conv2d


def off_by_one_padding(x, w, b=None, strides=1, padding="valid", dilation=1, activation=None):
    """The example kernel with "same"'s odd pad row on the top instead of the bottom (and the
    odd column on the left): right whenever the padding is symmetric, wrong otherwise."""
    g = shapes.conv_geometry(x.shape, w.shape, strides, padding, dilation)
    swapped = ((g.pad_bottom, g.pad_top), (g.pad_right, g.pad_left))
    return _example()(x, w, b, strides, swapped, dilation, activation)


def test_kernel_with_off_by_one_padding_is_shown_failed_with_explain_command(capsys):
    from dlconv import cli

    rows = bench.run_kernels(bench.plan(TINY[:2], ("forward",)), [bench.HostPlace()], [],
                             bench.ReferenceBuiltin(), FAST, progress=False,
                             kernels=[user_kernels.make_kernel(off_by_one_padding),
                                      user_kernels.make_kernel(_example(), name="example")])
    wrong = [r for r in rows if r["impl"] == "off_by_one_padding"]
    right = [r for r in rows if r["impl"] == "example"]
    assert len(wrong) == len(right) == 2                       # one row per conv forward layer
    for r in wrong:                                            # failed, not timed
        assert r["status"] == "failed" and r["correct"] is False and r["backend"] == "user"
        assert r["median_s"] is None and r["ratio"] is None and r["gflops"] is None
        # the third check geometry is the first with asymmetric pads (stride 2, "same")
        assert r["explain"] == ("dlconv explain --input 8x7x2 --kernel 3x2 --filters 3 --stride 2x2 "
                                "--padding same --dilation 1x1 --batch 2 --at 1,1 --filter A")
        assert r["element"].startswith("O1 (filter A, row 1, column 1, image 1 of 2): got ")
        assert "reproduce: dlconv explain" in r["why"] and r["checked_geometries"] == 3
    for r in right:                                            # correct: checked and timed
        assert r["status"] == "ok" and r["correct"] and r["checked_geometries"] == 12
        assert r["median_s"] > 0 and r["ratio"] == pytest.approx(rows[0]["median_s"] / r["median_s"]) \
            or r["layer"] != "tconv"
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)
    # the printed command reproduces the geometry: explain names the same output's equation
    assert cli.main(wrong[0]["explain"].split()[1:]) == 0
    out = capsys.readouterr().out
    assert "Output shape (batch, H0, W0, K) = (2, 4, 4, 3)" in out and "O1 = A1[c1]·I1[c1]" in out
    # the text report prints the failure in full, below the table
    result = bench.new_result("cpu", {"description": "m"}, FAST, "reference")
    result["rows"] = rows
    assert "off_by_one_padding on tconv forward [cpu]: wrong on input 2×8×7×2" in bench.format_text(result)


def test_first_wrong_element_is_named_in_the_workshops_notation():
    g = shapes.conv_geometry((1, 5, 5, 1), (3, 3, 1, 2), 1, "same")
    spec = bench.PASSES[("conv", "forward")]
    rng = np.random.default_rng(0)
    y = rng.random(g.y_shape).astype(np.float32) + 1
    bad = y.copy()
    bad[0, 0, 0, 1] = 0.5                                       # filter B, row 1, column 1
    bad[0, 4, 4, 1] = 0.0                                       # later in the numbering
    res = user_kernels.first_wrong(spec, g, [bad], [y], "same")
    assert res.element == f"O26 (filter B, row 1, column 1): got 0.5, expected {y[0, 0, 0, 1]:.6g}"
    assert res.explain == ("dlconv explain --input 5x5x1 --kernel 3x3 --filters 2 --stride 1x1 "
                           "--padding same --dilation 1x1 --at 1,1 --filter B")
    # backward-data: an input element, explained by the reverse map
    g2 = shapes.conv_geometry((2, 4, 5, 2), (2, 2, 2, 3), 1, ((0, 1), (1, 0)))
    dx = np.ones(g2.x_shape, np.float32)
    bad = dx.copy()
    bad[1, 2, 3, 1] = 3.0
    res = user_kernels.first_wrong(bench.PASSES[("conv", "backward-data")], g2, [bad], [dx])
    assert res.element.startswith("dI14[c2] (input row 3, column 4, channel 2, image 2 of 2): got 3")
    assert res.explain.endswith("--padding 0,1,1,0 --dilation 1x1 --batch 2 --transposed --at 3,4")
    # backward-filter: a weight gradient, then the bias gradient
    dw, db = np.ones(g2.w_shape, np.float32), np.ones(g2.filters, np.float32)
    bad = dw.copy()
    bad[1, 0, 0, 2] = 0.0
    spec_f = bench.PASSES[("conv", "backward-filter")]
    assert user_kernels.first_wrong(spec_f, g2, [bad, db], [dw, db]).element.startswith(
        "dC3[c1] (the gradient of filter C's weight at kernel row 2, column 1, channel 1)")
    assert user_kernels.first_wrong(spec_f, g2, [dw, db * 2], [dw, db]).element.startswith(
        "db of filter A (its bias): got 2")
    # dense: the 1x1 convolution of a 1x1xIN input
    gd = shapes.dense_geometry((3, 7), (7, 4))
    yd = np.ones(gd.y_shape, np.float32)
    bad = yd.copy()
    bad[2, 3] = 0.0
    res = user_kernels.first_wrong(bench.PASSES[("dense", "forward")], gd, [bad], [yd])
    assert res.element.startswith("O4 (filter D, row 1, column 1, image 3 of 3)")
    assert res.explain == "dlconv explain --input 1x1x7 --kernel 1 --filters 4 --batch 3 --at 1,1 --filter D"
    assert "shape (2, 4)" in user_kernels.first_wrong(
        bench.PASSES[("dense", "forward")], gd, [yd[:2]], [yd]).why


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward_data", "conv2d_backward_filter", "dense",
                                "dense_backward"])
def test_every_op_of_the_api_passes_its_own_check(op):
    """dlconv's own ops (reference backend) have the signature a kernel needs: the check
    geometries, the call, the reference and the comparison agree for every pass."""
    import functools

    fn = functools.partial(getattr(ops, op), backend="reference")
    res = user_kernels.check_kernel(user_kernels.make_kernel(fn, op, name=op))
    kind = "dense" if op.startswith("dense") else "conv"
    assert res.ok, res
    assert res.checked == len(user_kernels.check_cases(kind))


def test_a_kernel_that_raises_or_misses_an_output_fails_its_check():
    def raises(x, w, b=None, **kw):
        raise RuntimeError("no such tile size")

    res = user_kernels.check_kernel(raises)
    assert not res.ok and res.checked == 1 and "RuntimeError: no such tile size" in res.why
    assert res.explain.startswith("dlconv explain --input 5x5x1 --kernel 3x3 --filters 2")

    def dw_only(x, dy, w_shape, **kw):
        return ops.conv2d_backward_filter(x, dy, w_shape, backend="reference", **kw)[0]
    res = user_kernels.check_kernel(dw_only, pass_="conv2d_backward_filter")
    assert not res.ok and "returned 1 array(s), expected 2 (dw, db)" in res.why


def test_register_and_load_kernels_name_bad_values():
    user_kernels.clear_kernels()
    try:
        k = bench.register_kernel(_example())
        assert k.spec is bench.PASSES[("conv", "forward")] and k.name == "my_conv2d"
        assert bench.registered() == [k]
        with pytest.raises(ValueError, match="registered already"):
            bench.register_kernel(_example())
        k2 = bench.register_kernel(lambda x, w, b=None, activation=None: x @ w, "dense", name="mm")
        assert k2.spec is bench.PASSES[("dense", "forward")]
    finally:
        user_kernels.clear_kernels()
    with pytest.raises(ValueError, match=r"pass must be one of \('conv2d'"):
        user_kernels.make_kernel(_example(), "conv3d")
    with pytest.raises(TypeError, match="kernel must be callable"):
        user_kernels.make_kernel(3)
    with pytest.raises(ValueError, match="--kernel must look like"):
        user_kernels.load_kernel("no_colon_here")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        user_kernels.load_kernel(f"{EXAMPLE}:nope")
    with pytest.raises(ValueError, match="cannot import no_such_module_here"):
        user_kernels.load_kernel("no_such_module_here:f")
    k = user_kernels.load_kernel("dlconv.ops:dense@dense")
    assert k.fn is ops.dense and k.spec.op == "dense"
    assert user_kernels.load_kernel(f"{EXAMPLE}:my_conv2d").spec.op == "conv2d"   # dlconv_pass


def test_kernel_on_cuda_arrays_under_the_simulator():
    """On a CUDA place the kernel gets CUDA arrays (Numba device arrays here) and may return
    one; the check reads it back."""
    from numba import cuda

    seen = []

    def cuda_kernel(x, w, b=None, **kw):
        # device arrays, not NumPy (the simulator's carry no __cuda_array_interface__)
        seen.append(all(not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host") for a in (x, w, b)))
        host = [a.copy_to_host() for a in (x, w, b)]        # a real kernel would launch here
        return cuda.to_device(ops.conv2d(*host, backend="reference", **kw))

    res = user_kernels.check_kernel(cuda_kernel, place=bench.NumbaCudaPlace())
    assert res.ok, res
    assert seen == [True] * res.checked


# ----------------------------------------------------------------------------- roofline
def test_roofline_rows_count_bytes_and_the_png_is_written(tmp_path, broken):
    result = _tiny_result(tmp_path, broken)
    for r in result["rows"]:
        layer = {t.name: t for t in TINY}[r["layer"]]
        p = bench.make_problem(layer, r["pass"], FAST.batch)
        n_in = sum(a.size for a in p.inputs.values())
        n_out = sum(np.size(e) for e in p.expected)
        assert r["bytes"] == 4 * (n_in + n_out) and r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
    paths = bench.write_outputs(result, tmp_path, "roof-test")
    assert paths["roofline"].name == "roof-test-roofline.png"
    assert paths["roofline"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["roofline"]["cpu"]["peak_gflops"] == 50.0
    assert "roof (cpu, measured by this run): compute 50 GFLOP/s (test peak); memory 10.0 GB/s" \
        in paths["md"].read_text()


def test_cpu_roof_is_measured_briefly():
    from dlconv.bench import roofline

    r = roofline.measure_cpu_roof()
    assert 0.1 < r["peak_gflops"] < 1e5 and 0.1 < r["bandwidth_gbs"] < 1e4
    assert r["probe_s"] < 15                # about 1 s idle; the bound allows a loaded machine
    assert "practical peak" in r["peak_how"]


def test_cli_times_the_example_kernel(tmp_path):
    """The README's example, end to end: `dlconv bench --kernel examples/my_conv2d.py:my_conv2d`."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dlconv", "bench", "--kernel", f"{EXAMPLE}:my_conv2d", "--quick",
           "--layers", "conv2", "--passes", "forward", "--no-train-step", "--backends", "cpp",
           "--no-progress", "--out", str(tmp_path), "--name", "k"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads((tmp_path / "k.json").read_text())
    mine = [r for r in d["rows"] if r["backend"] == "user"]
    assert len(mine) == 1 and mine[0]["impl"] == "my_conv2d" and mine[0]["status"] == "ok"
    assert mine[0]["median_s"] > 0 and mine[0]["ratio"] > 0 and mine[0]["checked_geometries"] == 12
    assert d["roofline"]["cpu"]["peak_gflops"] > 0
    assert (tmp_path / "k-roofline.png").read_bytes()[:4] == b"\x89PNG"
    assert "my_conv2d" in out.stdout and "roof (cpu, measured by this run)" in out.stdout


def test_cli_shows_a_wrong_kernel_failed_with_its_explain_command(tmp_path):
    import subprocess
    import sys

    (tmp_path / "wrong_kernel.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_bench import off_by_one_padding\n")
    cmd = [sys.executable, "-m", "dlconv", "bench", "--kernel",
           f"{tmp_path / 'wrong_kernel.py'}:off_by_one_padding", "--quick", "--layers", "conv1",
           "--passes", "forward", "--no-train-step", "--backends", "cpp", "--no-progress",
           "--out", str(tmp_path), "--name", "w"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 1, out.stderr[-2000:]            # a failed case fails the run
    assert "off_by_one_padding conv1 forward" in out.stderr
    assert ("off_by_one_padding on conv1 forward [cpu]: wrong on input 2×8×7×2, kernel 3×2, 3 filters, "
            "stride 2×2") in out.stdout
    assert "O1 (filter A, row 1, column 1, image 1 of 2): got " in out.stdout
    assert "reproduce: dlconv explain --input 8x7x2 --kernel 3x2 --filters 3 --stride 2x2 --padding same" \
        in out.stdout
    d = json.loads((tmp_path / "w.json").read_text())
    row = [r for r in d["rows"] if r["backend"] == "user"][0]
    assert row["status"] == "failed" and row["median_s"] is None
    cpp = [r for r in d["rows"] if r["backend"] == "cpp"]
    assert cpp and all(r["status"] == "ok" and r["median_s"] > 0 for r in cpp)   # the others timed


def test_a_kernel_wrong_only_on_the_suites_shape_is_named_there_too():
    """Right on every check geometry (batch 2), wrong at the suite's batch 3: the suite's
    own check fails it, with the layer's geometry as the explain command."""
    def last_image_zero(x, w, b=None, **kw):
        y = _example()(x, w, b, **kw)
        if x.shape[0] > user_kernels.CHECK_BATCH:
            y[-1] = 0.0
        return y

    rows = bench.run_kernels(bench.plan(TINY[:1], ("forward",)), [bench.HostPlace()], [],
                             bench.ReferenceBuiltin(), FAST, progress=False,
                             kernels=[user_kernels.make_kernel(last_image_zero)])
    r = rows[-1]
    assert r["checked_geometries"] == 12 and r["status"] == "failed" and r["median_s"] is None
    assert "O1 (filter A, row 1, column 1, image 3 of 3): got 0, expected " in r["why"]
    assert ("reproduce: dlconv explain --input 6x5x2 --kernel 3x3 --filters 3 --stride 1x1 "
            "--padding valid --dilation 1x1 --batch 3 --at 1,1 --filter A; not timed") in r["why"]


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 3), f=st.integers(1, 4),
       k=st.integers(1, 3), s=st.integers(1, 3), pad=st.sampled_from(["valid", "same", (0, 1, 2, 1)]),
       data=st.data())
def test_the_named_output_is_the_one_explain_numbers(h, w, c, f, k, s, pad, data):
    """For any geometry and any wrong output element, the name first_wrong gives is the
    number, filter and position dlconv.explain uses for that element."""
    from dlconv import explain

    padding = pad if isinstance(pad, str) else ((pad[0], pad[1]), (pad[2], pad[3]))
    k = min(k, h, w)                      # "valid" needs the kernel to fit
    g = shapes.conv_geometry((2, h, w, c), (k, k, c, f), s, padding)
    idx = tuple(data.draw(st.integers(0, n - 1)) for n in g.y_shape)
    y = np.ones(g.y_shape, np.float32)
    bad = y.copy()
    bad[idx] = 5.0
    res = user_kernels.first_wrong(bench.PASSES[("conv", "forward")], g, [bad], [y], padding)
    n, oh, ow, fi = idx
    e = explain.explain(g, at=(oh + 1, ow + 1), filter=explain.filter_letter(fi))
    eq = e.equations[0]
    assert res.element == (f"O{eq.output} (filter {eq.filter}, row {eq.row}, column {eq.col}, "
                           f"image {n + 1} of 2): got 5, expected 1")
    assert f"--at {oh + 1},{ow + 1} --filter {eq.filter}" in res.explain
