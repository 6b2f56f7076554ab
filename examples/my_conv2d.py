"""Bring your own kernel: a 2-D convolution in NumPy, checked and timed by ``dlconv bench``.

    dlconv bench --kernel examples/my_conv2d.py:my_conv2d --layers conv2 --passes forward

The function has the signature of ``dlconv.conv2d`` (its pass, declared by ``dlconv_pass``):
x NHWC, w HWIO, b of length filters, float32; ``strides=(sh, sw)``, ``padding=((top, bottom),
(left, right))``, ``dilation=(dh, dw)``, ``activation`` "linear" / "relu" / "sigmoid" / "tanh".
What one output element is: ``y[n, oh, ow, f] = act(b[f] + Σ_{kh, kw, c} x[n, ih, iw, c] ·
w[kh, kw, c, f])`` with ``ih = oh*sh - top + kh*dh`` and ``iw = ow*sw - left + kw*dw``;
positions outside the input are zeros (the padding).  Here: pad once, take every window as a
strided view (no copy), and contract the windows with the weights in one ``tensordot``
(NumPy's BLAS: the im2col GEMM).
"""

import numpy as np

from dlconv import shapes


def my_conv2d(x, w, b=None, strides=1, padding="valid", dilation=1, activation=None):
    g = shapes.conv_geometry(x.shape, w.shape, strides, padding, dilation)  # sizes and pads
    xp = np.pad(np.asarray(x), ((0, 0), (g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right), (0, 0)))
    # windows[n, oh, ow, c, kh_eff, kw_eff]: every output pixel's receptive field (a view)
    win = np.lib.stride_tricks.sliding_window_view(xp, (g.k_h_eff, g.k_w_eff), axis=(1, 2))
    win = win[:, ::g.stride_h, ::g.stride_w, :, ::g.dil_h, ::g.dil_w][:, :g.out_h, :g.out_w]
    y = np.tensordot(win, np.asarray(w), axes=([3, 4, 5], [2, 0, 1]))      # (n, oh, ow, f)
    if b is not None:
        y += b
    if activation == "relu":
        np.maximum(y, 0, out=y)
    elif activation == "sigmoid":
        y = 1 / (1 + np.exp(-y))
    elif activation == "tanh":
        y = np.tanh(y)
    return y.astype(np.float32, copy=False)


my_conv2d.dlconv_pass = "conv2d"      # which op's signature it has (conv2d is also the default)
