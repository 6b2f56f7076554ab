"""Index arithmetic for 2-D convolution and dense layers: the single source of truth.

Everything that needs an output size, a padding split or a parameter count asks this
module: the kernels (Numba and C++), the Keras layers, ``dlconv explain`` and the
benchmarks.  Nothing downstream re-derives a pad or a size.

The workshop's formula, for one spatial axis::

    W0 = (W1 - N + 2P) / S + 1

with input size W1, kernel size N, padding P on each side and stride S.  The general
form used here allows a different pad before and after, and a dilation D, which
spreads the kernel taps D apart so that the kernel covers an *effective* size::

    N_eff = (N - 1) * D + 1
    W0    = floor((W1 + P_before + P_after - N_eff) / S) + 1

Padding modes
-------------
``"valid"``   no padding.
``"same"``    TensorFlow's rule: ``W0 = ceil(W1 / S)``;
              ``P_total = max((W0 - 1) * S + N_eff - W1, 0)``;
              ``P_before = P_total // 2`` and the odd extra row/column goes
              *after* (bottom/right).
int ``p``     ``p`` on every side.
``(a, b)``    for 2-D: ``a`` rows top and bottom, ``b`` columns left and right.
``((t, b), (l, r))``  explicit, possibly asymmetric, pads per side.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence, Tuple, Union

__all__ = [
    "ConvGeometry",
    "DenseGeometry",
    "conv_output_size",
    "resolve_axis",
    "conv_geometry",
    "dense_geometry",
    "conv_param_count",
    "dense_param_count",
    "normalize_pair",
    "normalize_padding",
    "effective_kernel_size",
    "TransposedGeometry",
    "transposed_axis",
    "transposed_geometry",
    "transposed_phases",
    "conv_transpose_axis",
    "conv_transpose_output_size",
    "conv_transpose_geometry",
    "pool_geometry",
]

PaddingSpec = Union[str, int, Sequence]

#: Largest value a signed 32-bit flat index can hold.  Kernels index with 64-bit
#: integers; the geometry reports whether a tensor would overflow int32 so that
#: a backend that cannot cope refuses clearly.
INT32_MAX = 2**31 - 1

#: Largest value of any size, stride, dilation or pad: the bound the C++ side checks every
#: field of the record against (``MAX_FIELD`` in csrc/bind_common.h).  Anything larger is a
#: mistake (a 2**40 pad would ask for a 144 TiB output) and is refused by name here.
MAX_FIELD = 2**31


# ----------------------------------------------------------------------------- helpers
def _check_int(name: str, value, minimum: int, maximum: int = MAX_FIELD) -> int:
    """Return ``value`` as a Python int, or raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # Accept integral floats such as 3.0?  No: a float kernel size is a bug upstream.
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def normalize_pair(name: str, value, minimum: int = 1) -> Tuple[int, int]:
    """An int or a pair of ints → (height, width), each checked to be >= ``minimum``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
        return (_check_int(f"{name}[0] (height)", value[0], minimum),
                _check_int(f"{name}[1] (width)", value[1], minimum))
    v = _check_int(name, value, minimum)
    return (v, v)


def effective_kernel_size(kernel_size: int, dilation: int = 1) -> int:
    """Extent covered by a dilated kernel: ``(N - 1) * D + 1``."""
    return (kernel_size - 1) * dilation + 1


def normalize_padding(padding) -> Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Padding in any accepted form → ``"valid"``, ``"same"`` or ``((top, bottom), (left, right))``.

    Also accepts TensorFlow's explicit form ``[[0, 0], [t, b], [l, r], [0, 0]]`` (NHWC).
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid', 'same', an int or explicit pads, got {padding!r}")
        return mode
    if isinstance(padding, (list, tuple)):
        items = list(padding)
        if len(items) == 4 and all(isinstance(p, (list, tuple)) for p in items):
            # TensorFlow explicit NHWC form; batch and channel pads must be zero.
            if any(len(p) != 2 for p in items):
                raise ValueError(f"padding in TensorFlow's 4x2 form needs 4 pairs, got {padding!r}")
            if tuple(items[0]) != (0, 0) or tuple(items[3]) != (0, 0):
                raise ValueError(f"padding: batch and channel pads must be (0, 0), got {padding!r}")
            items = items[1:3]
        if len(items) == 2 and any(isinstance(p, (list, tuple)) for p in items):
            for axis, p in zip(("height", "width"), items):
                if not isinstance(p, (list, tuple)) or len(p) != 2:
                    raise ValueError(f"padding for the {axis} must be a pair (before, after) in "
                                     f"((top, bottom), (left, right)), got {p!r} in {padding!r}")
            (t, b), (l, r) = items  # noqa: E741
            return ((_check_int("padding top", t, 0), _check_int("padding bottom", b, 0)),
                    (_check_int("padding left", l, 0), _check_int("padding right", r, 0)))
        if len(items) == 2:
            ph = _check_int("padding[0] (height)", items[0], 0)
            pw = _check_int("padding[1] (width)", items[1], 0)
            return ((ph, ph), (pw, pw))
        raise ValueError(
            "padding must be 'valid', 'same', an int, (pad_h, pad_w), "
            f"((top, bottom), (left, right)) or TensorFlow's 4x2 form, got {padding!r}")
    p = _check_int("padding", padding, 0)
    return ((p, p), (p, p))


def resolve_axis(in_size: int, kernel_size: int, stride: int, dilation: int,
                 padding, axis: str = "") -> Tuple[int, int, int]:
    """Resolve one spatial axis → ``(pad_before, pad_after, out_size)``.

    ``padding`` is ``"valid"``, ``"same"``, an int (both sides) or a (before, after) pair.
    Raises ValueError for impossible geometry, naming the parameter and the numbers.
    """
    sfx = f" ({axis})" if axis else ""
    in_size = _check_int("input size" + sfx, in_size, 1)
    kernel_size = _check_int("kernel_size" + sfx, kernel_size, 1)
    stride = _check_int("stride" + sfx, stride, 1)
    dilation = _check_int("dilation" + sfx, dilation, 1)
    k_eff = effective_kernel_size(kernel_size, dilation)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            before = after = 0
        elif mode == "same":
            out = -(-in_size // stride)  # ceil(in / stride)
            total = max((out - 1) * stride + k_eff - in_size, 0)
            before = total // 2
            after = total - before
        else:
            raise ValueError(f"padding must be 'valid' or 'same' (or explicit pads), got {padding!r}")
    elif isinstance(padding, (list, tuple)):
        if len(padding) != 2:
            raise ValueError(f"padding{sfx} must be (before, after), got {padding!r}")
        before = _check_int("padding before" + sfx, padding[0], 0)
        after = _check_int("padding after" + sfx, padding[1], 0)
    else:
        before = after = _check_int("padding" + sfx, padding, 0)
    padded = in_size + before + after
    if k_eff > padded:
        what = f"kernel_size{sfx}={kernel_size}"
        if dilation > 1:
            what += f" with dilation {dilation} (effective size {k_eff})"
        raise ValueError(
            f"{what} is larger than the padded input{sfx}: {in_size} + {before} + {after} = {padded}")
    out = (padded - k_eff) // stride + 1
    return before, after, out


def conv_output_size(in_size: int, kernel_size: int, stride: int = 1, padding=0,
                     dilation: int = 1) -> int:
    """Output size along one axis: ``floor((W1 + P_before + P_after - N_eff) / S) + 1``.

    ``padding``: ``"valid"``, ``"same"`` (TensorFlow's rule), an int (each side) or a
    ``(before, after)`` pair.

    >>> conv_output_size(28, 3)            # MNIST conv1
    26
    >>> conv_output_size(5, 3, stride=2, padding=1)
    3
    >>> conv_output_size(7, 3, stride=2, padding="same")
    4
    """
    return resolve_axis(in_size, kernel_size, stride, dilation, padding)[2]


# ----------------------------------------------------------------------------- records
#: Smallest legal value of each ConvGeometry field (1 for those not listed).
_FIELD_MIN = {"batch": 0, "pad_top": 0, "pad_bottom": 0, "pad_left": 0, "pad_right": 0}
#: Field tuples already validated (all Python ints), so a rebuilt record skips the checks;
#: bounded (cleared when full: a model has a handful of geometries, a fuzz run thousands).
_VALIDATED: set = set()
_VALIDATED_MAX = 4096
_INT_ONLY = {int}

@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The resolved geometry of one 2-D convolution (NHWC activations, HWIO weights).

    Every kernel launcher receives this record; its fields are plain ints so that the
    C++ side can copy them into a struct of the same name and order
    (see ``csrc/geometry.h``).
    """

    batch: int
    in_h: int
    in_w: int
    in_c: int
    filters: int
    k_h: int
    k_w: int
    stride_h: int
    stride_w: int
    dil_h: int
    dil_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_h: int
    out_w: int
    #: Grouped convolution: G groups of in_c/G input channels and filters/G filters each; filter
    #: k reads input channels [(k // (filters/G))·(in_c/G), +in_c/G).  1 = ordinary, in_c = depthwise.
    groups: int = 1

    # Field order shared with C++ (csrc/geometry.h) and Numba launchers.
    FIELDS = ("batch", "in_h", "in_w", "in_c", "filters", "k_h", "k_w", "stride_h", "stride_w",
              "dil_h", "dil_w", "pad_top", "pad_bottom", "pad_left", "pad_right", "out_h", "out_w",
              "groups")

    def __post_init__(self):
        """The one validation of a record, at construction (the record is immutable, so a
        ConvGeometry that exists is valid): every backend may trust it.  Integral NumPy
        scalars become ints; anything else, a value out of range or output sizes that do not
        follow from the other fields raise ValueError naming the field and the values.
        A record already validated (same 18 ints) is recognised in one set lookup: the op API
        builds one per call, and the full check costs several microseconds."""
        vals = tuple(self.__dict__.values())            # the 18 fields, in FIELDS order
        if vals in _VALIDATED and set(map(type, vals)) == _INT_ONLY:
            return
        for name in self.FIELDS:
            v = getattr(self, name)
            if type(v) is not int:
                if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                    raise ValueError(f"geometry field {name} must be an integer, got {v!r} "
                                     f"({type(v).__name__})")
                v = int(v)
                object.__setattr__(self, name, v)
            low = _FIELD_MIN.get(name, 1)
            if v < low or v > MAX_FIELD:
                raise ValueError(f"geometry field {name} must be in {low}..{MAX_FIELD}, got {v}")
        for axis, n, k, s, d, before, after, out in (
                ("h", self.in_h, self.k_h, self.stride_h, self.dil_h, self.pad_top, self.pad_bottom, self.out_h),
                ("w", self.in_w, self.k_w, self.stride_w, self.dil_w, self.pad_left, self.pad_right, self.out_w)):
            k_eff = (k - 1) * d + 1
            padded = n + before + after
            if k_eff > padded:
                raise ValueError(f"geometry: k_{axis}={k} with dil_{axis}={d} (effective size {k_eff}) is "
                                 f"larger than the padded input {n} + {before} + {after} = {padded}")
            if out != (padded - k_eff) // s + 1:
                raise ValueError(f"geometry field out_{axis} = {out} does not follow from the other fields: "
                                 f"in_{axis}={n}, pads {before} + {after}, k_{axis}={k}, "
                                 f"stride_{axis}={s}, dil_{axis}={d} give {(padded - k_eff) // s + 1}")
        if self.in_c % self.groups or self.filters % self.groups:
            raise ValueError(f"geometry: groups={self.groups} must divide both in_c={self.in_c} and "
                             f"filters={self.filters}")
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED.add(self.as_tuple())

    def as_tuple(self) -> Tuple[int, ...]:
        """All fields as a tuple of ints in :attr:`FIELDS` order."""
        return tuple(getattr(self, f) for f in self.FIELDS)

    @property
    def x_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.in_h, self.in_w, self.in_c)

    @property
    def w_shape(self) -> Tuple[int, int, int, int]:
        """HWIO, I = in_c / groups (the stock Keras shape of a grouped kernel)."""
        return (self.k_h, self.k_w, self.group_in_c, self.filters)

    @property
    def group_in_c(self) -> int:
        """Input channels one filter reads: ``in_c / groups``."""
        return self.in_c // self.groups

    @property
    def group_filters(self) -> int:
        """Filters of one group: ``filters / groups``."""
        return self.filters // self.groups

    @property
    def y_shape(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.filters)

    @property
    def k_h_eff(self) -> int:
        return effective_kernel_size(self.k_h, self.dil_h)

    @property
    def k_w_eff(self) -> int:
        return effective_kernel_size(self.k_w, self.dil_w)

    @property
    def gemm_k(self) -> int:
        """Reduction length of the implicit GEMM: ``k_h * k_w * in_c / groups``."""
        return self.k_h * self.k_w * self.group_in_c

    @property
    def gemm_m(self) -> int:
        """Rows of the implicit GEMM: one per output pixel, ``batch * out_h * out_w``."""
        return self.batch * self.out_h * self.out_w

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 FLOPs, for one pass (forward, backward-data or -filter)."""
        return 2 * self.gemm_m * self.gemm_k * self.filters

    @property
    def weight_count(self) -> int:
        return conv_param_count((self.k_h, self.k_w), self.in_c, self.filters, use_bias=False,
                                groups=self.groups)

    @property
    def bias_count(self) -> int:
        return self.filters

    @property
    def fits_int32(self) -> bool:
        """True when every tensor's flat index fits a signed 32-bit int."""
        return max(math.prod(self.x_shape), math.prod(self.y_shape),
                   math.prod(self.w_shape)) <= INT32_MAX

    def with_batch(self, batch: int) -> "ConvGeometry":
        return dataclasses.replace(self, batch=_check_int("batch", batch, 0))


# (what a rank error lists, the name of each dimension in a size error, each one's minimum)
# for _rank4: activations NHWC (a batch of 0 is allowed), conv weights HWIO, and Keras'
# Conv2DTranspose kernel (k_h, k_w, filters, in_channels).
_X_AXES = ("batch, height, width, channels", ("batch size", "height", "width", "channels"), (0, 1, 1, 1))
_CONV_W_AXES = ("kernel_h, kernel_w, in_channels, filters",
                ("kernel height", "kernel width", "in_channels", "filters"), (1, 1, 1, 1))
_TRANSPOSE_W_AXES = ("kernel_h, kernel_w, filters, in_channels",
                     ("height", "width", "filters", "in_channels"), (1, 1, 1, 1))


def _rank4(name: str, shape, axes: str, labels, minimums):
    """``(shape as a tuple, its four sizes checked)``; ValueError naming ``name`` and the shape
    when the rank is not 4, or naming the dimension (``"{name} {label}"``) and its value."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have rank 4 ({axes}), got shape {shape}")
    return shape, tuple(_check_int(f"{name} {label}", v, m) for label, v, m in zip(labels, shape, minimums))


def conv_geometry(x_shape: Sequence[int], w_shape: Sequence[int], strides=1, padding="valid",
                  dilation=1, groups=1) -> ConvGeometry:
    """Resolve the geometry of ``conv2d(x, w)`` from shapes ``x: NHWC`` and ``w: HWIO``.

    ``groups=G``: w is ``(kh, kw, C/G, F)`` (stock Keras' grouped kernel), C and F divisible by G.

    Raises ValueError naming the parameter and numbers for impossible geometry or a
    channel mismatch.  A batch of 0 is allowed (the result is empty).
    """
    x_shape, (batch, in_h, in_w, in_c) = _rank4("x", x_shape, *_X_AXES)
    w_shape, (k_h, k_w, w_c, filters) = _rank4("w", w_shape, *_CONV_W_AXES)
    groups = _check_int("groups", groups, 1)
    if in_c % groups:
        raise ValueError(f"groups={groups} must divide the input channels: x has {in_c} (shape {x_shape})")
    if filters % groups:
        raise ValueError(f"groups={groups} must divide the filters: w has {filters} (shape {w_shape})")
    if w_c * groups != in_c:
        what = f"{w_c}" if groups == 1 else f"{w_c} per group x {groups} groups = {w_c * groups}"
        raise ValueError(f"channel mismatch: x has {in_c} channels (shape {x_shape}) but w expects "
                         f"{what} (shape {w_shape})")
    s_h, s_w = normalize_pair("strides", strides)
    d_h, d_w = normalize_pair("dilation", dilation)
    pad = normalize_padding(padding)
    if isinstance(pad, str):
        pad_h, pad_w = pad, pad
    else:
        pad_h, pad_w = pad
    pt, pb, oh = resolve_axis(in_h, k_h, s_h, d_h, pad_h, "height")
    pl, pr, ow = resolve_axis(in_w, k_w, s_w, d_w, pad_w, "width")
    return ConvGeometry(batch, in_h, in_w, in_c, filters, k_h, k_w, s_h, s_w, d_h, d_w,
                        pt, pb, pl, pr, oh, ow, groups)


@dataclasses.dataclass(frozen=True)
class DenseGeometry:
    """``y[batch, out] = x[batch, in] @ w[in, out] (+ b[out])``."""

    batch: int
    in_features: int
    out_features: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.in_features * self.out_features

    @property
    def x_shape(self):
        return (self.batch, self.in_features)

    @property
    def w_shape(self):
        return (self.in_features, self.out_features)

    @property
    def y_shape(self):
        return (self.batch, self.out_features)


def dense_geometry(x_shape: Sequence[int], w_shape: Sequence[int]) -> DenseGeometry:
    """Resolve ``dense(x, w)`` from ``x: (batch, in)`` and ``w: (in, out)``."""
    x_shape = tuple(x_shape)
    w_shape = tuple(w_shape)
    if len(x_shape) != 2:
        raise ValueError(f"x must have rank 2 (batch, in_features), got shape {x_shape}")
    if len(w_shape) != 2:
        raise ValueError(f"w must have rank 2 (in_features, out_features), got shape {w_shape}")
    batch = _check_int("x batch size", x_shape[0], 0)
    n_in = _check_int("x in_features", x_shape[1], 1)
    w_in = _check_int("w in_features", w_shape[0], 1)
    n_out = _check_int("w out_features", w_shape[1], 1)
    if n_in != w_in:
        raise ValueError(f"feature mismatch: x has {n_in} features (shape {x_shape}) but w expects "
                         f"{w_in} (shape {w_shape})")
    return DenseGeometry(batch, n_in, n_out)


# ----------------------------------------------------------------------------- backward-data
# Backward-data as forward convolutions (the one formula; csrc/geometry.h mirrors it as
# transposed_axis / transposed_geometry and tests/test_cpu_conv_stride.py checks both agree).
#
#   dx[ih] = sum over taps kh of dz[oh] * w[kh],   oh = (ih + pad_before - kh*d) / s  when exact.
#
# Split the dx rows by phase r = ih mod s ("sub-pixel" decomposition): for ih = r + s*q the taps
# that hit are those with (r + pad_before - kh*d) divisible by s, an arithmetic progression
# kh = kh0, kh0 + s', ... (s' = s / gcd(s, d)), and for them oh = q + off(kh),
# off(kh) = (r + pad_before - kh*d) / s, which falls by d' = d / gcd(s, d) from one hitting tap
# to the next.  With the hitting taps in reverse order (j = 0 is the last one, kh_last) that is
#   dx[r + s*q] = sum_j dz[q - pad' + j*d'] * w[kh_last - j*s'],   pad' = -off(kh_last):
# a stride-1 forward convolution of dz with `taps` taps, dilation d', pad before pad' and pad
# after chosen so that it has exactly the phase's rows q = 0 .. ceil((n - r) / s) - 1.  Pads may
# be negative (the convolution crops dz).  Stride 1 has one phase, every tap, and
# pad' = (k - 1)*d - pad_before: the classic "full correlation with the flipped filter".
def transposed_axis(n: int, out: int, k: int, s: int, d: int, pad_before: int, phase: int):
    """One spatial axis of :func:`transposed_geometry` → ``(taps, tap_last, tap_step, dil,
    pad_before, pad_after, rows)``: ``taps`` kernel taps hit the dx rows ``phase::s`` (0: none
    do, those rows are zero), the j-th tap of the stride-1 convolution is ``tap_last -
    j*tap_step``, with dilation ``dil`` and the two pads (either may be negative), producing
    ``rows`` dx rows (``ceil((n - phase) / s)``, 0 when ``phase >= n``).  ``n``/``out`` are
    the input / output sizes of the forward convolution on this axis."""
    if not 0 <= phase < s:
        raise ValueError(f"phase must be in 0..{s - 1} (stride {s}), got {phase}")
    g = math.gcd(s, d)
    step, dil = s // g, d // g
    rows = max(0, (n - phase + s - 1) // s)
    kh0 = next((kh for kh in range(min(k, step)) if (phase + pad_before - kh * d) % s == 0), None)
    if kh0 is None:
        return 0, 0, step, 1, 0, 0, rows
    taps = (k - 1 - kh0) // step + 1
    last = kh0 + (taps - 1) * step
    if taps == 1:
        dil = 1
    before = -((phase + pad_before - last * d) // s)
    after = rows + (taps - 1) * dil - out - before
    return taps, last, step, dil, before, after, rows


@dataclasses.dataclass(frozen=True)
class TransposedGeometry:
    """Backward-data of a convolution ``g``, phase ``(phase_h, phase_w)``, as a stride-1 forward
    convolution of dz (``batch x g.out_h x g.out_w x g.filters``) into the dx pixels
    ``[:, phase_h::stride_h, phase_w::stride_w, :]`` with the sub-filter
    ``wf[j, i, k, c] = w[tap_last_h - j*tap_step_h, tap_last_w - i*tap_step_w, c, k]``.
    ``taps_h`` / ``taps_w`` == 0: no tap reaches the phase (its dx is zero).  The pads may be
    negative, so this is not a :class:`ConvGeometry` (which forbids them); :meth:`as_tuple` gives
    the 17 fields in ``ConvGeometry.FIELDS`` order, as ``csrc/geometry.h`` computes them."""

    phase_h: int
    phase_w: int
    batch: int
    in_h: int
    in_w: int
    in_c: int
    filters: int
    taps_h: int
    taps_w: int
    dil_h: int
    dil_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_h: int
    out_w: int
    tap_last_h: int
    tap_last_w: int
    tap_step_h: int
    tap_step_w: int

    def as_tuple(self) -> Tuple[int, ...]:
        return (self.batch, self.in_h, self.in_w, self.in_c, self.filters, self.taps_h, self.taps_w,
                1, 1, self.dil_h, self.dil_w, self.pad_top, self.pad_bottom, self.pad_left,
                self.pad_right, self.out_h, self.out_w)

    @property
    def empty(self) -> bool:
        """No tap reaches the phase, or the phase has no dx pixel."""
        return self.taps_h == 0 or self.taps_w == 0 or self.out_h == 0 or self.out_w == 0


def transposed_geometry(g: ConvGeometry, phase_h: int = 0, phase_w: int = 0) -> TransposedGeometry:
    """The backward-data-as-forward geometry of ``g`` for one sub-pixel phase (stride 1: the only
    phase (0, 0), every tap, pads ``(k - 1)*dil - pad``).  See :func:`transposed_axis`."""
    th, lh, sh, dh, pt, pb, qh = transposed_axis(g.in_h, g.out_h, g.k_h, g.stride_h, g.dil_h,
                                                 g.pad_top, phase_h)
    tw, lw, sw, dw, pl, pr, qw = transposed_axis(g.in_w, g.out_w, g.k_w, g.stride_w, g.dil_w,
                                                 g.pad_left, phase_w)
    return TransposedGeometry(phase_h, phase_w, g.batch, g.out_h, g.out_w, g.filters, g.in_c,
                              th, tw, dh, dw, pt, pb, pl, pr, qh, qw, lh, lw, sh, sw)


def transposed_phases(g: ConvGeometry):
    """Every phase of ``g``'s backward-data (``stride_h * stride_w`` of them), row-major."""
    return [transposed_geometry(g, r, c) for r in range(g.stride_h) for c in range(g.stride_w)]


# ----------------------------------------------------------------------------- counts
def conv_param_count(kernel_size, in_channels: int, filters: int, use_bias: bool = True,
                     groups: int = 1) -> int:
    """``N * N * (D1 / G) * K`` weights plus ``K`` biases (N may be a (height, width) pair;
    G = ``groups``, which must divide D1 and K: each filter reads D1 / G input channels).

    >>> conv_param_count(3, 32, 64, groups=4)      # 3*3*8*64 + 64
    4672
    >>> conv_param_count(3, 32, 32, groups=32)     # depthwise: 3*3*1*32 + 32
    320
    """
    k_h, k_w = normalize_pair("kernel_size", kernel_size)
    d1 = _check_int("in_channels", in_channels, 1)
    k = _check_int("filters", filters, 1)
    g = _check_int("groups", groups, 1)
    if d1 % g or k % g:
        raise ValueError(f"groups={g} must divide in_channels={d1} and filters={k}")
    return k_h * k_w * (d1 // g) * k + (k if use_bias else 0)


def dense_param_count(in_features: int, out_features: int, use_bias: bool = True) -> int:
    """``in * out`` weights plus ``out`` biases."""
    n_in = _check_int("in_features", in_features, 1)
    n_out = _check_int("out_features", out_features, 1)
    return n_in * n_out + (n_out if use_bias else 0)


# ----------------------------------------------------------------------------- transposed
def conv_transpose_axis(in_size: int, kernel_size: int, stride: int = 1, padding="valid",
                        output_padding=None, dilation: int = 1,
                        axis: str = "") -> Tuple[int, int, int]:
    """One axis of Keras' ``Conv2DTranspose`` → ``(pad_before, pad_after, out_size)`` of the
    *forward* convolution whose backward-data it is (the convolution from the transposed
    output, size ``out_size``, back to its input, size ``in_size``).

    Keras' output size, with ``N_eff = (N - 1)·D + 1``::

        "valid":  W0 = (W1 - 1)·S + N_eff + a,        a = output_padding (None: max(S - N_eff, 0))
        "same":   W0 = (W1 - 1)·S + N_eff mod 2 + a,  a = output_padding (None: S - N_eff mod 2,
                                                      so W0 = W1·S)

    The transposed convolution is the direct convolution of the input with zeros inserted
    between its elements (S - 1 of them), padded by ``(L, R)`` (Keras'
    ``_convert_conv_transpose_padding_args_from_keras_to_jax``, the rule every Keras backend
    follows), with the kernel flipped.  Seen as the forward convolution from the output, its
    pads are ``N_eff - 1 - L`` before and ``N_eff - 1 - R`` after: the last ``a`` (< S) output
    rows of a negative pad after lie past the last window (zeros in backward-data), so the
    forward pad after is clamped at 0.  Raises ValueError naming the parameter for an
    ``output_padding`` not below the stride, or a geometry with no output.
    """
    sfx = f" ({axis})" if axis else ""
    in_size = _check_int("input size" + sfx, in_size, 1)
    kernel_size = _check_int("kernel_size" + sfx, kernel_size, 1)
    stride = _check_int("stride" + sfx, stride, 1)
    dilation = _check_int("dilation" + sfx, dilation, 1)
    if output_padding is not None:
        output_padding = _check_int("output_padding" + sfx, output_padding, 0)
        if output_padding >= stride:
            raise ValueError(f"output_padding{sfx}={output_padding} must be smaller than the stride "
                             f"{stride} (a larger one would add a whole window of zeros)")
    mode = padding.lower() if isinstance(padding, str) else padding
    if mode not in ("valid", "same"):
        raise ValueError(f"padding for a transposed convolution must be 'valid' or 'same' (Keras' "
                         f"Conv2DTranspose), got {padding!r}")
    k_eff = effective_kernel_size(kernel_size, dilation)
    if mode == "valid":
        extra = max(k_eff, stride) - k_eff if output_padding is None else output_padding
        left, right = k_eff - 1, k_eff - 1 + extra
    else:
        pad_len = stride + k_eff - 2 if output_padding is None else k_eff + k_eff % 2 - 2 + output_padding
        left = min(pad_len // 2 + pad_len % 2, k_eff - 1)
        right = pad_len - left
    out = (in_size - 1) * stride + left + right - k_eff + 2
    if out < 1:
        raise ValueError(
            f"transposed convolution{sfx}: input size {in_size}, kernel_size {kernel_size}"
            + (f" (dilation {dilation}, effective {k_eff})" if dilation > 1 else "")
            + f", stride {stride}, padding {padding!r}, output_padding {output_padding} give an output "
              f"size of {out}; use output_padding >= 1 or padding='valid'")
    before, after = k_eff - 1 - left, max(k_eff - 1 - right, 0)
    return before, after, out


def conv_transpose_output_size(in_size: int, kernel_size: int, stride: int = 1, padding="valid",
                               output_padding=None, dilation: int = 1) -> int:
    """Keras' ``Conv2DTranspose`` output size along one axis (see :func:`conv_transpose_axis`).

    >>> conv_transpose_output_size(4, 3, stride=2, padding="same")
    8
    >>> conv_transpose_output_size(4, 3, stride=2, padding="valid", output_padding=1)
    10
    """
    return conv_transpose_axis(in_size, kernel_size, stride, padding, output_padding, dilation)[2]


def conv_transpose_geometry(x_shape: Sequence[int], w_shape: Sequence[int], strides=1,
                            padding="valid", output_padding=None, dilation=1) -> ConvGeometry:
    """The geometry of Keras' ``Conv2DTranspose`` of ``x: NHWC`` with a kernel of Keras'
    shape ``(k_h, k_w, filters, in_channels)``, as the FORWARD convolution it is the
    backward-data of: that record's input is the transposed output
    ``(batch, out_h, out_w, filters)``, its weights the kernel as it is (HWIO with
    I = filters, O = in_channels), its output the transposed input (``g.y_shape == x_shape``).

    So ``y = conv2d_backward_data(x, kernel, g.x_shape, geometry=g)``; the gradients are
    ``dL/dx = conv2d(dL/dy, kernel, geometry=g)`` and
    ``dL/dkernel = conv2d_backward_filter(dL/dy, x, geometry=g)``.
    ``output_padding``: None, an int or a pair; ``padding``: "valid" or "same".
    """
    x_shape, (batch, in_h, in_w, in_c) = _rank4("x", x_shape, *_X_AXES)
    w_shape, (k_h, k_w, filters, w_c) = _rank4("kernel", w_shape, *_TRANSPOSE_W_AXES)
    if w_c != in_c:
        raise ValueError(f"channel mismatch: x has {in_c} channels (shape {x_shape}) but the kernel "
                         f"expects {w_c} (shape {w_shape}: (k_h, k_w, filters, in_channels))")
    s_h, s_w = normalize_pair("strides", strides)
    d_h, d_w = normalize_pair("dilation", dilation)
    if output_padding is None:
        op_h = op_w = None
    else:
        op_h, op_w = normalize_pair("output_padding", output_padding, minimum=0)
    pt, pb, oh = conv_transpose_axis(in_h, k_h, s_h, padding, op_h, d_h, "height")
    pl, pr, ow = conv_transpose_axis(in_w, k_w, s_w, padding, op_w, d_w, "width")
    return ConvGeometry(batch, oh, ow, filters, in_c, k_h, k_w, s_h, s_w, d_h, d_w,
                        pt, pb, pl, pr, in_h, in_w)


# ----------------------------------------------------------------------------- pooling
def pool_geometry(x_shape: Sequence[int], pool_size=2, strides=None, padding="valid") -> ConvGeometry:
    """The geometry of a 2-D max pool of ``x: NHWC`` (Keras' ``MaxPooling2D``), as a
    :class:`ConvGeometry`: a pool is a depthwise window, so it is the record of a
    ``groups = C`` convolution with a ``pool_size`` kernel, ``filters = C`` and dilation 1
    (``w_shape`` is then ``(ph, pw, 1, C)``, never allocated).  The output size and the
    "same" split are the convolution's (:func:`resolve_axis`, TensorFlow's rule: the odd
    extra row/column after); padded positions are *not* window members (a max over the
    valid taps only), which is the kernels' business, not the record's.

    ``strides=None`` means ``pool_size`` (Keras' default).  ``padding``: "valid" or "same"
    (explicit pads are refused: neither Keras nor ``tf.nn.max_pool2d``'s NHWC CPU kernel
    defines them).  Raises ValueError naming the parameter and values.
    """
    x_shape = tuple(x_shape)
    if len(x_shape) != 4:
        raise ValueError(f"x must have rank 4 (batch, height, width, channels), got shape {x_shape}")
    if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same' for pooling, got {padding!r}")
    p_h, p_w = normalize_pair("pool_size", pool_size)
    s_h, s_w = normalize_pair("strides", (p_h, p_w) if strides is None else strides)
    channels = _check_int("x channels", x_shape[3], 1)
    try:
        return conv_geometry(x_shape, (p_h, p_w, 1, channels), (s_h, s_w), padding.lower(), 1, channels)
    except ValueError as exc:        # name the pool, not a kernel
        raise ValueError(str(exc).replace("kernel_size", "pool_size").replace("w kernel", "pool")) from None
