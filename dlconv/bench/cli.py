"""``dlconv bench``'s command line: :func:`add_arguments` and :func:`run`."""

from __future__ import annotations

import os
import sys
import time
from typing import List, Sequence

from .builtins import TensorFlowBuiltin
from .cases import ALL_PASSES, BATCH, LAYER_BY_NAME, TIMED_BACKENDS, plan
from .suites import SUITE_CHOICES, select, suite_layers, suite_train_steps
from .machine import describe_machine, loadavg as _loadavg, machine_slug, real_gpu_present
from .report import format_text, new_result, writable_folder, write_outputs
from .roofline import ensure_roof
from .suite import run_kernels
from .targets import summarize_targets
from .timing import HostPlace, NumbaCudaPlace, Settings
from .train_step import run_train_step
from .user_kernels import load_kernel, registered


def _csv(value: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} must be a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return items


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and shorter samples: about 20 seconds on 2 cores")
    parser.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    parser.add_argument("--name", default=None,
                        help="file stem of the outputs (default DATE-MACHINE, e.g. 2026-11-30-cpu-xeon-2core)")
    parser.add_argument("--backends", default=",".join(TIMED_BACKENDS),
                        help="backends to time, comma-separated (default cpp,numba; the reference "
                             "backend is the correctness oracle and is never timed)")
    parser.add_argument("--suite", choices=SUITE_CHOICES, default="mnist",
                        help="which shapes: mnist (default: the MNIST CNN at batch 128), ecal (every "
                             "conv shape of the physics ResNet at batch 32 and the shapes of issue "
                             "13's table, each at its own batch, and the ResNet's train step), groups "
                             "(grouped and depthwise 3x3 convs, issue 11), all")
    parser.add_argument("--layers", default=None,
                        help="layers of the suite, comma-separated (default all; mnist: "
                             + ",".join(LAYER_BY_NAME) + "; an unknown name lists the suite's)")
    parser.add_argument("--passes", default="forward,backward",
                        help="passes, comma-separated: forward, backward-data, backward-filter, "
                             "backward (dense; also selects both conv backward passes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per case, median reported (default 7, --quick 3)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size of every layer and train step (default {BATCH}; the ecal "
                             "suite's layers and ResNet step at their own batch)")
    parser.add_argument("--no-train-step", action="store_true",
                        help="skip the end-to-end training steps (MNIST CNN, ResNet)")
    parser.add_argument("--no-inference", action="store_true",
                        help="skip the MNIST CNN inference rows at batch 1 and 8 (dlconv(cpp) vs "
                             "stock Keras on TensorFlow; run with the MNIST train step, so "
                             "--no-train-step skips them too)")
    parser.add_argument("--no-keras-backends", action="store_true",
                        help="skip the train step and bridge overhead on the torch and JAX Keras "
                             "backends (each measured in a child process)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when a real GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kernel", action="append", default=[], metavar="MODULE:FUNCTION[@PASS]",
                        help="your own kernel, checked against dlconv.reference on generated "
                             "geometries, then timed beside dlconv's variants and the built-in "
                             "(repeatable); MODULE is an importable module or a file.py; PASS the "
                             "op whose signature it has: conv2d (default, or the function's "
                             "dlconv_pass attribute), conv2d_backward_data, conv2d_backward_filter, "
                             "dense, dense_backward")


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    suite = getattr(args, "suite", "mnist")
    layers = suite_layers(suite)
    if args.layers is not None:
        layers = select(layers, _csv(args.layers, tuple(layer.name for layer in layers), "layers"))
    passes = _csv(args.passes, ALL_PASSES, "passes")
    if "backward" in passes:
        passes = sorted(set(passes) | {"backward-data", "backward-filter"}, key=ALL_PASSES.index)
    backends = _csv(args.backends, ("cpp", "numba", "reference"), "backends")
    notes = []
    if "reference" in backends:
        backends.remove("reference")
        notes.append("the reference backend is the correctness oracle and is not timed")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    batch = dict(batch=BATCH if args.batch is None else args.batch, batch_fixed=args.batch is not None)
    settings = Settings(**batch)
    if args.quick:
        settings = Settings(**batch, repeats=3, warmup=1, min_sample_s=0.02, train_repeats=7)
    if args.repeats is not None:
        settings.repeats = settings.train_repeats = args.repeats
    progress = not args.no_progress
    kernels = registered() + [load_kernel(spec) for spec in args.kernel]

    machine = describe_machine()
    places: list = []
    if args.device in ("auto", "cpu"):
        places.append(HostPlace())
    gpu = real_gpu_present()
    if args.device == "cuda" and not gpu:
        raise ValueError("--device cuda needs a real CUDA GPU (the simulator is never timed)")
    if gpu and args.device in ("auto", "cuda"):
        places.append(NumbaCudaPlace())
    elif args.device == "auto":
        notes.append("no real CUDA GPU here: CUDA variants were not run (the simulator is never timed)")
    try:
        builtin = TensorFlowBuiltin()
        builtin_why = ""
    except ImportError as exc:
        builtin, builtin_why = None, f"TensorFlow is not installed: {exc}"
    if builtin is not None and gpu and not builtin.gpu_available():
        notes.append("TensorFlow sees no GPU: CUDA rows have no built-in to compare with")
    kind = "gpu" if any(p.device == "cuda" for p in places) else "cpu"
    result = new_result(kind, machine, settings, builtin.label if builtin else "none",
                        quick=bool(args.quick), notes=notes, suite=suite)
    result["notes"].append("dense backward = dx, dw and db in one op (the layer's backward); "
                           "its FLOPs count both products")
    name = args.name or (f"{result['date']}-{machine_slug(machine, 'cuda' if kind == 'gpu' else 'cpu')}"
                         + ("" if suite == "mnist" else f"-{suite}"))
    print(f"dlconv bench: {machine['description']}", file=sys.stderr)
    out_dir, out_note = writable_folder(args.out)    # before the run: never lose a finished one
    if out_note:
        print(f"dlconv bench: {out_note}", file=sys.stderr)
        result["notes"].append(out_note)
    load_before = _loadavg()
    t0 = time.perf_counter()

    rows = run_kernels(plan(layers, passes), places, backends, builtin, settings,
                       progress=progress, builtin_why=builtin_why, kernels=kernels)
    result["rows"] = rows
    train_models = [] if args.no_train_step else suite_train_steps(suite)
    for model in train_models:
        result["train_rows"] += run_train_step(backends, settings, progress=progress, model=model)
    if "mnist_cnn" in train_models:
        if not args.no_keras_backends:
            from .keras_backends import run_keras_backends
            print("dlconv bench: the train step and bridge overhead on the torch and JAX Keras "
                  "backends (a process each)", file=sys.stderr)
            kb_rows, result["overhead_rows"] = run_keras_backends(
                backends, settings.batch, settings.train_repeats, settings.warmup,
                tf_rows=[r for r in result["train_rows"] if r["layer"] == "mnist_cnn"])
            result["train_rows"] += kb_rows
            from .keras_backends import BRIDGE_COST_NOTE
            result["notes"].append(BRIDGE_COST_NOTE)
    if "mnist_cnn" in train_models and not getattr(args, "no_inference", False) and "cpp" in backends:
        from .inference import quick_settings, run_inference
        print("dlconv bench: MNIST CNN inference at batch 1 and 8 vs stock Keras", file=sys.stderr)
        result["inference_rows"] = run_inference("cpp", progress=progress, seed=settings.seed,
                                                 **quick_settings(bool(args.quick)))
    result["targets"] = summarize_targets(rows, result["train_rows"])
    if result.get("inference_rows"):
        from .inference import inference_targets
        result["targets"] += inference_targets(result["inference_rows"])
    result["elapsed_s"] = time.perf_counter() - t0
    result["loadavg"] = {"before": load_before, "after": _loadavg()}
    if load_before is not None:
        before, after = load_before[0], result["loadavg"]["after"][0]
        note = (f"1-minute load average {before:.1f} before and {after:.1f} after the run on "
                f"{machine['cores']} cores (the run itself keeps about {machine['cores']} busy)")
        if max(before, after) > (machine["cores"] or 1) + 0.5:
            note += ("; above that, other processes competed for the CPU and multi-threaded "
                     "kernels (OpenMP, Numba parallel) waited at their barriers; the round-robin "
                     "sampling spreads that over all contenders")
        result["notes"].append(note)
    print("dlconv bench: measuring the roof (compute peak, memory bandwidth)", file=sys.stderr)
    ensure_roof(result)
    paths = write_outputs(result, out_dir, name)
    print(format_text(result))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}, {paths['roofline']} in "
          f"{result['elapsed_s']:.0f} s")
    failed = [r["impl"] + " " + r["layer"] + " " + r["pass"]
              for r in rows + result["train_rows"] + result.get("inference_rows", [])
              if r["status"] in ("failed", "error") and r.get("backend") != "builtin"]
    if failed:
        print(f"dlconv bench: {len(failed)} case(s) failed their correctness check or raised: "
              + "; ".join(failed), file=sys.stderr)
        return 1
    return 0
