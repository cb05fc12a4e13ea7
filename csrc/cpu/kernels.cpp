// The CPU kernels, compiled once per ISA (CMakeLists.txt): FUSEDOPT_ISA is scalar, avx2 or
// avx512, and only this file gets that ISA's flags. Each kernel streams one range of one tensor:
// load every operand once, run the algorithm's math (csrc/math) in registers, store once. The
// kernels of every registered algorithm (csrc/math/registry.h) are instantiated here from one
// template.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "core/tensor.h"
#include "math/ewma.h"
#include "math/registry.h"

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

// Through memcpy: NumPy accepts arrays that are not aligned to their element size (a view at a
// byte offset), and a plain dereference of those is undefined behaviour. Compilers turn this
// into an ordinary (unaligned) load or store.
template <class V, class T>
inline V load_lane(const T* p) {
  if constexpr (sizeof(V) == sizeof(T)) {
    T x;
    std::memcpy(&x, p, sizeof(T));
    return x;
  } else {
    return V::load(p);
  }
}

template <class V, class T>
inline void store_lane(T* p, const V& x) {
  if constexpr (sizeof(V) == sizeof(T)) {
    const T value = x;
    std::memcpy(p, &value, sizeof(T));
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
// type, then the tail with the same math on plain T: no element is processed twice. The second
// pass of an algorithm with reductions (ReadOnlyStates) reads the states and no grad, and writes
// only the param.
template <class T, unsigned Pattern, bool ReadOnlyStates = false, class Update>
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
    V g = ReadOnlyStates ? V(T(0)) : load_lane<V>(grad + i);
    V s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = has_state[k] ? load_lane<V>(state[k] + i) : V(T(0));
    update(p, g, s);
    store_lane(param + i, p);
    if (write_grad) store_lane(grad + i, g);
    if (!ReadOnlyStates)
      for (int k = 0; k < kMaxStates; ++k)
        if (has_state[k]) store_lane(state[k] + i, s[k]);
  };

  int64_t i = begin;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; i + Lane<T>::lanes <= end; i += Lane<T>::lanes) {
    // The states a step writes, a kilobyte ahead, for writing: a store to a line not yet in
    // cache stalls on its read for ownership, which the hardware prefetchers do not run ahead
    // of as they do for loads. ASGD, whose ax is only written before averaging starts, spent 63%
    // of its loop on that store (0.67 of its ceiling at 1e7); the others gain too (Adam 1e7
    // float32, 2 threads: 4.9 -> 4.5 ms). A prefetch past the end of a buffer is only a hint.
    if (!ReadOnlyStates)
      for (int k = 0; k < kMaxStates; ++k)
        if (has_state[k]) __builtin_prefetch(state[k] + i + 1024 / sizeof(T), 1);
    at(Lane<T>(T(0)), i);
  }
#endif
  for (; i < end; ++i) at(T(0), i);
}

// A tensor's pattern is fixed for the whole range, so each pattern an algorithm commonly produces
// gets a loop of its own with no tests on absent buffers inside (those tests made SGD at 1e7
// elements run at half the bandwidth of a plain p += g); any other pattern takes the general
// loop.
template <class T, bool ReadOnlyStates, unsigned... Patterns, class Update>
inline void stream(const TensorRef& t, int64_t begin, int64_t end, Update update) {
  const unsigned pattern = pattern_of(t);
  const bool done = ((pattern == Patterns &&
                      (stream_pattern<T, Patterns, ReadOnlyStates>(t, begin, end, update), true)) ||
                     ...);
  if (!done) stream_pattern<T, kRuntimePattern, ReadOnlyStates>(t, begin, end, update);
}

// The patterns with a loop of their own: the states every configuration uses plus any subset of
// the optional ones, with and without the gradient's write-back where the algorithm takes a grad
// scale.
template <class A>
constexpr unsigned pattern_count() {
  constexpr unsigned optional = ((1u << A::state_names.size()) - 1) & ~A::always_used_states;
  unsigned count = 0;
  for (unsigned subset = 0; subset < (1u << kMaxStates); ++subset)
    if ((subset & ~optional) == 0) ++count;
  return A::takes_grad_scale ? 2 * count : count;
}

template <class A, unsigned Index>
constexpr unsigned pattern_at() {
  constexpr unsigned optional = ((1u << A::state_names.size()) - 1) & ~A::always_used_states;
  unsigned seen = 0;
  for (unsigned grad = 0; grad < (A::takes_grad_scale ? 2u : 1u); ++grad)
    for (unsigned subset = 0; subset < (1u << kMaxStates); ++subset)
      if ((subset & ~optional) == 0 && seen++ == Index)
        return A::always_used_states | subset | (grad ? kWritesGrad : 0u);
  return kRuntimePattern;
}

template <class T, class A, class Update, unsigned... Index>
inline void stream_algorithm(const TensorRef& t, int64_t begin, int64_t end, Update update,
                             std::integer_sequence<unsigned, Index...>) {
  stream<T, (A::reductions > 0), pattern_at<A, Index>()...>(t, begin, end, update);
}

// The coefficients are copied into the closure: it is then a local whose address never escapes,
// so the compiler keeps them in registers instead of reloading them after every store (a store
// through memcpy may alias anything reachable). Inlined by force: GCC 12 made a function of the
// larger updates (NAdam, RMSprop, LAMB), called once per vector, which reloads and broadcasts
// every coefficient at each call.
template <class A, class T>
void update_kernel(const TensorRef& t, const typename A::Coefficients& coefficients, int64_t begin,
                   int64_t end) {
  const typename A::Coefficients c = coefficients;
  stream_algorithm<T, A>(
      t, begin, end,
      [c](auto& p, auto& g, auto(&s)[kMaxStates])
          __attribute__((always_inline)) { math::update(c, p, g, s); },
      std::make_integer_sequence<unsigned, pattern_count<A>()>{});
}

// Sixteen doubles: the running sums of one reduction, one per element index modulo 16. The
// compiler splits the type into the ISA's registers (two zmm, four ymm, eight xmm), and every
// lane is its own sequential sum, so each ISA adds the same numbers in the same order.
typedef double Sums16 __attribute__((vector_size(16 * sizeof(double))));
typedef float Floats16 __attribute__((vector_size(16 * sizeof(float))));
template <class T>
using Values16 = std::conditional_t<std::is_same_v<T, float>, Floats16, Sums16>;

// The first pass over whole blocks of one tensor: the states updated in place, and per block the
// sums of the squares of what reduce() yields, 16 elements at a time (a block's last, partial
// group padded with zeros, which add nothing).
template <class A, class T>
void reduce_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                   int64_t first_block, int64_t end_block, double* partials) {
  constexpr int R = A::reductions;
  const typename A::Coefficients c = coefficients;
  T* const param = static_cast<T*>(t.param);
  T* const grad = static_cast<T*>(t.grad);
  T* const state[kMaxStates] = {static_cast<T*>(t.state[0]), static_cast<T*>(t.state[1]),
                                static_cast<T*>(t.state[2])};
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * kReductionBlock;
    const int64_t end = std::min(begin + kReductionBlock, t.size);
    Sums16 sums[R] = {};
    for (int64_t group = begin; group < end; group += 16) {
      alignas(64) T summed[R][16] = {};
      auto at = [&](auto lane, int64_t i) {
        using V = decltype(lane);
        const V p = load_lane<V>(param + i);
        const V g = load_lane<V>(grad + i);
        V s[kMaxStates];
        for (int k = 0; k < kMaxStates; ++k) s[k] = state[k] ? load_lane<V>(state[k] + i) : V(T(0));
        V out[R];
        math::reduce(c, p, g, s, out);
        for (int k = 0; k < kMaxStates; ++k)
          if (state[k]) store_lane(state[k] + i, s[k]);
        for (int r = 0; r < R; ++r) store_lane(&summed[r][i - group], out[r]);
      };
      int64_t i = group;
      if (end - group >= 16) {
#if defined(__AVX512F__) || defined(__AVX2__)
        for (; i + Lane<T>::lanes <= group + 16; i += Lane<T>::lanes) at(Lane<T>(T(0)), i);
#endif
      }
      for (; i < std::min(group + 16, end); ++i) at(T(0), i);
      for (int r = 0; r < R; ++r) {
        Values16<T> values;
        std::memcpy(&values, summed[r], sizeof values);
        const Sums16 wide = __builtin_convertvector(values, Sums16);
        sums[r] = sums[r] + wide * wide;
      }
    }
    for (int r = 0; r < R; ++r) {
      double lanes[16];
      std::memcpy(lanes, &sums[r], sizeof lanes);
      for (int width = 8; width >= 1; width /= 2)
        for (int k = 0; k < width; ++k) lanes[k] = lanes[k] + lanes[k + width];
      partials[block * R + r] = lanes[0];
    }
  }
}

template <class T>
void stream_add_kernel(const TensorRef& t, int64_t begin, int64_t end) {
  stream<T, false, 0u, 1u, 3u, 7u>(t, begin, end, [](auto& p, auto& g, auto(&s)[kMaxStates]) {
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

#define FUSEDOPT_CONCAT_INNER(a, b) a##b
#define FUSEDOPT_CONCAT(a, b) FUSEDOPT_CONCAT_INNER(a, b)
#define FUSEDOPT_STRING_INNER(a) #a
#define FUSEDOPT_STRING(a) FUSEDOPT_STRING_INNER(a)

template <class A>
constexpr AlgorithmKernels<A> kernels_for() {
  if constexpr (A::reductions > 0)
    return {{update_kernel<A, float>, update_kernel<A, double>},
            {reduce_kernel<A, float>, reduce_kernel<A, double>}};
  else
    return {{update_kernel<A, float>, update_kernel<A, double>}, {nullptr, nullptr}};
}

template <class... A>
constexpr KernelTable make_table(AlgorithmList<A...>) {
  return {FUSEDOPT_STRING(FUSEDOPT_ISA),
          {kernels_for<A>()...},
          {stream_add_kernel<float>, stream_add_kernel<double>},
          ewma_kernel};
}

}  // namespace FUSEDOPT_ISA

// dispatch.cpp declares one of these per ISA that was built.
const KernelTable& FUSEDOPT_CONCAT(kernel_table_, FUSEDOPT_ISA)() {
  static const KernelTable table = make_table(Algorithms{});
  return table;
}

}  // namespace cpu
}  // namespace fusedopt
