"""``backend="reference"``: the NumPy oracle (:mod:`dlconv.reference`) behind the backend API."""

from __future__ import annotations

import numpy as np

from .. import reference as ref
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"

    def cpu_status(self):
        return True, "NumPy " + np.__version__

    def cuda_status(self):
        return False, "the reference backend is NumPy only (host arrays)"

    def conv2d_forward(self, x, w, b, g, activation, *, on_device, variant=None, stream=None):
        self.require(on_device)
        return ref.conv2d_forward(x, w, b, g, activation)

    def conv2d_backward_data(self, dy, w, g, *, on_device, stream=None):
        self.require(on_device)
        return ref.conv2d_backward_data(dy, w, g)

    def conv2d_backward_filter(self, x, dy, g, *, on_device, stream=None):
        self.require(on_device)
        return ref.conv2d_backward_filter(x, dy, g)

    def dense_forward(self, x, w, b, g, activation, *, on_device, stream=None):
        self.require(on_device)
        return ref.dense_forward(x, w, b, activation)

    def dense_backward(self, x, w, dy, y, g, activation, *, on_device, stream=None):
        self.require(on_device)
        return ref.dense_backward(x, w, dy, y, activation)

    def softmax(self, z, *, on_device, stream=None):
        self.require(on_device)
        return ref.softmax(np.asarray(z, np.float64)).astype(np.float32)

    def activation_backward(self, dy, y, activation, *, on_device, stream=None):
        self.require(on_device)
        return ref.activation_backward(dy, y, activation).astype(np.float32)

    def max_pool2d_forward(self, x, g, *, on_device, with_arg=False):
        self.require(on_device)
        y, arg = ref.max_pool2d_argmax(x, geometry=g)
        return (y, arg) if with_arg else y

    def max_pool2d_backward(self, dy, g, *, on_device, arg=None, x=None):
        """From x (the reference recomputes the arg; a given ``arg`` is used when x is None)."""
        self.require(on_device)
        if x is not None:
            return ref.max_pool2d_backward(x, dy, geometry=g)
        dx = np.zeros((g.batch, g.in_h * g.in_w, g.in_c), np.float64)
        n = np.broadcast_to(np.arange(g.batch)[:, None, None, None], arg.shape)
        c = np.broadcast_to(np.arange(g.in_c)[None, None, None, :], arg.shape)
        np.add.at(dx, (n, arg, c), np.asarray(dy, np.float64))
        return dx.reshape(g.x_shape).astype(np.float32)
