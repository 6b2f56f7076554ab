"""Activation functions shared by every backend: names, integer codes, and their derivatives.

The kernels fuse the activation into their epilogue and receive it as a small integer
code (the same codes in Numba and C++, see ``csrc/geometry.h``).  Softmax is not an
element-wise epilogue; it is a separate row-wise kernel applied after a linear dense.

Derivatives are written in terms of the activation's *output* ``y``, which is what the
backward pass keeps::

    relu:    y > 0
    sigmoid: y * (1 - y)
    tanh:    1 - y * y
    softmax: y * (dy - sum(dy * y, axis=-1))   (a Jacobian-vector product, not element-wise)
"""

from __future__ import annotations

LINEAR, RELU, SIGMOID, TANH = 0, 1, 2, 3

#: name → code for the element-wise activations a kernel can fuse.
CODES = {"linear": LINEAR, "relu": RELU, "sigmoid": SIGMOID, "tanh": TANH}
ELEMENTWISE = tuple(CODES)
#: Every name accepted by :func:`dlconv.conv2d` / :func:`dlconv.dense`.
SUPPORTED = ELEMENTWISE + ("softmax",)


def normalize(activation, *, allow_softmax: bool = True) -> str:
    """``None`` / name (any case) → canonical name; ValueError for an unknown name.

    Callables are refused (TypeError): a function is not known by its ``__name__`` (a user's
    own function called ``relu`` used to be replaced silently by the built-in relu).  The
    Keras layers map Keras' own activation functions to these names by identity
    (:mod:`dlconv.layers`); in the op API pass the name, or apply the function to the result.
    """
    if activation is None:
        return "linear"
    if not isinstance(activation, str):
        what = (f"the callable {getattr(activation, '__name__', type(activation).__name__)!r}"
                if callable(activation) else repr(activation))
        raise TypeError(f"activation must be None or a name, one of {SUPPORTED}, got {what}; "
                        "the op API fuses its activations by name (pass e.g. 'relu', or apply "
                        "your own function to the result)")
    name = activation.lower()
    allowed = SUPPORTED if allow_softmax else ELEMENTWISE
    if name not in allowed:
        raise ValueError(f"activation must be None or one of {allowed}, got {activation!r}")
    return name


def code(activation) -> int:
    """Integer code of an element-wise activation (softmax is refused)."""
    return CODES[normalize(activation, allow_softmax=False)]
