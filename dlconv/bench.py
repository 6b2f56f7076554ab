"""Benchmark the kernels against the framework's built-in ops: ``dlconv bench``.

What is measured
----------------
Every layer shape of the workshop's MNIST CNN at batch 128 (:data:`LAYERS`), every pass
(forward, backward-data, backward-filter for a convolution; forward and backward for a
dense layer, whose backward is one op here: dx, dw and db together), every usable backend
and conv-forward kernel variant, next to the built-in op measured in the same process:

* CPU: TensorFlow (oneDNN): ``tf.nn.conv2d`` + bias + activation, its gradients
  ``tf.raw_ops.Conv2DBackpropInput`` / ``Conv2DBackpropFilter`` (+ ``BiasAddGrad``),
  ``matmul`` + bias + activation and the same ops TensorFlow's registered gradients use;
  each tried eagerly and inside ``tf.function``, and the faster counts.
* CUDA (only when a real GPU is present, never the simulator): the same ops on
  TensorFlow's GPU (cuDNN, cuBLAS) when TensorFlow sees one.  ``benchmarks/gpu_bench.py``
  is the GPU check for machines without TensorFlow (torch's cuDNN/cuBLAS).

Plus the end-to-end MNIST CNN training step, dlconv layers vs stock Keras layers.

Honesty rules the harness enforces
----------------------------------
* The first call of every case is a warm-up (JIT compilation, tracing, caches) and its
  output is the one checked against :mod:`dlconv.reference`; further warm-up calls follow,
  then ``repeats`` timed samples.  A sample is ``inner`` back-to-back calls divided by
  ``inner``, with ``inner`` chosen so that one sample lasts at least ``min_sample_s``
  (timer resolution).  The reported time is the median of the samples.  The samples of
  all contenders for one layer/pass (the built-in's modes and ours) are taken round-robin,
  so a load burst on a shared machine hits them alike.
* Correctness: each output (ours and the built-in's) is compared with the NumPy reference
  on the *same inputs at the full batch*; the reference runs once per layer and pass and
  is reused.  A case whose error exceeds :data:`TOLERANCE` is shown as failed and is not
  timed.  The reference backend itself is never timed (it is the oracle).
* Ratio: ``t_builtin / t_ours`` (= throughput ours / throughput built-in; > 1 means we
  are faster).  The train step reports ``t_ours / t_stock`` (≤ 1 means we are faster).
* Every figure in a table comes from this run; :data:`TARGETS` are the only typed-in
  numbers, and they are goals, not results.

Importing this module imports neither TensorFlow nor Numba (``benchmarks/gpu_bench.py``
reuses it on machines without TensorFlow).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import shapes
from .bench_keras import BRIDGE_COST_TARGET

SCHEMA = "dlconv-bench/1"

#: Largest accepted error, max|out - ref| / max|ref| per output array.  An indexing bug
#: gives errors of order 1; float32 accumulation over the longest reduction here
#: (73 728 terms in conv2's backward-filter) stays well below 1e-4.  1e-3 separates the two.
TOLERANCE = 1e-3

#: Seconds one timing sample should last at least (many calls of a short op per sample,
#: so that timer resolution and call jitter do not dominate).
MIN_SAMPLE_S = 0.05
#: Upper bound on calls per sample.
MAX_INNER = 1000

BATCH = 128
CONV_PASSES = ("forward", "backward-data", "backward-filter")
DENSE_PASSES = ("forward", "backward")
ALL_PASSES = ("forward", "backward-data", "backward-filter", "backward")
#: Backends that are timed; "reference" is the oracle and is never timed.
TIMED_BACKENDS = ("cpp", "numba")


# ----------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer shape of the benchmark.  ``sample_shape`` excludes the batch."""

    name: str
    kind: str                 # "conv" | "dense"
    sample_shape: tuple
    w_shape: tuple
    activation: str
    padding: str = "valid"

    def geometry(self, batch: int):
        if self.kind == "conv":
            return shapes.conv_geometry((batch, *self.sample_shape), self.w_shape,
                                        padding=self.padding)
        return shapes.dense_geometry((batch, *self.sample_shape), self.w_shape)

    @property
    def passes(self):
        return CONV_PASSES if self.kind == "conv" else DENSE_PASSES

    def describe(self) -> str:
        if self.kind == "conv":
            h, w, c = self.sample_shape
            kh, kw, _, f = self.w_shape
            return f"{h}×{w}×{c} → {f}, {kh}×{kw} {self.padding}, {self.activation}"
        return f"{self.w_shape[0]} → {self.w_shape[1]}, {self.activation}"

    def flops(self, pass_: str, batch: int) -> int:
        """Multiply-adds × 2 of one pass; a dense backward is dx and dw: twice the forward."""
        g = self.geometry(batch)
        if self.kind == "dense" and pass_ == "backward":
            return 2 * g.flops
        return g.flops


#: The workshop's MNIST CNN (Keras' mnist_cnn example): conv1, conv2, dense1, dense2.
LAYERS = (
    Layer("conv1", "conv", (28, 28, 1), (3, 3, 1, 32), "relu"),
    Layer("conv2", "conv", (26, 26, 32), (3, 3, 32, 64), "relu"),
    Layer("dense1", "dense", (9216,), (9216, 128), "relu"),
    Layer("dense2", "dense", (128,), (128, 10), "softmax"),
)
LAYER_BY_NAME = {layer.name: layer for layer in LAYERS}


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for the best correct variant of ``backend`` on one layer/pass/device."""

    device: str               # "cpu" | "cuda"
    layer: str
    pass_: str
    backend: str
    min_ratio: float
    label: str

    def matches(self, row: dict) -> bool:
        return (row["device"] == self.device and row["layer"] == self.layer
                and row["pass"] == self.pass_ and row["backend"] == self.backend)


TARGETS = (
    Target("cpu", "conv2", "forward", "cpp", 1.3, "C++ CPU conv2 forward vs tf.nn.conv2d"),
    Target("cpu", "conv2", "backward-data", "cpp", 1.0, "C++ CPU conv2 backward-data"),
    Target("cpu", "conv2", "backward-filter", "cpp", 1.0, "C++ CPU conv2 backward-filter"),
    Target("cpu", "dense1", "forward", "cpp", 1.0, "C++ CPU dense 9216→128 + bias + relu"),
    Target("cpu", "conv2", "forward", "numba", 0.5, "Numba CPU conv2 forward"),
    Target("cuda", "conv2", "forward", "cpp", 0.7, "best CUDA C++ conv vs cuDNN"),
    Target("cuda", "conv2", "forward", "numba", 0.5, "best Numba CUDA conv vs cuDNN"),
    Target("cuda", "dense1", "forward", "cpp", 0.8, "CUDA C++ dense vs cuBLAS"),
    Target("cuda", "dense1", "forward", "numba", 0.5, "Numba CUDA dense vs cuBLAS"),
)
#: Train step: dlconv(backend) time / stock Keras time must be at most this.
TRAIN_TARGETS = {"cpp": 1.0}


def target_for(row: dict) -> Optional[Target]:
    for t in TARGETS:
        if t.matches(row):
            return t
    return None


# ----------------------------------------------------------------------------- problems
@dataclasses.dataclass
class Problem:
    """Inputs of one layer/pass on the host, and the reference outputs for them."""

    layer: Layer
    pass_: str
    batch: int
    geometry: object
    inputs: Dict[str, np.ndarray]
    expected: tuple
    reference_s: float

    @property
    def flops(self) -> int:
        return self.layer.flops(self.pass_, self.batch)


def make_problem(layer: Layer, pass_: str, batch: int = BATCH, seed: int = 0) -> Problem:
    """Random inputs (fixed seed) and the reference outputs, computed once."""
    from . import reference as ref

    rng = np.random.default_rng(seed + 1000 * LAYERS.index(layer) if layer in LAYERS else seed)
    g = layer.geometry(batch)
    fan_in = int(np.prod(layer.w_shape[:-1]))
    x = rng.random(g.x_shape, dtype=np.float32)                       # like MNIST pixels / relu outputs
    w = (rng.standard_normal(layer.w_shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    b = (0.1 * rng.standard_normal(layer.w_shape[-1])).astype(np.float32)
    dy = rng.standard_normal(g.y_shape).astype(np.float32)
    t0 = time.perf_counter()
    if layer.kind == "conv":
        if pass_ == "forward":
            inputs = {"x": x, "w": w, "b": b}
            expected = (ref.conv2d_forward(x, w, b, g, layer.activation),)
        elif pass_ == "backward-data":
            inputs = {"dy": dy, "w": w}
            expected = (ref.conv2d_backward_data(dy, w, g),)
        elif pass_ == "backward-filter":
            inputs = {"x": x, "dy": dy}
            expected = tuple(ref.conv2d_backward_filter(x, dy, g))
        else:
            raise ValueError(f"pass must be one of {CONV_PASSES} for {layer.name}, got {pass_!r}")
    else:
        if pass_ == "forward":
            inputs = {"x": x, "w": w, "b": b}
            expected = (ref.dense_forward(x, w, b, layer.activation),)
        elif pass_ == "backward":
            y = ref.dense_forward(x, w, b, layer.activation)
            inputs = {"x": x, "w": w, "dy": dy, "y": y}
            expected = tuple(ref.dense_backward(x, w, dy, y, layer.activation))
        else:
            raise ValueError(f"pass must be one of {DENSE_PASSES} for {layer.name}, got {pass_!r}")
    return Problem(layer, pass_, batch, g, inputs, expected, time.perf_counter() - t0)


def max_rel_error(outputs: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """max over output arrays of max|out - ref| / max|ref|; inf on a shape mismatch or NaN."""
    if len(outputs) != len(expected):
        return math.inf
    worst = 0.0
    for o, r in zip(outputs, expected):
        o = np.asarray(o, np.float64)
        r = np.asarray(r, np.float64)
        if o.shape != r.shape or not np.all(np.isfinite(o)):
            return math.inf
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-30)
        worst = max(worst, float(np.max(np.abs(o - r))) / scale if r.size else 0.0)
    return worst


def to_host(a) -> np.ndarray:
    """Any array this harness meets (NumPy, Numba device, torch, TensorFlow) → NumPy."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):                       # Numba device array
        return a.copy_to_host()
    if hasattr(a, "detach") and hasattr(a, "cpu"):        # torch tensor
        return a.detach().cpu().numpy()
    if hasattr(a, "numpy"):                               # TensorFlow tensor
        return a.numpy()
    return np.asarray(a)


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ----------------------------------------------------------------------------- places
class HostPlace:
    """Arrays in host memory, timed with ``time.perf_counter``."""

    device = "cpu"
    simulated = False

    def put(self, a: np.ndarray):
        return a

    def stream(self):
        return None

    def sync(self):
        pass

    def time_block(self, fn: Callable, inner: int) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


class NumbaCudaPlace(HostPlace):
    """Arrays in CUDA memory (Numba device arrays), timed with CUDA events on one stream.

    Under the simulator (``simulated``) the events are replaced by the host clock; such
    timings are never reported as GPU figures.
    """

    device = "cuda"

    def __init__(self):
        from numba import cuda
        self._cuda = cuda
        self.simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        self._stream = cuda.stream()

    def put(self, a: np.ndarray):
        return self._cuda.to_device(a, stream=self._stream)

    def stream(self):
        return self._stream

    def sync(self):
        self._stream.synchronize()

    def time_block(self, fn, inner):
        if self.simulated:
            self.sync()
            t = HostPlace.time_block(self, fn, inner)
            self.sync()
            return t
        start, end = self._cuda.event(), self._cuda.event()
        self.sync()
        start.record(self._stream)
        for _ in range(inner):
            fn()
        end.record(self._stream)
        end.synchronize()
        return self._cuda.event_elapsed_time(start, end) / 1000.0 / inner


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    median_s: float
    samples_s: List[float]
    inner: int
    warmup: int


def calibrate(fn: Callable, place, warmup: int, min_sample_s: float = MIN_SAMPLE_S) -> int:
    """``warmup`` discarded calls, then one timed call → ``inner``, the calls per sample."""
    for _ in range(max(warmup, 0)):
        fn()
    place.sync()
    t1 = place.time_block(fn, 1)
    return int(min(MAX_INNER, max(1, math.ceil(min_sample_s / max(t1, 1e-9)))))


def measure_interleaved(fns: Sequence[Callable], place, repeats: int, warmup: int,
                        min_sample_s: float = MIN_SAMPLE_S) -> List[Timing]:
    """Time several callables round-robin: sample 1 of each, then sample 2 of each, ...

    On a shared or noisy machine a load burst then hits every contender alike, so the
    ratios stay fair.  The caller has already made each first call (the checked warm-up).
    """
    inners = [calibrate(fn, place, warmup, min_sample_s) for fn in fns]
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            samples[i].append(place.time_block(fn, inners[i]))
    return [Timing(statistics.median(s), s, n, max(warmup, 0) + 1) for s, n in zip(samples, inners)]


def measure(fn: Callable, place, repeats: int, warmup: int,
            min_sample_s: float = MIN_SAMPLE_S) -> Timing:
    """Median seconds per call of ``fn`` (see :func:`measure_interleaved`)."""
    return measure_interleaved([fn], place, repeats, warmup, min_sample_s)[0]


# ----------------------------------------------------------------------------- our ops
def our_call(problem: Problem, backend: str, variant: Optional[str], arrays: dict, stream=None):
    """A zero-argument callable running one of our ops on ``arrays`` (already placed)."""
    from . import ops

    layer, g, a = problem.layer, problem.geometry, arrays
    act = layer.activation
    if layer.kind == "conv":
        if problem.pass_ == "forward":
            return lambda: ops.conv2d(a["x"], a["w"], a["b"], activation=act, backend=backend,
                                      variant=variant, stream=stream, geometry=g)
        if problem.pass_ == "backward-data":
            return lambda: ops.conv2d_backward_data(a["dy"], a["w"], g.x_shape, backend=backend,
                                                    stream=stream, geometry=g)
        return lambda: ops.conv2d_backward_filter(a["x"], a["dy"], g.w_shape, backend=backend,
                                                  stream=stream, geometry=g)
    if problem.pass_ == "forward":
        return lambda: ops.dense(a["x"], a["w"], a["b"], activation=act, backend=backend,
                                 stream=stream)
    return lambda: ops.dense_backward(a["x"], a["w"], a["dy"], a["y"], activation=act,
                                      backend=backend, stream=stream)


def our_impls(device: str, backends: Sequence[str]):
    """→ list of (backend, variant or None, why-unusable or None) for the given device."""
    from . import backends as registry

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
    from . import backends as registry

    fits = set(registry.get(name).conv_variants(on_device, layer.geometry(BATCH)))
    return [v for v in variants if v in fits] or [None]


# ----------------------------------------------------------------------------- built-ins
class BuiltinProvider:
    """Interface: the framework's own op for a problem.  ``label`` names the framework."""

    label = "built-in"

    def modes(self, problem: Problem, place) -> List[tuple]:
        """→ [(mode name, zero-argument callable returning the output(s)[, convert]), ...];
        ``convert`` (optional, not timed) maps the output to dlconv's layouts for the check."""
        raise NotImplementedError  # abstract: TensorFlowBuiltin, torch and reference override


class ReferenceBuiltin(BuiltinProvider):
    """The NumPy reference as a stand-in built-in (dry runs on machines with no framework)."""

    label = "reference (NumPy stand-in)"

    def modes(self, problem, place):
        from . import reference as ref

        p, g, a = problem, problem.geometry, problem.inputs
        act = p.layer.activation
        if p.layer.kind == "conv":
            fn = {"forward": lambda: ref.conv2d_forward(a["x"], a["w"], a["b"], g, act),
                  "backward-data": lambda: ref.conv2d_backward_data(a["dy"], a["w"], g),
                  "backward-filter": lambda: ref.conv2d_backward_filter(a["x"], a["dy"], g)}
        else:
            fn = {"forward": lambda: ref.dense_forward(a["x"], a["w"], a["b"], act),
                  "backward": lambda: ref.dense_backward(a["x"], a["w"], a["dy"], a["y"], act)}
        return [("numpy", fn[p.pass_])]


class TensorFlowBuiltin(BuiltinProvider):
    """TensorFlow's ops (oneDNN on the CPU, cuDNN/cuBLAS on a GPU), eager and tf.function."""

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        self.tf = tf
        self.label = f"tensorflow {tf.__version__}"

    def gpu_available(self) -> bool:
        return bool(self.tf.config.list_physical_devices("GPU"))

    def _fn(self, problem):
        tf = self.tf
        p, g = problem, problem.geometry
        act = p.layer.activation
        activate = {"relu": tf.nn.relu, "softmax": tf.nn.softmax, "linear": tf.identity,
                    "sigmoid": tf.sigmoid, "tanh": tf.tanh}[act]
        if p.layer.kind == "conv":
            pads = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right)
            kw = dict(strides=[1, g.stride_h, g.stride_w, 1], dilations=[1, g.dil_h, g.dil_w, 1])
            if any(pads):
                kw.update(padding="EXPLICIT", explicit_paddings=[0, 0, *pads, 0, 0])
            else:
                kw.update(padding="VALID")
            if p.pass_ == "forward":
                return lambda x, w, b: activate(tf.nn.bias_add(tf.raw_ops.Conv2D(
                    input=x, filter=w, **kw), b))
            if p.pass_ == "backward-data":
                sizes = tf.constant(g.x_shape, tf.int32)
                return lambda dy, w: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=sizes, filter=w, out_backprop=dy, **kw)
            fsizes = tf.constant(g.w_shape, tf.int32)
            return lambda x, dy: (tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=fsizes, out_backprop=dy, **kw), tf.raw_ops.BiasAddGrad(out_backprop=dy))
        if p.pass_ == "forward":
            return lambda x, w, b: activate(tf.nn.bias_add(tf.matmul(x, w), b))

        def backward(x, w, dy, y):
            # The ops TensorFlow's registered gradients of relu/softmax, MatMul and BiasAdd run.
            if act == "relu":
                dz = tf.raw_ops.ReluGrad(gradients=dy, features=y)
            elif act == "softmax":
                dz = (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True)) * y
            elif act == "linear":
                dz = dy
            elif act == "sigmoid":
                dz = tf.raw_ops.SigmoidGrad(y=y, dy=dy)
            else:
                dz = tf.raw_ops.TanhGrad(y=y, dy=dy)
            return (tf.matmul(dz, w, transpose_b=True), tf.matmul(x, dz, transpose_a=True),
                    tf.raw_ops.BiasAddGrad(out_backprop=dz))
        return backward

    def modes(self, problem, place):
        tf = self.tf
        dev = "/GPU:0" if place.device == "cuda" else "/CPU:0"
        names = {"forward": ("x", "w", "b"), "backward-data": ("dy", "w"),
                 "backward-filter": ("x", "dy"), "backward": ("x", "w", "dy", "y")}[problem.pass_]
        with tf.device(dev):
            args = [tf.constant(problem.inputs[n]) for n in names]
            eager = self._fn(problem)
            graph = tf.function(self._fn(problem), jit_compile=False)
        sync = (lambda: tf.test.experimental.sync_devices()) if place.device == "cuda" else (lambda: None)

        def run(f):
            def call():
                with tf.device(dev):
                    out = f(*args)
                sync()
                return out
            return call
        return [("eager", run(eager)), ("tf.function", run(graph))]


# ----------------------------------------------------------------------------- the suite
def _row(problem: Problem, device: str, impl: str, backend: str, variant, mode=None) -> dict:
    return {"layer": problem.layer.name, "layer_desc": problem.layer.describe(),
            "pass": problem.pass_, "device": device, "batch": problem.batch,
            "impl": impl, "backend": backend, "variant": variant, "mode": mode,
            "is_builtin": backend == "builtin", "flops": problem.flops,
            "status": None, "why": None, "correct": None, "max_rel_err": None, "tol": TOLERANCE,
            "median_s": None, "samples_s": None, "inner": None, "gflops": None, "ratio": None,
            "target": None, "target_met": None}


def _check_case(row: dict, fn: Callable, problem: Problem, place,
                convert: Optional[Callable] = None, ours: bool = False) -> bool:
    """The first call (a warm-up) → correctness against the reference.  Updates ``row``;
    True when the case is correct and should be timed.

    ``convert`` (not timed) maps the output to NHWC/HWIO host arrays when a built-in
    works in another layout.
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
    row["correct"] = bool(err <= TOLERANCE)
    if not row["correct"]:
        row.update(status="failed",
                   why=f"max relative error {err:.3g} > tolerance {TOLERANCE:g}; not timed")
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


@dataclasses.dataclass
class Settings:
    batch: int = BATCH
    repeats: int = 7
    warmup: int = 2
    min_sample_s: float = MIN_SAMPLE_S
    train_repeats: int = 21
    seed: int = 0
    budget_s: Optional[float] = None       # stop timing new cases after this many seconds


def plan(layers: Sequence[Layer], passes: Sequence[str]) -> List[tuple]:
    """(layer, pass) pairs selected, in table order."""
    out = []
    for layer in layers:
        for p in layer.passes:
            if p in passes:
                out.append((layer, p))
    return out


def run_kernels(pairs, places, backends, builtin: Optional[BuiltinProvider], settings: Settings,
                progress: bool = True, on_row: Optional[Callable] = None,
                builtin_why: str = "") -> List[dict]:
    """Every (layer, pass) × place: the built-in's modes and our backends/variants.

    Per layer/pass: each case's first call is checked against the reference; the correct
    ones are then timed together, round-robin (:func:`measure_interleaved`).  The
    built-in's time is its fastest mode's; each of our rows gets ``ratio = t_builtin / t``.
    """
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
        problem = make_problem(layer, p, settings.batch, settings.seed)
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
                mrow = dict(brow, mode=m[0])
                if _check_case(mrow, m[1], problem, place, m[2] if len(m) > 2 else None):
                    timed.append((mrow, m[1]))
                mode_rows.append(mrow)

        ours = []
        placed = None
        for name, variants, why in impls:
            vlist = variants_for(name, variants, layer, p, place.device == "cuda")
            for v in vlist:
                label = f"{name}/{v}" if v else name
                row = _row(problem, place.device, label, name, v)
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

        bar.set_description(f"{where}: timing {len(timed)} cases interleaved")
        _time_group(timed, problem, place, settings)

        if mode_rows:
            done = [r for r in mode_rows if r["median_s"] is not None]
            modes_s = {r["mode"]: r["median_s"] for r in mode_rows}
            if done:
                best = min(done, key=lambda r: r["median_s"])
                brow = dict(best, modes=modes_s, impl=f"{builtin.label} ({best['mode']})", ratio=1.0)
            else:
                brow = dict(mode_rows[0], modes=modes_s)
        t_builtin = brow["median_s"]
        for row in ours:
            if row["median_s"] and t_builtin:
                row["ratio"] = t_builtin / row["median_s"]
            t = target_for(row)
            if t is not None:
                row["target"] = t.min_ratio
                row["target_met"] = None if row["ratio"] is None else bool(row["ratio"] >= t.min_ratio)
        rows.extend([brow] + ours)
        bar.update(1)
        if on_row is not None:
            on_row(rows)
    bar.close()
    return rows


def summarize_targets(rows: Sequence[dict], train_rows: Sequence[dict] = ()) -> List[dict]:
    """One line per target: the best correct variant's ratio, met or not (or not measured)."""
    out = []
    for t in TARGETS:
        cands = [r for r in rows if t.matches(r)]
        if not cands:
            continue
        timed = [r for r in cands if r["ratio"] is not None]
        best = max(timed, key=lambda r: r["ratio"]) if timed else None
        out.append({"label": t.label, "device": t.device, "layer": t.layer, "pass": t.pass_,
                    "backend": t.backend, "target": f"≥ {t.min_ratio:g}×",
                    "best_impl": best["impl"] if best else None,
                    "value": best["ratio"] if best else None,
                    "met": bool(best and best["ratio"] >= t.min_ratio) if best else None,
                    "why": None if best else "; ".join(sorted({str(r["why"]) for r in cands}))})
    for r in train_rows:
        if r.get("target") is None:
            continue
        out.append({"label": r.get("label") or
                             f"MNIST CNN train step dlconv({r['backend']}) vs stock Keras (time ratio)",
                    "device": r.get("device", "cpu"), "layer": "mnist_cnn", "pass": "train-step",
                    "backend": r["backend"], "target": f"≤ {r['target']:g}× time",
                    "best_impl": r["impl"], "value": r.get("time_ratio"), "met": r.get("target_met"),
                    "why": r.get("why") if r.get("time_ratio") is None else None})
    for r in train_rows:
        if r.get("keras_backend") in (None, "tensorflow") or r.get("backend") != "cpp":
            continue
        value = r.get("vs_tensorflow")
        out.append({"label": f"dlconv(cpp) train step on Keras {r['keras_backend']} vs on TensorFlow "
                             f"(what the bridge costs)",
                    "device": "cpu", "layer": "mnist_cnn", "pass": "train-step", "backend": "cpp",
                    "target": f"≤ {BRIDGE_COST_TARGET:g}×", "best_impl": r["impl"], "value": value,
                    "met": None if value is None else bool(value <= BRIDGE_COST_TARGET),
                    "why": r.get("why") if value is None else None})
    return out


# ----------------------------------------------------------------------------- train step
def mnist_cnn_builder():
    """``dlconv.models``' MNIST CNN builder, ``f(backend=..., stock=..., seed=...)``
    (named ``cnn`` there; ``mnist_cnn`` accepted too).  Imports Keras and TensorFlow."""
    import importlib
    models = importlib.import_module("dlconv.models")
    builder = getattr(models, "mnist_cnn", None) or getattr(models, "cnn", None)
    if builder is None:
        raise ImportError("dlconv.models has no MNIST CNN builder (cnn / mnist_cnn)")
    return builder


#: Steps per stock compile mode (tf.function, XLA) in the probe that picks the faster one.
TRAIN_PROBE_STEPS = 5


def run_train_step(backends: Sequence[str], settings: Settings, progress: bool = True) -> List[dict]:
    """MNIST CNN, one optimizer step at ``settings.batch``: dlconv layers vs stock Keras.

    Adam and sparse categorical cross-entropy (the workshop's settings).  Both models get
    the same weights.  Correctness: loss and gradients of one batch (in
    inference mode, so dropout does not differ) agree with the stock model's within
    :data:`TOLERANCE`.  Timing: ``model.train_on_batch`` (dropout on, the real step), every
    model sampled in turn, one step each per round (:attr:`Settings.train_repeats` rounds).
    The stock model is compiled with and without XLA; a short interleaved probe
    (:data:`TRAIN_PROBE_STEPS` steps each) picks the faster mode, and only that one joins the
    round-robin with ours (the probe medians are kept in ``modes``): a mode several times
    slower would otherwise leave its threads and caches behind for whichever step follows it.
    """
    rows = []
    base = {"layer": "mnist_cnn", "pass": "train-step", "device": "cpu", "batch": settings.batch,
            "status": None, "why": None, "median_s": None, "stock_median_s": None,
            "time_ratio": None, "correct": None, "max_rel_err": None, "target": None,
            "target_met": None}
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf
        build_cnn = mnist_cnn_builder()
    except Exception as exc:  # models not written yet, or no TensorFlow: the row says why
        for b in backends:
            rows.append(dict(base, impl=f"dlconv({b})", backend=b, status="skipped",
                             why=f"dlconv.models' MNIST CNN unavailable: {type(exc).__name__}: {exc}"[:300],
                             target=TRAIN_TARGETS.get(b)))
        return rows

    rng = np.random.default_rng(settings.seed)
    x = rng.random((settings.batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, settings.batch).astype(np.int32)
    bar = _progress(1 + len(backends), progress)

    def compiled(model, jit):
        # the workshop's settings (dlconv.models.compile_model), plus the XLA switch
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=jit)
        return model

    def loss_and_grads(model):
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = tape.gradient(loss, model.trainable_variables)
        return [np.asarray(loss)] + [np.asarray(g) for g in grads]

    def warm(model):
        model.train_on_batch(x, y)                       # traces the train function
        for _ in range(settings.warmup):
            model.train_on_batch(x, y)
        return model

    def time_round_robin(models, rounds=settings.train_repeats):
        """Median step time of each model, sampled in turn (one step of each per round), so
        load that comes and goes on a shared machine hits every contender alike.  The order
        rotates every round: a step pays for what the step before it left behind (the XLA
        model's threads and caches, say), so every contender follows every other equally often."""
        samples = {k: [] for k in models}
        names = list(models)
        for r in range(rounds):
            for j in range(len(names)):
                k = names[(r + j) % len(names)]
                t0 = time.perf_counter()
                models[k].train_on_batch(x, y)
                samples[k].append(time.perf_counter() - t0)
        return {k: (statistics.median(v), v) for k, v in samples.items()}

    bar.set_description("train step: stock Keras")
    contenders = {}
    stock_error = None
    for jit in (False, True):
        try:
            contenders["xla" if jit else "tf.function"] = warm(
                compiled(build_cnn(stock=True, seed=settings.seed), jit))
        except Exception as exc:  # XLA may be unavailable: the other mode still counts
            stock_error = f"{type(exc).__name__}: {exc}"[:300]
    bar.update(1)
    if not contenders:
        for b in backends:
            rows.append(dict(base, impl=f"dlconv({b})", backend=b, status="error",
                             why=f"stock model failed: {stock_error}", target=TRAIN_TARGETS.get(b)))
        bar.close()
        return rows
    stock_mode_names = list(contenders)
    stock = build_cnn(stock=True, seed=settings.seed)
    expected = loss_and_grads(stock)

    ours_rows = {}
    for b in backends:
        bar.set_description(f"train step: dlconv({b})")
        row = dict(base, impl=f"dlconv({b})", backend=b, target=TRAIN_TARGETS.get(b))
        try:
            ours = build_cnn(backend=b, stock=False, seed=settings.seed)
            ours.set_weights(stock.get_weights())
            err = max_rel_error(loss_and_grads(ours), expected)
            row["max_rel_err"] = err if math.isfinite(err) else None
            row["correct"] = bool(err <= TOLERANCE)
            if not row["correct"]:
                row.update(status="failed", why=f"loss/gradients differ from stock Keras: max "
                                                f"relative error {err:.3g}; not timed")
            else:
                contenders[f"dlconv({b})"] = warm(compiled(ours, False))
        except Exception as exc:  # the row shows the failure; other backends still run
            row.update(status="error", why=f"{type(exc).__name__}: {exc}"[:300])
        ours_rows[b] = row
        bar.update(1)

    bar.set_description("train step: probing the stock model's compile modes")
    probe = time_round_robin({m: contenders[m] for m in stock_mode_names}, TRAIN_PROBE_STEPS)
    stock_mode = min(stock_mode_names, key=lambda m: probe[m][0])
    for m in stock_mode_names:
        if m != stock_mode:
            del contenders[m]
    bar.set_description(f"train step: timing {len(contenders)} models interleaved")
    timed = time_round_robin(contenders)
    t_stock = timed[stock_mode][0]
    rows.append(dict(base, impl=f"stock keras {keras.__version__} ({stock_mode})", backend="builtin",
                     status="ok", median_s=t_stock, stock_median_s=t_stock, time_ratio=1.0,
                     correct=True, modes={m: v[0] for m, v in probe.items()}))
    for b, row in ours_rows.items():
        row["stock_median_s"] = t_stock
        if f"dlconv({b})" in timed:
            t, samples = timed[f"dlconv({b})"]
            row.update(status="ok", median_s=t, samples_s=samples, time_ratio=t / t_stock)
        if row["target"] is not None:
            row["target_met"] = (None if row["time_ratio"] is None
                                 else bool(row["time_ratio"] <= row["target"]))
        rows.append(row)
    bar.close()
    return rows


# ----------------------------------------------------------------------------- machine
def machine_slug(info: dict, device: str = "cpu") -> str:
    """A short file-name-safe machine tag such as ``cpu-xeon-2core`` or ``gpu-h200``."""
    if device == "cuda":
        gpu = (info.get("gpu_names") or ["gpu"])[0]
        words = [w for w in re.split(r"[^a-z0-9]+", gpu.lower())
                 if w and w not in ("nvidia", "geforce", "tesla", "sxm", "pcie")]
        return "gpu-" + ("-".join(words[:2]) or "unknown")
    brand = info.get("cpu_brand") or "cpu"
    brand = re.sub(r"\((r|tm)\)", " ", brand.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", brand)
             if w and w not in ("intel", "amd", "processor", "cpu", "core", "with", "radeon", "graphics")
             and not re.fullmatch(r"\d+(\.\d+)?ghz", w)]
    return f"cpu-{'-'.join(words[:2]) or 'unknown'}-{info.get('cores', '?')}core"


def describe_machine() -> dict:
    """CPU model and cores, GPUs, library versions: :func:`dlconv.info.info` plus py-cpuinfo."""
    import importlib
    _info = importlib.import_module("dlconv.info")   # not `from . import info`: dlconv.info is also a function

    d = {}
    try:
        d["info"] = _info.info()
    except Exception as exc:  # a broken optional piece never stops the benchmark
        d["info"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        import cpuinfo
        ci = cpuinfo.get_cpu_info()
        d["cpu_brand"] = ci.get("brand_raw", "?")
        d["cpu_flags_simd"] = [f for f in ("avx2", "fma", "avx512f") if f in ci.get("flags", [])]
    except Exception:  # py-cpuinfo missing: fall back to platform
        import platform
        d["cpu_brand"] = platform.processor() or platform.machine()
    d["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    nc = d["info"].get("numba_cuda", {}) if isinstance(d["info"], dict) else {}
    if nc.get("available") and not nc.get("simulator"):
        gpus = [g.split(": ", 1)[-1] for g in nc.get("gpus", [])]
    d["gpu_names"] = gpus
    d["gpu"] = ", ".join(gpus) if gpus else "none"
    d["versions"] = d["info"].get("versions", {}) if isinstance(d["info"], dict) else {}
    d["description"] = (f"{d['cpu_brand']}, {d['cores']} cores; GPU: {d['gpu']}; "
                        + ", ".join(f"{k} {v}" for k, v in d["versions"].items()))
    return d


def real_gpu_present() -> bool:
    """True only for a real CUDA GPU seen by Numba (never the simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no numba.cuda, no driver: no GPU
        return False


# ----------------------------------------------------------------------------- output
def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _met(met) -> str:
    return "(not measured)" if met is None else ("met ✓" if met else "not met ✗")


def _mark(ok) -> str:
    return "—" if ok is None else ("✓" if ok else "✗")


def table_rows(result: dict) -> List[List[str]]:
    """Rows of the main table: layer, pass, device, impl, median, GFLOP/s, ratio, correct, target."""
    out = []
    for r in result["rows"]:
        status = r["status"]
        med = _fmt_time(r["median_s"]) if status == "ok" else status
        target = "" if r.get("target") is None else f"≥ {r['target']:g}× {_met(r['target_met'])}"
        note = "" if status == "ok" and not r.get("why") else (r.get("why") or "")
        out.append([r["layer"], r["pass"], r["device"], r["impl"], med,
                    "—" if r["gflops"] is None else f"{r['gflops']:.1f}", _fmt_ratio(r["ratio"]),
                    _mark(r["correct"]), target, note])
    return out


def train_table_rows(result: dict) -> List[List[str]]:
    out = []
    for r in result.get("train_rows", []):
        target = "" if r.get("target") is None else f"≤ {r['target']:g}× {_met(r['target_met'])}"
        med = _fmt_time(r["median_s"]) if r["status"] == "ok" else r["status"]
        note = r.get("why") or ""
        if r.get("vs_tensorflow") is not None:
            note = f"{r['vs_tensorflow']:.2f}× dlconv's own step on TensorFlow" + (f"; {note}" if note else "")
        out.append([r["impl"], med, _fmt_ratio(r.get("time_ratio")), _mark(r.get("correct")),
                    target, note])
    return out


def overhead_table_rows(result: dict) -> List[List[str]]:
    out = []
    for r in result.get("overhead_rows", []):
        if r["status"] != "ok":
            out.append([r["keras_backend"], r["status"], "", "", r.get("why") or ""])
            continue
        out.append([r["keras_backend"], _fmt_time(r["dlconv_s"]), _fmt_time(r["stock_s"]),
                    f"{r['ratio']:.2f}×", f"backend {r['backend']}"])
    return out


KERNEL_HEADER = ["layer", "pass", "device", "backend/variant", "median", "GFLOP/s",
                 "ratio vs built-in", "correct", "target", "note"]
TRAIN_HEADER = ["MNIST CNN train step", "median", "time ratio ours/stock (≤1 good)", "correct",
                "target", "note"]
OVERHEAD_HEADER = ["bridge per-call overhead (1×1 conv, 1×1×1×1)", "dlconv", "stock op",
                   "time ratio", "note"]


def _text_table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    widths[-1] = min(widths[-1], 60)
    line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header, rows) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _targets_rows(result: dict) -> List[List[str]]:
    out = []
    for t in result.get("targets", []):
        value = "—" if t["value"] is None else f"{t['value']:.2f}×"
        mark = "not measured" if t["met"] is None else ("met ✓" if t["met"] else "not met ✗")
        out.append([t["label"], t["target"], t["best_impl"] or "—", value, mark, t.get("why") or ""])
    return out


TARGETS_HEADER = ["target", "goal", "best", "measured", "", "note"]


def format_text(result: dict) -> str:
    m = result["machine"]
    parts = [f"dlconv bench — {result['date']} — {m['description']}",
             f"batch {result['settings']['batch']}, median of {result['settings']['repeats']} samples "
             f"after warm-up; ratio = t_built-in / t_ours (> 1: ours faster); built-in: "
             f"{result['builtin']}; correctness vs dlconv.reference (max rel. error ≤ {TOLERANCE:g})",
             "", _text_table(KERNEL_HEADER, table_rows(result))]
    if result.get("train_rows"):
        parts += ["", _text_table(TRAIN_HEADER, train_table_rows(result))]
    if result.get("overhead_rows"):
        parts += ["", _text_table(OVERHEAD_HEADER, overhead_table_rows(result))]
    if result.get("targets"):
        parts += ["", "targets:", _text_table(TARGETS_HEADER, _targets_rows(result))]
    return "\n".join(parts)


def format_markdown(result: dict, title: Optional[str] = None) -> str:
    m = result["machine"]
    s = result["settings"]
    parts = [f"### {title or 'dlconv bench'} — {result['kind']} — {result['date']}", "",
             f"Machine: {m['description']}", "",
             f"Batch {s['batch']}; median of {s['repeats']} timed samples after warm-up; "
             f"ratio = t_built-in / t_ours (> 1 means dlconv is faster); built-in: "
             f"{result['builtin']}, measured in the same process; correct = max relative error "
             f"against dlconv.reference ≤ {TOLERANCE:g} on the same inputs.", ""]
    if result.get("notes"):
        parts += [f"- {n}" for n in result["notes"]] + [""]
    parts += [_md_table(KERNEL_HEADER, table_rows(result))]
    if result.get("train_rows"):
        parts += ["", _md_table(TRAIN_HEADER, train_table_rows(result))]
    if result.get("overhead_rows"):
        parts += ["", _md_table(OVERHEAD_HEADER, overhead_table_rows(result))]
    if result.get("targets"):
        parts += ["", _md_table(TARGETS_HEADER, _targets_rows(result))]
    return "\n".join(parts) + "\n"


def write_chart(result: dict, path) -> pathlib.Path:
    """Horizontal bars: ratio to the built-in per layer/pass/impl (log scale, 1 = built-in)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["is_builtin"]]
    rows += [dict(r, layer="train", pass_="step", ratio=(1.0 / r["time_ratio"]) if r.get("time_ratio") else None)
             for r in result.get("train_rows", []) if r["backend"] != "builtin"]
    labels, values, colors = [], [], []
    palette = {"cpp": "#1f77b4", "numba": "#ff7f0e"}
    for r in rows:
        p = r.get("pass_") or r.get("pass", "")
        labels.append(f"{r['layer']} {p} [{r['device']}] {r['impl']}")
        values.append(r["ratio"] if r.get("ratio") else 0.0)
        colors.append(palette.get(r["backend"], "#7f7f7f") if r.get("ratio") else "#d62728")
    fig_h = max(2.5, 0.28 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(10, fig_h))
    ypos = np.arange(len(rows))[::-1]
    marks = [v for v in values if v > 0] + [r["target"] for r in rows if r.get("target")] + [1.0]
    lo, hi = min(marks) / 3.0, max(marks) * 3.0
    for y, r, v, c in zip(ypos, rows, values, colors):
        if v > 0:
            ax.barh(y, v - lo, left=lo, color=c)
            ax.text(v * 1.05, y, f"{v:.2f}×", va="center", fontsize=7)
        else:
            ax.text(lo * 1.1, y, f"{r.get('status') or 'n/a'} (not timed)", va="center",
                    fontsize=7, color="#d62728")
        t = r.get("target")
        if t is not None and r["layer"] != "train":
            ax.plot([t, t], [y - 0.4, y + 0.4], color="k", lw=1.2)
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed relative to the built-in (t_built-in / t_ours; train step: t_stock / t_ours); "
                  "black tick = target; red = failed/not timed", fontsize=8)
    ax.set_title(f"dlconv bench, {result['kind']}, {result['date']}\n{result['machine']['description'][:150]}",
                 fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir, name: str) -> Dict[str, pathlib.Path]:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md",
             "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(format_markdown(result))
    write_chart(result, paths["png"])
    return paths


def new_result(kind: str, machine: dict, settings: Settings, builtin_label: str, **extra) -> dict:
    now = _dt.datetime.now().astimezone()
    return {"schema": SCHEMA, "kind": kind, "date": now.strftime("%Y-%m-%d"),
            "timestamp": now.isoformat(timespec="seconds"), "machine": machine,
            "settings": dataclasses.asdict(settings), "builtin": builtin_label,
            "tolerance": TOLERANCE, "rows": [], "train_rows": [], "overhead_rows": [], "targets": [],
            "notes": [], **extra}


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_description(self, s):
            pass

        def close(self):
            pass
    return _Null()


# ----------------------------------------------------------------------------- CLI
def _csv(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} must be a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return items


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and shorter samples: about 20 seconds on 2 cores")
    parser.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    parser.add_argument("--name", default=None,
                        help="file stem of the outputs (default DATE-MACHINE, e.g. 2026-11-30-cpu-xeon-2core)")
    parser.add_argument("--backends", default=",".join(TIMED_BACKENDS),
                        help="backends to time, comma-separated (default cpp,numba; the reference "
                             "backend is the correctness oracle and is never timed)")
    parser.add_argument("--layers", default=",".join(LAYER_BY_NAME),
                        help="layers, comma-separated: conv1,conv2,dense1,dense2")
    parser.add_argument("--passes", default="forward,backward",
                        help="passes, comma-separated: forward, backward-data, backward-filter, "
                             "backward (dense; also selects both conv backward passes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per case, median reported (default 7, --quick 3)")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (default 128)")
    parser.add_argument("--no-train-step", action="store_true",
                        help="skip the end-to-end MNIST CNN training step")
    parser.add_argument("--no-keras-backends", action="store_true",
                        help="skip the train step and bridge overhead on the torch and JAX Keras "
                             "backends (each measured in a child process)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when a real GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    layers = [LAYER_BY_NAME[n] for n in _csv(args.layers, tuple(LAYER_BY_NAME), "layers")]
    passes = _csv(args.passes, ALL_PASSES, "passes")
    if "backward" in passes:
        passes = sorted(set(passes) | {"backward-data", "backward-filter"}, key=ALL_PASSES.index)
    backends = _csv(args.backends, ("cpp", "numba", "reference"), "backends")
    notes = []
    if "reference" in backends:
        backends.remove("reference")
        notes.append("the reference backend is the correctness oracle and is not timed")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    settings = Settings(batch=args.batch)
    if args.quick:
        settings = Settings(batch=args.batch, repeats=3, warmup=1, min_sample_s=0.02, train_repeats=7)
    if args.repeats is not None:
        settings.repeats = settings.train_repeats = args.repeats
    progress = not args.no_progress

    machine = describe_machine()
    places: list = []
    if args.device in ("auto", "cpu"):
        places.append(HostPlace())
    gpu = real_gpu_present()
    if args.device == "cuda" and not gpu:
        raise ValueError("--device cuda needs a real CUDA GPU (the simulator is never timed)")
    if gpu and args.device in ("auto", "cuda"):
        places.append(NumbaCudaPlace())
    elif args.device == "auto":
        notes.append("no real CUDA GPU here: CUDA variants were not run (the simulator is never timed)")
    try:
        builtin = TensorFlowBuiltin()
        builtin_why = ""
    except ImportError as exc:
        builtin, builtin_why = None, f"TensorFlow is not installed: {exc}"
    if builtin is not None and gpu and not builtin.gpu_available():
        notes.append("TensorFlow sees no GPU: CUDA rows have no built-in to compare with")
    kind = "gpu" if any(p.device == "cuda" for p in places) else "cpu"
    result = new_result(kind, machine, settings, builtin.label if builtin else "none",
                        quick=bool(args.quick), notes=notes)
    result["notes"].append("dense backward = dx, dw and db in one op (the layer's backward); "
                           "its FLOPs count both products")
    name = args.name or f"{result['date']}-{machine_slug(machine, 'cuda' if kind == 'gpu' else 'cpu')}"
    print(f"dlconv bench: {machine['description']}", file=sys.stderr)
    load_before = _loadavg()
    t0 = time.perf_counter()

    rows = run_kernels(plan(layers, passes), places, backends, builtin, settings,
                       progress=progress, builtin_why=builtin_why)
    result["rows"] = rows
    if not args.no_train_step:
        result["train_rows"] = run_train_step(backends, settings, progress=progress)
        if not args.no_keras_backends:
            from .bench_keras import run_keras_backends
            print("dlconv bench: the train step and bridge overhead on the torch and JAX Keras "
                  "backends (a process each)", file=sys.stderr)
            kb_rows, result["overhead_rows"] = run_keras_backends(
                backends, settings.batch, settings.train_repeats, settings.warmup,
                tf_rows=result["train_rows"])
            result["train_rows"] += kb_rows
    result["targets"] = summarize_targets(rows, result["train_rows"])
    result["elapsed_s"] = time.perf_counter() - t0
    result["loadavg"] = {"before": load_before, "after": _loadavg()}
    if load_before is not None:
        before, after = load_before[0], result["loadavg"]["after"][0]
        note = (f"1-minute load average {before:.1f} before and {after:.1f} after the run on "
                f"{machine['cores']} cores (the run itself keeps about {machine['cores']} busy)")
        if max(before, after) > (machine["cores"] or 1) + 0.5:
            note += ("; above that, other processes competed for the CPU and multi-threaded "
                     "kernels (OpenMP, Numba parallel) waited at their barriers; the round-robin "
                     "sampling spreads that over all contenders")
        result["notes"].append(note)
    paths = write_outputs(result, args.out, name)
    print(format_text(result))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']} in {result['elapsed_s']:.0f} s")
    failed = [r["impl"] + " " + r["layer"] + " " + r["pass"] for r in rows + result["train_rows"]
              if r["status"] in ("failed", "error") and r.get("backend") != "builtin"]
    if failed:
        print(f"dlconv bench: {len(failed)} case(s) failed their correctness check or raised: "
              + "; ".join(failed), file=sys.stderr)
        return 1
    return 0
