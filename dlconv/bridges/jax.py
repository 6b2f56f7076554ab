"""The JAX bridge: dlconv kernels as differentiable, jittable JAX functions.

:func:`conv2d` and :func:`dense` take JAX arrays (or tracers) and return one; the gradient
is attached with ``jax.custom_vjp``, so they work eagerly, under ``jax.jit`` (Keras' JAX
backend jits the train step: ``SUPPORTS_JIT = True``), ``jax.grad`` and ``jax.vmap``.

How a call reaches a kernel
---------------------------
Everything static is decided when JAX traces the call: the
:class:`~dlconv.shapes.ConvGeometry` (:func:`dlconv.runtime.conv_geometry_cached`, from the
static shapes; a mismatch raises :mod:`dlconv.shapes`' ValueError then), the backend
(:func:`dlconv.runtime.resolve_backend`) and whether the backward kernels take the
activation derivative (:func:`dlconv.runtime.fuse_activation_grad`).  What runs:

*cpp on the CPU, through XLA's FFI* — ``jax.ffi.ffi_call`` of the handlers that
``dlconv._C`` exports (``csrc/ffi_cpu.cpp``, registered with
``jax.ffi.register_ffi_target(..., platform="cpu")``).  The jitted program holds a custom
call; XLA calls the C++ handler on its own buffers, no Python runs per call and nothing is
copied.  The geometry travels as one int64 array attribute in ``ConvGeometry.FIELDS``
order, the activation as its :mod:`dlconv.activations` code.  XLA calls a handler from
whichever of its threads runs that part of the program; the handler hands OpenMP-sized work
to one C++ thread (``dlconv-xla``: one OpenMP team, as :class:`dlconv.runtime.HostThread`
gives the Python way in) and runs it under the C++ host lock the pybind11 entry points take
too (``csrc/cpu_host.h``): one kernel at a time, whichever way it came in.  Registering the
CPU targets also keeps XLA's buffers on the heap: XLA:CPU mallocs one block for a run's
temporaries (the handlers' outputs among them; 63 MB for the MNIST CNN train step) anew on
every run, which glibc served with a fresh mmap, page-faulted in on every step (a quarter of
the step); ``csrc/host_heap.h`` raises glibc's mmap and trim thresholds once, process-wide, so
the block can be reused: reliably only when XLA runs the program on the main thread, not on its
worker threads (JAX's default asynchronous dispatch; docs/layers.md, "Freed host memory").
``DLCONV_KEEP_HEAP=0`` (or ``DLCONV_JAX_KEEP_HEAP=0``) leaves malloc as it is.

*cpp on a CUDA GPU* — the same targets registered with platform ``"CUDA"`` from
``dlconv._C_cuda`` (``csrc/ffi_cuda.cpp``), launched on XLA's stream, no host round trip.
The CUDA backward kernels take dL/dz, so there an activation-backward call comes first.

*numba, reference, or a dlconv._C built without the FFI headers* — ``jax.pure_callback``
into :mod:`dlconv.ops` (NumPy arrays; on a GPU that is a host round trip).  It costs a
Python call and the array hand-over per op (``benchmarks/jax_step.py`` measures it: the numba
and reference per-call rows).

``jax.vmap``: every call is declared with ``vmap_method="sequential"`` (the documented
rule: one kernel call per vmapped element, in a loop), for the FFI calls and the callbacks
alike; the custom_vjp batches its forward and backward with them.

Which device: JAX places a traced computation on its default backend, so the path is
chosen from ``jax.default_backend()`` ("gpu" → the CUDA one) when the call is traced.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from .. import activations as _act
from .. import ops as _ops
from ..runtime import conv_geometry_cached, fuse_activation_grad, resolve_backend
from ..shapes import dense_geometry

__all__ = ["conv2d", "conv2d_transpose", "dense", "SUPPORTS_JIT", "ffi_status", "path_for", "VMAP_METHOD"]

#: Keras may jit a step holding these ops (they are FFI custom calls or pure callbacks).
SUPPORTS_JIT = True

#: How every call batches under ``jax.vmap`` (see the module docstring).
VMAP_METHOD = "sequential"

_F32 = jnp.float32
#: activation_backward's code for softmax (row-wise), as in csrc/ffi_cpu.cpp.
_SOFTMAX_CODE = 4


# ----------------------------------------------------------------------------- FFI targets
@functools.lru_cache(maxsize=None)
def ffi_status(platform: str):
    """(True, "") once the FFI handlers of ``platform`` ("cpu" or "CUDA") are registered with
    XLA, else (False, why not).  Registered once per process."""
    module = "dlconv._C" if platform == "cpu" else "dlconv._C_cuda"
    try:
        lib = importlib.import_module(module)
    except ImportError as exc:
        return False, f"{module} is not importable ({exc})"
    handlers = getattr(lib, "xla_ffi_handlers", None)
    table = handlers() if handlers is not None else {}
    if not table:
        return False, (f"{module} was built without the XLA FFI handlers (no XLA FFI headers at "
                       f"build time; rebuild with jaxlib installed)")
    for name, capsule in table.items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return True, ""


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def path_for(backend) -> str:
    """How ops of ``backend`` run here: "ffi" (XLA custom calls) or "callback"
    (``jax.pure_callback``)."""
    on_device = _on_gpu()
    be = resolve_backend(backend, on_device)
    if be.name == "cpp" and ffi_status("CUDA" if on_device else "cpu")[0]:
        return "ffi"
    return "callback"


def _ffi(target, out_shapes, *args, **attrs):
    """One FFI custom call; ``out_shapes`` a list of shapes (float32 results)."""
    outs = [jax.ShapeDtypeStruct(tuple(s), _F32) for s in out_shapes]
    call = jax.ffi.ffi_call(target, outs, vmap_method=VMAP_METHOD)
    attrs = {k: (np.asarray(v, np.int64) if isinstance(v, tuple) else np.int64(v))
             for k, v in attrs.items()}
    return call(*args, **attrs)


def _callback(fn, out_shapes, *args):
    """``fn(*numpy arrays) -> list of float32 arrays`` as a ``jax.pure_callback``."""
    outs = [jax.ShapeDtypeStruct(tuple(s), _F32) for s in out_shapes]

    def host(*arrays):
        res = fn(*[np.ascontiguousarray(a) for a in arrays])
        return [np.asarray(r, np.float32) for r in res]

    return jax.pure_callback(host, outs, *args, vmap_method=VMAP_METHOD)


# ----------------------------------------------------------------------------- checks
def _check_f32(name, a):
    """TypeError unless ``a`` (None allowed) is float32 already: nothing is converted, not
    even a float64 NumPy array that ``jnp.asarray`` would quietly narrow."""
    if a is None:
        return
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a float32 array, got {type(a).__name__}")
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"{name} must be float32, got {dtype} (dlconv kernels are float32; "
                        f"no silent conversion)")


def _check_bias(b, n):
    if b is not None and tuple(b.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(b.shape)}, expected ({n},)")


# ----------------------------------------------------------------------------- conv2d
@functools.lru_cache(maxsize=256)
def _conv_op(g, act: str, backend, has_bias: bool, sharded: bool = False):
    """The custom_vjp function ``op(x, w[, b]) -> y`` for one geometry and setting;
    ``sharded``: its FFI calls carry the batch-sharding rule (:mod:`.jax_sharding`)."""
    use_ffi = path_for(backend) == "ffi"
    on_device = use_ffi and _on_gpu()        # callbacks always get host (NumPy) arrays
    be = resolve_backend(backend, on_device)
    code = _act.code(act)
    geo = g.as_tuple()
    fused = fuse_activation_grad(backend, on_device, act)

    if use_ffi:
        def forward(x, w, *b):
            return _ffi("dlconv_conv2d_forward", [g.y_shape], x, w, *b,
                        geometry=geo, act=code, variant=0)[0]

        def act_backward(dy, y):
            return _ffi("dlconv_activation_backward", [g.y_shape], dy, y, act=code)[0]

        def backward_data(d, w):                     # d = [dz] or [dy, y]
            return _ffi("dlconv_conv2d_backward_data", [g.x_shape], d[0], w, *d[1:],
                        geometry=geo, act=code if len(d) == 2 else 0)[0]

        def backward_filter(x, d):
            return _ffi("dlconv_conv2d_backward_filter", [g.w_shape, (g.filters,)], x, *d,
                        geometry=geo, act=code if len(d) == 2 else 0)
    else:
        def forward(x, w, *b):
            return _callback(lambda x_, w_, *b_: [_ops.conv2d(
                x_, w_, b_[0] if b_ else None, activation=act, backend=be, geometry=g)],
                [g.y_shape], x, w, *b)[0]

        def act_backward(dy, y):
            return _callback(lambda dy_, y_: [_ops.activation_backward(dy_, y_, act, backend=be)],
                             [g.y_shape], dy, y)[0]

        def _kw(d):
            return {"y": d[1], "activation": act} if len(d) == 2 else {}

        def backward_data(d, w):
            return _callback(lambda w_, *d_: [_ops.conv2d_backward_data(
                d_[0], w_, g.x_shape, backend=be, geometry=g, **_kw(d_))],
                [g.x_shape], w, *d)[0]

        def backward_filter(x, d):
            return _callback(lambda x_, *d_: list(_ops.conv2d_backward_filter(
                x_, d_[0], g.w_shape, backend=be, geometry=g, **_kw(d_))),
                [g.w_shape, (g.filters,)], x, *d)

    parts = (forward, act_backward, backward_data, backward_filter)
    if sharded and use_ffi:                  # each device runs the kernels on its own rows
        from . import jax_sharding
        forward, act_backward, backward_data, backward_filter = jax_sharding.conv_parts(
            lambda n: _conv_op(g.with_batch(n), act, backend, has_bias).parts, has_bias, fused, act)

    @jax.custom_vjp
    def op(x, w, *b):
        return forward(x, w, *b)

    def op_fwd(x, w, *b):
        y = forward(x, w, *b)
        return y, (x, w, y)

    def op_bwd(res, dy):
        x, w, y = res
        if fused:
            d = [dy, y]                      # the kernels apply act'(y) as they read dy
        elif act == "linear":
            d = [dy]
        else:
            d = [act_backward(dy, y)]        # dz = act'(y) · dy, formed once for both passes
        dx = backward_data(d, w)
        dw, db = backward_filter(x, d)
        return (dx, dw, db) if has_bias else (dx, dw)

    op.defvjp(op_fwd, op_bwd)
    op.parts = parts
    return op


def conv2d(x, kernel, bias, *, strides, padding, dilation, activation="linear",
           backend="auto", out_shape=None, groups=1):
    """``act(conv2d(x, kernel) + bias)`` (NHWC / HWIO) as a differentiable JAX function.

    ``groups=G``: grouped convolution, kernel ``(kh, kw, C/G, F)``; the geometry record (and
    so the FFI attribute) carries G, one call for all groups.

    ``bias`` may be None.  ``activation`` one of :data:`dlconv.activations.ELEMENTWISE`.
    ``out_shape`` (from the layer) is checked against the resolved geometry when fully known.
    """
    act = _act.normalize(activation, allow_softmax=False)
    for name, a in (("x", x), ("kernel", kernel), ("bias", bias)):   # before any conversion
        _check_f32(name, a)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    bias = None if bias is None else jnp.asarray(bias)
    if isinstance(padding, list):
        padding = tuple(tuple(p) if isinstance(p, list) else p for p in padding)
    g = conv_geometry_cached(tuple(x.shape), tuple(kernel.shape), tuple(strides), padding,
                             tuple(dilation), int(groups))
    _check_bias(bias, g.filters)
    if out_shape is not None and None not in tuple(out_shape) and tuple(out_shape) != g.y_shape:
        raise ValueError(f"out_shape {tuple(out_shape)} does not match the geometry's output "
                         f"{g.y_shape}")
    from . import jax_sharding
    op = _conv_op(g, act, backend, bias is not None, jax_sharding.wanted(x, kernel, bias))
    return op(x, kernel, bias) if bias is not None else op(x, kernel)


# ----------------------------------------------------------------------------- dense
@functools.lru_cache(maxsize=256)
def _dense_op(x_shape, w_shape, act: str, backend, has_bias: bool, sharded: bool = False):
    """The custom_vjp function ``op(x, w[, b]) -> y`` for one shape and setting;
    ``sharded``: its FFI calls carry the batch-sharding rule (:mod:`.jax_sharding`)."""
    use_ffi = path_for(backend) == "ffi"
    be = resolve_backend(backend, use_ffi and _on_gpu())
    dg = dense_geometry(x_shape, w_shape)
    y_shape, b_shape = dg.y_shape, (dg.out_features,)
    softmax = act == "softmax"
    code = 0 if softmax else _act.code(act)

    if use_ffi:
        def forward(x, w, *b):
            y = _ffi("dlconv_dense_forward", [y_shape], x, w, *b, act=code)[0]
            return _ffi("dlconv_softmax", [y_shape], y)[0] if softmax else y

        def backward(x, w, y, dy):
            if softmax:                      # dz = softmax's Jacobian-vector product, then linear
                dy = _ffi("dlconv_activation_backward", [y_shape], dy, y, act=_SOFTMAX_CODE)[0]
                return _ffi("dlconv_dense_backward", [x_shape, w_shape, b_shape], x, w, dy, act=0)
            extra = (y,) if code else ()
            return _ffi("dlconv_dense_backward", [x_shape, w_shape, b_shape], x, w, dy, *extra,
                        act=code)
    else:
        def forward(x, w, *b):
            return _callback(lambda x_, w_, *b_: [_ops.dense(x_, w_, b_[0] if b_ else None,
                                                             activation=act, backend=be)],
                             [y_shape], x, w, *b)[0]

        def backward(x, w, y, dy):
            return _callback(lambda x_, w_, y_, dy_: list(_ops.dense_backward(
                x_, w_, dy_, y_, activation=act, backend=be)),
                [x_shape, w_shape, b_shape], x, w, y, dy)

    parts = (forward, backward)
    if sharded and use_ffi:                  # each device runs the kernels on its own rows
        from . import jax_sharding
        forward, backward = jax_sharding.dense_parts(
            lambda n: _dense_op((n,) + tuple(x_shape[1:]), w_shape, act, backend, has_bias).parts, has_bias)

    @jax.custom_vjp
    def op(x, w, *b):
        return forward(x, w, *b)

    def op_fwd(x, w, *b):
        y = forward(x, w, *b)
        return y, (x, w, y)

    def op_bwd(res, dy):
        x, w, y = res
        dx, dw, db = backward(x, w, y, dy)
        return (dx, dw, db) if has_bias else (dx, dw)

    op.defvjp(op_fwd, op_bwd)
    op.parts = parts
    return op


def dense(x, kernel, bias, *, activation="linear", backend="auto"):
    """``act(x @ kernel + bias)`` for rank-2 ``x`` as a differentiable JAX function.

    ``bias`` may be None.  ``activation`` one of :data:`dlconv.activations.SUPPORTED`.
    """
    act = _act.normalize(activation)
    for name, a in (("x", x), ("kernel", kernel), ("bias", bias)):   # before any conversion
        _check_f32(name, a)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    bias = None if bias is None else jnp.asarray(bias)
    dg = dense_geometry(tuple(x.shape), tuple(kernel.shape))
    _check_bias(bias, dg.out_features)
    from . import jax_sharding
    op = _dense_op(dg.x_shape, dg.w_shape, act, backend, bias is not None, jax_sharding.wanted(x, kernel, bias))
    return op(x, kernel, bias) if bias is not None else op(x, kernel)


# ----------------------------------------------------------------------------- conv2d_transpose
@functools.lru_cache(maxsize=256)
def _conv_transpose_op(g, backend):
    """The custom_vjp function ``op(x, w) -> y`` of Keras' Conv2DTranspose (linear, no bias)
    for one geometry ``g`` (the forward convolution whose backward-data it is): the
    backward-data kernels forward; dL/dx the forward kernels, dL/dw the backward-filter ones."""
    use_ffi = path_for(backend) == "ffi"
    on_device = use_ffi and _on_gpu()
    be = resolve_backend(backend, on_device)
    geo = g.as_tuple()

    if use_ffi:
        def forward(x, w):
            return _ffi("dlconv_conv2d_backward_data", [g.x_shape], x, w, geometry=geo, act=0)[0]

        def grad_x(dy, w):
            return _ffi("dlconv_conv2d_forward", [g.y_shape], dy, w, geometry=geo, act=0, variant=0)[0]

        def grad_w(dy, x):
            return _ffi("dlconv_conv2d_backward_filter", [g.w_shape, (g.filters,)], dy, x,
                        geometry=geo, act=0)[0]
    else:
        def forward(x, w):
            return _callback(lambda x_, w_: [_ops.conv2d_transpose(x_, w_, backend=be, geometry=g)],
                             [g.x_shape], x, w)[0]

        def grad_x(dy, w):
            return _callback(lambda dy_, w_: [_ops.conv2d(dy_, w_, backend=be, geometry=g)],
                             [g.y_shape], dy, w)[0]

        def grad_w(dy, x):
            return _callback(lambda dy_, x_: [_ops.conv2d_backward_filter(
                dy_, x_, g.w_shape, backend=be, geometry=g)[0]], [g.w_shape], dy, x)[0]

    @jax.custom_vjp
    def op(x, w):
        return forward(x, w)

    def op_fwd(x, w):
        return forward(x, w), (x, w)

    def op_bwd(res, dy):
        x, w = res
        return grad_x(dy, w), grad_w(dy, x)

    op.defvjp(op_fwd, op_bwd)
    return op


def conv2d_transpose(x, kernel, *, strides, padding, output_padding=None, dilation=(1, 1),
                     backend="auto", out_shape=None):
    """Keras' ``Conv2DTranspose`` (linear, no bias) of NHWC ``x`` with a kernel of shape
    ``(kh, kw, filters, in_channels)`` as a differentiable JAX function; the geometry from
    :func:`dlconv.shapes.conv_transpose_geometry` when traced.  ``out_shape`` (from the layer)
    is checked against it when fully known."""
    for name, a in (("x", x), ("kernel", kernel)):
        _check_f32(name, a)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    g = _ops.transpose_geometry(tuple(x.shape), tuple(kernel.shape), tuple(strides), padding,
                                None if output_padding is None else tuple(output_padding),
                                tuple(dilation))
    if out_shape is not None and None not in tuple(out_shape) and tuple(out_shape) != g.x_shape:
        raise ValueError(f"out_shape {tuple(out_shape)} does not match the transposed geometry's "
                         f"output {g.x_shape}")
    return _conv_transpose_op(g, backend)(x, kernel)


# ----------------------------------------------------------------------------- max pool
@functools.lru_cache(maxsize=None)
def pool_ffi_status():
    """(True, "") once the max pool's FFI handlers (``csrc/ffi_pool.cpp``, exported by
    ``dlconv._C.xla_ffi_pool_handlers``) are registered with XLA for the CPU, else (False, why)."""
    ok, why = ffi_status("cpu")
    if not ok:
        return ok, why
    lib = importlib.import_module("dlconv._C")
    table = lib.xla_ffi_pool_handlers() if hasattr(lib, "xla_ffi_pool_handlers") else {}
    if not table:
        return False, "dlconv._C has no max pool FFI handlers (rebuild it)"
    for name, capsule in table.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return True, ""


def pool_path_for(backend) -> str:
    """How the max pool of ``backend`` runs here: "ffi" (the C++ kernel as an XLA custom call:
    ``cpp``, and ``numba``, whose pool is the C++ one, see :func:`dlconv.ops.max_pool2d`) or
    "callback" (``jax.pure_callback`` into :mod:`dlconv.ops`: the reference, or no FFI build)."""
    be = _ops._pool_backend(backend)
    return "ffi" if be.name == "cpp" and pool_ffi_status()[0] else "callback"


@functools.lru_cache(maxsize=256)
def _pool_op(g, backend):
    """The custom_vjp function ``op(x) -> y`` of one pool geometry.  Forward: y and the int32
    argmax (``dlconv_max_pool2d_forward``); the argmax is the residual, and the backward is a
    gather from it (``dlconv_max_pool2d_backward``), measured faster than recomputing it from x
    (``csrc/cpu_pool.cpp``).  Under ``jax.vmap``: :data:`VMAP_METHOD`."""
    geo = np.asarray(g.as_tuple(), np.int64)
    outs = [jax.ShapeDtypeStruct(g.y_shape, _F32), jax.ShapeDtypeStruct(g.y_shape, jnp.int32)]
    if pool_path_for(backend) == "ffi":
        fwd_call = jax.ffi.ffi_call("dlconv_max_pool2d_forward", outs, vmap_method=VMAP_METHOD)
        bwd_call = jax.ffi.ffi_call("dlconv_max_pool2d_backward", jax.ShapeDtypeStruct(g.x_shape, _F32),
                                    vmap_method=VMAP_METHOD)

        def forward(x):
            y, arg = fwd_call(x, geometry=geo)
            return y, arg

        def backward(dy, arg, x):
            return bwd_call(dy, arg, geometry=geo)
    else:
        def forward(x):
            def host(x_):
                y, arg = _ops.max_pool2d(np.ascontiguousarray(x_), backend=backend, geometry=g,
                                         return_argmax=True)
                return y, arg
            return jax.pure_callback(host, tuple(outs), x, vmap_method=VMAP_METHOD)

        def backward(dy, arg, x):
            def host(dy_, arg_, x_):
                return _ops.max_pool2d_backward(np.ascontiguousarray(dy_), np.ascontiguousarray(x_),
                                                backend=backend, geometry=g,
                                                arg=np.ascontiguousarray(arg_, np.int32))
            return jax.pure_callback(host, jax.ShapeDtypeStruct(g.x_shape, _F32), dy, arg, x,
                                     vmap_method=VMAP_METHOD)

    @jax.custom_vjp
    def op(x):
        return forward(x)[0]

    def op_fwd(x):
        y, arg = forward(x)
        return y, (arg, x)

    def op_bwd(res, dy):
        arg, x = res
        return (backward(dy, arg, x),)

    op.defvjp(op_fwd, op_bwd)
    return op


def max_pool2d(x, *, pool_size=(2, 2), strides=None, padding="valid", backend="auto"):
    """Keras' ``MaxPooling2D`` of NHWC float32 ``x`` (TensorFlow's NaN/tie rules:
    :func:`dlconv.ops.max_pool2d`) as a differentiable, jittable JAX function (CPU)."""
    _check_f32("x", x)
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must have rank 4 (batch, height, width, channels), got shape {tuple(x.shape)}")
    pool = tuple(pool_size) if isinstance(pool_size, (list, tuple)) else pool_size
    strides = tuple(strides) if isinstance(strides, (list, tuple)) else strides
    g = _ops.pool_geometry(tuple(x.shape), pool, strides, padding)
    return _pool_op(g, backend)(x)
