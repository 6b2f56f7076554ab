"""Grouped convolution (``groups=G``, depthwise G = C) in every kernel set, against the NumPy
reference and TensorFlow's own grouped ``tf.nn.conv2d`` (values and gradients).

Kernel sets: the reference, Numba CPU, C++ CPU (``cpp`` on host arrays), Numba CUDA (on the
simulator: tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1) and the TF native ops' groups attr.
The C++ CUDA kernels run grouped geometries under the CPU emulator (tests/test_cuda_emu.py);
the Keras layers on each backend in tests/keras_suite/test_groups_layers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import dlconv.ops as ops
from dlconv import reference as ref
from dlconv.shapes import ConvGeometry, conv_geometry, conv_param_count

RTOL = 1e-4


def _tol(k):
    """Absolute tolerance for a sum of k products of O(1) float32 terms."""
    return 1e-4 * max(1.0, np.sqrt(k))


@st.composite
def grouped_cases(draw, max_hw=9):
    """A grouped geometry (groups 1, 2 or C; depth multiplier 1-3), stride, dilation,
    asymmetric pads, ragged sizes."""
    cg = draw(st.sampled_from((1, 2, 3)))
    groups = draw(st.sampled_from((1, 2, 3, 4)))
    c = cg * groups
    fg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - pads[0] - pads[1]), max_hw))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - pads[2] - pads[3]), max_hw))
    n = draw(st.integers(1, 2))
    g = conv_geometry((n, h, w, c), (kh, kw, cg, fg * groups), (sh, sw),
                      ((pads[0], pads[1]), (pads[2], pads[3])), (dh, dw), groups)
    return g, draw(st.sampled_from(("linear", "relu", "tanh"))), draw(st.integers(0, 2**31 - 1))


def _arrays(g, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    b = rng.standard_normal(g.filters).astype(np.float32)
    dy = rng.standard_normal(g.y_shape).astype(np.float32)
    return x, w, b, dy


def _close(got, want, k, what):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=_tol(k), err_msg=what)


# ----------------------------------------------------------------------------- shapes
def test_param_counts_and_weight_shape():
    assert conv_param_count(3, 32, 64, groups=4) == 3 * 3 * 8 * 64 + 64
    assert conv_param_count((3, 5), 6, 12, use_bias=False, groups=6) == 3 * 5 * 1 * 12
    g = conv_geometry((2, 8, 8, 12), (3, 3, 4, 6), groups=3)
    assert g.w_shape == (3, 3, 4, 6) and (g.group_in_c, g.group_filters) == (4, 2)
    assert g.weight_count == 3 * 3 * 4 * 6 and g.gemm_k == 36
    assert g.as_tuple()[-1] == 3 and ConvGeometry.FIELDS[-1] == "groups"
    assert conv_geometry((1, 4, 4, 3), (3, 3, 3, 5)).groups == 1


@pytest.mark.parametrize("call, match", [
    (lambda: conv_geometry((1, 5, 5, 6), (3, 3, 3, 5), groups=2), r"groups=2 must divide the filters.*5"),
    (lambda: conv_geometry((1, 5, 5, 6), (3, 3, 3, 4), groups=4), r"groups=4 must divide the input channels.*6"),
    (lambda: conv_geometry((1, 5, 5, 6), (3, 3, 2, 4), groups=2), r"2 per group x 2 groups = 4"),
    (lambda: conv_geometry((1, 5, 5, 6), (3, 3, 3, 4), groups=0), r"groups"),
    (lambda: conv_param_count(3, 6, 4, groups=4), r"groups=4 must divide in_channels=6 and filters=4"),
    (lambda: ConvGeometry(1, 5, 5, 6, 4, 3, 3, 1, 1, 1, 1, 0, 0, 0, 0, 3, 3, 4), r"groups=4 must divide"),
])
def test_bad_groups_are_refused_naming_the_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_op_api_groups_must_agree_with_a_given_geometry():
    g = conv_geometry((1, 5, 5, 4), (3, 3, 2, 4), groups=2)
    x, w = np.ones(g.x_shape, np.float32), np.ones(g.w_shape, np.float32)
    with pytest.raises(ValueError, match="groups=1.*groups=2"):
        ops.conv2d(x, w, geometry=g, groups=1)
    np.testing.assert_allclose(ops.conv2d(x, w, geometry=g, backend="reference"),
                               ops.conv2d(x, w, groups=2, backend="reference"))


def test_cpp_accepts_a_17_field_record_as_ungrouped():
    C = pytest.importorskip("dlconv._C")
    g = conv_geometry((1, 6, 5, 3), (3, 2, 3, 4), padding="same")
    x, w = _arrays(g, 3)[:2]
    np.testing.assert_allclose(C.conv2d_forward(x, w, None, g.as_tuple()[:17], 0),
                               C.conv2d_forward(x, w, None, g.as_tuple(), 0))
    with pytest.raises(ValueError, match="18 fields"):
        C.conv2d_forward(x, w, None, g.as_tuple()[:16], 0)
    bad = g.as_tuple()[:17] + (2,)      # 3 channels, 4 filters: 2 groups do not divide them
    with pytest.raises(ValueError, match="groups"):
        C.conv2d_forward(x, w, None, bad, 0)


# ----------------------------------------------------------------------------- reference vs TF
@settings(max_examples=25, deadline=None)
@given(grouped_cases())
def test_reference_matches_tensorflow_grouped_conv(case):
    """The oracle itself against tf.nn.conv2d with a grouped kernel (TF's CPU conv refuses
    dilation with stride, and grouped dilated gradients: dilated kernels are expanded with zeros)."""
    tf = pytest.importorskip("tensorflow")
    g, _, seed = case
    x, w, _, dy = _arrays(g, seed)
    we = np.zeros((g.k_h_eff, g.k_w_eff, g.group_in_c, g.filters), np.float32)
    we[::g.dil_h, ::g.dil_w] = w
    xt, wt = tf.constant(x), tf.constant(we)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        pads = [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]]
        z = tf.nn.conv2d(tf.pad(xt, pads), wt, strides=[1, g.stride_h, g.stride_w, 1], padding="VALID")
        loss = tf.reduce_sum(z * tf.constant(dy))
    dx_tf, dw_tf = tape.gradient(loss, [xt, wt])
    _close(ref.conv2d_forward(x, w, None, g), z.numpy(), g.gemm_k, "forward")
    _close(ref.conv2d_backward_data(dy, w, g), dx_tf.numpy(), g.k_h * g.k_w * g.filters, "dx")
    _close(ref.conv2d_backward_filter(x, dy, g)[0], dw_tf.numpy()[::g.dil_h, ::g.dil_w], g.gemm_m, "dw")


# ----------------------------------------------------------------------------- host kernels
def _check_backend(backend, g, act, seed, to=lambda a: a, back=lambda a: a, **kw):
    x, w, b, dy = _arrays(g, seed)
    y_ref = ref.conv2d_forward(x, w, b, g, act)
    y = back(ops.conv2d(to(x), to(w), to(b), activation=act, backend=backend, geometry=g, **kw))
    _close(y, y_ref, g.gemm_k, f"{backend} forward")
    dx = back(ops.conv2d_backward_data(to(dy), to(w), g.x_shape, backend=backend, geometry=g))
    _close(dx, ref.conv2d_backward_data(dy, w, g), g.k_h * g.k_w * g.filters, f"{backend} dx")
    dw, db = ops.conv2d_backward_filter(to(x), to(dy), g.w_shape, backend=backend, geometry=g)
    dw_ref, db_ref = ref.conv2d_backward_filter(x, dy, g)
    _close(back(dw), dw_ref, g.gemm_m, f"{backend} dw")
    _close(back(db), db_ref, g.gemm_m, f"{backend} db")
    if act != "linear":   # dL/dy with y: the activation derivative applied on the way
        dz = ref.activation_backward(dy, y_ref, act).astype(np.float32)
        dx2 = back(ops.conv2d_backward_data(to(dy), to(w), g.x_shape, backend=backend, geometry=g,
                                            y=to(y_ref), activation=act))
        _close(dx2, ref.conv2d_backward_data(dz, w, g), g.k_h * g.k_w * g.filters, f"{backend} dx(act)")
        dw2, _ = ops.conv2d_backward_filter(to(x), to(dy), g.w_shape, backend=backend, geometry=g,
                                            y=to(y_ref), activation=act)
        _close(back(dw2), ref.conv2d_backward_filter(x, dz, g)[0], g.gemm_m, f"{backend} dw(act)")


@settings(max_examples=40, deadline=None)
@given(grouped_cases())
def test_cpp_cpu_grouped_matches_reference(case):
    pytest.importorskip("dlconv._C")
    _check_backend("cpp", *case)


@settings(max_examples=25, deadline=None)
@given(grouped_cases())
def test_numba_cpu_grouped_matches_reference(case):
    _check_backend("numba", *case)


@pytest.mark.parametrize("variant", ["cpu_v2_regblock", "cpu_v1_direct"])
def test_numba_cpu_every_variant_runs_grouped(variant):
    g = conv_geometry((2, 7, 6, 6), (3, 3, 2, 9), 2, "same", 1, groups=3)
    _check_backend("numba", g, "relu", 5, variant=variant)


@pytest.mark.parametrize("geometry", [
    ((2, 9, 8, 16), (3, 3, 8, 32), (1, 1), "same", (1, 1), 2),              # Winograd per group
    ((2, 9, 10, 27), (3, 2, 9, 48), (2, 1), ((1, 0), (2, 1)), (1, 2), 3),  # direct per group, ragged
], ids=["g2_winograd", "g3_strided_dilated"])
def test_cpp_wide_groups_run_the_ungrouped_kernels_per_group(geometry):
    """Cg >= 8 and Fg >= 16: each group through cpu_conv.cpp's kernels on packed slices."""
    pytest.importorskip("dlconv._C")
    x_shape, w_shape, s, p, d, groups = geometry
    _check_backend("cpp", conv_geometry(x_shape, w_shape, s, p, d, groups), "tanh", 8)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("c, mult", [(16, 1), (7, 1), (70, 1), (5, 3)])
def test_depthwise_matches_reference(backend, c, mult):
    """G = C (depthwise), multiplier 1 (the dedicated C++ path: one vector, ragged, two steps of
    four chains with a ragged tail) and 3."""
    if backend == "cpp":
        pytest.importorskip("dlconv._C")
    g = conv_geometry((2, 9, 8, c), (3, 3, 1, c * mult), (2, 1), ((1, 0), (2, 1)), (1, 2), groups=c)
    _check_backend(backend, g, "relu", c)


# ----------------------------------------------------------------------------- Numba CUDA (simulator)
def _cuda():
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("no CUDA (and no simulator)")
    return cuda


@settings(max_examples=6, deadline=None)
@given(grouped_cases(max_hw=5))
def test_numba_cuda_grouped_matches_reference(case):
    cuda = _cuda()
    g, act, seed = case
    g = g.with_batch(1)
    _check_backend("numba", g, act, seed, to=cuda.to_device, back=lambda a: a.copy_to_host())


@pytest.mark.parametrize("variant", ["cuda_v1_direct", "cuda_v2_halotile", "cuda_v3_regblock"])
def test_numba_cuda_every_variant_runs_grouped(variant):
    """Grouped geometries run cuda_v1_direct (its per-group channel offsets) whichever variant is asked."""
    cuda = _cuda()
    g = conv_geometry((1, 5, 4, 4), (3, 2, 1, 8), 1, "same", (1, 2), groups=4)
    x, w, b, _ = _arrays(g, 9)
    y = ops.conv2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), backend="numba",
                   variant=variant, geometry=g).copy_to_host()
    _close(y, ref.conv2d_forward(x, w, b, g), g.gemm_k, variant)


# ----------------------------------------------------------------------------- TF native ops
def test_tf_native_ops_take_the_groups_attr():
    """DlconvConv2D and its two gradient ops with groups = 3 against the reference; the shape
    functions give the grouped kernel's shape; a non-dividing groups attr is refused."""
    tf = pytest.importorskip("tensorflow")
    from dlconv import tf_ops
    try:
        lib = tf_ops.load()
    except tf_ops.TFOpsUnavailable as exc:
        pytest.skip(f"the TF op library cannot be built here: {exc}")
    g = conv_geometry((2, 7, 6, 6), (3, 2, 2, 9), (2, 1), ((1, 2), (0, 1)), (1, 2), groups=3)
    x, w, b, dy = _arrays(g, 11)
    attrs = dict(strides=[g.stride_h, g.stride_w], dilations=[g.dil_h, g.dil_w],
                 pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right], groups=3)
    y = lib.dlconv_conv2d(x, w, b, activation="relu", **attrs).numpy()
    y_ref = ref.conv2d_forward(x, w, b, g, "relu")
    _close(y, y_ref, g.gemm_k, "tf forward")
    dx = lib.dlconv_conv2d_backprop_input(dy, w, y_ref, list(g.x_shape), activation="relu", **attrs).numpy()
    dz = ref.activation_backward(dy, y_ref, "relu").astype(np.float32)
    _close(dx, ref.conv2d_backward_data(dz, w, g), g.k_h * g.k_w * g.filters, "tf dx")
    dw, db = lib.dlconv_conv2d_backprop_filter(x, dy, y_ref, kernel_size=[3, 2], activation="relu", **attrs)
    assert tuple(dw.shape) == g.w_shape
    dw_ref, db_ref = ref.conv2d_backward_filter(x, dz, g)
    _close(dw.numpy(), dw_ref, g.gemm_m, "tf dw")
    _close(db.numpy(), db_ref, g.gemm_m, "tf db")
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="groups"):
        lib.dlconv_conv2d(x, w, b, **dict(attrs, groups=4))


# ----------------------------------------------------------------------------- plain torch / JAX
def test_plain_torch_and_jax_conv2d_take_groups():
    """dlconv.torch.conv2d and dlconv.jax.conv2d with groups: values and gradients vs the reference."""
    g = conv_geometry((2, 6, 5, 6), (3, 3, 2, 6), 1, "same", 1, groups=3)
    x, w, b, dy = _arrays(g, 21)
    want = (ref.conv2d_forward(x, w, b, g), ref.conv2d_backward_data(dy, w, g),
            ref.conv2d_backward_filter(x, dy, g)[0])
    torch = pytest.importorskip("torch")
    import dlconv.torch as dt
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = dt.conv2d(xt, wt, torch.tensor(b), padding="same", groups=3, backend="cpp")
    (y * torch.tensor(dy)).sum().backward()
    for got, exp, what in zip((y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()), want, ("y", "dx", "dw")):
        _close(got, exp, g.gemm_m, f"torch {what}")
    jax = pytest.importorskip("jax")
    import dlconv.jax as dj

    def loss(x_, w_):
        return (dj.conv2d(x_, w_, b, padding="same", groups=3, backend="cpp") * dy).sum()

    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    _close(np.asarray(dj.conv2d(x, w, b, padding="same", groups=3, backend="cpp")), want[0], g.gemm_k, "jax y")
    _close(np.asarray(gx), want[1], g.gemm_m, "jax dx")
    _close(np.asarray(gw), want[2], g.gemm_m, "jax dw")
