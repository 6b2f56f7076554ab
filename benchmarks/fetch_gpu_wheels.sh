#!/usr/bin/env bash
# Download, on a machine with network access, the pure-Python pieces of Keras that the GPU
# machine lacks (keras, namex; optree is compiled: its CPython 3.12 manylinux wheel) into
# .whl/ (ignored by git). benchmarks/gpu_check.sh installs them into a scratch folder on
# PYTHONPATH before its Keras step; everything else Keras needs (absl-py, h5py, ml-dtypes,
# rich, numpy, packaging) is already on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "keras==${KERAS_VERSION:-3.15.1}" namex optree
ls -l .whl
