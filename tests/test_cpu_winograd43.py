"""Winograd F(4x4, 3x3) in the C++ CPU kernels (csrc/cpu_conv_winograd.h, variant cpu_v3_winograd).

3x3 stride-1 undilated convolutions with C >= 8 and F >= 16 run Winograd in all three passes;
the output tile (F(4x4, 3x3) or F(2x2, 3x3)) is chosen per pass by the header's tile_3x3 rule,
and the environment variable DLCONV_CPU_WINOGRAD_TILE = 2 / 4 forces one (for measuring one
against the other).  Here both tiles are forced in turn and checked against the float64 NumPy
reference (within the componentwise bound of tests/test_cpu_winograd5.py, generalised to any
output tile m: patches at stride m) and TensorFlow, on generated geometries: ragged bottom /
right tiles (OH, OW not multiples of 4), C and F tails, valid / same / explicit asymmetric
padding, bias, relu fused in the forward and both backward passes, sigmoid / tanh forwards.

The points 0, 1, −1, 2, −½, ∞ (the F(2x2, 5x5) ones; B^T is shared) were chosen by simulating
the transforms in float32 over random patches, C = 64: worst error relative to max |y| about
2.4e-6 (0, ±1, ±2: ~7e-6; 0, ±1, ±½: ~7e-6; 0, ±1, −2, ½: ~3e-6; F(2x2, 3x3): ~0.3e-6).  The
last test checks the measured worst error relative to max |y| stays below the layer tests' 1e-5
with margin (tests/test_layers.py compares with the stock Keras layer at relative 1e-5).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from fractions import Fraction as Fr

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import ops
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

_C = pytest.importorskip("dlconv._C", reason="dlconv._C is not built (pip install --no-build-isolation -e .)")
tf = pytest.importorskip("tensorflow")
if not _C.forward_variant_applicable(conv_geometry((1, 8, 8, 16), (3, 3, 16, 16), 1, "same").as_tuple(), 3):
    pytest.skip("this build has no AVX-512 (the Winograd kernels are AVX-512 only)", allow_module_level=True)

from test_cpu_winograd5 import (BT3, BT5, G3, AT3, U, _absf, _pads, _row_ops, _transposed,  # noqa: E402
                                check_nonfinite_as_tensorflow, tf_grads)
from test_nonfinite import assert_same_nonfinite, poisoned, tf_conv_relu  # noqa: E402

TILE_ENV = "DLCONV_CPU_WINOGRAD_TILE"  # cpu_conv_winograd.h TILE_ENV
H = Fr(1, 2)
# The header's F(4x4, 3x3), exact: points 0, 1, -1, 2, -1/2, ∞.
POINTS43 = (Fr(0), Fr(1), Fr(-1), Fr(2), -H)
BT43 = BT5
G43 = [[1, 0, 0], [Fr(-1, 3)] * 3, [Fr(1, 3), Fr(-1, 3), Fr(1, 3)], [Fr(1, 15), Fr(2, 15), Fr(4, 15)],
       [Fr(-16, 15), Fr(8, 15), Fr(-4, 15)], [0, 0, 1]]
AT43 = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -H, 0], [0, 1, 1, 4, Fr(1, 4), 0], [0, 1, -1, 8, Fr(-1, 8), 1]]
TILES = {2: (BT3, G3, AT3), 4: (BT43, G43, AT43)}
WORST = {}  # (tile, pass) -> (worst error / bound, worst error / max |exact|)


@contextmanager
def tile(m):
    """DLCONV_CPU_WINOGRAD_TILE = m for the block (None: unset, the default rule)."""
    old = os.environ.get(TILE_ENV)
    if m is None:
        os.environ.pop(TILE_ENV, None)
    else:
        os.environ[TILE_ENV] = str(m)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TILE_ENV, None)
        else:
            os.environ[TILE_ENV] = old


def test_f43_matrices_are_toom_cook_and_exact():
    """A^T[i][j] = p_j^i, G[j][k] = p_j^k / Π_{l≠j}(p_j − p_l) (∞: last column / row), and
    A^T diag(G g) B^T d is the correlation Σ_k g_k d_{i+k} exactly (rationals), which
    determines B^T; B^T and A^T are exact in float32 (only G's thirds / fifteenths round)."""
    m, r, a = 4, 3, 6
    for j, p in enumerate(POINTS43):
        assert [Fr(AT43[i][j]) for i in range(m)] == [p ** i for i in range(m)]
        den = np.prod([p - q for q in POINTS43 if q != p])
        assert [Fr(v) for v in G43[j]] == [p ** k / den for k in range(r)]
    assert [AT43[i][a - 1] for i in range(m)] == [0, 0, 0, 1] and G43[a - 1] == [0, 0, 1]
    for i in range(m):
        for k in range(r):
            for l_ in range(a):
                s = sum(Fr(AT43[i][j]) * Fr(G43[j][k]) * Fr(BT43[j][l_]) for j in range(a))
                assert s == (1 if l_ == i + k else 0), (i, k, l_)
    assert all(float(np.float32(v)) == v for row in BT43 + AT43 for v in row)


def _tiles(x, pads, r, m):
    """x padded / cropped by pads (negative = crop), cut into α x α patches at stride m →
    (N, th, tw, α, α, C), and (OH, OW)."""
    pt, pb, pl, pr = pads
    xp = np.pad(x, ((0, 0), (max(pt, 0), max(pb, 0)), (max(pl, 0), max(pr, 0)), (0, 0)))
    xp = xp[:, max(-pt, 0):xp.shape[1] - max(-pb, 0), max(-pl, 0):xp.shape[2] - max(-pr, 0)]
    oh, ow = xp.shape[1] - r + 1, xp.shape[2] - r + 1
    th, tw = -(-oh // m), -(-ow // m)
    a = m + r - 1
    xp = np.pad(xp, ((0, 0), (0, m * th + r - 1 - xp.shape[1]), (0, m * tw + r - 1 - xp.shape[2]), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (a, a), axis=(1, 2))[:, ::m, ::m]
    return np.moveaxis(win, 3, -1), (oh, ow)


def winograd_bound(x, w, pads, m, bias=None):
    """tests/test_cpu_winograd5.py's forward bound for output tile m."""
    r, c = w.shape[0], w.shape[2]
    bt, g, at = TILES[m]
    d, (oh, ow) = _tiles(np.abs(x.astype(np.float64)), pads, r, m)
    B, G, A = _absf(bt), _absf(g), _absf(at)
    v = np.einsum("ia,jb,nxyabc->nxyijc", B, B, d)
    u = np.einsum("ia,jb,abcf->ijcf", G, G, np.abs(w.astype(np.float64)))
    y = np.einsum("pi,qj,nxyijf->nxpyqf", A, A, np.einsum("nxyijc,ijcf->nxyijf", v, u))
    y = y.reshape(y.shape[0], m * y.shape[1], m * y.shape[3], -1)[:, :oh, :ow]
    if bias is not None:
        y = y + np.abs(bias)
    k = 2 * _row_ops(bt) + 2 * _row_ops(g, True) + 1 + c + 2 * _row_ops(at) + 1
    return k * U * y


def filter_bound(x, dz, pads, m):
    """tests/test_cpu_winograd5.py's backward-filter bound for output tile m (r = 3)."""
    bt, g, at = TILES[m]
    d, (oh, ow) = _tiles(np.abs(x.astype(np.float64)), pads, 3, m)
    n, th, tw = d.shape[:3]
    z = np.zeros((n, m * th, m * tw, dz.shape[-1]))
    z[:, :oh, :ow] = np.abs(dz)
    z = z.reshape(n, th, m, tw, m, -1).transpose(0, 1, 3, 2, 4, 5)
    B, G, A = _absf(bt), _absf(g), _absf(at)
    v = np.einsum("ia,jb,nxyabc->nxyijc", B, B, d)
    zz = np.einsum("pi,qj,nxypqf->nxyijf", A, A, z)
    mm = np.einsum("nxyijc,nxyijf->ijcf", v, zz)
    dw = np.einsum("ik,jl,ijcf->klcf", G, G, mm)
    k = 2 * _row_ops(bt) + 2 * _row_ops(list(zip(*at))) + n * th * tw + 2 * _row_ops(list(zip(*g)), True)
    return k * U * dw


def _track(key, err, bound, exact):
    over = int((err > bound).sum())
    assert over == 0, f"{key}: error {float(err.max()):.3g} above its bound at {over} places"
    old = WORST.get(key, (0.0, 0.0))
    WORST[key] = (max(old[0], float((err / np.maximum(bound, 1e-30)).max())),
                  max(old[1], float(err.max() / max(float(np.abs(exact).max()), 1e-30))))


@st.composite
def cases43(draw):
    c = draw(st.sampled_from((8, 9, 17, 32, 40, 64)))
    f = draw(st.sampled_from((16, 20, 33, 64, 70)))
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(("valid", "same", "explicit")))
    if kind == "explicit":
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    else:
        padding, pads = kind, (0, 0, 0, 0)
    min_h, min_w = max(1, 3 - pads[0] - pads[1]), max(1, 3 - pads[2] - pads[3])
    h = draw(st.integers(min_h, min_h + 13))
    w = draw(st.integers(min_w, min_w + 13))
    return dict(x_shape=(n, h, w, c), w_shape=(3, 3, c, f), padding=padding, bias=draw(st.booleans()),
                act=draw(st.sampled_from(("linear", "relu"))), seed=draw(st.integers(0, 2**16)))


def _check_three_passes(case, m):
    """All three passes of one case, output tile m forced, vs the reference (within the bound)
    and TensorFlow (the bound plus TensorFlow's own direct-sum bound)."""
    rng = np.random.default_rng(case["seed"])
    g = conv_geometry(case["x_shape"], case["w_shape"], 1, case["padding"])
    assert _C.forward_variant_applicable(g.as_tuple(), 3)
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32) if case["bias"] else None
    dy = rng.standard_normal(g.y_shape, dtype=np.float32)
    act, padding = case["act"], case["padding"]
    with tile(m):
        y = ops.conv2d(x, w, b, 1, padding, 1, act, backend="cpp", variant="cpu_v3_winograd")
        np.testing.assert_array_equal(y, ops.conv2d(x, w, b, 1, padding, 1, act, backend="cpp"))
    exact = ref.conv2d_forward(x, w, b, g, act)
    bound = winograd_bound(x, w, _pads(g), m, b)
    _track((m, "forward"), np.abs(y - exact), bound, exact)
    y_tf, dx_tf, dw_tf = tf_grads(x, w, b, g, act, dy)
    direct_bound = (g.gemm_k + 1) * U * (ref.conv2d_forward(np.abs(x), np.abs(w), None, g, "linear")
                                         + (np.abs(b) if b is not None else 0))
    assert (np.abs(y - y_tf) <= bound + direct_bound).all()
    y_ref = np.ascontiguousarray(y_tf)
    dz = ref.activation_backward(dy, y_ref, act).astype(np.float32)
    with tile(m):
        dx = ops.conv2d_backward_data(dy, w, g.x_shape, 1, padding, 1, backend="cpp", y=y_ref, activation=act)
    wf, tpads = _transposed(g, w)
    exact = ref.conv2d_backward_data(dz, w, g)
    bound = winograd_bound(dz, wf, tpads, m)
    _track((m, "backward-data"), np.abs(dx - exact), bound, exact)
    dx_direct_bound = (9 * g.filters + 1) * U * ref.conv2d_backward_data(np.abs(dz), np.abs(w), g)
    assert (np.abs(dx - dx_tf) <= bound + dx_direct_bound).all()
    with tile(m):
        dw, db = ops.conv2d_backward_filter(x, dy, g.w_shape, 1, padding, 1, backend="cpp", y=y_ref,
                                            activation=act)
    rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
    bound = filter_bound(x, dz, _pads(g), m)
    _track((m, "backward-filter"), np.abs(dw - rdw), bound, rdw)
    dw_direct_bound = (g.gemm_m + 1) * U * ref.conv2d_backward_filter(np.abs(x), np.abs(dz), g)[0]
    assert (np.abs(dw - dw_tf) <= bound + dw_direct_bound).all()
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-5 * np.sqrt(g.gemm_m))


@settings(max_examples=30, deadline=None)
@given(cases43(), st.sampled_from((2, 4)))
def test_3x3_both_tiles_three_passes_vs_reference_and_tensorflow(case, m):
    _check_three_passes(case, m)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_3x3_sigmoid_tanh_forward_ragged(m, act, rng):
    """The sigmoid / tanh epilogue runs over the stored tile rows: OH = 9, OW = 7 (ragged 4x4
    tiles), 70 filters (a 64-panel and a 6-filter tail)."""
    g = conv_geometry((2, 11, 9, 24), (3, 3, 24, 70), 1, "valid")
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    b = rng.standard_normal(g.filters, dtype=np.float32)
    with tile(m):
        y = ops.conv2d(x, w, b, 1, "valid", 1, act, backend="cpp", variant="cpu_v3_winograd")
    lin = ref.conv2d_forward(x, w, b, g, "linear")
    # sigmoid' and tanh' are <= 1: the linear bound carries over
    assert (np.abs(y - ref.conv2d_forward(x, w, b, g, act)) <= winograd_bound(x, w, _pads(g), m, b) + 1e-7).all()
    assert np.abs(lin).max() > 1


F4_POSITION_COST = 4 / 3  # cpu_conv_winograd.h


def expected_tile(oh, ow):
    """cpu_conv_winograd.h tile_3x3's default rule, on the pass's output size."""
    pos4 = 36 * -(-oh // 4) * -(-ow // 4)
    pos2 = 16 * -(-oh // 2) * -(-ow // 2)
    return 4 if pos4 * F4_POSITION_COST < pos2 else 2


@pytest.mark.parametrize("xs,padding,want", [
    ((2, 13, 14, 32), "valid", 4),  # 11x12 output (dx: 13x14): F(4x4)
    ((2, 8, 8, 32), "valid", 2),    # 6x6 output: 4x4 tiles would compute 8x8, F(2x2) (dx 8x8: F(4x4))
    ((2, 4, 4, 32), "same", 4),     # 4x4: one 4x4 tile (36 positions) beats four 2x2 tiles (64)
])
def test_tile_override_and_default_rule(xs, padding, want, rng):
    """DLCONV_CPU_WINOGRAD_TILE really switches the tile (different rounding, same math), and
    with it unset (or invalid) every pass gives exactly the result of the tile the rule picks
    (backward-data: on dx's size, the output of its transposed forward)."""
    g = conv_geometry(xs, (3, 3, 32, 64), 1, padding)
    assert expected_tile(g.out_h, g.out_w) == want
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    dz = rng.standard_normal(g.y_shape, dtype=np.float32)
    t = g.as_tuple()
    res = {}
    for m in ("2", "4", "auto", None):
        with tile(m):
            res[m] = (_C.conv2d_forward(x, w, None, t, 0), _C.conv2d_backward_data(dz, w, t),
                      _C.conv2d_backward_filter(x, dz, t)[0])
    sizes = ((g.out_h, g.out_w), (g.in_h, g.in_w), (g.out_h, g.out_w))
    for p, (oh, ow) in enumerate(sizes):
        assert not np.array_equal(res["2"][p], res["4"][p]), p
        want_tile = 2 if p == 0 else expected_tile(oh, ow)  # the forward always F(2x2)
        for dflt in ("auto", None):
            np.testing.assert_array_equal(res[dflt][p], res[str(want_tile)][p], err_msg=str(p))


def test_forward_keeps_exact_zeros(rng):
    """Where a 3x3 patch is all zero and there is no bias the exact output is exactly 0, as in
    TensorFlow: the default forward (F(2x2)) keeps it, so relu / max-pool ties of zeros stay
    ties.  Forced F(4x4) leaks the tile's nonzero inputs into it (why the forward does not take
    it: on the MNIST train step one such flip gave conv2's dw 4e-3 relative error)."""
    g = conv_geometry((8, 14, 14, 32), (3, 3, 32, 64), 1, "valid")
    x = rng.standard_normal(g.x_shape, dtype=np.float32)
    x[:, :, :7, :] = 0.0          # input columns 0..6 zero: outputs 0..4 see only zeros
    w = rng.standard_normal(g.w_shape, dtype=np.float32)
    t = g.as_tuple()
    with tile(None):
        y = _C.conv2d_forward(x, w, None, t, 0)
    assert (y[:, :, :5, :] == 0).all()
    assert np.abs(y[:, :, 5:, :]).max() > 1.0
    with tile("4"):
        y4 = _C.conv2d_forward(x, w, None, t, 0)
    assert (y4[:, :, :5, :] != 0).any()  # output column 4 shares a 4x4 tile with columns 5..7


@pytest.mark.parametrize("poison", ["x", "w", "dy", "all"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_4x4_nan_inf_as_tensorflow(padding, poison):
    """±Inf / NaN in x, w or dy under F(4x4, 3x3): the watch sees the non-finite result and the
    direct kernel recomputes: TensorFlow's values (OH, OW = 9, 8 or 7, 6: ragged tiles)."""
    with tile(4):
        check_nonfinite_as_tensorflow((2, 9, 8, 16), (3, 3, 16, 16), padding, poison, "4x4")


def test_4x4_one_inf_pixel_gives_inf_not_nan():
    """One +Inf pixel, positive weights: the 3x3 neighbourhood it reaches is +Inf, nowhere NaN."""
    x = np.ones((1, 10, 10, 16), np.float32)
    x[0, 4, 5, 3] = np.inf
    w = np.full((3, 3, 16, 16), 0.01, np.float32)
    with tile(4):
        y = ops.conv2d(x, w, None, 1, "same", backend="cpp", variant="cpu_v3_winograd")
    assert np.isinf(y[0, 3:6, 4:7]).all() and not np.isnan(y).any()
    assert np.isfinite(y[0, 6:]).all()


def test_worst_error_is_inside_the_bound_and_the_layer_tolerance():
    """Worst error / bound far from 1 (the bound is not met by luck), and the worst error
    relative to max |exact| well below the layer tests' 1e-5, over the conv2 / ResNet-like
    channel counts (C = 32, 64) at both tiles, plus whatever the tests above added."""
    for m in (2, 4):
        for case in (dict(x_shape=(2, 26, 26, 32), w_shape=(3, 3, 32, 64), padding="valid", bias=True,
                          act="relu", seed=1),
                     dict(x_shape=(2, 16, 16, 64), w_shape=(3, 3, 64, 64), padding="same", bias=True,
                          act="linear", seed=2),
                     dict(x_shape=(1, 9, 14, 17), w_shape=(3, 3, 17, 33), padding=((1, 0), (2, 0)),
                          bias=False, act="relu", seed=3)):
            _check_three_passes(case, m)
    print("worst (error / bound, error / max|exact|):", WORST)
    assert max(v[0] for v in WORST.values()) < 0.5, WORST
    assert max(v[1] for v in WORST.values()) < 5e-6, WORST
