// SIMD lane types for the math templates, one generic wrapper over GCC/Clang vector extensions:
// Vec<float, 32> is an AVX2 register of 8 floats, Vec<double, 64> an AVX-512 register of 8
// doubles. The element-wise operators are the compiler's own, so they round exactly as the
// scalar code does; only sqrt needs an intrinsic per width. This header is included by
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

template <class T, int Bytes>
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
};

template <class T, int B>
inline Vec<T, B> operator+(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v + b.v);
}
template <class T, int B>
inline Vec<T, B> operator-(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v - b.v);
}
template <class T, int B>
inline Vec<T, B> operator*(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v * b.v);
}
template <class T, int B>
inline Vec<T, B> operator/(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v / b.v);
}
template <class T, int B>
inline Vec<T, B> operator-(Vec<T, B> a) {
  return Vec<T, B>::wrap(-a.v);
}
// a > b ? a : b lane by lane: the scalar rule, so NaN handling is the same on every path.
template <class T, int B>
inline Vec<T, B> lane_max(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v > b.v ? a.v : b.v);
}
template <class T, int B>
inline Vec<T, B> lane_min(Vec<T, B> a, Vec<T, B> b) {
  return Vec<T, B>::wrap(a.v < b.v ? a.v : b.v);
}
// The sign bit cleared, as fabs does (so -0 becomes +0 and NaN stays NaN).
template <class T, int B>
inline Vec<T, B> lane_abs(Vec<T, B> a) {
  using Bits = decltype(a.v == a.v);  // integer lanes of the same width
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const Bits magnitude = Bits{} + std::numeric_limits<Int>::max();  // every bit but the sign
  return Vec<T, B>::wrap(
      reinterpret_cast<typename Vec<T, B>::native>(reinterpret_cast<Bits>(a.v) & magnitude));
}

// Lane-wise comparisons give a mask of all-ones or all-zeros integer lanes, the compiler's own.
template <class T, int B>
struct VecMask {
  using native = decltype(typename Vec<T, B>::native{} == typename Vec<T, B>::native{});
  native m;
};
template <class T, int B>
inline VecMask<T, B> operator==(Vec<T, B> a, Vec<T, B> b) {
  return {a.v == b.v};
}
template <class T, int B>
inline VecMask<T, B> operator!=(Vec<T, B> a, Vec<T, B> b) {
  return {a.v != b.v};
}
template <class T, int B>
inline VecMask<T, B> operator>=(Vec<T, B> a, Vec<T, B> b) {
  return {a.v >= b.v};
}
template <class T, int B>
inline VecMask<T, B> operator>(Vec<T, B> a, Vec<T, B> b) {
  return {a.v > b.v};
}
template <class T, int B>
inline VecMask<T, B> operator<(Vec<T, B> a, Vec<T, B> b) {
  return {a.v < b.v};
}
template <class T, int B>
inline VecMask<T, B> operator&(VecMask<T, B> a, VecMask<T, B> b) {
  return {a.m & b.m};
}
template <class T, int B>
inline VecMask<T, B> operator|(VecMask<T, B> a, VecMask<T, B> b) {
  return {a.m | b.m};
}
template <class T, int B>
inline VecMask<T, B> operator!(VecMask<T, B> a) {
  return {~a.m};
}
template <class T, int B>
inline Vec<T, B> lane_select(VecMask<T, B> mask, Vec<T, B> if_true, Vec<T, B> if_false) {
  return Vec<T, B>::wrap(mask.m ? if_true.v : if_false.v);
}
// One instruction where there is one: a lane-by-lane loop here costs more than the EWMA step.
template <class T, int B>
inline bool lane_all(VecMask<T, B> mask) {
  for (int i = 0; i < Vec<T, B>::lanes; ++i)
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

#if defined(__AVX2__)
inline Vec<float, 32> lane_sqrt(Vec<float, 32> a) {
  return Vec<float, 32>::wrap((Vec<float, 32>::native)_mm256_sqrt_ps((__m256)a.v));
}
inline Vec<double, 32> lane_sqrt(Vec<double, 32> a) {
  return Vec<double, 32>::wrap((Vec<double, 32>::native)_mm256_sqrt_pd((__m256d)a.v));
}
#endif
#if defined(__AVX512F__)
inline Vec<float, 64> lane_sqrt(Vec<float, 64> a) {
  return Vec<float, 64>::wrap((Vec<float, 64>::native)_mm512_sqrt_ps((__m512)a.v));
}
inline Vec<double, 64> lane_sqrt(Vec<double, 64> a) {
  return Vec<double, 64>::wrap((Vec<double, 64>::native)_mm512_sqrt_pd((__m512d)a.v));
}
#endif

}  // namespace FUSEDOPT_ISA
}  // namespace cpu
}  // namespace fusedopt
