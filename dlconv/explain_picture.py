"""``dlconv explain --picture FILE.png``: the padded input (padding shaded), the window of one
output (or the outputs one input feeds), the weights and the output grid, drawn with matplotlib's
Agg canvas (imported only here, only when a picture is drawn).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Tuple

from .explain_maps import _forward, _reverse, filter_letter
from .shapes import ConvGeometry

#: Grids wider or taller than this label only their highlighted cells (the window, its
#: weights, the output): each label is a text object (~2 ms to lay out on a loaded 2-core VM),
#: and a 24x24 grid of them took 2.5 s; up to 12 per side the whole picture takes ~0.3 s.
PICTURE_MAX_LABELLED = 12
#: ... and without cell borders (lines closer than ~4 pixels merge into grey).
PICTURE_MAX_GRID_LINES = 128
#: The largest padded grid --picture draws (each panel is one image, so time is no issue;
#: past this a cell is under one pixel and the picture shows nothing).
PICTURE_MAX_SIDE = 2048


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
