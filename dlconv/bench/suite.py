"""The kernel suite: for every (layer, pass) and place, the built-in's modes, dlconv's
backends and conv-forward variants, each checked against the reference on its first call
and the correct ones timed together, round-robin (:func:`run_kernels`)."""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from .builtins import BuiltinProvider
from .cases import TOLERANCE, Layer, Problem, as_tuple, make_problem, max_rel_error, to_host
from .report import progress_bar as _progress
from .targets import target_for
from .timing import Settings, measure, measure_interleaved


# ----------------------------------------------------------------------------- our ops
def our_call(problem: Problem, backend: str, variant: Optional[str], arrays: dict, stream=None):
    """A zero-argument callable running one of our ops on ``arrays`` (already placed)."""
    from .. import ops

    spec, g, act = problem.spec, problem.geometry, problem.layer.activation
    op = getattr(ops, spec.op)
    extra = {"backend": backend, "stream": stream}
    extra.update((k, v) for k, v in (("variant", variant), ("geometry", g)) if k in spec.op_extras)
    return lambda: spec.call(op, arrays, g, act, **extra)


def our_impls(device: str, backends: Sequence[str]):
    """→ list of (backend, variant or None, why-unusable or None) for the given device."""
    from .. import backends as registry

    out = []
    for name in backends:
        try:
            be = registry.get(name)
            ok, why = be.cuda_status() if device == "cuda" else be.cpu_status()
        except Exception as exc:  # a backend that does not import is reported, not fatal
            out.append((name, None, f"{type(exc).__name__}: {exc}"))
            continue
        if not ok:
            out.append((name, None, why))
            continue
        variants = list(be.conv_variants(on_device=(device == "cuda"))) or [None]
        out.append((name, variants, None))
    return out


def variants_for(name: str, variants, layer: "Layer", pass_: str, on_device: bool) -> list:
    """The conv-forward variants of backend ``name`` that can run ``layer`` (Winograd needs a
    3x3 stride-1 kernel, say); ``[None]`` (the backend's default) for every other case."""
    if not variants or layer.kind != "conv" or pass_ != "forward":
        return [None]
    from .. import backends as registry

    fits = set(registry.get(name).conv_variants(on_device, layer.geometry()))
    return [v for v in variants if v in fits] or [None]


def default_variant_for(name: str, vlist: Sequence, layer: "Layer", on_device: bool):
    """Which of ``vlist`` (:func:`variants_for`) is what a user gets from backend ``name`` with
    no variant asked for: the dispatch default of that geometry (None when ``vlist`` is
    ``[None]``, the backend's one path).  Targets are judged on this row only."""
    if list(vlist) == [None]:
        return None
    from .. import backends as registry

    be = registry.get(name)
    return be.default_variant(on_device, layer.geometry()) or vlist[0]


# ----------------------------------------------------------------------------- the suite
def _row(problem: Problem, device: str, impl: str, backend: str, variant, mode=None) -> dict:
    return {"layer": problem.layer.name, "layer_desc": problem.layer.describe(),
            "suite": problem.layer.suite,
            "pass": problem.pass_, "device": device, "batch": problem.batch,
            "impl": impl, "backend": backend, "variant": variant, "mode": mode,
            "is_builtin": backend == "builtin", "flops": problem.flops,
            "status": None, "why": None, "correct": None, "max_rel_err": None, "tol": TOLERANCE,
            "median_s": None, "samples_s": None, "inner": None, "gflops": None, "ratio": None,
            "target": None, "target_met": None,
            "bytes": problem.bytes, "intensity": problem.flops / problem.bytes}


def _check_case(row: dict, fn: Callable, problem: Problem, place,
                convert: Optional[Callable] = None, ours: bool = False,
                explain_failure: Optional[Callable] = None, tolerance: float = TOLERANCE) -> bool:
    """The first call (a warm-up) → correctness against the reference.  Updates ``row``;
    True when the case is correct and should be timed.

    ``convert`` (not timed) maps the output to NHWC/HWIO host arrays when a built-in
    works in another layout.  ``explain_failure(outputs)`` (user kernels) names the first
    wrong element of a failed case and the ``dlconv explain`` command for it.
    """
    try:
        out = fn()
        place.sync()
        if ours and place.device == "cuda" and any(isinstance(o, np.ndarray) for o in as_tuple(out)):
            raise TypeError("the op returned a host array for device inputs: it did not run its "
                            "CUDA kernels (are the inputs recognised as CUDA arrays?)")
        outs = [to_host(o) for o in as_tuple(out if convert is None else convert(out))]
        err = max_rel_error(outs, problem.expected)
    except Exception as exc:  # a kernel that raises is shown as an error row, the suite goes on
        row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300], correct=False)
        return False
    row["max_rel_err"] = err if math.isfinite(err) else None
    row["correct"] = bool(err <= tolerance)
    if not row["correct"]:
        row.update(status="failed",
                   why=f"max relative error {err:.3g} > tolerance {tolerance:g}; not timed")
        if explain_failure is not None:
            row["why"] = explain_failure(outs) or row["why"]
        return False
    if place.simulated and not getattr(place, "time_anyway", False):
        row.update(status="ok", why="CUDA simulator: checked, not timed")
        return False
    return True


def _time_group(cases: List[tuple], problem: Problem, place, settings: "Settings") -> None:
    """Time the checked cases [(row, fn)] of one layer/pass interleaved; fill their rows."""
    if not cases:
        return
    try:
        timings = measure_interleaved([fn for _, fn in cases], place, settings.repeats,
                                      settings.warmup, settings.min_sample_s)
    except Exception:  # a case raised after a correct first call: time each alone to find it
        timings = []
        for row, fn in cases:
            try:
                timings.append(measure(fn, place, settings.repeats, settings.warmup,
                                       settings.min_sample_s))
            except Exception as exc_one:  # this one raises: an error row
                row.update(status="error", why=f"{type(exc_one).__name__}: {exc_one}"[:300])
                timings.append(None)
    for (row, _), t in zip(cases, timings):
        if t is not None:
            row.update(status="ok", median_s=t.median_s, samples_s=t.samples_s, inner=t.inner,
                       gflops=problem.flops / t.median_s / 1e9)



def run_kernels(pairs, places, backends, builtin: Optional[BuiltinProvider], settings: Settings,
                progress: bool = True, on_row: Optional[Callable] = None,
                builtin_why: str = "", kernels: Optional[Sequence] = None) -> List[dict]:
    """Every (layer, pass) × place: the built-in's modes, our backends/variants and the user
    kernels of that pass (``kernels``: :class:`~.user_kernels.UserKernel`; default: the
    registered ones, :func:`~.user_kernels.register_kernel`).

    A user kernel is first checked on its pass's check geometries
    (:func:`~.user_kernels.check_kernel`, once per device); one that fails is shown failed,
    with the ``dlconv explain`` command reproducing it, on every row of its pass, untimed.

    Per layer/pass: each case's first call is checked against the reference; the correct
    ones are then timed together, round-robin (:func:`measure_interleaved`).  The
    built-in's time is its fastest mode's; each of our rows gets ``ratio = t_builtin / t``.
    """
    from . import user_kernels

    kernels = user_kernels.registered() if kernels is None else list(kernels)
    jobs = []
    for place in places:
        impls = our_impls(place.device, backends)
        for layer, p in pairs:
            jobs.append((place, layer, p, impls))
    bar = _progress(len(jobs), progress)
    rows: List[dict] = []
    t_start = time.perf_counter()
    for place, layer, p, impls in jobs:
        where = f"{layer.name} {p} ({place.device})"
        bar.set_description(f"{where}: reference")
        problem = make_problem(layer, p, layer.batch_for(settings.batch, settings.batch_fixed),
                               settings.seed)
        over_budget = settings.budget_s is not None and time.perf_counter() - t_start > settings.budget_s
        timed: List[tuple] = []

        # the built-in: each of its modes is checked, all are timed, the fastest counts
        brow = _row(problem, place.device, builtin.label if builtin else "built-in", "builtin", None)
        mode_rows = []
        if builtin is None:
            brow.update(status="skipped", why=builtin_why or "no built-in framework here")
        elif over_budget:
            brow.update(status="skipped", why="time budget spent")
        else:
            bar.set_description(f"{where}: built-in")
            try:
                modes = builtin.modes(problem, place)
            except Exception as exc:  # framework op missing on this device: shown, not fatal
                modes = []
                brow.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
            for m in modes:
                # a mode is (name, fn[, convert[, options]]); options "side": timed and
                # reported in side_modes, never the built-in's time (e.g. cuDNN with TF32),
                # "tolerance": its own correctness bound
                opts = m[3] if len(m) > 3 else {}
                mrow = dict(brow, mode=m[0], side=bool(opts.get("side")))
                if _check_case(mrow, m[1], problem, place, m[2] if len(m) > 2 else None,
                               tolerance=opts.get("tolerance", TOLERANCE)):
                    timed.append((mrow, m[1]))
                mode_rows.append(mrow)

        ours = []
        placed = None
        for name, variants, why in impls:
            vlist = variants_for(name, variants, layer, p, place.device == "cuda")
            default = default_variant_for(name, vlist, layer, place.device == "cuda") if why is None else None
            for v in vlist:
                label = f"{name}/{v}" if v else name
                row = _row(problem, place.device, label, name, v)
                row["default"] = v == default
                ours.append(row)
                if why is not None:
                    row.update(status="unavailable", why=why)
                    continue
                if over_budget:
                    row.update(status="skipped", why="time budget spent")
                    continue
                bar.set_description(f"{where}: {label}")
                if placed is None:
                    placed = {k: place.put(v_) for k, v_ in problem.inputs.items()}
                fn = our_call(problem, name, v, placed, place.stream())
                if _check_case(row, fn, problem, place, ours=True):
                    timed.append((row, fn))

        for k in kernels:
            if (k.spec.kind, k.spec.name) != (layer.kind, p):
                continue
            row = _row(problem, place.device, k.name, "user", None)
            ours.append(row)
            if over_budget:
                row.update(status="skipped", why="time budget spent")
                continue
            bar.set_description(f"{where}: checking {k.name}")
            res = k.checks.get(place.device)
            if res is None:
                res = k.checks[place.device] = user_kernels.check_kernel(k, place, settings.seed)
            row["checked_geometries"] = res.checked
            if not res.ok:
                row.update(status="failed", correct=False, why=user_kernels.failure_text(res),
                           explain=res.explain, element=res.element)
                continue
            if placed is None:
                placed = {n: place.put(a) for n, a in problem.inputs.items()}
            fn = (lambda k=k: k.spec.call(k.fn, placed, problem.geometry, layer.activation))

            def explain_failure(outs, k=k):
                bad = user_kernels.first_wrong(k.spec, problem.geometry, outs, problem.expected,
                                               layer.padding)
                return user_kernels.failure_text(bad) if bad else None
            if _check_case(row, fn, problem, place, explain_failure=explain_failure):
                timed.append((row, fn))

        bar.set_description(f"{where}: timing {len(timed)} cases interleaved")
        _time_group(timed, problem, place, settings)

        if mode_rows:
            main = [r for r in mode_rows if not r.get("side")]
            done = [r for r in main if r["median_s"] is not None]
            modes_s = {r["mode"]: r["median_s"] for r in main}
            side_s = {r["mode"]: r["median_s"] for r in mode_rows if r.get("side")}
            if done:
                best = min(done, key=lambda r: r["median_s"])
                brow = dict(best, modes=modes_s, impl=f"{builtin.label} ({best['mode']})", ratio=1.0)
            else:
                brow = dict(main[0] if main else mode_rows[0], modes=modes_s)
            brow.pop("side", None)
            if side_s:
                brow["side_modes"] = side_s
        t_builtin = brow["median_s"]
        for row in ours:
            if row["median_s"] and t_builtin:
                row["ratio"] = t_builtin / row["median_s"]
            t = target_for(row) if row.get("default", True) else None   # non-default: no target
            if t is not None:
                row["target"] = t.min_ratio
                row["target_met"] = None if row["ratio"] is None else bool(row["ratio"] >= t.min_ratio)
        rows.extend([brow] + ours)
        bar.update(1)
        if on_row is not None:
            on_row(rows)
    bar.close()
    return rows
