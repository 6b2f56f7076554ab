"""The built-in ops dlconv is compared with, each measured in the same process:

* :class:`TensorFlowBuiltin` — TensorFlow's ops (oneDNN on the CPU, cuDNN/cuBLAS on a GPU),
  each tried eagerly and inside ``tf.function``, the faster counts (``dlconv bench``);
* :class:`TorchBuiltin` — torch's cuDNN/cuBLAS ops, NCHW and ``channels_last`` tried, the
  faster counts (``benchmarks/gpu_bench.py``, torch's CPU ops in its dry run);
* :class:`ReferenceBuiltin` — the NumPy reference as a stand-in (no framework installed).

What each computes for a pass comes from :data:`dlconv.bench.passes.PASSES`; a provider only
places the inputs, picks the device and names its modes.
"""

from __future__ import annotations

import os
from typing import List

from .cases import Problem


class BuiltinProvider:
    """Interface: the framework's own op for a problem.  ``label`` names the framework."""

    label = "built-in"

    def modes(self, problem: Problem, place) -> List[tuple]:
        """→ [(mode name, zero-argument callable returning the output(s)[, convert]), ...];
        ``convert`` (optional, not timed) maps the output to dlconv's layouts for the check."""
        raise NotImplementedError  # abstract: TensorFlowBuiltin, TorchBuiltin and ReferenceBuiltin override


class ReferenceBuiltin(BuiltinProvider):
    """The NumPy reference as a stand-in built-in (dry runs on machines with no framework)."""

    label = "reference (NumPy stand-in)"

    def modes(self, problem, place):
        p, g, a = problem.spec, problem.geometry, problem.inputs
        act = problem.layer.activation
        return [("numpy", lambda: p.reference(a, g, act))]


class TensorFlowBuiltin(BuiltinProvider):
    """TensorFlow's ops (oneDNN on the CPU, cuDNN/cuBLAS on a GPU), eager and tf.function."""

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        self.tf = tf
        self.label = f"tensorflow {tf.__version__}"

    def gpu_available(self) -> bool:
        return bool(self.tf.config.list_physical_devices("GPU"))

    def modes(self, problem, place):
        tf = self.tf
        p = problem.spec
        dev = "/GPU:0" if place.device == "cuda" else "/CPU:0"
        act = problem.layer.activation
        with tf.device(dev):
            args = [tf.constant(problem.inputs[n]) for n in p.inputs]
            eager = p.tensorflow(tf, problem.geometry, act)
            graph = tf.function(p.tensorflow(tf, problem.geometry, act), jit_compile=False)
        sync = (lambda: tf.test.experimental.sync_devices()) if place.device == "cuda" else (lambda: None)

        def run(f):
            def call():
                with tf.device(dev):
                    out = f(*args)
                sync()
                return out
            return call
        return [("eager", run(eager)), ("tf.function", run(graph))]


#: Correctness bound of the TF32 side modes: TF32 keeps 10 mantissa bits (~5e-4 relative per
#: product), an order of magnitude looser than fp32's TOLERANCE.
TF32_TOLERANCE = 1e-2


def _with_tf32(torch, fn, conv: bool):
    """``fn`` run with TF32 allowed (cuDNN's flag for convolutions, cuBLAS's for matmuls)."""
    flags = torch.backends.cudnn if conv else torch.backends.cuda.matmul

    def run():
        old = flags.allow_tf32
        flags.allow_tf32 = True
        try:
            return fn()
        finally:
            flags.allow_tf32 = old
    return run


class TorchBuiltin(BuiltinProvider):
    """torch's cuDNN / cuBLAS ops (or torch's CPU ops in a dry run), at their best in fp32
    (TF32 off).  Each mode is also timed with TF32 allowed, as a *side* mode reported beside
    the fp32 time and never used as the built-in's time: for convolutions that is torch's
    default (``torch.backends.cudnn.allow_tf32`` is True unless changed), for matmuls it is not
    (``torch.backends.cuda.matmul.allow_tf32`` defaults to False).

    Convolutions run in torch's NCHW (plain and ``channels_last`` tried); the layout
    conversions (:data:`dlconv.bench.passes.TORCH_LAYOUT`) happen once, outside the timing.
    """

    def __init__(self, torch, device: str):
        self.torch = torch
        self.dev = device
        self.label = (f"torch {torch.__version__} " +
                      (f"(cuDNN {torch.backends.cudnn.version()}, cuBLAS; TF32 off)" if device == "cuda"
                       else "(CPU ops, dry-run stand-in for cuDNN)"))

    def _t(self, a):
        return self.torch.from_numpy(a).to(self.dev)

    def modes(self, problem, place):
        modes = self._fp32_modes(problem, place)
        conv = problem.layer.kind == "conv"
        if self.dev != "cuda":       # a dry run rehearses the side modes; the flags do nothing on CPU
            label = "TF32 flag (dry run: no effect on CPU)"
        else:
            label = "TF32 (cuDNN default)" if conv else "TF32 (not torch's matmul default)"
        side = [(f"{m[0]} {label}", _with_tf32(self.torch, m[1], conv), m[2] if len(m) > 2 else None,
                 {"side": True, "tolerance": TF32_TOLERANCE}) for m in modes]
        return modes + side

    def _fp32_modes(self, problem, place):
        from .passes import TORCH_LAYOUT

        torch = self.torch
        p, kind = problem.spec, problem.layer.kind
        fn, convert = p.torch(torch, problem.geometry, problem.layer.activation)
        layout = TORCH_LAYOUT.get(kind, {})
        formats = ((("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last))
                   if kind == "conv" else (("addmm" if p.name == "forward" else "mm", None),))
        modes = []
        for name, fmt in formats:
            args = []
            for n in p.inputs:
                t = self._t(problem.inputs[n])
                if n in layout:
                    t = layout[n](t)
                    if fmt is not None:
                        t = t.to(memory_format=fmt)
                args.append(t)
            call = (lambda args=args: fn(*args))
            modes.append((name, call, convert) if convert is not None else (name, call))
        return modes
