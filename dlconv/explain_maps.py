"""The index maps of ``dlconv explain`` (:mod:`dlconv.explain`): the workshop's notation (filter
letters, channel suffixes), the records of one output's equation (forward), one input's reverse
map (backward-data) and one weight's gradient sum (backward-filter), the functions that build
them from a :class:`~dlconv.shapes.ConvGeometry`, and the memory / kernel locations of the
chosen ones (:mod:`dlconv.locate`).

The index map is the one the kernels use: ``ih = oh*stride_h - pad_top + kh*dil_h`` (0-based).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence, Tuple

from .shapes import ConvGeometry

#: --at / --weight locate (offsets, threads, tiles) at most this many of their equations: one
#: per filter (or channel) repeats the same arithmetic; --filter F picks the one wanted.
MAX_LOCATED = 8


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
