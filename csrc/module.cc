// The one extension module: exposes every FFI handler as a capsule, keyed by op name and
// platform. jax_fp8gemm/_ffi.py registers them with XLA.
#include <nanobind/nanobind.h>

#include "handlers.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule encapsulate(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an FFI handler takes a call frame and returns an error");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_fp8gemm, m) {
  m.def("registrations", []() {
    nb::dict cpu;
#define FP8GEMM_REGISTER(op) cpu[#op] = encapsulate(fp8gemm_##op##_cpu);
    FP8GEMM_FOR_EACH_OP(FP8GEMM_REGISTER)
#undef FP8GEMM_REGISTER
    nb::dict out;
    out["cpu"] = cpu;
#ifdef FP8GEMM_WITH_CUDA
    nb::dict cuda;
#define FP8GEMM_REGISTER(op) cuda[#op] = encapsulate(fp8gemm_##op##_cuda);
    FP8GEMM_FOR_EACH_OP(FP8GEMM_REGISTER)
#undef FP8GEMM_REGISTER
    out["CUDA"] = cuda;
#endif
    return out;
  });
  m.def("cuda_built", []() {
#ifdef FP8GEMM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
