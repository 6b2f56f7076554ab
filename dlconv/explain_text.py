"""The text ``dlconv explain`` prints (:meth:`dlconv.explain.Explanation.text`): sizes step by step,
padding, shapes and parameter counts, the equations, reverse map and weight gradients, their
memory / kernel locations, and conv_arithmetic's relationships.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from .explain_maps import Equation, group_channels
from .shapes import ConvGeometry

if TYPE_CHECKING:  # the record it formats; dlconv.explain imports this module
    from .explain import Explanation


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
