"""The table of passes: for each layer kind and pass, what its inputs are, how dlconv's op,
the reference and each built-in framework compute it, and how many FLOPs it counts.

:data:`PASSES` maps ``(kind, pass)`` → :class:`Pass`.  Everything else in the bench reads
this table (making a problem's inputs, calling dlconv's op or a user's kernel, the NumPy
reference, TensorFlow's and torch's ops), so a new pass is one entry and a new built-in one
field of each entry.

Layouts: dlconv's (and TensorFlow's) NHWC activations and HWIO weights, dense weights
(in, out).  torch's convolution takes NCHW / OIHW: its entries get their inputs converted
by :data:`TORCH_LAYOUT` (outside the timing) and hand back a ``convert`` that maps their
outputs back to dlconv's layouts for the check.

Every callable here imports nothing at module import time: TensorFlow, torch and
:mod:`dlconv.ops` come in as arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

from .. import reference as ref


def conv_kwargs(g) -> dict:
    """The op API's geometry arguments for the resolved geometry ``g``: strides, explicit
    ``((top, bottom), (left, right))`` padding (covers "same"'s asymmetric split), dilation."""
    return {"strides": (g.stride_h, g.stride_w),
            "padding": ((g.pad_top, g.pad_bottom), (g.pad_left, g.pad_right)),
            "dilation": (g.dil_h, g.dil_w)}


# ----------------------------------------------------------------------------- activations
def _tf_activate(tf, act):
    return {"relu": tf.nn.relu, "softmax": tf.nn.softmax, "linear": tf.identity,
            "sigmoid": tf.sigmoid, "tanh": tf.tanh}[act]


def _tf_activation_grad(tf, act, dy, y):
    """dL/dz from dL/dy and y: the ops TensorFlow's registered gradients run."""
    if act == "relu":
        return tf.raw_ops.ReluGrad(gradients=dy, features=y)
    if act == "softmax":
        return (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True)) * y
    if act == "sigmoid":
        return tf.raw_ops.SigmoidGrad(y=y, dy=dy)
    if act == "tanh":
        return tf.raw_ops.TanhGrad(y=y, dy=dy)
    return dy


def _torch_activate(torch, act):
    return {"relu": torch.relu, "softmax": lambda z: torch.softmax(z, dim=1),
            "linear": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act]


def _torch_activation_grad(torch, act, dy, y):
    """dL/dz from dL/dy and y: the ops torch's autograd runs."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(dy, y, 0.0)
    if act == "softmax":
        return torch._softmax_backward_data(dy, y, 1, torch.float32)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(dy, y)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(dy, y)
    return dy


def _tf_same_pads(g) -> tuple:
    """The (top, bottom, left, right) pads TensorFlow's ``padding="SAME"`` gives ``g``."""
    out = []
    for size, stride, k_eff in ((g.in_h, g.stride_h, g.k_h_eff), (g.in_w, g.stride_w, g.k_w_eff)):
        total = max((-(-size // stride) - 1) * stride + k_eff - size, 0)
        out += [total // 2, total - total // 2]
    return tuple(out)


def _tf_conv_kwargs(g) -> dict:
    pads = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right)
    kw = dict(strides=[1, g.stride_h, g.stride_w, 1], dilations=[1, g.dil_h, g.dil_w, 1])
    if g.groups > 1 and any(pads) and pads == _tf_same_pads(g):
        # TensorFlow's CPU gradients of a grouped conv exist for "SAME"/"VALID" only
        # (EXPLICIT: "Gradients for grouped convolutions are not supported on CPU"); "SAME"
        # is also what stock Keras' Conv2D(padding="same") passes.
        kw.update(padding="SAME")
    elif any(pads):
        kw.update(padding="EXPLICIT", explicit_paddings=[0, 0, *pads, 0, 0])
    else:
        kw.update(padding="VALID")
    return kw


def _torch_conv_kwargs(g) -> dict:
    if (g.pad_top, g.pad_left) != (g.pad_bottom, g.pad_right):
        raise ValueError(f"torch's conv takes symmetric pads only, got {g}")
    return dict(stride=(g.stride_h, g.stride_w), padding=(g.pad_top, g.pad_left),
                dilation=(g.dil_h, g.dil_w), groups=g.groups)


def _nhwc(t):
    return t.permute(0, 2, 3, 1)


def _hwio(t):
    return t.permute(2, 3, 1, 0)


#: torch layout conversion of each conv input (NHWC → NCHW, HWIO → OIHW); others as they are.
TORCH_LAYOUT = {"conv": {"x": lambda t: t.permute(0, 3, 1, 2).contiguous(),
                         "dy": lambda t: t.permute(0, 3, 1, 2).contiguous(),
                         "w": lambda t: t.permute(3, 2, 0, 1).contiguous()}}


# ----------------------------------------------------------------------------- conv forward
def _conv_forward_call(fn, a, g, act, **extra):
    return fn(a["x"], a["w"], a["b"], activation=act, **conv_kwargs(g), **extra)


def _conv_forward_tf(tf, g, act):
    activate, kw = _tf_activate(tf, act), _tf_conv_kwargs(g)
    return lambda x, w, b: activate(tf.nn.bias_add(tf.raw_ops.Conv2D(input=x, filter=w, **kw), b))


def _conv_forward_torch(torch, g, act):
    post, kw = _torch_activate(torch, act), _torch_conv_kwargs(g)
    return (lambda x, w, b: post(torch.nn.functional.conv2d(x, w, b, **kw))), _nhwc


# ----------------------------------------------------------------------------- conv backward-data
def _conv_backward_data_call(fn, a, g, act, **extra):
    return fn(a["dy"], a["w"], g.x_shape, **conv_kwargs(g), **extra)


def _conv_backward_data_tf(tf, g, act):
    kw, sizes = _tf_conv_kwargs(g), tf.constant(g.x_shape, tf.int32)
    return lambda dy, w: tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=w,
                                                         out_backprop=dy, **kw)


def _conv_backward_data_torch(torch, g, act):
    kw, shape = _torch_conv_kwargs(g), (g.batch, g.in_c, g.in_h, g.in_w)
    return (lambda dy, w: torch.nn.grad.conv2d_input(shape, w, dy, **kw)), _nhwc


# ----------------------------------------------------------------------------- conv backward-filter
def _conv_backward_filter_call(fn, a, g, act, **extra):
    return fn(a["x"], a["dy"], g.w_shape, **conv_kwargs(g), **extra)


def _conv_backward_filter_tf(tf, g, act):
    kw, fsizes = _tf_conv_kwargs(g), tf.constant(g.w_shape, tf.int32)
    return lambda x, dy: (tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=fsizes,
                                                          out_backprop=dy, **kw),
                          tf.raw_ops.BiasAddGrad(out_backprop=dy))


def _conv_backward_filter_torch(torch, g, act):
    kw, wshape = _torch_conv_kwargs(g), (g.filters, g.group_in_c, g.k_h, g.k_w)
    return ((lambda x, dy: (torch.nn.grad.conv2d_weight(x, wshape, dy, **kw), dy.sum(dim=(0, 2, 3)))),
            lambda o: (_hwio(o[0]), o[1]))


# ----------------------------------------------------------------------------- dense forward
def _dense_forward_call(fn, a, g, act, **extra):
    return fn(a["x"], a["w"], a["b"], activation=act, **extra)


def _dense_forward_tf(tf, g, act):
    activate = _tf_activate(tf, act)
    return lambda x, w, b: activate(tf.nn.bias_add(tf.matmul(x, w), b))


def _dense_forward_torch(torch, g, act):
    post = _torch_activate(torch, act)
    return (lambda x, w, b: post(torch.addmm(b, x, w))), None


# ----------------------------------------------------------------------------- dense backward
def _dense_backward_call(fn, a, g, act, **extra):
    return fn(a["x"], a["w"], a["dy"], a["y"], activation=act, **extra)


def _dense_backward_tf(tf, g, act):
    def backward(x, w, dy, y):
        # The ops TensorFlow's registered gradients of the activation, MatMul and BiasAdd run.
        dz = _tf_activation_grad(tf, act, dy, y)
        return (tf.matmul(dz, w, transpose_b=True), tf.matmul(x, dz, transpose_a=True),
                tf.raw_ops.BiasAddGrad(out_backprop=dz))
    return backward


def _dense_backward_torch(torch, g, act):
    def backward(x, w, dy, y):
        dz = _torch_activation_grad(torch, act, dy, y)
        return torch.mm(dz, w.t()), torch.mm(x.t(), dz), dz.sum(dim=0)
    return backward, None


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass of one layer kind.

    ``op``: the :mod:`dlconv.ops` function, whose signature a user kernel of this pass has.
    ``inputs``: the arrays, in the op's order (also the built-ins' argument order).
    ``outputs``: what it returns (one array, or a tuple in this order).
    ``call(fn, arrays, g, act, **extra)``: calls ``fn`` with the op API's arguments.
    ``op_extras``: the keywords of dlconv's op beyond the API (backend and stream always).
    ``reference(arrays, g, act)`` → tuple of outputs (:mod:`dlconv.reference`).
    ``tensorflow(tf, g, act)`` → ``f(*inputs)``; ``torch(torch, g, act)`` → ``(f(*inputs in
    torch's layout), convert or None)``.
    ``flops_factor``: FLOPs = factor × the geometry's forward FLOPs (2·multiply-adds).
    """

    kind: str
    name: str
    op: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    call: Callable
    op_extras: Tuple[str, ...]
    reference: Callable
    tensorflow: Callable
    torch: Callable
    flops_factor: int = 1

    def flops(self, g) -> int:
        return self.flops_factor * g.flops


PASSES: Dict[Tuple[str, str], Pass] = {(p_.kind, p_.name): p_ for p_ in (
    Pass("conv", "forward", "conv2d", ("x", "w", "b"), ("y",), _conv_forward_call,
         ("variant", "geometry"),
         lambda a, g, act: (ref.conv2d_forward(a["x"], a["w"], a["b"], g, act),),
         _conv_forward_tf, _conv_forward_torch),
    Pass("conv", "backward-data", "conv2d_backward_data", ("dy", "w"), ("dx",),
         _conv_backward_data_call, ("geometry",),
         lambda a, g, act: (ref.conv2d_backward_data(a["dy"], a["w"], g),),
         _conv_backward_data_tf, _conv_backward_data_torch),
    Pass("conv", "backward-filter", "conv2d_backward_filter", ("x", "dy"), ("dw", "db"),
         _conv_backward_filter_call, ("geometry",),
         lambda a, g, act: tuple(ref.conv2d_backward_filter(a["x"], a["dy"], g)),
         _conv_backward_filter_tf, _conv_backward_filter_torch),
    Pass("dense", "forward", "dense", ("x", "w", "b"), ("y",), _dense_forward_call, (),
         lambda a, g, act: (ref.dense_forward(a["x"], a["w"], a["b"], act),),
         _dense_forward_tf, _dense_forward_torch),
    # dense backward is one op (dx, dw and db together): twice the forward's FLOPs
    Pass("dense", "backward", "dense_backward", ("x", "w", "dy", "y"), ("dx", "dw", "db"),
         _dense_backward_call, (),
         lambda a, g, act: tuple(ref.dense_backward(a["x"], a["w"], a["dy"], a["y"], act)),
         _dense_backward_tf, _dense_backward_torch, flops_factor=2),
)}

#: op name (``"conv2d"``, ``"dense_backward"``, ...) → its pass.
PASS_BY_OP: Dict[str, Pass] = {p_.op: p_ for p_ in PASSES.values()}

CONV_PASSES = tuple(name for kind, name in PASSES if kind == "conv")
DENSE_PASSES = tuple(name for kind, name in PASSES if kind == "dense")
ALL_PASSES = tuple(dict.fromkeys(name for _, name in PASSES))


def get(kind: str, name: str) -> Pass:
    try:
        return PASSES[(kind, name)]
    except KeyError:
        allowed = CONV_PASSES if kind == "conv" else DENSE_PASSES
        raise ValueError(f"pass must be one of {allowed} for a {kind} layer, got {name!r}") from None
