"""What the bench measures: the layer catalogue (:data:`LAYERS`, the workshop's MNIST CNN at
batch 128), the problems (seeded inputs and their reference outputs), FLOP and byte
counts, and the correctness measure (:func:`max_rel_error` against :data:`TOLERANCE`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import shapes
from . import passes as _passes
from .passes import ALL_PASSES, CONV_PASSES, DENSE_PASSES  # noqa: F401  (re-exported)

#: Largest accepted error, max|out - ref| / max|ref| per output array.  An indexing bug
#: gives errors of order 1; float32 accumulation over the longest reduction here
#: (73 728 terms in conv2's backward-filter) stays well below 1e-4.  1e-3 separates the two.
TOLERANCE = 1e-3

BATCH = 128
#: Backends that are timed; "reference" is the oracle and is never timed.
TIMED_BACKENDS = ("cpp", "numba")
#: Bytes of one float32 element (every array the bench moves is float32).
FLOAT32_BYTES = 4


# ----------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer shape of the benchmark.  ``sample_shape`` excludes the batch."""

    name: str
    kind: str                 # "conv" | "dense"
    sample_shape: tuple
    w_shape: tuple
    activation: str
    padding: object = "valid"
    strides: object = 1
    dilation: object = 1
    #: The layer's own realistic batch (the shape suites' layers); None: the run's batch
    #: (:data:`BATCH` unless ``--batch`` says otherwise).
    batch: Optional[int] = None
    #: The suite the shape comes from (:mod:`.suites`): rows and suite targets carry it.
    suite: str = "mnist"
    #: Where the shape comes from, shown after its description ("×10 in resnet_ecal").
    note: str = ""
    #: Grouped convolution (conv only): G groups, ``w_shape`` is ``(kh, kw, C/G, F)`` as in
    #: stock Keras; G = C is depthwise.  The geometry carries it, so the problem's inputs,
    #: the reference, dlconv's ops, TensorFlow's ops and the FLOPs (which divide by G) all
    #: follow from it.
    groups: int = 1

    def geometry(self, batch: Optional[int] = None):
        """The resolved geometry at ``batch`` (default: the layer's own, else :data:`BATCH`)."""
        batch = self.batch_for() if batch is None else batch
        if self.kind == "conv":
            return shapes.conv_geometry((batch, *self.sample_shape), self.w_shape,
                                        strides=self.strides, padding=self.padding,
                                        dilation=self.dilation, groups=self.groups)
        return shapes.dense_geometry((batch, *self.sample_shape), self.w_shape)

    def batch_for(self, run_batch: Optional[int] = None, fixed: bool = False) -> int:
        """The batch this layer runs at: ``run_batch`` when ``fixed`` (``--batch`` given) or
        when the layer has no batch of its own, else its own; :data:`BATCH` without either."""
        if fixed and run_batch is not None:
            return run_batch
        return self.batch or run_batch or BATCH

    @property
    def passes(self):
        return CONV_PASSES if self.kind == "conv" else DENSE_PASSES

    def describe(self) -> str:
        if self.kind == "conv":
            h, w, c = self.sample_shape
            kh, kw, _, f = self.w_shape
            g = self.geometry(1)
            stride = "" if (g.stride_h, g.stride_w) == (1, 1) else (
                f" stride {g.stride_h}" if g.stride_h == g.stride_w else f" stride {g.stride_h}×{g.stride_w}")
            if self.groups > 1:
                stride += (f", depthwise (groups {self.groups})" if self.groups == c
                           else f", groups {self.groups}")
            text = f"{h}×{w}×{c} → {f}, {kh}×{kw} {self.padding}{stride}, {self.activation}"
        else:
            text = f"{self.w_shape[0]} → {self.w_shape[1]}, {self.activation}"
        return f"{text} ({self.note})" if self.note else text

    def flops(self, pass_: str, batch: Optional[int] = None) -> int:
        """Multiply-adds × 2 of one pass; a dense backward is dx and dw: twice the forward.
        A grouped conv's count divides by G (each filter reduces over C/G channels)."""
        return _passes.get(self.kind, pass_).flops(self.geometry(batch))


#: The workshop's MNIST CNN (Keras' mnist_cnn example): conv1, conv2, dense1, dense2.
LAYERS = (
    Layer("conv1", "conv", (28, 28, 1), (3, 3, 1, 32), "relu"),
    Layer("conv2", "conv", (26, 26, 32), (3, 3, 32, 64), "relu"),
    Layer("dense1", "dense", (9216,), (9216, 128), "relu"),
    Layer("dense2", "dense", (128,), (128, 10), "softmax"),
)
LAYER_BY_NAME = {layer.name: layer for layer in LAYERS}


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

    @property
    def spec(self) -> "_passes.Pass":
        return _passes.get(self.layer.kind, self.pass_)

    @property
    def bytes(self) -> int:
        """Bytes moved at the least: every input read once and every output written once."""
        n = sum(a.size for a in self.inputs.values()) + sum(np.size(e) for e in self.expected)
        return FLOAT32_BYTES * int(n)


def make_problem(layer: Layer, pass_: str, batch: Optional[int] = None, seed: int = 0) -> Problem:
    """Random inputs (fixed seed) and the reference outputs, computed once.  ``batch``: the
    batch to run at (default: the layer's own, else :data:`BATCH`)."""
    spec = _passes.get(layer.kind, pass_)
    batch = batch or layer.batch_for()
    rng = np.random.default_rng(seed + 1000 * LAYERS.index(layer) if layer in LAYERS else seed)
    g = layer.geometry(batch)
    fan_in = int(np.prod(layer.w_shape[:-1]))
    pool = {
        "x": rng.random(g.x_shape, dtype=np.float32),                 # like MNIST pixels / relu outputs
        "w": (rng.standard_normal(layer.w_shape) * math.sqrt(2.0 / fan_in)).astype(np.float32),
        "b": (0.1 * rng.standard_normal(layer.w_shape[-1])).astype(np.float32),
        "dy": rng.standard_normal(g.y_shape).astype(np.float32),
    }
    t0 = time.perf_counter()
    if "y" in spec.inputs:                     # the forward output a backward pass reads
        pool["y"] = _passes.get(layer.kind, "forward").reference(pool, g, layer.activation)[0]
    inputs = {n: pool[n] for n in spec.inputs}
    expected = spec.reference(inputs, g, layer.activation)
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
    """Any array this harness meets (NumPy, Numba device, CuPy, torch, TensorFlow, anything
    with ``__cuda_array_interface__`` or ``__dlpack__``) → NumPy."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):                       # Numba device array
        return a.copy_to_host()
    if hasattr(a, "detach") and hasattr(a, "cpu"):        # torch tensor
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):   # CuPy
        return a.get()
    if hasattr(a, "numpy"):                               # TensorFlow tensor
        return a.numpy()
    if hasattr(a, "__cuda_array_interface__"):            # any other CUDA array
        from numba import cuda
        return cuda.as_cuda_array(a).copy_to_host()
    if hasattr(a, "__dlpack__"):
        return np.from_dlpack(a)
    return np.asarray(a)


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def plan(layers: Sequence[Layer], passes: Sequence[str]) -> List[tuple]:
    """(layer, pass) pairs selected, in table order."""
    out = []
    for layer in layers:
        for p in layer.passes:
            if p in passes:
                out.append((layer, p))
    return out
