"""Helpers shared by the Numba CPU kernels: the fused activation, its derivative, and a
fixed-size stack buffer for register-blocked accumulators.

Activation codes are those of :mod:`dlconv.activations` (linear 0, relu 1, sigmoid 2,
tanh 3).  Every function here is ``inline="always"`` so that the activation switch is
resolved inside the caller's loop and costs one predictable branch per element.

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
from numba.extending import intrinsic

__all__ = ["activate", "derivative_from_output", "MICRO_MR", "MICRO_NR", "stack_micro_tile",
           "FASTMATH"]

#: ``contract`` only: lets LLVM fuse ``acc + a*b`` into one FMA (one rounding instead of
#: two, so never less accurate).  No reassociation, no finite-math or NaN assumptions:
#: results do not depend on vector width and NaN/inf propagate as in IEEE arithmetic.
FASTMATH = {"contract"}

#: Micro-tile of the implicit-GEMM CPU kernel: MICRO_MR output pixels x MICRO_NR filters.
#: 3 x 64 float32 = 24 AVX (8-lane) accumulators + 8 weight vectors = the 32 vector
#: registers of AVX-512VL; measured on the MNIST conv2 shape, MR in {2, 4, 5} and
#: NR in {16, 32, 128} made LLVM spill or gather (2-8x slower).
MICRO_MR = 3
MICRO_NR = 64


@njit(inline="always")
def activate(z, act):
    """act(z) for one float32 element; ``act`` is an activation code."""
    if act == 1:
        return z if z > 0 else np.float32(0.0)
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


@intrinsic
def stack_micro_tile(typingctx):
    """A float32 buffer of MICRO_MR * MICRO_NR elements on the stack (an LLVM ``alloca``).

    Indexed only with compile-time-constant offsets inside fully unrolled loops, LLVM
    promotes it to vector registers; a heap array (np.empty) could never be promoted.
    """
    def codegen(context, builder, signature, args):
        n = ir.Constant(ir.IntType(64), MICRO_MR * MICRO_NR)
        return cgutils.alloca_once(builder, ir.FloatType(), size=n)
    return types.CPointer(types.float32)(), codegen
