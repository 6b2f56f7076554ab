"""pytest-benchmark: every MNIST CNN layer shape × pass × backend/variant, and the built-in.

    pytest benchmarks/                          # all of it (several minutes on 2 cores)
    pytest benchmarks/ -k "conv2 and forward"   # one layer/pass
    pytest benchmarks/ --benchmark-json out.json

Groups are "<device> <layer> <pass>"; the built-in is TensorFlow's op (eager and
tf.function, both measured), our cases are ``<backend>[/<variant>]``.  Each case checks its
first output against dlconv.reference (the warm-up call) and only then is timed.
"""

import pytest

from dlconv import bench

from conftest import record


def _devices():
    out = [bench.HostPlace]
    if bench.real_gpu_present():
        out.append(bench.NumbaCudaPlace)
    return out


def _cases():
    cases = []
    for place_cls in _devices():
        device = place_cls.device
        impls = bench.our_impls(device, bench.TIMED_BACKENDS)
        for layer in bench.LAYERS:
            for pass_ in layer.passes:
                for mode in ("eager", "tf.function"):
                    cases.append(pytest.param(place_cls, layer.name, pass_, "builtin", mode,
                                              id=f"{device}-{layer.name}-{pass_}-tf-{mode}"))
                for name, variants, why in impls:
                    vlist = bench.variants_for(name, variants, layer, pass_, device == "cuda")
                    for v in vlist:
                        label = f"{name}/{v}" if v else name
                        marks = [pytest.mark.skip(reason=f"{name} unavailable: {why}")] if why else []
                        cases.append(pytest.param(place_cls, layer.name, pass_, name, v, marks=marks,
                                                  id=f"{device}-{layer.name}-{pass_}-{label}"))
    return cases


@pytest.mark.parametrize("place_cls,layer,pass_,backend,variant", _cases())
def test_kernel(benchmark, problems, request, place_cls, layer, pass_, backend, variant):
    problem = problems(layer, pass_)
    place = place_cls()
    if backend == "builtin":
        tf_builtin = request.getfixturevalue("tf_builtin")
        fn = dict((m[0], m[1]) for m in tf_builtin.modes(problem, place))[variant]
        impl = f"{tf_builtin.label} ({variant})"
    else:
        placed = {k: place.put(v) for k, v in problem.inputs.items()}
        fn = bench.our_call(problem, backend, variant, placed, place.stream())
        impl = f"{backend}/{variant}" if variant else backend

    out = fn()                                        # warm-up; its output is checked
    place.sync()
    err = bench.max_rel_error([bench.to_host(o) for o in bench.as_tuple(out)], problem.expected)
    assert err <= bench.TOLERANCE, f"{impl}: max relative error {err:.3g} > {bench.TOLERANCE:g}; not timed"

    def timed():
        fn()
        place.sync()

    t1 = place.time_block(fn, 1)
    iterations = int(min(bench.MAX_INNER, max(1, bench.MIN_SAMPLE_S // max(t1, 1e-9))))
    benchmark.group = f"{place.device} {layer} {pass_}"
    benchmark.extra_info.update(flops=problem.flops, max_rel_err=err, impl=impl)
    benchmark.pedantic(timed, rounds=7, iterations=iterations, warmup_rounds=1)
    if benchmark.stats is not None:                   # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["gflops"] = problem.flops / median / 1e9
        record(place.device, layer, pass_, impl, median, problem.flops, backend == "builtin")
