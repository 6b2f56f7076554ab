"""The framework-free op API: ``conv2d``, ``dense`` and their backward passes.

No TensorFlow on this path.  Each function

1. checks its arrays (:mod:`dlconv.arrays`: float32, C-contiguous, rank, where they live),
2. resolves the geometry ONCE with :mod:`dlconv.shapes` (or takes a ``geometry=`` the
   caller resolved already) and checks every shape against it,
3. hands both to a backend from :mod:`dlconv.backends`, which picks its CUDA kernels for
   CUDA arrays and its CPU kernels for NumPy arrays.

NumPy in → NumPy out.  CUDA arrays in (Numba device arrays, or any object with
``__cuda_array_interface__`` or a CUDA ``__dlpack__``, e.g. torch or CuPy tensors) →
Numba device array out, with no host round trip; ``stream=`` (a Numba stream) launches on
the caller's stream.  An empty batch returns an empty result of the right shape without
launching anything.

Backward functions (used by :mod:`dlconv.layers`, usable directly):

``conv2d_backward_data(dy, w, x_shape, ...)``   → dL/dx
``conv2d_backward_filter(x, dy, w_shape, ...)`` → (dL/dw, dL/db)
``dense_backward(x, w, dy, y, activation)``     → (dL/dx, dL/dw, dL/db)
``activation_backward(dy, y, activation)``      → dL/dz (from the activation's output y)

Transposed convolution (Keras' ``Conv2DTranspose``; its geometry from
:func:`dlconv.shapes.conv_transpose_geometry`, the *forward* convolution it is the
backward-data of) runs on the same kernels, roles exchanged:

``conv2d_transpose(x, w, b, ...)``              → y: the backward-data kernels
``conv2d_transpose_backward(dy, x, w, ...)``    → (dL/dx: the forward kernels,
                                                   dL/dw: the backward-filter kernels, dL/db)

The conv backward functions take the gradient with respect to the convolution's *linear*
output z.  When the forward fused an activation, apply :func:`activation_backward` first,
or pass dL/dy with ``y=`` (the activated output) and ``activation=``: the ``cpp`` CPU
kernels then apply the derivative as they read dy.

Host kernels run one at a time on :data:`dlconv.runtime.HOST_THREAD`; device kernels on
their stream.  What the framework bridges share (the geometry cache, the backend cache, the
decision to fuse an activation's derivative into the backward kernels) is in
:mod:`dlconv.runtime`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

from . import activations as _act
from . import arrays as _arr
from . import backends as _backends
from .runtime import HOST_THREAD
from .shapes import ConvGeometry, conv_geometry, conv_transpose_geometry, dense_geometry

__all__ = ["conv2d", "conv2d_backward_data", "conv2d_backward_filter", "conv2d_transpose",
           "conv2d_transpose_backward", "transpose_geometry", "dense", "dense_backward",
           "softmax", "activation_backward", "max_pool2d", "max_pool2d_backward", "pool_geometry",
           "DEFAULT_BACKEND", "HOST_THREAD"]

DEFAULT_BACKEND = "numba"

def _run(on_device: bool, fn):
    """Run the kernel call ``fn()``: host calls on :data:`HOST_THREAD`, device calls here."""
    return fn() if on_device else HOST_THREAD.run(fn)


def _exact_with_nonfinite_weights(be, w, on_device: bool, g: ConvGeometry, padded: bool):
    """``be``, or the reference backend when host kernels would meet a ±Inf / NaN weight
    with their zero padding.  The GEMM-style kernels multiply padding by the weights, and
    0 · Inf is NaN where TensorFlow (and the reference) leave padding terms out.  Only
    ``padded`` calls (a forward with padding, every backward-data) and only a non-finite w:
    a diverged model's weights, where exactness beats speed.  The test is w · w, one BLAS
    pass over the weights (0.5 us for 3x3x8x16, 1.6 us for MNIST's conv2; np.isfinite(w).all()
    takes 3x longer): ±Inf or NaN anywhere makes it non-finite.  Weights above ~1e19 overflow
    it too, which only sends such a call to the (exact, slower) reference."""
    if on_device or not padded or be.name == "reference":
        return be
    flat = w.reshape(-1)
    if math.isfinite(flat.dot(flat)):
        return be
    return _backends.get("reference")


def _resolve_backend(backend, on_device: bool):
    if backend is None or backend == "auto":
        return _backends.auto(on_device)
    b = _backends.get(backend)
    b.require(on_device)
    return b


#: The arrays a call may leave out (None): the bias and the activation's output y.
_OPTIONAL = frozenset(("b", "y"))


def _prepare(named, ranks, stream=None):
    """Validate every (name, array) pair; → (on_device, list of arrays).  Device arrays are
    ordered on the launch ``stream`` (their producer streams waited on: dlconv.streams)."""
    for name, a in named:
        if a is None and name not in _OPTIONAL:
            raise TypeError(f"{name} must be an array, got None")
    on_device = _arr.same_place(named)
    if on_device:
        out = [None if a is None else _arr.device_array(a, name, rank=ranks[name], stream=stream)
               for name, a in named]
    else:
        out = [None if a is None else _arr.host_array(a, name, rank=ranks[name]) for name, a in named]
    return on_device, out


def _check_shape(name, arr, expected):
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(expected)}")


def _empty(shape, on_device, stream=None):
    if on_device:
        from numba import cuda
        return cuda.device_array(shape, dtype=np.float32, stream=stream or 0)
    return np.zeros(shape, np.float32)


def _geometry(geometry: Optional[ConvGeometry], x_shape, w_shape, strides, padding, dilation, groups=None):
    if geometry is None:
        return conv_geometry(x_shape, w_shape, strides, padding, dilation, 1 if groups is None else groups)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a dlconv.shapes.ConvGeometry, got {type(geometry).__name__}")
    if groups is not None and groups != geometry.groups:
        raise ValueError(f"groups={groups!r} but geometry has groups={geometry.groups}")
    if x_shape is not None and tuple(x_shape) != geometry.x_shape:
        raise ValueError(f"x has shape {tuple(x_shape)} but geometry expects {geometry.x_shape}")
    if tuple(w_shape) != geometry.w_shape:
        raise ValueError(f"w has shape {tuple(w_shape)} but geometry expects {geometry.w_shape}")
    return geometry


# ----------------------------------------------------------------------------- conv2d
def conv2d(x, w, b=None, strides=1, padding="valid", dilation=1, activation=None,
           backend=DEFAULT_BACKEND, variant=None, stream=None, geometry=None, groups=None):
    """``y = act(conv2d(x, w) + b)`` with x NHWC, w HWIO, b of length filters.

    ``groups=G`` (default 1, or the ``geometry``'s): grouped convolution, w of shape
    ``(kh, kw, C/G, F)`` as stock Keras; filter k reads input channels
    ``[(k // (F/G))·(C/G), +C/G)``.  G = C is depthwise.  One kernel call for all groups.

    ``padding``: ``"valid"``, ``"same"`` (TensorFlow's rule), an int, ``(pad_h, pad_w)`` or
    ``((top, bottom), (left, right))``.  ``activation``: None/"linear", "relu", "sigmoid",
    "tanh".  ``variant``: a kernel variant name of the backend (see
    ``dlconv.backends.available()`` and :mod:`dlconv.variants`); None picks the backend's best.
    """
    act = _act.normalize(activation, allow_softmax=False)
    on_device, (x, w, b) = _prepare((("x", x), ("w", w), ("b", b)), {"x": 4, "w": 4, "b": 1}, stream)
    g = _geometry(geometry, x.shape, w.shape, strides, padding, dilation, groups)
    if b is not None:
        _check_shape("b", b, (g.filters,))
    be = _resolve_backend(backend, on_device)
    variant = be.resolve_variant(variant, on_device, g)  # an old name warns (DeprecationWarning)
    if g.batch == 0:
        return _empty(g.y_shape, on_device, stream)
    padded = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) != (0, 0, 0, 0)
    exact = _exact_with_nonfinite_weights(be, w, on_device, g, padded)
    if exact is not be:
        be, variant = exact, None
    return _run(on_device, lambda: be.conv2d_forward(x, w, b, g, act, on_device=on_device, variant=variant,
                                                     stream=stream))


def _activation_grad(activation, y, g: ConvGeometry):
    """The conv backward passes' optional activation: its canonical name, y checked."""
    act = _act.normalize(activation, allow_softmax=False)
    if act != "linear":
        if y is None:
            raise ValueError(f"y (the activation's output) is needed for activation {act!r}")
        _check_shape("y", y, g.y_shape)
    return act


def _grad_through(be, dy, y, act, on_device, stream):
    """(dy or dz, keyword arguments) for a conv backward pass of ``be``: backends that apply
    the activation derivative inside their kernels get y and the activation; for the others
    dz = act'(y) · dy is formed first.  Call inside ``_run``."""
    if act == "linear":
        return dy, {}
    if be.fuses_activation_grad(on_device):
        return dy, {"y": y, "activation": act}
    return be.activation_backward(dy, y, act, on_device=on_device, stream=stream), {}


def conv2d_backward_data(dy, w, x_shape, strides=1, padding="valid", dilation=1,
                         backend=DEFAULT_BACKEND, stream=None, geometry=None, y=None, activation=None,
                         groups=None):
    """dL/dx (shape ``x_shape``) from dL/dz (the conv's linear output) and the weights.

    With an element-wise ``activation`` and ``y``, the layer's activated output, ``dy`` is
    dL/dy instead, and dL/dz = act'(y) · dy is applied on the way: inside the kernels where
    the backend can (``cpp`` on the CPU: dz is never written to memory), else first.
    """
    on_device, (dy, w, y) = _prepare((("dy", dy), ("w", w), ("y", y)), {"dy": 4, "w": 4, "y": 4}, stream)
    g = _geometry(geometry, x_shape, w.shape, strides, padding, dilation, groups)
    _check_shape("dy", dy, g.y_shape)
    act = _activation_grad(activation, y, g)
    be = _resolve_backend(backend, on_device)
    if g.batch == 0:
        return _empty(g.x_shape, on_device, stream)
    be = _exact_with_nonfinite_weights(be, w, on_device, g, padded=True)
    def call():
        dz, kw = _grad_through(be, dy, y, act, on_device, stream)
        return be.conv2d_backward_data(dz, w, g, on_device=on_device, stream=stream, **kw)
    return _run(on_device, call)


def conv2d_backward_filter(x, dy, w_shape, strides=1, padding="valid", dilation=1,
                           backend=DEFAULT_BACKEND, stream=None, geometry=None, y=None, activation=None,
                           groups=None):
    """(dL/dw with shape ``w_shape``, dL/db of length filters) from x and dL/dz.
    ``groups`` as for :func:`conv2d` (``w_shape`` is then ``(kh, kw, C/G, F)``).

    ``y`` and ``activation`` as for :func:`conv2d_backward_data` (``dy`` is then dL/dy).
    """
    on_device, (x, dy, y) = _prepare((("x", x), ("dy", dy), ("y", y)), {"x": 4, "dy": 4, "y": 4}, stream)
    g = _geometry(geometry, x.shape, w_shape, strides, padding, dilation, groups)
    _check_shape("dy", dy, g.y_shape)
    act = _activation_grad(activation, y, g)
    be = _resolve_backend(backend, on_device)
    if g.batch == 0:
        if on_device:
            from numba import cuda
            return (cuda.to_device(np.zeros(g.w_shape, np.float32), stream=stream or 0),
                    cuda.to_device(np.zeros(g.filters, np.float32), stream=stream or 0))
        return np.zeros(g.w_shape, np.float32), np.zeros(g.filters, np.float32)
    def call():
        dz, kw = _grad_through(be, dy, y, act, on_device, stream)
        return be.conv2d_backward_filter(x, dz, g, on_device=on_device, stream=stream, **kw)
    dw, db = _run(on_device, call)
    padded = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) != (0, 0, 0, 0)
    if not on_device and padded and be.name != "reference" and not np.isfinite(db).all():
        # db = Σ dz is non-finite iff dz held ±Inf / NaN.  TensorFlow multiplies the zero
        # padding by dz (0 · NaN = NaN in dw) where the host kernels skip padding taps: the
        # reference does as TensorFlow.  Costs one pass over db (filters floats) otherwise.
        ref = _backends.get("reference")
        dz, kw = _grad_through(ref, dy, y, act, on_device, stream)
        dw, db = ref.conv2d_backward_filter(x, dz, g, on_device=on_device, stream=stream, **kw)
    return dw, db


# ----------------------------------------------------------------------------- transposed
@functools.lru_cache(maxsize=512)
def _transpose_geometry_cached(x_shape, w_shape, strides, padding, output_padding, dilation):
    """:func:`dlconv.shapes.conv_transpose_geometry`, cached (the bridges resolve one per call)."""
    return conv_transpose_geometry(x_shape, w_shape, strides, padding, output_padding, dilation)


def transpose_geometry(x_shape, w_shape, strides=1, padding="valid", output_padding=None,
                       dilation=1, geometry=None) -> ConvGeometry:
    """The forward convolution whose backward-data ``conv2d_transpose`` is
    (:func:`dlconv.shapes.conv_transpose_geometry`), or ``geometry`` checked against the
    shapes: ``x`` (the transposed input) is its output, ``w`` its HWIO weights."""
    if geometry is None:
        try:
            return _transpose_geometry_cached(tuple(x_shape), tuple(w_shape), strides, padding,
                                              output_padding, dilation)
        except TypeError:      # an unhashable spelling (lists): resolved uncached
            return conv_transpose_geometry(x_shape, w_shape, strides, padding, output_padding, dilation)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a dlconv.shapes.ConvGeometry, got {type(geometry).__name__}")
    if tuple(x_shape) != geometry.y_shape:
        raise ValueError(f"x has shape {tuple(x_shape)} but the transposed geometry expects "
                         f"{geometry.y_shape} (the forward convolution's output)")
    if tuple(w_shape) != geometry.w_shape:
        raise ValueError(f"w has shape {tuple(w_shape)} but geometry expects {geometry.w_shape}")
    return geometry


def conv2d_transpose(x, w, b=None, strides=1, padding="valid", output_padding=None, dilation=1,
                     activation=None, backend=DEFAULT_BACKEND, stream=None, geometry=None):
    """Keras' ``Conv2DTranspose``: ``y = act(conv2d_transpose(x, w) + b)`` with x NHWC, w of
    Keras' shape ``(k_h, k_w, filters, in_channels)``, b of length filters.

    Why not a kernel of its own: the transposed convolution *is* the backward-data pass of the
    forward convolution from y to x, with w as that convolution's HWIO weights, so it runs on
    the backward-data kernels (the zeros a stride > 1 inserts between the inputs are never
    stored: a backward-data kernel only visits the taps that meet an input).  ``padding``: "valid" or "same";
    ``output_padding``: None, an int or a pair, each below its stride (Keras' rule, see
    :func:`dlconv.shapes.conv_transpose_axis`).  The bias and activation are applied on the
    host (NumPy); for CUDA arrays pass b=None and activation=None (the framework bridges add
    the bias and the activation in the framework).
    """
    act = _act.normalize(activation, allow_softmax=False)
    on_device, (x, w, b) = _prepare((("x", x), ("w", w), ("b", b)), {"x": 4, "w": 4, "b": 1}, stream)
    g = transpose_geometry(x.shape, w.shape, strides, padding, output_padding, dilation, geometry)
    if b is not None:
        _check_shape("b", b, (g.in_c,))
    if on_device and (b is not None or act != "linear"):
        raise ValueError("conv2d_transpose of CUDA arrays takes b=None and activation=None "
                         "(add them with the array library; the kernels here are backward-data's)")
    y = conv2d_backward_data(x, w, g.x_shape, backend=backend, stream=stream, geometry=g)
    if on_device:
        return y
    if b is not None:
        y += b
    if act != "linear":
        from .reference import activate
        y = activate(y, act)
    return y


def conv2d_transpose_backward(dy, x, w, strides=1, padding="valid", output_padding=None,
                              dilation=1, backend=DEFAULT_BACKEND, stream=None, geometry=None):
    """(dL/dx, dL/dw, dL/db) of the linear :func:`conv2d_transpose` from dL/dy: dL/dx is the
    forward convolution of dy (the forward kernels), dL/dw the backward-filter pass with dy as
    its input and x as its output gradient, dL/db = Σ dy over batch, rows and columns (the
    backward-filter kernels' own bias gradient is Σ x: not this one's)."""
    on_device, (dy, x, w) = _prepare((("dy", dy), ("x", x), ("w", w)), {"dy": 4, "x": 4, "w": 4}, stream)
    g = transpose_geometry(x.shape, w.shape, strides, padding, output_padding, dilation, geometry)
    _check_shape("dy", dy, g.x_shape)
    dx = conv2d(dy, w, backend=backend, stream=stream, geometry=g)
    dw, _ = conv2d_backward_filter(dy, x, g.w_shape, backend=backend, stream=stream, geometry=g)
    if on_device:
        return dx, dw, None
    db = dy.sum(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    return dx, dw, db


# ----------------------------------------------------------------------------- dense
def dense(x, w, b=None, activation=None, backend=DEFAULT_BACKEND, stream=None):
    """``y = act(x @ w + b)`` with x (batch, in), w (in, out); activation may be "softmax"."""
    act = _act.normalize(activation)
    on_device, (x, w, b) = _prepare((("x", x), ("w", w), ("b", b)), {"x": 2, "w": 2, "b": 1}, stream)
    g = dense_geometry(x.shape, w.shape)
    if b is not None:
        _check_shape("b", b, (g.out_features,))
    be = _resolve_backend(backend, on_device)
    if g.batch == 0:
        return _empty(g.y_shape, on_device, stream)
    if act == "softmax":
        def call():
            z = be.dense_forward(x, w, b, g, "linear", on_device=on_device, stream=stream)
            return be.softmax(z, on_device=on_device, stream=stream)
        return _run(on_device, call)
    return _run(on_device, lambda: be.dense_forward(x, w, b, g, act, on_device=on_device, stream=stream))


def dense_backward(x, w, dy, y=None, activation=None, backend=DEFAULT_BACKEND, stream=None):
    """(dL/dx, dL/dw, dL/db) of ``y = act(x @ w + b)``; ``y`` (the forward output) is
    needed for any activation other than linear."""
    act = _act.normalize(activation)
    named = (("x", x), ("w", w), ("dy", dy), ("y", y))
    on_device, (x, w, dy, y) = _prepare(named, {"x": 2, "w": 2, "dy": 2, "y": 2}, stream)
    g = dense_geometry(x.shape, w.shape)
    _check_shape("dy", dy, g.y_shape)
    if act != "linear":
        if y is None:
            raise ValueError(f"dense_backward needs y (the forward output) for activation {act!r}")
        _check_shape("y", y, g.y_shape)
    be = _resolve_backend(backend, on_device)
    if g.batch == 0:
        zeros = [_empty(s, on_device, stream) for s in (g.x_shape, g.w_shape, (g.out_features,))]
        if on_device:
            from numba import cuda
            zeros[1] = cuda.to_device(np.zeros(g.w_shape, np.float32), stream=stream or 0)
            zeros[2] = cuda.to_device(np.zeros(g.out_features, np.float32), stream=stream or 0)
        return tuple(zeros)
    if act == "softmax":
        def call():
            dz = be.activation_backward(dy, y, "softmax", on_device=on_device, stream=stream)
            return be.dense_backward(x, w, dz, y, g, "linear", on_device=on_device, stream=stream)
        return _run(on_device, call)
    return _run(on_device, lambda: be.dense_backward(x, w, dy, y, g, act, on_device=on_device, stream=stream))


def softmax(z, backend=DEFAULT_BACKEND, stream=None):
    """Row-wise softmax of a (batch, classes) array."""
    on_device, (z,) = _prepare((("z", z),), {"z": 2}, stream)
    be = _resolve_backend(backend, on_device)
    if z.shape[0] == 0 or z.shape[1] == 0:     # no rows or no classes: an empty result
        return _empty(z.shape, on_device, stream)
    return _run(on_device, lambda: be.softmax(z, on_device=on_device, stream=stream))


def activation_backward(dy, y, activation, backend=DEFAULT_BACKEND, stream=None):
    """dL/dz from dL/dy and the activation's output y (same shapes; softmax row-wise)."""
    act = _act.normalize(activation)
    on_device, (dy, y) = _prepare((("dy", dy), ("y", y)), {"dy": None, "y": None}, stream)
    _check_shape("y", y, dy.shape)
    if act == "softmax" and len(dy.shape) != 2:
        raise ValueError(f"softmax backward needs rank-2 arrays, got shape {tuple(dy.shape)}")
    be = _resolve_backend(backend, on_device)
    if dy.size == 0:
        return _empty(dy.shape, on_device, stream)
    return _run(on_device, lambda: be.activation_backward(dy, y, act, on_device=on_device, stream=stream))


# ----------------------------------------------------------------------------- max pool
#: Keras backend → what ``dlconv.layers.MaxPooling2D`` runs there (``dlconv info`` prints it).
#: channels_first, GPU tensors and non-float32 inputs take the stock layer on every backend.
MAX_POOL_PATHS = {
    "tensorflow": "DlconvMaxPool2D / DlconvMaxPool2DGrad native ops (C++ kernel, CPU; a conv's fused relu "
                  "derivative folded into the gradient, which a 2x2 pool's conv reads in place; with DLCONV_TF_FUSE_CONV_POOL=1 a relu conv's 2x2 "
                  "pool runs as DlconvConv2DMaxPool2x2, docs/layers.md); tf.nn.max_pool2d where "
                  "TensorFlow sees a GPU",
    "torch": "dlconv::max_pool2d custom op: the C++ NHWC kernel on CPU tensors, no transposes",
    "jax": "jax.custom_vjp over the XLA FFI handlers dlconv_max_pool2d_* (C++ kernel, CPU)",
}


#: Keras backend → what ``dlconv.layers.Dropout`` runs there in training (``dlconv info``).
#: GPU tensors, other dtypes, ``noise_shape``, rate 0 or 1 take the stock layer everywhere.
DROPOUT_PATHS = {
    "tensorflow": "DlconvDropout native op (C++ counter-based mask, CPU; its gradient the same op on dy); "
                  "the stock layer where TensorFlow sees a GPU or with backend='reference'",
    "torch": "dlconv::dropout custom op: the C++ counter-based mask on CPU tensors",
    "jax": "stock keras Dropout (jax.random inside the jitted step)",
}

@functools.lru_cache(maxsize=512)
def _pool_geometry_cached(x_shape, pool_size, strides, padding):
    from .shapes import pool_geometry as _pg
    return _pg(x_shape, pool_size, strides, padding)


def pool_geometry(x_shape, pool_size=2, strides=None, padding="valid", geometry=None) -> ConvGeometry:
    """:func:`dlconv.shapes.pool_geometry`, cached (the bridges resolve one per call), or
    ``geometry`` checked against ``x_shape``."""
    if geometry is not None:
        if not isinstance(geometry, ConvGeometry):
            raise TypeError(f"geometry must be a dlconv.shapes.ConvGeometry, got {type(geometry).__name__}")
        if tuple(x_shape) != geometry.x_shape:
            raise ValueError(f"x has shape {tuple(x_shape)} but geometry expects {geometry.x_shape}")
        return geometry
    try:
        return _pool_geometry_cached(tuple(x_shape), pool_size, strides, padding)
    except TypeError:          # an unhashable spelling (lists): resolved uncached
        from .shapes import pool_geometry as _pg
        return _pg(x_shape, pool_size, strides, padding)


def _pool_backend(backend):
    """The backend that runs a max pool: ``cpp`` and ``reference`` have pool kernels; the
    ``numba`` backend has none (a max pool is a memory-bound pass a JIT adds little to)
    and runs the ``cpp`` kernels, or the reference where dlconv._C is not built."""
    be = _resolve_backend(backend, False)
    if hasattr(be, "max_pool2d_forward"):
        return be
    cpp = _backends.get("cpp")
    return cpp if cpp.cpu_status()[0] else _backends.get("reference")


def _pool_host(named):
    on_device, arrays = _prepare(named, {n: 4 for n, _ in named})
    if on_device:
        raise ValueError("max_pool2d has CPU kernels only: pass host (NumPy) arrays (the framework "
                         "bridges run the framework's own pool for GPU tensors)")
    return arrays


def max_pool2d(x, pool_size=2, strides=None, padding="valid", backend=DEFAULT_BACKEND, geometry=None,
               return_argmax=False):
    """Keras' ``MaxPooling2D`` of ``x: NHWC`` (float32, host): y, or ``(y, arg)`` with
    ``return_argmax`` (``arg``: int32, for each output and channel the flat input position
    ``ih * W + iw`` its gradient goes to).  TensorFlow's rules (:func:`dlconv.reference.max_pool2d_argmax`):
    NaN members are ignored, ties go to the first member in row-major window order.
    ``strides=None``: the pool size.  ``padding``: "valid" or "same"."""
    (x,) = _pool_host((("x", x),))
    g = pool_geometry(x.shape, pool_size, strides, padding, geometry)
    be = _pool_backend(backend)
    if g.batch == 0:
        y = np.zeros(g.y_shape, np.float32)
        return (y, np.zeros(g.y_shape, np.int32)) if return_argmax else y
    return HOST_THREAD.run(lambda: be.max_pool2d_forward(x, g, on_device=False, with_arg=return_argmax))


def max_pool2d_backward(dy, x, pool_size=2, strides=None, padding="valid", backend=DEFAULT_BACKEND,
                        geometry=None, arg=None):
    """dL/dx of :func:`max_pool2d`: each ``dy`` element added at its window's argmax.  With
    ``arg`` (from ``max_pool2d(..., return_argmax=True)``) the ``cpp`` kernel gathers from the
    stored index; without it the argmax is recomputed from ``x``."""
    dy, x = _pool_host((("dy", dy), ("x", x)))
    g = pool_geometry(x.shape, pool_size, strides, padding, geometry)
    _check_shape("dy", dy, g.y_shape)
    if arg is not None:
        if not isinstance(arg, np.ndarray) or arg.dtype != np.int32:
            raise TypeError(f"arg must be an int32 numpy.ndarray (max_pool2d's return_argmax), got "
                            f"{getattr(arg, 'dtype', type(arg).__name__)}")
        _check_shape("arg", arg, g.y_shape)
        arg = np.ascontiguousarray(arg)
    be = _pool_backend(backend)
    if g.batch == 0:
        return np.zeros(g.x_shape, np.float32)
    if arg is not None and be.name == "cpp":
        return HOST_THREAD.run(lambda: be.max_pool2d_backward(dy, g, on_device=False, arg=arg))
    return HOST_THREAD.run(lambda: be.max_pool2d_backward(dy, g, on_device=False, x=x))
