"""GPU check, Python part: dlconv's CUDA kernels (Numba and C++) against cuDNN and cuBLAS
through torch, on a machine with one NVIDIA GPU and no TensorFlow.

    python benchmarks/gpu_bench.py OUT_DIR              # real GPU: MNIST CNN shapes, batch 128
    python benchmarks/gpu_bench.py OUT_DIR --dry-run    # CPU only: CUDA simulator, tiny shapes

Nothing on this path imports TensorFlow (checked at the end).  What it does:

* the layer shapes and passes of :mod:`dlconv.bench` (conv1, conv2, dense1, dense2 at batch
  128; forward, backward-data, backward-filter; dense forward and backward), every backend
  whose CUDA half runs here and every CUDA conv-forward variant;
* the built-in: torch with TF32 off (``torch.backends.cudnn.allow_tf32 = False``,
  ``torch.backends.cuda.matmul.allow_tf32 = False``) and ``cudnn.benchmark = True`` (cuDNN
  picks its fastest algorithm during the warm-up).  Layout: torch's convolution is NCHW
  (its native layout, tried as plain NCHW and as ``channels_last``, the faster counts);
  ours is NHWC with HWIO weights.  The layout conversions happen once, outside the timing.
  Conv gradients: ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` (+ the bias gradient
  ``dy.sum``); dense: ``addmm`` + activation, and for the backward the ops torch's autograd
  runs (``threshold_backward`` / ``_softmax_backward_data``, two ``mm``, a ``sum``);
* inputs are torch CUDA tensors, handed to ``dlconv.ops`` as they are (they carry
  ``__cuda_array_interface__``), on torch's current stream (given to our ops as a Numba
  external stream).  ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0``: everything runs on that one
  stream, so Numba's per-import stream synchronisation would only add host stalls;
* timing: CUDA events (``torch.cuda.Event``) around ``inner`` back-to-back calls on that
  stream, warm-up excluded, median of the samples; every output checked against
  ``dlconv.reference`` first (a wrong kernel is shown as failed and not timed).

``--dry-run`` runs the same code end to end on a CPU-only machine: Numba's CUDA simulator,
tiny shapes, our outputs as simulator device arrays, host-clock timings (meaningless as
GPU figures, and labelled so), and torch's CPU ops as the built-in when torch is
installed, else the NumPy reference, with a note saying which.

Writes OUT_DIR/gpu-bench.json, OUT_DIR/gpu-bench.md and OUT_DIR/gpu-bench.png (the JSON
after every layer/pass, so a run cut short still leaves its results).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu-check-out",
                    help="output folder (default $OUT or ./gpu-check-out)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU-only rehearsal: CUDA simulator, tiny shapes, torch optional")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 10)")
    ap.add_argument("--backends", default="cpp,numba", help="backends, comma-separated")
    ap.add_argument("--layers", default=None, help="layers, comma-separated (default all)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop starting new cases after this many seconds (default 300)")
    ap.add_argument("--name", default="gpu-bench", help="file stem of the outputs")
    return ap.parse_args(argv)


def _setup_env(dry_run: bool):
    """Environment that must be set before numba.cuda is imported."""
    if dry_run:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            sys.exit("gpu_bench: NUMBA_ENABLE_CUDASIM=1 is set but this is not a --dry-run; "
                     "unset it to time the real GPU")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")


def _import_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


# ----------------------------------------------------------------------------- places
def torch_place(torch):
    """Torch CUDA tensors on torch's current stream; CUDA-event timing."""
    from numba import cuda

    from dlconv import bench

    class TorchCudaPlace(bench.HostPlace):
        device = "cuda"
        simulated = False

        def __init__(self):
            # One dedicated stream (not the legacy default stream, handle 0), made torch's
            # current stream: torch's ops, our ops and the events all run on it.
            self._ts = torch.cuda.Stream()
            torch.cuda.set_stream(self._ts)
            self._ns = cuda.external_stream(self._ts.cuda_stream)

        def put(self, a):
            return torch.from_numpy(a).to("cuda")

        def stream(self):
            return self._ns

        def sync(self):
            self._ts.synchronize()

        def time_block(self, fn, inner):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record(self._ts)
            for _ in range(inner):
                fn()
            end.record(self._ts)
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / inner

    return TorchCudaPlace()


def simulator_place():
    """Numba simulator device arrays, timed with the host clock (dry run only)."""
    from dlconv import bench

    place = bench.NumbaCudaPlace()
    assert place.simulated, "simulator place outside the simulator"
    place.time_anyway = True          # exercise the timing code; figures are not GPU figures
    return place


# ----------------------------------------------------------------------------- built-ins
# torch's cuDNN / cuBLAS ops, from the bench package's table of passes (imports torch lazily).
from dlconv.bench.builtins import TorchBuiltin  # noqa: E402


def tf32_table(rows) -> str:
    """Markdown: the built-in with TF32 allowed beside its fp32 (TF32 off) time, per layer/pass."""
    lines = []
    for r in rows:
        if r.get("backend") != "builtin" or not r.get("side_modes"):
            continue
        fp32 = r.get("median_s")
        for mode, t in r["side_modes"].items():
            speed = f"{fp32 / t:.2f}x" if (fp32 and t) else "-"
            lines.append(f"| {r['layer']} | {r['pass']} | {mode} | "
                         f"{'-' if t is None else f'{t * 1e3:.3f} ms'} | "
                         f"{'-' if fp32 is None else f'{fp32 * 1e3:.3f} ms'} | {speed} |")
    if not lines:
        return ""
    return ("### The built-in with TF32 (reported beside, not compared against)\n\n"
            "| layer | pass | mode | time | fp32 (TF32 off) time | TF32 speed-up |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = _parse(argv)
    _setup_env(args.dry_run)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import numpy as np  # noqa: F401  (numpy before numba, as usual)

    from dlconv import bench

    torch = _import_torch()
    notes = ["layout: the built-in convolution runs in torch's NCHW (plain NCHW and "
             "channels_last tried, the faster counts); dlconv runs NHWC activations with HWIO "
             "weights; conversions are outside the timing",
             "dense backward = dx, dw and db in one op; its FLOPs count both products"]
    if args.dry_run:
        layers = (
            bench.Layer("tiny-conv", "conv", (6, 6, 2), (3, 3, 2, 3), "relu"),
            bench.Layer("tiny-dense", "dense", (16,), (16, 4), "relu"),
            bench.Layer("tiny-softmax", "dense", (8,), (8, 3), "softmax"),
        )
        settings = bench.Settings(batch=2, repeats=args.repeats or 2, warmup=1, min_sample_s=0.0,
                                  budget_s=args.budget_s)
        place = simulator_place()
        if torch is not None:
            builtin = TorchBuiltin(torch, "cpu")
            notes.append("DRY RUN: CUDA simulator, tiny shapes; the built-in is torch's CPU ops; "
                         "times are host-clock simulator times, NOT GPU figures")
        else:
            builtin = bench.ReferenceBuiltin()
            notes.append("DRY RUN: CUDA simulator, tiny shapes; torch is not installed, so the "
                         "built-in is the NumPy reference; times are host-clock simulator times, "
                         "NOT GPU figures")
        kind = "gpu-dry-run"
    else:
        if torch is None or not torch.cuda.is_available():
            print("gpu_bench: torch with CUDA is required for the real GPU check "
                  f"({'torch not installed' if torch is None else 'torch sees no GPU'}); "
                  "use --dry-run on a CPU-only machine", file=sys.stderr)
            return 2
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        layers = bench.LAYERS
        if args.layers:
            layers = [bench.LAYER_BY_NAME[n] for n in args.layers.split(",")]
        settings = bench.Settings(repeats=args.repeats or 10, warmup=3, min_sample_s=0.02,
                                  budget_s=args.budget_s)
        place = torch_place(torch)
        builtin = TorchBuiltin(torch, "cuda")
        notes.append("timing: CUDA events on torch's current stream around back-to-back calls; "
                     "dlconv's outputs are allocated by Numba (no caching allocator), torch's by "
                     "its caching allocator; that cost is part of each op as a user calls it")
        kind = "gpu"

    machine = bench.describe_machine()
    if torch is not None:
        machine["torch"] = torch.__version__
        if not args.dry_run:
            machine["gpu"] = torch.cuda.get_device_name(0)
            machine["gpu_names"] = [machine["gpu"]]
            machine["cudnn"] = torch.backends.cudnn.version()
            machine["torch_cuda"] = torch.version.cuda
    machine["description"] = (f"{machine['cpu_brand']}, {machine['cores']} cores; GPU: {machine['gpu']}; "
                              f"torch {machine.get('torch', 'not installed')}"
                              + (f" (CUDA {machine.get('torch_cuda')}, cuDNN {machine.get('cudnn')})"
                                 if not args.dry_run else "")
                              + "; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    result = bench.new_result(kind, machine, settings, builtin.label, notes=notes)
    backends = [b for b in args.backends.split(",") if b]
    print(f"gpu_bench: {machine['description']}", flush=True)
    print(f"gpu_bench: built-in = {builtin.label}", flush=True)

    def save(rows):
        result["rows"] = list(rows)
        result["targets"] = bench.summarize_targets(result["rows"])
        result["elapsed_s"] = time.perf_counter() - t0
        import json
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")

    pairs = bench.plan(layers, bench.ALL_PASSES)
    rows = bench.run_kernels(pairs, [place], backends, builtin, settings, progress=False,
                             on_row=save)
    save(rows)
    paths = bench.write_outputs(result, out, args.name)
    side = tf32_table(rows)
    if side:
        with open(paths["md"], "a") as f:
            f.write("\n" + side)
    print(bench.format_text(result), flush=True)
    print(f"\ngpu_bench: wrote {', '.join(str(p) for p in paths.values())} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)

    if "tensorflow" in sys.modules:
        print("gpu_bench: ERROR: TensorFlow was imported on the GPU-check path", file=sys.stderr)
        return 3
    bad = [r for r in rows if r["status"] in ("failed", "error") and r["backend"] != "builtin"]
    if bad:
        print(f"gpu_bench: {len(bad)} case(s) failed or raised: "
              + "; ".join(f"{r['layer']} {r['pass']} {r['impl']}: {r['why']}" for r in bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
