#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU, CUDA's nvcc and compute-sanitizer, Python 3.12
# with numba, numba-cuda, pybind11, pytest, torch and CuPy, and no TensorFlow and no network.
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]        (OUT_DIR defaults to $OUT, else ./gpu-check-out)
#
# Steps, all under one deadline (8 minutes in all), each with its own cap:
#   machine    nvidia-smi, nvcc, compute-sanitizer, python, package versions
#   build      pip install --no-build-isolation --no-deps --no-index -e .  for this GPU's
#              compute capability only (sm_90 on an H200); nothing is downloaded
#   info       dlconv info, and importing dlconv's op path never imports TensorFlow
#   tests      pytest -m gpu tests/ with DLCONV_REQUIRE_GPU=1 (a gpu test that would be
#              skipped fails instead) -> pytest-gpu.xml
#   sanitizer  compute-sanitizer memcheck, racecheck, initcheck, synccheck over
#              benchmarks/gpu_sanitize.py (every C++ CUDA kernel once, small shapes)
#   keras      benchmarks/gpu_keras_epoch.py: one MNIST CNN epoch through Keras on torch and
#              on JAX, dlconv layers vs stock (cuDNN) -> gpu-keras.json; Keras comes from the
#              wheels benchmarks/fetch_gpu_wheels.sh left in .whl/
#   bench      benchmarks/gpu_bench.py: every kernel vs cuDNN/cuBLAS through torch with CUDA
#              events, TF32 off, and the TF32 default reported beside -> gpu-bench.{json,md,png}
#
# Result files (at most 8 come back from the GPU machine): gpu_check.log (every step's output),
# summary.md, pytest-gpu.xml, gpu-bench.json, gpu-bench.md, gpu-bench.png, gpu-bench-roofline.png,
# gpu-keras.json.
#
# --dry-run rehearses every step on a CPU-only machine: the build compiles into a scratch folder
# (the installed package is left alone), TensorFlow is hidden from Python (as on the GPU
# machine), Numba runs its CUDA simulator, the sanitizer step prints its commands and runs the
# driver's own --dry-run, the bench uses tiny shapes with torch's CPU ops (or the reference) as
# the stand-in built-in.  Exit status: 0 when every step passed.
set -uo pipefail

DRY=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-470}"      # the whole check must end within 8 minutes
START=$(date +%s)
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.md"
SCRATCH="$(mktemp -d)"                    # never inside OUT_DIR: only result files go there
trap 'rm -rf "$SCRATCH"' EXIT
FAILED=0

exec > >(tee -a "$LOG") 2>&1

remaining() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# run_step NAME CAP_SECONDS COMMAND...: runs under `timeout` (output into the one log), records
# the outcome in summary.md.
run_step() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    echo "== $name: skipped, the 8-minute budget is spent"
    echo "| $name | skipped (time budget spent) | 0 s |" >> "$SUMMARY"
    FAILED=1
    return 1
  fi
  echo "== $name (limit ${limit} s): $*"
  local t0; t0=$(date +%s)
  # bash -c so that the exported shell functions below can be steps too
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  if (( rc == 124 || rc == 137 )); then what="timed out after ${limit} s"; elif (( rc != 0 )); then what="failed (exit $rc)"; fi
  echo "== $name: $what in ${dt} s"
  echo "| $name | $what | ${dt} s |" >> "$SUMMARY"
  return $rc
}

# note_step NAME WHAT: a step that did not run, and why, in the log and the summary.
note_step() {
  echo "== $1: $2"
  echo "| $1 | $2 | 0 s |" >> "$SUMMARY"
}

{
  echo "# dlconv GPU check$( ((DRY)) && echo ' (DRY RUN: CUDA simulator, no GPU figures)')"
  echo
  echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))."
  echo
  echo "| step | outcome | time |"
  echo "|---|---|---|"
} > "$SUMMARY"

if (( DRY )); then
  export NUMBA_ENABLE_CUDASIM=1
  # Hide TensorFlow, as on the GPU machine: `import tensorflow` fails on this path.
  mkdir -p "$SCRATCH/notf/tensorflow"
  echo 'raise ModuleNotFoundError("No module named tensorflow (hidden by gpu_check.sh --dry-run: the GPU machine has none)", name="tensorflow")' \
    > "$SCRATCH/notf/tensorflow/__init__.py"
  export PYTHONPATH="$SCRATCH/notf${PYTHONPATH:+:$PYTHONPATH}"
else
  unset NUMBA_ENABLE_CUDASIM
  export DLCONV_REQUIRE_GPU=1            # a gpu-marked test that would be skipped fails
fi
export NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0
export TF_CPP_MIN_LOG_LEVEL=2
export PY OUT_DIR REPO SCRATCH DRY

# compute-sanitizer: on PATH, else beside nvcc's toolkit
SANITIZER="$(command -v compute-sanitizer || true)"
for cand in "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; do
  [[ -z "$SANITIZER" && -x "$cand" ]] && SANITIZER="$cand"
done
export SANITIZER

# machine ------------------------------------------------------------------------------------
machine() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi || echo "nvidia-smi: not available"
  (nvcc --version || echo "nvcc: not found") | tail -n 2
  if [[ -n "$SANITIZER" ]]; then "$SANITIZER" --version | tail -n 1; else echo "compute-sanitizer: not found"; fi
  "$PY" --version
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(numba|numba-cuda|torch|jax|jaxlib|keras|cupy|cupy-cuda[0-9x]+|pybind11|numpy|pytest|setuptools|tensorflow) ' || true
  nproc
}
export -f machine
run_step machine 30 machine

# build: this GPU's compute capability only (half the nvcc time of two architectures) ------
ARCH=""
if command -v nvidia-smi >/dev/null 2>&1; then
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
fi
if [[ "$ARCH" =~ ^[0-9]+$ ]]; then
  export DLCONV_CUDA_ARCHS="$ARCH"
else
  export DLCONV_CUDA_ARCHS="${DLCONV_CUDA_ARCHS:-90}"
fi
if command -v nvcc >/dev/null 2>&1; then export DLCONV_CUDA=1; fi

build_real() {
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ; then
    return 0
  fi
  echo "pip editable install failed; falling back to setup.py build_ext --inplace + PYTHONPATH"
  "$PY" setup.py build_ext --inplace || return 1
  # setup.py maps dlconv.kernels to the top-level kernels/ folder; mirror that for PYTHONPATH use.
  [[ -e dlconv/kernels ]] || ln -s ../kernels dlconv/kernels
  echo "$REPO" > "$SCRATCH/pythonpath"
}
build_dry() {
  # Same compiler path, into a scratch folder: the installed package here is left untouched.
  "$PY" setup.py build_ext -b "$SCRATCH/lib" -t "$SCRATCH/tmp" || return 1
  ls -l "$SCRATCH"/lib/dlconv/
}
export -f build_real build_dry
if (( DRY )); then
  run_step build 400 build_dry || FAILED=1
else
  run_step build 240 build_real || FAILED=1
  if [[ -f "$SCRATCH/pythonpath" ]]; then export PYTHONPATH="$(cat "$SCRATCH/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"; fi
fi

# info ---------------------------------------------------------------------------------------
info() {
  "$PY" -m dlconv info || return 1
  "$PY" - <<'EOF'
import sys
import dlconv, dlconv.ops, dlconv.backends, dlconv.bench
dlconv.backends.available()
assert "tensorflow" not in sys.modules, "importing dlconv's op path imported TensorFlow"
print("ok: dlconv's op path imports without TensorFlow")
EOF
}
export -f info
run_step info 60 info || FAILED=1

# tests --------------------------------------------------------------------------------------
tests() {
  "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT_DIR/pytest-gpu.xml"
  # the verdict: failures, errors, and modules with gpu tests that did not import (pytest's own
  # exit status also counts collection errors of modules that need TensorFlow and have no gpu test)
  "$PY" benchmarks/gpu_check_junit.py "$OUT_DIR/pytest-gpu.xml"
}
export -f tests
run_step tests 120 tests || FAILED=1

# sanitizer ----------------------------------------------------------------------------------
export SAN_TOOLS="memcheck racecheck initcheck synccheck"
sanitizer() {
  local tool rc=0
  for tool in $SAN_TOOLS; do
    local cmd=("${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 1 --print-limit 20
               "$PY" benchmarks/gpu_sanitize.py)
    if (( DRY )); then echo "-- would run: ${cmd[*]}"; continue; fi
    echo "-- $tool"
    "${cmd[@]}" || { echo "-- $tool: FAILED"; rc=1; }
  done
  if (( DRY )); then "$PY" benchmarks/gpu_sanitize.py --dry-run || rc=1; fi
  return $rc
}
export -f sanitizer
if [[ -z "$SANITIZER" ]] && (( ! DRY )); then
  note_step sanitizer "failed (compute-sanitizer not found)"; FAILED=1
else
  run_step sanitizer 100 sanitizer || FAILED=1
fi

# keras: one MNIST CNN epoch through Keras on torch and on JAX, dlconv vs stock -------------
# Keras, namex and optree are not on the GPU machine: benchmarks/fetch_gpu_wheels.sh puts
# their wheels in .whl/ beforehand (carried with the checkout); they go into a scratch folder.
keras_epochs() {
  if ! KERAS_BACKEND=torch "$PY" -c "import keras" 2>/dev/null; then   # (no TensorFlow there)
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "keras is not importable and .whl/ holds no wheels: run benchmarks/fetch_gpu_wheels.sh first"
      return 1
    fi
    local site; site="$(mktemp -d)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" benchmarks/gpu_keras_epoch.py "$OUT_DIR" --budget-s 110 "$@"
}
export -f keras_epochs
if (( DRY )); then
  run_step keras 120 keras_epochs --dry-run || FAILED=1
else
  run_step keras 120 keras_epochs || FAILED=1
fi

# bench: gets what is left of the 8 minutes -------------------------------------------------
LEFT=$(remaining)
BENCH_CAP=$(( LEFT - 5 ))
BUDGET=$(( BENCH_CAP - 45 )); (( BUDGET < 20 )) && BUDGET=20
if (( DRY )); then
  run_step bench "$BENCH_CAP" "$PY" benchmarks/gpu_bench.py "$OUT_DIR" --dry-run --budget-s "$BUDGET" || FAILED=1
else
  run_step bench "$BENCH_CAP" "$PY" benchmarks/gpu_bench.py "$OUT_DIR" --budget-s "$BUDGET" || FAILED=1
fi

{
  echo
  echo "Finished in $(( $(date +%s) - START )) s; overall: $( ((FAILED)) && echo 'FAILED (see gpu_check.log)' || echo 'all steps passed')."
  echo
  [[ -f "$OUT_DIR/gpu-bench.md" ]] && cat "$OUT_DIR/gpu-bench.md"
  [[ -f "$OUT_DIR/gpu-keras.json" ]] && { echo; "$PY" benchmarks/gpu_keras_epoch.py --table "$OUT_DIR/gpu-keras.json"; }
} >> "$SUMMARY"
n_files=$(find "$OUT_DIR" -type f | wc -l)
echo "== result files in $OUT_DIR: $n_files (at most 8 come back)"
(( n_files > 8 )) && { echo "== ERROR: more than 8 result files"; FAILED=1; }
echo "== summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
