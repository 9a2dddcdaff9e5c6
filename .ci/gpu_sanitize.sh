#!/usr/bin/env bash
# compute-sanitizer over this library's CUDA kernels on a sweep of shapes (GPU machine only).
#
# Usage on the H200, from the repository root (the package as in .ci/gpu_tests.sh):
#   bash .ci/gpu_sanitize.sh [memcheck|racecheck|synccheck ...]
# Only kernels whose names start with portable_ or sm90_ are instrumented (XLA's own
# kernels are left alone, which keeps the run short); SANITIZE_KERNELS="kns=sm90_" narrows
# that to one family, SANITIZE_PIECES="gemm grouped" to some of the pieces below (one
# process each, so that a failure names its piece). JAX_FP8GEMM_PORTABLE_KERNELS=1 makes
# the portable kernels run where the Hopper kernel would; SANITIZE_TIMEOUT (seconds) limits
# each piece. Logs go to $OUT (or /tmp/out).
#
# XLA_PYTHON_CLIENT_ALLOCATOR=platform gives every buffer its own cudaMalloc, so an access
# past a buffer's end is outside any allocation and memcheck sees it (in XLA's pooled
# allocator it would land in a neighbour). XLA's autotuning is off: it profiles candidate
# kernels for its own dots, and for the MoE tests' ragged_dot one of them faulted, which
# under the sanitizer ends the process ("The Sanitizer failed to handle a hardware
# exception"); earlier sweeps took that for a crash of ours. The
# pieces are small because compute-sanitizer itself has segfaulted late in a long process
# (racecheck, ~70 grouped tests) where each test alone, and every test before, was clean.
set -uo pipefail
repo=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p "$out"
tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck)
. "$repo/.ci/gpu_install.sh"
export XLA_PYTHON_CLIENT_ALLOCATOR=platform
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
# Odd shapes, every block size and format, group sizes with zeros and sums past M: small problems.
select="odd_shapes or block_sizes or empty or grouped or masked or quantize or fine_grained or transpose or e5m2 or sm90_tile or row_scale_tile or moe or permute"
# Each piece: a test file and its -k expression.
declare -A pieces=(
  [gemm]="test_gemm.py|$select"
  [grouped]="test_grouped.py|($select) and not (moe or permute or odd_k)"
  [moe]="test_grouped.py|moe or permute or odd_k"
  [quantize]="test_quantize.py|$select"
  [grads]="test_transforms.py|grouped_matmul"  # the k-grouped weight-gradient GEMM
)
status=0
for tool in "${tools[@]}"; do
  for kernels in ${SANITIZE_KERNELS:-kns=portable_ kns=sm90_}; do
    for piece in ${SANITIZE_PIECES:-gemm grouped moe quantize grads}; do
      file=${pieces[$piece]%%|*}
      log="$out/sanitize_${tool}_${kernels#kns=}_$piece.log"
      echo "== $tool, kernels $kernels, $piece"
      start=$(date +%s)
      timeout "${SANITIZE_TIMEOUT:-0}" compute-sanitizer --tool "$tool" --kernel-name "$kernels" --error-exitcode 99 \
          python3 -m pytest "/tmp/tests/$file" -q -m gpu -p no:cacheprovider \
          -k "${pieces[$piece]#*|}" > "$log" 2>&1
      rc=$?
      echo "rc=$rc, $(( $(date +%s) - start )) s: $(grep -E '(passed|failed)|SUMMARY' "$log" | tail -2 | tr '\n' ' ')"
      # pytest's 5: no test selected in this piece (e.g. no Hopper kernel on this GPU).
      [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=$rc
    done
  done
done
exit $status
