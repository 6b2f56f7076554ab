"""``dlconv explain --animate``: the GIF's frame count, and the cells its frames highlight, read
back from the pixels, equal dlconv.explain's maps (forward equations; the reverse map for
--transposed, with the zero insertion and the odd case's extra row/column a)."""

import numpy as np
import pytest
from PIL import Image

from dlconv import animate as an
from dlconv import cli
from dlconv.explain import _forward, _reverse
from dlconv.shapes import conv_geometry

#: (input HxW, kernel, stride, padding, dilation): conv_arithmetic's cases and a few more
CASES = [
    ((5, 5), 3, 2, 1, 1),            # strides with padding (a = 0)
    ((6, 6), 3, 2, 1, 1),            # the odd case: a = (6 + 2 - 3) mod 2 = 1
    ((5, 6), (3, 2), (2, 3), ((1, 0), (0, 1)), 1),   # asymmetric pads, ragged
    ((6, 5), 2, 1, "same", 2),       # dilation, "same" with an odd total
    ((4, 4), 3, 1, 3, 1),            # pad beyond N - 1: the transposed direct form crops dO
]


def _read(path):
    im = Image.open(path)
    out = []
    for i in range(im.n_frames):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB"), dtype=np.int32))
    return out


def _name(rgb):
    """The COLORS entry nearest to a pixel (the GIF palette may move a colour slightly)."""
    names = [n for n in an.COLORS if n not in ("text", "grid", "outline", "output", "current",
                                               "background")]
    dist = {n: sum((int(a) - b) ** 2 for a, b in zip(rgb, an.COLORS[n])) for n in names}
    return min(dist, key=dist.get)


def _cells(frame, lay, which, rows, cols):
    """{(r, c): colour name} of a panel, read 4 pixels inside each cell's top-left corner
    (away from the label and the borders)."""
    box = lay.grid_cell if which == "grid" else lay.out_cell
    return {(r, c): _name(frame[box(r, c)[1] + 4, box(r, c)[0] + 4]) for r in range(rows)
            for c in range(cols)}


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "transposed"])
def test_frames_count_and_highlighted_cells_match_explain(case, transposed, tmp_path):
    (h, w), k, s, p, d = case
    k = k if isinstance(k, tuple) else (k, k)
    g = conv_geometry((1, h, w, 1), k + (1, 2), s, p, d)
    path = tmp_path / "a.gif"
    content, lay = an.animate(g, str(path), transposed=transposed, filter=1)
    pix = _read(path)
    assert len(pix) == len(content) == (g.in_h * g.in_w if transposed else g.out_h * g.out_w)
    assert pix[0].shape[:2] == (lay.size[1], lay.size[0])
    if transposed:
        rows, cols, (pt, pl), (ah, aw) = an.transposed_grid(g)
        assert (ah, aw) == ((g.in_h + g.pad_top + g.pad_bottom - g.k_h_eff) % g.stride_h,
                            (g.in_w + g.pad_left + g.pad_right - g.k_w_eff) % g.stride_w)
        assert (rows, cols) == (g.in_h + g.k_h_eff - 1, g.in_w + g.k_w_eff - 1)
    for i in sorted({0, len(pix) // 2, len(pix) - 1, 3 % len(pix)}):
        at = content[i].at
        if transposed:
            rev = _reverse(g, 0, at[0], at[1], [1])
            expected = {(pt + (t.row - 1) * g.stride_h, pl + (t.col - 1) * g.stride_w) for t in rev.terms}
        else:
            eq = _forward(g, 1, at[0], at[1])
            expected = {(t.row - 1 + g.pad_top, t.col - 1 + g.pad_left) for t in eq.terms}
        seen = _cells(pix[i], lay, "grid", lay.grid_rows, lay.grid_cols)
        assert {rc for rc, n in seen.items() if n == "hit"} == expected, (i, at)
        window = set(content[i].window)
        assert {rc for rc, n in seen.items() if n in ("hit", "window")} == window
        if transposed:   # the zeros inserted between dO elements, and the padding, are drawn as such
            for (r, c), n in seen.items():
                if (r, c) in window:
                    continue
                zr, zc = r - pt, c - pl
                inside = 0 <= zr <= (g.out_h - 1) * g.stride_h and 0 <= zc <= (g.out_w - 1) * g.stride_w
                want = "padding" if not inside else \
                    "inserted" if zr % g.stride_h or zc % g.stride_w else "element"
                assert n == want, (r, c, n, want)
        out_box = lay.out_cell(*at)
        assert tuple(pix[i][out_box[1] + 4, out_box[0] + 4]) == pytest.approx(an.COLORS["current"], abs=8)


def test_cli_flag_and_limits(tmp_path, capsys):
    path = tmp_path / "odd.gif"
    assert cli.main(["explain", "--input", "6x6", "--kernel", "3", "--stride", "2", "--padding", "1",
                     "--transposed", "--animate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "36 frames" in out and "a = (1, 1)" in out and "2 bottom, 2 right" in out
    assert Image.open(path).n_frames == 36
    g = conv_geometry((1, 30, 30, 1), (3, 3, 1, 1))
    with pytest.raises(ValueError, match="frames"):
        an.animate(g, str(tmp_path / "big.gif"))
    with pytest.raises(ValueError, match="filter must be in 0..0"):
        an.animate(conv_geometry((1, 4, 4, 1), (3, 3, 1, 1)), str(tmp_path / "f.gif"), filter=1)
