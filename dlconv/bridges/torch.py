"""The torch bridge: dlconv kernels as ``torch.library`` custom ops (``dlconv::``).

:func:`conv2d` and :func:`dense` take torch tensors (x NHWC, kernel HWIO / (in, out), bias
or None) and return a torch tensor whose forward *and* backward passes run dlconv kernels.
:mod:`dlconv.layers` calls them under ``KERAS_BACKEND=torch``; :mod:`dlconv.torch` is the
same two functions for plain PyTorch.

The ops
-------
=====================================  ===================================================
``dlconv::conv2d``                     ``act(conv2d(x, w) + b)``
``dlconv::conv2d_backward_data``       dL/dx from dL/dz, or dL/dy and y (fused act')
``dlconv::conv2d_backward_filter``     (dL/dw, dL/db), same two forms
``dlconv::dense``                      ``act(x @ w + b)`` (softmax included)
``dlconv::dense_backward``             (dL/dx, dL/dw, dL/db) from dL/dy and y
``dlconv::activation_backward``        dL/dz from dL/dy and y (for unfused backends)
``dlconv::conv2d_transpose``           Keras' Conv2DTranspose (linear) on the backward-data
                                       kernels; its gradients: ``conv2d``, ``..._filter``
``dlconv::dropout``                    ``keep ? x / (1 - rate) : 0``, the mask drawn from a
                                       (seed, counter) tensor; its gradient: itself on dy
=====================================  ===================================================

Each is a ``torch.library.custom_op`` with a ``register_fake`` implementation (its shapes
come from :mod:`dlconv.shapes`), so ``torch.compile`` traces through them without a graph
break; ``conv2d`` and ``dense`` carry a ``register_autograd`` formula that calls the backward
ops.  The geometry travels as op arguments: strides, explicit pads ``[top, bottom, left,
right]`` and dilation as int lists, activation and backend as strings.  "same"/"valid" are
resolved to pads by :func:`dlconv.runtime.conv_geometry_cached` before the op is called (the
pads do not depend on the batch, so the cache is keyed with batch 1: one entry serves every
batch size, and a symbolic batch under ``torch.compile``).

How a tensor reaches a kernel
-----------------------------
*CPU tensors*: ``t.detach().numpy()`` views the tensor's buffer (no copy); only a
non-contiguous tensor is copied, once, by ``.contiguous()``.  The kernels' NumPy outputs come
back through ``torch.from_numpy`` (no copy; the tensor keeps the array, and so a pooled
buffer of :mod:`dlconv.arrays`, alive).

*CUDA tensors*: read through ``__cuda_array_interface__`` into Numba device arrays with
``numba.cuda.from_cuda_array_interface(..., sync=False)`` and the interface's stream entry
dropped, so that neither this import nor :mod:`dlconv.ops`' own re-wrapping synchronises:
the kernels are launched on ``torch.cuda.current_stream()`` (handed to the ops as a Numba
external stream), the stream every producer of the inputs was queued on, so stream order is
all the synchronisation needed.  The outputs (Numba device arrays, allocated on that stream)
come back with ``torch.as_tensor`` (``__cuda_array_interface__``: no copy; the tensor keeps
the Numba array alive).  Numba takes that memory from torch's caching allocator (see
:func:`_share_torch_allocator`: Numba's own would free it with ``cuMemFree``, a device-wide
synchronisation).  No host round trip and no ``synchronize()``.

Bad input
---------
Refused before any kernel, naming the parameter: a dtype other than float32 (TypeError),
tensors on different devices, a GPU that is not the current CUDA device, or a device that
is neither CPU nor CUDA (ValueError).  Nothing is cast or moved silently.

Eager calls (plain tensors, not compiling, no dispatch mode) skip the dispatcher: the op's
implementation runs directly, with its autograd formula in a ``torch.autograd.Function``
(the registered op's eager dispatch cost 2-4x the whole kernel call of a tiny conv).
Everything else (``torch.compile``, fake tensors, ``opcheck``, functorch) goes through
``torch.ops.dlconv``; both run the same functions.

``SUPPORTS_JIT`` is True: the ops run inside ``torch.compile`` graphs (Keras' torch backend
compiles the step only for ``jit_compile=True``; its "auto" is eager).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from .. import activations as _act
from .. import ops as _ops
from ..runtime import conv_geometry_cached, fuse_activation_grad, resolve_backend
from ..shapes import dense_geometry, normalize_padding, normalize_pair

__all__ = ["conv2d", "conv2d_transpose", "dense", "conv_pads", "SUPPORTS_JIT", "NAMESPACE"]

#: The ops are custom ops with fake (meta) implementations: torch.compile traces them.
SUPPORTS_JIT = True

#: The ``torch.library`` namespace of the ops (``torch.ops.dlconv.*``).
NAMESPACE = "dlconv"


# ----------------------------------------------------------------------------- checks
def _place(named) -> torch.device:
    """The one device of the given (name, tensor or None) pairs, every tensor float32.

    TypeError for a non-tensor or a dtype other than float32; ValueError for tensors on
    different devices, on a GPU other than the current one, or on neither CPU nor CUDA."""
    device = None
    devices = []
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype} (dlconv does not convert "
                            f"silently; use {name}.float())")
        devices.append((name, t.device))
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{n} on {d}" for n, d in devices)
            raise ValueError(f"tensors must all be on one device, got {where} (dlconv moves "
                             f"nothing silently; use .to({device!s}) on the others)")
    if device.type == "cuda":
        current = torch.cuda.current_device()
        if device.index != current:
            names = ", ".join(n for n, _ in devices)
            raise ValueError(f"{names} are on {device} but the current CUDA device is cuda:{current}; "
                             f"call under `with torch.cuda.device({device.index}):`")
    elif device.type != "cpu":
        names = ", ".join(n for n, _ in devices)
        raise ValueError(f"{names} are on {device}; dlconv runs on CPU and CUDA tensors only")
    return device


# ----------------------------------------------------------------------------- host / device
def _host(t: Tensor):
    """A CPU tensor as a NumPy view of its buffer (a non-contiguous one copied once)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.detach().numpy() if t.requires_grad else t.numpy()


_STREAMS = {}

#: Environment switch: "0" keeps Numba's own device allocator (cuMemAlloc/cuMemFree) instead
#: of :func:`_share_torch_allocator`'s.
ALLOCATOR_ENV = "DLCONV_TORCH_ALLOCATOR"
_ALLOCATOR = {"installed": None, "why": "no CUDA tensor seen yet"}


def _share_torch_allocator():
    """Make Numba take device memory from torch's caching allocator (once, before Numba
    creates its CUDA context).

    Why: the kernels' outputs are Numba device arrays.  Numba's own allocator frees them with
    ``cuMemFree``, which synchronises the whole device (Numba batches the frees, so a training
    step would still stall on a few of them); torch's caching allocator reuses freed blocks in
    stream order and never synchronises.  The plugin allocates on torch's current stream, the
    one the kernels are launched on.  A Numba context that already exists (Numba used on the
    GPU before the first CUDA tensor reached this bridge) keeps Numba's allocator: correct,
    only with those frees.  ``DLCONV_TORCH_ALLOCATOR=0`` turns the plugin off.
    """
    if _ALLOCATOR["installed"] is not None:
        return
    import os
    if os.environ.get(ALLOCATOR_ENV, "1") == "0":
        _ALLOCATOR.update(installed=False, why=f"{ALLOCATOR_ENV}=0")
        return
    from numba import cuda
    from numba.cuda.cudadrv import driver as _drv

    class TorchNumbaMemoryManager(cuda.GetIpcHandleMixin, cuda.HostOnlyCUDAMemoryManager):
        """Numba EMM plugin: device memory from ``torch.cuda.caching_allocator_alloc``."""

        def initialize(self):
            pass                                  # torch has initialised the device

        def memalloc(self, size):
            dev = self.context.device.id
            ptr = torch.cuda.caching_allocator_alloc(size, dev, torch.cuda.current_stream(dev))
            return cuda.MemoryPointer(self.context, _drv.get_devptr_for_active_ctx(ptr), size,
                                      finalizer=lambda: torch.cuda.caching_allocator_delete(ptr))

        def get_memory_info(self):
            free, total = torch.cuda.mem_get_info(self.context.device.id)
            return cuda.MemoryInfo(free=free, total=total)

        @property
        def interface_version(self):
            return 1

    # Contexts Numba created already keep the allocator they were created with.
    devices = getattr(_drv.driver, "devices", None) or {}
    existing = sorted(int(n) for n, dev in devices.items() if getattr(dev, "primary_context", None))
    try:
        cuda.set_memory_manager(TorchNumbaMemoryManager)
        if existing:
            _ALLOCATOR.update(installed=False, why=f"Numba's CUDA context on device(s) {existing} "
                              "existed before the first CUDA tensor reached the torch bridge: it "
                              "keeps Numba's own allocator (cuMemFree synchronises the device)")
        else:
            _ALLOCATOR.update(installed=True, why="Numba allocates from torch's caching allocator")
    except Exception as exc:   # an EMM interface this numba-cuda does not have: keep Numba's
        _ALLOCATOR.update(installed=False, why=f"{type(exc).__name__}: {exc}")


def _stream(device: torch.device):
    """``torch.cuda.current_stream(device)`` as a Numba stream (cached per handle)."""
    _share_torch_allocator()
    handle = torch.cuda.current_stream(device).cuda_stream
    s = _STREAMS.get(handle)
    if s is None:
        from numba import cuda
        s = cuda.legacy_default_stream() if handle == 0 else cuda.external_stream(handle)
        _STREAMS[handle] = s
    return s


def _cuda(t: Tensor):
    """A CUDA tensor as a Numba device array on the same memory, without a stream sync."""
    from numba import cuda
    if not t.is_contiguous():
        t = t.contiguous()
    t = t.detach()
    desc = dict(t.__cuda_array_interface__)
    desc.pop("stream", None)   # ordered by the stream we launch on: no sync on import
    return cuda.from_cuda_array_interface(desc, owner=t, sync=False)


class _Call:
    """The arrays, backend object and stream of one op call on ``device``."""

    __slots__ = ("on_device", "device", "stream")

    def __init__(self, device: torch.device):
        self.device = device
        self.on_device = device.type == "cuda"
        self.stream = _stream(device) if self.on_device else None

    def arr(self, t):
        if t is None:
            return None
        return _cuda(t) if self.on_device else _host(t)

    def out(self, a) -> Tensor:
        if self.on_device:
            return torch.as_tensor(a, device=self.device)
        return torch.from_numpy(a)


_CPU = torch.device("cpu")
#: A CPU call has no stream and nothing per call to remember: one _Call serves them all.
_CPU_CALL = _Call(_CPU)


def _call_on(device: torch.device) -> _Call:
    return _CPU_CALL if device.type == "cpu" else _Call(device)


# ----------------------------------------------------------------------------- host heap
def _keep_heap() -> Tuple[bool, str]:
    """Keep freed host memory on glibc's heap (``dlconv._C.keep_heap``, csrc/host_heap.h), once
    for the process, when this bridge is imported → (kept, why).

    Why: torch's CPU allocator is plain ``posix_memalign``/``free``, so the stock ops of a
    train step (Adam's temporaries for the 9216x128 dense kernel, the dropout, the gradients)
    get fresh blocks every step, and glibc returned the large ones to the system (unmapped, or
    trimmed off the heap's top) and handed them back as fresh zero pages: 2,300-4,600 minor page
    faults per MNIST CNN step at batch 128, none after (``tests/test_heap.py`` counts them);
    steps faulting that much ran 6-15% slower than kept ones, round-robin in one process
    (2-core Xeon at load 4).
    dlconv's own outputs never faulted (:data:`dlconv.arrays.HOST_POOL` recycles them).
    ``DLCONV_KEEP_HEAP=0`` (before this import) leaves malloc as it is."""
    from ..backends import cpp_backend  # noqa: F401  (libgomp's spin default before _C loads)
    try:
        import dlconv._C as c
    except ImportError as exc:
        return False, f"dlconv._C is not importable ({exc})"
    keep = getattr(c, "keep_heap", None)
    if keep is None:
        return False, "dlconv._C has no keep_heap (rebuild it)"
    kept, why = keep()
    return bool(kept), str(why)


#: (kept, why) of :func:`_keep_heap`, applied at import.
HEAP = _keep_heap()


def _backend(name: str, on_device: bool):
    return resolve_backend(name, on_device)


# ----------------------------------------------------------------------------- geometry
def _geometry(x_shape, w_shape, strides, pads, dilation, groups=1):
    """The cached :class:`~dlconv.shapes.ConvGeometry` for explicit pads (shapes are
    ``torch.Size`` or int sequences; the op arguments int lists)."""
    return conv_geometry_cached(tuple(x_shape), tuple(w_shape), tuple(strides),
                                ((pads[0], pads[1]), (pads[2], pads[3])), tuple(dilation), int(groups))


def _rank(name, t, rank):
    if isinstance(t, Tensor) and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")


@torch.compiler.assume_constant_result
def _conv_pads_constant(spatial, w_shape, strides, padding, dilation, groups=1):
    return _conv_pads.__wrapped__(spatial, w_shape, strides, padding, dilation, groups)


def conv_pads(x_shape, w_shape, strides, padding, dilation, groups=1) -> Tuple[List[int], List[int], List[int]]:
    """(strides, pads [top, bottom, left, right], dilation) as int lists for the ops, from any
    padding :func:`dlconv.shapes.conv_geometry` accepts (resolved there, batch-independent:
    the batch is left out of the key)."""
    spatial, w_shape = tuple(x_shape[1:]), tuple(w_shape)
    if torch.compiler.is_compiling():
        # Dynamo must not trace the resolution (an LRU cache, and ConvGeometry's set of
        # records already validated, which it would guard on): its result is a constant of
        # the static shapes and the layer's settings.
        return _conv_pads_constant(spatial, w_shape, strides, padding, dilation, groups)
    try:
        return _conv_pads(spatial, w_shape, strides, padding, dilation, groups)
    except TypeError:          # an unhashable spelling (lists): normalise it first
        return _conv_pads(spatial, w_shape, normalize_pair("strides", strides),
                          normalize_padding(padding), normalize_pair("dilation", dilation), groups)


@functools.lru_cache(maxsize=512)
def _conv_pads(spatial, w_shape, strides, padding, dilation, groups=1):
    s = normalize_pair("strides", strides)
    d = normalize_pair("dilation", dilation)
    key = (1,) + tuple(int(v) for v in spatial) if len(spatial) == 3 else (None,) + spatial
    resolve = conv_geometry_cached.__wrapped__ if torch.compiler.is_compiling() else conv_geometry_cached
    g = resolve(key, tuple(int(v) for v in w_shape), s, normalize_padding(padding), d, groups)
    return list(s), [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right], list(d)


# ----------------------------------------------------------------------------- eager fast path
#: op name → its plain Python implementation (what the custom op runs on real tensors).
_IMPLS = {}


def _op(name):
    """``torch.library.custom_op("dlconv::<name>")``, keeping the plain function for
    :func:`_call`'s eager fast path."""
    def register(fn):
        _IMPLS[name] = fn
        return torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
    return register


_PLAIN = (Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
#: functorch transforms (vmap, grad, ...) in progress: the fast path's Function would need them
#: to see a separate setup_context, so such calls go through the registered op.
_transforms_active = torch._C._are_functorch_transforms_active


def _eager(tensors) -> bool:
    """True when a call on ``tensors`` may skip the dispatcher: not compiling, no dispatch
    mode (fake tensors, functionalisation, opcheck's checks) and only plain tensors (no
    subclass, no vmap/grad wrapper).  Then the custom op's implementation is called directly,
    and its autograd formula through a ``torch.autograd.Function``: the same functions the
    registered op runs, without its eager dispatch overhead (see benchmarks/torch_step.py)."""
    if torch.compiler.is_compiling() or _current_mode() is not None:
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or _is_wrapped(t)):
            return False
    return True


def _call(name, *args):
    """Op ``name`` on ``args``: its implementation directly when :func:`_eager`, else through
    ``torch.ops.dlconv`` (compiled graphs, fake tensors, transforms)."""
    if _eager([a for a in args if isinstance(a, Tensor)]):
        return _IMPLS[name](*args)
    return getattr(torch.ops.dlconv, name)(*args)


# ----------------------------------------------------------------------------- conv ops
@_op("conv2d")
def _conv2d_op(x: Tensor, w: Tensor, b: Optional[Tensor], strides: List[int], pads: List[int],
               dilation: List[int], activation: str, backend: str, groups: int = 1) -> Tensor:
    c = _call_on(_place((("x", x), ("w", w), ("b", b))))
    return _conv2d_run(c, _geometry(x.shape, w.shape, strides, pads, dilation, groups), x, w, b,
                       activation, backend)


def _conv2d_run(c: _Call, g, x, w, b, activation, backend):
    """The op's work once its inputs are checked (``c``) and its geometry ``g`` resolved."""
    y = _ops.conv2d(c.arr(x), c.arr(w), c.arr(b), activation=activation,
                    backend=_backend(backend, c.on_device), geometry=g, stream=c.stream)
    return c.out(y)


@_conv2d_op.register_fake
def _(x, w, b, strides, pads, dilation, activation, backend, groups=1):
    _place((("x", x), ("w", w), ("b", b)))
    _rank("x", x, 4)
    # int(): symbolic sizes (dynamic shapes) are specialised; the batch stays symbolic
    g = _geometry((1, *(int(d) for d in x.shape[1:])), [int(d) for d in w.shape],
                  [int(v) for v in strides], [int(v) for v in pads], [int(v) for v in dilation], int(groups))
    return x.new_empty((x.shape[0], g.out_h, g.out_w, g.filters))


@_op("conv2d_backward_data")
def _conv2d_backward_data_op(dy: Tensor, w: Tensor, y: Optional[Tensor], in_hw: List[int],
                             strides: List[int], pads: List[int], dilation: List[int],
                             activation: str, backend: str, groups: int = 1) -> Tensor:
    c = _call_on(_place((("dy", dy), ("w", w), ("y", y))))
    x_shape = (dy.shape[0], int(in_hw[0]), int(in_hw[1]), w.shape[2] * groups)
    g = _geometry(x_shape, w.shape, strides, pads, dilation, groups)
    kw = {} if y is None else {"y": c.arr(y), "activation": activation}
    dx = _ops.conv2d_backward_data(c.arr(dy), c.arr(w), g.x_shape, backend=_backend(backend, c.on_device),
                                   geometry=g, stream=c.stream, **kw)
    return c.out(dx)


@_conv2d_backward_data_op.register_fake
def _(dy, w, y, in_hw, strides, pads, dilation, activation, backend, groups=1):
    _place((("dy", dy), ("w", w), ("y", y)))
    return dy.new_empty((dy.shape[0], int(in_hw[0]), int(in_hw[1]), w.shape[2] * groups))


@_op("conv2d_backward_filter")
def _conv2d_backward_filter_op(x: Tensor, dy: Tensor, y: Optional[Tensor], k_hw: List[int],
                               strides: List[int], pads: List[int], dilation: List[int],
                               activation: str, backend: str, groups: int = 1) -> Tuple[Tensor, Tensor]:
    c = _call_on(_place((("x", x), ("dy", dy), ("y", y))))
    w_shape = (int(k_hw[0]), int(k_hw[1]), x.shape[3] // groups, dy.shape[3])
    g = _geometry(x.shape, w_shape, strides, pads, dilation, groups)
    kw = {} if y is None else {"y": c.arr(y), "activation": activation}
    dw, db = _ops.conv2d_backward_filter(c.arr(x), c.arr(dy), w_shape, backend=_backend(backend, c.on_device),
                                         geometry=g, stream=c.stream, **kw)
    return c.out(dw), c.out(db)


@_conv2d_backward_filter_op.register_fake
def _(x, dy, y, k_hw, strides, pads, dilation, activation, backend, groups=1):
    _place((("x", x), ("dy", dy), ("y", y)))
    return (x.new_empty((int(k_hw[0]), int(k_hw[1]), x.shape[3] // groups, dy.shape[3])),
            x.new_empty((dy.shape[3],)))


@_op("activation_backward")
def _activation_backward_op(dy: Tensor, y: Tensor, activation: str, backend: str) -> Tensor:
    c = _call_on(_place((("dy", dy), ("y", y))))
    if _act.normalize(activation) == "linear":
        return dy.clone()   # dz = dy; an op's output may not alias its input
    dz = _ops.activation_backward(c.arr(dy), c.arr(y), activation,
                                  backend=_backend(backend, c.on_device), stream=c.stream)
    return c.out(dz)


@_activation_backward_op.register_fake
def _(dy, y, activation, backend):
    _place((("dy", dy), ("y", y)))
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


def _conv2d_setup_context(ctx, inputs, output):
    x, w, b, strides, pads, dilation, activation, backend, *rest = inputs
    ctx.geometry = (list(strides), list(pads), list(dilation))
    ctx.groups = int(rest[0]) if rest else 1
    ctx.n_inputs = len(inputs)
    ctx.activation, ctx.backend, ctx.has_bias = activation, backend, b is not None
    ctx.in_hw = [x.shape[1], x.shape[2]]
    ctx.k_hw = [w.shape[0], w.shape[1]]
    ctx.on_device = x.device.type == "cuda"
    ctx.save_for_backward(x, w, output if activation != "linear" else None)


def _conv2d_backward(ctx, dy):
    x, w, y = ctx.saved_tensors
    act, backend = ctx.activation, ctx.backend
    strides, pads, dilation = ctx.geometry
    # Both backward ops read dy: a strided dy (Keras' max-pool gradient arrives NCHW-ordered)
    # is made contiguous once here rather than once in each op.
    dy = dy.contiguous()
    if act == "linear":
        d, y_arg = dy, None
    elif fuse_activation_grad(backend, ctx.on_device, act):
        d, y_arg = dy, y            # the kernels apply act'(y) as they read dy
    else:
        d, y_arg = _call("activation_backward", dy, y, act, backend), None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_x:
        dx = _call("conv2d_backward_data", d, w, y_arg, ctx.in_hw, strides, pads, dilation,
                   act, backend, ctx.groups)
    if need_w or need_b:
        dw, db = _call("conv2d_backward_filter", x, d, y_arg, ctx.k_hw, strides, pads,
                       dilation, act, backend, ctx.groups)
    return (dx, dw, (db if ctx.has_bias else None)) + (None,) * (ctx.n_inputs - 3)


_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


def _function(name, setup_context, backward, run=None):
    """A ``torch.autograd.Function`` running op ``name``'s implementation with the op's own
    setup_context and backward formula (the eager fast path of :func:`_forward`).

    The combined ``forward(ctx, *args)`` form, which calls ``setup_context`` itself: a Function
    that defines a separate ``setup_context`` has ``Function.apply`` bind every call's arguments
    with ``inspect.signature`` (measured: about half the bridge's per-call cost of a tiny conv
    whose kernel requires grad).  The separate form is only needed under functorch transforms,
    which never take this path (:func:`_forward` sends them to ``torch.ops.dlconv``).

    With ``run`` (``run(pre, *op_args)``), ``apply`` takes ``pre`` after the op's arguments:
    what the bridge function's checks already found (the :class:`_Call` and the geometry),
    so the checks and the geometry lookup are not made twice per call; it gets no gradient.
    (Last, so that ``ctx.needs_input_grad`` keeps the op's argument positions.)"""
    if run is None:
        impl = _IMPLS[name]

        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        def bwd(ctx, *grads):
            return backward(ctx, *grads)
    else:
        def forward(ctx, *args_pre):
            args, pre = args_pre[:-1], args_pre[-1]
            out = run(pre, *args)
            setup_context(ctx, args, out)
            return out

        def bwd(ctx, *grads):
            return tuple(backward(ctx, *grads)) + (None,)

    cls = type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(bwd)})
    cls.fast_apply = _fast_apply(cls)
    return cls


def _fast_apply(cls):
    """``cls.apply`` without its Python prologue, for plain tensors outside functorch
    transforms (the only calls :func:`_forward` and :func:`_forward_checked` make with it).

    ``Function.apply`` then does nothing but unwrap dead functorch wrappers (a generator over
    every argument: none here, the tensors are checked to be plain) and call the C++
    ``_FunctionBase.apply``; calling that directly saves a fifth of a tiny conv's bridge
    cost.  An older or newer torch without it keeps ``cls.apply``."""
    raw = getattr(torch._C, "_FunctionBase", None)
    raw = getattr(raw, "__dict__", {}).get("apply")
    try:
        return raw.__get__(None, cls) if raw is not None else cls.apply
    except (AttributeError, TypeError):
        return cls.apply


_CONV2D_FUNCTION = _function("conv2d", _conv2d_setup_context, _conv2d_backward)


def _CONV2D_CHECKED_RUN(pre, x, w, b, strides, pads, dilation, activation, backend, groups=1):
    return _conv2d_run(pre[0], pre[1], x, w, b, activation, backend)


_CONV2D_CHECKED = _function("conv2d", _conv2d_setup_context, _conv2d_backward, run=_CONV2D_CHECKED_RUN)


# ----------------------------------------------------------------------------- dense ops
@_op("dense")
def _dense_op(x: Tensor, w: Tensor, b: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _dense_run(_call_on(_place((("x", x), ("w", w), ("b", b)))), None, x, w, b, activation,
                      backend)


def _dense_run(c: _Call, _g, x, w, b, activation, backend):
    """The op's work once its inputs are checked (``c``; ``_g`` unused: conv2d's shape)."""
    y = _ops.dense(c.arr(x), c.arr(w), c.arr(b), activation=activation,
                   backend=_backend(backend, c.on_device), stream=c.stream)
    return c.out(y)


@_dense_op.register_fake
def _(x, w, b, activation, backend):
    _place((("x", x), ("w", w), ("b", b)))
    _rank("x", x, 2)
    _rank("w", w, 2)
    return x.new_empty((x.shape[0], w.shape[1]))


@_op("dense_backward")
def _dense_backward_op(x: Tensor, w: Tensor, dy: Tensor, y: Optional[Tensor], activation: str,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    c = _call_on(_place((("x", x), ("w", w), ("dy", dy), ("y", y))))
    dx, dw, db = _ops.dense_backward(c.arr(x), c.arr(w), c.arr(dy), c.arr(y), activation=activation,
                                     backend=_backend(backend, c.on_device), stream=c.stream)
    return c.out(dx), c.out(dw), c.out(db)


@_dense_backward_op.register_fake
def _(x, w, dy, y, activation, backend):
    _place((("x", x), ("w", w), ("dy", dy), ("y", y)))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format),
            w.new_empty((w.shape[1],)))


def _dense_setup_context(ctx, inputs, output):
    x, w, b, activation, backend = inputs
    ctx.activation, ctx.backend, ctx.has_bias = activation, backend, b is not None
    ctx.save_for_backward(x, w, output)     # y: every backend's dense_backward may read it


def _dense_backward(ctx, dy):
    x, w, y = ctx.saved_tensors
    dx, dw, db = _call("dense_backward", x, w, dy, y, ctx.activation, ctx.backend)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (dx if need_x else None, dw if need_w else None,
            db if (need_b and ctx.has_bias) else None, None, None)


_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup_context)
_DENSE_FUNCTION = _function("dense", _dense_setup_context, _dense_backward)


def _DENSE_CHECKED_RUN(pre, x, w, b, activation, backend):
    return _dense_run(pre[0], None, x, w, b, activation, backend)


_DENSE_CHECKED = _function("dense", _dense_setup_context, _dense_backward, run=_DENSE_CHECKED_RUN)


def _forward(name, function, tensors, *args):
    """A forward op: eager calls skip the dispatcher (through ``function`` when a gradient is
    needed, the bare implementation otherwise); the rest go through ``torch.ops.dlconv``."""
    if not _eager(tensors) or _transforms_active():
        return getattr(torch.ops.dlconv, name)(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return function.fast_apply(*args)
    return _IMPLS[name](*args)


def _forward_checked(name, function, run, pre, x, w, b, *args):
    """:func:`_forward` for a call whose tensors the bridge function has checked already
    (``pre``: their :class:`_Call` and the geometry): the eager paths run the op's work
    directly (``run`` / ``function``, a ``_function(..., run=...)``); the rest go through
    ``torch.ops.dlconv``, which checks again (fake tensors, compiled graphs)."""
    if (torch.compiler.is_compiling() or _current_mode() is not None or _transforms_active()
            or type(x) not in _PLAIN or type(w) not in _PLAIN or _is_wrapped(x) or _is_wrapped(w)
            or (b is not None and (type(b) not in _PLAIN or _is_wrapped(b)))):
        return getattr(torch.ops.dlconv, name)(x, w, b, *args)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (b is not None and b.requires_grad)):
        return function.fast_apply(x, w, b, *args, pre)
    return run(pre, x, w, b, *args)


@functools.lru_cache(maxsize=512)
def _conv2d_plan(x_shape, w_shape, has_bias, strides, padding, dilation, activation, backend,
                 groups):
    """(op arguments after x, w, b; the geometry) of an eager conv2d call, from the call's
    hashable arguments: the activation normalised, the backend name checked, "same"/"valid"
    resolved (:func:`conv_pads`), the geometry from :func:`conv_geometry_cached` — once per
    distinct call, not per call."""
    act = _act.normalize(activation, allow_softmax=False)
    s, p, d = conv_pads(x_shape, w_shape, strides, padding, dilation, groups)
    g = _geometry(x_shape, w_shape, s, p, d, groups)
    return (s, p, d, act, _check_backend(backend), groups), g


@functools.lru_cache(maxsize=512)
def _dense_plan(x_features, w_shape, activation, backend):
    """(op arguments after x, w, b) of a dense call: the activation normalised, the backend
    checked, the features matched (ValueError), once per distinct call."""
    dense_geometry((0, x_features), w_shape)        # 0 stands for any batch size
    return (_act.normalize(activation), _check_backend(backend))


# ----------------------------------------------------------------------------- the bridge API
def conv2d(x, kernel, bias, *, strides=(1, 1), padding="valid", dilation=(1, 1), activation="linear",
           backend="auto", out_shape=None, names=("x", "kernel", "bias"), groups=1):
    """``act(conv2d(x, kernel) + bias)`` (NHWC / HWIO) as a differentiable torch op.

    ``bias`` may be None; ``padding`` anything :func:`dlconv.shapes.conv_geometry` accepts;
    ``activation`` one of linear/relu/sigmoid/tanh (or None); ``out_shape`` is ignored (torch
    tensors carry their shape); ``names`` are the parameter names errors use; ``groups=G``:
    grouped convolution with kernel ``(kh, kw, C/G, F)``, one op for all groups.
    """
    device = _place(zip(names, (x, kernel, bias)))
    _rank(names[0], x, 4)
    _rank(names[1], kernel, 4)
    groups = int(groups)
    if not torch.compiler.is_compiling():
        try:
            args, g = _conv2d_plan(x.shape, kernel.shape, bias is not None, strides, padding,
                                   dilation, activation, backend, groups)
        except TypeError:   # an unhashable spelling (lists): the general path below
            pass
        else:
            return _forward_checked("conv2d", _CONV2D_CHECKED, _CONV2D_CHECKED_RUN,
                                    (_call_on(device), g), x, kernel, bias, *args)
    act = _act.normalize(activation, allow_softmax=False)
    s, p, d = conv_pads(x.shape, kernel.shape, strides, padding, dilation, groups)
    return _forward("conv2d", _CONV2D_FUNCTION, (x, kernel, bias), x, kernel, bias, s, p, d, act,
                    _check_backend(backend), groups)


def dense(x, kernel, bias, *, activation="linear", backend="auto", names=("x", "kernel", "bias")):
    """``act(x @ kernel + bias)`` for rank-2 ``x`` as a differentiable torch op (softmax too)."""
    device = _place(zip(names, (x, kernel, bias)))
    _rank(names[0], x, 2)
    _rank(names[1], kernel, 2)
    if not torch.compiler.is_compiling():
        try:
            args = _dense_plan(int(x.shape[1]), tuple(kernel.shape), activation, backend)
        except TypeError:   # an unhashable activation/backend: the general path below
            pass
        else:
            return _forward_checked("dense", _DENSE_CHECKED, _DENSE_CHECKED_RUN,
                                    (_call_on(device), None), x, kernel, bias, *args)
    act = _act.normalize(activation)
    # ValueError for a feature mismatch (batch-independent: 0 stands for any batch size)
    dense_geometry((0, int(x.shape[1])), tuple(int(v) for v in kernel.shape))
    return _forward("dense", _DENSE_FUNCTION, (x, kernel, bias), x, kernel, bias, act,
                    _check_backend(backend))


_BACKEND_NAMES = []


def _check_backend(backend) -> str:
    if not _BACKEND_NAMES:
        from .. import backends as _backends
        _BACKEND_NAMES.extend(("auto",) + tuple(_backends.names()))
    if backend not in _BACKEND_NAMES:
        raise ValueError(f"backend must be one of {tuple(_BACKEND_NAMES)}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------- conv2d_transpose
# ``dlconv::conv2d_transpose(x, w, strides, pads, dilation, out_hw, backend)``: Keras'
# Conv2DTranspose (linear, no bias) on the backward-data kernels; its autograd formula runs
# ``dlconv::conv2d`` (dL/dx) and ``dlconv::conv2d_backward_filter`` (dL/dw).  The geometry
# travels as the forward convolution's (the one whose backward-data it is): pads and the
# transposed output's height and width, resolved by dlconv.shapes.
@_op("conv2d_transpose")
def _conv2d_transpose_op(x: Tensor, w: Tensor, strides: List[int], pads: List[int],
                         dilation: List[int], out_hw: List[int], backend: str) -> Tensor:
    c = _call_on(_place((("x", x), ("kernel", w))))
    g = _geometry((x.shape[0], int(out_hw[0]), int(out_hw[1]), w.shape[2]), w.shape, strides, pads,
                  dilation)
    y = _ops.conv2d_transpose(c.arr(x), c.arr(w), backend=_backend(backend, c.on_device), geometry=g,
                              stream=c.stream)
    return c.out(y)


@_conv2d_transpose_op.register_fake
def _(x, w, strides, pads, dilation, out_hw, backend):
    _place((("x", x), ("kernel", w)))
    _rank("x", x, 4)
    return x.new_empty((x.shape[0], int(out_hw[0]), int(out_hw[1]), w.shape[2]))


def _conv2d_transpose_setup_context(ctx, inputs, output):
    x, w, strides, pads, dilation, out_hw, backend = inputs
    ctx.geometry = (list(strides), list(pads), list(dilation))
    ctx.backend = backend
    ctx.k_hw = [w.shape[0], w.shape[1]]
    ctx.save_for_backward(x, w)


def _conv2d_transpose_backward(ctx, dy):
    x, w = ctx.saved_tensors
    strides, pads, dilation = ctx.geometry
    dy = dy.contiguous()
    need_x, need_w = ctx.needs_input_grad[:2]
    dx = dw = None
    if need_x:      # the forward convolution of dy
        dx = _call("conv2d", dy, w, None, strides, pads, dilation, "linear", ctx.backend)
    if need_w:      # backward-filter with dy as the input and x as the output gradient
        dw, _ = _call("conv2d_backward_filter", dy, x.contiguous(), None, ctx.k_hw, strides, pads,
                      dilation, "linear", ctx.backend)
    return dx, dw, None, None, None, None, None


_conv2d_transpose_op.register_autograd(_conv2d_transpose_backward,
                                       setup_context=_conv2d_transpose_setup_context)
_CONV2D_TRANSPOSE_FUNCTION = _function("conv2d_transpose", _conv2d_transpose_setup_context,
                                       _conv2d_transpose_backward)


@functools.lru_cache(maxsize=512)
def _transpose_args(spatial, w_shape, strides, padding, output_padding, dilation):
    """(strides, pads [top, bottom, left, right], dilation, out_hw) as int lists for the op,
    from :func:`dlconv.shapes.conv_transpose_geometry` (batch-independent)."""
    from ..shapes import conv_transpose_geometry
    g = conv_transpose_geometry((1,) + spatial, w_shape, strides, padding, output_padding, dilation)
    return ([g.stride_h, g.stride_w], [g.pad_top, g.pad_bottom, g.pad_left, g.pad_right],
            [g.dil_h, g.dil_w], [g.in_h, g.in_w])


@torch.compiler.assume_constant_result
def _transpose_args_constant(spatial, w_shape, strides, padding, output_padding, dilation):
    return _transpose_args.__wrapped__(spatial, w_shape, strides, padding, output_padding, dilation)


def conv2d_transpose(x, kernel, *, strides=(1, 1), padding="valid", output_padding=None,
                     dilation=(1, 1), backend="auto", out_shape=None, names=("x", "kernel")):
    """Keras' ``Conv2DTranspose`` (linear, no bias) of NHWC ``x`` with a kernel of shape
    ``(kh, kw, filters, in_channels)`` as a differentiable torch op (``dlconv::conv2d_transpose``).
    ``out_shape`` is ignored (torch tensors carry their shape)."""
    _place(zip(names, (x, kernel)))
    _rank(names[0], x, 4)
    _rank(names[1], kernel, 4)
    key = (tuple(int(v) for v in x.shape[1:]), tuple(int(v) for v in kernel.shape),
           normalize_pair("strides", strides), padding,
           None if output_padding is None else normalize_pair("output_padding", output_padding, 0),
           normalize_pair("dilation", dilation))
    resolve = _transpose_args_constant if torch.compiler.is_compiling() else _transpose_args
    s, p, d, out_hw = resolve(*key)
    return _forward("conv2d_transpose", _CONV2D_TRANSPOSE_FUNCTION, (x, kernel), x, kernel, s, p, d,
                    out_hw, _check_backend(backend))


# ----------------------------------------------------------------------------- max pool
# dlconv::max_pool2d(x NHWC) -> (y, arg): the C++ CPU kernel (csrc/cpu_pool.cpp) on the
# tensors' own buffers, no transposes (stock Keras on torch permutes NHWC -> NCHW and back
# around F.max_pool2d).  ``arg`` (int32, the flat input position of each output's maximum) is
# saved for the backward, dlconv::max_pool2d_backward(dy, arg, x) -> dx, a gather: measured
# faster than recomputing the argmax from x (csrc/cpu_pool.cpp; tests/test_pool.py).  CPU
# tensors only: CUDA tensors are the caller's to route to the stock pool (dlconv.layers does).
def _pool_geometry(x_shape, pool, strides, padding):
    return _ops.pool_geometry(tuple(int(v) for v in x_shape), tuple(pool), tuple(strides), padding)


def _pool_place(named):
    device = _place(named)
    if device.type != "cpu":
        raise ValueError(f"dlconv's max pool has CPU kernels only; got tensors on {device} (use the "
                         f"framework's pool for GPU tensors)")


@_op("max_pool2d")
def _max_pool2d_op(x: Tensor, pool: List[int], strides: List[int], padding: str,
                   backend: str) -> Tuple[Tensor, Tensor]:
    _pool_place((("x", x),))
    g = _pool_geometry(x.shape, pool, strides, padding)
    y, arg = _ops.max_pool2d(_host(x), backend=backend, geometry=g, return_argmax=True)
    return torch.from_numpy(y), torch.from_numpy(arg)


@_max_pool2d_op.register_fake
def _(x, pool, strides, padding, backend):
    _pool_place((("x", x),))
    _rank("x", x, 4)
    g = _pool_geometry((1,) + tuple(int(v) for v in x.shape[1:]), pool, strides, padding)
    shape = (x.shape[0], g.out_h, g.out_w, g.filters)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int32)


@_op("max_pool2d_backward")
def _max_pool2d_backward_op(dy: Tensor, arg: Tensor, x: Tensor, pool: List[int], strides: List[int],
                            padding: str, backend: str) -> Tensor:
    _pool_place((("dy", dy), ("x", x)))
    g = _pool_geometry(x.shape, pool, strides, padding)
    return torch.from_numpy(_ops.max_pool2d_backward(_host(dy), _host(x), backend=backend, geometry=g,
                                                     arg=_host(arg)))


@_max_pool2d_backward_op.register_fake
def _(dy, arg, x, pool, strides, padding, backend):
    return x.new_empty(x.shape)


def _max_pool2d_setup_context(ctx, inputs, output):
    x, pool, strides, padding, backend = inputs
    ctx.args = (list(pool), list(strides), padding, backend)
    ctx.save_for_backward(x, output[1])


def _max_pool2d_backward(ctx, dy, _darg=None):
    x, arg = ctx.saved_tensors
    dx = _call("max_pool2d_backward", dy.contiguous(), arg, x, *ctx.args)
    return dx, None, None, None, None


_max_pool2d_op.register_autograd(_max_pool2d_backward, setup_context=_max_pool2d_setup_context)
_MAX_POOL2D_FUNCTION = _function("max_pool2d", _max_pool2d_setup_context, _max_pool2d_backward)


def max_pool2d(x, *, pool_size=(2, 2), strides=None, padding="valid", backend="auto", names=("x",)):
    """Keras' ``MaxPooling2D`` (NHWC, TensorFlow's NaN/tie rules: :func:`dlconv.ops.max_pool2d`)
    of a CPU float32 tensor as a differentiable torch op (``dlconv::max_pool2d``)."""
    _pool_place(zip(names, (x,)))
    _rank(names[0], x, 4)
    pool = list(normalize_pair("pool_size", pool_size))
    s = list(normalize_pair("strides", pool if strides is None else strides))
    if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    y, _arg = _forward("max_pool2d", _MAX_POOL2D_FUNCTION, (x,), x, pool, s, padding.lower(),
                       _check_backend(backend))
    return y


# ----------------------------------------------------------------------------- dropout
# dlconv::dropout(x, rate, seed) -> y = keep ? x / (1 - rate) : 0, the C++ CPU kernel
# (csrc/cpu_dropout.cpp) on the tensor's own buffer.  ``seed`` is an int64 tensor [seed,
# counter] (a Keras SeedGenerator's state), a tensor so that a new draw is a new value, not a
# new op argument (no recompilation under torch.compile).  The mask is a function of (seed,
# counter, element index): the backward regenerates it (dx = the same op on dy) instead of
# storing a uint8 mask, and the result does not depend on the thread count.
_U64 = (1 << 64) - 1


def _dropout_check(x: Tensor, rate: float):
    _place((("x", x),))
    if x.device.type != "cpu":
        raise ValueError(f"dlconv's dropout has a CPU kernel only; got x on {x.device}")
    if x.dtype != torch.float32:
        raise TypeError(f"dlconv's dropout: x must be float32, got {x.dtype}")
    if not 0.0 < float(rate) < 1.0:
        raise ValueError(f"dlconv's dropout: rate must be in (0, 1), got {rate!r}")


@_op("dropout")
def _dropout_op(x: Tensor, rate: float, seed: Tensor) -> Tensor:
    _dropout_check(x, rate)
    import dlconv._C as c
    s, k = (int(v) & _U64 for v in seed.tolist())
    return torch.from_numpy(c.dropout(_host(x), float(rate), s, k))


@_dropout_op.register_fake
def _(x, rate, seed):
    _dropout_check(x, rate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output):
    _x, rate, seed = inputs
    ctx.rate = rate
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return _call("dropout", dy.contiguous(), ctx.rate, seed), None, None


_dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup_context)
_DROPOUT_FUNCTION = _function("dropout", _dropout_setup_context, _dropout_backward)


def dropout(x, rate, seed):
    """Dropout of a CPU float32 tensor (any shape) as a differentiable torch op
    (``dlconv::dropout``): kept elements ``x / (1 - rate)``, dropped ones 0 (NaN included, as
    tf.nn.dropout); ``seed`` is a length-2 integer tensor (seed, counter) or a pair of ints.
    ``rate == 0`` returns x unchanged."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate must be a float in [0, 1), got {rate!r}")
    if rate == 0:
        return x
    _dropout_check(x, rate)
    if not isinstance(seed, Tensor):
        seed = torch.tensor([int(v) & ((1 << 63) - 1) for v in seed], dtype=torch.int64)
    if seed.shape != (2,) or seed.dtype.is_floating_point or seed.dtype == torch.bool:
        raise ValueError(f"seed must be an integer tensor of shape (2,) (seed, counter), got "
                         f"{tuple(seed.shape)} {seed.dtype}")
    return _forward("dropout", _DROPOUT_FUNCTION, (x,), x, float(rate), seed.detach().to(torch.int64))
