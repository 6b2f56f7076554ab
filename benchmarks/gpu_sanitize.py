"""Driver for compute-sanitizer: calls every CUDA C++ kernel of dlconv._C_cuda once or twice
on small shapes, on a non-default stream, and checks each result against dlconv.reference.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python benchmarks/gpu_sanitize.py
    (likewise racecheck, initcheck, synccheck; benchmarks/gpu_check.sh runs all four)
    python benchmarks/gpu_sanitize.py --dry-run      # no GPU: list the cases, check coverage

Cases (``CASES``): conv forward v1/v2/v3 (v3 on its float4 path: C, F multiples of 4 and
16-byte aligned buffers, and on its scalar path), each with bias and an activation, one
without bias; backward-data; backward-filter with and without the bias gradient; dense
forward without and with split-K (forced through ``_set_split_k``, and the heuristic's own
split on 128x9216 -> 128 style shapes scaled down), dense backward (dx, dw, db) with and
without split-K; softmax; activation backward element-wise and row-wise.  Ragged sizes
throughout, so every edge guard runs.  ``--dry-run`` checks that every entry point of
``dlconv._C_cuda`` (``ENTRY_POINTS``) has a case, without touching CUDA.

Arrays are Numba device arrays (no CuPy or torch needed); only dlconv's kernels run on the
GPU (copies are cuMemcpy, not kernels), so every report names one of ours.  Exit status:
0 when every case matched the reference.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

#: Every kernel entry point of dlconv._C_cuda (bind_cuda.cpp); --dry-run checks coverage.
#: Exports that launch nothing themselves: reports, the split-K rule, and the PyCapsules of
#: the XLA FFI handlers (csrc/ffi_cuda.cpp), which launch the same kernels as the entry points.
NOT_LAUNCHERS = ("build_info", "devices", "devices_why", "split_k_splits", "xla_ffi_handlers")

ENTRY_POINTS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter",
                "dense_forward", "dense_backward", "softmax", "activation_backward")

ACT = {"linear": 0, "relu": 1, "sigmoid": 2, "tanh": 3}
SOFTMAX_CODE = 4

#: (entry point, label, parameters).  Small: the sanitizers slow kernels down 10-100x.
CASES = [
    ("conv2d_forward", "v1 relu, bias", dict(x=(2, 7, 6, 3), w=(3, 3, 3, 5), s=1, p="same", d=1,
                                            act="relu", variant=1, bias=True)),
    ("conv2d_forward", "v2 tanh, stride 2, asymmetric pads", dict(x=(2, 9, 8, 3), w=(3, 2, 3, 17), s=2,
                                                                  p=((1, 0), (0, 1)), d=1, act="tanh",
                                                                  variant=2, bias=True)),
    ("conv2d_forward", "v3 float4 path (C, F % 4 == 0)", dict(x=(2, 10, 10, 8), w=(3, 3, 8, 68), s=1,
                                                              p="valid", d=1, act="sigmoid", variant=3,
                                                              bias=True)),
    ("conv2d_forward", "v3 scalar path, dilation, no bias", dict(x=(1, 9, 9, 3), w=(3, 3, 3, 5), s=1,
                                                                 p="same", d=2, act="linear", variant=3,
                                                                 bias=False)),
    ("conv2d_backward_data", "stride 2, pads", dict(x=(2, 9, 8, 3), w=(3, 3, 3, 5), s=2, p="same", d=1)),
    ("conv2d_backward_filter", "with db", dict(x=(2, 9, 8, 3), w=(3, 3, 3, 5), s=1, p="same", d=1,
                                               db=True)),
    ("conv2d_backward_filter", "without db, dilation", dict(x=(1, 9, 9, 2), w=(2, 2, 2, 3), s=1,
                                                            p="valid", d=2, db=False)),
    ("dense_forward", "no split", dict(m=13, k=37, n=70, act="relu", splits=1, bias=True)),
    ("dense_forward", "split-K x3", dict(m=5, k=600, n=7, act="tanh", splits=3, bias=True)),
    ("dense_forward", "heuristic split (few tiles, long K)", dict(m=8, k=4096, n=16, act="linear",
                                                                  splits=0, bias=False)),
    ("dense_backward", "no split, sigmoid", dict(m=13, k=37, n=70, act="sigmoid", splits=1)),
    ("dense_backward", "split-K x2, relu", dict(m=6, k=40, n=600, act="relu", splits=2)),
    ("softmax", "ragged rows", dict(rows=5, cols=300)),
    ("activation_backward", "element-wise tanh", dict(rows=3, cols=257, act="tanh")),
    ("activation_backward", "softmax rows", dict(rows=4, cols=33, act="softmax")),
]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="list the cases and check coverage only")
    return ap.parse_args(argv)


def _coverage():
    covered = {c[0] for c in CASES}
    missing = [e for e in ENTRY_POINTS if e not in covered]
    try:
        from dlconv import _C_cuda
    except ImportError as exc:
        return missing, f"dlconv._C_cuda is not importable here ({exc}): coverage checked against ENTRY_POINTS only"
    exported = [n for n in ENTRY_POINTS if hasattr(_C_cuda, n)]
    extra = sorted(n for n in dir(_C_cuda)
                   if not n.startswith("_") and callable(getattr(_C_cuda, n))
                   and n not in ENTRY_POINTS and n not in NOT_LAUNCHERS)
    note = f"dlconv._C_cuda exports {len(exported)}/{len(ENTRY_POINTS)} entry points"
    if extra:
        missing += [f"{n} (exported but not in ENTRY_POINTS)" for n in extra]
    return missing, note


def _run_case(C, cuda, ref, conv_geometry, entry, params, rng, stream):
    from dlconv.streams import stream_handle
    h = stream_handle(stream)
    dev = lambda a: cuda.to_device(a, stream=stream)  # noqa: E731
    out = lambda shape: cuda.device_array(shape, np.float32, stream=stream)  # noqa: E731
    rnd = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if entry.startswith("conv2d"):
        g = conv_geometry(params["x"], params["w"], params["s"], params["p"], params["d"])
        x, w, dz = rnd(*g.x_shape), rnd(*g.w_shape), rnd(*g.y_shape)
        if entry == "conv2d_forward":
            b = rnd(g.filters) if params["bias"] else None
            y = out(g.y_shape)
            C.conv2d_forward(dev(x), dev(w), None if b is None else dev(b), g.as_tuple(), ACT[params["act"]], y,
                             params["variant"], h)
            return [(y, ref.conv2d_forward(x, w, b, g, params["act"]), g.gemm_k)]
        if entry == "conv2d_backward_data":
            dx = out(g.x_shape)
            C.conv2d_backward_data(dev(dz), dev(w), g.as_tuple(), dx, h)
            return [(dx, ref.conv2d_backward_data(dz, w, g), g.k_h * g.k_w * g.filters)]
        dw = out(g.w_shape)
        db = out((g.filters,)) if params["db"] else None
        C.conv2d_backward_filter(dev(x), dev(dz), g.as_tuple(), dw, db, h)
        rdw, rdb = ref.conv2d_backward_filter(x, dz, g)
        return [(dw, rdw, g.gemm_m)] + ([(db, rdb, g.gemm_m)] if db is not None else [])
    if entry in ("dense_forward", "dense_backward"):
        m, k, n = params["m"], params["k"], params["n"]
        x, w, dy = rnd(m, k), rnd(k, n) / np.float32(np.sqrt(k)), rnd(m, n)
        C._set_split_k(params["splits"])          # 1: no split; 0: the heuristic's choice
        try:
            if entry == "dense_forward":
                b = rnd(n) if params["bias"] else None
                y = out((m, n))
                C.dense_forward(dev(x), dev(w), None if b is None else dev(b), ACT[params["act"]], y, h)
                return [(y, ref.dense_forward(x, w, b, params["act"]), k)]
            yv = ref.dense_forward(x, w, None, params["act"]).astype(np.float32)
            dx, dw, db = out((m, k)), out((k, n)), out((n,))
            C.dense_backward(dev(x), dev(w), dev(dy), dev(yv), ACT[params["act"]], dx, dw, db, h)
            rdx, rdw, rdb = ref.dense_backward(x, w, dy, yv, params["act"])
            return [(dx, rdx, n), (dw, rdw, m), (db, rdb, m)]
        finally:
            C._set_split_k(0)
    rows, cols = params["rows"], params["cols"]
    if entry == "softmax":
        z = rnd(rows, cols) * np.float32(10)
        y = out((rows, cols))
        C.softmax(dev(z), y, h)
        return [(y, ref.softmax(z.astype(np.float64)), cols)]
    act = params["act"]
    z, dy = rnd(rows, cols), rnd(rows, cols)
    yv = (ref.softmax(z.astype(np.float64)) if act == "softmax" else ref.activate(z.astype(np.float64), act))
    yv = yv.astype(np.float32)
    o = out((rows, cols))
    C.activation_backward(dev(dy), dev(yv), SOFTMAX_CODE if act == "softmax" else ACT[act], o, h)
    return [(o, ref.activation_backward(dy, yv, act), cols)]


class _HostArray(np.ndarray):
    """--dry-run's stand-in for a Numba device array."""

    def copy_to_host(self, stream=None):
        return np.array(self)


class _HostCuda:
    """--dry-run's stand-in for numba.cuda: host arrays."""

    @staticmethod
    def to_device(a, stream=None):
        return np.array(a, np.float32).view(_HostArray)

    @staticmethod
    def device_array(shape, dtype, stream=None):
        return np.full(shape, np.nan, dtype).view(_HostArray)


class _ReferenceC:
    """--dry-run's stand-in for dlconv._C_cuda: the same signatures, computed by the NumPy
    reference, so that every line of _run_case runs without a GPU."""

    def __init__(self):
        from dlconv import reference as ref
        from dlconv.shapes import ConvGeometry
        self.ref, self.G, self.splits = ref, ConvGeometry, 0
        self.acts = {v: k for k, v in ACT.items()}

    def _g(self, t):
        return self.G(*t)

    def _set_split_k(self, splits):
        self.splits = splits

    def conv2d_forward(self, x, w, b, t, act, y, variant, stream):
        assert variant in (1, 2, 3)
        y[...] = self.ref.conv2d_forward(x, w, b, self._g(t), self.acts[act])

    def conv2d_backward_data(self, dz, w, t, dx, stream):
        dx[...] = self.ref.conv2d_backward_data(dz, w, self._g(t))

    def conv2d_backward_filter(self, x, dz, t, dw, db, stream):
        rdw, rdb = self.ref.conv2d_backward_filter(x, dz, self._g(t))
        dw[...] = rdw
        if db is not None:
            db[...] = rdb

    def dense_forward(self, x, w, b, act, y, stream):
        y[...] = self.ref.dense_forward(x, w, b, self.acts[act])

    def dense_backward(self, x, w, dy, y, act, dx, dw, db, stream):
        for o, r in zip((dx, dw, db), self.ref.dense_backward(x, w, dy, y, self.acts[act])):
            o[...] = r

    def softmax(self, z, out, stream):
        out[...] = self.ref.softmax(np.asarray(z, np.float64))

    def activation_backward(self, dy, y, act, out, stream):
        out[...] = self.ref.activation_backward(dy, y, "softmax" if act == SOFTMAX_CODE else self.acts[act])


class _HostStream:
    handle = 0

    def synchronize(self):
        pass


def _check_all(C, cuda, stream) -> int:
    from dlconv import reference as ref
    from dlconv.shapes import conv_geometry

    rng = np.random.default_rng(0)
    bad = 0
    for entry, label, params in CASES:
        results = _run_case(C, cuda, ref, conv_geometry, entry, params, rng, stream)
        stream.synchronize()
        worst = 0.0
        for got, want, red in results:
            err = float(np.max(np.abs(got.copy_to_host(stream=stream) - want))) if want.size else 0.0
            stream.synchronize()
            limit = 1e-4 * max(1.0, float(np.sqrt(red))) * max(1.0, float(np.max(np.abs(want))))
            worst = max(worst, err / limit)
        ok = worst <= 1.0
        bad += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {entry:24s} {label}  (max error {worst:.2f} of the tolerance)")
    print(f"gpu_sanitize: {len(CASES) - bad}/{len(CASES)} cases match the reference")
    return bad


def main(argv=None) -> int:
    args = _parse(argv)
    missing, note = _coverage()
    print(f"gpu_sanitize: {len(CASES)} cases over {len(ENTRY_POINTS)} entry points; {note}")
    for entry, label, params in CASES:
        print(f"  {entry:24s} {label}")
    if missing:
        print("gpu_sanitize: entry points without a case: " + ", ".join(missing), file=sys.stderr)
        return 1
    if args.dry_run:
        print("gpu_sanitize: dry run: every case through the driver with the NumPy reference "
              "standing in for dlconv._C_cuda and host arrays for device arrays (no CUDA call)")
        return 1 if _check_all(_ReferenceC(), _HostCuda(), _HostStream()) else 0
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("gpu_sanitize: NUMBA_ENABLE_CUDASIM=1: the C++ kernels need real device arrays", file=sys.stderr)
        return 2
    from numba import cuda

    from dlconv import _C_cuda
    return 1 if _check_all(_C_cuda, cuda, cuda.stream()) else 0


if __name__ == "__main__":
    sys.exit(main())
