"""A catalogue of bad inputs, run as a new user would: the op API, the C++ extension called
directly, the Keras layers (TensorFlow backend), the MNIST loader and the CLI.

Every case asserts the exception type (for the CLI: exit status 2, exactly one line on
stderr, no traceback) and that the message names the parameter and the offending value:
each case lists the substrings its message must contain.  Tables, one row per input.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from dlconv import ops
from dlconv import reference as ref
from dlconv.shapes import conv_geometry

G = conv_geometry((1, 6, 6, 2), (3, 3, 2, 4))          # a valid record to spoil


def f32(*shape):
    return np.ones(shape, np.float32)


def _relu(x):          # a user's own function that happens to be called relu
    return x * 2


_relu.__name__ = "relu"


def check(fn, exc, needles):
    with pytest.raises(exc) as err:
        fn()
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ----------------------------------------------------------------------------- op API
OP_CASES = [
    ("conv x float64", lambda: ops.conv2d(np.ones((1, 6, 6, 2)), f32(3, 3, 2, 4)), TypeError, ("x", "float64")),
    ("conv w int32", lambda: ops.conv2d(f32(1, 6, 6, 2), np.ones((3, 3, 2, 4), np.int32)), TypeError, ("w", "int32")),
    ("conv b float16", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), np.ones(4, np.float16)),
     TypeError, ("b", "float16")),
    ("conv x None", lambda: ops.conv2d(None, f32(3, 3, 2, 4)), TypeError, ("x", "None")),
    ("conv x rank 3", lambda: ops.conv2d(f32(6, 6, 2), f32(3, 3, 2, 4)), ValueError, ("x", "rank", "(6, 6, 2)")),
    ("conv channels", lambda: ops.conv2d(f32(1, 6, 6, 3), f32(3, 3, 2, 4)), ValueError, ("channel", "3", "2")),
    ("conv b shape", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), f32(5)), ValueError, ("b", "(5,)", "(4,)")),
    ("strides 0", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), strides=0), ValueError, ("strides", "0")),
    ("strides triple", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), strides=(1, 2, 3)),
     ValueError, ("strides", "(1, 2, 3)")),
    ("strides float", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), strides=1.5), ValueError, ("strides", "1.5")),
    ("strides 2**40", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), strides=2**40),
     ValueError, ("strides", str(2**40))),
    ("padding name", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), padding="full"),
     ValueError, ("padding", "'full'")),
    ("padding pair missing", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), padding=((1, 2), (3,))),
     ValueError, ("padding", "width", "(3,)")),
    ("padding negative", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), padding=-1), ValueError, ("padding", "-1")),
    ("padding 2**40", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), padding=2**40),
     ValueError, ("padding", str(2**40))),
    ("padding top 2**40", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), padding=((2**40, 0), (0, 0))),
     ValueError, ("padding top", str(2**40))),
    ("dilation 0", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), dilation=0), ValueError, ("dilation", "0")),
    ("kernel too big", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(7, 3, 2, 4)), ValueError, ("kernel_size", "7", "6")),
    ("activation gelu", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), activation="gelu"),
     ValueError, ("activation", "'gelu'")),
    ("conv softmax", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), activation="softmax"),
     ValueError, ("activation", "'softmax'")),
    ("activation callable relu", lambda: ops.dense(f32(2, 3), f32(3, 4), activation=_relu),
     TypeError, ("activation", "callable", "'relu'")),
    ("activation int", lambda: ops.dense(f32(2, 3), f32(3, 4), activation=3), TypeError, ("activation", "3")),
    ("backend unknown", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), backend="nope"),
     ValueError, ("backend", "'nope'")),
    ("variant unknown", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), backend="numba", variant="v9"),
     ValueError, ("variant", "'v9'")),
    ("variant not applicable", lambda: ops.conv2d(f32(1, 9, 9, 16), f32(7, 7, 16, 16), backend="cpp",
                                                  variant="cpu_v3_winograd"),
     ValueError, ("variant", "'cpu_v3_winograd'")),
    ("geometry type", lambda: ops.conv2d(f32(1, 6, 6, 2), f32(3, 3, 2, 4), geometry=G.as_tuple()),
     TypeError, ("geometry", "tuple")),
    ("geometry vs x", lambda: ops.conv2d(f32(1, 7, 6, 2), f32(3, 3, 2, 4), geometry=G),
     ValueError, ("x", "(1, 7, 6, 2)", "(1, 6, 6, 2)")),
    ("geometry out_w", lambda: dataclasses.replace(G, out_w=30), ValueError, ("out_w", "30", "4")),
    ("geometry stride 50000", lambda: dataclasses.replace(G, stride_h=50000), ValueError, ("out_h", "stride_h=50000")),
    ("geometry dilation 0", lambda: dataclasses.replace(G, dil_h=0), ValueError, ("dil_h", "0")),
    ("geometry pad -1", lambda: dataclasses.replace(G, pad_top=-1), ValueError, ("pad_top", "-1")),
    ("geometry float", lambda: dataclasses.replace(G, batch=1.0), ValueError, ("batch", "1.0")),
    ("geometry batch", lambda: G.with_batch(-1), ValueError, ("batch", "-1")),
    ("dense x rank", lambda: ops.dense(f32(2, 3, 1), f32(3, 4)), ValueError, ("x", "rank", "(2, 3, 1)")),
    ("dense features", lambda: ops.dense(f32(2, 3), f32(4, 5)), ValueError, ("feature", "3", "4")),
    ("dense b shape", lambda: ops.dense(f32(2, 3), f32(3, 4), f32(3)), ValueError, ("b", "(3,)", "(4,)")),
    ("dense_backward no y", lambda: ops.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), activation="relu"),
     ValueError, ("y", "'relu'")),
    ("dense_backward dy", lambda: ops.dense_backward(f32(2, 3), f32(3, 4), f32(2, 5)), ValueError, ("dy", "(2, 5)", "(2, 4)")),
    ("backward_data dy", lambda: ops.conv2d_backward_data(f32(1, 4, 4, 5), f32(3, 3, 2, 4), (1, 6, 6, 2)),
     ValueError, ("dy", "(1, 4, 4, 5)", "(1, 4, 4, 4)")),
    ("backward_data no y", lambda: ops.conv2d_backward_data(f32(1, 4, 4, 4), f32(3, 3, 2, 4), (1, 6, 6, 2),
                                                            activation="relu"),
     ValueError, ("y", "'relu'")),
    ("backward_filter y shape", lambda: ops.conv2d_backward_filter(f32(1, 6, 6, 2), f32(1, 4, 4, 4), (3, 3, 2, 4),
                                                                    y=f32(1, 4, 4, 3), activation="tanh"),
     ValueError, ("y", "(1, 4, 4, 3)", "(1, 4, 4, 4)")),
    ("softmax rank 1", lambda: ops.softmax(f32(3)), ValueError, ("z", "rank")),
    ("activation_backward shapes", lambda: ops.activation_backward(f32(2, 3), f32(2, 4), "relu"),
     ValueError, ("y", "(2, 4)", "(2, 3)")),
    ("reference dense_backward no y", lambda: ref.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), None, "relu"),
     ValueError, ("y", "'relu'")),
]


@pytest.mark.parametrize("fn,exc,needles", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_api_bad_input(fn, exc, needles):
    check(fn, exc, needles)


@pytest.mark.parametrize("raw", ["nan", "inf", "-5", "lots"])
def test_host_pool_variable_is_named(monkeypatch, raw):
    from dlconv import arrays
    monkeypatch.setenv("DLCONV_HOST_POOL_MB", raw)
    check(arrays._pool_limit, ValueError, ("DLCONV_HOST_POOL_MB", repr(raw)))


def test_edge_inputs_that_are_not_errors():
    """Odd but legal: a linear dense_backward needs no y; a (2, 0) softmax is empty."""
    dx, dw, db = ref.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), None, "linear")
    assert dx.shape == (2, 3) and db.tolist() == [2.0] * 4
    for backend in ("reference", "numba", "cpp"):
        assert ops.softmax(np.zeros((2, 0), np.float32), backend=backend).shape == (2, 0)


# ----------------------------------------------------------------------------- dlconv._C
C = pytest.importorskip("dlconv._C")
T = G.as_tuple()
C_CASES = [
    ("x float64", lambda: C.conv2d_forward(np.ones((1, 6, 6, 2)), f32(3, 3, 2, 4), None, T, 0),
     TypeError, ("x", "float64")),
    ("x list", lambda: C.conv2d_forward([[1.0]], f32(3, 3, 2, 4), None, T, 0), TypeError, ("x", "list")),
    ("x shape", lambda: C.conv2d_forward(f32(1, 6, 6, 3), f32(3, 3, 2, 4), None, T, 0),
     ValueError, ("x", "(1, 6, 6, 3)", "(1, 6, 6, 2)")),
    ("x Fortran order", lambda: C.conv2d_forward(np.asfortranarray(f32(1, 6, 6, 2)), f32(3, 3, 2, 4), None, T, 0),
     ValueError, ("x", "C-contiguous")),
    ("b shape", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), f32(5), T, 0), ValueError, ("b", "(5,)")),
    ("y out shape", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, T, 0, f32(1, 4, 4, 3)),
     ValueError, ("y", "(1, 4, 4, 3)")),
    ("geometry 16 fields", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, T[:16], 0),
     ValueError, ("geometry", "17", "16")),
    ("geometry str", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, "abc", 0),
     TypeError, ("geometry", "17-int tuple")),
    ("geometry negative pad", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None,
                                                       T[:11] + (-1,) + T[12:], 0),
     ValueError, ("geometry field 11", "pad_top", "-1")),
    ("geometry inconsistent", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, T[:16] + (9,), 0),
     ValueError, ("out_h/out_w", "geometry")),
    ("activation code", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, T, 9),
     ValueError, ("activation", "9")),
    ("variant code", lambda: C.conv2d_forward(f32(1, 6, 6, 2), f32(3, 3, 2, 4), None, T, 0, None, 7),
     ValueError, ("variant must be one of", "cpu_v2_regblock (2)", "got 7")),
    ("backward_data dz", lambda: C.conv2d_backward_data(f32(1, 4, 4, 5), f32(3, 3, 2, 4), T),
     ValueError, ("dz", "(1, 4, 4, 5)")),
    ("backward_filter dz", lambda: C.conv2d_backward_filter(f32(1, 6, 6, 2), f32(1, 4, 4, 5), T),
     ValueError, ("dz", "(1, 4, 4, 5)")),
    ("dense w", lambda: C.dense_forward(f32(2, 3), f32(4, 5), None, 0), ValueError, ("w", "(4, 5)", "(3, 5)")),
    ("dense activation", lambda: C.dense_forward(f32(2, 3), f32(3, 5), None, 7), ValueError, ("activation", "7")),
    ("dense_backward y", lambda: C.dense_backward(f32(2, 3), f32(3, 4), f32(2, 4), f32(2, 5), 1),
     ValueError, ("y", "(2, 5)")),
    ("softmax rank", lambda: C.softmax(f32(3)), ValueError, ("z", "rank 2", "1")),
    ("activation_backward y", lambda: C.activation_backward(f32(2, 3), f32(2, 4), 1), ValueError, ("y", "(2, 4)")),
]


@pytest.mark.parametrize("fn,exc,needles", [c[1:] for c in C_CASES], ids=[c[0] for c in C_CASES])
def test_cpp_extension_bad_input(fn, exc, needles):
    check(fn, exc, needles)


# ----------------------------------------------------------------------------- Keras layers
def _layer_cases():
    import dlconv.layers as L
    x4 = np.ones((1, 5, 5, 1), np.float32)
    return [
        ("conv backend", lambda: L.Conv2D(4, 3, backend="nope"), ValueError, ("backend", "'nope'")),
        ("dense backend", lambda: L.Dense(3, backend=5), ValueError, ("backend", "5")),
        ("conv groups", lambda: L.Conv2D(4, 3, groups=2)(np.ones((1, 5, 5, 3), np.float32)),
         ValueError, ("groups=2", "3")),
        ("conv kernel too big", lambda: L.Conv2D(4, 7)(x4), ValueError, ("kernel_size", "7", "5")),
        ("conv filters 0", lambda: L.Conv2D(0, 3), ValueError, ("filters", "0")),
        ("conv strides 0", lambda: L.Conv2D(4, 3, strides=0), ValueError, ("strides", "0")),
        ("conv padding", lambda: L.Conv2D(4, 3, padding="full"), ValueError, ("padding", "full")),
        ("dense units 0", lambda: L.Dense(0), ValueError, ("units", "0")),
        ("conv input rank", lambda: L.Conv2D(4, 3)(np.ones((2, 5, 5), np.float32)), ValueError, ("ndim", "(2, 5, 5)")),
    ]


def test_keras_layers_bad_input():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    if keras.config.backend() != "tensorflow":
        pytest.skip(f"this process' Keras backend is {keras.config.backend()}; the other backends' "
                    f"layers are checked in tests/keras_suite")
    cases = _layer_cases()
    for name, fn, exc, needles in cases:
        try:
            check(fn, exc, needles)
        except AssertionError as e:
            raise AssertionError(f"layer case {name!r}: {e}") from None
    assert len(cases) == 9


# ----------------------------------------------------------------------------- loader
def _npz(tmp_path, **override):
    arrays = dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8),
                  x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    arrays.update(override)
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path


LOADER_CASES = [
    ("float images", {"x_train": np.full((2, 28, 28), 0.5, np.float32)}, ("x_train", "float32")),
    ("label 12", {"y_train": np.array([12, 1])}, ("y_train", "12")),
    ("label -1", {"y_test": np.array([-1])}, ("y_test", "-1")),
    ("pixel 300", {"x_test": np.full((1, 28, 28), 300, np.int32)}, ("x_test", "300")),
    ("labels 2-D", {"y_test": np.zeros((1, 1), np.uint8)}, ("y_test", "(1, 1)")),
    ("images flat", {"x_test": np.zeros((1, 784), np.uint8)}, ("x_test", "(1, 784)")),
    ("object array", {"x_train": np.array([1, "a"], dtype=object)}, ("x_train", "object")),
    ("count mismatch", {"y_train": np.zeros(3, np.uint8)}, ("train", "2 images", "3 labels")),
]


@pytest.mark.parametrize("override,needles", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_loader_bad_npz(tmp_path, override, needles):
    from dlconv.data import load_mnist
    path = _npz(tmp_path, **override)
    check(lambda: load_mnist(path), ValueError, (str(path),) + needles)


@pytest.mark.parametrize("content,needles", [
    (b"just text\n", ("not a zip archive",)),
    (b"", ("not a zip archive",)),
], ids=["text file", "empty file"])
def test_loader_not_an_npz(tmp_path, content, needles):
    from dlconv.data import load_mnist
    path = tmp_path / "mnist.npz"
    path.write_bytes(content)
    check(lambda: load_mnist(path), ValueError, (str(path),) + needles)


def test_loader_missing_path(tmp_path):
    from dlconv.data import load_mnist
    check(lambda: load_mnist(tmp_path / "nowhere.npz"), ValueError, ("nowhere.npz", "does not exist"))


# ----------------------------------------------------------------------------- CLI
CLI_CASES = [
    (["explain", "--padding", "1,2,3"], ("padding", "'1,2,3'")),
    (["explain", "--input", "0x5"], ("input", "0")),
    (["explain", "--stride", "0"], ("stride", "0")),
    (["explain", "--input", "5x5", "--kernel", "9"], ("kernel_size", "9")),
    (["explain", "--at", "9,9"], ("at", "9")),
    (["explain", "--filter", "Z"], ("filter", "Z")),
    (["explain", "--input", "6000x6000", "--transposed"], ("--transposed", "--at")),
    (["explain", "--filters", "10000000", "--at", "1,1"], ("filters", "10,000,000", "--filter")),
    (["explain", "--input", "400x400", "--all"], ("--all", "--at")),
    (["explain", "--input", "100x100", "--all", "--json"], ("--all", "30,000")),
    (["explain", "--picture", "/nonexistent-dlconv-dir/p.png"], ("--picture", "/nonexistent-dlconv-dir")),
    (["explain", "--input", "6000x6000", "--picture", "PICTURE"], ("--picture", "6000x6000")),
    (["explain", "--bogus"], ("--bogus",)),
    (["explain", "--filters", "x"], ("--filters", "'x'")),
    (["bench", "--layers", "nope"], ("--layers", "'nope'")),
    (["bench", "--repeats", "0"], ("--repeats", "0")),
    (["bench", "--batch", "0"], ("--batch", "0")),
    (["train", "--epochs", "0"], ("--epochs", "0")),
    (["nothing"], ("COMMAND", "'nothing'")),
]


@pytest.mark.parametrize("argv,needles", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, argv, needles):
    argv = [str(tmp_path / "p.png") if a == "PICTURE" else a for a in argv]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "dlconv", *argv], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert r.stdout == ""


def test_catalogue_size():
    """The issue asks for at least 60 bad inputs across the five surfaces."""
    n = len(OP_CASES) + 4 + len(C_CASES) + 9 + len(LOADER_CASES) + 3 + len(CLI_CASES)
    assert n >= 60, n
