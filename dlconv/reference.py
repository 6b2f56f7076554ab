"""The NumPy reference: short, obviously correct, and the oracle for every test.

Read this first.  Each function states the sum it computes in the index notation the
kernels use (NHWC activations, HWIO weights, geometry ``g`` from :mod:`dlconv.shapes`)::

    y[n, oh, ow, k] = act( b[k] + sum_{kh, kw, c} x[n, ih, iw, c] * w[kh, kw, c, k] )
    ih = oh * stride_h - pad_top  + kh * dil_h
    iw = ow * stride_w - pad_left + kw * dil_w      (terms with ih, iw outside x are zero)

Grouped convolution (``g.groups = G``): filter k belongs to group ``k // (F/G)`` and reads
only that group's input channels, ``c = group · (C/G) + ci`` with ``w[kh, kw, ci, k]``
(``w`` is ``(KH, KW, C/G, F)``).  The reference runs each group as its own ungrouped
convolution on the channel slices (:func:`_per_group`), so grouping adds no index arithmetic.

The loops run over the kernel taps (kh, kw) only; each tap is one strided slice of the
zero-padded input and one matrix product, so the code stays short and exact.
All arithmetic is float64 inside and returns float32, so the oracle is more accurate
than the kernels it judges.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .shapes import ConvGeometry

__all__ = ["activate", "activation_backward", "conv2d_forward", "conv2d_backward_data",
           "conv2d_backward_filter", "dense_forward", "dense_backward", "softmax",
           "max_pool2d", "max_pool2d_argmax", "max_pool2d_backward", "POOL_LOWEST"]


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "linear":
        return z
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    if activation == "softmax":
        return softmax(z)
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(dy: np.ndarray, y: np.ndarray, activation: str) -> np.ndarray:
    """dL/dz from dL/dy and the activation's output y (see :mod:`dlconv.activations`);
    y may be None for the linear activation only."""
    dy = np.asarray(dy, np.float64)
    if activation == "linear":
        return dy
    if y is None:
        raise ValueError(f"y (the activation's output) is needed for activation {activation!r}")
    y = np.asarray(y, np.float64)
    if activation == "relu":
        return dy * (y > 0)
    if activation == "sigmoid":
        return dy * y * (1 - y)
    if activation == "tanh":
        return dy * (1 - y * y)
    if activation == "softmax":
        return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))
    raise ValueError(f"unknown activation {activation!r}")


def softmax(z: np.ndarray) -> np.ndarray:
    if z.shape[-1] == 0:            # no classes: an empty result, as TensorFlow's softmax
        return np.zeros(z.shape, np.result_type(z, np.float32))
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _pad(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    return np.pad(x, ((0, 0), (g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right), (0, 0)))


def _tap(xp: np.ndarray, g: ConvGeometry, kh: int, kw: int) -> np.ndarray:
    """The input pixels tap (kh, kw) meets, one per output pixel: shape (N, OH, OW, C)."""
    h0, w0 = kh * g.dil_h, kw * g.dil_w
    return xp[:, h0:h0 + (g.out_h - 1) * g.stride_h + 1:g.stride_h,
              w0:w0 + (g.out_w - 1) * g.stride_w + 1:g.stride_w, :]


def _inside(g: ConvGeometry, kh: int, kw: int) -> np.ndarray:
    """(OH, OW, 1) mask: True where tap (kh, kw) of output pixel (oh, ow) reads x, not padding."""
    ih = np.arange(g.out_h) * g.stride_h - g.pad_top + kh * g.dil_h
    iw = np.arange(g.out_w) * g.stride_w - g.pad_left + kw * g.dil_w
    return (((ih >= 0) & (ih < g.in_h))[:, None] & ((iw >= 0) & (iw < g.in_w))[None, :])[..., None]


def _per_group(g: ConvGeometry):
    """(ungrouped geometry of one group, [(input-channel slice, filter slice) per group])."""
    cg, fg = g.group_in_c, g.group_filters
    one = dataclasses.replace(g, in_c=cg, filters=fg, groups=1)
    return one, [(slice(i * cg, (i + 1) * cg), slice(i * fg, (i + 1) * fg)) for i in range(g.groups)]


def conv2d_forward(x, w, b, g: ConvGeometry, activation: str = "linear") -> np.ndarray:
    """Padding terms are absent, not products with 0: a ±Inf or NaN weight meets only real
    pixels (as TensorFlow's conv2d; 0 · Inf would be NaN)."""
    if g.groups > 1:
        one, parts = _per_group(g)
        x, w = np.asarray(x), np.asarray(w)
        z = np.concatenate([_forward_linear(x[..., cs], w[..., fs], one) for cs, fs in parts], axis=-1)
    else:
        z = _forward_linear(x, w, g)
    if b is not None:
        z += np.asarray(b, np.float64)
    return activate(z, activation).astype(np.float32)


def _forward_linear(x, w, g: ConvGeometry) -> np.ndarray:
    """z = conv2d(x, w) in float64, ungrouped."""
    xp = _pad(np.asarray(x, np.float64), g)
    w = np.asarray(w, np.float64)
    z = np.zeros(g.y_shape, np.float64)
    for kh in range(g.k_h):
        for kw in range(g.k_w):
            with np.errstate(invalid="ignore"):
                z += np.where(_inside(g, kh, kw), _tap(xp, g, kh, kw) @ w[kh, kw], 0.0)  # (N,OH,OW,C) @ (C,K)
    return z


def conv2d_backward_data(dy, w, g: ConvGeometry) -> np.ndarray:
    """dL/dx: every output gradient flows back to the inputs its window read (x's shape)."""
    if g.groups > 1:
        one, parts = _per_group(g)
        dy, w = np.asarray(dy), np.asarray(w)
        return np.concatenate([conv2d_backward_data(dy[..., fs], w[..., fs], one) for _, fs in parts], axis=-1)
    dy = np.asarray(dy, np.float64)
    w = np.asarray(w, np.float64)
    dxp = np.zeros((g.batch, g.in_h + g.pad_top + g.pad_bottom,
                    g.in_w + g.pad_left + g.pad_right, g.in_c), np.float64)
    for kh in range(g.k_h):
        for kw in range(g.k_w):
            _tap(dxp, g, kh, kw)[...] += dy @ w[kh, kw].T  # a view: adds in place
    return dxp[:, g.pad_top:g.pad_top + g.in_h, g.pad_left:g.pad_left + g.in_w, :].astype(np.float32)


def conv2d_backward_filter(x, dy, g: ConvGeometry):
    """(dL/dw in HWIO, dL/db of length filters)."""
    if g.groups > 1:
        one, parts = _per_group(g)
        x, dy = np.asarray(x), np.asarray(dy)
        pieces = [conv2d_backward_filter(x[..., cs], dy[..., fs], one) for cs, fs in parts]
        return (np.concatenate([dw for dw, _ in pieces], axis=-1),
                np.concatenate([db for _, db in pieces], axis=-1))
    xp = _pad(np.asarray(x, np.float64), g)
    dy = np.asarray(dy, np.float64)
    dw = np.zeros(g.w_shape, np.float64)
    for kh in range(g.k_h):
        for kw in range(g.k_w):
            dw[kh, kw] = np.einsum("nhwc,nhwk->ck", _tap(xp, g, kh, kw), dy)
    db = dy.sum(axis=(0, 1, 2))
    return dw.astype(np.float32), db.astype(np.float32)


def dense_forward(x, w, b, activation: str = "linear") -> np.ndarray:
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        z = z + np.asarray(b, np.float64)
    return activate(z, activation).astype(np.float32)


def dense_backward(x, w, dy, y, activation: str = "linear"):
    """(dx, dw, db) given the upstream gradient dy and the forward output y."""
    dz = activation_backward(dy, y, activation)
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    return ((dz @ w.T).astype(np.float32), (x.T @ dz).astype(np.float32),
            dz.sum(axis=0).astype(np.float32))


# ----------------------------------------------------------------------------- max pooling
#: What an output of a window with no value above it holds (all -Inf / NaN): float32's lowest
#: finite value, TensorFlow's initial value of its CPU max pool (``Eigen::NumTraits::lowest``).
POOL_LOWEST = float(np.finfo(np.float32).min)


def _pool_geometry(x_shape, pool_size, strides, padding, geometry):
    if geometry is not None:
        return geometry
    from .shapes import pool_geometry
    return pool_geometry(x_shape, pool_size, strides, padding)


def max_pool2d_argmax(x, pool_size=2, strides=None, padding="valid", geometry=None):
    """(y, argmax) of the max pool of ``x: NHWC``; geometry from
    :func:`dlconv.shapes.pool_geometry` (a ``groups = C`` record, ``k`` = the pool).

    The window of output ``(n, oh, ow, c)`` is every in-bounds ``x[n, ih, iw, c]`` with
    ``ih = oh * stride_h - pad_top + kh``, ``iw = ow * stride_w - pad_left + kw``
    (padded positions are not members).  TensorFlow's CPU rules, measured
    (tests/test_pool.py checks them against ``tf.nn.max_pool2d`` and its gradient)::

        y       = max(lowest float32, max of the window's non-NaN members)   (NaN ignored)
        argmax  = the window's first member in row-major (kh, kw) order, replaced by a later
                  member only when that one is strictly greater than the current choice
                  (ties: the first; a NaN first member keeps the gradient, as TF's does)

    ``argmax`` is the flat input position ``ih * W + iw`` (int32), per output and channel.
    torch and JAX propagate NaN instead (their y is NaN); dlconv follows TensorFlow.
    """
    x = np.asarray(x, np.float32)
    g = _pool_geometry(x.shape, pool_size, strides, padding, geometry)
    xp = _pad(x, g)
    shape = g.y_shape
    y = np.full(shape, POOL_LOWEST, np.float32)
    cur = np.zeros(shape, np.float32)
    idx = np.full(shape, -1, np.int64)
    with np.errstate(invalid="ignore"):
        for kh in range(g.k_h):
            for kw in range(g.k_w):
                v = _tap(xp, g, kh, kw)
                inside = _inside(g, kh, kw)
                ih = np.arange(g.out_h) * g.stride_h - g.pad_top + kh
                iw = np.arange(g.out_w) * g.stride_w - g.pad_left + kw
                pos = (ih[:, None] * g.in_w + iw[None, :])[..., None]
                take = inside & ((idx < 0) | (v > cur))
                cur = np.where(take, v, cur)
                idx = np.where(take, pos, idx)
                y = np.where(inside & (v > y), v, y)
    return y.astype(np.float32), idx.astype(np.int32)


def max_pool2d(x, pool_size=2, strides=None, padding="valid", geometry=None) -> np.ndarray:
    """y of :func:`max_pool2d_argmax` (TensorFlow's rules; see there)."""
    return max_pool2d_argmax(x, pool_size, strides, padding, geometry)[0]


def max_pool2d_backward(x, dy, pool_size=2, strides=None, padding="valid", geometry=None) -> np.ndarray:
    """dL/dx of the max pool: each ``dy[n, oh, ow, c]`` is added to ``dx`` at its window's
    argmax (:func:`max_pool2d_argmax`'s rule, TensorFlow's), summed where windows overlap."""
    x = np.asarray(x, np.float32)
    g = _pool_geometry(x.shape, pool_size, strides, padding, geometry)
    _, idx = max_pool2d_argmax(x, geometry=g)
    dy = np.asarray(dy, np.float64)
    dx = np.zeros((g.batch, g.in_h * g.in_w, g.in_c), np.float64)
    n = np.arange(g.batch)[:, None, None, None]
    c = np.arange(g.in_c)[None, None, None, :]
    np.add.at(dx, (np.broadcast_to(n, idx.shape), idx, np.broadcast_to(c, idx.shape)), dy)
    return dx.reshape(g.x_shape).astype(np.float32)
