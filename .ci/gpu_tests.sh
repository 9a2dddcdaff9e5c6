#!/usr/bin/env bash
# GPU test run on a borrowed H200 (not part of CI, which has no GPU).
#
# Usage on the device machine, from the repository root:
#   bash .ci/gpu_tests.sh [pytest args...]
# Tests the cp312 wheel in .whl/ when there is one (built on the developer machine against
# jaxlib 0.10.2's FFI headers, so the run also checks that it loads on a newer jaxlib),
# else the jax_fp8gemm installed in this Python (`pip install --no-build-isolation .`).
# Logs go to $OUT (or /tmp/out).
set -uo pipefail
repo=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
. "$repo/.ci/gpu_install.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, jax_fp8gemm as f; print('jax', jax.__version__, jax.devices(), 'cuda_built', f.cuda_built(), 'fp8', f.has_fp8_support())" | tee -a "$out/gpu.txt"
python3 -m pytest /tmp/tests -q -m gpu -p no:cacheprovider --durations=10 "$@" 2>&1 | tee "$out/gpu_tests.log"
exit "${PIPESTATUS[0]}"
