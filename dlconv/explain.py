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
import os
import pathlib
import sys
import types
from typing import List, Optional, Sequence, Tuple

from .conv_arithmetic import arithmetic
from .shapes import ConvGeometry, conv_geometry

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

#: --at / --weight locate (offsets, threads, tiles) at most this many of their equations: one
#: per filter (or channel) repeats the same arithmetic; --filter F picks the one wanted.
MAX_LOCATED = 8

#: The most filters explain enumerates (their letters, equations per filter): the index map
#: of one filter does not depend on how many there are.
MAX_FILTERS = 100_000

#: Grids wider or taller than this label only their highlighted cells (the window, its
#: weights, the output): each label is a text object (~2 ms to lay out on a loaded 2-core VM),
#: and a 24x24 grid of them took 2.5 s; up to 12 per side the whole picture takes ~0.3 s.
PICTURE_MAX_LABELLED = 12
#: ... and without cell borders (lines closer than ~4 pixels merge into grey).
PICTURE_MAX_GRID_LINES = 128
#: The largest padded grid --picture draws (each panel is one image, so time is no issue;
#: past this a cell is under one pixel and the picture shows nothing).
PICTURE_MAX_SIDE = 2048


# ----------------------------------------------------------------------------- notation
def filter_letter(index: int) -> str:
    """0 → "A", 25 → "Z", 26 → "AA" (spreadsheet columns)."""
    if index < 0:
        raise ValueError(f"filter index must be >= 0, got {index}")
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("A") + r) + letters
    return letters


def filter_index(spec, filters: int) -> int:
    """A filter given as a letter ("B", "aa") or a 1-based number (2, "2") → 0-based index."""
    text = spec.strip() if isinstance(spec, str) else None
    if text and text.isascii() and text.isalpha():
        n = 0
        for ch in text.upper():
            n = n * 26 + (ord(ch) - ord("A") + 1)
        index = n - 1
    elif text and text.isascii() and text.isdigit():
        index = int(text) - 1
    elif isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        index = int(spec) - 1
    else:
        raise ValueError(f"filter must be a letter (A, B, ...) or a 1-based number, got {spec!r}")
    if not 0 <= index < filters:
        raise ValueError(f"filter must be one of A..{filter_letter(filters - 1)} (1..{filters}), "
                         f"got {spec!r}")
    return index


def _channel(c: int, channels: int) -> str:
    """Channel suffix, only when there is more than one channel (c is 0-based)."""
    return f"[c{c + 1}]" if channels > 1 else ""


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Term:
    """One product ``weight · input`` of an output's sum (numbers 1-based, taps 0-based)."""

    filter: str
    weight: int
    channel: int
    input: int
    row: int
    col: int
    kh: int
    kw: int
    label: str


@dataclasses.dataclass(frozen=True)
class Equation:
    """``O{output} = sum of terms``; ``row``, ``col`` are the 1-based output position."""

    output: int
    filter: str
    row: int
    col: int
    terms: Tuple[Term, ...]
    taps: int
    text: str


@dataclasses.dataclass(frozen=True)
class ReverseTerm:
    """Output ``output`` of ``filter`` read this input through weight ``weight``."""

    output: int
    filter: str
    weight: int
    row: int
    col: int
    label: str


@dataclasses.dataclass(frozen=True)
class ReverseEquation:
    """``dI{input}[c] = sum of weight · dO`` over every output that input feeds."""

    input: int
    channel: int
    row: int
    col: int
    terms: Tuple[ReverseTerm, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class WeightTerm:
    """Input ``input`` (at in_row, in_col) met output ``output`` through this weight."""

    input: int
    output: int
    in_row: int
    in_col: int
    out_row: int
    out_col: int
    label: str


@dataclasses.dataclass(frozen=True)
class WeightEquation:
    """``dB5[c] = sum of I · dO``: the backward-filter sum of one weight (row, col 1-based tap)."""

    filter: str
    weight: int
    channel: int
    row: int
    col: int
    terms: Tuple[WeightTerm, ...]
    text: str


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


# ----------------------------------------------------------------------------- index maps
def group_channels(g: ConvGeometry, f: int) -> range:
    """The input channels (0-based) filter ``f`` reads: with G groups, filter f belongs to
    group q = f // (F/G) and reads channels q·(C/G) .. (q+1)·(C/G) − 1 (all of them when G = 1)."""
    groups = getattr(g, "groups", 1)
    per = g.in_c // groups
    q = f // (g.filters // groups)
    return range(q * per, (q + 1) * per)


def _forward(g: ConvGeometry, f: int, oh: int, ow: int) -> Equation:
    """The equation of output (f, oh, ow), all 0-based."""
    letter = filter_letter(f)
    terms = []
    for kh in range(g.k_h):
        ih = oh * g.stride_h - g.pad_top + kh * g.dil_h
        for kw in range(g.k_w):
            iw = ow * g.stride_w - g.pad_left + kw * g.dil_w
            if not (0 <= ih < g.in_h and 0 <= iw < g.in_w):      # the one guard: padding
                continue
            for c in group_channels(g, f):
                weight, inp = kh * g.k_w + kw + 1, ih * g.in_w + iw + 1
                ch = _channel(c, g.in_c)
                terms.append(Term(letter, weight, c + 1, inp, ih + 1, iw + 1, kh, kw,
                                  f"{letter}{weight}{ch}·I{inp}{ch}"))
    number = f * g.out_h * g.out_w + oh * g.out_w + ow + 1
    rhs = " + ".join(t.label for t in terms) if terms else "0"
    return Equation(number, letter, oh + 1, ow + 1, tuple(terms), g.k_h * g.k_w * len(group_channels(g, f)),
                    f"O{number} = {rhs}")


def _reverse(g: ConvGeometry, c: int, ih: int, iw: int, filters: Sequence[int]) -> ReverseEquation:
    """Every (output, weight) that reads input (c, ih, iw), all 0-based: the gather form of
    backward-data, ``oh = (ih + pad_top - kh*dil_h) / stride_h`` when that divides."""
    terms = []
    ch = _channel(c, g.in_c)
    for f in filters:
        if c not in group_channels(g, f):        # groups: f reads only its group's channels
            continue
        letter = filter_letter(f)
        for kh in range(g.k_h):
            num_h = ih + g.pad_top - kh * g.dil_h
            if num_h % g.stride_h or not 0 <= num_h // g.stride_h < g.out_h:
                continue
            oh = num_h // g.stride_h
            for kw in range(g.k_w):
                num_w = iw + g.pad_left - kw * g.dil_w
                if num_w % g.stride_w or not 0 <= num_w // g.stride_w < g.out_w:
                    continue
                ow = num_w // g.stride_w
                number = f * g.out_h * g.out_w + oh * g.out_w + ow + 1
                weight = kh * g.k_w + kw + 1
                terms.append(ReverseTerm(number, letter, weight, oh + 1, ow + 1,
                                         f"{letter}{weight}{ch}·dO{number}"))
    terms.sort(key=lambda t: (t.output, t.weight))
    inp = ih * g.in_w + iw + 1
    rhs = " + ".join(t.label for t in terms) if terms else "0"
    note = "" if terms else "   (no output reads it)"
    return ReverseEquation(inp, c + 1, ih + 1, iw + 1, tuple(terms), f"dI{inp}{ch} = {rhs}{note}")


def _weight_grad(g: ConvGeometry, f: int, c: int, kh: int, kw: int) -> "WeightEquation":
    """The backward-filter sum of weight (kh, kw, c) of filter f (0-based): every (input,
    output) pair that meets in it, ``dW = Σ I·dO`` over the outputs whose tap (kh, kw) is
    inside the input."""
    letter = filter_letter(f)
    ch = _channel(c, g.in_c)
    per = g.out_h * g.out_w
    terms = []
    for oh in range(g.out_h):
        ih = oh * g.stride_h - g.pad_top + kh * g.dil_h
        for ow in range(g.out_w):
            iw = ow * g.stride_w - g.pad_left + kw * g.dil_w
            if 0 <= ih < g.in_h and 0 <= iw < g.in_w:
                inp, out = ih * g.in_w + iw + 1, f * per + oh * g.out_w + ow + 1
                terms.append(WeightTerm(inp, out, ih + 1, iw + 1, oh + 1, ow + 1, f"I{inp}{ch}·dO{out}"))
    weight = kh * g.k_w + kw + 1
    rhs = " + ".join(t.label for t in terms) if terms else "0"
    return WeightEquation(letter, weight, c + 1, kh + 1, kw + 1, tuple(terms),
                          f"d{letter}{weight}{ch} = {rhs}")


def _locations(g: ConvGeometry, equations, reverse, weight_grads) -> list:
    """Memory offsets, im2col positions and kernel threads of what --at / --weight chose."""
    from . import locate
    out = []
    per = g.out_h * g.out_w
    for eq in equations[:MAX_LOCATED]:
        f = (eq.output - 1) // per
        rec = {"kind": "output", "name": f"O{eq.output}", "filter": eq.filter,
               **locate.locate_output(g, f, eq.row - 1, eq.col - 1), "terms": []}
        for t in eq.terms:
            ci = t.channel - 1 - group_channels(g, f).start
            rec["terms"].append({"label": t.label,
                                 "x_offset": locate.x_offset(g, 0, t.row - 1, t.col - 1, t.channel - 1),
                                 "w_offset": locate.w_offset(g, t.kh, t.kw, ci, f),
                                 "im2col_col": locate.im2col(g, 0, 0, 0, t.kh, t.kw, ci)[1]})
        out.append(rec)
    for r in reverse[:MAX_LOCATED]:
        rec = {"kind": "input", "name": f"I{r.input}{_channel(r.channel - 1, g.in_c)}",
               "x_offset": locate.x_offset(g, 0, r.row - 1, r.col - 1, r.channel - 1), "terms": []}
        for t in r.terms:
            f = filter_index(t.filter, g.filters)
            kh, kw = divmod(t.weight - 1, g.k_w)
            ci = r.channel - 1 - group_channels(g, f).start
            rec["terms"].append({"label": t.label,
                                 "dy_offset": locate.y_offset(g, 0, t.row - 1, t.col - 1, f),
                                 "w_offset": locate.w_offset(g, kh, kw, ci, f)})
        out.append(rec)
    for wq in weight_grads:
        f = filter_index(wq.filter, g.filters)
        ci = wq.channel - 1 - group_channels(g, f).start
        rec = {"kind": "weight", "name": wq.text.split(" = ")[0][1:],
               "w_offset": locate.w_offset(g, wq.row - 1, wq.col - 1, ci, f), "terms": []}
        for t in wq.terms:
            rec["terms"].append({"label": t.label,
                                 "x_offset": locate.x_offset(g, 0, t.in_row - 1, t.in_col - 1, wq.channel - 1),
                                 "dy_offset": locate.y_offset(g, 0, t.out_row - 1, t.out_col - 1, f)})
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- argument parsing
def _ints(text, name: str, lengths: Sequence[int], example: str) -> Tuple[int, ...]:
    """'5x5', '28x28x1', '3', '1,2' or a tuple/int → tuple of ints of an allowed length."""
    if isinstance(text, str):
        parts = text.replace("×", "x").replace("X", "x").replace(",", "x").split("x")
        try:
            values = tuple(int(p.strip()) for p in parts)
        except ValueError:
            raise ValueError(f"{name} must look like {example}, got {text!r}") from None
    elif isinstance(text, (list, tuple)):
        values = tuple(text)
    else:
        values = (text,)
    if len(values) not in lengths:
        raise ValueError(f"{name} must look like {example}, got {text!r}")
    return values


def _pair(value, name: str) -> Tuple[int, int]:
    v = _ints(value, name, (1, 2), "3 or 3x3")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _padding(value):
    """'valid' | 'same' | P | 'PH,PW' | 'T,B,L,R' (or the Python forms dlconv.shapes takes)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("valid", "same"):
            return low
        v = _ints(value, "padding", (1, 2, 4), "valid, same, P, PH,PW or T,B,L,R")
        if len(v) == 1:
            return v[0]
        if len(v) == 2:
            return (v[0], v[1])
        return ((v[0], v[1]), (v[2], v[3]))
    if isinstance(value, (list, tuple)) and len(value) == 4 and \
            not any(isinstance(p, (list, tuple)) for p in value):
        return ((value[0], value[1]), (value[2], value[3]))
    return value


def _position(value, name: str, rows: int, cols: int) -> Tuple[int, int]:
    """1-based ROW,COL → 0-based, checked against the grid."""
    r, c = _ints(value, name, (2,), "ROW,COL (1-based), e.g. 1,1")
    for what, v, hi in (("row", r, rows), ("column", c, cols)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= hi:
            raise ValueError(f"{name} {what} must be in 1..{hi} (1-based), got {v!r}")
    return int(r) - 1, int(c) - 1


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


def _geometry(x_shape, kernel, filters, stride, pad, dilation, groups) -> ConvGeometry:
    """dlconv.shapes' record; with groups, the grouped kernel shape (k_h, k_w, C/G, F)."""
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
    c = x_shape[3]
    if groups == 1:
        return conv_geometry(x_shape, (*kernel, c, filters), stride, pad, dilation)
    if not isinstance(c, numbers.Integral) or c % groups or filters % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({c}) and the filters ({filters})")
    try:
        return conv_geometry(x_shape, (*kernel, c // groups, filters), stride, pad, dilation,
                             groups=groups)
    except TypeError:  # a dlconv.shapes without grouped convolution
        raise ValueError(f"groups={groups}: this dlconv.shapes has no grouped convolution") from None


def _channel_arg(value, g: ConvGeometry, f: int) -> int:
    """1-based channel of --weight ROW,COL,CHANNEL → 0-based, one filter f reads."""
    mine = group_channels(g, f)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value - 1 not in mine:
        raise ValueError(f"weight channel must be one filter {filter_letter(f)} reads "
                         f"({mine.start + 1}..{mine.stop}, 1-based), got {value!r}")
    return int(value) - 1


def _check_size(terms: int, flag: str, limit: int = MAX_TERMS) -> None:
    if terms > limit:
        how = ("--filter F (one filter), or fewer channels" if flag == "--at" else
               "--at ROW,COL (one position) or --filter F (one filter), or explain a smaller input")
        raise ValueError(f"{flag} would list {terms:,} terms, more than the {limit:,} explain prints "
                         f"in a few seconds; get the part wanted with {how}")


def _check_picture(g: ConvGeometry, picture) -> None:
    """Refuse, before any work, a picture that cannot be written or would show nothing."""
    folder = pathlib.Path(picture).expanduser().resolve().parent
    if not folder.is_dir():
        raise ValueError(f"--picture {picture}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--picture {picture}: folder {folder} is not writable")
    hp, wp = g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right
    if max(hp, wp, g.out_h, g.out_w) > PICTURE_MAX_SIDE:
        raise ValueError(f"--picture draws every cell: at most {PICTURE_MAX_SIDE}x{PICTURE_MAX_SIDE}, "
                         f"but the padded input is {hp}x{wp}; draw a smaller input (the window at "
                         "--at ROW,COL moves the same way on any size)")


# ----------------------------------------------------------------------------- text
def format_explanation(e: Explanation) -> str:
    g = e.geometry
    letters = e.filter_letters
    filt = (f"{g.filters} filter" + ("s" if g.filters > 1 else "") + " ("
            + (", ".join(letters) if g.filters <= 4 else f"{letters[0]}..{letters[-1]}") + ")")
    pad = _padding_text(g, e.padding)
    lines = [f"Convolution: input {g.in_h}×{g.in_w}×{g.in_c}, kernel {g.k_h}×{g.k_w}, {filt}, "
             f"stride {g.stride_h}×{g.stride_w}, padding {pad}, dilation {g.dil_h}×{g.dil_w}"
             + (f", batch {g.batch}" if g.batch > 1 else ""),
             "",
             "Output size, W0 = (W1 − N + 2P)/S + 1 (floor when S does not divide):"]
    for ax in e.axes:
        head = f"  {ax.axis + ':':<8}"
        for i, step in enumerate(ax.steps):
            lines.append((head if i == 0 else " " * len(head)) + step)
    lines += ["",
              f"Padding: top {g.pad_top}, bottom {g.pad_bottom}, left {g.pad_left}, right {g.pad_right}"
              f"  (padded input {g.in_h + g.pad_top + g.pad_bottom}×{g.in_w + g.pad_left + g.pad_right})",
              f"Output shape (batch, H0, W0, K) = ({g.batch}, {g.out_h}, {g.out_w}, {g.filters})"]
    per = g.out_h * g.out_w
    maps = [f"{letters[f]}: O{f * per + 1}–O{(f + 1) * per}" for f in range(min(g.filters, 4))]
    if g.filters > 4:
        maps.append(f"..., {letters[-1]}: O{(g.filters - 1) * per + 1}–O{g.filters * per}")
    lines.append("  outputs by filter: " + "; ".join(maps))
    if e.groups == 1:
        lines.append(f"Weights N·N·D1·K = {g.k_h}·{g.k_w}·{g.in_c}·{g.filters} = {e.weights}, "
                     f"biases K = {e.biases}, parameters {e.params}")
    else:
        lines.append(f"Weights N·N·(D1/G)·K = {g.k_h}·{g.k_w}·{g.in_c // e.groups}·{g.filters} = "
                     f"{e.weights}, biases K = {e.biases}, parameters {e.params}")
        lines.append(f"Groups G = {e.groups}: each filter reads {g.in_c // e.groups} of the {g.in_c} "
                     f"input channels (kernel shape {g.k_h}×{g.k_w}×{g.in_c // e.groups}×{g.filters}):")
        lines += ["  " + t for t in _group_lines(g, e.groups, letters)]
    if e.equations:
        lines += ["", "Equations (" + ("channel in brackets, " if g.in_c > 1 else "")
                  + "padding terms left out, bias not shown):"]
        single = len(e.equations) <= g.filters      # --at: also say where the window sits
        for eq in e.equations:
            lines.append("  " + eq.text)
            if single:
                lines.append("      " + _window_note(g, eq))
    if e.reverse:
        lines += ["", "Reverse map (what backward-data computes): each input element collects the "
                  "gradient of every output it feeds, times the weight between them:"]
        lines += ["  " + r.text for r in e.reverse]
    if e.weight_grads:
        lines += ["", "Backward-filter (each weight collects input · output-gradient over the pairs "
                  "that meet in it):"]
        lines += ["  " + w.text for w in e.weight_grads]
    if e.locations:
        lines += ["", "Memory (x, dO: NHWC; w: HWIO) and kernels (batch element 1):"]
        for loc in e.locations:
            lines += ["  " + t for t in _location_lines(loc)]
        listed = len(e.equations) + len(e.reverse) + len(e.weight_grads)
        if listed > len(e.locations):
            lines.append(f"  (the first {len(e.locations)} of {listed}; --filter F picks one)")
    if not (e.equations or e.reverse or e.weight_grads):
        lines += ["", "Use --at ROW,COL (1-based) for one output's equation, --all for every one, "
                  "--transposed for the reverse map, --weight ROW,COL for a weight's gradient."]
    if e.arithmetic:
        lines += ["", "conv_arithmetic's relationships for these numbers (i input, k kernel, s stride, "
                  "p padding, d dilation; * = this convolution's case):"]
        same = e.arithmetic[0]["relations"] == e.arithmetic[1]["relations"] and \
            e.arithmetic[0]["transposed"] == e.arithmetic[1]["transposed"]
        for ax in e.arithmetic[:1] if same else e.arithmetic:
            lines.append(f"  {'height and width' if same else ax['axis']}: i = {ax['i']}, k = {ax['k']}, "
                         f"s = {ax['s']}, p = {ax['p_before']}"
                         + (f"+{ax['p_after']}" if ax['p_after'] != ax['p_before'] else "") + f", d = {ax['d']}")
            for r in ax["relations"]:
                lines.append(f"    {'*' if r['this'] else ' '} {r['name'] + ':':<34} {r['text']}")
            lines.append("      " + ax["transposed"]["text"])
    if g.batch > 1 and (e.equations or e.reverse):
        lines.append(f"(the same for each of the {g.batch} images in the batch)")
    if e.picture:
        lines += ["", f"Picture written to {e.picture}"]
    return "\n".join(lines)


def _group_lines(g: ConvGeometry, groups: int, letters) -> List[str]:
    per_f = g.filters // groups
    out = []
    for q in range(groups):
        fs = letters[q * per_f:(q + 1) * per_f]
        chans = group_channels(g, q * per_f)
        names = ", ".join(fs) if len(fs) <= 4 else f"{fs[0]}..{fs[-1]}"
        out.append(f"group {q + 1}: filter{'s' if len(fs) > 1 else ''} {names} read channel"
                   + (f"s c{chans.start + 1}–c{chans.stop}" if len(chans) > 1 else f" c{chans.start + 1}"))
        if q == 3 and groups > 5:
            out.append(f"... ({groups} groups)")
            break
    return out


def _location_lines(loc: dict) -> List[str]:
    if loc["kind"] == "output":
        from .locate import VARIANT_LABELS
        cu, cpu = loc["cuda"], loc["cpu"]

        def thr(v):
            t = f"block {tuple(v['block'])}, thread {tuple(v['thread'])}"
            if v["register"]:
                t += f", acc[{v['register'][0]}][{v['register'][1]}]"
            return t + (f" ({v['note']})" if v["note"] else "")
        lines = [f"{loc['name']}: y offset {loc['y_offset']}, im2col row {loc['im2col_row']}"]
        for t in loc["terms"]:
            lines.append(f"  {t['label']}: x offset {t['x_offset']}, w offset {t['w_offset']}, "
                         f"im2col column {t['im2col_col']}")
        for kset, name in (("numba", "Numba CUDA"), ("cpp", "C++ CUDA")):
            lines.append(f"  {name}: " + "; ".join(f"{VARIANT_LABELS[kset][v]} {thr(cu[kset][v])}"
                                                    for v in ("v1", "v2", "v3")))
        lines.append(f"  C++ CPU {VARIANT_LABELS['cpp_cpu']}: row item {cpu['row_item']}, panel {cpu['panel']}, pixel tile "
                     f"{cpu['tile']} (columns {cpu['tile_pixels'][0] + 1}..{cpu['tile_pixels'][1]}, "
                     f"{cpu['tile_shape'][0]}×{cpu['tile_shape'][1]} zmm), register row "
                     f"{cpu['register_row']}, zmm {cpu['zmm']}, lane {cpu['lane']}"
                     + (f" ({cpu['note']})" if cpu["note"] else ""))
        return lines
    names = {"x_offset": "x offset", "w_offset": "w offset", "dy_offset": "dO offset"}
    key = "x_offset" if loc["kind"] == "input" else "w_offset"
    lines = [f"{loc['name']}: {names[key]} {loc[key]}"]
    for t in loc["terms"]:
        lines.append("  " + t["label"] + ": " + ", ".join(f"{names[k]} {t[k]}" for k in names if k in t))
    return lines


def _window_note(g: ConvGeometry, eq: Equation) -> str:
    """Where the window of ``eq`` sits, in 1-based input rows/columns (0 and below: padding)."""
    def span(first, k, d, unit):
        return f"{unit} {first}..{first + (k - 1) * d}" + (f" every {d}" if d > 1 else "")

    r0 = (eq.row - 1) * g.stride_h - g.pad_top + 1
    c0 = (eq.col - 1) * g.stride_w - g.pad_left + 1
    missing = eq.taps - len(eq.terms)
    where = (f"window on input {span(r0, g.k_h, g.dil_h, 'rows')}, {span(c0, g.k_w, g.dil_w, 'columns')}"
             + (f" (rows outside 1..{g.in_h}, columns outside 1..{g.in_w} are padding)" if missing else ""))
    return (f"(filter {eq.filter}, output row {eq.row}, column {eq.col}: {where}; "
            f"{len(eq.terms)} of {eq.taps} terms" + (f", {missing} in the padding)" if missing else ")"))


def _padding_text(g: ConvGeometry, mode: str) -> str:
    if mode in ("valid", "same"):
        return mode
    if g.pad_top == g.pad_bottom == g.pad_left == g.pad_right:
        return str(g.pad_top)
    return f"T,B,L,R = {g.pad_top},{g.pad_bottom},{g.pad_left},{g.pad_right}"


# ----------------------------------------------------------------------------- picture
def draw_picture(g: ConvGeometry, path: str, f: int = 0, output_at: Optional[Tuple[int, int]] = None,
                 input_at: Optional[Tuple[int, int]] = None) -> str:
    """Draw the padded input (padding shaded), the weights of filter ``f`` and its output grid
    into a PNG at ``path``; highlight the window of ``output_at`` (0-based), or with ``input_at``
    the outputs that input feeds.  Channel 1 only when C > 1.  Returns ``path``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    hp, wp = g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right
    letter = filter_letter(f)
    per = g.out_h * g.out_w
    pad_c, in_c, hit_c, w_c, out_c = "#cfcfcf", "#ffffff", "#ffb347", "#cfe3ff", "#ffffff"

    if input_at is None:
        oh, ow = output_at if output_at is not None else (0, 0)
        eq = _forward(g, f, oh, ow)
        hot_in = {(t.row - 1, t.col - 1) for t in eq.terms}
        hot_w = {(t.kh, t.kw) for t in eq.terms}
        hot_out = {(oh, ow)}
        title = f"{eq.text.split(' = ')[0]} = " + (" + ".join(t.label for t in eq.terms if t.channel == 1)
                                                    or "0")
    else:
        rev = _reverse(g, 0, input_at[0], input_at[1], [f])
        hot_in = {input_at}
        hot_w = {((t.weight - 1) // g.k_w, (t.weight - 1) % g.k_w) for t in rev.terms}
        hot_out = {(t.row - 1, t.col - 1) for t in rev.terms}
        title = rev.text
    if len(title) > 110:
        title = title[:107] + "..."

    cell = 0.42
    width = max(6.0, min(22.0, cell * (wp + g.k_w + g.out_w) + 2.5))
    height = max(3.2, min(14.0, cell * max(hp, g.k_h, g.out_h) + 1.8))
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=[wp, g.k_w, g.out_w], wspace=0.25)

    def panel(ax, rows, cols, color, label, name):
        """One grid as ONE image (imshow of an RGB array: a 400x400 grid costs what a 4x4 one
        does), cell borders as two line collections while they stay visible, labels only
        for small grids."""
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=10)
        rgb = np.empty((rows, cols, 3))
        rgb[...] = to_rgb(color(None, None))
        for (r, c), col in color.cells(rows, cols):
            rgb[r, c] = to_rgb(col)
        ax.imshow(rgb, extent=(0, cols, rows, 0), interpolation="nearest", aspect="equal")
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        if max(rows, cols) <= PICTURE_MAX_GRID_LINES:
            ax.hlines(np.arange(rows + 1), 0, cols, colors="#555555", lw=0.6)
            ax.vlines(np.arange(cols + 1), 0, rows, colors="#555555", lw=0.6)
        if max(rows, cols) <= PICTURE_MAX_LABELLED:
            where = [(r, c) for r in range(rows) for c in range(cols)]
        else:
            where = sorted(rc for rc, col in color.cells(rows, cols) if col == hit_c)
        size = max(5, 10 - min(max(rows, cols), PICTURE_MAX_LABELLED) // 4)
        for r, c in where:
            text = label(r, c)
            if text:
                ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=size)

    ax_in = fig.add_subplot(grid[0])

    def in_color(r, c):
        return in_c

    def in_cells(rows, cols):     # padding bands, then the input elements the window reads
        for r in range(rows):
            if not 0 <= r - g.pad_top < g.in_h:
                yield from (((r, c), pad_c) for c in range(cols))
            else:
                yield from (((r, c), pad_c) for c in (*range(g.pad_left), *range(g.pad_left + g.in_w, cols)))
        yield from (((ih + g.pad_top, iw + g.pad_left), hit_c) for ih, iw in hot_in
                    if 0 <= ih < g.in_h and 0 <= iw < g.in_w)
    in_color.cells = in_cells

    def in_label(r, c):
        ih, iw = r - g.pad_top, c - g.pad_left
        return f"I{ih * g.in_w + iw + 1}" if 0 <= ih < g.in_h and 0 <= iw < g.in_w else ""

    panel(ax_in, hp, wp, in_color, in_label,
          "padded input (padding shaded)" + (f", channel 1 of {g.in_c}" if g.in_c > 1 else ""))
    if input_at is None:   # outline the window of the chosen output in the padded grid
        oh, ow = output_at if output_at is not None else (0, 0)
        ax_in.add_patch(Rectangle((ow * g.stride_w, oh * g.stride_h), g.k_w_eff, g.k_h_eff,
                                  fill=False, edgecolor="#d62728", lw=2.2))

    def highlighted(base, hot):
        def color(r, c):
            return base
        color.cells = lambda rows, cols: (((r, c), hit_c) for r, c in hot if r < rows and c < cols)
        return color

    ax_w = fig.add_subplot(grid[1])
    panel(ax_w, g.k_h, g.k_w, highlighted(w_c, hot_w),
          lambda r, c: f"{letter}{r * g.k_w + c + 1}", f"weights {letter}")
    ax_out = fig.add_subplot(grid[2])
    panel(ax_out, g.out_h, g.out_w, highlighted(out_c, hot_out),
          lambda r, c: f"O{f * per + r * g.out_w + c + 1}", f"output of filter {letter}")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")
    return path


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
