// Shared definitions for the per-element update math. These headers are the single source of
// truth for every formula: the CPU kernels (scalar, AVX2, AVX-512) and the CUDA kernels include
// them and instantiate them over their own lane type V.
//
// A lane type V offers + - * / and unary -, a constructor from its scalar, and the free functions
// lane_sqrt and lane_max. It is float or double for the scalar path, the CPU tails and CUDA, and
// a SIMD wrapper (csrc/cpu/vec_*.h) for the vector bodies.
//
// No fused multiply-add appears in the math and the code is compiled with -ffp-contract=off
// (nvcc: -fmad=false), so every backend rounds every element identically.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSEDOPT_LANE_FN __host__ __device__ __forceinline__
#else
#define FUSEDOPT_LANE_FN inline __attribute__((always_inline))
#endif

// Each ISA compile of the kernels sees these templates in its own inline namespace, so the linker
// can never merge an AVX-512 instantiation into the scalar path (that would SIGILL on older CPUs).
#ifndef FUSEDOPT_ISA
#define FUSEDOPT_ISA generic
#endif
#define FUSEDOPT_MATH_BEGIN \
  namespace fusedopt {      \
  namespace math {          \
  inline namespace FUSEDOPT_ISA {
#define FUSEDOPT_MATH_END \
  }                       \
  }                       \
  }

namespace fusedopt {

// A divisor fixed for a step (a bias correction, a grad scale). A float lane may divide by it
// with one double multiply by the reciprocal of its float rounding, rounded to float: bit for bit
// the float division (docs/spec.md A.9), off the divider that the square roots and the other
// divisions queue on (which of the two is quicker depends on the core: csrc/cpu/vec.h). That
// holds for every float x unless d is an even integer other than a power of two (a grad scale
// of 98: some subnormal quotients are then float midpoints, which the product misses); such a
// divisor is divided.
struct Divisor {
  double value;
  double float_reciprocal;  // 1 / float(value), in double
  bool by_product;          // float lanes may multiply by float_reciprocal
};
inline Divisor divisor(double value) {
  const float d = static_cast<float>(value);
  uint32_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  const int exponent = static_cast<int>((bits >> 23) & 0xff);  // biased; 0: zero or subnormal
  const uint32_t fraction = bits & 0x7fffff;
  // |d| = significand * 2^(exponent - 150): an even integer when its lowest set bit weighs 2 or
  // more. A power of two has no fraction bits; zero, subnormals, infinities and NaN take the
  // product (their quotients are the division's too).
  const bool normal = exponent != 0 && exponent != 0xff;
  const bool even_integer =
      normal && __builtin_ctz(fraction | 0x800000) + exponent - 150 >= 1 && fraction != 0;
  return {value, 1.0 / static_cast<double>(d), !even_integer};
}

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
struct lane_traits {
  using scalar = typename V::scalar;
};
template <>
struct lane_traits<float> {
  using scalar = float;
};
template <>
struct lane_traits<double> {
  using scalar = double;
};

// Host coefficients are double; they are rounded once to the parameter's dtype, as PyTorch does
// when it passes a Python float to a float32 kernel.
template <class V>
FUSEDOPT_LANE_FN V splat(double x) {
  return V(static_cast<typename lane_traits<V>::scalar>(x));
}

FUSEDOPT_LANE_FN float lane_sqrt(float x) { return sqrtf(x); }
FUSEDOPT_LANE_FN double lane_sqrt(double x) { return sqrt(x); }
FUSEDOPT_LANE_FN float lane_abs(float x) { return fabsf(x); }
FUSEDOPT_LANE_FN double lane_abs(double x) { return fabs(x); }
// Same NaN rule as the SIMD max and min instructions: when either operand is NaN the second is
// returned (so lane_max(bound, x) and lane_min(bound, x) carry a NaN x through, as torch does).
FUSEDOPT_LANE_FN float lane_max(float a, float b) { return a > b ? a : b; }
FUSEDOPT_LANE_FN double lane_max(double a, double b) { return a > b ? a : b; }
FUSEDOPT_LANE_FN float lane_min(float a, float b) { return a < b ? a : b; }
FUSEDOPT_LANE_FN double lane_min(double a, double b) { return a < b ? a : b; }

FUSEDOPT_LANE_FN float lane_divide(float x, const Divisor& d) {
  if (!d.by_product) return x / static_cast<float>(d.value);
  return static_cast<float>(static_cast<double>(x) * d.float_reciprocal);
}
FUSEDOPT_LANE_FN double lane_divide(double x, const Divisor& d) { return x / d.value; }

// Lane-wise choice, and whether every lane of a mask is set; for plain float and double a mask is
// a bool (the SIMD types define their own).
template <class T>
FUSEDOPT_LANE_FN T lane_select(bool mask, T if_true, T if_false) {
  return mask ? if_true : if_false;
}
FUSEDOPT_LANE_FN bool lane_all(bool mask) { return mask; }

// torch.maximum / torch.amax (and Keras' ops.maximum): NaN when either operand is NaN, so a NaN
// running maximum (AMSGrad's max_exp_avg_sq, Adamax's exp_inf) stays NaN as in the frameworks
// instead of healing to the other operand.
template <class V>
FUSEDOPT_LANE_FN V lane_max_nan(V a, V b) {
  return lane_select(a == a, lane_max(a, b), a);
}

// torch.sign: -1, 0 or 1, and 0 for a zero of either sign and for NaN (pytorch/pytorch#41245),
// so a NaN direction does not move a param (Rprop, and Lion in both conventions: lion-pytorch and
// Keras' torch backend take torch.sign).
template <class V>
FUSEDOPT_LANE_FN V lane_sign(V x) {
  const V zero = splat<V>(0.0);
  return lane_select(x > zero, splat<V>(1.0), lane_select(x < zero, splat<V>(-1.0), zero));
}

// torch.clamp(x, low, high): the lower bound first, so low > high gives high; NaN stays NaN.
template <class V>
FUSEDOPT_LANE_FN V lane_clamp(V x, V low, V high) {
  return lane_min(high, lane_max(low, x));
}

// torch.lerp's two rounding forms, chosen on the host from the weight (|w| < 0.5 or not), so
// PyTorch's exp_avg and grad_avg round as the framework rounds them.
template <class V>
FUSEDOPT_LANE_FN V torch_lerp(V start, V end, double weight, bool small_weight) {
  return small_weight ? start + splat<V>(weight) * (end - start)
                      : end - (end - start) * splat<V>(1.0 - weight);
}

FUSEDOPT_MATH_END
