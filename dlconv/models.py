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
=========  =======================================================  ===========  ==========

Importing this module imports Keras (and, through :mod:`dlconv.layers`, TensorFlow).
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np

__all__ = ["dense", "wide", "deep", "cnn", "build", "MODELS", "INPUT_SHAPES", "PARAM_COUNTS",
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

    def conv(self, filters, kernel_size, activation):
        if self.stock:
            return keras.layers.Conv2D(filters, kernel_size, activation=activation, **self._init())
        return self.dl.Conv2D(filters, kernel_size, activation=activation, backend=self.backend,
                              **self._init())

    def dropout(self, rate):
        return keras.layers.Dropout(rate, seed=self._seed())

    def model(self, name, input_shape, layers):
        suffix = "stock" if self.stock else "dlconv"
        return keras.Sequential([keras.Input(shape=input_shape), *layers], name=f"{name}_{suffix}")


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
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        f.dropout(0.25),
        keras.layers.Flatten(),
        f.dense(128, "relu"),
        f.dropout(0.5),
        f.dense(10, "softmax"),
    ])


MODELS = {"dense": dense, "wide": wide, "deep": deep, "cnn": cnn}


def build(name: str, backend: str = "auto", stock: bool = False,
          seed: Optional[int] = None) -> keras.Model:
    """The model called ``name`` (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](backend=backend, stock=stock, seed=seed)


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
