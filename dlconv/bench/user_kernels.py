"""Bring your own kernel: a user's convolution or dense kernel, checked against
:mod:`dlconv.reference` and timed beside dlconv's variants and the built-in.

A kernel is any callable with the signature of one :mod:`dlconv.ops` function (its pass):

====================================  ===============================================
``conv2d``                            ``f(x, w, b, strides, padding, dilation, activation) → y``
``conv2d_backward_data``              ``f(dy, w, x_shape, strides, padding, dilation) → dx``
``conv2d_backward_filter``            ``f(x, dy, w_shape, strides, padding, dilation) → (dw, db)``
``dense``                             ``f(x, w, b, activation) → y``
``dense_backward``                    ``f(x, w, dy, y, activation) → (dx, dw, db)``
====================================  ===============================================

called with keywords after the arrays: ``strides=(sh, sw)``, ``padding=((top, bottom),
(left, right))`` (always explicit: "same" is resolved by TensorFlow's rule first; use
:func:`dlconv.shapes.conv_geometry` to get the sizes), ``dilation=(dh, dw)``,
``activation="linear" | "relu" | ...`` (conv: linear, relu, sigmoid, tanh; dense: also
softmax).  Layouts as dlconv's: NHWC activations, HWIO conv weights, (in, out) dense weights,
float32.  On the CPU the arrays are NumPy arrays; on a GPU they are CUDA arrays (Numba device
arrays under ``dlconv bench``, torch tensors under ``benchmarks/gpu_bench.py``: use them
through ``__cuda_array_interface__`` or DLPack, e.g. ``cupy.asarray(x)``); it may return
any array :func:`dlconv.bench.cases.to_host` reads (NumPy, Numba, CuPy, torch, DLPack).

Declare the pass with ``register_kernel(fn, "conv2d")``, an attribute ``fn.dlconv_pass =
"conv2d"``, or ``--kernel module:function@conv2d``; the default is ``conv2d``.

Before it is timed, :func:`check_kernel` runs it on :data:`CONV_CHECKS` (or
:data:`DENSE_CHECKS`): strides, "same"/"valid"/asymmetric padding, dilation, ragged sizes,
a batch of 2, plus seeded random geometries.  The first geometry it gets wrong is reported
as a ``dlconv explain`` command that draws it, with the first wrong element named in the
workshop's notation (``O26 (filter B, row 1, column 1): got 0.5, expected 1.25``); such a
kernel is shown failed on every row of its pass and is not timed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import pathlib
import sys
from typing import Callable, List, Optional, Sequence

import numpy as np

from .. import shapes
from ..explain import filter_letter
from . import passes as _passes
from .cases import TOLERANCE, as_tuple, to_host

#: Pass names a kernel may declare beyond the op names: the bench's own pass names.
PASS_ALIASES = {"forward": "conv2d", "backward-data": "conv2d_backward_data",
                "backward-filter": "conv2d_backward_filter", "dense-forward": "dense",
                "dense-backward": "dense_backward"}

#: Conv geometries every conv kernel is checked on: (H, W, C), (KH, KW), filters, strides,
#: padding, dilation, activation.  Each line covers a case an index bug hides in.
CONV_CHECKS = (
    ((5, 5, 1), (3, 3), 2, 1, "valid", 1, "linear"),             # the workshop's 5×5, 3×3
    ((7, 6, 3), (3, 3), 4, 1, "same", 1, "relu"),                # same, odd sizes, C > 1
    ((8, 7, 2), (3, 2), 3, 2, "same", 1, "linear"),              # stride 2: asymmetric "same"
    ((9, 9, 2), (3, 3), 2, (2, 1), ((0, 1), (2, 0)), 1, "linear"),  # explicit asymmetric pads
    ((9, 8, 3), (3, 3), 3, 1, "valid", 2, "relu"),               # dilation 2
    ((10, 11, 2), (2, 3), 5, (3, 2), 1, (1, 2), "linear"),       # stride ∤ size, dilation, pad 1
)
#: Dense problems every dense kernel is checked on: in, out, activation.
DENSE_CHECKS = ((1, 1, "linear"), (7, 5, "relu"), (16, 10, "softmax"), (33, 3, "linear"))
#: Batch of every check geometry (2: the batch index is exercised).
CHECK_BATCH = 2
#: Seeded random conv geometries added to :data:`CONV_CHECKS`.
RANDOM_CHECKS = 6


@dataclasses.dataclass
class CheckCase:
    """One check geometry; ``padding`` as given (for the ``explain`` command)."""

    g: object
    padding: object
    activation: str

    def describe(self) -> str:
        g = self.g
        if isinstance(g, shapes.DenseGeometry):
            return f"dense {g.batch}×{g.in_features} → {g.out_features}, {self.activation}"
        return (f"input {g.batch}×{g.in_h}×{g.in_w}×{g.in_c}, kernel {g.k_h}×{g.k_w}, "
                f"{g.filters} filters, stride {g.stride_h}×{g.stride_w}, pads (top, bottom, left, "
                f"right) = ({g.pad_top}, {g.pad_bottom}, {g.pad_left}, {g.pad_right}), dilation "
                f"{g.dil_h}×{g.dil_w}, {self.activation}")


@dataclasses.dataclass
class CheckResult:
    ok: bool
    checked: int
    why: Optional[str] = None            # the failure, one line
    explain: Optional[str] = None        # the dlconv explain command reproducing it
    element: Optional[str] = None        # the first wrong element, named


@dataclasses.dataclass
class UserKernel:
    """A registered kernel: the callable, its pass (an entry of ``PASSES``), a name."""

    fn: Callable
    spec: _passes.Pass
    name: str
    checks: dict = dataclasses.field(default_factory=dict)    # device → CheckResult


_REGISTRY: List[UserKernel] = []


def resolve_pass(value) -> _passes.Pass:
    """An op name (``"conv2d"``, ``"dense_backward"``, ...) or an alias → its table entry."""
    name = PASS_ALIASES.get(value, value)
    if name not in _passes.PASS_BY_OP:
        raise ValueError(f"pass must be one of {tuple(_passes.PASS_BY_OP)} (or "
                         f"{tuple(PASS_ALIASES)}), got {value!r}")
    return _passes.PASS_BY_OP[name]


def make_kernel(fn: Callable, pass_: Optional[str] = None, name: Optional[str] = None) -> UserKernel:
    if not callable(fn):
        raise TypeError(f"kernel must be callable, got {type(fn).__name__}")
    spec = resolve_pass(pass_ or getattr(fn, "dlconv_pass", None) or "conv2d")
    return UserKernel(fn, spec, name or getattr(fn, "__name__", None) or repr(fn))


def register_kernel(fn: Callable, pass_: Optional[str] = None, name: Optional[str] = None) -> UserKernel:
    """Add ``fn`` to what ``dlconv bench`` (and :func:`dlconv.bench.run_kernels`) checks and
    times.  ``pass_``: the op whose signature ``fn`` has (see the module docstring); default
    ``fn.dlconv_pass``, else ``"conv2d"``.  ``name``: the row label (default ``fn.__name__``)."""
    k = make_kernel(fn, pass_, name)
    if any(r.name == k.name for r in _REGISTRY):
        raise ValueError(f"a kernel named {k.name!r} is registered already; pass name=")
    _REGISTRY.append(k)
    return k


def registered() -> List[UserKernel]:
    return list(_REGISTRY)


def clear_kernels() -> None:
    _REGISTRY.clear()


def load_kernel(spec: str) -> UserKernel:
    """``"package.module:function"``, ``"path/to/file.py:function"``, each optionally
    followed by ``@pass`` (``my_mod:conv@conv2d``) → an (unregistered) :class:`UserKernel`."""
    text, _, pass_ = spec.partition("@")
    module, sep, attr = text.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--kernel must look like package.module:function[@pass] or "
                         f"file.py:function[@pass], got {spec!r}")
    if module.endswith(".py") or "/" in module:
        path = pathlib.Path(module)
        if not path.is_file():
            raise ValueError(f"--kernel {spec!r}: no file {module}")
        ms = importlib.util.spec_from_file_location(f"dlconv_user_kernel_{path.stem}", path)
        mod = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(mod)
    else:
        mod = _import(module, spec)
    fn = getattr(mod, attr, None)
    if fn is None:
        raise ValueError(f"--kernel {spec!r}: {module} has no attribute {attr!r}")
    return make_kernel(fn, pass_ or None, attr)


def _import(module: str, spec: str):
    """Import ``module``, finding it in the current folder too (as ``python -m`` would; the
    ``dlconv`` console script does not put the current folder on ``sys.path``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0] or os.getcwd() in sys.path:
            raise ValueError(f"--kernel {spec!r}: cannot import {module}: {exc}") from None
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--kernel {spec!r}: cannot import {module}: {exc}") from None


# ----------------------------------------------------------------------------- check geometries
def check_cases(kind: str, seed: int = 0) -> List[CheckCase]:
    """The geometries of :data:`CONV_CHECKS` / :data:`DENSE_CHECKS`, plus seeded random ones."""
    if kind == "dense":
        return [CheckCase(shapes.dense_geometry((CHECK_BATCH, n), (n, m)), None, act)
                for n, m, act in DENSE_CHECKS]
    specs = list(CONV_CHECKS)
    rng = np.random.default_rng(seed)
    while len(specs) < len(CONV_CHECKS) + RANDOM_CHECKS:
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 3, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        pad = ["valid", "same", ((int(rng.integers(0, 3)), int(rng.integers(0, 3))),
                                 (int(rng.integers(0, 3)), int(rng.integers(0, 3))))][int(rng.integers(0, 3))]
        hwc = (int(rng.integers(kh * d[0], 12)), int(rng.integers(kw * d[1], 12)), int(rng.integers(1, 5)))
        specs.append((hwc, (kh, kw), int(rng.integers(1, 6)), s, pad, d,
                      ["linear", "relu"][int(rng.integers(0, 2))]))
    out = []
    for hwc, k, f, s, pad, d, act in specs:
        g = shapes.conv_geometry((CHECK_BATCH, *hwc), (*k, hwc[2], f), s, pad, d)
        out.append(CheckCase(g, pad, act))
    return out


def check_inputs(spec: _passes.Pass, case: CheckCase, seed: int = 0) -> dict:
    """Seeded inputs of one check geometry: small integers and halves, so that every product
    and sum is exact in float32 and a wrong index cannot hide in rounding."""
    g = case.g
    rng = np.random.default_rng(seed)
    b_shape = (g.filters,) if isinstance(g, shapes.ConvGeometry) else (g.out_features,)
    pool = {"x": rng.integers(-3, 4, g.x_shape).astype(np.float32),
            "w": (rng.integers(-4, 5, g.w_shape) / 2).astype(np.float32),
            "b": (rng.integers(-4, 5, b_shape) / 2).astype(np.float32),
            "dy": rng.integers(-3, 4, g.y_shape).astype(np.float32)}
    if "y" in spec.inputs:
        pool["y"] = _passes.PASSES[(spec.kind, "forward")].reference(pool, g, case.activation)[0]
    return {n: pool[n] for n in spec.inputs}


# ----------------------------------------------------------------------------- naming an element
def explain_command(g, padding=None, at=None, filter_=None, transposed=False) -> str:
    """The ``dlconv explain`` command line that shows geometry ``g`` (a dense layer as the
    1×1 convolution of a 1×1×in input it is)."""
    if isinstance(g, shapes.DenseGeometry):
        parts = [f"--input 1x1x{g.in_features}", "--kernel 1", f"--filters {g.out_features}"]
        batch = g.batch
    else:
        if isinstance(padding, str):
            pad = padding
        else:
            pad = f"{g.pad_top},{g.pad_bottom},{g.pad_left},{g.pad_right}"
        parts = [f"--input {g.in_h}x{g.in_w}x{g.in_c}", f"--kernel {g.k_h}x{g.k_w}",
                 f"--filters {g.filters}", f"--stride {g.stride_h}x{g.stride_w}", f"--padding {pad}",
                 f"--dilation {g.dil_h}x{g.dil_w}"]
        batch = g.batch
    if batch > 1:
        parts.append(f"--batch {batch}")
    if transposed:
        parts.append("--transposed")
    if at is not None:
        parts.append(f"--at {at[0]},{at[1]}")
    if filter_ is not None:
        parts.append(f"--filter {filter_}")
    return "dlconv explain " + " ".join(parts)


def _as_conv(g):
    """(H, W, C, F, OH, OW) of ``g``; a dense layer is a 1×1 conv on a 1×1×in input."""
    if isinstance(g, shapes.DenseGeometry):
        return 1, 1, g.in_features, g.out_features, 1, 1
    return g.in_h, g.in_w, g.in_c, g.filters, g.out_h, g.out_w


def _ch(c: int, channels: int) -> str:
    return f"[c{c + 1}]" if channels > 1 else ""


def name_element(spec: _passes.Pass, output: str, g, index: tuple, batch: int):
    """(name, explain keyword arguments) of element ``index`` of output ``output`` in the
    workshop's notation (see :mod:`dlconv.explain`)."""
    H, W, C, F, OH, OW = _as_conv(g)
    dense = isinstance(g, shapes.DenseGeometry)
    img = lambda n: f", image {n + 1} of {batch}" if batch > 1 else ""   # noqa: E731
    if output == "y":
        n, oh, ow, f = (index[0], 0, 0, index[1]) if dense else index
        number = f * OH * OW + oh * OW + ow + 1
        return (f"O{number} (filter {filter_letter(f)}, row {oh + 1}, column {ow + 1}{img(n)})",
                {"at": (oh + 1, ow + 1), "filter_": filter_letter(f)})
    if output == "dx":
        n, ih, iw, c = (index[0], 0, 0, index[1]) if dense else index
        number = ih * W + iw + 1
        return (f"dI{number}{_ch(c, C)} (input row {ih + 1}, column {iw + 1}"
                + (f", channel {c + 1}" if C > 1 else "") + f"{img(n)})",
                {"at": (ih + 1, iw + 1), "transposed": True})
    if output == "dw":
        kh, kw, c, f = (0, 0, index[0], index[1]) if dense else index
        letter = filter_letter(f)
        return (f"d{letter}{kh * (1 if dense else g.k_w) + kw + 1}{_ch(c, C)} (the gradient of "
                f"filter {letter}'s weight at kernel row {kh + 1}, column {kw + 1}"
                + (f", channel {c + 1}" if C > 1 else "") + ")", {"filter_": letter})
    f = index[0]                                                           # "db"
    return f"db of filter {filter_letter(f)} (its bias)", {"filter_": filter_letter(f)}


def _order(output: str, a: np.ndarray, dense: bool) -> tuple:
    """The axes order in which the workshop numbers ``output``'s elements."""
    if dense or a.ndim != 4:
        return tuple(range(a.ndim))
    return {"y": (0, 3, 1, 2), "dx": (0, 3, 1, 2), "dw": (3, 2, 0, 1)}.get(output, (0, 1, 2, 3))


def first_wrong(spec: _passes.Pass, g, outs: Sequence, expected: Sequence, padding=None,
                tol: float = TOLERANCE) -> Optional[CheckResult]:
    """None when every output is within ``tol`` (max|out - ref| / max|ref|); else the failure:
    the first wrong element in the workshop's numbering, and the explain command for it."""
    dense = isinstance(g, shapes.DenseGeometry)
    batch = g.batch
    if len(outs) != len(expected):
        return CheckResult(False, 0, why=f"returned {len(outs)} array(s), expected {len(expected)} "
                                         f"({', '.join(spec.outputs)})",
                           explain=explain_command(g, padding))
    for name, o, r in zip(spec.outputs, outs, expected):
        o = np.asarray(o, np.float64)
        r = np.asarray(r, np.float64)
        if o.shape != r.shape:
            return CheckResult(False, 0, why=f"{name} has shape {o.shape}, expected {r.shape}",
                               explain=explain_command(g, padding))
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-30)
        bad = ~(np.abs(o - r) <= tol * scale)                 # NaN counts as wrong
        if not bad.any():
            continue
        order = _order(name, r, dense)
        flat = np.flatnonzero(np.transpose(bad, order))
        idx_t = np.unravel_index(int(flat[0]), tuple(r.shape[a] for a in order))
        index = [0] * r.ndim
        for axis, i in zip(order, idx_t):
            index[axis] = int(i)
        index = tuple(index)
        label, kw = name_element(spec, name, g, index, batch)
        err = float(np.nanmax(np.abs(o - r))) / scale if np.isfinite(o).all() else math.inf
        element = f"{label}: got {o[index]:.6g}, expected {r[index]:.6g}"
        return CheckResult(False, 0, why=f"{element} (max relative error {err:.3g} > {tol:g})",
                           explain=explain_command(g, padding, **kw), element=element)
    return None


# ----------------------------------------------------------------------------- the check
def check_kernel(kernel, place=None, seed: int = 0, pass_: Optional[str] = None) -> CheckResult:
    """Run ``kernel`` (a :class:`UserKernel` or a callable) on every check geometry of its pass
    (arrays placed by ``place``: host by default) against the reference; stop at the first
    wrong one."""
    from .timing import HostPlace

    k = kernel if isinstance(kernel, UserKernel) else make_kernel(kernel, pass_)
    place = place or HostPlace()
    cases = check_cases(k.spec.kind, seed)
    for i, case in enumerate(cases):
        inputs = check_inputs(k.spec, case, seed + i)
        expected = k.spec.reference(inputs, case.g, case.activation)
        placed = {n: place.put(a) for n, a in inputs.items()}
        try:
            out = k.spec.call(k.fn, placed, case.g, case.activation)
            place.sync()
            outs = [to_host(o) for o in as_tuple(out)]
        except Exception as exc:  # a kernel that raises fails its check; the bench goes on
            return CheckResult(False, i + 1, why=f"raised {type(exc).__name__}: {exc}"[:300]
                               + f" on {case.describe()}",
                               explain=explain_command(case.g, case.padding))
        bad = first_wrong(k.spec, case.g, outs, expected, case.padding)
        if bad is not None:
            bad.checked = i + 1
            bad.why = f"wrong on {case.describe()}: {bad.why}"
            return bad
    return CheckResult(True, len(cases))


def failure_text(res: CheckResult) -> str:
    """One line for a table row: what is wrong and the command that reproduces it."""
    return f"{res.why}; reproduce: {res.explain}; not timed"
