#!/usr/bin/env bash
# compute-sanitizer over this library's CUDA kernels on a sweep of shapes (GPU machine only).
#
# Usage on the H200, from the repository root (the package as in .ci/gpu_tests.sh):
#   bash .ci/gpu_sanitize.sh [memcheck|racecheck|synccheck ...]
# Only kernels whose names start with portable_ or sm90_ are instrumented (XLA's own
# kernels are left alone, which keeps the run short); SANITIZE_KERNELS="kns=sm90_" narrows
# that to one family. Logs go to $OUT (or /tmp/out).
# XLA_PYTHON_CLIENT_ALLOCATOR=platform gives every buffer its own cudaMalloc, so an access
# past a buffer's end is outside any allocation and memcheck sees it (in XLA's pooled
# allocator it would land in a neighbour).
set -uo pipefail
repo=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck)
. "$repo/.ci/gpu_install.sh"
export XLA_PYTHON_CLIENT_ALLOCATOR=platform
# Odd shapes, every block size and format, group sizes with zeros and sums past M: small problems.
select="odd_shapes or block_sizes or empty or grouped or masked or quantize or fine_grained or transpose or e5m2 or sm90_tile"
status=0
for tool in "${tools[@]}"; do
  for kernels in ${SANITIZE_KERNELS:-kns=portable_ kns=sm90_}; do
    echo "== $tool, kernels $kernels"
    compute-sanitizer --tool "$tool" --kernel-name "$kernels" \
        --error-exitcode 99 python3 -m pytest /tmp/tests/test_gemm.py /tmp/tests/test_grouped.py \
        /tmp/tests/test_quantize.py -q -m gpu -p no:cacheprovider -k "$select" \
        > "$out/sanitize_${tool}_${kernels#kns=}.log" 2>&1
    rc=$?
    tail -3 "$out/sanitize_${tool}_${kernels#kns=}.log"
    [ $rc -ne 0 ] && status=$rc
  done
done
exit $status
