"""Keras' own layer tests for Conv2D, Dense, Conv2DTranspose and MaxPooling2D (the conv_test.py,
dense_test.py, conv_transpose_test.py and max_pooling_test.py of the installed Keras), run with dlconv's classes in place of the stock ones: a drop-in layer
passes what the stock one passes.  ``keras.src.layers.Conv2D``/``Dense`` are replaced before
Keras' test modules are imported (their parameter tables name the classes), in this process
only.  tests/test_keras_backends.py runs this folder twice per Keras backend, each time in a
process of its own: with the stock classes (``DLCONV_KERAS_OWN=stock``) and with dlconv's,
and requires every test the stock layers pass to pass with dlconv's.  By hand:

    DLCONV_KERAS_SUITE=1 KERAS_BACKEND=torch pytest tests/keras_own
"""

import importlib
import os

import keras.src.layers as _klayers

if os.environ.get("DLCONV_KERAS_OWN") != "stock":
    import dlconv.layers as dl

    _klayers.Conv2D = dl.Conv2D
    _klayers.Dense = dl.Dense
    _klayers.Conv2DTranspose = dl.Conv2DTranspose
    _klayers.MaxPooling2D = dl.MaxPooling2D

_conv = importlib.import_module("keras.src.layers.convolutional.conv_test")
_dense = importlib.import_module("keras.src.layers.core.dense_test")
_conv_transpose = importlib.import_module("keras.src.layers.convolutional.conv_transpose_test")
_max_pooling = importlib.import_module("keras.src.layers.pooling.max_pooling_test")

DenseTest = _dense.DenseTest


def _only_2d(cls, skip=("test_conv1d", "test_conv3d")):
    """``cls`` without its 1-D / 3-D tests (dlconv has no such layers: they would run the stock
    classes twice), as a subclass of the same name."""
    sub = type(cls.__name__, (cls,), {"__module__": __name__})
    for name in dir(cls):
        if name.startswith(skip):
            setattr(sub, name, None)      # not callable: not collected
    return sub


# Conv1D / Conv3D are stock in both runs: comparing them compares the stock layer with itself,
# where only a flake can differ (a stock Conv3D correctness test on JAX failed once in 2 runs).
ConvBasicTest = _only_2d(_conv.ConvBasicTest)
ConvCorrectnessTest = _only_2d(_conv.ConvCorrectnessTest)
ConvTransposeBasicTest = _only_2d(_conv_transpose.ConvTransposeBasicTest)
ConvTransposeCorrectnessTest = _only_2d(_conv_transpose.ConvTransposeCorrectnessTest)

# MaxPooling2D (dlconv.layers.MaxPooling2D: its C++ pool on torch and JAX, stock elsewhere).
MaxPoolingBasicTest = _only_2d(_max_pooling.MaxPoolingBasicTest, ("test_max_pooling1d", "test_max_pooling3d"))
MaxPoolingCorrectnessTest = _only_2d(_max_pooling.MaxPoolingCorrectnessTest,
                                     ("test_max_pooling1d", "test_max_pooling3d"))
