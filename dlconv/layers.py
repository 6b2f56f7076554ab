"""Keras 3 layers running dlconv kernels: drop-in ``Conv2D`` and ``Dense``.

``dlconv.layers.Conv2D`` and ``dlconv.layers.Dense`` subclass ``keras.layers.Conv2D`` and
``keras.layers.Dense`` and override only ``call`` (and ``compute_output_shape``, which asks
:mod:`dlconv.shapes`).  So every constructor argument, default, weight name, weight
shape and order, and ``get_config`` entry is the stock one, plus one argument:

``backend``  ``"auto"`` (default: the fastest backend usable where the data lives, see
             :func:`dlconv.backends.auto`), ``"cpp"``, ``"numba"`` or ``"reference"``.

Hence ``layer.set_weights(stock_layer.get_weights())`` works and gives the same outputs,
and ``.keras`` files save and load in a fresh process after ``import dlconv.layers``
(both classes are registered as ``dlconv>Conv2D`` and ``dlconv>Dense``).

Forward and backward passes run dlconv kernels through the bridge of the current Keras
backend (:mod:`dlconv.bridges`: TensorFlow, torch or JAX), chosen when the layer is built
and called; each bridge uses its framework's own custom-op mechanism.
Activations the kernels fuse (linear/None, relu, sigmoid, tanh; softmax for Dense) run
fused; any other activation (``"gelu"``, a callable, ...) is applied by Keras after the
kernel's linear output.

What is refused, with a clear error
-----------------------------------
* a Keras backend without a bridge (numpy, openvino): RuntimeError at construction;
* ``groups != 1``, LoRA (``lora_rank`` / ``enable_lora``), quantization: ValueError;
* a compute dtype other than float32 (e.g. the ``mixed_float16`` policy): ValueError when
  the layer is built — the kernels are float32; give the layer ``dtype="float32"``;
* XLA on TensorFlow: there the layers set ``supports_jit = False`` (the TensorFlow bridge's
  ops are Python callbacks), so Keras' ``jit_compile="auto"`` resolves to False and
  ``jit_compile=True`` falls back to False with Keras' warning.  On JAX the ops are
  ``jax.ffi`` calls and the step is jitted as usual.

``data_format="channels_first"`` is supported by transposing to NHWC around the kernels
(the kernels are NHWC; the weights are HWIO in both formats, as in Keras).
"""

from __future__ import annotations

import keras
from keras import ops

from . import backends as _backends
from . import bridges as _bridges
from .shapes import conv_output_size

__all__ = ["Conv2D", "Dense", "BACKENDS"]

#: Values accepted by the ``backend`` argument.
BACKENDS = ("auto",) + tuple(_backends.names())

_ACT = keras.activations
#: Keras activation function → the dlconv name of the fused epilogue.
_FUSED_CONV = {_ACT.linear: "linear", _ACT.relu: "relu", _ACT.sigmoid: "sigmoid", _ACT.tanh: "tanh"}
_FUSED_DENSE = {**_FUSED_CONV, _ACT.softmax: "softmax"}


def _bridge():
    """The :mod:`dlconv.bridges` module of the current Keras backend (imports its framework);
    RuntimeError for a backend without one."""
    return _bridges.load(keras.config.backend())


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_dtype(layer):
    if layer.compute_dtype != "float32":
        raise ValueError(
            f"{type(layer).__module__}.{type(layer).__name__} {layer.name!r} computes in float32 "
            f"only, but its dtype policy {layer.dtype_policy.name!r} has compute dtype "
            f"{layer.compute_dtype!r} (mixed precision is not supported by the dlconv kernels). "
            f"Pass dtype='float32' to this layer, or use the stock keras layer.")


def _check_input_dtype(layer, inputs):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype != "float32":
        raise TypeError(f"{type(layer).__name__} {layer.name!r}: inputs must be float32, got {dtype}")


def _refuse_lora(layer, lora_rank):
    if lora_rank:
        raise ValueError(f"{type(layer).__name__}: lora_rank={lora_rank!r} is not supported by "
                         "dlconv layers (use the stock keras layer for LoRA)")


class _DlconvLayer:
    """What both dlconv layers add to their stock base class: the ``backend`` argument,
    the refusals (LoRA, non-float32 compute), no XLA, and ``backend`` in the config."""

    def _setup_dlconv(self, backend):
        bridge = _bridge()
        self.backend = _check_backend(backend)
        _refuse_lora(self, self.lora_rank)
        self.supports_jit = bridge.SUPPORTS_JIT

    def _weights(self):
        """(kernel, bias or None) as the backend's tensors (gradients flow to the variables)."""
        return (ops.convert_to_tensor(self.kernel),
                ops.convert_to_tensor(self.bias) if self.use_bias else None)

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"):
        _refuse_lora(self, rank)

    def build(self, input_shape):
        _check_dtype(self)
        super().build(input_shape)

    def get_config(self):
        config = super().get_config()
        config["backend"] = self.backend
        return config


@keras.saving.register_keras_serializable(package="dlconv")
class Conv2D(_DlconvLayer, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose forward and backward passes run dlconv kernels.

    Same arguments as ``keras.layers.Conv2D`` plus ``backend`` (see the module docstring).
    ``groups`` must be 1.
    """

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1:
            raise ValueError(f"Conv2D: groups must be 1 for dlconv layers, got groups={self.groups}")
        self._setup_dlconv(backend)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(f"Conv2D expects a rank-4 input (batch, height, width, channels), "
                             f"got input_shape={input_shape}")
        if self.data_format == "channels_first":
            n, _, h, w = input_shape
        else:
            n, h, w, _ = input_shape
        out = []
        for size, k, s, d, axis in zip((h, w), self.kernel_size, self.strides, self.dilation_rate,
                                       ("height", "width")):
            out.append(None if size is None else conv_output_size(size, k, s, self.padding, d))
        if self.data_format == "channels_first":
            return (n, self.filters, out[0], out[1])
        return (n, out[0], out[1], self.filters)

    def call(self, inputs):
        bridge = _bridge()
        _check_input_dtype(self, inputs)
        fused = _FUSED_CONV.get(self.activation)
        x = inputs
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        n, h, w, c = x.shape
        out_shape = self.compute_output_shape((n, h, w, c) if self.data_format == "channels_last"
                                              else (n, c, h, w))
        if self.data_format == "channels_first":
            out_shape = (out_shape[0], out_shape[2], out_shape[3], out_shape[1])
        kernel, bias = self._weights()
        y = bridge.conv2d(
            x, kernel, bias, strides=tuple(self.strides), padding=self.padding,
            dilation=tuple(self.dilation_rate), activation=fused or "linear", backend=self.backend,
            out_shape=out_shape)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        if fused is None:
            y = self.activation(y)
        return y


@keras.saving.register_keras_serializable(package="dlconv")
class Dense(_DlconvLayer, keras.layers.Dense):
    """``keras.layers.Dense`` whose forward and backward passes run dlconv kernels.

    Same arguments as ``keras.layers.Dense`` plus ``backend`` (see the module docstring).
    Inputs of rank > 2 are applied on the last axis, as the stock layer does.
    """

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        if self.quantization_config is not None:
            raise ValueError("Dense: quantization_config is not supported by dlconv layers")
        self._setup_dlconv(backend)

    def quantize(self, mode=None, *args, **kwargs):
        raise ValueError(f"Dense: quantize(mode={mode!r}) is not supported by dlconv layers "
                         "(the kernels are float32)")

    def call(self, inputs, training=None):
        bridge = _bridge()
        _check_input_dtype(self, inputs)
        fused = _FUSED_DENSE.get(self.activation)
        x = inputs
        rank = len(inputs.shape)
        if rank != 2:
            x = ops.reshape(x, (-1, inputs.shape[-1]))
        kernel, bias = self._weights()
        y = bridge.dense(x, kernel, bias, activation=fused or "linear", backend=self.backend)
        if rank != 2:
            y = ops.reshape(y, (*ops.shape(inputs)[:-1], self.units))
        if fused is None:
            y = self.activation(y)
        return y
