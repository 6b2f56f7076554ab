"""The conv variant names and tables (dlconv.variants, csrc/conv_variants.h): one scheme
{cpu,cuda}_v{N}_{technique} across the four kernel sets, one table per set that everything
else reads, old names accepted for one release with a DeprecationWarning naming the new one,
and the bench's targets judged on the default variant only."""

import warnings

import numpy as np
import pytest

from dlconv import backends, bench, info, locate, ops, variants
from dlconv.shapes import conv_geometry

try:
    from dlconv import _C
except ImportError:  # pragma: no cover - the C++ extension is part of every build here
    _C = None
try:
    from dlconv import _C_cuda
except ImportError:
    _C_cuda = None

needs_c = pytest.mark.skipif(_C is None, reason="dlconv._C is not built")


def _tables():
    """(set name, device, table) of the four kernel sets."""
    out = [("numba cpu", "cpu", variants.NUMBA_CPU), ("numba cuda", "cuda", variants.NUMBA_CUDA)]
    if _C is not None:
        out += [("cpp cpu", "cpu", variants.from_cpp(_C.CONV_VARIANTS)),
                ("cpp cuda", "cuda", variants.from_cpp(_C.CUDA_CONV_VARIANTS))]
    return out


def test_every_name_follows_the_scheme_and_v1_is_the_baseline():
    assert len(_tables()) == 4 or _C is None
    for what, device, table in _tables():
        names = [v.name for v in table]
        assert len(set(names)) == len(names), what
        for v in table:
            m = variants.NAME_RE.match(v.name)
            assert m, (what, v.name)
            assert m.group(1) == device and int(m.group(2)) == v.number and m.group(3) == v.technique
            assert v.technique in variants.TECHNIQUES, (what, v.name)
            assert v.passes and set(v.passes) <= set(variants.PASSES), (what, v.name)
            assert v.applies and v.default and v.description and v.source, (what, v.name)
        v1 = [v for v in table if v.number == 1]
        assert v1 and all(set(v.passes) == set(variants.PASSES) for v in v1), what
        # a technique word names one number in a set (a step of the progression)
        for t in {v.technique for v in table}:
            assert len({v.number for v in table if v.technique == t}) == 1, (what, t)
        # every pass has a path, and an old name is never a current one
        assert {p for v in table for p in v.passes} == set(variants.PASSES), what
        assert not set(variants.aliases(table)) & set(names), what


def test_the_old_names_of_the_issue_map_to_the_new_ones():
    numba_cpu, numba_cuda = variants.aliases(variants.NUMBA_CPU), variants.aliases(variants.NUMBA_CUDA)
    assert numba_cpu == {"cpu_direct": "cpu_v1_direct", "cpu_gemm": "cpu_v2_regblock",
                         "cpu_v3_gemm_small": "cpu_v3_smalltile"}
    assert numba_cuda == {"v1_direct": "cuda_v1_direct", "v2_smem_tiled": "cuda_v2_halotile",
                          "v3_implicit_gemm": "cuda_v3_regblock"}
    if _C is not None:
        cpp_cpu = variants.aliases(variants.from_cpp(_C.CONV_VARIANTS))
        cpp_cuda = variants.aliases(variants.from_cpp(_C.CUDA_CONV_VARIANTS))
        assert cpp_cpu == {"cpu_v1_igemm": "cpu_v1_packgemm", "cpu_v2_direct": "cpu_v2_regblock"}
        assert cpp_cuda == {"v1_direct": "cuda_v1_direct", "v2_smem_tiled": "cuda_v2_gemmtile",
                            "v3_implicit_gemm": "cuda_v3_regblock"}
        # "direct" is the naive kernel everywhere now (it was AVX-512 register blocking in C++)
        tables = [t for _, _, t in _tables()]
        assert all(v.number == 1 for t in tables for v in t if v.technique == "direct")


@needs_c
def test_the_cpp_backend_reads_the_tables_from_the_bindings():
    be = backends.get("cpp")
    assert be.variant_table(False) == variants.from_cpp(_C.CONV_VARIANTS)
    assert be.variant_table(True) == variants.from_cpp(
        _C_cuda.CONV_VARIANTS if _C_cuda is not None else _C.CUDA_CONV_VARIANTS)
    if _C_cuda is not None:
        assert _C_cuda.CONV_VARIANTS == _C.CUDA_CONV_VARIANTS
    selectable = {v.name for v in be.variant_table(False) if v.code != -1 and "forward" in v.passes}
    assert set(be.conv_variants(False)) == selectable
    assert "cpu_v2_subpixel" in {v.name for v in be.variant_table(False)}   # backward-data only
    assert "cpu_v2_subpixel" not in be.conv_variants(False)


@needs_c
def test_bindings_reject_unknown_codes_naming_the_valid_ones():
    g = conv_geometry((1, 6, 6, 4), (3, 3, 4, 8)).as_tuple()
    x = np.ones((1, 6, 6, 4), np.float32)
    w = np.ones((3, 3, 4, 8), np.float32)
    names = [r["name"] for r in _C.CONV_VARIANTS if r["code"] != -1]
    for bad in (7, -1, 4):
        with pytest.raises(ValueError, match="variant must be one of 0 \\(auto\\)") as e:
            _C.conv2d_forward(x, w, None, g, 0, variant=bad)
        assert all(n in str(e.value) for n in names) and str(bad) in str(e.value)
        with pytest.raises(ValueError, match="variant must be one of"):
            _C.forward_variant_applicable(g, bad)
    if _C_cuda is not None:           # the variant is checked before any array is looked at
        with pytest.raises(ValueError, match="variant must be one of cuda_v1_direct \\(1\\)") as e:
            _C_cuda.conv2d_forward(None, None, None, g, 0, None, 0, 0)
        assert "cuda_v3_regblock (3)" in str(e.value)


def _arrays(shape=(1, 6, 7, 3), wshape=(3, 3, 3, 5)):
    rng = np.random.default_rng(3)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(wshape).astype(np.float32)


@pytest.mark.parametrize("backend,old", [("numba", "cpu_gemm"), ("numba", "cpu_direct"),
                                         ("numba", "cpu_v3_gemm_small"),
                                         pytest.param("cpp", "cpu_v2_direct", marks=needs_c),
                                         pytest.param("cpp", "cpu_v1_igemm", marks=needs_c)])
def test_old_names_still_run_with_a_deprecation_warning_naming_the_new_one(backend, old):
    x, w = _arrays()
    new = variants.aliases(backends.get(backend).variant_table(False))[old]
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated.*now called '{new}'"):
        y_old = ops.conv2d(x, w, padding="same", backend=backend, variant=old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)      # the new name does not warn
        y_new = ops.conv2d(x, w, padding="same", backend=backend, variant=new)
    np.testing.assert_array_equal(y_old, y_new)


def test_old_cuda_name_under_the_simulator_warns_and_runs():
    cuda = pytest.importorskip("numba.cuda")
    x, w = _arrays((1, 4, 4, 2), (2, 2, 2, 3))
    with pytest.warns(DeprecationWarning, match="now called 'cuda_v3_regblock'"):
        y = ops.conv2d(cuda.to_device(x), cuda.to_device(w), backend="numba", variant="v3_implicit_gemm")
    from dlconv import reference as ref
    np.testing.assert_allclose(y.copy_to_host(), ref.conv2d_forward(x, w, None, conv_geometry(x.shape, w.shape)),
                               rtol=1e-5, atol=1e-5)


def test_unknown_and_wrong_set_names_are_value_errors_naming_the_valid_ones():
    x, w = _arrays()
    with pytest.raises(ValueError, match=r"variant must be one of \('cpu_v3_smalltile', 'cpu_v2_regblock', "
                                         r"'cpu_v1_direct'\) for backend 'numba' on the CPU"):
        ops.conv2d(x, w, backend="numba", variant="cpu_v9_magic")
    with pytest.raises(ValueError, match="variant must be one of"):         # a CUDA name on the CPU
        ops.conv2d(x, w, backend="numba", variant="cuda_v1_direct")
    with pytest.raises(ValueError, match="variant must be one of"):         # an old CUDA name on the CPU
        ops.conv2d(x, w, backend="numba", variant="v1_direct")


def test_info_bench_and_locate_print_only_table_names():
    known = {v.name for _, _, t in _tables() for v in t}
    d = info.info()
    for name in ("numba", "cpp"):
        b = d["backends"][name]
        assert set(b["variants"]) <= known and set(b["cuda_variants"]) <= known, name
    assert "conv variants (CPU): cpu_v2_regblock" in info.format_info(d)
    for device in ("cpu", "cuda"):
        for name, vs, why in bench.our_impls(device, ["numba", "cpp"]):
            assert why is not None or set(vs) <= known, (device, name, vs)
    labels = locate.VARIANT_LABELS
    assert set(labels["numba"].values()) <= known
    assert labels["numba"] == {"v1": "cuda_v1_direct", "v2": "cuda_v2_halotile", "v3": "cuda_v3_regblock"}
    if _C is not None:
        assert labels["cpp"] == {"v1": "cuda_v1_direct", "v2": "cuda_v2_gemmtile", "v3": "cuda_v3_regblock"}
        assert labels["cpp_cpu"] == "cpu_v2_regblock"


@needs_c
def test_bench_marks_the_default_variant_and_sets_targets_on_it_only():
    layer = bench.Layer("conv2", "conv", (10, 10, 32), (3, 3, 32, 64), "relu")   # a target's layer name
    s = bench.Settings(batch=1, repeats=1, warmup=0, min_sample_s=0.0)
    rows = bench.run_kernels(bench.plan([layer], ("forward",)), [bench.HostPlace()], ["cpp"],
                             bench.ReferenceBuiltin(), s, progress=False)
    ours = [r for r in rows if r["backend"] == "cpp"]
    assert len(ours) == 3
    default = backends.get("cpp").default_variant(False, layer.geometry())
    assert default == "cpu_v3_winograd" and [r["variant"] for r in ours if r["default"]] == [default]
    for r in ours:
        assert r["variant"] in variants.names(backends.get("cpp").variant_table(False))
        assert (r["target"] is not None) == r["default"], r["impl"]
    result = bench.new_result("cpu", {"description": "test"}, s, "reference")
    result["rows"] = rows
    result["targets"] = bench.summarize_targets(rows)
    text = bench.format_markdown(result)
    assert "judged on the dispatch default" in text and "| default path |" in text


def test_summarize_targets_judges_the_default_not_the_best():
    def row(**kw):
        base = {"device": "cpu", "layer": "conv2", "pass": "forward", "backend": "cpp", "why": None}
        return dict(base, **kw)
    rows = [row(impl="cpp/cpu_v3_winograd", ratio=0.9, default=True),
            row(impl="cpp/cpu_v2_regblock", ratio=1.6, default=False),
            row(backend="numba", impl="numba/cpu_v1_direct", ratio=0.9, default=False),
            row(backend="numba", impl="numba/cpu_v2_regblock", ratio=None, default=True, why="failed")]
    t = {s["label"]: s for s in bench.summarize_targets(rows)}
    cpp = t["C++ CPU conv2 forward vs tf.nn.conv2d"]
    assert cpp["best_impl"] == "cpp/cpu_v3_winograd" and cpp["met"] is False and cpp["value"] == 0.9
    numba = t["Numba CPU conv2 forward"]
    assert numba["met"] is None and numba["value"] is None and numba["why"] == "failed"


def test_make_table_maps_historical_names_through_the_aliases():
    import importlib.util
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_table", root / "benchmarks" / "make_table.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    result = {"rows": [{"backend": "numba", "device": "cpu", "variant": "cpu_gemm", "impl": "numba/cpu_gemm"},
                       {"backend": "numba", "device": "cuda", "variant": "v2_smem_tiled",
                        "impl": "numba/v2_smem_tiled"},
                       {"backend": "builtin", "device": "cpu", "variant": None, "impl": "tf"}],
              "targets": [{"best_impl": "numba/cpu_gemm", "why": "worst conv2 forward (numba/cpu_gemm)"}]}
    out = mt.current_names(result)
    assert [r["impl"] for r in out["rows"]] == ["numba/cpu_v2_regblock", "numba/cuda_v2_halotile", "tf"]
    assert out["targets"][0]["best_impl"] == "numba/cpu_v2_regblock"
    assert out["targets"][0]["why"] == "worst conv2 forward (numba/cpu_v2_regblock)"
    assert result["rows"][0]["impl"] == "numba/cpu_gemm"            # the input is not modified
