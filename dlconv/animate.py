"""``dlconv explain --animate FILE.gif``: the sliding window, frame by frame (teaching).

Forward (the default): the padded input (padding shaded) with the window of one output per
frame, in row-major output order, and the output grid with that output marked: ``out_h·out_w``
frames.

``--transposed``: the transposed convolution (what backward-data computes) drawn the way
vdumoulin/conv_arithmetic draws it, as a *direct* convolution with stride 1 over the forward
output ``dO`` with ``S - 1`` zeros inserted between its elements, padded by

    before  P' = N_eff - 1 - P_before
    after   N_eff - 1 - P_after + a,    a = (W1 + P_before + P_after - N_eff) mod S

(``a`` is the odd case's extra row/column: forward input rows past the last window, which
receive only zeros), and the kernel flipped.  One frame per element of ``dI``: ``in_h·in_w``
frames.  The cells of the window that hold a real ``dO`` element are exactly the outputs of
``dlconv.explain``'s reverse map (``dI = Σ w·dO``) for that input element: window row ``t`` of
frame ``ih`` sits on padded row ``ih + t·D``, the ``dO`` row ``(ih + t·D - P') / S`` when that
divides, i.e. ``oh = (ih + P_before - (N - 1 - t)·D) / S``, the index map of
``dlconv.explain._reverse`` with the tap ``kh = N - 1 - t`` (the flip).

Every size and pad comes from the :class:`~dlconv.shapes.ConvGeometry` (``dlconv.shapes``);
which cells light up comes from :mod:`dlconv.explain`'s own maps (``_forward`` / ``_reverse``),
so the picture and the equations cannot disagree.  Channel 1 and one filter are drawn (the
index map does not depend on either).  Drawn with Pillow (matplotlib's own image
dependency), written with Pillow's GIF writer.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

from .explain import _forward, _reverse, filter_letter
from .shapes import ConvGeometry

__all__ = ["animate", "frames", "transposed_grid", "describe", "Frame", "Layout", "COLORS",
           "MAX_FRAMES", "MAX_SIDE"]

#: The most frames a GIF gets (one per output, or per input with --transposed): at 0.5 s a
#: frame, 400 frames are over three minutes of animation, past what anyone watches.
MAX_FRAMES = 400
#: The largest grid side drawn (cells): beyond it a cell is a few pixels at a readable size.
MAX_SIDE = 64
#: Cell size in pixels for grids up to :data:`LABEL_MAX_SIDE`, then shrinking to fit.
CELL_PX = 30
#: Grids larger than this are drawn without element labels (they would not fit the cells).
LABEL_MAX_SIDE = 12
#: Space between panels, and the title band's height, in pixels.
GAP_PX = 24
TITLE_PX = 40
#: The longest title (an equation) written on a frame, in characters.
TITLE_MAX = 110

#: RGB colours of the cells (the test reads them back from the frames).
COLORS = {
    "background": (255, 255, 255),
    "padding": (207, 207, 207),        # the zero padding around the input
    "inserted": (232, 232, 244),       # --transposed: the S - 1 zeros inserted between dO
    "element": (255, 255, 255),        # an input (or dO) element
    "window": (255, 224, 178),         # the window over padding / inserted zeros
    "hit": (255, 179, 71),             # the window over an element: a term of the sum
    "output": (255, 255, 255),
    "current": (255, 179, 71),         # the output this frame computes
    "grid": (85, 85, 85),
    "outline": (214, 39, 40),
    "text": (0, 0, 0),
}


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame: ``at`` the 0-based position computed (output, or input with transposed),
    ``window`` the padded-grid cells under the window, ``hits`` those holding an element (the
    terms), ``title`` the equation (explain's text)."""

    at: Tuple[int, int]
    window: Tuple[Tuple[int, int], ...]
    hits: Tuple[Tuple[int, int], ...]
    title: str


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the two panels lie in every frame: ``cell`` pixels a side; the left panel (the
    padded, with --transposed zero-inserted, grid) of ``grid_rows``×``grid_cols`` at
    ``grid_origin``; the right one (the result) of ``out_rows``×``out_cols`` at ``out_origin``."""

    cell: int
    grid_origin: Tuple[int, int]
    grid_rows: int
    grid_cols: int
    out_origin: Tuple[int, int]
    out_rows: int
    out_cols: int
    size: Tuple[int, int]

    def grid_cell(self, r: int, c: int) -> Tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) of cell (r, c) of the left panel."""
        x, y = self.grid_origin
        return (x + c * self.cell, y + r * self.cell, x + (c + 1) * self.cell, y + (r + 1) * self.cell)

    def out_cell(self, r: int, c: int) -> Tuple[int, int, int, int]:
        x, y = self.out_origin
        return (x + c * self.cell, y + r * self.cell, x + (c + 1) * self.cell, y + (r + 1) * self.cell)


# ----------------------------------------------------------------------------- the grids
def _axis(in_size, out_size, k, s, d, before, after):
    """Forward: (padded size, offset of element 0).  Transposed: (padded zero-inserted size,
    P', a) of one axis."""
    k_eff = (k - 1) * d + 1
    a = (in_size + before + after - k_eff) % s
    p_t = k_eff - 1 - before
    size = p_t + (out_size - 1) * s + 1 + (k_eff - 1 - after + a)
    return size, p_t, a


def transposed_grid(g: ConvGeometry):
    """(rows, cols, (P'_top, P'_left), (a_h, a_w)) of the zero-inserted, padded dO grid."""
    rh, pt, ah = _axis(g.in_h, g.out_h, g.k_h, g.stride_h, g.dil_h, g.pad_top, g.pad_bottom)
    rw, pl, aw = _axis(g.in_w, g.out_w, g.k_w, g.stride_w, g.dil_w, g.pad_left, g.pad_right)
    return rh, rw, (pt, pl), (ah, aw)


def frames(g: ConvGeometry, transposed: bool = False, filter: int = 0) -> List[Frame]:
    """The frames' contents (no drawing), from :mod:`dlconv.explain`'s maps."""
    out: List[Frame] = []
    if not transposed:
        for oh in range(g.out_h):
            for ow in range(g.out_w):
                eq = _forward(g, filter, oh, ow)
                window = tuple((oh * g.stride_h + t * g.dil_h, ow * g.stride_w + u * g.dil_w)
                               for t in range(g.k_h) for u in range(g.k_w))
                hits = tuple(sorted({(t.row - 1 + g.pad_top, t.col - 1 + g.pad_left)
                                     for t in eq.terms if t.channel == 1}))
                title = eq.text.split(" = ")[0] + " = " + (
                    " + ".join(t.label for t in eq.terms if t.channel == 1) or "0")
                out.append(Frame((oh, ow), window, hits, title))
        return out
    _, _, (pt, pl), _ = transposed_grid(g)
    for ih in range(g.in_h):
        for iw in range(g.in_w):
            rev = _reverse(g, 0, ih, iw, [filter])
            window = tuple((ih + t * g.dil_h, iw + u * g.dil_w)
                           for t in range(g.k_h) for u in range(g.k_w))
            hits = tuple(sorted({(pt + (t.row - 1) * g.stride_h, pl + (t.col - 1) * g.stride_w)
                                 for t in rev.terms}))
            out.append(Frame((ih, iw), window, hits, rev.text))
    return out


def _layout(g: ConvGeometry, transposed: bool) -> Layout:
    if transposed:
        rows, cols, _, _ = transposed_grid(g)
        o_rows, o_cols = g.in_h, g.in_w
    else:
        rows, cols = g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right
        o_rows, o_cols = g.out_h, g.out_w
    side = max(rows, cols, o_rows, o_cols)
    if side > MAX_SIDE:
        raise ValueError(f"--animate draws every cell: at most {MAX_SIDE} a side, but the grid is "
                         f"{rows}x{cols} (result {o_rows}x{o_cols}); animate a smaller input (the "
                         "window moves the same way on any size)")
    cell = CELL_PX if side <= LABEL_MAX_SIDE else max(8, CELL_PX * LABEL_MAX_SIDE // side)
    grid_origin = (GAP_PX, TITLE_PX)
    out_origin = (GAP_PX * 2 + cols * cell, TITLE_PX)
    width = out_origin[0] + o_cols * cell + GAP_PX
    height = TITLE_PX + max(rows, o_rows) * cell + GAP_PX
    return Layout(cell, grid_origin, rows, cols, out_origin, o_rows, o_cols, (max(width, 480), height))


# ----------------------------------------------------------------------------- drawing
def _base_colors(g: ConvGeometry, transposed: bool, lay: Layout):
    """Colour of each left-panel cell before the window is drawn."""
    colors = {}
    if transposed:
        _, _, (pt, pl), _ = transposed_grid(g)
        for r in range(lay.grid_rows):
            for c in range(lay.grid_cols):
                zr, zc = r - pt, c - pl
                inside = 0 <= zr <= (g.out_h - 1) * g.stride_h and 0 <= zc <= (g.out_w - 1) * g.stride_w
                if not inside:
                    colors[r, c] = COLORS["padding"]
                elif zr % g.stride_h or zc % g.stride_w:
                    colors[r, c] = COLORS["inserted"]
                else:
                    colors[r, c] = COLORS["element"]
    else:
        for r in range(lay.grid_rows):
            for c in range(lay.grid_cols):
                ih, iw = r - g.pad_top, c - g.pad_left
                inside = 0 <= ih < g.in_h and 0 <= iw < g.in_w
                colors[r, c] = COLORS["element"] if inside else COLORS["padding"]
    return colors


def _grid_label(g: ConvGeometry, transposed: bool, r: int, c: int, filter: int) -> str:
    if transposed:
        _, _, (pt, pl), _ = transposed_grid(g)
        zr, zc = r - pt, c - pl
        if zr < 0 or zc < 0 or zr % g.stride_h or zc % g.stride_w:
            return ""
        oh, ow = zr // g.stride_h, zc // g.stride_w
        if oh >= g.out_h or ow >= g.out_w:
            return ""
        return f"dO{filter * g.out_h * g.out_w + oh * g.out_w + ow + 1}"
    ih, iw = r - g.pad_top, c - g.pad_left
    return f"I{ih * g.in_w + iw + 1}" if 0 <= ih < g.in_h and 0 <= iw < g.in_w else ""


def _draw_frame(g, transposed, lay: Layout, base, frame: Frame, filter: int, font):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", lay.size, COLORS["background"])
    draw = ImageDraw.Draw(img)
    window, hits = set(frame.window), set(frame.hits)
    labels = max(lay.grid_rows, lay.grid_cols, lay.out_rows, lay.out_cols) <= LABEL_MAX_SIDE
    for (r, c), color in base.items():
        if (r, c) in hits:
            color = COLORS["hit"]
        elif (r, c) in window:
            color = COLORS["window"]
        draw.rectangle(lay.grid_cell(r, c), fill=color, outline=COLORS["grid"])
        text = _grid_label(g, transposed, r, c, filter) if labels else ""
        if text:
            _centered(draw, lay.grid_cell(r, c), text, font)
    per = g.out_h * g.out_w
    for r in range(lay.out_rows):
        for c in range(lay.out_cols):
            color = COLORS["current"] if (r, c) == frame.at else COLORS["output"]
            draw.rectangle(lay.out_cell(r, c), fill=color, outline=COLORS["grid"])
            if labels:
                text = f"dI{r * g.in_w + c + 1}" if transposed else f"O{filter * per + r * g.out_w + c + 1}"
                _centered(draw, lay.out_cell(r, c), text, font)
    # the window's outline: the span of its taps (dilated taps leave cells between them)
    rs = [r for r, _ in frame.window]
    cs = [c for _, c in frame.window]
    x0, y0, _, _ = lay.grid_cell(min(rs), min(cs))
    _, _, x1, y1 = lay.grid_cell(max(rs), max(cs))
    draw.rectangle((x0, y0, x1, y1), outline=COLORS["outline"], width=2)
    title = frame.title.replace("·", "*").replace("−", "-")   # Pillow's default font: ASCII
    title = title if len(title) <= TITLE_MAX else title[:TITLE_MAX - 3] + "..."
    draw.text((GAP_PX, 6), title, fill=COLORS["text"], font=font)
    caption = ("transposed: dO with zeros inserted, padded; flipped kernel, stride 1"
               if transposed else "padded input (padding shaded), window of the output marked")
    draw.text((GAP_PX, 22), caption, fill=COLORS["text"], font=font)
    return img


def _centered(draw, box, text, font):
    x0, y0, x1, y1 = box
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((x0 + x1 - (right - left)) / 2, (y0 + y1 - (bottom - top)) / 2 - top), text,
              fill=COLORS["text"], font=font)


def animate(g: ConvGeometry, path: str, transposed: bool = False, filter: int = 0,
            frame_ms: int = 600) -> Tuple[List[Frame], Layout]:
    """Write the animation of ``g`` to the GIF ``path`` (see the module docstring); returns the
    frames' contents and the layout (where each cell is drawn).  ValueError for a grid or a
    frame count past :data:`MAX_SIDE` / :data:`MAX_FRAMES`, or a filter out of range."""
    from PIL import ImageFont

    if not isinstance(g, ConvGeometry):
        raise TypeError(f"g must be a dlconv.shapes.ConvGeometry, got {type(g).__name__}")
    if not 0 <= filter < g.filters:
        raise ValueError(f"filter must be in 0..{g.filters - 1} (A..{filter_letter(g.filters - 1)}), "
                         f"got {filter}")
    count = g.in_h * g.in_w if transposed else g.out_h * g.out_w
    if count > MAX_FRAMES:
        raise ValueError(f"--animate would draw {count} frames (one per {'input' if transposed else 'output'} "
                         f"element), more than {MAX_FRAMES}; animate a smaller input")
    lay = _layout(g, transposed)
    content = frames(g, transposed, filter)
    font = ImageFont.load_default()
    base = _base_colors(g, transposed, lay)
    images = [_draw_frame(g, transposed, lay, base, f, filter, font) for f in content]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms,
                   loop=0, optimize=False)
    return content, lay


def describe(g: ConvGeometry, path: str, transposed: bool, count: int) -> str:
    """The line ``dlconv explain --animate`` prints after writing the GIF."""
    if not transposed:
        return f"Animation written to {path}: {count} frames, the window of each output in turn"
    _, _, (pt, pl), (ah, aw) = transposed_grid(g)
    return (f"Animation written to {path}: {count} frames, the transposed convolution as a direct one: "
            f"dO {g.out_h}×{g.out_w} with {g.stride_h - 1}×{g.stride_w - 1} zeros inserted, padded "
            f"{pt} top, {pl} left and, with the odd case's a = ({ah}, {aw}), "
            f"{g.k_h_eff - 1 - g.pad_bottom + ah} bottom, {g.k_w_eff - 1 - g.pad_right + aw} right; "
            f"flipped kernel, stride 1")

