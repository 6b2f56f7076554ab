"""Argument parsing and size checks of :func:`dlconv.explain.explain` (and its CLI): sizes as
``"5x5"`` / ``"28x28x1"`` / tuples, padding in every form ``dlconv explain`` takes, 1-based
positions, the geometry record, and the refusal of listings too large to print.
"""

from __future__ import annotations

import numbers
from typing import Sequence, Tuple

from .explain_maps import filter_letter, group_channels
from .shapes import ConvGeometry, conv_geometry


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


def _check_size(terms: int, flag: str, limit: int) -> None:
    if terms > limit:
        how = ("--filter F (one filter), or fewer channels" if flag == "--at" else
               "--at ROW,COL (one position) or --filter F (one filter), or explain a smaller input")
        raise ValueError(f"{flag} would list {terms:,} terms, more than the {limit:,} explain prints "
                         f"in a few seconds; get the part wanted with {how}")
