#!/usr/bin/env bash
# The benchmarks on a borrowed H200 (not part of CI), each under a time limit.
#
# Usage on the device machine, from the repository root (the package as in
# .ci/gpu_tests.sh):
#   bash .ci/gpu_bench.sh [dense|grouped|train ...]      (default: all three)
# dense runs the DeepSeek-V3 shapes and the squares; DeepGEMM joins dense and grouped
# when third_party/deepgemm_env.sh exists (docs/PERF.md says how it gets there; never
# committed). BENCH_TIMEOUT (seconds, default 280) limits each benchmark. JSON, logs and
# the dense plot go to $OUT (or /tmp/out).
set -uo pipefail
repo=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(dense grouped train)
. "$repo/.ci/gpu_install.sh"
if [ -f "$repo/third_party/deepgemm_env.sh" ]; then  # appends DeepGEMM to PYTHONPATH
  # shellcheck disable=SC1091
  . "$repo/third_party/deepgemm_env.sh"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
for bench in "${benches[@]}"; do
  extra=()
  [ "$bench" = dense ] && extra=(--shapes deepseek square --png "$out/bench_dense.png")
  echo "== bench $bench"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-280}" python3 -m jax_fp8gemm.bench "$bench" "${extra[@]}" \
      --json "$out/bench_$bench.json" > "$out/bench_$bench.log" 2>&1
  rc=$?
  echo "rc=$rc, $(( $(date +%s) - start )) s"
  grep -v "^\[\|^  " "$out/bench_$bench.log" | tail -30
  [ $rc -ne 0 ] && status=$rc
done
exit $status
