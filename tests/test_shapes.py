"""dlconv.shapes against what TensorFlow actually computes.

The oracle is ``tf.nn.conv2d`` on small random tensors, one eager call per generated
configuration (about 50 µs each on a CPU).  For stride > 1 together with dilation > 1,
which TensorFlow does not promise to support on every device (``tf.nn.convolution``
refuses it outright), the oracle is ``tf.nn.conv2d`` with the dilated kernel written out
explicitly: a kernel of size ``(N - 1) * D + 1`` with zeros between the taps and
dilation 1.  That is the same sum, and TensorFlow computes its SAME padding from exactly
that effective size, so shapes and values must agree; ``test_zero_inserted_kernel_oracle``
checks the substitution itself where TensorFlow runs both forms.

Output sizes are also checked against an independent brute-force count of the window
positions that fit in the padded input, and pad *placement* (the odd extra row/column of
SAME at the bottom/right) is checked by value: our explicit pads applied with ``np.pad``
followed by a VALID convolution must reproduce TensorFlow's SAME result.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlconv import shapes
from dlconv.shapes import (conv_geometry, conv_output_size, conv_param_count, dense_param_count,
                           effective_kernel_size, normalize_padding, resolve_axis)

tf = pytest.importorskip("tensorflow", reason="TensorFlow is the oracle for output sizes and pads")

CHANNELS, FILTERS = 2, 2


# ----------------------------------------------------------------------------- oracles
def dilate_kernel(w: np.ndarray, d_h: int, d_w: int) -> np.ndarray:
    """HWIO kernel with (d - 1) zero rows/columns between the taps: dilation made explicit."""
    k_h, k_w = w.shape[:2]
    out = np.zeros((effective_kernel_size(k_h, d_h), effective_kernel_size(k_w, d_w)) + w.shape[2:],
                   w.dtype)
    out[::d_h, ::d_w] = w
    return out


def tf_conv(x, w, strides, padding, dilation):
    """TensorFlow's convolution; stride > 1 with dilation > 1 goes through the zero-inserted
    kernel (see the module docstring)."""
    s_h, s_w = strides
    d_h, d_w = dilation
    if max(s_h, s_w) > 1 and max(d_h, d_w) > 1:
        w, d_h, d_w = dilate_kernel(w, d_h, d_w), 1, 1
    return tf.nn.conv2d(x, w, strides=[1, s_h, s_w, 1], padding=padding,
                        dilations=[1, d_h, d_w, 1]).numpy()


def brute_force_count(in_size, k_eff, stride, before, after) -> int:
    """Window positions that fit, counted one by one (no closed form)."""
    count, start = 0, 0
    padded = before + in_size + after
    while start + k_eff <= padded:
        count += 1
        start += stride
    return count


# ----------------------------------------------------------------------------- strategies
@st.composite
def configurations(draw):
    in_h, in_w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    k_h, k_w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    s_h, s_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d_h, d_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["valid", "same", "explicit"]))
    if mode == "explicit":
        padding = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(2))
    else:
        padding = mode
    return (in_h, in_w), (k_h, k_w), (s_h, s_w), (d_h, d_w), padding


def _fits(in_size, k, d, before, after):
    return effective_kernel_size(k, d) <= in_size + before + after


# ----------------------------------------------------------------------------- against TF
@settings(max_examples=400)
@given(cfg=configurations(), seed=st.integers(0, 2**31 - 1))
def test_geometry_matches_tensorflow(cfg, seed):
    (in_h, in_w), (k_h, k_w), strides, dilation, padding = cfg
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, in_h, in_w, CHANNELS)).astype(np.float32)
    w = rng.standard_normal((k_h, k_w, CHANNELS, FILTERS)).astype(np.float32)

    if padding == "same":
        tf_padding = "SAME"
    elif padding == "valid":
        tf_padding = "VALID"
    else:
        tf_padding = [[0, 0], list(padding[0]), list(padding[1]), [0, 0]]

    if padding != "same":
        pads = ((0, 0), (0, 0)) if padding == "valid" else padding
        fits = (_fits(in_h, k_h, dilation[0], *pads[0]) and _fits(in_w, k_w, dilation[1], *pads[1]))
        if not fits:
            with pytest.raises(ValueError, match=r"kernel_size \((height|width)\)=\d+.* larger than "
                                                 r"the padded input"):
                conv_geometry(x.shape, w.shape, strides, padding, dilation)
            # No window fits.  (TensorFlow itself refuses only when its computed size would be
            # negative; at size 0 its oneDNN CPU kernel has been seen to return a 1-wide output.)
            assert 0 in (brute_force_count(in_h, effective_kernel_size(k_h, dilation[0]), strides[0],
                                           *pads[0]),
                         brute_force_count(in_w, effective_kernel_size(k_w, dilation[1]), strides[1],
                                           *pads[1]))
            return

    g = conv_geometry(x.shape, w.shape, strides, padding, dilation)
    y_tf = tf_conv(x, w, strides, tf_padding, dilation)
    assert y_tf.shape == g.y_shape

    # Output sizes: the one-axis function and an independent brute-force count agree.
    assert g.out_h == conv_output_size(in_h, k_h, strides[0], (g.pad_top, g.pad_bottom), dilation[0])
    assert g.out_w == conv_output_size(in_w, k_w, strides[1], (g.pad_left, g.pad_right), dilation[1])
    assert g.out_h == brute_force_count(in_h, g.k_h_eff, strides[0], g.pad_top, g.pad_bottom)
    assert g.out_w == brute_force_count(in_w, g.k_w_eff, strides[1], g.pad_left, g.pad_right)
    if padding == "same":
        assert g.out_h == conv_output_size(in_h, k_h, strides[0], "same", dilation[0])
        assert g.out_w == conv_output_size(in_w, k_w, strides[1], "same", dilation[1])
        # TensorFlow's rule: the extra row/column goes after.
        assert g.pad_bottom - g.pad_top in (0, 1) and g.pad_right - g.pad_left in (0, 1)

    # Pad placement by value: our pads + VALID == TensorFlow with its own padding.
    xp = np.pad(x, ((0, 0), (g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right), (0, 0)))
    y_ours = tf_conv(xp, w, strides, "VALID", dilation)
    np.testing.assert_allclose(y_ours, y_tf, rtol=1e-5, atol=1e-5)


def test_zero_inserted_kernel_oracle(rng):
    """The oracle's substitution for stride>1 with dilation>1 is exact where TF runs both."""
    x = rng.standard_normal((1, 13, 11, 2)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 3)).astype(np.float32)
    for padding in ("SAME", "VALID", [[0, 0], [2, 1], [0, 3], [0, 0]]):
        direct = tf.nn.conv2d(x, w, strides=1, padding=padding, dilations=[1, 2, 3, 1]).numpy()
        zeros = tf.nn.conv2d(x, dilate_kernel(w, 2, 3), strides=1, padding=padding).numpy()
        np.testing.assert_allclose(zeros, direct, rtol=1e-5, atol=1e-5)


def test_same_with_stride_and_dilation_examples():
    # Hand-worked: in 10, k 3, d 2 → N_eff 5; stride 3 → out ceil(10/3) = 4;
    # total = (4-1)*3 + 5 - 10 = 4 → 2 before, 2 after.
    assert resolve_axis(10, 3, 3, 2, "same") == (2, 2, 4)
    # in 8, k 4, s 2, d 1 → out 4, total (3*2 + 4 - 8) = 2 → 1 / 1.
    assert resolve_axis(8, 4, 2, 1, "same") == (1, 1, 4)
    # odd total: in 7, k 2, s 1 → out 7, total 1 → 0 before, 1 after (bottom/right).
    assert resolve_axis(7, 2, 1, 1, "same") == (0, 1, 7)
    # stride larger than the kernel: total clipped at 0.
    assert resolve_axis(9, 1, 4, 1, "same") == (0, 0, 3)


# ----------------------------------------------------------------------------- the one-axis API
@pytest.mark.parametrize("args, expected", [
    ((28, 3), 26),                                    # MNIST conv1, valid
    ((26, 3), 24),
    ((5, 3, 1, 1), 5),                                # padding 1 keeps the size
    ((5, 3, 2, 1), 3),
    ((7, 3, 2, 0), 3),
    ((8, 3, 2, 0), 3),                                # (8-3)/2 = 2.5 → floor → 3
    ((7, 3, 2, "same"), 4),
    ((7, 3, 1, "valid", 3), 1),                       # N_eff = 7
    ((7, 3, 1, (2, 0), 2), 5),
    ((1, 1), 1),
])
def test_conv_output_size_table(args, expected):
    assert conv_output_size(*args) == expected


def test_conv_output_size_is_public_with_keywords():
    import dlconv
    assert dlconv.conv_output_size(in_size=32, kernel_size=5, stride=2, padding=2, dilation=1) == 16
    assert dlconv.conv_output_size(32, 5, padding="same", stride=3) == 11


@given(in_size=st.integers(1, 60), k=st.integers(1, 9), s=st.integers(1, 5), d=st.integers(1, 4),
       before=st.integers(0, 6), after=st.integers(0, 6))
def test_resolve_axis_matches_brute_force(in_size, k, s, d, before, after):
    k_eff = effective_kernel_size(k, d)
    if k_eff > in_size + before + after:
        with pytest.raises(ValueError, match="larger than the padded input"):
            resolve_axis(in_size, k, s, d, (before, after))
        return
    assert resolve_axis(in_size, k, s, d, (before, after)) == (
        before, after, brute_force_count(in_size, k_eff, s, before, after))
    if before == after:
        assert resolve_axis(in_size, k, s, d, before) == (before, before, resolve_axis(
            in_size, k, s, d, (before, after))[2])


def test_padding_forms_agree():
    x, w = (2, 9, 7, 3), (3, 3, 3, 4)
    a = conv_geometry(x, w, 2, 1)
    b = conv_geometry(x, w, 2, (1, 1))
    c = conv_geometry(x, w, (2, 2), ((1, 1), (1, 1)))
    d = conv_geometry(x, w, [2, 2], [[0, 0], [1, 1], [1, 1], [0, 0]])   # TF's explicit form
    assert a == b == c == d
    assert (a.out_h, a.out_w) == (5, 4)
    assert a.y_shape == (2, 5, 4, 4) and a.w_shape == (3, 3, 3, 4) and a.x_shape == x
    assert normalize_padding("SAME") == "same"
    assert normalize_padding((1, 2)) == ((1, 1), (2, 2))
    g = conv_geometry(x, w, padding=((0, 2), (3, 1)))
    assert (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (0, 2, 3, 1)
    assert (g.out_h, g.out_w) == (9, 9)


def test_geometry_record_fields():
    g = conv_geometry((4, 28, 28, 1), (3, 3, 1, 32), padding="same")
    assert g.as_tuple() == (4, 28, 28, 1, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 28, 28, 1)  # groups last
    assert len(g.FIELDS) == len(g.as_tuple())
    assert g.gemm_m == 4 * 28 * 28 and g.gemm_k == 9 and g.flops == 2 * 4 * 28 * 28 * 9 * 32
    assert g.weight_count == 288 and g.bias_count == 32
    assert g.fits_int32
    assert g.with_batch(0).y_shape == (0, 28, 28, 32)
    dil = conv_geometry((1, 20, 20, 1), (3, 5, 1, 1), dilation=(2, 3))
    assert (dil.k_h_eff, dil.k_w_eff) == (5, 13) and (dil.out_h, dil.out_w) == (16, 8)
    assert not conv_geometry((1, 50000, 50000, 1), (1, 1, 1, 1)).fits_int32


# ----------------------------------------------------------------------------- parameter counts
def test_workshop_parameter_counts():
    assert conv_param_count(3, 1, 32) == 320
    assert conv_param_count((3, 3), 32, 64) == 18_496
    assert conv_param_count(3, 32, 64, use_bias=False) == 18_432
    assert conv_param_count((5, 3), 2, 4) == 5 * 3 * 2 * 4 + 4
    mlp_small = [dense_param_count(a, b) for a, b in [(784, 64), (64, 64), (64, 10)]]
    assert mlp_small == [50_240, 4_160, 650] and sum(mlp_small) == 55_050
    mlp_big = [dense_param_count(a, b) for a, b in [(784, 512), (512, 512), (512, 10)]]
    assert sum(mlp_big) == 669_706
    assert dense_param_count(784, 10, use_bias=False) == 7_840


def test_parameter_counts_match_keras():
    keras = pytest.importorskip("keras")
    conv = keras.layers.Conv2D(64, (3, 5))
    conv.build((None, 28, 28, 32))
    assert conv.count_params() == conv_param_count((3, 5), 32, 64)
    dense = keras.layers.Dense(10)
    dense.build((None, 64))
    assert dense.count_params() == dense_param_count(64, 10)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, pattern", [
    (lambda: conv_output_size(5, 3, stride=0), r"stride must be >= 1, got 0"),
    (lambda: conv_output_size(5, 3, dilation=0), r"dilation must be >= 1, got 0"),
    (lambda: conv_output_size(5, 3, padding=-1), r"padding must be >= 0, got -1"),
    (lambda: conv_output_size(5, 3, padding=(1, -2)), r"padding after must be >= 0, got -2"),
    (lambda: conv_output_size(0, 3), r"input size must be >= 1, got 0"),
    (lambda: conv_output_size(5, 0), r"kernel_size must be >= 1, got 0"),
    (lambda: conv_output_size(5, 6), r"kernel_size=6 is larger than the padded input: 5 \+ 0 \+ 0 = 5"),
    (lambda: conv_output_size(5, 3, dilation=3),
     r"kernel_size=3 with dilation 3 \(effective size 7\) is larger than the padded input: "
     r"5 \+ 0 \+ 0 = 5"),
    (lambda: conv_output_size(5.0, 3), r"input size must be an integer, got 5.0"),
    (lambda: conv_output_size(5, 3, stride=1.5), r"stride must be an integer, got 1.5"),
    (lambda: conv_output_size(5, "3"), r"kernel_size must be an integer, got '3'"),
    (lambda: conv_output_size(5, 3, padding=True), r"padding must be an integer, got True"),
    (lambda: conv_output_size(5, 3, padding="full"), r"padding must be 'valid' or 'same'.*'full'"),
    (lambda: conv_output_size(5, 3, padding=(1, 2, 3)),
     r"padding must be \(before, after\), got \(1, 2, 3\)"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), strides=(1, 0)),
     r"strides\[1\] \(width\) must be >= 1, got 0"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), dilation=(0, 1)),
     r"dilation\[0\] \(height\) must be >= 1, got 0"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), padding=((0, 0), (-1, 0))),
     r"padding left must be >= 0, got -1"),
    (lambda: conv_geometry((1, 5, 4, 1), (3, 5, 1, 1)),
     r"kernel_size \(width\)=5 is larger than the padded input \(width\): 4 \+ 0 \+ 0 = 4"),
    (lambda: conv_geometry((1, 0, 5, 1), (3, 3, 1, 1)), r"x height must be >= 1, got 0"),
    (lambda: conv_geometry((1, 5, 5, 2), (3, 3, 1, 1)), r"channel mismatch: x has 2 channels.*expects 1"),
    (lambda: conv_geometry((5, 5, 2), (3, 3, 2, 1)), r"x must have rank 4.*\(5, 5, 2\)"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1)), r"w must have rank 4.*\(3, 3, 1\)"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), padding="full"), r"padding must be.*'full'"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), padding=[[1, 0], [1, 1], [1, 1], [0, 0]]),
     r"padding: batch and channel pads must be \(0, 0\)"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1), padding=(1, 2, 3)), r"padding must be 'valid'"),
    (lambda: conv_geometry((1, 5, 5, 1), (3, 3, 1, 1)).with_batch(-1), r"batch must be >= 0, got -1"),
    (lambda: conv_param_count(3, 0, 4), r"in_channels must be >= 1, got 0"),
    (lambda: conv_param_count((3, 3, 3), 1, 4), r"kernel_size must be an int or a pair"),
    (lambda: dense_param_count(784, 0), r"out_features must be >= 1, got 0"),
    (lambda: shapes.dense_geometry((2, 3), (4, 5)), r"feature mismatch: x has 3 features.*expects 4"),
])
def test_bad_geometry_raises_naming_the_parameter(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_numpy_integers_are_accepted():
    assert conv_output_size(np.int64(28), np.int32(3), stride=np.int64(1)) == 26
    g = conv_geometry(np.array([1, 9, 9, 1]), np.array([3, 3, 1, 2]), strides=np.int64(2))
    assert (g.out_h, g.out_w) == (4, 4)
