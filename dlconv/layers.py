"""Keras 3 layers running dlconv kernels: drop-in ``Conv2D``, ``Dense`` and ``Conv2DTranspose``.

``dlconv.layers.Conv2D`` and ``dlconv.layers.Dense`` subclass ``keras.layers.Conv2D`` and
``keras.layers.Dense`` and override only ``call`` (and ``compute_output_shape``, which asks
:mod:`dlconv.shapes`).  So every constructor argument, default, weight name, weight
shape and order, and ``get_config`` entry is the stock one, plus one argument:

``backend``  ``"auto"`` (default: the fastest backend usable where the data lives, see
             :func:`dlconv.backends.auto`), ``"cpp"``, ``"numba"`` or ``"reference"``.

Hence ``layer.set_weights(stock_layer.get_weights())`` works and gives the same outputs,
and ``.keras`` files save and load in a fresh process after ``import dlconv.layers``
(the classes are registered as ``dlconv>Conv2D``, ``dlconv>Dense`` and
``dlconv>Conv2DTranspose``).  ``Conv2DTranspose`` runs the backward-data kernels forward and
the forward / backward-filter kernels for its gradients (see its docstring).

Forward and backward passes run dlconv kernels through the bridge of the current Keras
backend (:mod:`dlconv.bridges`: TensorFlow, torch or JAX); each bridge uses its framework's
own custom-op mechanism.  Activations the kernels fuse (linear/None, relu, sigmoid, tanh;
softmax for Dense) run fused; any other activation (``"gelu"``, a callable, ...) is applied
by Keras after the kernel's linear output.

What the stock layers do, and how these do it
---------------------------------------------
* ``groups=G`` (Conv2D): one grouped convolution, passed to the kernels as ``groups`` (each
  filter reads its group's C/G input channels in place; the weights keep the stock shape
  ``(kh, kw, C/G, F)``; depthwise is G = C);
* LoRA (``lora_rank``, ``enable_lora``): the stock ``kernel`` property adds the low-rank
  update, and the kernels run on the sum (gradients reach both LoRA factors);
* mixed precision (``mixed_float16``, ``mixed_bfloat16``): the kernels are float32, so inputs
  and weights are cast to float32 at the layer's edge and the output back to the policy's
  compute dtype, as the stock layers return it.  A float64 compute dtype is refused
  (ValueError): float32 kernels would silently lose its precision;
* quantization (``quantize("int8")``, an int8/int4/float8 dtype policy): Keras routes a
  quantized layer to its own quantized kernels (``quantized_call``); dlconv's kernels are not
  used for it;
* sparse inputs (Dense): Keras' own sparse matmul (the kernels are dense; densifying could
  take far more memory, and on TensorFlow the kernel's gradient stays sparse);
* ``data_format="channels_first"``: transposed to NHWC around the kernels (the weights are
  HWIO in both formats, as in Keras);
* ``layer.activation = None`` after construction: linear, as for the stock layer.

Refused, with a clear error: a Keras backend without a bridge (numpy, openvino):
RuntimeError at construction; non-float inputs: TypeError.  XLA on TensorFlow: there the
layers set ``supports_jit = False`` (the TensorFlow bridge's native ops have CPU kernels
only, and its fallback is Python callbacks), so Keras' ``jit_compile="auto"`` resolves to
False; on JAX the ops are ``jax.ffi`` calls and the step is jitted as usual.
"""

from __future__ import annotations

import keras
from keras import ops

from . import backends as _backends
from . import bridges as _bridges
from .shapes import conv_output_size, conv_transpose_output_size

__all__ = ["Conv2D", "Dense", "Conv2DTranspose", "MaxPooling2D", "Dropout", "BACKENDS"]

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


#: Compute dtypes the layers accept: the kernels compute in float32; the others are cast.
_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _check_dtype(layer):
    if layer.compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(
            f"{type(layer).__module__}.{type(layer).__name__} {layer.name!r}: compute dtype "
            f"{layer.compute_dtype!r} (dtype policy {layer.dtype_policy.name!r}) is not supported: "
            f"the dlconv kernels compute in float32 (float16/bfloat16 policies are cast at the "
            f"layer's edges); a float64 layer would silently lose precision. Use the stock keras "
            f"layer for {layer.compute_dtype}.")


def _check_input_dtype(layer, inputs):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{type(layer).__name__} {layer.name!r}: inputs must be float32 (or the "
                        f"float16/bfloat16 of a mixed-precision policy), got {dtype}")


def _is_sparse(x) -> bool:
    return bool(getattr(x, "sparse", False)) or type(x).__name__ in ("SparseTensor", "BCOO")


def _f32(t):
    return t if t is None or keras.backend.standardize_dtype(t.dtype) == "float32" else ops.cast(t, "float32")


class _DlconvLayer:
    """What both dlconv layers add to their stock base class: the ``backend`` argument, the
    bridge of the Keras backend, float32 at the kernels' edge, and ``backend`` in the config."""

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_dlconv(backend)

    def _setup_dlconv(self, backend):
        bridge = _bridge()
        self.backend = _check_backend(backend)
        self.supports_jit = bridge.SUPPORTS_JIT

    def _weights(self):
        """(kernel, bias or None) as float32 tensors of the backend (gradients flow to the
        variables; the stock ``kernel`` property adds LoRA's update when it is enabled)."""
        return (_f32(ops.convert_to_tensor(self.kernel)),
                _f32(ops.convert_to_tensor(self.bias)) if self.use_bias else None)

    def _activation_split(self, fused_table):
        """(the dlconv name of the fused activation, or "linear"; the activation Keras applies
        after the kernel, or None)."""
        act = self.activation
        if act is None:
            return "linear", None
        fused = fused_table.get(act)
        return (fused, None) if fused is not None else ("linear", act)

    def _finish(self, y, after):
        if after is not None:
            y = after(y)
        if self.compute_dtype != "float32":
            y = ops.cast(y, self.compute_dtype)
        return y

    def build(self, input_shape):
        _check_dtype(self)
        super().build(input_shape)

    def get_config(self):
        config = super().get_config()
        config["backend"] = self.backend
        return config


class _Conv2DLayout:
    """What Conv2D and Conv2DTranspose share around the kernels: the rank-4 input check, the
    ``data_format`` (the kernels take NHWC; channels_first is transposed on the way in and out),
    and the output shape from a per-axis size rule."""

    _LAYER_NAME = ""  # the name a rank error gives

    def _output_shape(self, input_shape, axis_size):
        """The layer's output shape in its data_format; ``axis_size(i, size)`` is the output
        size of spatial axis i (0 = height, 1 = width) for an input size ``size`` (not None)."""
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(f"{self._LAYER_NAME} expects a rank-4 input (batch, height, width, "
                             f"channels), got input_shape={input_shape}")
        if self.data_format == "channels_first":
            n, _, h, w = input_shape
        else:
            n, h, w, _ = input_shape
        out = [None if size is None else axis_size(i, size) for i, size in enumerate((h, w))]
        if self.data_format == "channels_first":
            return (n, self.filters, out[0], out[1])
        return (n, out[0], out[1], self.filters)

    def _to_nhwc(self, x):
        return ops.transpose(x, (0, 2, 3, 1)) if self.data_format == "channels_first" else x

    def _from_nhwc(self, y):
        return ops.transpose(y, (0, 3, 1, 2)) if self.data_format == "channels_first" else y

    def _nhwc_output_shape(self, inputs):
        """compute_output_shape of ``inputs`` (in the layer's data_format), as NHWC."""
        out_shape = self.compute_output_shape(tuple(inputs.shape))
        if self.data_format == "channels_first":
            out_shape = (out_shape[0], out_shape[2], out_shape[3], out_shape[1])
        return out_shape


@keras.saving.register_keras_serializable(package="dlconv")
class Conv2D(_Conv2DLayout, _DlconvLayer, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose forward and backward passes run dlconv kernels.

    Same arguments as ``keras.layers.Conv2D`` plus ``backend`` (see the module docstring).
    """

    _LAYER_NAME = "Conv2D"

    def compute_output_shape(self, input_shape):
        return self._output_shape(input_shape, lambda i, size: conv_output_size(
            size, self.kernel_size[i], self.strides[i], self.padding, self.dilation_rate[i]))

    def call(self, inputs):
        bridge = _bridge()
        _check_input_dtype(self, inputs)
        fused, after = self._activation_split(_FUSED_CONV)
        x = self._to_nhwc(_f32(inputs))
        kernel, bias = self._weights()
        # groups=G: ONE kernel call; the kernels read each group's channel slice in place.
        y = bridge.conv2d(x, kernel, bias, strides=tuple(self.strides), padding=self.padding,
                          dilation=tuple(self.dilation_rate), activation=fused, backend=self.backend,
                          out_shape=self._nhwc_output_shape(inputs), groups=self.groups)
        return self._finish(self._from_nhwc(y), after)


@keras.saving.register_keras_serializable(package="dlconv")
class Dense(_DlconvLayer, keras.layers.Dense):
    """``keras.layers.Dense`` whose forward and backward passes run dlconv kernels.

    Same arguments as ``keras.layers.Dense`` plus ``backend`` (see the module docstring).
    Inputs of rank > 2 are applied on the last axis, as the stock layer does.
    """

    def quantize(self, mode=None, type_check=True, config=None):
        """Keras' own quantization (int8, int4, float8, GPTQ, AWQ): the quantized layer runs
        Keras' quantized kernels.  As for the stock Dense, subclasses of this class refuse it."""
        if type_check and type(self) is not Dense:
            raise self._not_implemented_error(self.quantize)
        return super().quantize(mode, type_check=False, config=config)

    def call(self, inputs, training=None):
        if _is_sparse(inputs):
            # The kernels are dense; Keras' own sparse matmul keeps the input (and, on
            # TensorFlow, the kernel's gradient) sparse.
            return super().call(inputs, training=training)
        bridge = _bridge()
        _check_input_dtype(self, inputs)
        fused, after = self._activation_split(_FUSED_DENSE)
        x = _f32(inputs)
        rank = len(inputs.shape)
        if rank != 2:
            x = ops.reshape(x, (-1, inputs.shape[-1]))
        kernel, bias = self._weights()
        y = bridge.dense(x, kernel, bias, activation=fused, backend=self.backend)
        if rank != 2:
            y = ops.reshape(y, (*ops.shape(inputs)[:-1], self.units))
        return self._finish(y, after)


@keras.saving.register_keras_serializable(package="dlconv")
class Conv2DTranspose(_Conv2DLayout, _DlconvLayer, keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` whose forward and backward passes run dlconv kernels.

    Same arguments as ``keras.layers.Conv2DTranspose`` (``output_padding`` and
    ``dilation_rate`` included; kernel of the stock shape ``(kh, kw, filters, in_channels)``)
    plus ``backend``.  Its forward is the backward-data kernels of the convolution from the
    output back to the input (:func:`dlconv.shapes.conv_transpose_geometry`, Keras' output-size
    rule, the one every Keras backend follows); dL/dx runs on the forward kernels and
    dL/dkernel on the backward-filter kernels.  The bias is added and the activation applied
    by Keras after the kernel (the backward-data kernels have no epilogue), as the stock layer
    does.
    """

    _LAYER_NAME = "Conv2DTranspose"

    def compute_output_shape(self, input_shape):
        output_padding = self.output_padding or (None, None)
        return self._output_shape(input_shape, lambda i, size: conv_transpose_output_size(
            size, self.kernel_size[i], self.strides[i], self.padding, output_padding[i],
            self.dilation_rate[i]))

    def call(self, inputs):
        bridge = _bridge()
        _check_input_dtype(self, inputs)
        x = self._to_nhwc(_f32(inputs))
        kernel, bias = self._weights()
        y = bridge.conv2d_transpose(
            x, kernel, strides=tuple(self.strides), padding=self.padding,
            output_padding=None if self.output_padding is None else tuple(self.output_padding),
            dilation=tuple(self.dilation_rate), backend=self.backend,
            out_shape=self._nhwc_output_shape(inputs))
        if bias is not None:
            y = ops.add(y, ops.reshape(bias, (1, 1, 1, self.filters)))
        return self._finish(self._from_nhwc(y), self.activation)


@keras.saving.register_keras_serializable(package="dlconv")
class MaxPooling2D(keras.layers.MaxPooling2D):
    """``keras.layers.MaxPooling2D`` whose forward and backward run dlconv's C++ max pool
    (``csrc/cpu_pool.cpp``) on the torch and JAX Keras backends.

    Same arguments and config as the stock layer plus ``backend`` (as for the other layers;
    ``numba`` runs the C++ pool, see :func:`dlconv.ops.max_pool2d`).  Per Keras backend
    (:data:`dlconv.ops.MAX_POOL_PATHS`): torch → the ``dlconv::max_pool2d`` custom op, NHWC
    in place (the stock layer transposes to NCHW and back); JAX → ``jax.custom_vjp`` over XLA
    FFI handlers (the stock layer's reduce_window / select_and_scatter gradient is most of a
    jitted CPU step); TensorFlow → the graph-native ``DlconvMaxPool2D`` op and its gradient
    (as fast as oneDNN's pool alone, but in a graph the derivative of a dlconv Conv2D's fused
    relu is folded into the pool's gradient, so the conv's backward ops skip it; no XLA kernel,
    so ``supports_jit`` is False there).

    The stock layer runs, unchanged, for ``data_format="channels_first"``, for inputs that are
    not float32 (a pool is exact in any dtype), for GPU tensors (the kernel is CPU-only), on
    TensorFlow when the op library is not loaded or the input's height/width are unknown, and
    for pools of more than 128 taps there.
    Values follow TensorFlow's rules on every backend: NaN inputs are ignored (stock torch and
    JAX propagate them), ties send the gradient to the first maximum in row-major window order.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None, name=None,
                 backend="auto", **kwargs):
        super().__init__(pool_size=pool_size, strides=strides, padding=padding, data_format=data_format,
                         name=name, **kwargs)
        self.backend = _check_backend(backend)
        if keras.config.backend() == "tensorflow" and _bridge().pool_may_be_native(self.backend):
            self.supports_jit = False   # DlconvMaxPool2D has no XLA kernel

    def _dlconv_path(self, inputs):
        """The bridge module to run ``inputs`` through, or None for the stock layer."""
        kb = keras.config.backend()
        if kb not in ("torch", "jax", "tensorflow") or self.data_format != "channels_last" or len(inputs.shape) != 4:
            return None
        if keras.backend.standardize_dtype(inputs.dtype) != "float32":
            return None
        if kb == "tensorflow":
            bridge = _bridge()
            return bridge if bridge.native_pool(inputs, self.backend) else None
        if kb == "torch" and inputs.device.type != "cpu":
            return None
        if kb == "jax":
            import jax
            if jax.default_backend() != "cpu":
                return None
        return _bridge()

    def call(self, inputs):
        bridge = self._dlconv_path(inputs)
        if bridge is None:
            return super().call(inputs)
        return bridge.max_pool2d(inputs, pool_size=tuple(self.pool_size), strides=tuple(self.strides),
                                 padding=self.padding, backend=self.backend)

    def get_config(self):
        config = super().get_config()
        config["backend"] = self.backend
        return config


@keras.saving.register_keras_serializable(package="dlconv")
class Dropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` that runs dlconv's C++ dropout (``csrc/cpu_dropout.cpp``) on the
    torch and TensorFlow Keras backends.

    Same arguments and config as the stock layer plus ``backend`` (accepted and saved as for
    the other layers; there is one dropout kernel, the C++ one; on TensorFlow ``reference``
    keeps the stock layer, as for MaxPooling2D).  For a CPU float32 input, in training, with ``0 < rate < 1`` and
    ``noise_shape=None``: on torch the ``dlconv::dropout`` custom op
    (:func:`dlconv.bridges.torch.dropout`), on TensorFlow the graph-native ``DlconvDropout`` op
    (:func:`dlconv.bridges.tensorflow.dropout`; no XLA kernel, so ``supports_jit`` is False
    there when the op library is loaded).  The mask is a counter-based hash of
    (seed, counter, element index) — no serial RNG, no mask stored for the backward (it is
    regenerated), the same mask for any thread count.  (seed, counter) is the layer's
    ``seed_generator`` state, advanced by one per call as the stock layer's: each call draws a
    new mask, and a fixed ``seed=`` gives the same masks run after run (not the stock layer's
    masks: the random stream differs).  Kept values are ``x / (1 - rate)``, dropped ones 0
    (NaN included), as the stock layer on every backend.

    The stock layer runs, unchanged, on JAX, for GPU tensors, other dtypes, ``noise_shape``,
    rate 1, on TensorFlow without the op library, and in inference (where it returns the input).
    """

    def __init__(self, rate, noise_shape=None, seed=None, backend="auto", **kwargs):
        super().__init__(rate, noise_shape=noise_shape, seed=seed, **kwargs)
        self.backend = _check_backend(backend)
        if keras.config.backend() == "tensorflow" and self._tf_native():
            self.supports_jit = False   # DlconvDropout has no XLA kernel

    def _tf_native(self) -> bool:
        return self.backend != "reference" and _bridge().dropout_may_be_native(self.backend)

    def _use_dlconv(self, inputs, training) -> bool:
        if not training or self.noise_shape is not None or not 0.0 < self.rate < 1.0:
            return False
        if keras.backend.standardize_dtype(inputs.dtype) != "float32":
            return False
        kb = keras.config.backend()
        if kb == "tensorflow":
            return self._tf_native()
        if kb == "torch":
            return inputs.device.type == "cpu" and _backends.available()["cpp"]["cpu"][0]
        return False

    def call(self, inputs, training=False):
        if not self._use_dlconv(inputs, training):
            return super().call(inputs, training=training)
        seed = self.seed_generator.next()   # [seed, counter]; the state's counter advances by 1
        return _bridge().dropout(inputs, self.rate, seed)

    def get_config(self):
        config = super().get_config()
        config["backend"] = self.backend
        return config
