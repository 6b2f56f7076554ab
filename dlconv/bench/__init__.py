"""Benchmark the kernels against the framework's built-in ops: ``dlconv bench``.

What is measured
----------------
Every layer shape of the workshop's MNIST CNN at batch 128 (:data:`LAYERS`), every pass
(forward, backward-data, backward-filter for a convolution; forward and backward for a
dense layer, whose backward is one op here: dx, dw and db together), every usable backend
and conv-forward kernel variant, next to the built-in op measured in the same process:

* CPU: TensorFlow (oneDNN): ``tf.nn.conv2d`` + bias + activation, its gradients
  ``tf.raw_ops.Conv2DBackpropInput`` / ``Conv2DBackpropFilter`` (+ ``BiasAddGrad``),
  ``matmul`` + bias + activation and the same ops TensorFlow's registered gradients use;
  each tried eagerly and inside ``tf.function``, and the faster counts.
* CUDA (only when a real GPU is present, never the simulator): the same ops on
  TensorFlow's GPU (cuDNN, cuBLAS) when TensorFlow sees one.  ``benchmarks/gpu_bench.py``
  is the GPU check for machines without TensorFlow (torch's cuDNN/cuBLAS).

Plus the end-to-end MNIST CNN training step, dlconv layers vs stock Keras layers.
``--suite ecal`` measures the physics ResNet's conv shapes and issue 13's instead (each at
its own batch) and the ResNet's train step; ``--suite all`` both (:mod:`.suites`).

Honesty rules the harness enforces
----------------------------------
* The first call of every case is a warm-up (JIT compilation, tracing, caches) and its
  output is the one checked against :mod:`dlconv.reference`; further warm-up calls follow,
  then ``repeats`` timed samples.  A sample is ``inner`` back-to-back calls divided by
  ``inner``, with ``inner`` chosen so that one sample lasts at least ``min_sample_s``
  (timer resolution).  The reported time is the median of the samples.  The samples of
  all contenders for one layer/pass (the built-in's modes and ours) are taken round-robin,
  so a load burst on a shared machine hits them alike.
* Correctness: each output (ours and the built-in's) is compared with the NumPy reference
  on the *same inputs at the full batch*; the reference runs once per layer and pass and
  is reused.  A case whose error exceeds :data:`TOLERANCE` is shown as failed and is not
  timed.  The reference backend itself is never timed (it is the oracle).
* Ratio: ``t_builtin / t_ours`` (= throughput ours / throughput built-in; > 1 means we
  are faster).  The train step reports ``t_ours / t_stock`` (≤ 1 means we are faster).
* Every figure in a table comes from this run; :data:`TARGETS` are the only typed-in
  numbers, and they are goals, not results.

Where things are
----------------
=====================  ==============================================================
``passes``             the table of passes: inputs, dlconv's op, reference, built-ins, FLOPs
``cases``              the layer catalogue, problems (inputs + reference outputs), tolerance
``timing``             places (host clock, CUDA events), calibration, round-robin medians
``builtins``           TensorFlow (oneDNN/cuDNN), torch (cuDNN/cuBLAS), the NumPy stand-in
``suite``              the kernel suite: check every case, time the correct ones together
``user_kernels``       bring your own kernel: register, check on generated geometries, name
                       the first wrong element, the ``dlconv explain`` command reproducing it
``roofline``           the machine's measured compute peak and memory bandwidth; the roofline PNG
``targets``            the goals (the only typed-in numbers) and whether a run met them
``suites``             the shape suites (``--suite mnist|ecal|all``): layers, and models whose
                       Conv2D shapes are read off (the physics ResNet)
``train_step``         the train step (MNIST CNN, physics ResNet) on Keras' TensorFlow backend
``keras_backends``     the train step and bridge overhead on torch/JAX (child processes)
``machine``            CPU, GPU and versions of the machine a run came from
``report``             result record, text/Markdown tables, bar chart, outputs
``cli``                ``dlconv bench``'s arguments and run
=====================  ==============================================================

Importing this package imports neither TensorFlow nor Numba (``benchmarks/gpu_bench.py``
reuses it on machines without TensorFlow).
"""

from __future__ import annotations


from .builtins import BuiltinProvider, ReferenceBuiltin, TensorFlowBuiltin, TorchBuiltin
from .cases import (ALL_PASSES, BATCH, CONV_PASSES, DENSE_PASSES, LAYER_BY_NAME, LAYERS,
                    TIMED_BACKENDS, TOLERANCE, Layer, Problem, as_tuple, make_problem,
                    max_rel_error, plan, to_host)
from .cli import _csv, add_arguments, run
from .machine import describe_machine, machine_slug, real_gpu_present
from .passes import PASS_BY_OP, PASSES, Pass
from .report import (SCHEMA, format_markdown, format_text, new_result, overhead_table_rows,
                     table_rows, train_table_rows, write_chart, write_outputs)
from .suite import our_call, our_impls, run_kernels, variants_for
from .suites import (ECAL_BATCH, ISSUE13_LAYERS, SUITE_CHOICES, SUITE_TRAIN_STEPS, SUITES,
                     ModelShapes, model_conv_layers, suite_layers, suite_train_steps)
from .targets import (BRIDGE_COST_TARGET, MODEL_TRAIN_TARGETS, STEP_TARGETS, SUITE_TARGETS,
                      TARGETS, TRAIN_TARGETS, SuiteTarget, Target, summarize_targets, target_for)
from .timing import (MAX_INNER, MIN_SAMPLE_S, HostPlace, NumbaCudaPlace, Settings, Timing,
                     calibrate, measure, measure_interleaved)
from .user_kernels import (UserKernel, check_kernel, clear_kernels, load_kernel,
                           register_kernel, registered)
from .train_step import TRAIN_MODELS, TRAIN_PROBE_STEPS, TrainModel, mnist_cnn_builder, run_train_step

__all__ = [n for n in dir() if not n.startswith("__") and n not in ("annotations",)]
