"""dlconv.kernels: the Numba kernels (installed from kernels/ as ``dlconv.kernels``).

One module per operation and target, each opening with what one thread / iteration owns,
its index map, padding and ragged-edge handling and launch geometry:

``cpu_common``            fused activation, its derivative, the stack micro-tile (CPU)
``conv2d_cpu``            conv2d forward (cpu_gemm, cpu_direct), backward-data, -filter
``dense_cpu``             dense forward/backward, softmax, activation backward (CPU)
``cuda_common``           device functions shared by the CUDA kernels
``conv2d_cuda``           conv2d forward v1_direct, v2_smem_tiled, v3_implicit_gemm
``conv2d_backward_cuda``  conv2d backward-data and backward-filter (CUDA)
``dense_cuda``            tiled matmul + epilogue, softmax, dense backward (CUDA)

Nothing is compiled at import: Numba compiles each kernel on its first call (the CPU
kernels are cached on disk with ``cache=True``).  Each module has ``launch_*`` functions
taking arrays and a :class:`dlconv.shapes.ConvGeometry`, so benchmarks can time one
variant directly.
"""
