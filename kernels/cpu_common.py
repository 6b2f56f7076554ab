"""Helpers shared by the Numba CPU kernels: the fused activation, its derivative, and
explicit 16-lane float32 vectors (``f32x16``) with a fixed-size stack tile of them for
register-blocked accumulators.

Activation codes are those of :mod:`dlconv.activations` (linear 0, relu 1, sigmoid 2,
tanh 3).  Every function here is ``inline="always"`` (or an intrinsic, expanded in place) so
that the activation switch is resolved inside the caller's loop and costs one predictable
branch per element.

Why explicit vectors: LLVM's auto-vectorizers honour the CPU's ``prefer-vector-width``,
which is 256 bits for every AVX-512 core LLVM knows (Skylake-X .. Sapphire Rapids), so scalar
loops are vectorized into 8-lane ymm code at half the FMA throughput of zmm.  An explicit
``<16 x float>`` value is not subject to that preference: on AVX-512 it lives in one zmm
register; without AVX-512 LLVM splits it into narrower registers (correct, slower).

Integers: Numba's ints are 64-bit, so every flat index in the kernels is int64 and no
tensor size overflows (see :attr:`dlconv.shapes.ConvGeometry.fits_int32`, which only
matters to 32-bit-indexing backends).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["activate", "derivative_from_output", "MICRO_MR", "MICRO_NR", "MICRO_NV", "LANES",
           "stack_micro_tile", "f32x16", "vzero", "vload", "vstore", "vbroadcast", "vfma",
           "vbias_act", "FASTMATH"]

#: ``contract`` only: lets LLVM fuse ``acc + a*b`` into one FMA (one rounding instead of
#: two, so never less accurate).  No reassociation, no finite-math or NaN assumptions:
#: results do not depend on vector width and NaN/inf propagate as in IEEE arithmetic.
FASTMATH = {"contract"}

#: Lanes of one f32x16 vector: 16 float32 = 64 bytes = one zmm register, one cache line.
LANES = 16

#: Micro-tile of the implicit-GEMM CPU kernel: MICRO_MR output pixels x MICRO_NR filters,
#: held as MICRO_MR * MICRO_NV f32x16 accumulators.  6 x 64 float32 = 24 zmm accumulators
#: + 4 weight vectors + 1 broadcast pixel value = 29 of the 32 zmm registers (no spills);
#: per input channel 24 FMAs against 4 vector loads + 6 broadcasts, so the two FMA ports,
#: not the load ports, bound it.  MR = 6 also divides the MNIST output widths (24, 12).
MICRO_MR = 6
MICRO_NR = 64
MICRO_NV = MICRO_NR // LANES


@njit(inline="always")
def activate(z, act):
    """act(z) for one float32 element; ``act`` is an activation code."""
    if act == 1:
        return np.float32(0.0) if z < 0 else z   # NaN stays NaN, as TensorFlow's relu
    if act == 2:
        return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-z)))
    if act == 3:
        return np.float32(math.tanh(z))
    return z


@njit(inline="always")
def derivative_from_output(y, act):
    """d act / dz written in terms of the output y = act(z) (relu: y > 0)."""
    if act == 1:
        return np.float32(1.0) if y > 0 else np.float32(0.0)
    if act == 2:
        return y * (np.float32(1.0) - y)
    if act == 3:
        return np.float32(1.0) - y * y
    return np.float32(1.0)


# ----------------------------------------------------------------------------- f32x16
_V16 = ir.VectorType(ir.FloatType(), LANES)


class F32x16(types.Type):
    """Numba type of an LLVM ``<16 x float>`` value (one zmm register on AVX-512)."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


def _flat_f32(arr) -> bool:
    return (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1
            and arr.layout == "C")


def _elem_ptr(context, builder, arr_ty, arr, idx):
    """&arr[idx] with no bounds check and no negative-index wrap (the caller guarantees
    0 <= idx and idx + the access width <= arr.size)."""
    data = context.make_array(arr_ty)(context, builder, arr).data
    return builder.gep(data, [idx])


def _splat(builder, scalar):
    undef = ir.Constant(_V16, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef,
                                  ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


@intrinsic
def vzero(typingctx):
    """An f32x16 of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16, [0.0] * LANES)
    return f32x16(), codegen


@intrinsic
def vload(typingctx, arr, idx):
    """arr[idx:idx + LANES] as an f32x16 (arr: flat C-contiguous float32; unchecked)."""
    if not (_flat_f32(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, _V16.as_pointer()), align=4)
    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """arr[idx:idx + LANES] = v (arr: flat C-contiguous float32; unchecked)."""
    if not (_flat_f32(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _V16.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(arr, idx, v), codegen


@intrinsic
def vbroadcast(typingctx, arr, idx):
    """arr[idx] in all LANES lanes (one ``vbroadcastss`` from memory; unchecked)."""
    if not (_flat_f32(arr) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(p, align=4))
    return f32x16(arr, idx), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c lane by lane, one rounding (``llvm.fma``: what ``contract`` would emit)."""
    if not (a == f32x16 and b == f32x16 and c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3),
                                            "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32x16(a, b, c), codegen


@intrinsic
def vbias_act(typingctx, z, bias, act):
    """act(z + bias) lane by lane for act linear (0) or relu (1) only; the caller sends the
    other activations through the scalar :func:`activate`.  relu keeps NaN like
    ``activate`` and TensorFlow (an ordered ``z < 0`` compare selects 0, so NaN selects z)."""
    if not (z == f32x16 and bias == f32x16 and isinstance(act, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = builder.fadd(args[0], args[1])
        zero = ir.Constant(_V16, [0.0] * LANES)
        relu = builder.select(builder.fcmp_ordered("<", s, zero), zero, s)
        is_relu = builder.icmp_signed("==", args[2], ir.Constant(args[2].type, 1))
        return builder.select(is_relu, relu, s)
    return f32x16(z, bias, act), codegen


@intrinsic
def stack_micro_tile(typingctx):
    """MICRO_MR * MICRO_NV f32x16 accumulators on the stack (an LLVM ``alloca``).

    Indexed only with compile-time-constant offsets inside fully unrolled loops, LLVM
    promotes it to vector registers; a heap array (np.empty) could never be promoted.
    """
    def codegen(context, builder, signature, args):
        n = ir.Constant(ir.IntType(64), MICRO_MR * MICRO_NV)
        return cgutils.alloca_once(builder, _V16, size=n)
    return types.CPointer(f32x16)(), codegen
