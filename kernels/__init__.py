"""dlconv.kernels: the Numba kernels (installed from kernels/ as ``dlconv.kernels``).

One module per operation and target, each opening with what one thread / iteration owns,
its index map, padding and ragged-edge handling and launch geometry:

``cpu_common``            fused activation, its derivative, the stack micro-tile (CPU)
``conv2d_cpu``            conv2d forward (cpu_v2_regblock, cpu_v1_direct), backward-data, -filter
``conv2d_cpu_small``      conv2d forward cpu_v3_smalltile (few filters)
``dense_cpu``             dense forward/backward, softmax, activation backward (CPU)
``cuda_common``           device functions shared by the CUDA kernels
``conv2d_cuda``           conv2d forward cuda_v1_direct, cuda_v2_halotile, cuda_v3_regblock
``conv2d_backward_cuda``  conv2d backward-data and backward-filter (CUDA)
``dense_cuda``            tiled matmul + epilogue, softmax, dense backward (CUDA)

Nothing is compiled at import: Numba compiles each kernel on its first call (the CPU
kernels are cached on disk with ``cache=True``).  Each module has ``launch_*`` functions
taking arrays and a :class:`dlconv.shapes.ConvGeometry`, so benchmarks can time one
variant directly.  The variants' names, passes and rules: the one table per kernel set in
:mod:`dlconv.variants` (``NUMBA_CPU``, ``NUMBA_CUDA``).
"""

import os as _os

import numba as _numba

#: Numba's threading layer for the ``parallel=True`` CPU kernels, pinned before any of them
#: runs: ``workqueue`` survives ``fork()`` (multiprocessing's default start method on Linux,
#: data-loader workers), while the ``omp`` layer Numba would pick here (GNU OpenMP) kills a
#: forked child that runs a kernel ("fork() called from a process already using GNU
#: OpenMP").  workqueue is not thread-safe, which dlconv.ops already provides for: host
#: kernels run one at a time (ops.HOST_THREAD).  Measured on the 2-core test machine it is
#: no slower than omp (conv2 forward, backward-filter, dense1 forward).  A user's own
#: NUMBA_THREADING_LAYER, or a layer set in numba.config beforehand, is left alone.
THREADING_LAYER = "workqueue"
if "NUMBA_THREADING_LAYER" not in _os.environ and _numba.config.THREADING_LAYER == "default":
    _numba.config.THREADING_LAYER = THREADING_LAYER
