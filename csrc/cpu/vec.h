// SIMD lane types for the math templates, one generic wrapper over GCC/Clang vector extensions:
// Vec<float, 32> is an AVX2 register of 8 floats, Vec<double, 64> an AVX-512 register of 8
// doubles. The element-wise operators are the compiler's own, so they round exactly as the
// scalar code does; only sqrt needs an intrinsic per width. DivideConstants picks how
// lane_divide divides (below), with the same bits either way. This header is included by
// kernels.cpp only, and its types live in that compile's per-ISA namespace.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace fusedopt {
namespace cpu {
inline namespace FUSEDOPT_ISA {

template <class T, int Bytes, bool DivideConstants = false>
struct Vec {
  using scalar = T;
  static constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
  typedef T native __attribute__((vector_size(Bytes)));
  native v;

  Vec() = default;
  // A plain broadcast: 0 + x, which this was, is an add (it turns -0 into +0) that the compiler
  // must not move out of a branch, so every constant was made again at each element.
  explicit Vec(T x) : v(broadcast(x, std::make_integer_sequence<int, lanes>{})) {}
  template <int... Lane>
  static native broadcast(T x, std::integer_sequence<int, Lane...>) {
    return native{((void)Lane, x)...};
  }
  static Vec wrap(native x) {
    Vec r;
    r.v = x;
    return r;
  }
  static Vec load(const T* p) {
    Vec r;
    std::memcpy(&r.v, p, Bytes);
    return r;
  }
  void store(T* p) const { std::memcpy(p, &v, Bytes); }
  // The first `count` (< lanes) elements only, by masked loads and stores: the lanes past them
  // read as zero and are never written, and memory past them is not touched (no fault).
  static Vec load_first(const T* p, int count) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float lanes only");
    Vec r;
    if constexpr (Bytes == 64 && sizeof(T) == 4)
      r.v = (native)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
    else if constexpr (Bytes == 64)
      r.v = (native)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << count) - 1), p);
    else if constexpr (sizeof(T) == 4)
      r.v = (native)_mm256_maskload_ps(reinterpret_cast<const float*>(p), first_lanes(count));
    else
      r.v = (native)_mm256_maskload_pd(reinterpret_cast<const double*>(p), first_lanes(count));
    return r;
  }
  void store_first(T* p, int count) const {
    if constexpr (Bytes == 64 && sizeof(T) == 4)
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), (__m512)v);
    else if constexpr (Bytes == 64)
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << count) - 1), (__m512d)v);
    else if constexpr (sizeof(T) == 4)
      _mm256_maskstore_ps(reinterpret_cast<float*>(p), first_lanes(count), (__m256)v);
    else
      _mm256_maskstore_pd(reinterpret_cast<double*>(p), first_lanes(count), (__m256d)v);
  }
  // AVX2's masks: all ones in the lanes of the first `count` elements (64-bit lanes for double).
  static __m256i first_lanes(int count) {
    if constexpr (sizeof(T) == 4)
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(count),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3));
  }
};

template <class T, int B, bool D>
inline Vec<T, B, D> operator+(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v + b.v);
}
template <class T, int B, bool D>
inline Vec<T, B, D> operator-(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v - b.v);
}
template <class T, int B, bool D>
inline Vec<T, B, D> operator*(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v * b.v);
}
template <class T, int B, bool D>
inline Vec<T, B, D> operator/(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v / b.v);
}
template <class T, int B, bool D>
inline Vec<T, B, D> operator-(Vec<T, B, D> a) {
  return Vec<T, B, D>::wrap(-a.v);
}
// a > b ? a : b lane by lane: the scalar rule, so NaN handling is the same on every path.
template <class T, int B, bool D>
inline Vec<T, B, D> lane_max(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v > b.v ? a.v : b.v);
}
template <class T, int B, bool D>
inline Vec<T, B, D> lane_min(Vec<T, B, D> a, Vec<T, B, D> b) {
  return Vec<T, B, D>::wrap(a.v < b.v ? a.v : b.v);
}
// The sign bit cleared, as fabs does (so -0 becomes +0 and NaN stays NaN).
template <class T, int B, bool D>
inline Vec<T, B, D> lane_abs(Vec<T, B, D> a) {
  using Bits = decltype(a.v == a.v);  // integer lanes of the same width
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const Bits magnitude = Bits{} + std::numeric_limits<Int>::max();  // every bit but the sign
  return Vec<T, B, D>::wrap(
      reinterpret_cast<typename Vec<T, B, D>::native>(reinterpret_cast<Bits>(a.v) & magnitude));
}

// Lane-wise comparisons give a mask of all-ones or all-zeros integer lanes, the compiler's own.
template <class T, int B, bool D = false>
struct VecMask {
  using native = decltype(typename Vec<T, B, D>::native{} == typename Vec<T, B, D>::native{});
  native m;
};
template <class T, int B, bool D>
inline VecMask<T, B, D> operator==(Vec<T, B, D> a, Vec<T, B, D> b) {
  return {a.v == b.v};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator!=(Vec<T, B, D> a, Vec<T, B, D> b) {
  return {a.v != b.v};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator>=(Vec<T, B, D> a, Vec<T, B, D> b) {
  return {a.v >= b.v};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator>(Vec<T, B, D> a, Vec<T, B, D> b) {
  return {a.v > b.v};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator<(Vec<T, B, D> a, Vec<T, B, D> b) {
  return {a.v < b.v};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator&(VecMask<T, B, D> a, VecMask<T, B, D> b) {
  return {a.m & b.m};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator|(VecMask<T, B, D> a, VecMask<T, B, D> b) {
  return {a.m | b.m};
}
template <class T, int B, bool D>
inline VecMask<T, B, D> operator!(VecMask<T, B, D> a) {
  return {~a.m};
}
template <class T, int B, bool D>
inline Vec<T, B, D> lane_select(VecMask<T, B, D> mask, Vec<T, B, D> if_true,
                                Vec<T, B, D> if_false) {
  return Vec<T, B, D>::wrap(mask.m ? if_true.v : if_false.v);
}
// One instruction where there is one: a lane-by-lane loop here costs more than the EWMA step.
template <class T, int B, bool D>
inline bool lane_all(VecMask<T, B, D> mask) {
  for (int i = 0; i < Vec<T, B, D>::lanes; ++i)
    if (!mask.m[i]) return false;
  return true;
}
#if defined(__AVX2__)
inline bool lane_all(VecMask<double, 32> mask) {
  return _mm256_movemask_pd((__m256d)mask.m) == 0xf;
}
#endif
#if defined(__AVX512DQ__)
inline bool lane_all(VecMask<double, 64> mask) {
  return _mm512_movepi64_mask((__m512i)mask.m) == 0xff;
}
#endif

// x / d for a step's fixed divisor (common.h's Divisor): float lanes by the double product, both
// halves widened, multiplied and narrowed, where that is quicker than the divider. Which is
// depends on the core, not on the math (both give the same bits):
// - AVX-512 (measured on an Intel Xeon, Sapphire Rapids class): the product. Float32 Adam over
//   32768 elements in cache, 1 thread, divider -> product: 0.60-0.62 -> 0.49-0.50 ns per
//   element, LAMB 1.57-1.68 -> 1.22-1.31. The 16-bit loops' lanes (DivideConstants) divide all
//   the same: the product's conversions and shuffles run on the port that 16-bit storage
//   converts on (bfloat16 Adam was 5-10% slower by the product).
// - AVX2 (measured on AMD Zen 3): the divider. Float32, 1e5 elements in cache, 1 thread, best
//   of 300-500 in four interleaved runs, product -> divider: Adam 0.74 -> 0.59 ns per element,
//   AMSGrad 0.86 -> 0.71, AdamW 0.77 -> 0.61, NAdam 0.81 -> 0.67, RAdam 0.54 -> 0.40-0.45,
//   LAMB (1e7) 1.83 -> 1.52; the algorithms that divide by no constant unchanged. An Intel core
//   without AVX-512 (its divider as the Xeon's) may do better by the product: not measured.
#if defined(__AVX512F__)
constexpr bool kConstantsByProduct = true;
#else
constexpr bool kConstantsByProduct = false;
#endif
template <class T, int B, bool D>
inline Vec<T, B, D> lane_divide(Vec<T, B, D> x, const Divisor& d) {
  using V = Vec<T, B, D>;
  if constexpr (std::is_same_v<T, double> || D || !kConstantsByProduct) {
    return x / V(static_cast<T>(d.value));
  } else {
    if (!d.by_product) return x / V(static_cast<float>(d.value));
    typedef double wide __attribute__((vector_size(2 * B)));
    const wide product = __builtin_convertvector(x.v, wide) * d.float_reciprocal;
    return V::wrap(__builtin_convertvector(product, typename V::native));
  }
}

// One instruction per width and type (the vector extensions have no square root).
template <class T, int B, bool D>
inline Vec<T, B, D> lane_sqrt(Vec<T, B, D> a) {
  using N = typename Vec<T, B, D>::native;
  if constexpr (B == 64 && sizeof(T) == 4)
    return Vec<T, B, D>::wrap((N)_mm512_sqrt_ps((__m512)a.v));
  else if constexpr (B == 64)
    return Vec<T, B, D>::wrap((N)_mm512_sqrt_pd((__m512d)a.v));
  else if constexpr (sizeof(T) == 4)
    return Vec<T, B, D>::wrap((N)_mm256_sqrt_ps((__m256)a.v));
  else
    return Vec<T, B, D>::wrap((N)_mm256_sqrt_pd((__m256d)a.v));
}

}  // namespace FUSEDOPT_ISA
}  // namespace cpu
}  // namespace fusedopt
