"""The workshop's models, built from dlconv layers, each with a stock Keras twin.

Every builder takes ``backend=`` (for the dlconv layers), ``stock=False`` (True builds the
same model from ``keras.layers``) and ``seed=`` (seeds every initializer and dropout, so a
dlconv model and its stock twin built with the same seed start from identical weights).

=========  =======================================================  ===========  ==========
name       layers                                                   input        parameters
=========  =======================================================  ===========  ==========
dense      784-64-64-10 (relu, relu, softmax)                       (784,)           55,050
wide       784-512-512-10 (relu, relu, softmax)                     (784,)          669,706
deep       784-512-512-10-10 (relu, relu, relu, softmax)            (784,)          669,816
cnn        Conv2D 32 3x3 relu → Conv2D 64 3x3 relu → MaxPool 2x2    (28, 28, 1)   1,199,882
           → Dropout 0.25 → Flatten → Dense 128 relu → Dropout 0.5
           → Dense 10 softmax
resnet_    Conv2D 16 7x7/2 relu → 5 ResBlocks of 16 → ResBlock of   (32, 32, 1)     130,978
ecal       32 /2 (1x1/2 projection) → 5 ResBlocks of 32 →
           GlobalMaxPool → Dense 2 softmax (see :func:`resnet_ecal`)
=========  =======================================================  ===========  ==========

``dense``, ``wide``, ``deep`` and ``cnn`` (:data:`MODELS`) train on MNIST
(:func:`prepare_images`); ``resnet_ecal`` (:data:`ECAL_MODELS`) on the generated calorimeter
images of :mod:`dlconv.showers`.  :func:`build` builds any of them.

Importing this module imports Keras (and, through :mod:`dlconv.layers`, TensorFlow).
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np

__all__ = ["dense", "wide", "deep", "cnn", "resnet_ecal", "build", "MODELS", "ECAL_MODELS",
           "INPUT_SHAPES", "PARAM_COUNTS", "ECAL_INPUT_SHAPE", "ECAL_PARAM_COUNT", "ECAL_STAGES",
           "prepare_images", "compile_model"]

#: Input shape of each model (without the batch axis).
INPUT_SHAPES = {"dense": (784,), "wide": (784,), "deep": (784,), "cnn": (28, 28, 1)}
#: Trainable parameter count of each model (checked by the tests against dlconv.shapes).
PARAM_COUNTS = {"dense": 55_050, "wide": 669_706, "deep": 669_816, "cnn": 1_199_882}


class _Factory:
    """Makes layers for one model: dlconv or stock, each initializer and dropout seeded."""

    def __init__(self, backend: str, stock: bool, seed: Optional[int]):
        if not isinstance(stock, bool):
            raise TypeError(f"stock must be True or False, got {stock!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.stock, self.backend, self.seed, self.n = stock, backend, seed, 0
        if not stock:
            from . import layers as dl
            if backend not in dl.BACKENDS:
                raise ValueError(f"backend must be one of {dl.BACKENDS}, got {backend!r}")
            self.dl = dl

    def _seed(self):
        self.n += 1
        return None if self.seed is None else int(self.seed) * 1000 + self.n

    def _init(self):
        return {"kernel_initializer": keras.initializers.GlorotUniform(seed=self._seed())}

    def dense(self, units, activation):
        if self.stock:
            return keras.layers.Dense(units, activation=activation, **self._init())
        return self.dl.Dense(units, activation=activation, backend=self.backend, **self._init())

    def conv(self, filters, kernel_size, activation, **kwargs):
        """A Conv2D; ``kwargs`` (strides, padding, ...) go to the layer unchanged."""
        if self.stock:
            return keras.layers.Conv2D(filters, kernel_size, activation=activation,
                                       **self._init(), **kwargs)
        return self.dl.Conv2D(filters, kernel_size, activation=activation, backend=self.backend,
                              **self._init(), **kwargs)

    def max_pool(self, pool_size):
        """A MaxPooling2D: dlconv's (its C++ kernel on the torch and JAX Keras backends) or stock."""
        if self.stock:
            return keras.layers.MaxPooling2D(pool_size=pool_size)
        return self.dl.MaxPooling2D(pool_size=pool_size, backend=self.backend)

    def dropout(self, rate):
        """A Dropout: dlconv's (its C++ kernel on the torch and TensorFlow Keras backends) or stock."""
        if self.stock:
            return keras.layers.Dropout(rate, seed=self._seed())
        return self.dl.Dropout(rate, seed=self._seed(), backend=self.backend)

    def model(self, name, input_shape, layers):
        suffix = "stock" if self.stock else "dlconv"
        return keras.Sequential([keras.Input(shape=input_shape), *layers], name=f"{name}_{suffix}")

    def functional(self, name, inputs, outputs):
        suffix = "stock" if self.stock else "dlconv"
        return keras.Model(inputs, outputs, name=f"{name}_{suffix}")


def dense(backend: str = "auto", stock: bool = False, seed: Optional[int] = None) -> keras.Model:
    """784-64-64-10: two relu layers of 64 and a softmax of 10 (55,050 parameters)."""
    f = _Factory(backend, stock, seed)
    return f.model("dense", INPUT_SHAPES["dense"],
                   [f.dense(64, "relu"), f.dense(64, "relu"), f.dense(10, "softmax")])


def wide(backend: str = "auto", stock: bool = False, seed: Optional[int] = None) -> keras.Model:
    """784-512-512-10: two relu layers of 512 and a softmax of 10 (669,706 parameters)."""
    f = _Factory(backend, stock, seed)
    return f.model("wide", INPUT_SHAPES["wide"],
                   [f.dense(512, "relu"), f.dense(512, "relu"), f.dense(10, "softmax")])


def deep(backend: str = "auto", stock: bool = False, seed: Optional[int] = None) -> keras.Model:
    """784-512-512-10(relu)-10(softmax): the wide net with one more layer (669,816 parameters)."""
    f = _Factory(backend, stock, seed)
    return f.model("deep", INPUT_SHAPES["deep"],
                   [f.dense(512, "relu"), f.dense(512, "relu"), f.dense(10, "relu"),
                    f.dense(10, "softmax")])


def cnn(backend: str = "auto", stock: bool = False, seed: Optional[int] = None) -> keras.Model:
    """The MNIST CNN (Keras' mnist_convnet layout, 1,199,882 parameters)."""
    f = _Factory(backend, stock, seed)
    return f.model("cnn", INPUT_SHAPES["cnn"], [
        f.conv(32, (3, 3), "relu"),
        f.conv(64, (3, 3), "relu"),
        f.max_pool((2, 2)),
        f.dropout(0.25),
        keras.layers.Flatten(),
        f.dense(128, "relu"),
        f.dropout(0.5),
        f.dense(10, "softmax"),
    ])


# ----------------------------------------------------------------------------- ECAL ResNet
#: Default input of :func:`resnet_ecal`: a 32×32-crystal crop, one channel (energy, GeV).
ECAL_INPUT_SHAPE = (32, 32, 1)
#: Trainable parameters of :func:`resnet_ecal` (any input size: the pooling is global).
ECAL_PARAM_COUNT = 130_978
#: The ResNet's stages: (filters, blocks, stride of the stage's first block).  A block with
#: stride 2 halves the map and has a 1×1 stride-2 projection shortcut.
ECAL_STAGES = ((16, 5, 1), (32, 1, 2), (32, 5, 1))
_ECAL_STEM = dict(filters=16, kernel_size=(7, 7), strides=2)


def _check_input_shape(input_shape):
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (shape is None or len(shape) != 3
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                       for d in shape)):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, "
                         f"got {input_shape!r}")
    return tuple(int(d) for d in shape)


def _res_block(f: _Factory, x, filters: int, strides: int):
    """He et al.'s basic block: conv3x3(relu) → conv3x3 → + shortcut → relu.

    The shortcut is the identity, or a 1×1 convolution with the block's stride (the
    projection) where the block changes the map size or the channel count."""
    y = f.conv(filters, (3, 3), "relu", strides=strides, padding="same")(x)
    y = f.conv(filters, (3, 3), None, padding="same")(y)
    if strides != 1 or x.shape[-1] != filters:
        x = f.conv(filters, (1, 1), None, strides=strides)(x)
    return keras.layers.ReLU()(keras.layers.Add()([y, x]))


def resnet_ecal(input_shape=ECAL_INPUT_SHAPE, num_classes: int = 2, backend: str = "auto",
                stock: bool = False, seed: Optional[int] = None) -> keras.Model:
    """The end-to-end ECAL event classifier (130,978 parameters for two classes).

    The ResNet of Andrews, Paulini, Gleyzer and Poczos, "End-to-end event classification
    of high-energy physics data", J. Phys.: Conf. Ser. 1085 (2018) 042022, on images of
    electromagnetic-calorimeter crystals:

    * stem: Conv2D 16 filters 7×7, stride 2, "same" padding, relu;
    * 5 ResBlocks of 16 filters (two 3×3 "same" convolutions, identity shortcut);
    * 1 ResBlock of 32 filters, stride 2 (its shortcut a 1×1 stride-2 projection);
    * 5 ResBlocks of 32 filters;
    * global max pooling, then Dense ``num_classes`` softmax (the classifier).

    No normalisation layers (the architecture as described has none; it also keeps the
    dlconv model and its stock twin free of batch-statistics state).  Pooling, additions and the relu
    after each addition are stock Keras layers; every Conv2D and the Dense are dlconv
    layers (``stock=True``: ``keras.layers``, the same weights with the same seed).

    ``input_shape`` (height, width, channels), default ``(32, 32, 1)``: a 32×32-crystal
    crop of the ECAL around the most energetic crystal, as the seed workshop's images
    (the e/γ crops of the same authors).  At 2.2 cm crystals and a 2.19 cm Molière radius
    a crop of ±16 crystals holds > 99.9 % of an electromagnetic shower and every π⁰ → γγ
    pair above 5 GeV (:mod:`dlconv.showers`); a larger crop adds noise cells only.  The
    stem then gives 16×16 maps and the stride-2 block 8×8.  Any size works (the pooling
    is global, so the parameter count does not depend on it): ``(64, 64, 1)`` gives the
    stem 64×64 → 32×32 of the issue's benchmark table.
    """
    input_shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    f = _Factory(backend, stock, seed)
    inputs = keras.Input(shape=input_shape)
    x = f.conv(activation="relu", padding="same", **_ECAL_STEM)(inputs)
    for filters, blocks, stride in ECAL_STAGES:
        for b in range(blocks):
            x = _res_block(f, x, filters, strides=stride if b == 0 else 1)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = f.dense(int(num_classes), "softmax")(x)
    return f.functional("resnet_ecal", inputs, outputs)


#: The MNIST models (input :data:`INPUT_SHAPES`, images from :func:`prepare_images`).
MODELS = {"dense": dense, "wide": wide, "deep": deep, "cnn": cnn}
#: The calorimeter models (images from :mod:`dlconv.showers`).
ECAL_MODELS = {"resnet_ecal": resnet_ecal}
_ALL = {**MODELS, **ECAL_MODELS}


def build(name: str, backend: str = "auto", stock: bool = False,
          seed: Optional[int] = None, **kwargs) -> keras.Model:
    """The model called ``name`` (one of :data:`MODELS` or :data:`ECAL_MODELS`).

    ``kwargs`` go to the builder: ``input_shape=`` and ``num_classes=`` for
    ``resnet_ecal``; the MNIST models take none."""
    if name not in _ALL:
        raise ValueError(f"model must be one of {tuple(_ALL)}, got {name!r}")
    if kwargs and name not in ECAL_MODELS:
        raise TypeError(f"model {name!r} takes no arguments besides backend, stock and seed, "
                        f"got {sorted(kwargs)}")
    return _ALL[name](backend=backend, stock=stock, seed=seed, **kwargs)


def prepare_images(x: np.ndarray, name: str) -> np.ndarray:
    """uint8 images (N, 28, 28) → float32 in [0, 1], shaped for model ``name``."""
    if name not in INPUT_SHAPES:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"x must have shape (N, 28, 28), got {x.shape}")
    return (x.astype(np.float32) / np.float32(255.0)).reshape((len(x),) + INPUT_SHAPES[name])


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Adam, sparse categorical cross-entropy, accuracy: the workshop's settings."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
