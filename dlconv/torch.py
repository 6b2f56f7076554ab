"""dlconv's kernels for plain PyTorch: differentiable ``conv2d`` and ``dense`` on torch tensors.

``import dlconv.torch`` imports torch (``import dlconv`` does not).  The functions are the
``dlconv::`` custom ops of :mod:`dlconv.bridges.torch` (the ones Keras' torch backend runs):
forward and backward passes run dlconv kernels, gradients flow through ``autograd``, and
``torch.compile`` traces them.  CPU tensors reach the kernels without a copy; CUDA tensors
stay on the device and the kernels launch on ``torch.cuda.current_stream()``.

Layout: **NHWC activations and HWIO weights**, as dlconv's op API (:mod:`dlconv.ops`) and
Keras — not torch's NCHW / OIHW.  The kernels are written for NHWC; taking NCHW here would
hide a transpose copy of every activation in every call.  A torch model in NCHW converts
explicitly: ``conv2d(x.permute(0, 2, 3, 1), w.permute(2, 3, 1, 0))`` (a non-contiguous
input costs one ``.contiguous()`` copy), and gets NHWC back.

>>> import torch, dlconv.torch as dt
>>> x = torch.randn(8, 28, 28, 1, requires_grad=True)            # NHWC
>>> w = torch.randn(3, 3, 1, 32, requires_grad=True)              # HWIO
>>> y = dt.conv2d(x, w, torch.zeros(32), padding="same", activation="relu")
>>> y.shape
torch.Size([8, 28, 28, 32])
>>> y.sum().backward()                                             # dlconv backward kernels

Every tensor must be float32 (TypeError otherwise: nothing is cast silently) and all on one
device, the current CUDA device for GPU tensors (ValueError otherwise: nothing is moved).
"""

from __future__ import annotations

from .bridges import torch as _bridge

__all__ = ["conv2d", "dense"]

#: Parameter names the errors use (the bridge's own are Keras' kernel/bias).
_NAMES = ("x", "w", "b")


def conv2d(x, w, b=None, strides=1, padding="valid", dilation=1, activation=None, backend="auto",
           groups=1):
    """``act(conv2d(x, w) + b)``: x ``(batch, height, width, channels)``, w ``(kernel_h,
    kernel_w, channels, filters)``, b ``(filters,)`` or None → ``(batch, out_h, out_w, filters)``.

    ``strides`` and ``dilation``: an int or a (height, width) pair.  ``padding``: ``"valid"``,
    ``"same"`` (TensorFlow's rule: the odd extra row/column goes after), an int, ``(pad_h,
    pad_w)`` or ``((top, bottom), (left, right))``.  ``activation``: None/"linear", "relu",
    "sigmoid" or "tanh" (fused into the kernel).  ``backend``: "auto", "cpp", "numba" or
    "reference".  ``groups=G``: grouped convolution, w ``(kernel_h, kernel_w, channels / G,
    filters)`` (G = channels: depthwise).
    """
    return _bridge.conv2d(x, w, b, strides=strides, padding=padding, dilation=dilation,
                          activation=activation, backend=backend, names=_NAMES, groups=groups)


def dense(x, w, b=None, activation=None, backend="auto"):
    """``act(x @ w + b)``: x ``(batch, in)``, w ``(in, out)``, b ``(out,)`` or None.

    ``activation``: None/"linear", "relu", "sigmoid", "tanh" or "softmax" (row-wise).
    """
    return _bridge.dense(x, w, b, activation=activation, backend=backend, names=_NAMES)
