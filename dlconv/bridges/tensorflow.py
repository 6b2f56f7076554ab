"""The TensorFlow bridge: where TensorFlow meets the dlconv ops.

:func:`conv2d` and :func:`dense` take TensorFlow tensors and return a TensorFlow tensor
whose forward *and* backward passes run dlconv kernels.  They work eagerly, inside
``tf.function``, in Keras' ``fit``/``evaluate``/``predict`` and in ``model.export``
(never under XLA: neither path below has an XLA kernel, so :mod:`dlconv.layers` sets
``supports_jit = False``).  Two paths:

Native ops (the default for the ``cpp`` backend on the CPU)
-----------------------------------------------------------
Importing this module loads dlconv's TensorFlow op library (:mod:`dlconv.tf_ops`: built on
first use against the installed TensorFlow, cached).  When it is loaded, the backend resolves
to ``cpp`` on the host and TensorFlow sees no GPU, the layers call the graph-native ops
``DlconvConv2D`` / ``DlconvDense`` (CPU ``OpKernel`` s calling the C++ kernels: no Python,
no GIL), whose gradients (``DlconvConv2DBackpropInput``, ``DlconvConv2DBackpropFilter``,
``DlconvDenseGrad``) are registered with ``tf.RegisterGradient``: a graph of a ``fit`` step
holds no ``PyFunc`` node, and an exported SavedModel runs in any process that loaded the
library.  The geometry is still resolved here, once, by :mod:`dlconv.shapes`
(:func:`dlconv.runtime.conv_geometry_cached`); the op's attrs carry the resolved pads,
strides and dilation.  A "same"-padded layer whose input height or width is unknown when the
graph is built (so its pads are not known) takes the callback path.

:func:`max_pool2d` (``dlconv.layers.MaxPooling2D``) runs ``DlconvMaxPool2D`` /
``DlconvMaxPool2DGrad`` the same way (CPU only; ``tf.nn.max_pool2d`` otherwise, never a
callback).  In a graph, a native relu conv whose output is pooled takes its gradient from the
pool's with the relu derivative folded in (``relu=True``) and runs its backward ops as linear
(:func:`_conv2d_grad`).  :func:`dropout` (``dlconv.layers.Dropout`` in training)
runs ``DlconvDropout``, whose gradient is the same op on dy (CPU only; the stock layer
otherwise).

Callbacks (the fallback: numba/reference backends, a GPU, or no op library)
---------------------------------------------------------------------------
``tf.custom_gradient`` over ``tf.numpy_function`` / ``tf.py_function`` callbacks into
:mod:`dlconv.ops`.  A graph holding them cannot be exported to run elsewhere.
:data:`NATIVE_REASON` says why the native ops are not loaded ("" when they are).

How a tensor reaches a kernel
-----------------------------
*Host (CPU) tensors* — ``tf.numpy_function`` in graphs (``tf.function``, ``fit``).
TensorFlow hands the callback NumPy arrays that view the tensors' buffers (no copy; TF
tensors are dense row-major float32, which is exactly what :mod:`dlconv.arrays`
accepts).  Run eagerly, ``numpy_function`` would copy its inputs, so eager calls skip it
and view the eager tensors with ``np.asarray`` (no copy).  The kernels allocate their
output as a fresh NumPy array, which TensorFlow then takes over (without a copy when the
array is 64-byte aligned, TensorFlow's requirement; with one otherwise).  The output's static shape is
set with ``set_shape`` so downstream Keras layers see it.

*CUDA tensors* — when TensorFlow sees a GPU, the callbacks run as ``tf.py_function``
(eager tensors inside, on whatever device they live).  A GPU tensor is exported with
``tf.experimental.dlpack.to_dlpack``; its DLPack capsule is read by :mod:`dlconv.dlpack` (ctypes)
into an object carrying ``__cuda_array_interface__``, which :mod:`dlconv.ops` accepts as a
CUDA array: no host round trip.  The kernels allocate their outputs (Numba device
arrays, *our* memory); each output is wrapped in a DLPack capsule whose deleter drops
our reference, and handed to TensorFlow with ``tf.experimental.dlpack.from_dlpack``.
TensorFlow never gets a buffer it did not agree to own, and we never write into a
TensorFlow buffer.

Synchronisation on the GPU (coarse, correct): TensorFlow enqueues the producers of our
inputs on its own stream before the callback runs, so the callback first calls
``numba.cuda.synchronize()`` (a whole-context barrier: TensorFlow and Numba share the
CUDA primary context) so that the inputs are complete; after our kernels it
synchronises again, so the outputs are complete before TensorFlow's stream reads them.
The installed numba-cuda has no DLPack import/export of its own, hence the small ctypes
reader/writer; it is exercised on host memory by the tests (the struct layout is the
same for every device), the GPU branch itself needs a machine with both TensorFlow and
a GPU.

Per-call overhead
-----------------
The :class:`~dlconv.shapes.ConvGeometry` is resolved once per input shape (an LRU cache
keyed by shapes and the layer's settings) and passed to the ops as ``geometry=``; the
backend object is resolved once per (name, place).  A layer's backward pass is
two callbacks, backward-data and backward-filter (separate, so that TensorFlow prunes the
first layer's unused backward-data); with the ``cpp`` backend on the CPU they take dL/dy
and the layer's output and apply the activation derivative inside the kernels, otherwise an
activation-backward callback forms dL/dz first.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf

from .. import activations as _act
from .. import ops as _ops
from .. import tf_ops as _tf_ops
from ..runtime import conv_geometry_cached, fuse_activation_grad, resolve_backend
from ..shapes import normalize_padding

__all__ = ["conv2d", "conv2d_transpose", "dense", "max_pool2d", "dropout", "tf_sees_gpu", "uses_native", "SUPPORTS_JIT", "FUSED_CONV",
           "FUSED_DENSE", "NATIVE_REASON"]

#: Neither the native ops nor the callbacks have an XLA kernel.
SUPPORTS_JIT = False

#: Activations fused into the conv kernels' epilogue.
FUSED_CONV = _act.ELEMENTWISE
#: Activations the dense path fuses (softmax as a row-wise kernel after the GEMM).
FUSED_DENSE = _act.SUPPORTED


# ----------------------------------------------------------------------------- caches
def _fused_activation_grad(backend: str, act: str) -> bool:
    """:func:`dlconv.runtime.fuse_activation_grad`, decided when the graph is built: for host
    tensors only (TensorFlow sees no GPU); otherwise the gradient keeps its separate
    activation-backward op, which every backend and device can run."""
    return not tf_sees_gpu() and fuse_activation_grad(backend, False, act)


@functools.lru_cache(maxsize=1)
def tf_sees_gpu() -> bool:
    """True when TensorFlow has a GPU device (then callbacks run as py_function)."""
    return bool(tf.config.list_logical_devices("GPU"))


def _read(v):
    """A variable's value as a tensor (its read is what the tape differentiates); None stays."""
    return None if v is None else tf.convert_to_tensor(v)


def _host(a):
    """A NumPy view the op API accepts (copies only in the odd non-contiguous case)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- DLPack
# The ctypes reader/writer lives in dlconv.dlpack (framework-free); these names stay here
# for the GPU path below.
from ..dlpack import (KDL_CPU, KDL_CUDA, _EXPORTED, capsule_from_buffer,  # noqa: E402,F401
                     capsule_info)
from ..dlpack import CudaView as _DLPackView  # noqa: E402


class _CudaView(_DLPackView):
    """A TensorFlow GPU tensor seen through ``__cuda_array_interface__`` (no copy)."""

    def __init__(self, tensor):
        super().__init__(tf.experimental.dlpack.to_dlpack(tensor), "TensorFlow tensor")


def _to_tf_from_device(arr, device_id: int):
    """A Numba device array we allocated → TensorFlow GPU tensor owning it via DLPack."""
    cap = capsule_from_buffer(arr, arr.__cuda_array_interface__["data"][0], arr.shape,
                              KDL_CUDA, device_id)
    return tf.experimental.dlpack.from_dlpack(cap)


def _run_on_tensors(fn, tensors, out_dtypes):
    """py_function body: run ``fn`` on NumPy views (host) or CUDA views (device)."""
    on_device = any("GPU" in t.device for t in tensors)
    if not on_device:
        outs = fn([_host(t.numpy()) for t in tensors], False)
        return [tf.convert_to_tensor(o) for o in outs]
    from numba import cuda
    views = [_CudaView(t) for t in tensors]   # ValueError if some input is not on a GPU
    device_ids = {v.device_id for v in views}
    if len(device_ids) != 1:
        raise ValueError(f"inputs live on different GPUs {sorted(device_ids)}")
    (device_id,) = device_ids
    with cuda.gpus[device_id]:           # Numba's context = TensorFlow's (primary) context
        cuda.synchronize()               # TensorFlow's producers of our inputs are done
        outs = fn(views, True)
        cuda.synchronize()               # our kernels are done before TensorFlow reads
        del views                        # releases the input capsules
        return [_to_tf_from_device(o, device_id) for o in outs]


def _refuse_export(what):
    """A graph traced for a SavedModel must not hold a Python callback: it would load nowhere
    else.  Raised while ``tf.saved_model.save`` / ``model.export`` traces (the save context)."""
    from tensorflow.python.saved_model import save_context
    if save_context.in_save_context():
        scope = tf.get_current_name_scope()   # Keras calls a layer under its name
        raise RuntimeError(
            f"dlconv {what} (layer {scope!r}): cannot export a dlconv layer that runs through Python callbacks "
            f"(numpy_function), the SavedModel would not run in any other process. The graph-native "
            f"TensorFlow ops are not used here: "
            f"{NATIVE_REASON or 'the layer backend is not cpp on the CPU (or TensorFlow sees a GPU)'}. "
            f"Use backend='cpp' (or 'auto') on the CPU with dlconv's op library available "
            f"(python -m dlconv.tf_ops builds it), or export the stock Keras layers with the same weights.")


def _callback(fn, inputs, n_out):
    """Run ``fn(arrays, on_device) -> list of n_out float32 arrays`` as a TF op."""
    _refuse_export(getattr(fn, "__qualname__", "op").split(".")[0])
    tout = [tf.float32] * n_out
    if tf_sees_gpu():
        out = tf.py_function(lambda *t: _run_on_tensors(fn, t, tout), inputs, tout)
    elif tf.executing_eagerly():
        # Eager host tensors: np.asarray views their buffers (numpy_function would copy
        # them when run eagerly; inside tf.function it hands views).
        out = [tf.convert_to_tensor(o) for o in fn([_host(np.asarray(t)) for t in inputs], False)]
    else:
        out = tf.numpy_function(lambda *a: fn([_host(x) for x in a], False), inputs, tout,
                                stateful=False)
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ----------------------------------------------------------------------------- native ops
try:
    _LIB = _tf_ops.load()
    NATIVE_REASON = ""
except _tf_ops.TFOpsUnavailable as _exc:
    _LIB = None
    NATIVE_REASON = str(_exc)


def uses_native(backend="auto") -> bool:
    """Whether layers with this ``backend`` run the graph-native ops (else the callbacks)."""
    if _LIB is None or tf_sees_gpu():
        return False
    try:
        return resolve_backend(backend, False).name == "cpp"
    except Exception:   # unavailable backend: the callback path raises the reason when run
        return False


def _no_bias():
    """The ops' "no bias" input: a vector of length 0."""
    return tf.zeros([0], tf.float32)


def _conv_attrs(op):
    return dict(strides=op.get_attr("strides"), dilations=op.get_attr("dilations"),
                pads=op.get_attr("pads"), groups=op.get_attr("groups"),
                activation=op.get_attr("activation").decode())


def _pool_of_relu_conv(y, dy, attrs):
    """The native max pool op whose gradient ``dy`` is, when the conv applies relu, its output
    ``y`` is that pool's input and dy is exactly that pool's gradient (the MNIST CNN's conv2 ->
    MaxPooling2D); else None.  Graphs only (an eager tape hands over values, not the ops that
    made them)."""
    if attrs["activation"] != "relu" or tf.executing_eagerly():
        return None
    if dy.op.type != "DlconvMaxPool2DGrad" or dy.op.get_attr("relu") or dy.op.inputs[0] is not y:
        return None
    return dy.op


def _is_pool2x2(pool_grad) -> bool:
    """Whether a ``DlconvMaxPool2DGrad`` op is of a 2x2, stride-2, unpadded pool (each conv
    output in at most one window: what the ``...FromPool`` backward ops read)."""
    return (list(pool_grad.get_attr("ksize")), list(pool_grad.get_attr("strides")),
            list(pool_grad.get_attr("pads"))) == ([2, 2], [2, 2], [0, 0, 0, 0])


@tf.RegisterGradient("DlconvConv2D")
def _conv2d_grad(op, dy):
    """dx, dw, db of ``DlconvConv2D``: dy = dL/dy and y go to the backward kernels, which apply
    the activation's derivative themselves.  TensorFlow prunes dx where nobody reads it (the
    first layer).

    A relu conv whose output feeds a native max pool (:func:`_pool_of_relu_conv`) folds the
    relu's derivative into the pool's gradient instead, and its backward ops run as linear:
    a 2x2 stride-2 valid pool's gradient is read in place by ``DlconvConv2DBackpropInputFromPool``
    / ``...FilterFromPool`` (pool_dy and arg: the conv's dL/dz, 19 MB for MNIST conv2 at batch
    128, is never formed); other pools take the same gather with ``relu=True`` (entries whose
    pooled member was not > 0 match nothing, as relu' = 1 where y > 0).  The values are the
    same bit for bit.  The unmasked pool gradient, then unread, is pruned by TensorFlow; anyone
    else asking for dL/dy (a tape over y) still gets that one, unmasked."""
    x, w, b = op.inputs
    y = op.outputs[0]
    attrs = _conv_attrs(op)
    pool = _pool_of_relu_conv(y, dy, attrs)
    if pool is not None and _is_pool2x2(pool):
        _, pool_dy, arg = pool.inputs
        dx, dw, db = _conv2d_grad_from_pool(x, w, pool_dy, arg, attrs)
        return [dx, dw, db if b.shape[0] != 0 else None]
    if pool is not None:
        pool_x, pool_dy, arg = pool.inputs
        dy = _LIB.dlconv_max_pool2d_grad(pool_x, pool_dy, arg, ksize=pool.get_attr("ksize"),
                                         strides=pool.get_attr("strides"), pads=pool.get_attr("pads"), relu=True)
        attrs = dict(attrs, activation="linear")
    dx = _LIB.dlconv_conv2d_backprop_input(dy, w, y, tf.shape(x, out_type=tf.int32), **attrs)
    dw, db = _LIB.dlconv_conv2d_backprop_filter(x, dy, y, kernel_size=list(w.shape[:2]),
                                                alone=_is_graph_input(x), **attrs)
    return [dx, dw, db if b.shape[0] != 0 else None]


def _conv2d_grad_from_pool(x, w, pool_dy, arg, attrs):
    """dx, dw, db of a relu conv (attrs) whose output's 2x2 stride-2 valid max pool has
    gradient pool_dy and arg output arg."""
    attrs = dict(attrs, activation="relu")
    dx = _LIB.dlconv_conv2d_backprop_input_from_pool(pool_dy, arg, w, tf.shape(x, out_type=tf.int32), **attrs)
    dw, db = _LIB.dlconv_conv2d_backprop_filter_from_pool(x, pool_dy, arg, kernel_size=list(w.shape[:2]),
                                                          alone=_is_graph_input(x), **attrs)
    return dx, dw, db


@tf.RegisterGradient("DlconvConv2DBackpropInputFromPool")
@tf.RegisterGradient("DlconvConv2DBackpropFilterFromPool")
def _conv_from_pool_grad_grad(op, *grads):
    raise NotImplementedError("dlconv: no second derivative through a max pool's gradient (" + op.type +
                              "); use keras.layers.MaxPooling2D for a double backward")


def _is_graph_input(x) -> bool:
    """Whether ``x`` is an argument of the graph being differentiated (a ``Placeholder``: the
    model's input in ``fit`` and ``train_on_batch``), so that the layer's backward-data pass is
    pruned and its backward-filter runs alone, not beside it (the op's ``alone`` attr: a
    threading hint only).  False when eager (no graph to read)."""
    try:
        return x.op.type == "Placeholder"
    except AttributeError:      # an eager tensor has no .op
        return False


@tf.RegisterGradient("DlconvDense")
def _dense_grad(op, dy):
    x, w, b = op.inputs
    dx, dw, db = _LIB.dlconv_dense_grad(x, w, dy, op.outputs[0],
                                        activation=op.get_attr("activation").decode())
    return [dx, dw, db if b.shape[0] != 0 else None]


def _native_pads(x_shape, w_shape, strides, padding, dilation, groups=1):
    """(top, bottom, left, right) resolved by dlconv.shapes, or None when "same" padding meets
    an unknown height or width (its pads depend on the size)."""
    n, h, w, c = x_shape
    if h is not None and w is not None and c is not None:
        g = conv_geometry_cached((1, h, w, c), w_shape, strides, padding, dilation, groups)
        return [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right]
    pad = normalize_padding(padding)
    if pad == "same":
        return None
    if pad == "valid":
        return [0, 0, 0, 0]
    (t, bo), (le, r) = pad
    return [t, bo, le, r]


# ----------------------------------------------------------------------------- conv2d
@tf.autograph.experimental.do_not_convert   # plain Python: nothing for AutoGraph to convert
def conv2d(x, kernel, bias, *, strides, padding, dilation, activation="linear",
           backend="auto", out_shape=None, groups=1):
    """``act(conv2d(x, kernel) + bias)`` (NHWC / HWIO) as a differentiable TF op.

    ``groups=G``: grouped convolution, kernel ``(kh, kw, C/G, F)``, one op for all groups.

    ``bias`` may be None.  ``activation`` must be one of :data:`FUSED_CONV`.
    ``out_shape`` is the static output shape to set (may hold None).
    """
    act = _act.normalize(activation, allow_softmax=False)
    strides, dilation = tuple(strides), tuple(dilation)
    kernel, bias = _read(kernel), _read(bias)
    w_shape = tuple(int(d) for d in kernel.shape)
    has_bias = bias is not None
    if uses_native(backend):
        x = tf.convert_to_tensor(x)
        pads = _native_pads(tuple(x.shape), w_shape, strides, padding, dilation, groups)
        if pads is not None:
            y = _LIB.dlconv_conv2d(x, kernel, bias if has_bias else _no_bias(), strides=list(strides),
                                   dilations=list(dilation), pads=pads, groups=groups, activation=act)
            if out_shape is not None:
                y.set_shape(out_shape)
            return y

    def geometry(x_shape):
        return conv_geometry_cached(tuple(x_shape), w_shape, strides, padding, dilation, groups)

    def forward(arrays, on_device):
        x_, w_ = arrays[0], arrays[1]
        b_ = arrays[2] if has_bias else None
        be = resolve_backend(backend, on_device)
        g = geometry(x_.shape)
        return [_ops.conv2d(x_, w_, b_, activation=act, backend=be, geometry=g)]

    # The backward pass is three callbacks, not one, so that inside tf.function (fit) the
    # backward-data op of a layer whose input needs no gradient (the first layer: its
    # input is the data) is pruned by TensorFlow as an op whose output nobody reads.
    def activation_backward(arrays, on_device):
        dy_, y_ = arrays
        return [_ops.activation_backward(dy_, y_, act, backend=resolve_backend(backend, on_device))]

    # The gradient arrives as [dz] (dL/dz, the linear output's), or, when the backend applies
    # the activation derivative inside its kernels, as [dy, y] (dL/dy and the layer's output:
    # no dz tensor and no activation-backward op; see _fused_activation_grad).
    def grad_args(d):
        return (d[0], {"y": d[1], "activation": act}) if len(d) == 2 else (d[0], {})

    def backward_data(arrays, on_device):
        *d, w_, x_ = arrays             # x_ only for its shape (a view: nothing is copied)
        g = geometry(x_.shape)
        d_, kw = grad_args(d)
        return [_ops.conv2d_backward_data(d_, w_, g.x_shape, backend=resolve_backend(backend, on_device),
                                          geometry=g, **kw)]

    def backward_filter(arrays, on_device):
        x_, *d = arrays
        g = geometry(x_.shape)
        d_, kw = grad_args(d)
        dw, db = _ops.conv2d_backward_filter(x_, d_, w_shape, backend=resolve_backend(backend, on_device),
                                             geometry=g, **kw)
        return [dw, db] if has_bias else [dw]

    fused_grad = _fused_activation_grad(backend, act)

    @tf.custom_gradient
    def op(*args):
        x_t, w_t = args[0], args[1]
        (y,) = _callback(forward, list(args), 1)
        if out_shape is not None:
            y.set_shape(out_shape)

        def grad(dy):
            n_w = 2 if has_bias else 1
            if fused_grad:
                d = [dy, y]
            elif act == "linear":
                d = [dy]
            else:
                (dz,) = _callback(activation_backward, [dy, y], 1)
                dz.set_shape(y.shape)
                d = [dz]
            (dx,) = _callback(backward_data, d + [w_t, x_t], 1)
            dwb = _callback(backward_filter, [x_t] + d, n_w)
            dx.set_shape(x_t.shape)
            dwb[0].set_shape(w_t.shape)
            if has_bias:
                dwb[1].set_shape(args[2].shape)
            return [dx] + dwb

        return y, grad

    args = [x, kernel] + ([bias] if has_bias else [])
    return op(*args)


# ----------------------------------------------------------------------------- dense
@tf.autograph.experimental.do_not_convert   # plain Python: nothing for AutoGraph to convert
def dense(x, kernel, bias, *, activation="linear", backend="auto"):
    """``act(x @ kernel + bias)`` for rank-2 ``x`` as a differentiable TF op.

    ``bias`` may be None.  ``activation`` must be one of :data:`FUSED_DENSE`.
    """
    act = _act.normalize(activation)
    kernel, bias = _read(kernel), _read(bias)
    has_bias = bias is not None
    units = int(kernel.shape[1])
    if uses_native(backend):
        return _LIB.dlconv_dense(x, kernel, bias if has_bias else _no_bias(), activation=act)

    def forward(arrays, on_device):
        x_, w_ = arrays[0], arrays[1]
        b_ = arrays[2] if has_bias else None
        return [_ops.dense(x_, w_, b_, activation=act, backend=resolve_backend(backend, on_device))]

    def backward(arrays, on_device):
        x_, w_, y_, dy_ = arrays
        dx, dw, db = _ops.dense_backward(x_, w_, dy_, y_, activation=act,
                                         backend=resolve_backend(backend, on_device))
        return [dx, dw, db] if has_bias else [dx, dw]

    @tf.custom_gradient
    def op(*args):
        x_t, w_t = args[0], args[1]
        (y,) = _callback(forward, list(args), 1)
        y.set_shape((x_t.shape[0], units))

        def grad(dy):
            grads = _callback(backward, [x_t, w_t, y, dy], 3 if has_bias else 2)
            grads[0].set_shape(x_t.shape)
            grads[1].set_shape(w_t.shape)
            if has_bias:
                grads[2].set_shape(args[2].shape)
            return grads

        return y, grad

    args = [x, kernel] + ([bias] if has_bias else [])
    return op(*args)


# ----------------------------------------------------------------------------- conv2d_transpose
def _no_y():
    """The backward ops' "no activation output" input (read only for a fused activation; their
    shape functions want rank 4): an empty rank-4 tensor."""
    return tf.zeros([0, 0, 0, 0], tf.float32)


@tf.RegisterGradient("DlconvConv2DBackpropInput")
def _conv2d_backprop_input_grad(op, grad):
    """Gradients of ``DlconvConv2DBackpropInput`` used as a forward op (the transposed
    convolution, :func:`conv2d_transpose`): with respect to its dy input the forward
    convolution of ``grad``, with respect to w the backward-filter pass with ``grad`` as the
    input and dy as the output gradient.  Linear only: with a fused activation the op is
    itself a gradient, and its second derivative is not implemented."""
    dy, w = op.inputs[0], op.inputs[1]
    attrs = _conv_attrs(op)
    if attrs["activation"] != "linear":
        raise NotImplementedError(
            f"dlconv: no second derivative through DlconvConv2DBackpropInput with the fused "
            f"activation {attrs['activation']!r}")
    d_dy = _LIB.dlconv_conv2d(grad, w, _no_bias(), **attrs)
    d_w, _ = _LIB.dlconv_conv2d_backprop_filter(grad, dy, _no_y(), kernel_size=list(w.shape[:2]),
                                                **attrs)
    return [d_dy, d_w, None, None]


@tf.autograph.experimental.do_not_convert   # plain Python: nothing for AutoGraph to convert
def conv2d_transpose(x, kernel, *, strides, padding, output_padding=None, dilation=(1, 1),
                     backend="auto", out_shape=None):
    """Keras' ``Conv2DTranspose`` (linear, no bias) of NHWC ``x`` with a kernel of shape
    ``(kh, kw, filters, in_channels)`` as a differentiable TF op: the backward-data kernels
    forward, the forward and backward-filter kernels for its gradients.

    Native: ``DlconvConv2DBackpropInput`` (its gradient registered above), when the height and
    width are known at graph-building time; otherwise callbacks into
    :func:`dlconv.ops.conv2d_transpose` / :func:`dlconv.ops.conv2d_transpose_backward`.
    """
    strides, dilation = tuple(strides), tuple(dilation)
    output_padding = None if output_padding is None else tuple(output_padding)
    kernel = _read(kernel)
    x = tf.convert_to_tensor(x)
    w_shape = tuple(int(d) for d in kernel.shape)

    def geometry(x_shape):
        return _ops.transpose_geometry(tuple(x_shape), w_shape, strides, padding, output_padding, dilation)

    n, h, w, c = tuple(x.shape)
    if uses_native(backend) and None not in (h, w, c):
        g = geometry((1, h, w, c))
        out = tf.stack([tf.shape(x, out_type=tf.int32)[0], g.in_h, g.in_w, g.in_c])
        y = _LIB.dlconv_conv2d_backprop_input(
            x, kernel, _no_y(), out, strides=list(strides), dilations=list(dilation),
            pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right], activation="linear")
        y.set_shape((n, g.in_h, g.in_w, g.in_c))
        return y

    def forward(arrays, on_device):
        x_, w_ = arrays
        return [_ops.conv2d_transpose(x_, w_, backend=resolve_backend(backend, on_device),
                                      geometry=geometry(x_.shape))]

    def backward_data(arrays, on_device):        # dL/dx: the forward convolution of dy
        dy_, w_, x_ = arrays                     # x_ only for its shape
        g = geometry(x_.shape)
        return [_ops.conv2d(dy_, w_, backend=resolve_backend(backend, on_device), geometry=g)]

    def backward_filter(arrays, on_device):      # dL/dkernel: dy is the input, x the gradient
        dy_, x_ = arrays
        g = geometry(x_.shape)
        dw, _ = _ops.conv2d_backward_filter(dy_, x_, w_shape, backend=resolve_backend(backend, on_device),
                                            geometry=g)
        return [dw]

    @tf.custom_gradient
    def op(x_t, w_t):
        (y,) = _callback(forward, [x_t, w_t], 1)
        if out_shape is not None:
            y.set_shape(out_shape)

        def grad(dy):
            (dx,) = _callback(backward_data, [dy, w_t, x_t], 1)
            (dw,) = _callback(backward_filter, [dy, x_t], 1)
            dx.set_shape(x_t.shape)
            dw.set_shape(w_t.shape)
            return [dx, dw]

        return y, grad

    return op(x, kernel)


# ----------------------------------------------------------------------------- max_pool2d
@tf.RegisterGradient("DlconvMaxPool2D")
def _max_pool2d_grad(op, dy, _darg):
    """dx of ``DlconvMaxPool2D``: a gather of dy from its stored arg output (no recomputed
    window); arg (uint8 window taps) has no gradient."""
    x = op.inputs[0]
    dx = _LIB.dlconv_max_pool2d_grad(x, dy, op.outputs[1], ksize=op.get_attr("ksize"),
                                     strides=op.get_attr("strides"), pads=op.get_attr("pads"))
    return [dx]


@tf.RegisterGradient("DlconvMaxPool2DGrad")
def _max_pool2d_grad_grad(op, grad):
    raise NotImplementedError("dlconv: no second derivative through DlconvMaxPool2DGrad (the max pool's "
                              "gradient); use keras.layers.MaxPooling2D for a double backward")


def pool_may_be_native(backend="auto") -> bool:
    """Whether a max pool with this ``backend`` may run ``DlconvMaxPool2D`` (no XLA kernel: the
    layer then sets ``supports_jit = False``): the op library is loaded, TensorFlow sees no GPU
    and ``backend`` is not ``reference`` (``numba`` runs the C++ pool, as on the other Keras
    backends)."""
    return _LIB is not None and not tf_sees_gpu() and backend != "reference"


def native_pool(x, backend="auto") -> bool:
    """Whether :func:`max_pool2d` of ``x`` runs the graph-native ``DlconvMaxPool2D``:
    :func:`pool_may_be_native` and x's height, width and channels are known when the graph is
    built (the pads are resolved then)."""
    if not pool_may_be_native(backend):
        return False
    shape = tuple(x.shape)
    return len(shape) == 4 and None not in shape[1:]


#: Most taps of a native pool (its arg output is the uint8 window tap, bit 7 a flag; larger
#: pools: the stock op).
MAX_NATIVE_POOL_TAPS = 128


@tf.autograph.experimental.do_not_convert   # plain Python: nothing for AutoGraph to convert
def max_pool2d(x, *, pool_size=(2, 2), strides=None, padding="valid", backend="auto"):
    """Keras' ``MaxPooling2D`` (NHWC, float32, TensorFlow's NaN and tie rules) as a
    differentiable TF op: ``DlconvMaxPool2D`` and its gradient ``DlconvMaxPool2DGrad`` (a gather
    from the forward's uint8 arg output: each output's window tap ``kh * k_w + kw``) when
    :func:`native_pool` and the pool has at most :data:`MAX_NATIVE_POOL_TAPS` taps, else ``tf.nn.max_pool2d``
    (the stock layer's op).  The geometry is :func:`dlconv.ops.pool_geometry`'s."""
    x = tf.convert_to_tensor(x)
    if not native_pool(x, backend) or pool_size[0] * pool_size[1] > MAX_NATIVE_POOL_TAPS:
        pool = list(pool_size)
        return tf.nn.max_pool2d(x, pool, list(pool if strides is None else strides), padding.upper())
    n, h, w, c = tuple(x.shape)
    g = _ops.pool_geometry((1, h, w, c), tuple(pool_size), None if strides is None else tuple(strides),
                           padding.lower())
    if (g.k_h, g.k_w, g.stride_h, g.stride_w, g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == \
            (2, 2, 2, 2, 0, 0, 0, 0) and _fusable_relu_conv(x):
        conv = x.op
        y, _arg = _LIB.dlconv_conv2d_max_pool2x2(*conv.inputs, **_conv_attrs(conv))
        y.set_shape((x.shape[0], g.out_h, g.out_w, c))
        return y
    y, _arg = _LIB.dlconv_max_pool2d(x, ksize=[g.k_h, g.k_w], strides=[g.stride_h, g.stride_w],
                                     pads=[g.pad_top, g.pad_bottom, g.pad_left, g.pad_right])
    return y


def _fusable_relu_conv(x) -> bool:
    """Whether a 2x2 stride-2 valid native pool of ``x`` runs as ``DlconvConv2DMaxPool2x2``
    with the conv that made it: opt-in (``DLCONV_TF_FUSE_CONV_POOL=1`` when the graph is
    traced), and ``x`` is the output of an ungrouped native relu ``DlconvConv2D`` in a graph.
    The fused op reads the conv's inputs, never x: TensorFlow prunes the conv op unless
    something else reads x (which then gets the same values), and the conv's output is never
    written (its kernel takes Winograd's F(2x2) tiles as the pool windows where they apply).

    Opt-in because it changes what a tape over x sees inside a graph: the pool no longer reads
    x, so dL/dx has no path through the pool (``tape.gradient(loss, x)`` is None for it;
    Grad-CAM under ``tf.function`` asks exactly that).  Keras' ``fit``, ``evaluate`` and
    ``predict`` (gradients for the variables only) and gradients for the model's input are
    unchanged.  Deciding it by whether anyone asks would need the finished graph (a Grappler
    pass), which a layer call does not see.  Measured: docs/layers.md."""
    if os.environ.get("DLCONV_TF_FUSE_CONV_POOL", "0") != "1":
        return False
    try:
        op = x.op
    except AttributeError:      # eager: no graph to read
        return False
    if op.type != "DlconvConv2D" or op.get_attr("activation") != b"relu" or op.get_attr("groups") != 1:
        return False
    # the kernel size, for the gradient's backward-filter op
    return None not in tuple(op.inputs[1].shape)


@tf.RegisterGradient("DlconvConv2DMaxPool2x2")
def _conv_max_pool_grad(op, dy, _darg):
    """dx, dw, db of ``DlconvConv2DMaxPool2x2``: the conv's backward ops reading the pool's
    gradient dy and the op's arg output in place (``DlconvConv2DBackpropInputFromPool`` /
    ``...FilterFromPool``, the relu's derivative in arg), as :func:`_conv2d_grad` gives the
    unfused pair.  arg has no gradient."""
    x, w, b = op.inputs
    dx, dw, db = _conv2d_grad_from_pool(x, w, dy, op.outputs[1], _conv_attrs(op))
    return [dx, dw, db if b.shape[0] != 0 else None]


# ----------------------------------------------------------------------------- dropout
@tf.RegisterGradient("DlconvDropout")
def _dropout_grad(op, dy):
    """dx of ``DlconvDropout``: the same op on dy with the same seed (the mask regenerated, not
    stored); the seed has no gradient."""
    return [_LIB.dlconv_dropout(dy, op.inputs[1], rate=op.get_attr("rate")), None]


def dropout_may_be_native(backend="auto") -> bool:
    """Whether a dropout may run ``DlconvDropout`` (no XLA kernel: the layer then sets
    ``supports_jit = False``): the op library is loaded, TensorFlow sees no GPU and ``backend``
    is not ``reference`` (there is one dropout kernel, the C++ one)."""
    return _LIB is not None and not tf_sees_gpu() and backend != "reference"


@tf.autograph.experimental.do_not_convert   # plain Python: nothing for AutoGraph to convert
def dropout(x, rate, seed):
    """Dropout of a float32 tensor (any shape) as a differentiable TF op, ``DlconvDropout``:
    kept elements ``x / (1 - rate)``, dropped ones 0 (NaN included, as ``tf.nn.dropout``), the
    mask a hash of (seed, counter, element index) (``csrc/cpu_dropout.h``); its gradient is the
    same op on dy.  ``seed``: an int32/int64 tensor of shape (2,) (Keras' ``SeedGenerator.next()``)
    or a pair of ints.  Needs :func:`dropout_may_be_native`; ``rate`` in (0, 1), taken as the
    op's float32 attr (TensorFlow has no double attrs: ``float32(rate)`` is what the kernel sees,
    so at rates that float32 does not hold exactly a rare element's mask bit can differ from the
    torch op's for the same seed)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise ValueError(f"rate must be a float in (0, 1), got {rate!r}")
    if _LIB is None:
        raise RuntimeError(f"dlconv: the TensorFlow op library is not loaded ({NATIVE_REASON})")
    x = tf.convert_to_tensor(x)
    if x.dtype != tf.float32:
        raise TypeError(f"x must be float32, got {x.dtype.name}")
    if not isinstance(seed, tf.Tensor):
        seed = tf.constant([int(v) & ((1 << 63) - 1) for v in seed], dtype=tf.int64)
    if seed.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"seed must be an int32 or int64 tensor (seed, counter), got {seed.dtype.name}")
    if seed.shape.rank is not None and tuple(seed.shape) != (2,):
        raise ValueError(f"seed must have shape (2,) (seed, counter), got {tuple(seed.shape)}")
    return _LIB.dlconv_dropout(x, seed, rate=float(rate))
