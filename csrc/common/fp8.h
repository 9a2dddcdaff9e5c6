// FP8 and BF16 scalar conversions shared by the CPU backend and the portable CUDA kernels.
//
// The rules are the library's numerics contract (docs/DESIGN.md, "Numerics"):
//   * float -> FP8 rounds to nearest even and saturates to the largest finite value
//     (the `satfinite` behaviour of Hopper's cvt instructions); NaN stays NaN.
//   * float -> BF16 rounds to nearest even; NaN stays NaN.
// The portable CUDA kernels call these same functions; the Hopper kernels' hardware
// conversions (cvt.rn.satfinite) follow the same rules. Tests compare every backend
// against ml_dtypes, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FP8_HD __host__ __device__ __forceinline__
#else
#define FP8_HD inline
#endif

namespace fp8gemm {

enum class Fp8Format : int { kE4M3 = 0, kE5M2 = 1 };

// Largest finite magnitude of each format: e4m3fn has no infinities (S.1111.111 is NaN),
// e5m2 is IEEE-like.
FP8_HD float max_finite(Fp8Format f) { return f == Fp8Format::kE4M3 ? 448.0f : 57344.0f; }

// Per-block scales are amax / max_finite, with amax floored here so that an all-zero block
// gets a finite, positive scale (and quantizes to zeros).
constexpr float kAmaxFloor = 1e-12f;

// The quantization scale of a block: max(amax, floor) / max_finite. The comparison is false
// for a NaN amax, which therefore reaches the division and makes the scale NaN.
FP8_HD float scale_from_amax(float amax, Fp8Format f) {
  return (amax < kAmaxFloor ? kAmaxFloor : amax) / max_finite(f);
}

// What quantization multiplies by: max_finite / max(amax, floor), the scale's reciprocal
// rounded once, so that q = fp8(x * inverse) costs a multiply per value (DeepGEMM's
// x * (448 / amax) convention). NaN for a NaN amax, 0 for an infinite one (then finite
// values quantize to 0 and infinities to NaN, and the scale is inf).
FP8_HD float inverse_scale_from_amax(float amax, Fp8Format f) {
  return max_finite(f) / (amax < kAmaxFloor ? kAmaxFloor : amax);
}

FP8_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FP8_HD uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// NaN-propagating max of magnitudes: a NaN anywhere in a block makes its amax NaN, so the
// block's scale is NaN and every value that reads it is NaN (the documented inf/NaN policy).
FP8_HD float amax_update(float amax, float x) {
  float a = fabsf(x);
  return (a > amax || a != a) ? a : amax;
}

// Decodes one FP8 byte. Exact (every FP8 value is a float).
FP8_HD float fp8_to_float(uint8_t v, Fp8Format f) {
  const int man_bits = f == Fp8Format::kE4M3 ? 3 : 2;
  const int bias = f == Fp8Format::kE4M3 ? 7 : 15;
  const uint32_t sign = (v & 0x80u) << 24;
  const int exp = (v & 0x7f) >> man_bits;
  const int man = v & ((1 << man_bits) - 1);
  const int exp_max = (1 << (7 - man_bits)) - 1;
  if (f == Fp8Format::kE4M3 && exp == exp_max && man == (1 << man_bits) - 1) {
    return bits_to_float(sign | 0x7fc00000u);  // e4m3fn NaN
  }
  if (f == Fp8Format::kE5M2 && exp == exp_max) {
    return bits_to_float(sign | (man ? 0x7fc00000u : 0x7f800000u));  // NaN or inf
  }
  float mag;
  if (exp == 0) {
    mag = ldexpf(static_cast<float>(man), 1 - bias - man_bits);  // subnormal
  } else {
    mag = ldexpf(static_cast<float>(man + (1 << man_bits)), exp - bias - man_bits);
  }
  return sign ? -mag : mag;
}

// Encodes a float as FP8: round to nearest even, saturate finite values (and infinities)
// to +-max_finite, NaN to the format's canonical NaN (the bytes ml_dtypes produces).
FP8_HD uint8_t float_to_fp8(float x, Fp8Format f) {
  const int man_bits = f == Fp8Format::kE4M3 ? 3 : 2;
  const int bias = f == Fp8Format::kE4M3 ? 7 : 15;
  const uint8_t sign = (float_to_bits(x) >> 24) & 0x80u;
  if (x != x) return sign | (f == Fp8Format::kE4M3 ? 0x7f : 0x7e);
  float a = fabsf(x);
  const float max = max_finite(f);
  if (a >= max) a = max;  // values in [max, inf] all round or saturate to max
  // Quantum of the binade holding `a`, never below the subnormal quantum.
  int e = a > 0.0f ? static_cast<int>(ilogbf(a)) : 1 - bias;
  if (e < 1 - bias) e = 1 - bias;
  // Scaling by a power of two is exact, so nearbyint rounds the true value (ties to even).
  float q = nearbyintf(ldexpf(a, man_bits - e));  // in [0, 2^(man_bits+1)]
  if (q >= static_cast<float>(2 << man_bits)) {  // rounded up into the next binade
    q = ldexpf(q, -1);
    e += 1;
  }
  const int iq = static_cast<int>(q);
  const int biased = iq >= (1 << man_bits) ? e + bias : 0;  // subnormal when below 2^man
  const int mantissa = iq & ((1 << man_bits) - 1);
  return sign | static_cast<uint8_t>((biased << man_bits) | mantissa);
}

FP8_HD uint16_t float_to_bf16(float x) {
  uint32_t bits = float_to_bits(x);
  if (x != x) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // keep NaN quiet
  bits += 0x7fffu + ((bits >> 16) & 1u);                             // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

FP8_HD float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }

// IEEE half -> float, exact.
FP8_HD float f16_to_float(uint16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v & 0x8000u) << 16;
  const int exp = (v >> 10) & 0x1f;
  const int man = v & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (static_cast<uint32_t>(man) << 13));
  const float mag = exp == 0 ? ldexpf(static_cast<float>(man), -24)
                             : ldexpf(static_cast<float>(man + 1024), exp - 25);
  return sign ? -mag : mag;
}

}  // namespace fp8gemm
