"""dlconv's TensorFlow op library (dlconv.tf_ops, csrc/tf_ops.cpp) against the NumPy reference
and TensorFlow's own ops: values and gradients over generated geometries (eager and in
tf.function), the shape functions against dlconv.shapes, bad attrs and shapes, the graph of a
Keras train step (no PyFunc), a SavedModel in a fresh process, and the fallback when the
library cannot be built.

The first test that loads the library builds it if this TensorFlow + these sources have no
cached build yet (about a minute on two cores; see dlconv.tf_ops).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from dlconv import reference, tf_ops  # noqa: E402
from dlconv.shapes import conv_geometry  # noqa: E402

LIB = tf_ops.load()     # a failure here is the reason, raised: these tests need the library
from dlconv.bridges import tensorflow as tf_bridge  # noqa: E402

ACTS = ("linear", "relu", "sigmoid", "tanh")
RTOL = 2e-5


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.size == 0:
        return
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _tf_act(z, act):
    return {"linear": tf.identity, "relu": tf.nn.relu, "sigmoid": tf.sigmoid, "tanh": tf.tanh,
            "softmax": tf.nn.softmax}[act](z)


# ----------------------------------------------------------------------------- geometries
@st.composite
def conv_cases(draw):
    n = draw(st.integers(0, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    c, f = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]),
                             st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                       st.tuples(st.integers(0, 2), st.integers(0, 2)))))
    try:
        g = conv_geometry((n, h, w, c), (kh, kw, c, f), strides, padding, dilation)
    except ValueError:
        g = conv_geometry((n, max(h, 7), max(w, 7), c), (kh, kw, c, f), strides, "same", dilation)
        padding = "same"
    return g, padding, draw(st.booleans()), draw(st.sampled_from(ACTS)), draw(st.integers(0, 2**31 - 1))


def _pads(g):
    return [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right]


def _conv_attrs(g, act):
    return dict(strides=[g.stride_h, g.stride_w], dilations=[g.dil_h, g.dil_w], pads=_pads(g), activation=act)


def _conv_data(g, seed, use_bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = (rng.standard_normal(g.w_shape) * 0.5).astype(np.float32)
    b = rng.standard_normal(g.filters).astype(np.float32) if use_bias else np.zeros(0, np.float32)
    r = rng.standard_normal(g.y_shape).astype(np.float32)
    return x, w, b, r


def _native_conv_with_grads(g, act, x, w, b, r, in_function):
    """(y, dx, dw, db) of L = sum(y * r) through DlconvConv2D and its registered gradient."""
    def run(x, w, b):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            y = LIB.dlconv_conv2d(x, w, b, **_conv_attrs(g, act))
            loss = tf.reduce_sum(y * r)
        dx, dw, db = tape.gradient(loss, [x, w, b])
        return y, dx, dw, db
    fn = tf.function(run) if in_function else run
    return fn(tf.constant(x), tf.constant(w), tf.constant(b))


@settings(max_examples=25)
@given(conv_cases(), st.booleans())
def test_conv_ops_match_reference_and_tf(case, in_function):
    g, padding, use_bias, act, seed = case
    x, w, b, r = _conv_data(g, seed, use_bias)
    y, dx, dw, db = _native_conv_with_grads(g, act, x, w, b, r, in_function)

    # The NumPy reference: forward, then dz = act'(y) * r into backward-data / -filter.
    y_ref = reference.conv2d_forward(x, w, b if use_bias else None, g, act)
    assert_close(y, y_ref, what="y vs reference")
    dz = reference.activation_backward(r, y_ref, act)
    assert_close(dx, reference.conv2d_backward_data(dz, w, g), what="dx vs reference")
    dw_ref, db_ref = reference.conv2d_backward_filter(x, dz, g)
    assert_close(dw, dw_ref, what="dw vs reference")
    if use_bias:
        assert_close(db, db_ref, what="db vs reference")
    else:
        assert db is None    # no bias: no gradient to the empty bias input

    # TensorFlow's own conv2d (explicit pads: the same numbers dlconv.shapes resolved).
    if g.batch == 0 or (max(g.stride_h, g.stride_w) > 1 and max(g.dil_h, g.dil_w) > 1):
        return   # TF's CPU conv2d refuses strides > 1 together with dilation > 1
    xt, wt, bt = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt, bt])
        z = tf.nn.conv2d(xt, wt, [1, g.stride_h, g.stride_w, 1],
                         [[0, 0], [g.pad_top, g.pad_bottom], [g.pad_left, g.pad_right], [0, 0]],
                         dilations=[1, g.dil_h, g.dil_w, 1])
        if use_bias:
            z = z + bt
        loss = tf.reduce_sum(_tf_act(z, act) * r)
    assert_close(y, _tf_act(z, act), what="y vs tf.nn.conv2d")
    if max(g.dil_h, g.dil_w) > 1:
        return   # TF's CPU conv2d backprop refuses dilation > 1 (the reference checked those above)
    tx, tw, tb = tape.gradient(loss, [xt, wt, bt])
    assert_close(dx, tx, what="dx vs tf")
    assert_close(dw, tw, what="dw vs tf")
    if use_bias:
        assert_close(db, tb, what="db vs tf")


@settings(max_examples=20)
@given(st.integers(0, 6), st.integers(1, 20), st.integers(1, 12), st.booleans(),
       st.sampled_from(ACTS + ("softmax",)), st.booleans(), st.integers(0, 2**31 - 1))
def test_dense_ops_match_reference_and_tf(m, k, n, use_bias, act, in_function, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.5).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if use_bias else np.zeros(0, np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32)

    def run(x, w, b):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, w, b])
            y = LIB.dlconv_dense(x, w, b, activation=act)
            z = tf.matmul(x, w) + (b if use_bias else 0.0)
            y_tf = _tf_act(z, act)
            loss, loss_tf = tf.reduce_sum(y * r), tf.reduce_sum(y_tf * r)
        return y, tape.gradient(loss, [x, w, b]), y_tf, tape.gradient(loss_tf, [x, w, b])
    fn = tf.function(run) if in_function else run
    y, grads, y_tf, grads_tf = fn(tf.constant(x), tf.constant(w), tf.constant(b))

    y_ref = reference.dense_forward(x, w, b if use_bias else None, act)
    assert_close(y, y_ref, what="y vs reference")
    assert_close(y, y_tf, what="y vs tf.matmul")
    dx_ref, dw_ref, db_ref = reference.dense_backward(x, w, r, y_ref, act)
    for got, ref, tfg, name in zip(grads, (dx_ref, dw_ref, db_ref), grads_tf, ("dx", "dw", "db")):
        if name == "db" and not use_bias:
            assert got is None
            continue
        assert_close(got, ref, what=f"{name} vs reference")
        assert_close(got, tfg, what=f"{name} vs tf")


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("k, n, act", [(9216, 128, "relu"), (128, 10, "softmax"), (300, 65, "tanh")])
def test_dense_op_at_inference_batches(m, k, n, act):
    """The MNIST CNN's dense layers at batch 1 and 8 (csrc/cpu_dense.cpp's few-rows path) and a
    ragged panel, through the native op, eager and in tf.function, against the reference and
    tf.matmul; the gradient against TensorFlow's."""
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32)
    y_ref = reference.dense_forward(x, w, b, act)
    for fn in (LIB.dlconv_dense, tf.function(LIB.dlconv_dense)):
        assert_close(fn(x, w, b, activation=act), y_ref, rtol=1e-4, what=f"y vs reference ({fn})")
    xt, wt, bt = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, wt, bt])
        y = LIB.dlconv_dense(xt, wt, bt, activation=act)
        y_tf = _tf_act(tf.matmul(xt, wt) + bt, act)
        loss, loss_tf = tf.reduce_sum(y * r), tf.reduce_sum(y_tf * r)
    assert_close(y, y_tf, rtol=1e-4, what="y vs tf.matmul")
    for got, want, name in zip(tape.gradient(loss, [xt, wt, bt]), tape.gradient(loss_tf, [xt, wt, bt]),
                               ("dx", "dw", "db")):
        assert_close(got, want, rtol=1e-4, what=f"{name} vs tf")


def test_info_states_the_native_ops_threads(monkeypatch):
    """dlconv info's TensorFlow line says which threads the native ops use, with the threshold
    csrc/tf_ops.cpp really has."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "tf_ops.cpp")).read()
    assert f"constexpr double SERIAL_FLOPS = {tf_ops.SERIAL_FLOPS:.0e};".replace("e+0", "e") in src
    monkeypatch.delenv(tf_ops.THREADING_SWITCH, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    why = tf_ops.status()["why"]
    assert "OpenMP team of 3 threads" in why and "calling TensorFlow thread" in why and tf_ops.THREADING_SWITCH in why


# ----------------------------------------------------------------------------- shapes
@settings(max_examples=20)
@given(conv_cases(), st.sampled_from(["batch", "height", "none"]))
def test_shape_functions_agree_with_dlconv_shapes(case, unknown):
    g, _, use_bias, act, _ = case
    x_spec = [None if unknown == "batch" else g.batch, None if unknown == "height" else g.in_h, g.in_w, g.in_c]
    b_len = g.filters if use_bias else 0

    @tf.function
    def fwd(x, w, b):
        return LIB.dlconv_conv2d(x, w, b, **_conv_attrs(g, act))

    cf = fwd.get_concrete_function(tf.TensorSpec(x_spec), tf.TensorSpec(g.w_shape), tf.TensorSpec([b_len]))
    expected = [x_spec[0], None if unknown == "height" else g.out_h, g.out_w, g.filters]
    assert cf.outputs[0].shape.as_list() == expected

    @tf.function
    def grads(x, w, y, dy):
        dx = LIB.dlconv_conv2d_backprop_input(dy, w, y, tf.shape(x), **_conv_attrs(g, act))
        dw, db = LIB.dlconv_conv2d_backprop_filter(x, dy, y, kernel_size=[g.k_h, g.k_w], **_conv_attrs(g, act))
        return dx, dw, db

    y_spec = tf.TensorSpec(expected)
    cf = grads.get_concrete_function(tf.TensorSpec(x_spec), tf.TensorSpec(g.w_shape), y_spec, y_spec)
    assert cf.outputs[0].shape.as_list() == x_spec
    assert cf.outputs[1].shape.as_list() == list(g.w_shape)
    assert cf.outputs[2].shape.as_list() == [g.filters]


def test_dense_shape_function_keeps_unknown_batch():
    @tf.function
    def f(x, w, b):
        y = LIB.dlconv_dense(x, w, b, activation="softmax")
        return y, LIB.dlconv_dense_grad(x, w, y, y, activation="softmax")
    cf = f.get_concrete_function(tf.TensorSpec([None, 7]), tf.TensorSpec([7, 3]), tf.TensorSpec([0]))
    assert cf.outputs[0].shape.as_list() == [None, 3]
    assert [o.shape.as_list() for o in cf.outputs[1:]] == [[None, 7], [7, 3], [3]]


# ----------------------------------------------------------------------------- bad input
X = np.ones((1, 5, 5, 2), np.float32)
W = np.ones((3, 3, 2, 4), np.float32)
B = np.ones(4, np.float32)


@pytest.mark.parametrize("call, needle", [
    (lambda: LIB.dlconv_conv2d(X, W, B, strides=[0, 1]), "strides values must be in [1"),
    (lambda: LIB.dlconv_conv2d(X, W, B, strides=[1, 1, 1]), "strides must have 2 values, got [1, 1, 1]"),
    (lambda: LIB.dlconv_conv2d(X, W, B, pads=[1, 1, -1, 0]), "got [1, 1, -1, 0]"),
    (lambda: LIB.dlconv_conv2d(X, W, B, dilations=[3, 1]), "effective 7) is larger than the padded input height: 5"),
    (lambda: LIB.dlconv_conv2d(X, np.ones((3, 3, 3, 4), np.float32), B), "x has 2 channels but w expects 3"),
    (lambda: LIB.dlconv_conv2d(X, W, np.ones(3, np.float32)), "b must have 4 values (or 0 for no bias), got 3"),
    (lambda: LIB.dlconv_conv2d(X[0], W, B), "rank 4"),
    (lambda: LIB.dlconv_conv2d_backprop_input(np.ones((1, 3, 3, 4), np.float32), W, np.ones((1, 3, 3, 4), np.float32),
                                              [1, 6, 5, 2]), "dy has shape [1,3,3,4], expected [1,4,3,4]"),
    (lambda: LIB.dlconv_conv2d_backprop_input(np.ones((1, 3, 3, 4), np.float32), W, np.ones((1, 3, 3, 4), np.float32),
                                              [1, -5, 5, 2]), "x_shape[1] = -5 is negative"),
    (lambda: LIB.dlconv_conv2d_backprop_filter(X, np.ones((1, 3, 3, 4), np.float32), np.ones((1, 3, 3, 4), np.float32),
                                               kernel_size=[3, 0]), "kernel_size values must be in [1"),
    (lambda: LIB.dlconv_dense(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32), np.zeros(0, np.float32)),
     "3"),
    (lambda: LIB.dlconv_dense_grad(np.ones((2, 3), np.float32), np.ones((3, 5), np.float32),
                                   np.ones((2, 4), np.float32), np.ones((2, 4), np.float32), activation="relu"),
     "dy has shape [2,4], expected [2,5]"),
])
def test_bad_attrs_and_shapes_raise_invalid_argument(call, needle):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)) as info:
        call()
    assert needle in str(info.value)


@pytest.mark.parametrize("op, kwargs", [("dlconv_conv2d", {"activation": "gelu"}),
                                        ("dlconv_dense", {"activation": "swish"})])
def test_unknown_activation_is_refused_by_the_op_def(op, kwargs):
    args = (X, W, B) if op == "dlconv_conv2d" else (np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), B)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError, TypeError)) as info:
        getattr(LIB, op)(*args, **kwargs)
    assert kwargs["activation"] in str(info.value)


def test_bad_attrs_in_a_graph_fail_at_construction():
    @tf.function
    def f(x):
        return LIB.dlconv_conv2d(x, W, B, pads=[0, 0, 0])
    with pytest.raises(ValueError, match=r"pads \(top, bottom, left, right\) must have 4 values"):
        f.get_concrete_function(tf.TensorSpec([None, 5, 5, 2]))


# ----------------------------------------------------------------------------- Keras
def _cnn(stock=False):
    from dlconv import models
    return models.compile_model(models.cnn(backend="cpp", stock=stock, seed=0))


def test_keras_train_step_graph_holds_native_ops_and_no_pyfunc():
    model = _cnn()
    assert tf_bridge.uses_native("cpp")
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    y = np.arange(4) % 10
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)          # fit itself runs
    step = tf.function(model.train_step)
    cf = step.get_concrete_function((tf.TensorSpec([None, 28, 28, 1]), tf.TensorSpec([None], tf.int64)))
    types = set()
    graphs = [cf.graph] + [f for f in cf.graph._functions.values()]
    for gr in graphs:
        ops = gr.get_operations() if hasattr(gr, "get_operations") else gr.graph.get_operations()
        types |= {op.type for op in ops}
    assert {"DlconvConv2D", "DlconvConv2DBackpropFilter", "DlconvDense", "DlconvDenseGrad",
            "DlconvMaxPool2D", "DlconvMaxPool2DGrad", "DlconvDropout"} <= types   # pool and dropout: native too
    assert not types & {"PyFunc", "PyFuncStateless", "EagerPyFunc", "MaxPool", "MaxPoolGrad"}, sorted(types)


def test_keras_fit_matches_stock_model(monkeypatch):
    """Under identical dropout masks (dlconv.layers.Dropout sent to the stock draw: its own
    kernel draws other masks, tests/test_tf_dropout.py) the trained models agree."""
    import dlconv.layers as dl
    monkeypatch.setattr(dl.Dropout, "_use_dlconv", lambda self, inputs, training: False)
    ours, stock = _cnn(), _cnn(stock=True)
    stock.set_weights(ours.get_weights())
    rng = np.random.default_rng(1)
    x, y = rng.random((8, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 8)
    for m in (ours, stock):
        m.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    assert_close(ours.predict_on_batch(x), stock.predict_on_batch(x), rtol=1e-4)


# ----------------------------------------------------------------------------- SavedModel
def _python(code, env=None, cwd=None):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def test_saved_model_runs_in_a_fresh_process(tmp_path):
    model = _cnn()
    x = np.random.default_rng(2).random((3, 28, 28, 1), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict_on_batch(x))
    model.export(str(tmp_path / "saved"), verbose=False)
    check = f"""
        import numpy as np, tensorflow as tf
        {{load}}
        r = tf.saved_model.load({str(tmp_path / 'saved')!r})
        y = r.serve(tf.constant(np.load({str(tmp_path / 'x.npy')!r}))).numpy()
        print("MAXDIFF", float(np.abs(y - np.load({str(tmp_path / 'y.npy')!r})).max()))
    """
    loaders = {"dlconv.tf_ops": "import dlconv.tf_ops; dlconv.tf_ops.load()",
               "load_op_library": f"tf.load_op_library({tf_ops.library_path()!r})"}
    for name, load in loaders.items():
        p = _python(check.replace("{load}", load), cwd=str(tmp_path))
        assert p.returncode == 0, (name, p.stderr[-3000:])
        assert float(p.stdout.split("MAXDIFF")[1]) == 0.0, (name, p.stdout)
    # No dlconv import at all: TensorFlow's error names the op (DlconvConv2D).
    p = _python(check.replace("{load}", ""), cwd=str(tmp_path))
    assert p.returncode != 0
    assert "Op type not registered 'DlconvConv2D'" in p.stderr


# ----------------------------------------------------------------------------- fallback
def test_unbuildable_library_falls_back_to_callbacks_with_a_reason(tmp_path):
    code = """
        import json, numpy as np
        import dlconv.bridges.tensorflow as br, dlconv.info as info
        from dlconv import models
        m = models.cnn(backend="cpp", seed=0)
        y = m.predict_on_batch(np.zeros((2, 28, 28, 1), np.float32))
        try:
            m.export("saved_cb", verbose=False)
            refused = ""
        except RuntimeError as exc:
            refused = str(exc)
        print("RESULT", json.dumps({"native": br.uses_native("cpp"), "reason": br.NATIVE_REASON,
                                    "info": info.info()["tensorflow_ops"], "shape": list(y.shape),
                                    "refused": refused}))
    """
    for env, needle in (({"DLCONV_TF_OPS": "0"}, "DLCONV_TF_OPS=0"),
                        ({"CXX": "/bin/false", "DLCONV_TF_OPS_CACHE": str(tmp_path / "cache")}, "compiling")):
        p = _python(code, env=env, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.split("RESULT", 1)[1])
        assert out["native"] is False and needle in out["reason"], out
        assert out["info"]["native"] is False and needle in out["info"]["why"], out
        assert out["shape"] == [2, 10]
        # Exporting the callback path fails loudly, naming the layer and the reason.
        assert "cannot export a dlconv layer" in out["refused"] and "conv2d" in out["refused"], out
        assert needle in out["refused"], out
        assert not (tmp_path / "saved_cb").exists()


@pytest.mark.parametrize("built_for, lib_bytes, needle", [
    ("0.0.1", b"", "was built for TensorFlow 0.0.1, this is " + tf.__version__),
    (tf.__version__, b"not an ELF file", "tf.load_op_library("),
])
def test_a_library_for_another_tensorflow_or_a_broken_file_is_refused_not_loaded(
        tmp_path, monkeypatch, built_for, lib_bytes, needle):
    monkeypatch.setenv("DLCONV_TF_OPS_CACHE", str(tmp_path))
    path = tf_ops.library_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(lib_bytes)
    with open(os.path.join(os.path.dirname(path), "build.json"), "w") as f:
        json.dump({"tensorflow": built_for}, f)
    with pytest.raises(tf_ops.TFOpsUnavailable) as info:
        tf_ops._load()       # the loader itself; the process' loaded library is untouched
    assert needle in str(info.value)
