// The CPU kernels, compiled once per ISA (CMakeLists.txt): FUSEDOPT_ISA is scalar, avx2 or
// avx512, and only this file gets that ISA's flags. Each kernel streams one range of one tensor:
// load every operand once, run the algorithm's math (csrc/math) in registers, store once.
#include "core/tensor.h"
#include "math/adagrad.h"
#include "math/adam.h"
#include "math/ewma.h"
#include "math/rmsprop.h"
#include "math/sgd.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include "cpu/vec.h"
#endif

namespace fusedopt {
namespace cpu {
inline namespace FUSEDOPT_ISA {

#if defined(__AVX512F__)
template <class T>
using Lane = Vec<T, 64>;
#elif defined(__AVX2__)
template <class T>
using Lane = Vec<T, 32>;
#endif

template <class V, class T>
inline V load_lane(const T* p) {
  if constexpr (sizeof(V) == sizeof(T)) {
    return *p;
  } else {
    return V::load(p);
  }
}

template <class V, class T>
inline void store_lane(T* p, const V& x) {
  if constexpr (sizeof(V) == sizeof(T)) {
    *p = x;
  } else {
    x.store(p);
  }
}

// Which optional buffers a tensor streams: bit k for state k, kWritesGrad for the write-back of
// an unscaled gradient. kRuntimePattern reads them from the tensor inside the loop instead.
constexpr unsigned kWritesGrad = 1u << kMaxStates;
constexpr unsigned kRuntimePattern = ~0u;

inline unsigned pattern_of(const TensorRef& t) {
  unsigned pattern = t.write_grad ? kWritesGrad : 0u;
  for (int k = 0; k < kMaxStates; ++k)
    if (t.state[k]) pattern |= 1u << k;
  return pattern;
}

// Streams [begin, end) of one tensor through update(param, grad, states) with the widest lane
// type, then the tail with the same math on plain T: no element is processed twice.
template <class T, unsigned Pattern, class Update>
inline void stream_pattern(const TensorRef& t, int64_t begin, int64_t end, Update update) {
  const auto has = [&](unsigned bit, bool at_run_time) {
    return Pattern == kRuntimePattern ? at_run_time : (Pattern & bit) != 0;
  };
  const bool has_state[kMaxStates] = {has(1u, t.state[0]), has(2u, t.state[1]),
                                      has(4u, t.state[2])};
  const bool write_grad = has(kWritesGrad, t.write_grad);
  T* const param = static_cast<T*>(t.param);
  T* const grad = static_cast<T*>(t.grad);
  T* const state[kMaxStates] = {static_cast<T*>(t.state[0]), static_cast<T*>(t.state[1]),
                                static_cast<T*>(t.state[2])};

  auto at = [&](auto lane, int64_t i) {
    using V = decltype(lane);
    V p = load_lane<V>(param + i);
    V g = load_lane<V>(grad + i);
    V s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = has_state[k] ? load_lane<V>(state[k] + i) : V(T(0));
    update(p, g, s);
    store_lane(param + i, p);
    if (write_grad) store_lane(grad + i, g);
    for (int k = 0; k < kMaxStates; ++k)
      if (has_state[k]) store_lane(state[k] + i, s[k]);
  };

  int64_t i = begin;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; i + Lane<T>::lanes <= end; i += Lane<T>::lanes) at(Lane<T>(T(0)), i);
#endif
  for (; i < end; ++i) at(T(0), i);
}

// A tensor's pattern is fixed for the whole range, so each pattern an algorithm produces gets a
// loop of its own with no tests on absent buffers inside (those tests made SGD at 1e7 elements
// run at half the bandwidth of a plain p += g); any other pattern takes the general loop.
template <class T, unsigned... Patterns, class Update>
inline void stream(const TensorRef& t, int64_t begin, int64_t end, Update update) {
  const unsigned pattern = pattern_of(t);
  const bool done =
      ((pattern == Patterns && (stream_pattern<T, Patterns>(t, begin, end, update), true)) || ...);
  if (!done) stream_pattern<T, kRuntimePattern>(t, begin, end, update);
}

// The coefficients are captured by value: the closure is then a local whose address never
// escapes, so the compiler keeps them in registers instead of reloading them after every store
// (a store through memcpy may alias anything reachable).
template <class T>
void sgd_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  const SgdCoefficients c = *static_cast<const SgdCoefficients*>(t.coefficients);
  stream<T, 0u, 1u, kWritesGrad, kWritesGrad | 1u>(
      t, begin, end, [c](auto& p, auto& g, auto* s) { math::sgd_update(c, p, g, s[0]); });
}

template <class T>
void adagrad_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  const AdagradCoefficients c = *static_cast<const AdagradCoefficients*>(t.coefficients);
  stream<T, 1u>(t, begin, end,
                [c](auto& p, auto& g, auto* s) { math::adagrad_update(c, p, g, s[0]); });
}

template <class T>
void rmsprop_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  const RmspropCoefficients c = *static_cast<const RmspropCoefficients*>(t.coefficients);
  stream<T, 1u, 3u, 5u, 7u>(t, begin, end, [c](auto& p, auto& g, auto* s) {
    math::rmsprop_update(c, p, g, s[0], s[1], s[2]);
  });
}

template <class T>
void adam_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  const AdamCoefficients c = *static_cast<const AdamCoefficients*>(t.coefficients);
  stream<T, 3u, 7u, kWritesGrad | 3u, kWritesGrad | 7u>(
      t, begin, end,
      [c](auto& p, auto& g, auto* s) { math::adam_update(c, p, g, s[0], s[1], s[2]); });
}

template <class T>
void stream_add_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  stream<T, 0u, 1u, 3u, 7u>(t, begin, end, [](auto& p, auto& g, auto* s) {
    p = p + g;
    for (int k = 0; k < kMaxStates; ++k) s[k] = s[k] + g;
  });
}

// Series side by side in memory (series_stride 1): time outermost, so every row is read once,
// contiguously, a lane of series at a time; each series' state lives in the block's arrays.
template <class V>
inline void ewma_row(const EwmaBlock& b, int64_t t, int64_t s) {
  math::EwmaLanes<V> state{load_lane<V>(b.mean + s), load_lane<V>(b.old_weight + s),
                           load_lane<V>(b.observations + s)};
  const V x = load_lane<V>(b.x + t * b.time_stride + s);
  const V y = t == 0 ? math::ewma_first(b.coefficients, state, x)
                     : math::ewma_next(b.coefficients, state, x);
  store_lane(b.out + t * b.time_stride + s, y);
  store_lane(b.mean + s, state.mean);
  store_lane(b.old_weight + s, state.old_weight);
  store_lane(b.observations + s, state.observations);
}

void ewma_kernel(const EwmaBlock& b, int64_t first, int64_t last) {
  if (b.length == 0) return;
  if (b.series_stride == 1 && b.time_stride > 1) {
    for (int64_t t = 0; t < b.length; ++t) {
      int64_t s = first;
#if defined(__AVX512F__) || defined(__AVX2__)
      for (; s + Lane<double>::lanes <= last; s += Lane<double>::lanes)
        ewma_row<Lane<double>>(b, t, s);
#endif
      for (; s < last; ++s) ewma_row<double>(b, t, s);
    }
    return;
  }
  for (int64_t s = first; s < last; ++s) {
    const double* x = b.x + s * b.series_stride;
    double* out = b.out + s * b.series_stride;
    math::EwmaLanes<double> state;
    out[0] = math::ewma_first(b.coefficients, state, x[0]);
    for (int64_t t = 1; t < b.length; ++t)
      out[t * b.time_stride] = math::ewma_next(b.coefficients, state, x[t * b.time_stride]);
  }
}

}  // namespace FUSEDOPT_ISA

#define FUSEDOPT_CONCAT_INNER(a, b) a##b
#define FUSEDOPT_CONCAT(a, b) FUSEDOPT_CONCAT_INNER(a, b)
#define FUSEDOPT_STRING_INNER(a) #a
#define FUSEDOPT_STRING(a) FUSEDOPT_STRING_INNER(a)

// dispatch.cpp declares one of these per ISA that was built.
const KernelTable& FUSEDOPT_CONCAT(kernel_table_, FUSEDOPT_ISA)() {
  static const KernelTable table = {
      FUSEDOPT_STRING(FUSEDOPT_ISA),
      {sgd_kernel<float>, sgd_kernel<double>},
      {adagrad_kernel<float>, adagrad_kernel<double>},
      {rmsprop_kernel<float>, rmsprop_kernel<double>},
      {adam_kernel<float>, adam_kernel<double>},
      {stream_add_kernel<float>, stream_add_kernel<double>},
      ewma_kernel,
  };
  return table;
}

}  // namespace cpu
}  // namespace fusedopt
