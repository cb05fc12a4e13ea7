// The 16-bit storage formats (docs/spec.md section 22): bfloat16 and IEEE float16 params, grads
// and states are widened to float32, updated by the float32 math, and rounded back, either to
// nearest (ties to even) or stochastically. Integer arithmetic only, over a lane type U of
// uint32 (a plain uint32_t, or a GCC vector of them, which every ISA compiles to its own
// registers): no F16C or AVX-512 BF16 instruction is needed, and every ISA and the scalar path
// produce the same bits.
//
// Stochastic rounding rounds a value x to one of the two representable neighbours around it, up
// in magnitude with probability (|x| - lower) / (upper - lower), by adding uniform random bits
// below the kept precision and truncating. The random bits come from a counter-based generator
// keyed by (seed, step, role) and indexed by the element's position in its tensor, so a result
// does not depend on the thread count, the ISA or how the tensor was split.
#pragma once

#include <cstdint>

#include "math/common.h"

namespace fusedopt {

// SplitMix64's finalizer: the host's mix of (seed, step, role) into a 64-bit key.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The key of one step's rounding: roles are the param (0) and state k (1 + k), so the param and
// each state of an element draw independent bits.
inline uint64_t rounding_key(uint64_t seed, int64_t step) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(step)));
}
inline uint64_t role_key(uint64_t key, int role) {
  return mix64(key + static_cast<uint64_t>(role));
}

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

// Wellons' lowbias32: a bijective 32-bit mix with low bias.
template <class U>
FUSEDOPT_LANE_FN U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// An index's place in a Weyl sequence: index times 2^32 over the golden ratio (mod 2^32), so
// that neighbouring elements' inputs to the mix differ in every bit. Linear: the weyl of
// (lane + first) is weyl(lane) + weyl(first), an addition to a constant vector.
inline constexpr uint32_t kWeylStep = 0x9e3779b9u;
template <class U>
FUSEDOPT_LANE_FN U weyl(U index_low) {
  return index_low * kWeylStep;
}

// 32 random bits for the element at index (high, low) of a tensor under a role key, given
// weyl(low): low varies per lane, high (index >> 32) is the same for a whole chunk, folded into
// the chunk's key_high. SplitMix's construction (a Weyl sequence through a finalizer) in 32
// bits: one lowbias32 round, whose two multiplies are most of stochastic rounding's cost. One
// round over the raw index (no Weyl step) left the bits of elements 2^11 to 2^13 apart
// correlated; the earlier two rounds over it cost 1.4x more per stochastic bfloat16 Adam step.
template <class U>
FUSEDOPT_LANE_FN U random_bits(U weyl_low, uint32_t key_low, uint32_t key_high) {
  return mix32((weyl_low ^ key_low) + key_high);
}
FUSEDOPT_LANE_FN uint32_t chunk_key_high(uint64_t role_key, uint64_t index) {
  const uint32_t high = static_cast<uint32_t>(role_key >> 32) ^ static_cast<uint32_t>(index >> 32);
  return mix32(high);
}

// Lane-wise choice over integer lanes: a vector comparison gives a mask, a scalar one a bool.
template <class M, class U>
FUSEDOPT_LANE_FN U pick(M mask, U if_true, U if_false) {
  return mask ? if_true : if_false;
}

// Integer lanes to float lanes (the values converted are small: exact).
template <class F, class U>
FUSEDOPT_LANE_FN F convert_to_float(U x) {
  if constexpr (sizeof(U) == sizeof(uint32_t))
    return static_cast<float>(static_cast<int32_t>(x));
  else
    return __builtin_convertvector(x, F);
}

// ---- bfloat16: the top half of a float32 -------------------------------------------------------

template <class U>
FUSEDOPT_LANE_FN U bfloat16_to_float_bits(U h) {
  return h << 16;
}

// Ties to even, as torch and ml_dtypes round; NaN becomes the quiet NaN 0x7fc0 with its sign.
template <class U>
FUSEDOPT_LANE_FN U float_bits_to_bfloat16(U f) {
  const U magnitude = f & 0x7fffffffu;
  const U rounded = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
  return pick(magnitude > 0x7f800000u, ((f >> 16) & 0x8000u) | 0x7fc0u, rounded);
}

// Stochastic: 16 random bits added below the kept mantissa, then truncated. A carry into the
// exponent is the round up; past the largest finite value it gives infinity.
template <class U>
FUSEDOPT_LANE_FN U float_bits_to_bfloat16_stochastic(U f, U random) {
  const U magnitude = f & 0x7fffffffu;
  const U rounded = (f + (random >> 16)) >> 16;
  const U special = pick(magnitude > 0x7f800000u, ((f >> 16) & 0x8000u) | 0x7fc0u, f >> 16);
  return pick(magnitude >= 0x7f800000u, special, rounded);
}

// ---- float16 (IEEE binary16) --------------------------------------------------------------------

// Exact. Subnormals through float32 arithmetic (m * 2^-24 is exact), which every ISA has. The
// same bits as F16C's vcvtph2ps (the kernels use it where built with F16C).
template <class U, class F>
FUSEDOPT_LANE_FN U float16_to_float_bits(U h) {
  const U sign = (h & 0x8000u) << 16;
  const U exponent = (h >> 10) & 0x1fu;
  const U mantissa = h & 0x3ffu;
  const U normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  // NaN keeps its payload and is quieted (the quiet bit set), as F16C's conversion does.
  const U special =
      sign | 0x7f800000u | (mantissa << 13) | pick(mantissa != 0u, U{} + 0x400000u, U{});
  F scaled = convert_to_float<F>(mantissa) * 0x1p-24f;
  U subnormal;
  __builtin_memcpy(&subnormal, &scaled, sizeof subnormal);
  return pick(exponent == 0u, sign | subnormal, pick(exponent == 0x1fu, special, normal));
}

// Ties to even, as numpy and torch round. Overflow (|x| >= 65520) gives infinity; NaN the quiet
// NaN 0x7e00 with its sign. F16C's vcvtps2ph gives the same bits but for NaN payloads (the
// kernels then set those NaNs to this one).
template <class U>
FUSEDOPT_LANE_FN U float_bits_to_float16(U f) {
  const U sign = (f >> 16) & 0x8000u;
  const U magnitude = f & 0x7fffffffu;
  const U exponent = magnitude >> 23;
  // Normal results: rebias, then add half an ulp (less one, plus the kept lsb: ties to even).
  const U normal = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
  // Subnormal results (|x| < 2^-14): the significand shifted right by 126 - exponent, at most
  // 25 places (everything smaller rounds to zero), rounded to nearest even.
  const U significand = (magnitude & 0x7fffffu) | 0x800000u;
  // (Lanes with normal results shift by 14, any valid amount: their subnormal form is unused.)
  const U shift =
      pick(exponent < 101u, U{} + 25u, pick(exponent < 113u, 126u - exponent, U{} + 14u));
  const U kept = significand >> shift;
  const U rest = significand & (((U{} + 1u) << shift) - 1u);
  const U half = (U{} + 1u) << (shift - 1u);
  const U subnormal =
      kept + pick((rest > half) | ((rest == half) & ((kept & 1u) != 0u)), U{} + 1u, U{});
  U result = pick(exponent < 113u, subnormal, normal);
  result = pick(magnitude >= (143u << 23), U{} + 0x7c00u, result);
  result = pick(magnitude > 0x7f800000u, U{} + 0x7e00u, result);
  return sign | result;
}

// Stochastic: the discarded bits of the magnitude added to as many uniform random bits (13 for
// normal results; 14 to 31 for subnormal ones, all of the discarded bits); a carry is the round
// up. Magnitudes below 2^-32 give zero (they would round up with probability under 2^-8).
template <class U>
FUSEDOPT_LANE_FN U float_bits_to_float16_stochastic(U f, U random) {
  const U sign = (f >> 16) & 0x8000u;
  const U magnitude = f & 0x7fffffffu;
  const U exponent = magnitude >> 23;
  const U normal = (magnitude - (112u << 23) + (random >> 19)) >> 13;
  // Subnormal results: the significand shifted right by 126 - exponent, in [14, 31], up when the
  // discarded rest plus as many random bits carries: rest + r > mask.
  const U significand = (magnitude & 0x7fffffu) | 0x800000u;
  const U shift =
      pick(exponent < 95u, U{} + 31u, pick(exponent < 113u, 126u - exponent, U{} + 14u));
  const U mask = ((U{} + 1u) << shift) - 1u;
  const U up = pick((significand & mask) > mask - (random >> (32u - shift)), U{} + 1u, U{});
  const U subnormal = pick(exponent < 95u, U{}, (significand >> shift) + up);
  U result = pick(exponent < 113u, subnormal, normal);
  result = pick(magnitude >= (143u << 23), U{} + 0x7c00u, result);
  result = pick(magnitude > 0x7f800000u, U{} + 0x7e00u, result);
  return sign | result;
}

FUSEDOPT_MATH_END
