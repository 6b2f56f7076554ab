"""``dlconv explain --html FILE.html``: one self-contained interactive page (no network).

The page holds the padded input, weights and output grids in the workshop's notation;
clicking (or hovering) an output shows its window, weights and equation, an input every
output it feeds (dI = Σ w·dO), a weight its backward-filter sum (dW = Σ I·dO); a slider and
play/pause step the window output by output; the geometry controls (input, channels, kernel,
filters, stride, padding valid/same/explicit, dilation, groups) recompute everything in the
page; the chosen term's NHWC/HWIO offsets, im2col row/column, CUDA block/thread of each
variant and C++ CPU register tile; conv_arithmetic's relationships; Keras and PyTorch code.

The script (``explain_page.js``, next to this file) mirrors dlconv.shapes, dlconv.explain and
dlconv.locate function by function and is inlined with the style sheet and the kernels'
launch constants (:data:`dlconv.locate.KERNEL_CONSTANTS`), so the file opens anywhere,
offline.  tests/test_explain_html.py checks the page against ``dlconv.explain`` in Chromium.
"""

from __future__ import annotations

import html
import json
import os
import pathlib

from .locate import KERNEL_CONSTANTS, VARIANT_LABELS
from .shapes import ConvGeometry

__all__ = ["page", "write_page", "check_path", "initial_config"]

_HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = _HERE / "explain_page.js"
STYLE = _HERE / "explain_page.css"

_BODY = """
<h1>dlconv explain: one convolution, every index</h1>
<p class="note">Notation: filters A, B, …; I1, I2, … one channel's input numbered from 1 row by row;
B1, B2, … filter B's weights; O1, O2, … outputs, numbered on across filters; with C &gt; 1 the channel in
brackets (I5[c2]); padding cells are 0 and left out of the sums.  Click (or hover) an output, an input or a
weight.  Generated for: <b>{title}</b>.</p>
<form id="controls" onsubmit="return false">
 <fieldset><legend>input H×W×C</legend><input id="in-h" type="number" min="1"> <input id="in-w" type="number" min="1">
  <input id="in-c" type="number" min="1"></fieldset>
 <fieldset><legend>kernel</legend><input id="k-h" type="number" min="1"> <input id="k-w" type="number" min="1"></fieldset>
 <fieldset><legend>filters</legend><input id="filters" type="number" min="1"></fieldset>
 <fieldset><legend>stride</legend><input id="s-h" type="number" min="1"> <input id="s-w" type="number" min="1"></fieldset>
 <fieldset><legend>padding</legend><select id="padding"><option value="valid">valid</option><option value="same">same</option>
  <option value="explicit">explicit T,B,L,R</option></select>
  <input id="p-t" class="explicit" type="number" min="0"> <input id="p-b" class="explicit" type="number" min="0">
  <input id="p-l" class="explicit" type="number" min="0"> <input id="p-r" class="explicit" type="number" min="0"></fieldset>
 <fieldset><legend>dilation</legend><input id="d-h" type="number" min="1"> <input id="d-w" type="number" min="1"></fieldset>
 <fieldset><legend>groups</legend><input id="groups" type="number" min="1"></fieldset>
</form>
<p id="error" class="error"></p>
<p id="summary"></p>
<div id="pickers"><select id="filter-pick"></select> <select id="channel-pick"></select>
 step <input id="step" type="range" min="0" value="0"> <button id="play" type="button">play</button></div>
<div id="grids"><div id="grid-input" class="grid"></div><div id="grid-weights" class="grid"></div>
 <div id="grid-output" class="grid"></div></div>
<p id="equation-kind" class="note"></p>
<pre id="equation"></pre>
<h2>Where it lives: memory, im2col, kernel threads</h2>
<div id="details"></div>
<h2>conv_arithmetic's relationships for these numbers</h2>
<div id="arithmetic"></div>
<h2>The same layer in Keras and PyTorch</h2>
<p id="shapes"></p>
<div id="code"><pre id="code-keras"></pre><pre id="code-torch"></pre></div>
"""


def initial_config(g: ConvGeometry, padding: str = "explicit") -> dict:
    """The page's control values for ``g`` (``padding``: "valid", "same" or "explicit")."""
    return {"h": g.in_h, "w": g.in_w, "c": g.in_c, "kh": g.k_h, "kw": g.k_w, "filters": g.filters,
            "sh": g.stride_h, "sw": g.stride_w,
            "padding": padding if padding in ("valid", "same") else "explicit",
            "pads": [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right],
            "dh": g.dil_h, "dw": g.dil_w, "groups": getattr(g, "groups", 1)}


def page(g: ConvGeometry, padding: str = "explicit") -> str:
    """The page's HTML for geometry ``g`` (one string; no external resource)."""
    cfg = initial_config(g, padding)
    title = (f"input {g.in_h}×{g.in_w}×{g.in_c}, kernel {g.k_h}×{g.k_w}, {g.filters} filter(s), "
             f"stride {g.stride_h}×{g.stride_w}, padding {cfg['padding']} "
             f"({g.pad_top},{g.pad_bottom},{g.pad_left},{g.pad_right}), dilation {g.dil_h}×{g.dil_w}, "
             f"groups {cfg['groups']}")
    # JSON inside <script>: "</" cannot occur in these numbers and names, but escape it anyway.
    data = (f"const KERNEL_CONSTANTS = {json.dumps(KERNEL_CONSTANTS)};\n"
            f"const VARIANT_LABELS = {json.dumps(VARIANT_LABELS)};\n"
            f"const INITIAL = {json.dumps(cfg)};\n").replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<title>dlconv explain: {html.escape(title)}</title>\n"
            f"<style>\n{STYLE.read_text(encoding='utf-8')}</style>\n</head><body>\n"
            + _BODY.replace("{title}", html.escape(title))
            + f"<script>\n{data}{SCRIPT.read_text(encoding='utf-8')}</script>\n</body></html>\n")


def check_path(path) -> pathlib.Path:
    """ValueError naming ``--html`` when the page's folder is missing or not writable."""
    target = pathlib.Path(path).expanduser()
    folder = target.resolve().parent
    if not folder.is_dir():
        raise ValueError(f"--html {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--html {path}: folder {folder} is not writable")
    return target


def write_page(g: ConvGeometry, path, padding: str = "explicit") -> str:
    """Write :func:`page` to ``path`` (UTF-8); returns the path (see :func:`check_path`)."""
    target = check_path(path)
    target.write_text(page(g, padding), encoding="utf-8")
    return str(path)
