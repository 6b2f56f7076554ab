"""dlconv.layers.Conv2DTranspose on the current Keras backend (tensorflow, torch or jax): values
and gradients (input, kernel, bias) equal to the stock ``keras.layers.Conv2DTranspose`` over
generated geometries (stride, output_padding, "same"/"valid", dilation, ragged sizes), the
output-size rule of dlconv.shapes against Keras', the config and ``.keras`` round trip, the
errors, and ``dlconv explain --transposed`` evaluated against the layer.  Started per backend
by tests/test_keras_backends.py; by hand:

    DLCONV_KERAS_SUITE=1 KERAS_BACKEND=jax pytest tests/keras_suite/test_conv_transpose.py
"""

import itertools
import os
import sys

import keras
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from keras.src.backend.common.backend_utils import _get_output_shape_given_tf_padding

sys.path.insert(0, os.path.dirname(__file__))
from conftest import cpu_backend_params  # noqa: E402  (tests/conftest.py)
from backend_grads import grads  # noqa: E402

import dlconv.layers as dl
from dlconv import explain, ops as dops
from dlconv.shapes import conv_transpose_geometry, conv_transpose_output_size

BACKEND = keras.config.backend()
BACKENDS = cpu_backend_params()
#: Generated geometries per kernel set: each costs ~30 ms on TensorFlow and torch, ~1-3 s on JAX
#: (every new geometry is traced and compiled, for the stock layer as for dlconv's).
EXAMPLES = 5 if BACKEND == "jax" else 25


def _close(a, b, rtol=1e-5, what=""):
    scale = max(float(np.abs(b).max()), 1e-30) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def _twins(x_shape, **kwargs):
    ours = dl.Conv2DTranspose(**kwargs)
    stock = keras.layers.Conv2DTranspose(**{k: v for k, v in kwargs.items() if k != "backend"})
    ours.build(x_shape)
    stock.build(x_shape)
    rng = np.random.default_rng(len(str(kwargs)))
    weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in stock.get_weights()]
    stock.set_weights(weights)
    ours.set_weights(weights)
    return ours, stock


def _differs(a, b, rtol):
    scale = max(float(np.abs(b).max()), 1e-30) if b.size else 1.0
    return not np.allclose(a, b, rtol=rtol, atol=rtol * scale)


def _check_twins(ours, stock, x, rtol=1e-5):
    y_stock = keras.ops.convert_to_numpy(stock(x))
    dy = np.random.default_rng(7).standard_normal(y_stock.shape).astype(np.float32)
    y1, gx1, gv1 = grads(ours, x, dy)
    y2, gx2, gv2 = grads(stock, x, dy)
    assert y1.shape == y2.shape == tuple(ours.compute_output_shape(x.shape))
    # The stock gradients are wrong for a few strided geometries where dL/dx is a convolution
    # with a one-column output (input 2x1, kernel 2x4, strides (1, 3)): TensorFlow's oneDNN
    # Conv2D gives 0 for a row (right with TF_ENABLE_ONEDNN_OPTS=0), torch's CPU conv 1e28
    # (memory never written).  Where a stock GRADIENT disagrees with a second dlconv kernel
    # set (the NumPy reference, or numba when the reference is under test; both checked
    # against the stock layer elsewhere and against the zero-insertion construction below),
    # that one is the expected value.  The forward is always compared with the stock layer.
    if _differs(gx1, gx2, 10 * rtol) or any(_differs(a, b, 10 * rtol) for a, b in zip(gv1, gv2)):
        other = dl.Conv2DTranspose.from_config(
            {**ours.get_config(), "backend": "numba" if ours.backend == "reference" else "reference"})
        other.build(x.shape)
        other.set_weights(ours.get_weights())
        _, gx3, gv3 = grads(other, x, dy)
        gx2 = gx3 if _differs(gx2, gx3, 10 * rtol) else gx2
        gv2 = [c if _differs(b, c, 10 * rtol) else b for b, c in zip(gv2, gv3)]
    _close(y1, y2, rtol, "forward")
    _close(gx1, gx2, 10 * rtol, "dL/dx")
    assert len(gv1) == len(gv2) == (2 if ours.use_bias else 1)
    for v, a, b in zip(stock.trainable_variables, gv1, gv2):
        _close(a, b, 10 * rtol, f"dL/d{v.path}")


geometry = st.fixed_dictionaries({
    "size": st.tuples(st.integers(1, 7), st.integers(1, 7)),
    "channels": st.integers(1, 3),
    "filters": st.integers(1, 4),
    "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)),
    # Keras refuses strides > 1 together with dilation > 1
    "step": st.sampled_from([("strides", (1, 1)), ("strides", (2, 2)), ("strides", (3, 2)),
                             ("strides", (1, 3)), ("dilation_rate", (2, 1)), ("dilation_rate", (2, 3))]),
    "padding": st.sampled_from(["valid", "same"]),
    "output_padding": st.sampled_from([None, "zero", "max", "mixed"]),
    "use_bias": st.booleans(),
    "activation": st.sampled_from([None, "relu", "tanh"]),
})


def _output_padding(kind, strides):
    if kind is None:
        return None
    return {"zero": (0, 0), "max": (strides[0] - 1, strides[1] - 1),
            "mixed": (strides[0] - 1, 0)}[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(g=geometry)
def test_conv2d_transpose_equals_stock_values_and_gradients(backend, g):
    h, w = g["size"]
    step_name, step = g["step"]
    strides = step if step_name == "strides" else (1, 1)
    kwargs = dict(filters=g["filters"], kernel_size=g["kernel"], padding=g["padding"],
                  output_padding=_output_padding(g["output_padding"], strides),
                  use_bias=g["use_bias"], activation=g["activation"], **{step_name: step})
    x_shape = (2, h, w, g["channels"])
    try:
        out = keras.layers.Conv2DTranspose(**kwargs).compute_output_shape(x_shape)
    except ValueError:
        out = (0,)
    if 0 in out or any(d is not None and d <= 0 for d in out):
        with pytest.raises(ValueError, match="output_padding"):
            dl.Conv2DTranspose(backend=backend, **kwargs).compute_output_shape(x_shape)
        return                     # no output: nothing to compare
    ours, stock = _twins(x_shape, backend=backend, **kwargs)
    x = np.random.default_rng(h * w).standard_normal(x_shape).astype(np.float32)
    try:
        stock(x)
    except Exception:
        # TensorFlow's Conv2DBackpropInput refuses a "same" geometry whose output is not
        # ceil-divisible back to the input (e.g. size 2, kernel 2, output_padding 0: output 1),
        # which JAX and torch compute (Keras' rule, the one dlconv follows): compare with the
        # framework-free op there.
        assert BACKEND == "tensorflow" and kwargs["padding"] == "same"
        kernel = stock.get_weights()[0]
        expected = dops.conv2d_transpose(x, kernel, strides=strides, padding="same",
                                         output_padding=kwargs["output_padding"],
                                         dilation=kwargs.get("dilation_rate", 1), backend="reference")
        ours.activation, ours.use_bias = None, False
        _close(keras.ops.convert_to_numpy(ours(x)), expected, 1e-5, "forward (stock TF refuses)")
        return
    _check_twins(ours, stock, x)


def test_output_size_rule_equals_keras():
    """dlconv.shapes' transposed output size is Keras' (its TensorFlow-padding helper, which
    every backend's result shape follows), for every small geometry; a size of 0 is a
    ValueError naming output_padding."""
    for i, k, s, d, pad, op in itertools.product(range(1, 6), range(1, 5), range(1, 4), (1, 2),
                                                 ("valid", "same"), (None, 0, 1, 2)):
        if (op is not None and op >= s) or (s > 1 and d > 1):
            continue
        expected = _get_output_shape_given_tf_padding(i, k, s, pad, op, d)
        if expected < 1:
            with pytest.raises(ValueError, match="output_padding"):
                conv_transpose_output_size(i, k, s, pad, op, d)
        else:
            assert conv_transpose_output_size(i, k, s, pad, op, d) == expected, (i, k, s, d, pad, op)


def test_bad_geometry_names_the_parameter():
    with pytest.raises(ValueError, match=r"output_padding \(height\)=2 must be smaller than the stride 2"):
        conv_transpose_geometry((1, 4, 4, 1), (3, 3, 1, 1), 2, "same", (2, 0))
    with pytest.raises(ValueError, match="padding for a transposed convolution must be 'valid' or 'same'"):
        conv_transpose_geometry((1, 4, 4, 1), (3, 3, 1, 1), 1, 1)
    with pytest.raises(ValueError, match="channel mismatch"):
        conv_transpose_geometry((1, 4, 4, 2), (3, 3, 1, 3), 1, "valid")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_channels_first_and_unbiased(data_format):
    x_shape = (2, 3, 5, 4) if data_format == "channels_first" else (2, 5, 4, 3)
    ours, stock = _twins(x_shape, filters=2, kernel_size=3, strides=2, padding="same",
                         output_padding=1, data_format=data_format, use_bias=False, backend="reference")
    _check_twins(ours, stock, np.random.default_rng(2).standard_normal(x_shape).astype(np.float32))


def test_config_and_keras_file_round_trip(tmp_path):
    layer = dl.Conv2DTranspose(3, (3, 2), strides=(2, 1), padding="same", output_padding=(1, 0),
                               activation="relu", backend="cpp")
    config = layer.get_config()
    stock_keys = set(keras.layers.Conv2DTranspose(3, 3).get_config())
    assert set(config) == stock_keys | {"backend"}
    assert config["output_padding"] == (1, 0) and config["backend"] == "cpp"
    again = dl.Conv2DTranspose.from_config(config)
    assert again.get_config() == config
    model = keras.Sequential([keras.Input((5, 4, 2)), layer])
    x = np.random.default_rng(0).standard_normal((2, 5, 4, 2)).astype(np.float32)
    y = keras.ops.convert_to_numpy(model(x))
    path = tmp_path / "t.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.layers[0]) is dl.Conv2DTranspose
    _close(keras.ops.convert_to_numpy(loaded(x)), y, 1e-6, "loaded model")


def test_ops_conv2d_transpose_is_zero_insertion_then_convolution():
    """The framework-free op against conv_arithmetic's construction: insert S - 1 zeros
    between the inputs, pad by (N_eff - 1 - P_before, N_eff - 1 - P_after + a) and convolve
    with the flipped kernel (stride 1), for a few geometries with a != 0."""
    rng = np.random.default_rng(3)
    for shape, k, s, pad, op, d in [((1, 4, 3, 2), (3, 3), (2, 2), "valid", (1, 1), (1, 1)),
                                    ((2, 3, 5, 1), (2, 3), (3, 2), "same", (2, 1), (1, 1)),
                                    ((1, 5, 4, 3), (3, 2), (1, 1), "same", None, (2, 2))]:
        w = rng.standard_normal(k + (4, shape[3])).astype(np.float32)
        x = rng.standard_normal(shape).astype(np.float32)
        g = conv_transpose_geometry(shape, w.shape, s, pad, op, d)
        z = np.zeros((shape[0], (shape[1] - 1) * s[0] + 1, (shape[2] - 1) * s[1] + 1, shape[3]), np.float32)
        z[:, ::s[0], ::s[1]] = x
        keh, kew = g.k_h_eff, g.k_w_eff
        top, left = keh - 1 - g.pad_top, kew - 1 - g.pad_left
        bottom = g.in_h + keh - 1 - top - z.shape[1]
        right = g.in_w + kew - 1 - left - z.shape[2]
        zp = np.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0)))
        wf = w[::-1, ::-1].transpose(0, 1, 3, 2)          # flipped, (kh, kw, in_channels, filters)
        expected = np.zeros(g.x_shape, np.float64)
        for i, j in itertools.product(range(k[0]), range(k[1])):
            tap = zp[:, i * d[0]:i * d[0] + g.in_h, j * d[1]:j * d[1] + g.in_w]
            expected += np.einsum("nhwc,cf->nhwf", tap, wf[i, j])
        for backend in ("reference", "numba", "cpp"):
            y = dops.conv2d_transpose(x, w, strides=s, padding=pad, output_padding=op, dilation=d,
                                      backend=backend)
            _close(y, expected.astype(np.float32), 1e-5, f"{backend} {shape} {k} {s} {pad} {op}")


@pytest.mark.parametrize("case", [dict(size=(3, 2), kernel_size=3, strides=2, padding="valid", output_padding=1),
                                  dict(size=(4, 3), kernel_size=(3, 2), strides=(2, 3), padding="same",
                                       output_padding=(1, 2)),
                                  dict(size=(3, 3), kernel_size=2, dilation_rate=2, padding="same")])
def test_explain_transposed_is_what_the_layer_computes(case):
    """``dlconv explain --transposed`` of the layer's geometry, its sums dI = Σ w·dO evaluated
    with the layer's input as dO and its kernel as w, equals the layer's output (no bias)."""
    case = dict(case)
    h, w = case.pop("size")
    in_c, filters = 2, 3
    layer = dl.Conv2DTranspose(filters, use_bias=False, backend="reference", **case)
    x_shape = (1, h, w, in_c)
    layer.build(x_shape)
    rng = np.random.default_rng(11)
    kernel = rng.standard_normal(layer.kernel.shape).astype(np.float32)
    layer.set_weights([kernel])
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = keras.ops.convert_to_numpy(layer(x))[0]
    g = conv_transpose_geometry(x_shape, kernel.shape, layer.strides, layer.padding,
                                layer.output_padding, layer.dilation_rate)
    e = explain(g, transposed=True)
    # explain's forward convolution runs from the layer's output (I, channel c = a filter of
    # the layer) to its input (O, filter letter = an input channel of the layer)
    assert (g.in_h, g.in_w, g.in_c) == y.shape and g.filters == in_c
    got = np.zeros_like(y)
    per = g.out_h * g.out_w
    for r in e.reverse:
        for t in r.terms:
            f = (t.output - 1) // per
            kh, kw = divmod(t.weight - 1, g.k_w)
            got[r.row - 1, r.col - 1, r.channel - 1] += kernel[kh, kw, r.channel - 1, f] * \
                x[0, t.row - 1, t.col - 1, f]
    assert len(e.reverse) == y.size
    _close(got, y, 1e-5, "explain --transposed vs the layer")


def test_bridge_compiled_path():
    """The bridge under the backend's compiler: TensorFlow's tf.function graph (native op with
    its registered gradient and no Python callback where the op library is loaded), torch's
    opcheck (fake tensors, autograd registration, AOT dispatch: what torch.compile uses), JAX's jit of the gradient (the FFI path with
    the cpp backend) — each equal to the eager result."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    w = rng.standard_normal((3, 2, 5, 2)).astype(np.float32)
    kw = dict(strides=(2, 3), padding="same", output_padding=(1, 2), dilation=(1, 1), backend="cpp")
    y_ref = dops.conv2d_transpose(x, w, backend="reference", **{k: v for k, v in kw.items()
                                                                if k != "backend"})
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref, dw_ref, _ = dops.conv2d_transpose_backward(dy, x, w, backend="reference", strides=(2, 3),
                                                       padding="same", output_padding=(1, 2))
    if BACKEND == "tensorflow":
        import tensorflow as tf
        from dlconv.bridges import tensorflow as bridge

        @tf.function
        def step(xt, wt):
            with tf.GradientTape() as tape:
                tape.watch([xt, wt])
                y = bridge.conv2d_transpose(xt, wt, **kw)
                loss = tf.reduce_sum(y * dy)
            return (y, *tape.gradient(loss, [xt, wt]))

        y, dx, dw = (t.numpy() for t in step(tf.constant(x), tf.constant(w)))
        graph = step.get_concrete_function(tf.constant(x), tf.constant(w)).graph
        types = {op.type for op in graph.get_operations()}
        if bridge.uses_native("cpp"):
            assert "DlconvConv2DBackpropInput" in types and not types & {"PyFunc", "EagerPyFunc"}
    elif BACKEND == "torch":
        import torch
        from dlconv.bridges import torch as bridge

        xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
        s, p, d, out_hw = bridge._transpose_args((3, 4, 2), w.shape, (2, 3), "same", (1, 2), (1, 1))
        torch.library.opcheck(torch.ops.dlconv.conv2d_transpose, (xt, wt, s, p, d, out_hw, "cpp"))
        yt = bridge.conv2d_transpose(xt, wt, **kw)
        (yt * torch.tensor(dy)).sum().backward()
        y, dx, dw = yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()
    else:
        import jax
        from dlconv.bridges import jax as bridge

        def loss(a, b):
            y = bridge.conv2d_transpose(a, b, **kw)
            return (y * dy).sum(), y

        (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        y, dx, dw = np.asarray(y), np.asarray(dx), np.asarray(dw)
    _close(y, y_ref, 1e-5, "y")
    _close(dx, dx_ref, 1e-4, "dL/dx")
    _close(dw, dw_ref, 1e-4, "dL/dw")
