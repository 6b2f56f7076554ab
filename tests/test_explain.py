"""``dlconv explain``: its equations against a brute-force enumeration of the convolution sum,
its reverse map against the forward one, both by value against the NumPy reference, and
the workshop's notation on hand-worked examples."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dlconv
from dlconv import cli, reference
from dlconv.explain import _padding, explain, filter_index, filter_letter
from dlconv.shapes import conv_geometry


# ----------------------------------------------------------------------------- brute force
def brute_force_terms(g):
    """{(filter, oh, ow) 0-based: [(weight#, channel#, input#), ...]} by building the padded grid
    of input numbers (0 = padding) and reading every window tap from it."""
    grid = np.zeros((g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right), int)
    grid[g.pad_top:g.pad_top + g.in_h, g.pad_left:g.pad_left + g.in_w] = \
        np.arange(1, g.in_h * g.in_w + 1).reshape(g.in_h, g.in_w)
    out = {}
    for f in range(g.filters):
        for oh in range(g.out_h):
            for ow in range(g.out_w):
                terms = []
                for kh in range(g.k_h):
                    for kw in range(g.k_w):
                        for c in range(g.in_c):
                            number = grid[oh * g.stride_h + kh * g.dil_h, ow * g.stride_w + kw * g.dil_w]
                            if number:
                                terms.append((kh * g.k_w + kw + 1, c + 1, int(number)))
                out[f, oh, ow] = sorted(terms)
    return out


@st.composite
def small_geometries(draw):
    h, w, c = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
    k_h, k_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    filters = draw(st.integers(1, 3))
    padding = draw(st.one_of(st.sampled_from(["valid", "same"]), st.integers(0, 2),
                             st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                                       st.integers(0, 3))))
    try:   # keep only geometries where at least one window fits
        conv_geometry((1, h, w, c), (k_h, k_w, c, filters), strides, _padding(padding), dilation)
    except ValueError:
        assume(False)
    return dict(input=(h, w, c), kernel=(k_h, k_w), filters=filters, stride=strides,
                padding=padding, dilation=dilation)


@settings(max_examples=300)
@given(kw=small_geometries(), seed=st.integers(0, 2**31 - 1))
def test_equations_match_brute_force_and_reference(kw, seed):
    e = explain(**kw, all_outputs=True)
    g = e.geometry
    expected = brute_force_terms(g)
    per = g.out_h * g.out_w
    assert len(e.equations) == g.filters * per
    for eq in e.equations:
        f = ord(eq.filter[-1]) - ord("A")
        oh, ow = eq.row - 1, eq.col - 1
        assert eq.output == f * per + oh * g.out_w + ow + 1          # consecutive across filters
        assert sorted((t.weight, t.channel, t.input) for t in eq.terms) == expected[f, oh, ow]
        assert eq.text.startswith(f"O{eq.output} = ")
        assert eq.text.count("·") == len(eq.terms)

    # By value: the equations, evaluated, are the convolution.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape)
    w = rng.standard_normal(g.w_shape)
    y = np.zeros(g.y_shape)
    for eq in e.equations:
        f = ord(eq.filter[-1]) - ord("A")
        for t in eq.terms:
            kh, kw_ = divmod(t.weight - 1, g.k_w)
            ih, iw = divmod(t.input - 1, g.in_w)
            assert (kh, kw_, ih + 1, iw + 1) == (t.kh, t.kw, t.row, t.col)
            y[0, eq.row - 1, eq.col - 1, f] += w[kh, kw_, t.channel - 1, f] * x[0, ih, iw, t.channel - 1]
    np.testing.assert_allclose(y, reference.conv2d_forward(x, w, None, g), rtol=1e-5, atol=1e-5)


@settings(max_examples=250)
@given(kw=small_geometries(), seed=st.integers(0, 2**31 - 1))
def test_reverse_map_is_the_forward_map_inverted(kw, seed):
    fwd = explain(**kw, all_outputs=True)
    rev = explain(**kw, transposed=True)
    g = fwd.geometry
    inverted = {}
    for eq in fwd.equations:
        for t in eq.terms:
            inverted.setdefault((t.input, t.channel), set()).add((eq.output, eq.filter, t.weight))
    assert len(rev.reverse) == g.in_h * g.in_w * g.in_c
    for r in rev.reverse:
        assert {(t.output, t.filter, t.weight) for t in r.terms} == inverted.get((r.input, r.channel), set())
        assert (r.row - 1) * g.in_w + r.col == r.input

    # By value: the reverse sums are backward-data.
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(g.w_shape)
    dy = rng.standard_normal(g.y_shape)
    dx = np.zeros(g.x_shape)
    per = g.out_h * g.out_w
    for r in rev.reverse:
        for t in r.terms:
            f = ord(t.filter[-1]) - ord("A")
            kh, kw_ = divmod(t.weight - 1, g.k_w)
            assert t.output == f * per + (t.row - 1) * g.out_w + t.col
            dx[0, r.row - 1, r.col - 1, r.channel - 1] += w[kh, kw_, r.channel - 1, f] * \
                dy[0, t.row - 1, t.col - 1, f]
    np.testing.assert_allclose(dx, reference.conv2d_backward_data(dy, w, g), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the notation
def test_padded_corner_has_four_terms():
    e = explain((5, 5), 3, padding=1, at=(1, 1))
    (eq,) = e.equations
    assert eq.text == "O1 = A5·I1 + A6·I2 + A8·I6 + A9·I7"
    assert len(eq.terms) == 4 and eq.taps == 9
    # the opposite corner, and an interior output with all nine
    assert explain((5, 5), 3, padding=1, at=(5, 5)).equations[0].text == \
        "O25 = A1·I19 + A2·I20 + A4·I24 + A5·I25"
    assert len(explain((5, 5), 3, padding=1, at=(3, 3)).equations[0].terms) == 9


def test_workshop_example_filter_b_follows_filter_a():
    # 4×4 input, 3×3 kernel, padding 1, two filters: A owns O1–O16, B's first output is O17.
    e = explain("4x4", 3, filters=2, padding=1, at="1,1", filter="B")
    assert [eq.text for eq in e.equations] == ["O17 = B5·I1 + B6·I2 + B8·I5 + B9·I6"]
    both = explain("4x4", 3, filters=2, padding=1, at=(1, 1))
    assert [eq.output for eq in both.equations] == [1, 17]
    assert [eq.filter for eq in both.equations] == ["A", "B"]
    assert "A: O1–O16; B: O17–O32" in both.text()
    numbered = explain("4x4", 3, filters=2, padding=1, filter=2)    # filter alone: all its outputs
    assert [eq.output for eq in numbered.equations] == list(range(17, 33))


def test_filter_letters_and_parsing():
    assert [filter_letter(i) for i in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == \
        ["A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]
    for i in range(0, 800, 7):
        assert filter_index(filter_letter(i), 800) == i
    assert filter_index("b", 3) == 1 and filter_index(3, 3) == 2 and filter_index("2", 3) == 1
    with pytest.raises(ValueError, match=r"filter must be one of A..C \(1..3\), got 'D'"):
        filter_index("D", 3)
    with pytest.raises(ValueError, match=r"filter must be one of A..C \(1..3\), got 0"):
        filter_index(0, 3)
    for bad in ("B2", "", 1.0, True, None):
        with pytest.raises(ValueError, match=r"filter must be a letter \(A, B, ...\) or a 1-based number"):
            filter_index(bad, 3)
    e = explain(3, 1, filters=28, at=(1, 1), filter="AB")
    assert e.equations[0].text == f"O{27 * 9 + 1} = AB1·I1"
    assert e.filter_letters[-2:] == ("AA", "AB")


def test_channels_are_shown_in_brackets():
    e = explain("3x3x2", 2, filters=2, at=(2, 2), filter="B")
    assert e.equations[0].text == ("O8 = B1[c1]·I5[c1] + B1[c2]·I5[c2] + B2[c1]·I6[c1] + B2[c2]·I6[c2] + "
                                   "B3[c1]·I8[c1] + B3[c2]·I8[c2] + B4[c1]·I9[c1] + B4[c2]·I9[c2]")
    r = explain("3x3x2", 2, filters=1, transposed=True, at=(1, 1))
    assert [x.text for x in r.reverse] == ["dI1[c1] = A1[c1]·dO1", "dI1[c2] = A1[c2]·dO1"]
    one = explain("3x3", 2, at=(np.int64(1), np.int64(1)))
    assert "[" not in one.equations[0].text


def test_dilation_and_asymmetric_padding_equation():
    # 5×5, 3×3 dilated by 2 (N_eff 5), stride 2, 'same' → pads 2 each side, out 3×3.
    e = explain(5, 3, stride=2, dilation=2, padding="same", at=(2, 2))
    assert e.equations[0].text == ("O5 = A1·I1 + A2·I3 + A3·I5 + A4·I11 + A5·I13 + A6·I15 + "
                                   "A7·I21 + A8·I23 + A9·I25")
    g = e.geometry
    assert (g.pad_top, g.pad_bottom, g.out_h) == (2, 2, 3)
    # T,B,L,R: nothing on top/left, so the first output's window starts on I1 with all taps.
    e = explain(4, 2, padding="0,1,0,1", stride=3, at=(2, 2))
    assert e.equations[0].text == "O4 = A1·I16"


def test_transposed_lists_unread_inputs_with_no_terms():
    e = explain("1x6", (1, 3), stride=2, transposed=True)   # column 6 is never read
    texts = [r.text for r in e.reverse]
    assert texts[5] == "dI6 = 0   (no output reads it)"
    assert texts[0] == "dI1 = A1·dO1" and texts[2] == "dI3 = A3·dO1 + A1·dO2"


# ----------------------------------------------------------------------------- the sizing steps
def test_formula_steps_are_substituted():
    e = explain((28, 28, 1), 3, filters=32)
    h, w = e.axes
    assert h.steps == ("W1 = 28, N = 3, P = 0 ('valid'), S = 1",
                       "W0 = (W1 − N + 2P)/S + 1 = (28 − 3 + 2·0)/1 + 1 = 25/1 + 1 = 25 + 1 = 26")
    assert (e.output_shape, e.weights, e.biases, e.params) == ((1, 26, 26, 32), 288, 32, 320)
    assert "Weights N·N·D1·K = 3·3·1·32 = 288, biases K = 32, parameters 320" in e.text()
    assert "Output shape (batch, H0, W0, K) = (1, 26, 26, 32)" in e.text()
    e2 = explain((26, 26, 32), 3, filters=64, batch=8)
    assert (e2.output_shape, e2.params) == ((8, 24, 24, 64), 18_496)


def test_dilation_and_same_steps():
    e = explain(7, 3, stride=2, dilation=2, padding="same")
    h = e.axes[0]
    assert h.steps[:5] == (
        "W1 = 7, N = 3, S = 2, D = 2",
        "N_eff = (N − 1)·D + 1 = (3 − 1)·2 + 1 = 5",
        "padding 'same' (TensorFlow's rule): W0 = ceil(W1/S) = ceil(7/2) = 4",
        "P_total = max((W0 − 1)·S + N_eff − W1, 0) = max((4 − 1)·2 + 5 − 7, 0) = 4",
        "P_top = P_total // 2 = 2, P_bottom = P_total − P_top = 2",
    )
    assert h.steps[5] == "check: W0 = (W1 − N_eff + 2P)/S + 1 = (7 − 5 + 2·2)/2 + 1 = 6/2 + 1 = 3 + 1 = 4"
    odd = explain((6, 5), 2, padding="same").axes
    assert odd[0].steps[-2] == ("P_top = P_total // 2 = 0, P_bottom = P_total − P_top = 1 "
                                "(the odd one goes to the bottom)")
    assert odd[1].steps[-2].endswith("(the odd one goes to the right)")
    asym = explain(7, 3, padding=((0, 1), (2, 0)), stride=2).axes
    assert asym[0].steps[0] == "W1 = 7, N = 3, P_top = 0, P_bottom = 1, S = 2"
    assert asym[0].steps[1].startswith("W0 = (W1 − N + P_top + P_bottom)/S + 1 = (7 − 3 + 0 + 1)/2 + 1")


def test_stride_not_dividing_names_unread_rows_and_columns():
    e = explain((8, 6), 3, stride=2)      # height (8−3)/2 = 2.5 → row 8 unread; width (6−3)/2 = 1.5 → col 6
    h, w = e.axes
    assert (h.out_size, w.out_size) == (3, 2)
    assert not h.divides_evenly and h.leftover == 1 and h.unread == (8,)
    assert not w.divides_evenly and w.leftover == 1 and w.unread == (6,)
    assert h.steps[-2].endswith("= 5/2 + 1 → floor(5/2) + 1 = 2 + 1 = 3")
    assert h.steps[-1] == ("5/2 is not a whole number: the stride does not divide evenly; the last window "
                           "ends 1 row before the end of the padded input, so input row 8 is never read.")
    assert w.steps[-1].endswith("so input column 6 is never read.")
    text = e.text()
    assert "input row 8 is never read" in text and "input column 6 is never read" in text

    e = explain(10, 3, stride=4)    # windows on rows 1–3 and 5–7: row 4 skipped, 3 rows left over
    assert e.axes[0].unread == (4, 8, 9, 10)
    assert e.axes[0].steps[-2].endswith("ends 3 rows before the end of the padded input, "
                                        "so input rows 8, 9 and 10 are never read.")
    assert e.axes[0].steps[-1] == ("input row 4 falls between the taps (stride 4, kernel 3) "
                                   "and is never read.")
    # leftover that is only padding: every input row is still read
    e = explain(5, 3, stride=2, padding=((0, 1), (0, 0)))
    assert e.axes[0].leftover == 1 and e.axes[0].unread == ()
    assert e.axes[0].steps[-1].endswith("and that is padding: every input row is still read.")
    # an even division can still skip rows when the stride is larger than the kernel
    e = explain(7, 1, stride=3)
    assert e.axes[0].divides_evenly and e.axes[0].unread == (2, 3, 5, 6)
    assert e.axes[0].steps[-1] == ("input rows 2, 3, 5 and 6 fall between the taps (stride 3, kernel 1) "
                                   "and are never read.")
    assert explain(5, 3, padding=1).axes[0].unread == ()


def test_explanation_uses_the_shapes_geometry():
    for kw in [dict(input=(9, 7, 2), kernel=(3, 2), stride=(2, 3), padding="same", dilation=(1, 2),
                    filters=3, batch=2),
               dict(input=(5, 5, 1), kernel=3, padding=(1, 0))]:
        e = explain(**kw)
        pad = kw["padding"]
        g = conv_geometry((kw.get("batch", 1), *kw["input"]),
                          (*((kw["kernel"],) * 2 if isinstance(kw["kernel"], int) else kw["kernel"]),
                           kw["input"][2], kw.get("filters", 1)),
                          kw.get("stride", 1), pad, kw.get("dilation", 1))
        assert e.geometry == g and e.output_shape == g.y_shape
    g = conv_geometry((1, 6, 6, 1), (3, 3, 1, 2), 2, "same")
    assert explain(g, at=(1, 1)).geometry == g
    with pytest.raises(ValueError, match="either a ConvGeometry or the geometry arguments"):
        explain(g, kernel=5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(input="5y5"), r"input must look like 5x5 or 28x28x1, got '5y5'"),
    (dict(input=(1, 2, 3, 4)), r"input must look like 5x5 or 28x28x1"),
    (dict(input=(5, 5), kernel="3x3x3"), r"kernel must look like 3 or 3x3, got '3x3x3'"),
    (dict(input=(5, 5), kernel=7), r"kernel_size \(height\)=7 is larger than the padded input"),
    (dict(input=(5, 5), stride=0), r"strides\[0\] \(height\) must be >= 1, got 0"),
    (dict(input=(5, 5), padding="full"), r"padding must look like valid, same, P, PH,PW or T,B,L,R"),
    (dict(input=(5, 5), padding=-1), r"padding must be >= 0, got -1"),
    (dict(input=(5, 5), at=(6, 1)), r"at row must be in 1..3 \(1-based\), got 6"),
    (dict(input=(5, 5), at=(0, 1)), r"at row must be in 1..3 \(1-based\), got 0"),
    (dict(input=(5, 5), at="1"), r"at must look like ROW,COL \(1-based\)"),
    (dict(input=(5, 5), at=(1, 6), transposed=True), r"at column must be in 1..5 \(1-based\), got 6"),
    (dict(input=(5, 5), filters=2, filter="C"), r"filter must be one of A..B"),
    (dict(input=(5, 5), batch=0), r"batch must be >= 1, got 0"),
    (dict(input=(300, 300, 64), filters=64, all_outputs=True), r"--all would list .* terms"),
])
def test_bad_arguments_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        explain(**kwargs)


# ----------------------------------------------------------------------------- picture
def test_picture_writes_a_readable_png(tmp_path):
    import matplotlib.image as mpimg
    path = tmp_path / "conv.png"
    e = explain((5, 5), 3, filters=2, padding=1, at=(1, 1), filter="B", picture=str(path))
    assert e.picture == str(path) and path.stat().st_size > 5_000
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 250 <= img.shape[0] <= 1500 and 500 <= img.shape[1] <= 2300
    # padding shaded grey and the window's taps in orange are both present
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(rgb, axis=0)}
    assert (0xcf, 0xcf, 0xcf) in colours and (0xff, 0xb3, 0x47) in colours

    big = tmp_path / "big.png"
    explain((28, 28, 3), 3, padding="same", stride=2, transposed=True, at=(4, 4), picture=str(big))
    img = mpimg.imread(str(big))
    assert img.shape[0] > 300 and img.shape[1] > 600


# ----------------------------------------------------------------------------- CLI and import
def test_cli_prints_the_equation(capsys):
    assert cli.main(["explain", "--input", "5x5", "--kernel", "3", "--padding", "1", "--filters", "2",
                     "--at", "1,1", "--filter", "B"]) == 0
    out = capsys.readouterr().out
    assert "O26 = B5·I1 + B6·I2 + B8·I6 + B9·I7" in out
    assert "W0 = (W1 − N + 2P)/S + 1 = (5 − 3 + 2·1)/1 + 1 = 4/1 + 1 = 4 + 1 = 5" in out
    assert "Padding: top 1, bottom 1, left 1, right 1" in out
    assert "Weights N·N·D1·K = 3·3·1·2 = 18, biases K = 2, parameters 20" in out
    assert "4 of 9 terms, 5 in the padding" in out


def test_cli_all_transposed_and_json(capsys):
    assert cli.main(["explain", "--input", "3x3", "--kernel", "2", "--all"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^  (O\d+) = ", out, re.M) == ["O1", "O2", "O3", "O4"]
    assert cli.main(["explain", "--input", "3x3", "--kernel", "2", "--transposed"]) == 0
    out = capsys.readouterr().out
    assert "  dI5 = A4·dO1 + A3·dO2 + A2·dO3 + A1·dO4" in out
    assert cli.main(["explain", "--input", "28x28x1", "--kernel", "3x3", "--filters", "32",
                     "--stride", "2", "--padding", "same", "--dilation", "1", "--batch", "4",
                     "--at", "1,1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["geometry"]["out_h"] == 14 and d["geometry"]["pad_bottom"] == 1 and d["geometry"]["pad_top"] == 0
    assert d["output_shape"] == [4, 14, 14, 32] and d["params"] == 320
    assert len(d["equations"]) == 32 and d["equations"][1]["output"] == 14 * 14 + 1
    assert d["equations"][0]["text"] == "O1 = A1·I1 + A2·I2 + A3·I3 + A4·I29 + A5·I30 + A6·I31 + " \
                                        "A7·I57 + A8·I58 + A9·I59"
    assert d["notation"]["channels"].startswith("when C > 1")


def test_cli_bad_input_exits_2_naming_the_parameter(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", "--input", "5x5", "--kernel", "7"])
    assert exc.value.code == 2
    assert "kernel_size (height)=7 is larger than the padded input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", "--padding", "1,2,3"])
    assert "padding must look like valid, same, P, PH,PW or T,B,L,R, got '1,2,3'" in capsys.readouterr().err


def test_cli_help_documents_the_numbering(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1-based output position" in out and "I5[c2]" in out and "row-major" in out


def test_import_dlconv_explain_is_light_and_callable():
    code = ("import sys, dlconv\n"
            "e = dlconv.explain((4, 4), 3, filters=2, padding=1, at=(1, 1), filter='B')\n"
            "import dlconv.explain\n"                      # rebinds dlconv.explain to the module
            "e2 = dlconv.explain((4, 4), 3, filters=2, padding=1, at=(1, 1), filter='B')\n"
            "assert e.equations[0].text == e2.equations[0].text == 'O17 = B5·I1 + B6·I2 + B8·I5 + B9·I6'\n"
            "heavy = [m for m in ('tensorflow', 'numba', 'matplotlib', 'keras') if m in sys.modules]\n"
            "print('heavy:', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "heavy: []"


def test_python_m_dlconv_explain_runs():
    out = subprocess.run([sys.executable, "-m", "dlconv", "explain", "--input", "7x6", "--stride", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "3/2 is not a whole number" in out.stdout and "input column 6 is never read" in out.stdout
    assert dlconv.explain is not None
