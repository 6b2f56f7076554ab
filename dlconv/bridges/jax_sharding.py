"""A batch-sharding rule for the JAX bridge's XLA FFI custom calls.

XLA knows nothing about a custom call: given a batch-sharded input, its SPMD partitioner
all-gathers the input and runs the *whole* call on every device (the result replicated), so a
data-parallel ``jax.jit`` step through dlconv would do N devices' worth of work N times.  Each
conv custom call is therefore wrapped in ``jax.experimental.custom_partitioning`` with the rule
"the batch axis may be sharded, nothing else": every device runs the kernel on its own rows
(the geometry record re-made for the local batch), the weights stay replicated, and the
weight and bias gradients — sums over the batch — are ``psum``-med over the batch's mesh
axes.  Under Shardy the rule is an einsum-like string (``b`` the batch factor, every other
dimension a factor of its own, so nothing but the batch is ever sharded).

The dense calls get the same rule (rows sharded, weight and bias gradients psum-med).

When it applies: the call is traced under a mesh (``jax.set_mesh(mesh)`` or
``jax.sharding.use_mesh``: JAX's way of saying the program runs on a mesh) and not under
``jax.vmap`` (``custom_partitioning`` has no batching rule; ``vmap`` of a ``jit`` that holds
dlconv calls under a mesh is therefore not supported).  Otherwise the plain custom call is
used, which XLA treats as replicated (above).  A batch that does not divide evenly over the
mesh axes is computed replicated.  Keras' ``DataParallel`` ``fit`` gets the rule when run
under its mesh: ``with jax.set_mesh(distribution.device_mesh.backend_mesh): model.fit(...)``.
"""

from __future__ import annotations

import collections
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["wanted", "batch_partitioned", "conv_parts", "dense_parts", "PARTITIONED"]

#: How many times XLA partitioned each kind of call with the rule, and over how many shards
#: (name -> Counter of shard counts): what tests and curious users read to see it applied.
PARTITIONED = collections.defaultdict(collections.Counter)

#: Factor names of the Shardy rule for the non-batch dimensions (each used once per rule).
_FACTORS = "cdefghijklmnopqrstuvwxyz"


def wanted(*arrays) -> bool:
    """Whether a call on these (traced) arrays gets the rule: under a mesh, not under vmap."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    # vmap's tracer class is not public API in JAX 0.10 (jax.interpreters.batching dropped it)
    return not any(type(a).__name__ == "BatchTracer" for a in arrays if a is not None)


def _rule(ranks_in, batched_in, ranks_out, batched_out) -> str:
    letters = iter(_FACTORS)

    def dims(rank, batched):
        return " ".join((["b"] if batched else [next(letters)]) + [next(letters) for _ in range(rank - 1)])

    ins = ", ".join(dims(r, b) for r, b in zip(ranks_in, batched_in))
    outs = ", ".join(dims(r, b) for r, b in zip(ranks_out, batched_out))
    return f"{ins} -> {outs}"


def batch_partitioned(name, make, ranks_in, batched_in, ranks_out, batched_out):
    """``call(*arrays) -> tuple`` running ``make(batch)(*arrays)`` per batch shard.

    ``make(n)`` returns the function computing the outputs for ``n`` rows.  ``batched_in`` /
    ``batched_out``: which arrays carry the batch on axis 0; outputs without it are sums over
    the batch (psum-med across the shards).
    """
    first = batched_in.index(True)

    @custom_partitioning
    def call(*arrays):
        return make(arrays[first].shape[0])(*arrays)

    def layout(mesh, arg_shapes):
        spec = arg_shapes[first].sharding.spec
        axes = spec[0] if len(spec) else None
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = math.prod(mesh.shape[a] for a in names) if names else 1
        n = arg_shapes[first].shape[0]
        if size == 1 or n % size:
            return None, n
        return axes, n // size

    def sharding(mesh, axes, rank, batched):
        if batched and axes is not None:
            return NamedSharding(mesh, PartitionSpec(axes, *([None] * (rank - 1))))
        return NamedSharding(mesh, PartitionSpec())

    def infer(mesh, arg_shapes, result_shape):
        axes, _ = layout(mesh, arg_shapes)
        return tuple(sharding(mesh, axes, r, b) for r, b in zip(ranks_out, batched_out))

    def partition(mesh, arg_shapes, result_shape):
        axes, local = layout(mesh, arg_shapes)
        PARTITIONED[name][arg_shapes[first].shape[0] // local if local else 1] += 1
        fn = make(local)

        def lower(*arrays):
            outs = fn(*arrays)
            return tuple(o if b or axes is None else jax.lax.psum(o, axes) for o, b in zip(outs, batched_out))

        return (mesh, lower, tuple(sharding(mesh, axes, r, b) for r, b in zip(ranks_out, batched_out)),
                tuple(sharding(mesh, axes, r, b) for r, b in zip(ranks_in, batched_in)))

    call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                       sharding_rule=_rule(ranks_in, batched_in, ranks_out, batched_out))
    return call


def conv_parts(local_parts, has_bias: bool, fused: bool, act: str):
    """The conv op's four FFI functions (forward, act_backward, backward_data, backward_filter,
    as dlconv.bridges.jax._conv_op calls them) wrapped with the batch rule.

    ``local_parts(n)`` gives the unwrapped four for a batch of ``n`` rows.
    """
    nb = 1 if has_bias else 0
    fwd = batch_partitioned("conv2d_forward",
                            lambda n: lambda x, w, *b: (local_parts(n)[0](x, w, *b),),
                            [4, 4] + [1] * nb, [True, False] + [False] * nb, [4], [True])
    act_b = batch_partitioned("activation_backward",
                              lambda n: lambda dy, y: (local_parts(n)[1](dy, y),),
                              [4, 4], [True, True], [4], [True])
    nd = 2 if fused else 1                   # d = [dy, y] (fused derivative) or [dz]
    data = batch_partitioned("conv2d_backward_data",
                             lambda n: lambda w, *d: (local_parts(n)[2](list(d), w),),
                             [4] + [4] * nd, [False] + [True] * nd, [4], [True])
    filt = batch_partitioned("conv2d_backward_filter",
                             lambda n: lambda x, *d: tuple(local_parts(n)[3](x, list(d))),
                             [4] + [4] * nd, [True] + [True] * nd, [4, 1], [False, False])

    def forward(x, w, *b):
        return fwd(x, w, *b)[0]

    def act_backward(dy, y):
        return act_b(dy, y)[0]

    def backward_data(d, w):
        return data(w, *d)[0]

    def backward_filter(x, d):
        return filt(x, *d)

    return forward, act_backward, backward_data, backward_filter


def dense_parts(local_parts, has_bias: bool):
    """The dense op's two functions (forward(x, w, *b), backward(x, w, y, dy) -> (dx, dw, db),
    as dlconv.bridges.jax._dense_op calls them) wrapped with the batch rule."""
    nb = 1 if has_bias else 0
    fwd = batch_partitioned("dense_forward",
                            lambda n: lambda x, w, *b: (local_parts(n)[0](x, w, *b),),
                            [2, 2] + [1] * nb, [True, False] + [False] * nb, [2], [True])
    bwd = batch_partitioned("dense_backward",
                            lambda n: lambda x, w, y, dy: tuple(local_parts(n)[1](x, w, y, dy)),
                            [2, 2, 2, 2], [True, False, True, True], [2, 2, 1], [True, False, False])

    def forward(x, w, *b):
        return fwd(x, w, *b)[0]

    return forward, bwd
