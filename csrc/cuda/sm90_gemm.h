// Host entry points of the Hopper (sm_90a) kernels, used by the CUDA handlers.
#pragma once

#include <cuda_runtime.h>

#include "../common/ops.h"

namespace fp8gemm::sm90 {

// True when the Hopper kernels may run on the current device: compute capability 9.0 and
// JAX_FP8GEMM_PORTABLE_KERNELS not set to 1 (the switch that forces the portable kernels,
// so that tests cover them on Hopper too).
bool enabled();

// Runs a dense GEMM on the Hopper kernel when it supports the problem (K a multiple of 16,
// packed operands); returns false, doing nothing, otherwise.
bool gemm(const Problem& p, ScaleMode mode, cudaStream_t stream, ffi::Error* status);

// The same for an M-grouped GEMM (contiguous or masked). It writes the rows inside groups
// only: the caller zeroes the others.
bool grouped(const GroupedOp& op, cudaStream_t stream, ffi::Error* status);

// The same for the k-grouped weight gradient (tokens a multiple of 16). It writes every
// output, zeros (or c) for a group without tokens.
bool kgrouped(const KGroupedOp& op, cudaStream_t stream, ffi::Error* status);

}  // namespace fp8gemm::sm90
