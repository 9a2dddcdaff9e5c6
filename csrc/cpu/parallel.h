// A minimal fork-join loop for the CPU backend. Each index is processed by exactly one
// thread and every output element is written by one index, so results do not depend on the
// thread count (set JAX_FP8GEMM_CPU_THREADS to choose it; default: all hardware threads).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

namespace fp8gemm::cpu {

inline int num_threads() {
  if (const char* env = std::getenv("JAX_FP8GEMM_CPU_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Calls fn(i) for every i in [0, n); fn must not throw.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
  const int64_t workers = std::min<int64_t>(num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
}

}  // namespace fp8gemm::cpu
