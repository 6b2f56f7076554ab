"""The Numba CPU forward variant ``cpu_v3_smalltile`` (kernels/conv2d_cpu_small.py) against
the float64 NumPy reference and TensorFlow's conv2d on generated geometries aimed at the
tile's edges: output rows narrower than the 8-pixel tile, one pixel wider (the overlapping
last block), filter counts of 1-16 (one-vector panel), 17-32 and 33+ (ragged 32-wide
panels), strides, dilations and asymmetric padding; and the backend's choice of it.

Two kernels are compiled (one signature each, cached on disk), so the test stays fast.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import activations as A
from dlconv import ops
from dlconv.backends import get
from dlconv.kernels import conv2d_cpu_small as small
from dlconv.shapes import conv_geometry

from test_conv_numba import ACTS, arrays, check_forward

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
