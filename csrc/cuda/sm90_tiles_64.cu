// The Hopper GEMM's tiles with BLOCK_M = 64 (see sm90_gemm_launch.cuh).
#include "sm90_gemm_launch.cuh"

namespace fp8gemm::sm90 {

FP8GEMM_SM90_TILES_64(FP8GEMM_SM90_INSTANTIATE_TILE)

}  // namespace fp8gemm::sm90
