"""The Numba CPU forward variant ``cpu_v3_smalltile`` (kernels/conv2d_cpu_small.py) against
the float64 NumPy reference and TensorFlow's conv2d on generated geometries aimed at the
tile's edges: output rows narrower than the 8-pixel tile, one pixel wider (the overlapping
last block), filter counts of 1-16 (one-vector panel), 17-32 and 33+ (ragged 32-wide
panels), strides, dilations and asymmetric padding; and the backend's choice of it.  Also
the stride-1 backward-data route that runs it (conv2d_cpu.backward_data into 9-32 dx
channels) against the reference and TensorFlow's input gradient.

Two kernels are compiled (one signature each, cached on disk), so the test stays fast.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import activations as A
from dlconv import ops
from dlconv import reference as ref
from dlconv.backends import get
from dlconv.kernels import conv2d_cpu as ccpu
from dlconv.kernels import conv2d_cpu_small as small
from dlconv.shapes import conv_geometry

from test_conv_numba import ACTS, arrays, check_forward, tf_grads, tf_grads_ok, tol

#: Filter counts at the panel edges: 1-vector panel (<= 16), 2-vector (17..32), and ragged
#: second panels (33, 40), plus the ResNet's 16 and 32.
FILTERS = (1, 5, 16, 17, 32, 33, 40)


@st.composite
def small_cases(draw):
    """(geometry, bias?, activation): output widths around the tile width SMALL_MR."""
    out_w = draw(st.sampled_from([1, 3, small.SMALL_MR - 1, small.SMALL_MR, small.SMALL_MR + 1,
                                  2 * small.SMALL_MR + 3]))
    k = draw(st.sampled_from(FILTERS))
    c = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = ((draw(st.integers(0, 2)), draw(st.integers(0, 2))),
            (draw(st.integers(0, 3)), draw(st.integers(0, 2))))
    # the input width that gives out_w for this kernel, stride, dilation and padding
    kw_eff = (kw - 1) * dw + 1
    in_w = max(1, (out_w - 1) * sw + kw_eff - pads[1][0] - pads[1][1])
    in_h = draw(st.integers(1, 5))
    while True:
        try:
            g = conv_geometry((draw(st.integers(1, 2)), in_h, in_w, c), (kh, kw, c, k),
                              (sh, sw), pads, (dh, dw))
            break
        except ValueError:        # kernel taller than the padded input: shrink it
            if kh > 1:
                kh -= 1
            else:
                dh, in_h = 1, in_h + 1
    return g, draw(st.booleans()), draw(st.sampled_from(ACTS))


@settings(max_examples=40, deadline=None)
@given(case=small_cases(), seed=st.integers(0, 2**16))
def test_small_tile_forward_matches_reference_and_tensorflow(case, seed):
    g, bias, act = case
    x, w, b, _ = arrays(g, seed, bias)
    y = small.launch(x, w, b, g, A.code(act))
    check_forward(y, x, w, b, g, act)          # reference always, TensorFlow where it runs


@pytest.mark.parametrize("xs,ws,stride,pad", [
    ((2, 32, 32, 1), (7, 7, 1, 16), 2, "same"),        # the ResNet's stem
    ((2, 16, 16, 16), (3, 3, 16, 16), 1, "same"),      # its ResBlocks of 16
    ((2, 16, 16, 16), (1, 1, 16, 32), 2, "valid"),     # the 1x1 projection shortcut
    ((2, 8, 8, 32), (3, 3, 32, 32), 1, "same"),        # its ResBlocks of 32 (8-wide rows)
])
def test_small_tile_on_the_resnet_shapes(xs, ws, stride, pad):
    g = conv_geometry(xs, ws, stride, pad)
    x, w, b, _ = arrays(g, 7)
    check_forward(small.launch(x, w, b, g, A.RELU), x, w, b, g, "relu")


def test_backend_picks_the_small_tile_for_few_filters_and_offers_it_everywhere():
    be = get("numba")
    few = conv_geometry((1, 9, 9, 3), (3, 3, 3, 16), 1, "same")
    many = conv_geometry((1, 9, 9, 3), (3, 3, 3, 64), 1, "same")
    assert be.conv_variants(False, few)[0] == small.VARIANT
    assert be.conv_variants(False, many)[0] == "cpu_v2_regblock" and small.VARIANT in be.conv_variants(False, many)
    for g in (few, many):
        x, w, b, _ = arrays(g, 3)
        y_default = ops.conv2d(x, w, b, 1, "same", activation="relu", backend="numba")
        y_small = ops.conv2d(x, w, b, 1, "same", activation="relu", backend="numba", variant=small.VARIANT)
        check_forward(y_small, x, w, b, g, "relu", with_tf=False)
        if g is few:                            # the default is this kernel: the same numbers
            np.testing.assert_array_equal(y_default, y_small)
    with pytest.raises(ValueError, match=r"variant must be one of \('cpu_v3_smalltile',\)"):
        small.forward(x, w, b, many, A.RELU, variant="cpu_v2_regblock")


def test_small_tile_or_narrow_choice_for_stride1_backward_data():
    """Up to 16 dx channels always the 8-pixel tile; 17-32 by the work of the two tiles: rows of
    8 and 16 pixels (the ResNet's) leave the 12-pixel tile 8 and 4 one-pixel-loop pixels, 24
    and 36 none (whole 12-pixel blocks), 26 (the MNIST conv2) two; more than 32: the 6 x 64."""
    beats = ccpu._small_tile_beats_narrow
    assert all(beats(k, w) for k in (9, 16) for w in (1, 7, 8, 12, 24, 26, 100))
    assert beats(32, 8) and beats(32, 16) and beats(17, 30)
    assert not beats(32, 24) and not beats(32, 36) and not beats(32, 26) and not beats(32, 12)
    assert not any(beats(33, w) for w in (8, 16))


@st.composite
def stride1_backward_cases(draw):
    """A stride-1 geometry whose backward-data takes the forward route (pads no larger than
    the dilated kernel, more than NARROW_MAX_C dx channels): dx widths around the 8- and
    12-pixel tiles, 9-33 dx channels (both tiles and the 6 x 64 past 32), 1-40 filters."""
    in_w = draw(st.sampled_from([1, 5, 7, 8, 9, 12, 13, 16, 17, 26, 30]))
    c = draw(st.sampled_from([9, 16, 17, 31, 32, 33]))
    k = draw(st.sampled_from([1, 5, 16, 17, 40]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pads = ((draw(st.integers(0, (kh - 1) * dh)), draw(st.integers(0, (kh - 1) * dh))),
            (draw(st.integers(0, (kw - 1) * dw)), draw(st.integers(0, (kw - 1) * dw))))
    in_h = draw(st.integers(1, 4))
    in_w = max(in_w, (kw - 1) * dw + 1 - pads[1][0] - pads[1][1])
    in_h = max(in_h, (kh - 1) * dh + 1 - pads[0][0] - pads[0][1])
    return conv_geometry((draw(st.integers(1, 2)), in_h, in_w, c), (kh, kw, c, k), 1, pads, (dh, dw))


@settings(max_examples=40, deadline=None)
@given(g=stride1_backward_cases(), seed=st.integers(0, 2**16))
def test_stride1_backward_data_route_matches_reference_and_tensorflow(g, seed):
    x, w, _, dy = arrays(g, seed)
    dx = ccpu.backward_data(dy, w, g)
    assert dx.shape == g.x_shape and dx.dtype == np.float32
    t = tol(g.k_h * g.k_w * g.filters)
    np.testing.assert_allclose(dx, ref.conv2d_backward_data(dy, w, g), **t)
    if tf_grads_ok(g):
        np.testing.assert_allclose(dx, tf_grads(x, w, g, dy)[0], **t)
