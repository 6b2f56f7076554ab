"""Convolution index arithmetic, step by step (teaching).

``dlconv explain`` prints, and :func:`explain` returns as structured data, how one 2-D
convolution is sized and which elements feed which:

* the workshop's formula ``W0 = (W1 - N + 2P)/S + 1`` with the numbers substituted for
  height and width (with dilation, the effective kernel size first; with "same", the
  TensorFlow rule and the padding split), the output shape, the weight and bias counts,
  and, when the stride does not divide evenly, the input rows/columns never read;
* ``--at ROW,COL``: the equation of one output element, ``O17 = B5·I1 + B6·I2 + ...``;
* ``--all``: every output equation; ``--transposed``: the reverse map (what
  backward-data computes); ``--picture FILE.png``: a drawing of the same.

Notation (the workshop's)
-------------------------
* Filters are lettered ``A, B, C, ...`` (after ``Z``: ``AA, AB, ...``).
* Input elements ``I1, I2, ...``: one channel's H×W grid numbered from 1 in row-major
  order (``I1`` top left, ``I{W+1}`` first element of the second row).
* Weights of filter ``B``: ``B1, B2, ...`` numbered from 1 in row-major (kh, kw) order.
* Outputs ``O1, O2, ...``: numbered from 1 in row-major order, consecutively across
  filters: filter B's first output follows filter A's last (``O{OH*OW + 1}``).
* With more than one input channel the channel follows in brackets, numbered from 1:
  ``I5[c2]`` is element 5 of channel 2 and ``B5[c2]`` the weight filter B applies to it.
* ``ROW,COL`` positions are 1-based, like the numbering.
* Terms whose input element falls in the padding are zeros and are left out, so a
  padded corner output of a 3×3 kernel has only 4 terms.
* The bias (one per filter) is added to every output of its filter; it is counted in
  the parameters but not written in the equations.

Every size and pad comes from :func:`dlconv.shapes.conv_geometry`; the index map is the
one the kernels use: ``ih = oh*stride_h - pad_top + kh*dil_h`` (0-based).
This module imports neither TensorFlow nor Numba; matplotlib loads only for ``--picture``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import sys
import types
from typing import List, Optional, Sequence, Tuple

from .conv_arithmetic import arithmetic
# The pieces, one module each; their public names (and the private maps dlconv.animate and the
# tests use) stay importable from here.
from .explain_args import (_channel_arg, _check_size, _geometry, _ints, _pair, _padding,  # noqa: F401
                           _position)
from .explain_maps import (MAX_LOCATED, Equation, ReverseEquation, ReverseTerm, Term,  # noqa: F401
                           WeightEquation, WeightTerm, _forward, _locations, _reverse,
                           _weight_grad, filter_index, filter_letter, group_channels)
from .explain_picture import (PICTURE_MAX_GRID_LINES, PICTURE_MAX_LABELLED,  # noqa: F401
                              PICTURE_MAX_SIDE, _check_picture, draw_picture)
from .explain_text import format_explanation
from .shapes import ConvGeometry

__all__ = ["explain", "Explanation", "AxisSteps", "Equation", "Term", "ReverseEquation",
           "ReverseTerm", "WeightEquation", "filter_letter", "filter_index", "draw_picture",
           "arithmetic", "group_channels", "add_arguments", "run"]

#: --all, --transposed and --at refuse to enumerate more multiply terms than this: 150,000
#: terms print in about 2 s and take about 80 MB here (a 2-core VM); past it the listing
#: grows linearly (225,000 terms: 3 s, 117 MB).  --json costs ~5x more per term, hence its
#: own bound.  A 28×28×1 input with 32 3×3 filters has 225,792 terms: --filter F or --at
#: ROW,COL pick the part wanted.
MAX_TERMS = 150_000
MAX_JSON_TERMS = 30_000

#: The most filters explain enumerates (their letters, equations per filter): the index map
#: of one filter does not depend on how many there are.
MAX_FILTERS = 100_000


@dataclasses.dataclass(frozen=True)
class AxisSteps:
    """How one axis is sized, with the arithmetic written out in ``steps``."""

    axis: str
    in_size: int
    kernel: int
    stride: int
    dilation: int
    kernel_eff: int
    padding: str
    pad_before: int
    pad_after: int
    out_size: int
    divides_evenly: bool
    leftover: int
    unread: Tuple[int, ...]
    steps: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns; ``str()`` gives what ``dlconv explain`` prints."""

    geometry: ConvGeometry
    padding: str
    axes: Tuple[AxisSteps, AxisSteps]
    output_shape: Tuple[int, int, int, int]
    weights: int
    biases: int
    params: int
    filter_letters: Tuple[str, ...]
    equations: Tuple[Equation, ...]
    reverse: Tuple[ReverseEquation, ...]
    picture: Optional[str]
    groups: int = 1
    weight_grads: Tuple[WeightEquation, ...] = ()
    #: conv_arithmetic's relationships per axis (:func:`arithmetic`)
    arithmetic: Tuple[dict, ...] = ()
    #: for --at / --weight: memory offsets, im2col row/column, CUDA threads, CPU tile
    locations: Tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["geometry"] = {f: getattr(self.geometry, f) for f in ConvGeometry.FIELDS}
        d["notation"] = NOTATION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def text(self) -> str:
        return format_explanation(self)

    def __str__(self) -> str:
        return self.text()

    def equation(self, output: int) -> Equation:
        """The listed equation of ``O{output}`` (KeyError if it was not listed)."""
        for e in self.equations:
            if e.output == output:
                return e
        raise KeyError(f"O{output} is not among the listed equations")


NOTATION = {
    "filters": "lettered A, B, C, ... (AA after Z)",
    "inputs": "I1, I2, ... one channel's grid numbered from 1, row-major",
    "weights": "B1, B2, ... filter B's taps numbered from 1, row-major (kh, kw)",
    "outputs": "O1, O2, ... numbered from 1, row-major, consecutive across filters",
    "channels": "when C > 1, [cN] follows (1-based): I5[c2], B5[c2]",
    "positions": "ROW,COL are 1-based",
    "padding": "terms that fall in the padding are left out",
    "bias": "each filter's bias is added to all its outputs; not written in the equations",
}


# ----------------------------------------------------------------------------- sizing steps
def _axis_steps(g: ConvGeometry, axis: str, padding_mode: str) -> AxisSteps:
    if axis == "height":
        n_in, k, s, d = g.in_h, g.k_h, g.stride_h, g.dil_h
        before, after, out, k_eff = g.pad_top, g.pad_bottom, g.out_h, g.k_h_eff
        names, unit = ("P_top", "P_bottom"), ("row", "rows")
    else:
        n_in, k, s, d = g.in_w, g.k_w, g.stride_w, g.dil_w
        before, after, out, k_eff = g.pad_left, g.pad_right, g.out_w, g.k_w_eff
        names, unit = ("P_left", "P_right"), ("column", "columns")

    if padding_mode == "same":
        given = ""
    elif before == after:
        given = f", P = {before}" + (" ('valid')" if padding_mode == "valid" else "")
    else:
        given = f", {names[0]} = {before}, {names[1]} = {after}"
    steps: List[str] = [f"W1 = {n_in}, N = {k}{given}, S = {s}" + (f", D = {d}" if d > 1 else "")]
    n_sym = "N"
    if d > 1:
        steps.append(f"N_eff = (N − 1)·D + 1 = ({k} − 1)·{d} + 1 = {k_eff}")
        n_sym = "N_eff"
    if padding_mode == "same":
        total = before + after
        steps.append(f"padding 'same' (TensorFlow's rule): W0 = ceil(W1/S) = ceil({n_in}/{s}) = {out}")
        steps.append(f"P_total = max((W0 − 1)·S + {n_sym} − W1, 0) = "
                     f"max(({out} − 1)·{s} + {k_eff} − {n_in}, 0) = {total}")
        odd = " (the odd one goes to the " + ("bottom)" if axis == "height" else "right)") \
            if total % 2 else ""
        steps.append(f"{names[0]} = P_total // 2 = {before}, {names[1]} = P_total − {names[0]} = {after}"
                     + odd)

    numerator = n_in - k_eff + before + after
    quotient, leftover = divmod(numerator, s)
    if before == after:
        formula = f"W0 = (W1 − {n_sym} + 2P)/S + 1 = ({n_in} − {k_eff} + 2·{before})/{s} + 1"
    else:
        formula = (f"W0 = (W1 − {n_sym} + {names[0]} + {names[1]})/S + 1 = "
                   f"({n_in} − {k_eff} + {before} + {after})/{s} + 1")
    if padding_mode == "same":
        formula = "check: " + formula
    if leftover == 0:
        formula += f" = {numerator}/{s} + 1 = {quotient} + 1 = {out}"
    else:
        formula += (f" = {numerator}/{s} + 1 → floor({numerator}/{s}) + 1 = {quotient} + 1 = {out}")
    steps.append(formula)
    if quotient + 1 != out:  # the displayed arithmetic must agree with dlconv.shapes
        raise RuntimeError(f"explain's arithmetic ({quotient + 1}) disagrees with dlconv.shapes ({out})")

    # Which input rows/columns some output reads: enumerate the taps (no closed form).
    read = {o * s - before + t * d for o in range(out) for t in range(k)}
    unread = tuple(i + 1 for i in range(n_in) if i not in read)
    if leftover:
        tail = _tail_rows(out, s, k_eff, before, n_in, after)
        msg = (f"{numerator}/{s} is not a whole number: the stride does not divide evenly; the last "
               f"window ends {leftover} {unit[1] if leftover > 1 else unit[0]} before the end of the "
               f"padded input")
        if tail:
            verb = "is" if len(tail) == 1 else "are"
            msg += f", so input {_plural(unit, tail)} {_join(tail)} {verb} never read"
        else:
            msg += ", and " + ("that is" if leftover == 1 else "those are") + " padding: every input " \
                   f"{unit[0]} is still read"
        steps.append(msg + ".")
    inner = [u for u in unread if u not in _tail_rows(out, s, k_eff, before, n_in, after)]
    if inner:
        steps.append(f"input {_plural(unit, inner)} {_join(inner)} {'falls' if len(inner) == 1 else 'fall'} "
                     f"between the taps (stride {s}, kernel {k}"
                     + (f", dilation {d}" if d > 1 else "") + ") and "
                     + ("is" if len(inner) == 1 else "are") + " never read.")
    return AxisSteps(axis, n_in, k, s, d, k_eff, padding_mode, before, after, out,
                     leftover == 0, leftover, unread, tuple(steps))


def _tail_rows(out, s, k_eff, before, n_in, after) -> List[int]:
    """1-based input rows past the end of the last window."""
    return [p - before + 1 for p in range((out - 1) * s + k_eff, before + n_in + after)
            if 0 <= p - before < n_in]


def _plural(unit, items) -> str:
    return unit[0] if len(items) == 1 else unit[1]


def _join(items: Sequence[int]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- the API
def explain(input=(5, 5), kernel=3, *, filters: int = 1, stride=1, padding="valid", dilation=1,
            batch: int = 1, at=None, filter=None, all_outputs: bool = False,
            transposed: bool = False, picture: Optional[str] = None,
            json_output: bool = False, groups: int = 1, weight=None) -> Explanation:
    """Explain one convolution's sizes and index maps; see the module docstring for notation.

    ``input``: ``H`` / ``(H, W)`` / ``(H, W, C)`` / ``"28x28x1"``, or a
    :class:`~dlconv.shapes.ConvGeometry` (then the other geometry arguments must be left
    at their defaults).  ``kernel``, ``stride``, ``dilation``: an int, a pair or ``"3x3"``.
    ``padding``: ``"valid"``, ``"same"``, ``P``, ``(PH, PW)``, ``(T, B, L, R)``,
    ``((T, B), (L, R))`` or the strings ``"P"``, ``"PH,PW"``, ``"T,B,L,R"``.
    ``at``: a 1-based ``(row, col)`` of the output (of the *input* with ``transposed``).
    ``filter``: a letter or 1-based number; restricts the equations to that filter (alone, it
    lists all of that filter's outputs).  ``all_outputs``: every output equation.
    ``transposed``: the reverse map instead of the forward equations.
    ``picture``: a PNG path to draw the padded input, window, weights and outputs into.
    ``json_output``: the result is for :meth:`Explanation.to_json` (a tighter size bound).
    ``groups``: G groups (C and filters divisible by G): filter f reads only the C/G channels
    of its group (:func:`group_channels`).  ``weight``: a 1-based ``(row, col)`` or
    ``(row, col, channel)`` of the kernel: the backward-filter sum ``dW = Σ I·dO`` of that
    weight of ``filter`` (default A; channel default: the filter's first).
    With ``at`` or ``weight``, :attr:`Explanation.locations` holds the memory offsets,
    im2col row/column and the kernel thread / tile of the chosen terms (:mod:`dlconv.locate`).
    Sizes whose listing would take more than a few seconds are refused with ValueError
    (:data:`MAX_TERMS`), naming ``--at`` / ``--filter`` as the way to the part wanted.
    """
    if isinstance(input, ConvGeometry):
        if (kernel, filters, stride, padding, dilation, batch, groups) != (3, 1, 1, "valid", 1, 1, 1):
            raise ValueError("explain: pass either a ConvGeometry or the geometry arguments "
                             "(kernel, filters, stride, padding, dilation, batch), not both")
        g = input
        pad_mode = "explicit"
    else:
        dims = _ints(input, "input", (1, 2, 3), "5x5 or 28x28x1")
        if any(isinstance(d, numbers.Integral) and d < 1 for d in dims):
            raise ValueError(f"input sizes must be >= 1, got input={input!r}")
        h, w, c = (dims[0], dims[0], 1) if len(dims) == 1 else \
            (dims[0], dims[1], 1) if len(dims) == 2 else dims
        k_h, k_w = _pair(kernel, "kernel")
        pad = _padding(padding)
        g = _geometry((batch, h, w, c), (k_h, k_w), filters, _pair(stride, "stride"), pad,
                      _pair(dilation, "dilation"), groups)
        pad_mode = pad if pad in ("valid", "same") else "explicit"
    if g.batch < 1:
        raise ValueError(f"batch must be >= 1, got {g.batch}")
    if g.filters > MAX_FILTERS:
        raise ValueError(f"filters={g.filters:,} is more than explain enumerates (at most {MAX_FILTERS:,}); "
                         "one filter's index map does not depend on the count: explain fewer filters "
                         "and pick one with --filter F")
    if picture is not None:
        _check_picture(g, picture)
    limit = MAX_JSON_TERMS if json_output else MAX_TERMS

    axes = (_axis_steps(g, "height", pad_mode), _axis_steps(g, "width", pad_mode))
    weights = g.weight_count
    params = weights + g.bias_count

    chosen = [filter_index(filter, g.filters)] if filter is not None else list(range(g.filters))
    equations: List[Equation] = []
    reverse: List[ReverseEquation] = []
    if transposed:
        pixels = 1 if at is not None else g.in_h * g.in_w
        _check_size(g.in_c * pixels * g.k_h * g.k_w * len(chosen), "--transposed", limit)
        if at is not None:
            ih, iw = _position(at, "at", g.in_h, g.in_w)
            cells = [(c, ih, iw) for c in range(g.in_c)]
        else:
            cells = [(c, ih, iw) for c in range(g.in_c) for ih in range(g.in_h) for iw in range(g.in_w)]
        reverse = [_reverse(g, c, ih, iw, chosen) for c, ih, iw in cells]
    elif at is not None:
        oh, ow = _position(at, "at", g.out_h, g.out_w)
        _check_size(len(chosen) * g.k_h * g.k_w * g.in_c, "--at", limit)
        equations = [_forward(g, f, oh, ow) for f in chosen]
    elif all_outputs or (filter is not None and weight is None):
        _check_size(len(chosen) * g.out_h * g.out_w * g.k_h * g.k_w * g.in_c, "--all", limit)
        equations = [_forward(g, f, oh, ow) for f in chosen
                     for oh in range(g.out_h) for ow in range(g.out_w)]
    weight_grads: List[WeightEquation] = []
    if weight is not None:
        wf = chosen[0]
        spec = _ints(weight, "weight", (2, 3), "ROW,COL or ROW,COL,CHANNEL (1-based)")
        kh, kw = _position(spec[:2], "weight", g.k_h, g.k_w)
        mine = group_channels(g, wf)
        c = mine.start if len(spec) == 2 else _channel_arg(spec[2], g, wf)
        _check_size(g.out_h * g.out_w, "--weight", limit)
        weight_grads = [_weight_grad(g, wf, c, kh, kw)]
    locations = _locations(g, equations, reverse, weight_grads) \
        if (at is not None or weight is not None) and not all_outputs else []

    exp = Explanation(g, pad_mode, axes, g.y_shape, weights, g.bias_count, params,
                      tuple(filter_letter(f) for f in range(g.filters)), tuple(equations),
                      tuple(reverse), picture, getattr(g, "groups", 1), tuple(weight_grads),
                      tuple(arithmetic(g)), tuple(locations))
    if picture is not None:
        f = chosen[0]
        if transposed:
            pos = _position(at, "at", g.in_h, g.in_w) if at is not None else (0, 0)
            draw_picture(g, picture, f, input_at=pos)
        else:
            pos = _position(at, "at", g.out_h, g.out_w) if at is not None else (0, 0)
            draw_picture(g, picture, f, output_at=pos)
    return exp


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.description = (
        "Convolution index arithmetic, step by step. Notation: filters A, B, C, ...; input, weight "
        "and output elements numbered from 1 in row-major order (I1, B5, O17); outputs numbered "
        "consecutively across filters; with C > 1 the 1-based channel follows in brackets "
        "(I5[c2], B5[c2]); terms in the padding are left out.")
    parser.add_argument("--input", default="5x5", metavar="HxW[xC]",
                        help="input size, e.g. 5x5 or 28x28x1 (default 5x5, one channel)")
    parser.add_argument("--kernel", default="3", metavar="N|NHxNW", help="kernel size (default 3)")
    parser.add_argument("--filters", type=int, default=1, metavar="K", help="number of filters (default 1)")
    parser.add_argument("--stride", default="1", metavar="S|SHxSW", help="stride (default 1)")
    parser.add_argument("--padding", default="valid", metavar="valid|same|P|T,B,L,R",
                        help="'valid' (default), 'same' (TensorFlow's rule), P on every side, "
                             "PH,PW, or top,bottom,left,right")
    parser.add_argument("--dilation", default="1", metavar="D|DHxDW", help="dilation (default 1)")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="batch size (shown in the output shape only; default 1)")
    parser.add_argument("--at", metavar="ROW,COL",
                        help="1-based output position whose equation to show (with --transposed: "
                             "the 1-based input position)")
    parser.add_argument("--filter", metavar="F",
                        help="a letter (A, B, ...) or 1-based number: only that filter's equations "
                             "(alone: all of its outputs)")
    parser.add_argument("--all", action="store_true", dest="all_outputs", help="every output equation")
    parser.add_argument("--transposed", action="store_true",
                        help="the reverse map: which outputs each input element feeds, written as "
                             "the backward-data sum dI = Σ weight·dO")
    parser.add_argument("--picture", metavar="FILE.png",
                        help="draw the padded input (padding shaded), the window of the chosen output, "
                             "the weights and the output grid (matplotlib, Agg)")
    parser.add_argument("--groups", type=int, default=1, metavar="G",
                        help="grouped convolution: filter f reads only the C/G input channels of its "
                             "group (default 1)")
    parser.add_argument("--weight", metavar="ROW,COL[,CH]",
                        help="1-based kernel tap (and channel) of --filter F (default A): its "
                             "backward-filter sum dW = Σ I·dO")
    parser.add_argument("--html", metavar="FILE.html",
                        help="write an interactive, self-contained page (no network) for this "
                             "geometry: grids, clickable equations, memory offsets, kernel threads, "
                             "conv_arithmetic, Keras/PyTorch code")
    parser.add_argument("--json", action="store_true", help="print the structured data as JSON")
    parser.add_argument("--animate", metavar="FILE.gif",
                        help="an animated GIF of the sliding window over the padded input, one frame "
                             "per output (with --transposed: the transposed convolution as a direct "
                             "one over dO with zeros inserted, one frame per input; dlconv.animate)")


def run(args) -> int:
    if args.html:   # refuse an unwritable page before any work
        from . import explain_html
        explain_html.check_path(args.html)
    e = explain(args.input, args.kernel, filters=args.filters, stride=args.stride,
                padding=args.padding, dilation=args.dilation, batch=args.batch, at=args.at,
                filter=args.filter, all_outputs=args.all_outputs, transposed=args.transposed,
                picture=args.picture, json_output=args.json, groups=args.groups, weight=args.weight)
    if args.html:
        explain_html.write_page(e.geometry, args.html, padding=e.padding)
        print(f"Page written to {args.html}", file=sys.stderr)
    print(e.to_json() if args.json else e.text())
    if getattr(args, "animate", None):
        from . import animate as _animate
        g = e.geometry
        f = filter_index(args.filter, g.filters) if args.filter is not None else 0
        content, _ = _animate.animate(g, args.animate, transposed=args.transposed, filter=f)
        print(("" if args.json else "\n") + _animate.describe(g, args.animate, args.transposed, len(content)),
              file=sys.stderr if args.json else sys.stdout)
    return 0


# ``dlconv/__init__.py`` maps ``dlconv.explain`` lazily to the function above, but importing
# this submodule (the CLI does) rebinds the package attribute ``dlconv.explain`` to the
# module.  Making the module callable keeps ``dlconv.explain(...)`` working either way.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
