"""``dlconv explain``'s conv_arithmetic relationships, backward-filter sums (--weight), groups
(--groups) and kernel locations (--at), checked by value against the NumPy reference and
against the worked examples of Dumoulin & Visin's guide."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dlconv import cli, reference
from dlconv.explain import arithmetic, explain, group_channels
from dlconv.shapes import ConvGeometry

HAS_GROUPS = "groups" in ConvGeometry.FIELDS
NO_GROUPS = "this dlconv.shapes has no grouped convolution (ConvGeometry.groups arrives with issue 11)"


@st.composite
def geometries(draw):
    h, w, c = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
    kw = dict(input=(h, w, c), kernel=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
              filters=draw(st.integers(1, 3)), stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
              dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
              padding=draw(st.one_of(st.sampled_from(["valid", "same"]), st.integers(0, 2),
                                     st.tuples(*[st.integers(0, 3)] * 4))))
    try:
        explain(**kw)
    except ValueError:
        assume(False)
    return kw


def _axis(e, axis):
    return next(a for a in e.arithmetic if a["axis"] == axis)


def _rel(ax, name):
    return next(r for r in ax["relations"] if r["name"] == name)


# ----------------------------------------------------------------------------- the guide's examples
@pytest.mark.parametrize("kw,o,this", [
    (dict(input=4, kernel=3), 2, "no padding, unit stride"),                         # relationship 1
    (dict(input=5, kernel=4, padding=2), 6, "zero padding, unit stride"),            # relationship 2
    (dict(input=5, kernel=3, padding=1), 5, "half (same) padding, unit stride"),     # relationship 3
    (dict(input=5, kernel=3, padding=2), 7, "full padding, unit stride"),            # relationship 4
    (dict(input=5, kernel=3, stride=2), 2, "no padding, stride s"),                  # relationship 5
    (dict(input=5, kernel=3, stride=2, padding=1), 3, "padding and stride (general)"),  # relationship 6
    (dict(input=7, kernel=3, dilation=2), 3, "no padding, unit stride"),             # relationship 15
])
def test_relationships_on_the_guides_examples(kw, o, this):
    ax = _axis(explain(**kw), "height")
    assert ax["o"] == o and _rel(ax, this)["this"] and _rel(ax, this)["value"] == o
    assert _rel(ax, "padding and stride (general)")["value"] == o


def test_dilation_and_transposed_numbers():
    ax = _axis(explain(7, 3, dilation=2), "width")
    assert ax["k_hat"] == 5 and _rel(ax, "dilation: effective kernel")["text"] == "k̂ = 3 + (3 − 1)·(2 − 1) = 5"
    # relationship 14: i = 6, k = 3, s = 2, p = 1 -> o = 3, a = 1, p' = 1, o' = 6
    t = _axis(explain(6, 3, stride=2, padding=1), "height")["transposed"]
    assert (t["i_prime"], t["a"], t["k_prime"], t["s_prime"], t["p_prime_before"], t["p_prime_after"],
            t["zeros_between"], t["stretched"], t["o_prime"]) == (3, 1, 3, 1, 1, 1, 1, 5, 6)
    assert "a = (i + 2p − k̂) mod s = (6 + 2·1 − 3) mod 2 = 1" in t["text"]
    even = _rel(_axis(explain(6, 4), "height"), "half (same) padding, unit stride")
    assert even["value"] is None and "even" in even["text"]


def test_text_and_json_carry_the_relationships(capsys):
    assert cli.main(["explain", "--input", "6x6", "--kernel", "3", "--stride", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [a["axis"] for a in d["arithmetic"]] == ["height", "width"]
    assert d["arithmetic"][0]["transposed"]["a"] == 1
    assert cli.main(["explain", "--input", "6x6", "--kernel", "3", "--stride", "2"]) == 0
    text = capsys.readouterr().out
    assert "conv_arithmetic's relationships for these numbers" in text
    assert "* padding and stride (general):      o = ⌊(6 + 2·0 − 3)/2⌋ + 1 = 2" in text


def _shift(z, before, after, axis):
    """Pad (positive) or crop (negative) z along axis."""
    if before < 0:
        z = np.take(z, range(-before, z.shape[axis]), axis=axis)
        before = 0
    if after < 0:
        z = np.take(z, range(0, z.shape[axis] + after), axis=axis)
        after = 0
    pads = [(0, 0)] * z.ndim
    pads[axis] = (before, after)
    return np.pad(z, pads)


@settings(max_examples=120, deadline=None)
@given(kw=geometries(), seed=st.integers(0, 2**31 - 1))
def test_transposed_is_the_direct_conv_of_the_stretched_output(kw, seed):
    """The numbers of the transposed relationship, used as written (s − 1 zeros between dO's
    elements, a zeros after, padding p′ = k̂ − 1 − p, the flipped kernel at stride 1), give
    backward-data: the reference's dL/dx."""
    g = explain(**kw).geometry
    th, tw = (a["transposed"] for a in arithmetic(g))
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(g.y_shape)
    w = rng.standard_normal(g.w_shape)
    z = np.zeros((g.batch, th["stretched"] + th["a"], tw["stretched"] + tw["a"], g.filters))
    z[:, :th["stretched"]:g.stride_h, :tw["stretched"]:g.stride_w] = dy
    z = _shift(_shift(z, th["p_prime_before"], th["p_prime_after"], 1), tw["p_prime_before"], tw["p_prime_after"], 2)
    assert z.shape[1:3] == (g.in_h + th["k_prime"] - 1, g.in_w + tw["k_prime"] - 1)
    dx = np.zeros(g.x_shape)
    for kh in range(g.k_h):
        for kw_ in range(g.k_w):
            patch = z[:, kh * g.dil_h:kh * g.dil_h + g.in_h, kw_ * g.dil_w:kw_ * g.dil_w + g.in_w]
            dx += patch @ w[g.k_h - 1 - kh, g.k_w - 1 - kw_].T          # flipped kernel, (F, C)
    np.testing.assert_allclose(dx, reference.conv2d_backward_data(dy, w, g), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- --weight
@settings(max_examples=80, deadline=None)
@given(kw=geometries(), seed=st.integers(0, 2**31 - 1))
def test_weight_sums_are_backward_filter(kw, seed):
    g = explain(**kw).geometry
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(g.x_shape), rng.standard_normal(g.y_shape)
    dw = np.zeros(g.w_shape)
    for f in range(g.filters):
        for c in range(g.in_c):
            for kh in range(g.k_h):
                for kw_ in range(g.k_w):
                    e = explain(**kw, filter=f + 1, weight=(kh + 1, kw_ + 1, c + 1))
                    (wq,) = e.weight_grads
                    assert wq.text.startswith(f"d{wq.filter}{kh * g.k_w + kw_ + 1}")
                    per = g.out_h * g.out_w
                    for t in wq.terms:
                        ih, iw = divmod(t.input - 1, g.in_w)
                        oh, ow = divmod(t.output - 1 - f * per, g.out_w)
                        dw[kh, kw_, c, f] += x[0, ih, iw, c] * dy[0, oh, ow, f]
    np.testing.assert_allclose(dw, reference.conv2d_backward_filter(x, dy, g)[0], rtol=1e-4, atol=1e-4)


def test_weight_text_and_locations(capsys):
    assert cli.main(["explain", "--input", "4x4", "--padding", "1", "--filters", "2", "--filter", "B",
                     "--weight", "1,1"]) == 0
    out = capsys.readouterr().out
    assert "dB1 = I1·dO22 + I2·dO23 + I3·dO24 + I5·dO26 + I6·dO27 + I7·dO28 + I9·dO30 + I10·dO31 + I11·dO32" in out
    assert "B1: w offset 1" in out
    with pytest.raises(ValueError, match="weight row must be in 1..3"):
        explain(4, 3, weight=(4, 1))


def test_at_lists_offsets_threads_and_tile():
    e = explain((4, 4), 3, padding=1, filters=2, at=(1, 1), filter="B")
    (loc,) = e.locations
    assert loc["name"] == "O17" and loc["y_offset"] == 1 and loc["im2col_row"] == 0
    assert [(t["label"], t["x_offset"], t["w_offset"], t["im2col_col"]) for t in loc["terms"]] == [
        ("B5·I1", 0, 9, 4), ("B6·I2", 1, 11, 5), ("B8·I5", 4, 15, 7), ("B9·I6", 5, 17, 8)]
    assert loc["cuda"]["cpp"]["v1"]["thread"] == [1, 0] and loc["cuda"]["numba"]["v3"]["register"] == [0, 1]
    assert loc["cpu"]["lane"] == 1 and loc["cpu"]["tile_shape"] == [4, 1]
    assert "C++ CPU cpu_v2_regblock: row item 0, panel 0, pixel tile 0" in e.text()
    assert "Numba CUDA: cuda_v1_direct block (0, 0), thread (1, 0); cuda_v2_halotile" in e.text()


# ----------------------------------------------------------------------------- --groups
@pytest.mark.skipif(not HAS_GROUPS, reason=NO_GROUPS)
def test_groups_show_which_channels_each_filter_reads(capsys):
    assert cli.main(["explain", "--input", "5x5x4", "--filters", "4", "--groups", "2", "--at", "1,1",
                     "--filter", "C"]) == 0
    out = capsys.readouterr().out
    assert "Weights N·N·(D1/G)·K = 3·3·2·4 = 72, biases K = 4, parameters 76" in out
    assert "group 1: filters A, B read channels c1–c2" in out and "group 2: filters C, D read channels c3–c4" in out
    assert "O19 = C1[c3]·I1[c3] + C1[c4]·I1[c4] + C2[c3]·I2[c3]" in out
    e = explain((5, 5, 4), 3, filters=4, groups=2, at=(1, 1), transposed=True)
    assert e.reverse[0].text.startswith("dI1[c1] = A1[c1]·dO1 + B1[c1]·dO10")
    assert "C" not in e.reverse[0].text and "A" not in e.reverse[2].text
    assert list(group_channels(e.geometry, 3)) == [2, 3]


@pytest.mark.skipif(not HAS_GROUPS, reason=NO_GROUPS)
@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 3), fg=st.integers(1, 2), groups=st.integers(1, 3), h=st.integers(3, 6),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_equations_are_the_grouped_convolution(c, fg, groups, h, seed):
    """Evaluated, the grouped equations are G separate convolutions of C/G channels each."""
    e = explain((h, h, c * groups), 3, filters=fg * groups, padding=1, groups=groups, all_outputs=True)
    g = e.geometry
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.w_shape)
    y = np.zeros(g.y_shape)
    for eq in e.equations:
        f = (eq.output - 1) // (g.out_h * g.out_w)
        for t in eq.terms:
            ci = t.channel - 1 - group_channels(g, f).start
            y[0, eq.row - 1, eq.col - 1, f] += w[t.kh, t.kw, ci, f] * x[0, t.row - 1, t.col - 1, t.channel - 1]
    want = np.concatenate([reference.conv2d_forward(
        x[..., q * c:(q + 1) * c], w[..., q * fg:(q + 1) * fg], None,
        explain((h, h, c), 3, filters=fg, padding=1).geometry) for q in range(groups)], axis=-1)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_groups_are_refused_by_name():
    with pytest.raises(ValueError, match="groups"):
        explain((5, 5, 3), 3, filters=4, groups=2)
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        explain((5, 5, 3), 3, groups=0)


def test_locations_are_bounded():
    from dlconv.explain import MAX_LOCATED
    e = explain(5, 3, filters=MAX_LOCATED + 3, at=(1, 1))
    assert len(e.equations) == MAX_LOCATED + 3 and len(e.locations) == MAX_LOCATED
    assert f"(the first {MAX_LOCATED} of {MAX_LOCATED + 3}; --filter F picks one)" in e.text()
