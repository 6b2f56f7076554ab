"""Backward-data as sub-pixel phases: dlconv.shapes.transposed_geometry (the one formula), its
C++ mirror (csrc/geometry.h, exposed as _C.transposed_geometry), and the C++ CPU kernels that
use it (cpu_v2_subpixel: direct register blocks per phase, and the narrow variant for <= 8 dx
channels, csrc/cpu_conv_subpixel.h) against dlconv.reference and TensorFlow.

Geometries are generated (hypothesis): strides 1-4 (more than the kernel, so that some phases
get no tap), dilations 1-3 (sharing a factor with the stride or not), valid / same / explicit
asymmetric pads, ragged sizes (input not a multiple of the stride, odd widths against the
register tiles), dx channels on both sides of the narrow variant's limit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import ops, shapes
from dlconv import reference as ref

_C = pytest.importorskip("dlconv._C", reason="dlconv._C is not built (pip install --no-build-isolation -e .)")

RTOL, ATOL = 1e-4, 1e-4


@st.composite
def geometries(draw, max_size=13, channels=(1, 2, 3, 8, 9, 16, 17)):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(("valid", "same", "explicit")))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4)) if kind == "explicit" else (0, 0, 0, 0)
    padding = ((pads[0], pads[1]), (pads[2], pads[3])) if kind == "explicit" else kind
    min_h = max(1, (kh - 1) * dh + 1 - pads[0] - pads[1])
    min_w = max(1, (kw - 1) * dw + 1 - pads[2] - pads[3])
    h = draw(st.integers(min_h, min_h + max_size))
    w = draw(st.integers(min_w, min_w + max_size))
    c = draw(st.sampled_from(channels))
    f = draw(st.sampled_from((1, 5, 16, 33)))
    n = draw(st.sampled_from((1, 2, 3)))
    return shapes.conv_geometry((n, h, w, c), (kh, kw, c, f), (sh, sw), padding, (dh, dw))


def _phase_backward_data(dz, w, g):
    """dx assembled from transposed_geometry's phases with plain NumPy (the formula alone)."""
    dx = np.zeros(g.x_shape, np.float64)
    for t in shapes.transposed_phases(g):
        if t.empty:
            continue
        kh = t.tap_last_h - np.arange(t.taps_h) * t.tap_step_h
        kw = t.tap_last_w - np.arange(t.taps_w) * t.tap_step_w
        wf = w[kh][:, kw].transpose(0, 1, 3, 2).astype(np.float64)
        pt, pb, pl, pr = t.pad_top, t.pad_bottom, t.pad_left, t.pad_right
        d = np.pad(dz.astype(np.float64), ((0, 0), (max(pt, 0), max(pb, 0)), (max(pl, 0), max(pr, 0)), (0, 0)))
        d = d[:, max(-pt, 0):d.shape[1] - max(-pb, 0), max(-pl, 0):d.shape[2] - max(-pr, 0)]
        assert d.shape[1] == (t.out_h - 1) + (t.taps_h - 1) * t.dil_h + 1
        assert d.shape[2] == (t.out_w - 1) + (t.taps_w - 1) * t.dil_w + 1
        y = np.zeros((g.batch, t.out_h, t.out_w, g.in_c))
        for j in range(t.taps_h):
            for i in range(t.taps_w):
                win = d[:, j * t.dil_h:j * t.dil_h + t.out_h, i * t.dil_w:i * t.dil_w + t.out_w]
                y += np.einsum("nhwk,kc->nhwc", win, wf[j, i])
        dx[:, t.phase_h::g.stride_h, t.phase_w::g.stride_w] = y
    return dx


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow", reason="the TensorFlow comparison needs tensorflow")


def _arrays(g, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(g.w_shape, dtype=np.float32), rng.standard_normal(g.y_shape, dtype=np.float32),
            rng.standard_normal(g.y_shape, dtype=np.float32))


# ----------------------------------------------------------------------------- the formula
@settings(max_examples=200, deadline=None)
@given(geometries(), st.integers(0, 2**16))
def test_transposed_phases_reassemble_the_reference_backward_data(g, seed):
    w, dz, _ = _arrays(g, seed)
    np.testing.assert_allclose(_phase_backward_data(dz, w, g), ref.conv2d_backward_data(dz, w, g),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(geometries())
def test_cpp_transposed_geometry_mirrors_python(g):
    for t in shapes.transposed_phases(g):
        fields, last_h, last_w, step_h, step_w = _C.transposed_geometry(g.as_tuple(), t.phase_h, t.phase_w)
        if t.empty:  # no tap: only the emptiness and the phase size have to agree
            assert (fields[5] == 0 or fields[6] == 0 or fields[15] == 0 or fields[16] == 0)
            assert (fields[15], fields[16]) == (t.out_h, t.out_w)
            continue
        assert fields == t.as_tuple()
        assert (last_h, last_w, step_h, step_w) == (t.tap_last_h, t.tap_last_w, t.tap_step_h, t.tap_step_w)


def test_stride_one_is_the_flipped_filter_with_full_pads():
    g = shapes.conv_geometry((2, 9, 7, 3), (3, 5, 3, 4), 1, ((2, 0), (1, 3)), (2, 1))
    (t,) = shapes.transposed_phases(g)
    assert (t.taps_h, t.taps_w, t.tap_last_h, t.tap_last_w, t.tap_step_h, t.tap_step_w) == (3, 5, 2, 4, 1, 1)
    assert (t.pad_top, t.pad_bottom, t.pad_left, t.pad_right) == (2 * 2 - 2, 2 * 2 - 0, 4 - 1, 4 - 3)
    assert (t.out_h, t.out_w, t.in_h, t.in_w) == (g.in_h, g.in_w, g.out_h, g.out_w)


def test_phases_no_tap_reaches_are_empty():
    # 1x1 kernel, stride 2: only phase (0, 0) has a tap; the others' dx is zero.
    g = shapes.conv_geometry((1, 6, 6, 2), (1, 1, 2, 3), 2, "valid")
    assert [t.empty for t in shapes.transposed_phases(g)] == [False, True, True, True]
    # dilation 2 with stride 2: every tap of a 3-tap kernel lands on the even rows
    g = shapes.conv_geometry((1, 9, 9, 2), (3, 3, 2, 3), 2, "valid", 2)
    t = shapes.transposed_geometry(g, 0, 0)
    assert (t.taps_h, t.dil_h, t.tap_step_h) == (3, 1, 1)
    assert shapes.transposed_geometry(g, 1, 0).empty


def test_phase_out_of_range_raises_naming_it():
    g = shapes.conv_geometry((1, 6, 6, 2), (3, 3, 2, 3), 2, "same")
    with pytest.raises(ValueError, match="phase must be in 0..1"):
        shapes.transposed_geometry(g, 2, 0)
    with pytest.raises(ValueError, match="phase must be in 0..1"):
        _C.transposed_geometry(g.as_tuple(), 0, 2)


# ----------------------------------------------------------------------------- the kernels
@settings(max_examples=200, deadline=None)
@given(geometries(), st.integers(0, 2**16), st.sampled_from(("linear", "relu", "tanh")))
def test_cpp_backward_data_matches_reference(g, seed, act):
    w, dz, y = _arrays(g, seed)
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "tanh":
        y = np.tanh(y)
    dzz = ref.activation_backward(dz, y, act) if act != "linear" else dz
    want = ref.conv2d_backward_data(dzz, w, g)
    codes = {"linear": 0, "relu": 1, "tanh": 3}
    got = _C.conv2d_backward_data(dz, w, g.as_tuple(), y=y if act != "linear" else None, activation=codes[act])
    tol = ATOL * max(1.0, np.sqrt(g.k_h * g.k_w * g.filters))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=tol)


@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation", [
    ((2, 64, 64, 1), (7, 7, 1, 16), 2, "same", 1),        # the ecal stem (narrow, 1 dx channel)
    ((2, 32, 32, 16), (3, 3, 16, 32), 2, "same", 1),      # the stride-2 ResBlock (direct)
    ((2, 33, 31, 3), (5, 4, 3, 20), (3, 2), ((1, 3), (0, 2)), (1, 2)),   # ragged, asymmetric
    ((1, 15, 17, 9), (3, 3, 9, 40), 2, "valid", 3),       # dilation coprime to the stride
    ((3, 16, 16, 32), (1, 1, 32, 64), 2, "same", 1),      # 1x1 stride 2: three empty phases
    ((2, 7, 7, 4), (2, 2, 4, 8), 3, "same", 1),           # kernel smaller than the stride
])
def test_cpp_backward_data_matches_tensorflow(tf, x_shape, w_shape, strides, padding, dilation):
    g = shapes.conv_geometry(x_shape, w_shape, strides, padding, dilation)
    w, dz, _ = _arrays(g, 7)
    we = np.zeros((g.k_h_eff, g.k_w_eff, g.in_c, g.filters), np.float32)   # TF's CPU gradient
    we[::g.dil_h, ::g.dil_w] = w                                             # refuses dilation > 1
    xp_shape = (g.batch, g.in_h + g.pad_top + g.pad_bottom, g.in_w + g.pad_left + g.pad_right, g.in_c)
    dxp = tf.compat.v1.nn.conv2d_backprop_input(xp_shape, tf.constant(we), tf.constant(dz),
                                                strides=[1, g.stride_h, g.stride_w, 1], padding="VALID")
    want = dxp.numpy()[:, g.pad_top:g.pad_top + g.in_h, g.pad_left:g.pad_left + g.in_w]
    got = ops.conv2d_backward_data(dz, w, g.x_shape, geometry=g, backend="cpp")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.sqrt(g.k_h * g.k_w * g.filters))


@pytest.mark.parametrize("field, name", [(11, "pad_top"), (12, "pad_bottom"), (13, "pad_left"), (14, "pad_right")])
def test_negative_pads_are_refused_by_name_in_cpp(field, name):
    g = shapes.conv_geometry((1, 8, 8, 2), (3, 3, 2, 4), 2, "same")
    t = list(g.as_tuple())
    t[field] = -1
    w, dz, _ = _arrays(g, 0)
    with pytest.raises(ValueError, match=name):
        _C.conv2d_backward_data(dz, w, tuple(t))
    with pytest.raises(ValueError, match=name):
        _C.transposed_geometry(tuple(t), 0, 0)
