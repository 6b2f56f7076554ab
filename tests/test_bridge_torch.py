"""The torch bridge (dlconv.bridges.torch, dlconv.torch): the ``dlconv::`` custom ops against
``torch.nn.functional`` and dlconv.reference, values and gradients, on generated geometries
and every CPU backend; ``torch.library.opcheck``; ``torch.compile``; zero-copy CPU tensors;
refusals; Keras' torch backend end to end (in a subprocess: the Keras backend is fixed per
process).  The CUDA tests are ``gpu``-marked and need a CUDA build of torch and a GPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch", reason="the torch bridge needs PyTorch (pip install dlconv[torch])")
import torch.nn.functional as F  # noqa: E402

import dlconv.ops  # noqa: E402
import dlconv.torch as dt  # noqa: E402
from conftest import cpu_backend_params  # noqa: E402
from dlconv import reference as ref  # noqa: E402
from dlconv.bridges import torch as tb  # noqa: E402
from dlconv.shapes import conv_geometry  # noqa: E402

BACKENDS = cpu_backend_params()
ACTS = ["linear", "relu", "sigmoid", "tanh"]
TORCH_ACT = {"linear": lambda t: t, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "softmax": lambda t: torch.softmax(t, dim=-1)}
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA build of torch and a GPU")


def assert_close(actual, expected, rtol, what=""):
    """Relative to the scale of ``expected`` (near-zero elements judged by that scale)."""
    actual = actual.detach().cpu().double().numpy()
    expected = expected.detach().cpu().double().numpy()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def torch_conv(x, w, b, g, act):
    """The reference in torch: NHWC/HWIO permuted to NCHW/OIHW, pads of the geometry record."""
    xp = F.pad(x.permute(0, 3, 1, 2).contiguous(), (g.pad_left, g.pad_right, g.pad_top, g.pad_bottom))
    z = F.conv2d(xp, w.permute(3, 2, 0, 1).contiguous(), b, stride=(g.stride_h, g.stride_w),
                 dilation=(g.dil_h, g.dil_w))
    return TORCH_ACT[act](z).permute(0, 2, 3, 1)


@st.composite
def conv_cases(draw):
    """A conv geometry whose padded input fits the dilated kernel, with padding given as
    "valid", "same" or explicit asymmetric pads."""
    k_h, k_w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["valid", "same", "explicit"]))
    pads = (((draw(st.integers(0, 2)), draw(st.integers(0, 2))),
             (draw(st.integers(0, 2)), draw(st.integers(0, 2)))) if kind == "explicit" else kind)
    n, h, w_, c, f = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
                      draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    x_shape, w_shape = (n, h, w_, c), (k_h, k_w, c, f)
    try:
        g = conv_geometry(x_shape, w_shape, s, pads, d)
    except ValueError:
        from hypothesis import assume
        assume(False)
    return dict(g=g, strides=s, padding=pads, dilation=d, bias=draw(st.booleans()),
                act=draw(st.sampled_from(ACTS)), seed=draw(st.integers(0, 2**16)))


# ----------------------------------------------------------------------------- values, gradients
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20)
@given(case=conv_cases())
def test_conv2d_matches_torch_and_reference(backend, case):
    g, act = case["g"], case["act"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(g.x_shape, generator=gen, requires_grad=True)
    w = torch.randn(g.w_shape, generator=gen, requires_grad=True)
    b = torch.randn(g.filters, generator=gen, requires_grad=True) if case["bias"] else None
    y = dt.conv2d(x, w, b, strides=case["strides"], padding=case["padding"],
                  dilation=case["dilation"], activation=act, backend=backend)
    # float64 torch reference: the float32 kernels are judged against exact-ish numbers
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y_ref = torch_conv(leaves[0], leaves[1], leaves[2] if b is not None else None, g, act)
    assert_close(y, y_ref, 1e-5, "forward vs torch")
    np_ref = ref.conv2d_forward(x.detach().numpy(), w.detach().numpy(),
                                None if b is None else b.detach().numpy(), g, act)
    assert_close(y, torch.from_numpy(np_ref), 1e-5, "forward vs dlconv.reference")
    r = torch.randn(y.shape, generator=gen)
    ours = torch.autograd.grad((y * r).sum(), [t for t in (x, w, b) if t is not None])
    theirs = torch.autograd.grad((y_ref * r.double()).sum(), leaves)
    for name, a, e in zip(("x", "w", "b"), ours, theirs):
        assert_close(a, e, 1e-4, f"dL/d{name} vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(n=st.integers(1, 9), n_in=st.integers(1, 40), n_out=st.integers(1, 70), bias=st.booleans(),
       act=st.sampled_from(ACTS + ["softmax"]), seed=st.integers(0, 2**16))
def test_dense_matches_torch_and_reference(backend, n, n_in, n_out, bias, act, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=gen, requires_grad=True)
    w = torch.randn(n_in, n_out, generator=gen, requires_grad=True)
    b = torch.randn(n_out, generator=gen, requires_grad=True) if bias else None
    y = dt.dense(x, w, b, activation=act, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y_ref = TORCH_ACT[act](F.linear(leaves[0], leaves[1].T, leaves[2] if bias else None))
    assert_close(y, y_ref, 1e-5, "forward vs torch")
    np_ref = ref.dense_forward(x.detach().numpy(), w.detach().numpy(),
                               b.detach().numpy() if bias else None, act)
    assert_close(y, torch.from_numpy(np_ref), 1e-5, "forward vs dlconv.reference")
    r = torch.randn(y.shape, generator=gen)
    ours = torch.autograd.grad((y * r).sum(), [t for t in (x, w, b) if t is not None])
    theirs = torch.autograd.grad((y_ref * r.double()).sum(), leaves)
    for name, a, e in zip(("x", "w", "b"), ours, theirs):
        assert_close(a, e, 1e-4, f"dL/d{name} vs torch")


def test_backward_ops_match_reference(rng):
    """The backward ops directly, both forms (dL/dz; dL/dy with y and the activation), vs
    dlconv.reference."""
    g = conv_geometry((2, 7, 6, 3), (3, 2, 3, 4), (2, 1), ((1, 0), (0, 2)), (1, 2))
    x = rng.standard_normal(g.x_shape).astype(np.float32)
    w = rng.standard_normal(g.w_shape).astype(np.float32)
    y = np.tanh(rng.standard_normal(g.y_shape)).astype(np.float32)
    dy = rng.standard_normal(g.y_shape).astype(np.float32)
    dz = ref.activation_backward(dy, y, "tanh").astype(np.float32)
    geo = ([2, 1], [1, 0, 0, 2], [1, 2])
    T = torch.from_numpy
    for backend in ("cpp", "numba", "reference"):
        got = torch.ops.dlconv.activation_backward(T(dy), T(y), "tanh", backend)
        assert_close(got, T(dz), 1e-5, f"{backend} activation_backward")
        for d, y_arg, act in ((dz, None, "linear"), (dy, T(y), "tanh")):
            dx = torch.ops.dlconv.conv2d_backward_data(T(d), T(w), y_arg, [7, 6], *geo, act, backend)
            assert_close(dx, T(ref.conv2d_backward_data(dz, w, g)), 1e-4, f"{backend} dx ({act})")
            dw, db = torch.ops.dlconv.conv2d_backward_filter(T(x), T(d), y_arg, [3, 2], *geo, act, backend)
            dw_ref, db_ref = ref.conv2d_backward_filter(x, dz, g)
            assert_close(dw, T(dw_ref), 1e-4, f"{backend} dw ({act})")
            assert_close(db, T(db_ref), 1e-4, f"{backend} db ({act})")


def test_first_layer_skips_backward_data(monkeypatch):
    """An input that needs no gradient (a model's first layer) costs no backward-data call."""
    calls = []
    real = dlconv.ops.conv2d_backward_data
    monkeypatch.setattr(dlconv.ops, "conv2d_backward_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 5, 5, 1)
    w = torch.randn(3, 3, 1, 2, requires_grad=True)
    dt.conv2d(x, w, activation="relu", backend="cpp").sum().backward()
    assert calls == [] and w.grad is not None
    dt.conv2d(x.requires_grad_(), w, activation="relu", backend="cpp").sum().backward()
    assert calls == [1]


def test_activation_derivative_is_fused_into_the_backward_kernels(monkeypatch):
    """cpp on the CPU applies relu'/tanh' inside the conv backward kernels (as on TensorFlow):
    no activation-backward op, no dL/dz tensor; a strided dL/dy (a stock pooling gradient's
    NCHW view) is made contiguous once for both backward passes."""
    calls = {"act": 0, "contiguous_dy": []}
    real_act = dlconv.ops.activation_backward
    real_bd, real_bf = dlconv.ops.conv2d_backward_data, dlconv.ops.conv2d_backward_filter
    monkeypatch.setattr(dlconv.ops, "activation_backward",
                        lambda *a, **k: calls.__setitem__("act", calls["act"] + 1) or real_act(*a, **k))

    def spy_bd(dy, *a, **k):
        calls["contiguous_dy"].append(dy.ctypes.data)
        return real_bd(dy, *a, **k)

    def spy_bf(x, dy, *a, **k):
        calls["contiguous_dy"].append(dy.ctypes.data)
        return real_bf(x, dy, *a, **k)

    monkeypatch.setattr(dlconv.ops, "conv2d_backward_data", spy_bd)
    monkeypatch.setattr(dlconv.ops, "conv2d_backward_filter", spy_bf)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 6, 6, 3, generator=gen, requires_grad=True)
    w = torch.randn(3, 3, 3, 4, generator=gen, requires_grad=True)
    for act in ("relu", "tanh"):
        calls["contiguous_dy"].clear()
        y = dt.conv2d(x, w, activation=act, backend="cpp")
        # an NCHW tensor seen as NHWC: strided like a stock pooling gradient on torch
        r = torch.randn(2, 4, 4, 4, generator=gen).permute(0, 2, 3, 1)
        assert not r.is_contiguous()
        gx, gw = torch.autograd.grad(y, (x, w), r)
        assert calls["act"] == 0
        assert len(calls["contiguous_dy"]) == 2 and len(set(calls["contiguous_dy"])) == 1
        xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        g = conv_geometry(tuple(x.shape), tuple(w.shape), 1, "valid", 1)
        ex, ew = torch.autograd.grad(torch_conv(xr, wr, None, g, act), (xr, wr), r.double())
        assert_close(gx, ex, 1e-4, f"dx ({act})")
        assert_close(gw, ew, 1e-4, f"dw ({act})")


def test_empty_batch():
    x = torch.zeros(0, 5, 5, 2, requires_grad=True)
    w = torch.randn(3, 3, 2, 4, requires_grad=True)
    y = dt.conv2d(x, w, padding="same", backend="cpp")
    assert y.shape == (0, 5, 5, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and float(w.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(3)

    def r(*shape, grad=False):
        return torch.randn(shape, generator=gen).to(device).requires_grad_(grad)

    x, w, b = r(2, 5, 6, 3), r(3, 2, 3, 4), r(4)
    geo = ([2, 1], [1, 0, 0, 2], [1, 2])
    y = tb.conv2d(x, w, b, strides=(2, 1), padding=((1, 0), (0, 2)), dilation=(1, 2),
                  activation="tanh", backend="cpp" if device == "cpu" else "auto")
    dy = r(*y.shape)
    xd, wd, bd = r(4, 7), r(7, 3), r(3)
    yd = torch.ops.dlconv.dense(xd, wd, bd, "softmax", "auto")
    be = "cpp"
    return {
        "conv2d": (torch.ops.dlconv.conv2d.default, (r(2, 5, 6, 3, grad=True), r(3, 2, 3, 4, grad=True),
                                                     r(4, grad=True), *geo, "relu", be)),
        "conv2d-nobias": (torch.ops.dlconv.conv2d.default, (x, w, None, [1, 1], [0, 0, 0, 0], [1, 1],
                                                            "linear", "numba")),
        "conv2d_backward_data": (torch.ops.dlconv.conv2d_backward_data.default,
                                 (dy, w, y, [5, 6], *geo, "tanh", be)),
        "conv2d_backward_filter": (torch.ops.dlconv.conv2d_backward_filter.default,
                                   (x, dy, None, [3, 2], *geo, "linear", be)),
        "activation_backward": (torch.ops.dlconv.activation_backward.default, (dy, y, "tanh", be)),
        "dense": (torch.ops.dlconv.dense.default, (r(4, 7, grad=True), r(7, 3, grad=True),
                                                   r(3, grad=True), "softmax", be)),
        "dense_backward": (torch.ops.dlconv.dense_backward.default, (xd, wd, r(4, 3), yd, "softmax", be)),
    }


@pytest.mark.parametrize("name", sorted(_opcheck_cases("cpu")))
def test_opcheck_cpu(name):
    op, args = _opcheck_cases("cpu")[name]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["conv2d", "conv2d-nobias", "conv2d_backward_data", "conv2d_backward_filter",
                                  "activation_backward", "dense", "dense_backward"])
def test_opcheck_cuda(name):
    op, args = _opcheck_cases("cuda")[name]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager():
    """SUPPORTS_JIT: the ops trace into one graph (fake impls, autograd) and give the eager
    values and gradients, also after a batch-size change (a recompile with a dynamic batch)."""
    assert tb.SUPPORTS_JIT
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 3, 2, 4, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen, requires_grad=True)
    wd = torch.randn(64, 5, generator=gen, requires_grad=True)

    def f(x):
        y = dt.conv2d(x, w, b, strides=2, padding="same", activation="relu", backend="cpp")
        return dt.dense(y.reshape(y.shape[0], -1), wd, None, activation="softmax", backend="cpp")

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    for n in (3, 5):
        x = torch.randn(n, 8, 8, 2, generator=gen, requires_grad=True)
        out, out_ref = cf(x), f(x)
        assert_close(out, out_ref, 1e-6, f"compiled forward, batch {n}")
        g = torch.autograd.grad(out.square().sum(), (x, w, b, wd))
        g_ref = torch.autograd.grad(out_ref.square().sum(), (x, w, b, wd))
        for a, e in zip(g, g_ref):
            assert_close(a, e, 1e-6, f"compiled gradient, batch {n}")


def test_eager_fast_path_equals_the_dispatched_op():
    """Eager calls run the op's implementation and autograd formula without the dispatcher;
    the registered op (what torch.compile and fake tensors use) gives the same values and
    gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 5, 3, generator=gen, requires_grad=True)
    w = torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen, requires_grad=True)
    assert tb._eager([x, w, b])
    with FakeTensorMode() as mode:
        assert not tb._eager([mode.from_tensor(x)])
    geo = tb.conv_pads(x.shape, w.shape, (2, 1), "same", (1, 2))
    fast = dt.conv2d(x, w, b, strides=(2, 1), padding="same", dilation=(1, 2), activation="sigmoid")
    slow = torch.ops.dlconv.conv2d(x, w, b, *geo, "sigmoid", "auto")
    assert torch.equal(fast, slow)
    r = torch.randn(fast.shape, generator=gen)
    for a, e in zip(torch.autograd.grad((fast * r).sum(), (x, w, b)),
                    torch.autograd.grad((slow * r).sum(), (x, w, b))):
        assert torch.equal(a, e)
    with torch.no_grad():
        assert torch.equal(dt.conv2d(x, w, b, strides=(2, 1), padding="same", dilation=(1, 2),
                                     activation="sigmoid"), fast.detach())


@pytest.mark.parametrize("needs", ["x", "w", "b", "xwb", ""])
def test_checked_eager_path_equals_the_op_for_each_needed_gradient(needs, monkeypatch):
    """An eager bridge call checks its tensors once (not again inside the op), resolves its
    geometry once per distinct call, and gives the registered op's values; each subset of
    inputs needing a gradient gets exactly those gradients, equal to the op's, and no
    backward-data call when x needs none."""
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 7, 6, 3, generator=gen)
    w0 = torch.randn(3, 2, 3, 4, generator=gen)
    b0 = torch.randn(4, generator=gen)
    leaves = [t.clone().requires_grad_(n in needs) for n, t in zip("xwb", (x0, w0, b0))]
    places, data_calls = [], []
    real_place, real_bd = tb._place, dlconv.ops.conv2d_backward_data
    monkeypatch.setattr(tb, "_place", lambda named: places.append(1) or real_place(named))
    monkeypatch.setattr(dlconv.ops, "conv2d_backward_data",
                        lambda *a, **k: data_calls.append(1) or real_bd(*a, **k))
    kw = dict(strides=(2, 1), padding="same", dilation=(1, 2), activation="relu", backend="cpp")
    y = tb.conv2d(*leaves, **kw)
    assert len(places) == 1          # the bridge function's check only
    geo = tb.conv_pads(x0.shape, w0.shape, (2, 1), "same", (1, 2))
    y_op = torch.ops.dlconv.conv2d(*leaves, *geo, "relu", "cpp")
    assert torch.equal(y, y_op)
    wanted = [t for t in leaves if t.requires_grad]
    if not wanted:
        assert y.grad_fn is None
        return
    r = torch.randn(y.shape, generator=gen)
    data_calls.clear()
    ours = torch.autograd.grad((y * r).sum(), wanted)
    assert len(data_calls) == ("x" in needs)
    for a, e in zip(ours, torch.autograd.grad((y_op * r).sum(), wanted)):
        assert torch.equal(a, e)


def test_checked_dense_path_equals_the_op_and_checks_once(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    w = torch.randn(7, 3, generator=gen, requires_grad=True)
    b = torch.randn(3, generator=gen)
    places = []
    real_place = tb._place
    monkeypatch.setattr(tb, "_place", lambda named: places.append(1) or real_place(named))
    y = tb.dense(x, w, b, activation="softmax", backend="cpp")
    assert len(places) == 1
    y_op = torch.ops.dlconv.dense(x, w, b, "softmax", "cpp")
    assert torch.equal(y, y_op)
    for a, e in zip(torch.autograd.grad(y[:, 0].sum(), (x, w)), torch.autograd.grad(y_op[:, 0].sum(), (x, w))):
        assert torch.equal(a, e)


def test_unhashable_spellings_take_the_general_path_with_the_same_result():
    """strides, padding and dilation given as lists (unhashable: no per-call cache) give the
    tuple spelling's values."""
    gen = torch.Generator().manual_seed(13)
    x, w = torch.randn(1, 6, 6, 2, generator=gen), torch.randn(3, 3, 2, 2, generator=gen)
    a = dt.conv2d(x, w, strides=[1, 2], padding=[[1, 0], [2, 1]], dilation=[1, 1])
    e = dt.conv2d(x, w, strides=(1, 2), padding=((1, 0), (2, 1)), dilation=(1, 1))
    assert torch.equal(a, e)


def test_errors_are_the_same_on_the_cached_path():
    """A call whose plan is cached still refuses bad tensors, naming the parameter."""
    x, w = torch.randn(1, 4, 4, 2), torch.randn(3, 3, 2, 2)
    dt.conv2d(x, w)                                    # the plan is now cached
    with pytest.raises(TypeError, match="x must be float32"):
        dt.conv2d(x.double(), w)
    with pytest.raises(ValueError, match="w must have rank 4"):
        dt.conv2d(x, w[0])
    with pytest.raises(ValueError, match="must be one of"):
        dt.conv2d(x, w, backend="nope")
    dt.dense(torch.randn(2, 3), torch.randn(3, 4))
    with pytest.raises(ValueError):
        dt.dense(torch.randn(2, 5), torch.randn(3, 4))


def test_fast_apply_is_the_c_apply_and_functorch_still_works():
    """The fast path's Function.apply skips only the Python prologue; under a functorch
    transform (vmap) calls still go through torch.ops.dlconv and give the eager values.
    (torch.func.grad is not tried: torch.library's register_autograd formulas do not support
    it in this torch, for any custom op.)"""
    assert tb._CONV2D_CHECKED.fast_apply.__self__ is tb._CONV2D_CHECKED
    gen = torch.Generator().manual_seed(14)
    x, w = torch.randn(3, 1, 5, 5, 2, generator=gen), torch.randn(3, 3, 2, 2, generator=gen)
    f = lambda xi: dt.conv2d(xi, w, activation="tanh")         # noqa: E731
    assert torch.allclose(torch.func.vmap(f)(x), torch.stack([f(xi) for xi in x]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- zero copy
def test_eager_gradient_path_binds_no_signature(monkeypatch):
    """The fast path's autograd.Function has no separate setup_context, so Function.apply does
    not bind each call's arguments with inspect.signature (a per-call cost as large as the rest
    of a tiny conv's bridge); its gradients equal the registered op's."""
    import inspect
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 4, 3, generator=gen)
    w = torch.randn(3, 2, 3, 2, generator=gen, requires_grad=True)
    d = torch.randn(2, 4, generator=gen, requires_grad=True)

    def refuse(*a, **k):
        raise AssertionError("inspect.signature called on the eager path")

    with monkeypatch.context() as m:
        m.setattr(inspect, "signature", refuse)
        y = dt.conv2d(x, w, None, strides=(1, 2), padding="same", activation="tanh")
        z = dt.dense(y.reshape(-1, 2), d, None, activation="relu")
        gw, gd = torch.autograd.grad(z.sum(), (w, d))
    geo = tb.conv_pads(x.shape, w.shape, (1, 2), "same", (1, 1))
    y2 = torch.ops.dlconv.conv2d(x, w, None, *geo, "tanh", "auto")
    z2 = torch.ops.dlconv.dense(y2.reshape(-1, 2), d, None, "relu", "auto")
    assert torch.equal(z, z2)
    for a, e in zip((gw, gd), torch.autograd.grad(z2.sum(), (w, d))):
        assert torch.equal(a, e)


def test_cpu_tensors_reach_kernels_and_return_without_copy(monkeypatch):
    seen = {}
    real = dlconv.ops.conv2d

    def spy(x, w, b=None, **kw):
        seen["in"] = (x.ctypes.data, w.ctypes.data, b.ctypes.data)
        out = real(x, w, b, **kw)
        seen["out"] = out.ctypes.data
        return out

    monkeypatch.setattr(dlconv.ops, "conv2d", spy)
    x, w, b = torch.randn(2, 6, 6, 3), torch.randn(3, 3, 3, 4), torch.randn(4)
    y = dt.conv2d(x, w, b, backend="cpp")
    assert seen["in"] == (x.data_ptr(), w.data_ptr(), b.data_ptr())
    assert seen["out"] == y.data_ptr()
    # a non-contiguous input is copied (once, by .contiguous()) and gives the same result
    xt = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not xt.is_contiguous()
    y2 = dt.conv2d(xt, w, b, backend="cpp")
    assert seen["in"][0] != xt.data_ptr()
    assert torch.equal(y, y2)


def test_host_view_is_the_tensor_buffer():
    t = torch.randn(3, 4, requires_grad=True)
    a = tb._host(t)
    assert a.ctypes.data == t.data_ptr() and a.dtype == np.float32


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("which", ["x", "w", "b"])
def test_non_float32_is_refused_naming_the_parameter(which):
    args = {"x": torch.randn(1, 4, 4, 2), "w": torch.randn(3, 3, 2, 2), "b": torch.randn(2)}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=rf"\b{which}\b must be float32, got torch.float64"):
        dt.conv2d(args["x"], args["w"], args["b"])
    with pytest.raises(TypeError, match="x must be float32, got torch.int32"):
        dt.dense(torch.ones(2, 3, dtype=torch.int32), torch.randn(3, 2))


def test_mixed_devices_are_refused_naming_the_parameters():
    # the meta device stands in for "another device" on a machine without a GPU
    x, w = torch.randn(1, 4, 4, 2), torch.randn(3, 3, 2, 2, device="meta")
    with pytest.raises(ValueError, match=r"one device, got x on cpu, w on meta"):
        dt.conv2d(x, w)
    with pytest.raises(ValueError, match=r"x, w are on meta; dlconv runs on CPU and CUDA"):
        dt.dense(torch.randn(2, 3, device="meta"), torch.randn(3, 2, device="meta"))


def test_bad_geometry_and_arguments():
    x, w = torch.randn(1, 4, 4, 2), torch.randn(3, 3, 2, 2)
    with pytest.raises(ValueError, match="x must have rank 4"):
        dt.conv2d(x[0], w)
    with pytest.raises(ValueError, match="channel mismatch"):
        dt.conv2d(x, torch.randn(3, 3, 5, 2))
    with pytest.raises(ValueError, match="kernel_size.*larger than the padded input"):
        dt.conv2d(torch.randn(1, 2, 2, 2), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        dt.conv2d(x, w, backend="cudnn")
    with pytest.raises(ValueError, match="activation must be"):
        dt.conv2d(x, w, activation="softmax")
    with pytest.raises(ValueError, match="feature mismatch"):
        dt.dense(torch.randn(2, 3), torch.randn(4, 2))


@pytest.mark.gpu
@needs_cuda
def test_cuda_and_cpu_mixed_is_refused():
    x, w = torch.randn(1, 4, 4, 2, device="cuda"), torch.randn(3, 3, 2, 2)
    with pytest.raises(ValueError, match=r"one device, got x on cuda:0, w on cpu"):
        dt.conv2d(x, w)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_other_than_current_is_refused():
    x, w = torch.randn(1, 4, 4, 2, device="cuda:1"), torch.randn(3, 3, 2, 2, device="cuda:1")
    with torch.cuda.device(0):
        with pytest.raises(ValueError, match=r"on cuda:1 but the current CUDA device is cuda:0"):
            dt.conv2d(x, w)


# ----------------------------------------------------------------------------- CUDA tensors
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act", ACTS)
def test_cuda_conv2d_values_grads_on_current_stream(act):
    """CUDA tensors in, CUDA tensors out, on a side stream (the kernels must be queued on
    torch's current stream: no synchronize() in the bridge), against the CPU reference."""
    gen = torch.Generator().manual_seed(11)
    g = conv_geometry((4, 28, 28, 3), (3, 3, 3, 16), (2, 1), ((1, 0), (0, 2)), (1, 2))
    xc, wc, bc = (torch.randn(s, generator=gen) for s in (g.x_shape, g.w_shape, (g.filters,)))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x, w, b = (t.cuda().requires_grad_() for t in (xc, wc, bc))
        y = dt.conv2d(x, w, b, strides=(2, 1), padding=((1, 0), (0, 2)), dilation=(1, 2), activation=act)
        assert y.is_cuda and y.device == x.device
        y.backward(torch.ones_like(y))
    side.synchronize()
    leaves = [t.double().requires_grad_() for t in (xc, wc, bc)]
    y_ref = torch_conv(*leaves, g, act)
    assert_close(y, y_ref, 1e-4, "cuda forward")
    theirs = torch.autograd.grad(y_ref.sum(), leaves)
    for name, a, e in zip("xwb", (x.grad, w.grad, b.grad), theirs):
        assert_close(a, e, 1e-3, f"cuda dL/d{name}")


@pytest.mark.gpu
@needs_cuda
def test_cuda_dense_and_zero_copy_input():
    x = torch.randn(64, 100, device="cuda", requires_grad=True)
    w = torch.randn(100, 10, device="cuda", requires_grad=True)
    arr = tb._cuda(x)
    assert arr.__cuda_array_interface__["data"][0] == x.data_ptr()
    y = dt.dense(x, w, None, activation="softmax")
    y_ref = torch.softmax(x.detach().double() @ w.detach().double(), -1)
    assert_close(y, y_ref, 1e-5, "cuda dense")
    (y * torch.arange(10, device="cuda")).sum().backward()
    assert x.grad.is_cuda and w.grad.is_cuda


_ALLOCATOR_CHECK = r"""
import gc, json, torch
import dlconv.torch as dt
from dlconv.bridges import torch as tb
x = torch.randn(32, 28, 28, 1, device="cuda")
w = torch.randn(3, 3, 1, 32, device="cuda")
dt.conv2d(x, w)                    # installs the plugin before Numba creates its context
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
y = dt.conv2d(x, w)
grew = torch.cuda.memory_allocated() - before
n = y.numel() * 4
del y
gc.collect()
print(json.dumps({"state": tb._ALLOCATOR, "grew": grew, "bytes": n,
                  "after": torch.cuda.memory_allocated() - before}))
"""


@pytest.mark.gpu
@needs_cuda
def test_cuda_outputs_come_from_torchs_caching_allocator():
    """Numba's allocations go through torch's caching allocator (no cuMemFree, which would
    synchronise the device) and go back to it when the output dies.  In a fresh process:
    a Numba context created earlier (other GPU tests) keeps Numba's allocator."""
    out = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHECK], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["state"]["installed"], res["state"]["why"]
    assert res["grew"] >= res["bytes"] and res["after"] <= 0, res


# ----------------------------------------------------------------------------- packaging
def test_import_dlconv_stays_framework_free():
    code = ("import sys, dlconv; dlconv.conv2d; "
            "print(json.dumps([m for m in ('torch', 'tensorflow', 'jax', 'keras') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


_KERAS_TORCH = r"""
import json, numpy as np, keras, torch
import dlconv.layers as dl
rng = np.random.default_rng(0)
out = {"backend": keras.config.backend()}
for kind, shape, kw in [("conv", (3, 9, 8, 2), dict(filters=5, kernel_size=(3, 2), strides=(2, 1),
                                                    padding="same", dilation_rate=1, activation="tanh")),
                        ("conv", (2, 9, 9, 3), dict(filters=4, kernel_size=3, dilation_rate=2,
                                                    activation="relu", use_bias=False)),
                        ("dense", (6, 11), dict(units=7, activation="softmax"))]:
    ours_cls, stock_cls = {"conv": (dl.Conv2D, keras.layers.Conv2D), "dense": (dl.Dense, keras.layers.Dense)}[kind]
    stock, ours = stock_cls(**kw), ours_cls(backend="cpp", **kw)
    stock.build(shape); ours.build(shape)
    stock.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in stock.get_weights()])
    ours.set_weights(stock.get_weights())
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    res = []
    for layer in (ours, stock):
        xv = x.clone().requires_grad_()
        y = layer(xv)
        r = torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((y * r).sum(), [xv] + [v.value for v in layer.trainable_weights])
        res.append([y.detach().numpy()] + [g.numpy() for g in grads])
    errs = [float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for a, b in zip(*res)]
    out.setdefault("errs", []).append(errs)
m = keras.Sequential([keras.Input((12, 12, 1)), dl.Conv2D(4, 3, activation="relu", backend="cpp"),
                      keras.layers.MaxPooling2D(), keras.layers.Flatten(), dl.Dense(3, activation="softmax")])
m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
xs = rng.random((64, 12, 12, 1), dtype=np.float32); ys = (xs.mean(axis=(1, 2, 3)) * 30).astype(int) % 3
hist = m.fit(xs, ys, epochs=8, batch_size=16, verbose=0).history["loss"]
out["loss"] = [hist[0], hist[-1]]
out["predict"] = list(m.predict(xs[:5], verbose=0).shape)
print(json.dumps(out))
"""


def test_keras_torch_backend_layers_match_stock_and_fit():
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", _KERAS_TORCH], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["backend"] == "torch"
    for errs in res["errs"]:
        assert errs[0] <= 1e-5, ("forward", res["errs"])
        assert max(errs[1:]) <= 1e-4, ("gradients", res["errs"])
    assert res["loss"][1] < res["loss"][0]
    assert res["predict"] == [5, 3]
