"""The shape suites of ``dlconv bench --suite``: which layer shapes a run measures, and
which models' train steps.

=========  ==========================================================================
``mnist``  the workshop's MNIST CNN at batch 128 (:data:`~.cases.LAYERS`; the default)
``ecal``   every Conv2D shape of the seed workshop's physics ResNet
           (``dlconv.models.resnet_ecal``, Andrews et al., J. Phys.: Conf. Ser. 1085
           (2018) 042022) at batch :data:`ECAL_BATCH`, read off the model itself
           (:func:`model_conv_layers`), plus the shapes of issue 13's table
           (:data:`ISSUE13_LAYERS`), each at its own batch
``groups`` grouped convolution (issue 11): 3×3 same 64 → 64 on 28×28 at batch
           :data:`GROUPS_BATCH` with G = 1 (the stock-shape baseline), 2, 4 and 64
           (depthwise), :data:`GROUP_LAYERS`; against TensorFlow's grouped conv2d and its
           gradients, as every other shape
``all``    every suite
=========  ==========================================================================

A suite is data (:data:`SUITES`): tuples of :class:`~.cases.Layer` and
:class:`ModelShapes` (a model whose Conv2D layers are walked when the suite is resolved),
plus the train steps of :data:`SUITE_TRAIN_STEPS`.  Every pass, backend and variant of the
resolved layers then goes through the same :func:`~.suite.run_kernels` as the MNIST ones.
Resolving a suite with a :class:`ModelShapes` imports Keras (it builds the stock model);
importing this module does not.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

from .cases import LAYER_BY_NAME, LAYERS, Layer

#: Batch of the physics ResNet's layers and train step: a realistic training batch for
#: calorimeter images on a CPU (the issue's probe used it for the ResNet-like shapes).
ECAL_BATCH = 32


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """Every distinct Conv2D shape of ``dlconv.models.<builder>(**kwargs)``, at ``batch``;
    layers named ``<prefix>_<KH>x<KW>[s<stride>]_<C>to<K>`` (``_<H>x<W>`` added when two
    shapes would share a name)."""

    builder: str
    prefix: str
    batch: int
    suite: str
    kwargs: Tuple[Tuple[str, object], ...] = ()

    def build(self):
        """The stock-Keras twin (no dlconv kernel runs; only the shapes are read)."""
        import importlib

        models = importlib.import_module("dlconv.models")
        builder = getattr(models, self.builder, None)
        if builder is None:
            raise ImportError(f"dlconv.models has no {self.builder}() builder")
        return builder(stock=True, **dict(self.kwargs))

    def layers(self) -> Tuple[Layer, ...]:
        return model_conv_layers(self.build(), self.prefix, self.batch, self.suite, self.builder)


def _walk(model):
    """Every layer of ``model``, nested models' layers in place of the model, in order."""
    for layer in model.layers:
        if hasattr(layer, "layers") and not hasattr(layer, "kernel"):
            yield from _walk(layer)
        else:
            yield layer


def model_conv_layers(model, prefix: str, batch: int, suite: str, source: str = "") -> Tuple[Layer, ...]:
    """The distinct Conv2D shapes of a built Keras model, in the model's order, as bench
    layers at ``batch``.  A shape is its input (H, W, C), kernel, strides, padding and
    dilation; one that occurs several times is one layer (its description says how many).
    Transposed convolutions and grouped ones are not Conv2D shapes of the op API's conv2d
    and are left out."""
    import keras

    found: Dict[tuple, list] = {}
    for layer in _walk(model):
        if not isinstance(layer, keras.layers.Conv2D) or getattr(layer, "groups", 1) != 1:
            continue
        sample = tuple(int(d) for d in layer.input.shape[1:])
        key = (sample, tuple(int(d) for d in layer.kernel.shape), tuple(layer.strides),
               layer.padding, tuple(layer.dilation_rate))
        act = getattr(layer.activation, "__name__", str(layer.activation))
        found.setdefault(key, [act, 0])[1] += 1
    names: Dict[str, int] = {}
    for (sample, w_shape, strides, _, _) in found:
        names[_short_name(prefix, sample, w_shape, strides)] = names.get(
            _short_name(prefix, sample, w_shape, strides), 0) + 1
    out = []
    for (sample, w_shape, strides, padding, dilation), (act, count) in found.items():
        name = _short_name(prefix, sample, w_shape, strides)
        if names[name] > 1:
            name += f"_{sample[0]}x{sample[1]}"
        note = f"×{count} in {source or prefix}" if count > 1 else f"in {source or prefix}"
        out.append(Layer(name, "conv", sample, w_shape, act, padding=padding,
                         strides=strides if strides[0] != strides[1] else strides[0],
                         dilation=dilation if dilation[0] != dilation[1] else dilation[0],
                         batch=batch, suite=suite, note=note))
    return tuple(out)


def _short_name(prefix, sample, w_shape, strides) -> str:
    kh, kw, c, k = w_shape
    s = "" if tuple(strides) == (1, 1) else (
        f"s{strides[0]}" if strides[0] == strides[1] else f"s{strides[0]}x{strides[1]}")
    return f"{prefix}_{kh}x{kw}{s}_{c}to{k}"


#: The shapes of issue 13's table (beside the MNIST conv2 it lists): a ResNet stem on a
#: 1-channel detector image, a stride-2 block entry, a 1x1 projection, 5x5, and 3x3 on few
#: and on many channels, each at the batch the issue measured it at.  conv + bias + relu.
ISSUE13_LAYERS = (
    Layer("i13_7x7s2_1to16", "conv", (64, 64, 1), (7, 7, 1, 16), "relu", padding="same",
          strides=2, batch=32, suite="ecal", note="issue 13"),
    Layer("i13_3x3s2_16to32", "conv", (32, 32, 16), (3, 3, 16, 32), "relu", padding="same",
          strides=2, batch=32, suite="ecal", note="issue 13"),
    Layer("i13_1x1_64to128", "conv", (16, 16, 64), (1, 1, 64, 128), "relu", batch=32,
          suite="ecal", note="issue 13"),
    Layer("i13_5x5_32to64", "conv", (28, 28, 32), (5, 5, 32, 64), "relu", padding="same",
          batch=64, suite="ecal", note="issue 13"),
    Layer("i13_3x3_16to16", "conv", (32, 32, 16), (3, 3, 16, 16), "relu", padding="same",
          batch=32, suite="ecal", note="issue 13"),
    Layer("i13_3x3_64to64", "conv", (32, 32, 64), (3, 3, 64, 64), "relu", padding="same",
          batch=64, suite="ecal", note="issue 13"),
)

#: Batch of the grouped-conv shapes: a mid-size training batch (issue 11 asked for 8–32).
GROUPS_BATCH = 16
#: Channels (= filters) of the grouped-conv shapes; G = GROUP_CHANNELS is depthwise.
GROUP_CHANNELS = 64


def _group_layer(groups: int) -> Layer:
    c = GROUP_CHANNELS
    tag = "dw" if groups == c else f"g{groups}"
    return Layer(f"grp_3x3_{c}to{c}_{tag}", "conv", (28, 28, c), (3, 3, c // groups, c), "relu",
                 padding="same", batch=GROUPS_BATCH, suite="groups", groups=groups,
                 note="issue 11" if groups > 1 else "issue 11, ungrouped baseline")


#: Issue 11's grouped shapes: the same layer at G = 1, 2, 4 and C (depthwise).
GROUP_LAYERS = tuple(_group_layer(g) for g in (1, 2, 4, GROUP_CHANNELS))

#: suite → its parts, in table order: layers, or models whose Conv2D shapes are read off.
SUITES: Dict[str, tuple] = {
    "mnist": LAYERS,
    "ecal": (ModelShapes("resnet_ecal", "ecal", ECAL_BATCH, "ecal"), LAYER_BY_NAME["conv2"],
             *ISSUE13_LAYERS),
    "groups": GROUP_LAYERS,
}
#: ``all`` is every suite, in this order.
SUITE_CHOICES = (*SUITES, "all")
#: suite → the models whose train step it measures (:data:`~.train_step.TRAIN_MODELS`).
SUITE_TRAIN_STEPS: Dict[str, Tuple[str, ...]] = {"mnist": ("mnist_cnn",), "ecal": ("resnet_ecal",),
                                                 "groups": ()}


def _names(suite: str) -> List[str]:
    if suite == "all":
        return list(SUITES)
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITE_CHOICES)}; got {suite!r}")
    return [suite]


def _geometry_key(layer: Layer) -> tuple:
    g = layer.geometry()
    return (layer.kind, g.x_shape, tuple(layer.w_shape)) + tuple(
        getattr(g, a, None) for a in ("stride_h", "stride_w", "pad_top", "pad_bottom",
                                      "pad_left", "pad_right", "dil_h", "dil_w", "groups"))


def suite_layers(suite: str) -> List[Layer]:
    """The layers of ``suite`` (mnist, ecal, groups or all), in table order.  A shape that occurs
    twice (same geometry and batch; an issue-table shape that is also a layer of the model)
    is measured once, under its first name."""
    out: List[Layer] = []
    seen = set()
    for name in _names(suite):
        for part in SUITES[name]:
            for layer in (part.layers() if isinstance(part, ModelShapes) else (part,)):
                key = _geometry_key(layer)
                if key not in seen:
                    seen.add(key)
                    out.append(layer)
    return out


def suite_train_steps(suite: str) -> List[str]:
    return [m for name in _names(suite) for m in SUITE_TRAIN_STEPS[name]]


def select(layers: Sequence[Layer], names: Sequence[str]) -> List[Layer]:
    """The layers named (``--layers``), in the suite's order; unknown names are a ValueError
    that lists the suite's."""
    by = {layer.name: layer for layer in layers}
    bad = [n for n in names if n not in by]
    if bad:
        raise ValueError(f"--layers must be a comma-separated list of {', '.join(by)}; got "
                         f"{', '.join(bad)} (not in this suite)")
    return [layer for layer in layers if layer.name in set(names)]
