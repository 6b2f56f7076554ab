"""The shape suites of ``dlconv bench --suite`` (dlconv.bench.suites): the ecal suite's
shapes are the physics ResNet's Conv2D layers plus issue 13's table, each layer keeps its own
batch unless ``--batch`` is given, the suite targets count every (layer, pass), make_table
keeps the MNIST table and adds the suite's, and the CLI runs the suite end to end on tiny
batches (exit 0, every (layer, pass) in the JSON)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from dlconv import bench
from dlconv.bench import suites

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = bench.Settings(batch=2, repeats=1, warmup=0, min_sample_s=0.0, train_repeats=1)

keras = pytest.importorskip("keras")


def _model_shapes(model):
    """{(input HxWxC, kernel HWIO, strides, padding)} of every Conv2D of a built model."""
    out = set()
    for layer in suites._walk(model):
        if isinstance(layer, keras.layers.Conv2D):
            out.add((tuple(layer.input.shape[1:]), tuple(layer.kernel.shape), tuple(layer.strides),
                     layer.padding))
    return out


def _layer_shape(layer):
    s = layer.strides if isinstance(layer.strides, tuple) else (layer.strides, layer.strides)
    return (layer.sample_shape, layer.w_shape, s, layer.padding)


def test_ecal_suite_is_every_conv_shape_of_the_resnet_and_the_issue_table():
    from dlconv import models

    model = models.resnet_ecal(stock=True)
    layers = suites.suite_layers("ecal")
    ecal = [layer for layer in layers if layer.name.startswith("ecal_")]
    assert {_layer_shape(layer) for layer in ecal} == _model_shapes(model)
    assert all(layer.batch == suites.ECAL_BATCH == 32 and layer.suite == "ecal" for layer in ecal)
    # the ResNet of Andrews et al.: 7x7/2 stem 1 -> 16, 3x3 16 -> 16, the stride-2 block
    # into 32 with its 1x1 projection shortcut, 3x3 32 -> 32
    assert {layer.name for layer in ecal} == {"ecal_7x7s2_1to16", "ecal_3x3_16to16",
                                              "ecal_3x3s2_16to32", "ecal_1x1s2_16to32",
                                              "ecal_3x3_32to32"}
    by = {layer.name: layer for layer in layers}
    assert by["ecal_7x7s2_1to16"].w_shape == (7, 7, 1, 16) and by["ecal_7x7s2_1to16"].strides == 2
    assert by["ecal_1x1s2_16to32"].w_shape == (1, 1, 16, 32)
    n_convs = sum(1 for layer in suites._walk(model) if isinstance(layer, keras.layers.Conv2D))
    counted = sum(int(layer.note.split("×")[1].split()[0]) if layer.note.startswith("×") else 1
                  for layer in ecal)
    assert counted == n_convs                               # each Conv2D is one of the shapes
    # issue 13's table: MNIST conv2 and six more, each at the batch the issue measured
    assert by["conv2"] is bench.LAYER_BY_NAME["conv2"]
    for layer in suites.ISSUE13_LAYERS:
        assert by[layer.name] is layer and layer.batch in (32, 64)
    assert [layer.geometry().batch for layer in suites.ISSUE13_LAYERS] == [32, 32, 32, 64, 32, 64]


def test_all_is_both_suites_each_shape_once():
    mnist, ecal, both = (suites.suite_layers(s) for s in ("mnist", "ecal", "all"))
    assert mnist == list(bench.LAYERS)
    assert [layer.name for layer in both] == [layer.name for layer in mnist] + [
        layer.name for layer in ecal if layer.name != "conv2"] + [
        layer.name for layer in suites.GROUP_LAYERS]
    assert suites.suite_train_steps("all") == ["mnist_cnn", "resnet_ecal"]
    with pytest.raises(ValueError, match="--suite must be one of mnist, ecal, groups, all; got 'cifar'"):
        suites.suite_layers("cifar")
    with pytest.raises(ValueError, match="--layers must be .*conv1.*got conv9 "):
        suites.select(mnist, ["conv1", "conv9"])


def test_model_conv_layers_dedupes_names_and_skips_transposed():
    x = keras.Input((9, 8, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    b = keras.layers.Conv2D(4, 3, padding="same")(a)                  # same shape as a: one layer
    c = keras.layers.Conv2D(4, 3, strides=(1, 2), padding="valid")(keras.layers.Add()([a, b]))
    inner = keras.Sequential([keras.Input(c.shape[1:]), keras.layers.Conv2D(4, 3, padding="same")])
    d = keras.layers.Conv2DTranspose(2, 2, strides=2)(inner(c))
    model = keras.Model(x, d)
    got = suites.model_conv_layers(model, "t", 5, "test", "tiny")
    assert [(g.name, g.sample_shape, g.strides, g.padding, g.activation, g.note) for g in got] == [
        ("t_3x3_2to4", (9, 8, 2), 1, "same", "relu", "in tiny"),
        ("t_3x3_4to4_9x8", (9, 8, 4), 1, "same", "linear", "in tiny"),
        ("t_3x3s1x2_4to4", (9, 8, 4), (1, 2), "valid", "linear", "in tiny"),
        ("t_3x3_4to4_7x3", (7, 3, 4), 1, "same", "linear", "in tiny"),       # inside the nested model
    ]
    assert all(g.batch == 5 and g.geometry().batch == 5 for g in got)


def test_a_layer_keeps_its_own_batch_unless_the_batch_is_fixed():
    layer = bench.Layer("own", "conv", (5, 5, 2), (3, 3, 2, 3), "relu", batch=3, suite="ecal")
    for fixed, batch, cell in ((False, 3, "own (b3)"), (True, 2, "own")):
        settings = bench.Settings(batch=2, batch_fixed=fixed, repeats=1, warmup=0, min_sample_s=0.0)
        rows = bench.run_kernels(bench.plan([layer], ("forward",)), [bench.HostPlace()], ["reference"],
                                 bench.ReferenceBuiltin(), settings, progress=False)
        assert {r["batch"] for r in rows} == {batch} and {r["suite"] for r in rows} == {"ecal"}
        assert rows[1]["flops"] == 2 * batch * (3 * 3) * (3 * 3 * 2) * 3     # 3x3 outputs, 18 taps, 3 filters
        assert bench.table_rows({"settings": {"batch": 2}, "rows": rows})[0][0] == cell


def test_suite_targets_count_every_layer_and_pass():
    def row(layer, pass_, backend, ratio, suite="ecal"):
        return {"layer": layer, "pass": pass_, "device": "cpu", "backend": backend, "suite": suite,
                "impl": backend, "ratio": ratio, "why": None}
    rows = [row("a", "forward", "cpp", 1.4), row("a", "forward", "cpp", 0.2),   # best variant counts
            row("a", "backward-data", "cpp", 0.3), row("b", "forward", "cpp", 2.0),
            row("a", "forward", "numba", 0.6), row("b", "forward", "numba", None),
            row("conv2", "forward", "cpp", 0.1, suite="mnist")]                 # not the suite's
    t = {s["label"]: s for s in bench.summarize_targets(rows)}
    cpp = t["C++ CPU, every pass of every ecal-suite shape"]
    assert cpp["met"] is False and cpp["value"] == 0.3 and (cpp["met_count"], cpp["count"]) == (2, 3)
    assert "worst a backward-data" in cpp["why"]
    numba = t["Numba CPU, every pass of every ecal-suite shape"]
    assert numba["met"] is None and numba["value"] == 0.6 and "not timed: b forward" in numba["why"]
    assert bench.summarize_targets([row("a", "forward", "cpp", 1.4)])[-1]["met"] is True


def test_make_table_keeps_the_mnist_table_and_adds_the_suites(tmp_path, capsys):
    machine = {"description": "test machine", "cpu_brand": "AMD EPYC", "cores": 2}
    roof = {"cpu": {"peak_gflops": 50.0, "bandwidth_gbs": 10.0, "peak_how": "p", "bandwidth_how": "b",
                    "probe_s": 0.0}}
    layer = bench.Layer("own", "conv", (5, 5, 2), (3, 3, 2, 3), "relu", batch=3, suite="ecal")
    for suite, name, layers in (("mnist", "a-mnist", [bench.Layer("tconv", "conv", (6, 5, 2),
                                                                  (3, 3, 2, 3), "relu")]),
                                ("all", "b-all", [layer])):
        result = bench.new_result("cpu", machine, FAST, "reference", suite=suite)
        result["rows"] = bench.run_kernels(bench.plan(layers, ("forward",)), [bench.HostPlace()],
                                           ["reference"], bench.ReferenceBuiltin(), FAST, progress=False)
        result["roofline"] = roof
        result["timestamp"] = "2026-12-01T00:0" + ("1" if suite == "all" else "0")
        bench.write_outputs(result, tmp_path, name)
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    assert mt.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    cpu = out[out.index("### CPU (a-mnist.json)"):out.index("### GPU")]
    assert "| tconv | forward |" in cpu and "own" not in cpu            # the newer suite run is not the MNIST table
    suite = out[out.index("### CPU, shape suite `--suite all` (b-all.json)"):]
    assert "| own (b3) | forward | cpu | reference/default |" in suite
    assert "Batch 2 unless the layer says (bN: the layer's own batch)" in suite


def test_cli_runs_the_ecal_suite_on_tiny_batches(tmp_path):
    """``dlconv bench --suite ecal --quick`` end to end at batch 1: exit 0, and the JSON has a
    built-in row and a timed cpp row for every (layer, pass) of the suite."""
    cmd = [sys.executable, "-m", "dlconv", "bench", "--suite", "ecal", "--quick", "--batch", "1",
           "--repeats", "1", "--backends", "cpp", "--no-train-step", "--no-progress",
           "--out", str(tmp_path), "--name", "e"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["suite"] == "ecal" and d["settings"]["batch_fixed"] is True
    want = {(layer.name, p) for layer in suites.suite_layers("ecal") for p in layer.passes}
    assert len(want) == 3 * (5 + 1 + 6)
    for kind in ("builtin", "cpp"):
        got = {(r["layer"], r["pass"]) for r in d["rows"] if r["backend"] == kind and r["status"] == "ok"}
        assert got == want, (kind, want - got)
    assert {r["batch"] for r in d["rows"]} == {1}
    labels = [t["label"] for t in d["targets"]]
    assert "C++ CPU, every pass of every ecal-suite shape" in labels
    assert "ecal_1x1s2_16to32" in out.stdout and "i13_5x5_32to64" in out.stdout


def test_resnet_train_step_is_checked_and_timed_against_stock():
    rows = bench.run_train_step(["cpp"], bench.Settings(batch=2, batch_fixed=True, repeats=1,
                                                        warmup=0, train_repeats=1),
                                progress=False, model="resnet_ecal")
    stock, ours = rows
    assert stock["backend"] == "builtin" and stock["layer"] == "resnet_ecal" and stock["batch"] == 2
    assert ours["impl"] == "dlconv(cpp)" and ours["correct"] is True and ours["status"] == "ok", ours
    from dlconv.bench.cases import TOLERANCE
    # held to the usual tolerance, against the float64 reference (TF's oneDNN is the outlier)
    assert ours["tol"] == TOLERANCE and ours["max_rel_err"] <= TOLERANCE
    assert "dlconv.reference" in ours["note"] and ours["stock_max_rel_err"] is not None
    assert ours["target"] == 0.9 and ours["time_ratio"] == pytest.approx(ours["median_s"] / stock["median_s"])
    t = bench.summarize_targets([], rows)
    assert t[-1]["label"] == "ECAL ResNet train step dlconv(cpp) vs stock Keras (time ratio)"


def test_docs_shape_suite_section_is_make_tables(capsys):
    """The shape-suite figures of docs/benchmarks.md are make_table's rendering of the
    committed run (none typed in)."""
    spec = importlib.util.spec_from_file_location("make_table", ROOT / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    results = ROOT / "benchmarks" / "results"
    if mt.latest(mt.load_results(results), "cpu", mt.SHAPE_SUITES) is None:
        pytest.skip("no shape-suite run is committed in benchmarks/results/")
    assert mt.main(["--results", str(results)]) == 0
    out = capsys.readouterr().out
    section = out[out.index("### CPU, shape suite"):].strip()
    assert section in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def test_groups_suite_layers_are_grouped_and_count_flops_over_g():
    layers = suites.suite_layers("groups")
    assert [layer.groups for layer in layers] == [1, 2, 4, 64]
    base = layers[0]
    for layer in layers:
        g = layer.geometry()
        assert g.groups == layer.groups and layer.w_shape == (3, 3, 64 // layer.groups, 64)
        assert g.x_shape == (suites.GROUPS_BATCH, 28, 28, 64) and g.y_shape[1:] == (28, 28, 64)
        for p in layer.passes:
            assert layer.flops(p) * layer.groups == base.flops(p)
        prob = bench.make_problem(layer, "backward-filter", batch=1)
        assert prob.expected[0].shape == layer.w_shape
    assert "depthwise (groups 64)" in layers[-1].describe() and "groups 2" in layers[1].describe()
    assert bench.LAYERS[1].groups == 1                      # the MNIST layers are untouched


def test_cli_runs_the_groups_suite_on_tiny_batches(tmp_path):
    """``dlconv bench --suite groups --quick`` at batch 1: every (layer, pass) has a correct,
    timed TensorFlow row (grouped tf.nn.conv2d and its gradients) and cpp row, with a ratio."""
    cmd = [sys.executable, "-m", "dlconv", "bench", "--suite", "groups", "--quick", "--batch", "1",
           "--repeats", "1", "--backends", "cpp", "--no-progress", "--out", str(tmp_path),
           "--name", "g"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["suite"] == "groups" and not d["train_rows"] and not d.get("inference_rows")
    want = {(layer.name, p) for layer in suites.GROUP_LAYERS for p in layer.passes}
    assert len(want) == 4 * 3
    for kind in ("builtin", "cpp"):
        got = {(r["layer"], r["pass"]) for r in d["rows"]
               if r["backend"] == kind and r["status"] == "ok" and r["correct"] is True}
        assert got == want, (kind, want - got)
    assert all(r["ratio"] > 0 for r in d["rows"] if r["backend"] == "cpp")
    assert "grp_3x3_64to64_dw" in out.stdout
