// The CPU kernels, compiled once per ISA (CMakeLists.txt): FUSEDOPT_ISA is scalar, avx2 or
// avx512, and only this file gets that ISA's flags. Each kernel streams one range of one tensor:
// load every operand once, run the algorithm's math (csrc/math) in registers, store once. The
// kernels of every registered algorithm (csrc/math/registry.h) are instantiated here from one
// template.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "core/tensor.h"
#include "cpu/dispatch.h"
#include "math/dynamic_map.h"
#include "math/ewma.h"
#include "math/registry.h"
#include "math/rounding.h"

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

// How far ahead the streaming loops prefetch every buffer: a load or a store to a line not yet in
// cache stalls, and the math (a root and a division per element for most algorithms) keeps so
// few accesses in flight that the hardware prefetchers fall behind; they do not run ahead of
// stores at all, so a written line waits for its read for ownership. At 1e7 float32, 2 threads,
// fractions of the bandwidth ceiling (interleaved runs, the ceiling's own loop prefetching too):
// with only the written states prefetched 1 KB ahead, RMSprop 0.81-0.84, Adagrad 0.84-0.90,
// momentum 0.83-0.86, Lion 0.83, Adam 0.83-0.86, LAMB 0.67-0.69 (ASGD, whose ax is only
// written, had been 0.67 with none); with every buffer 2 KB ahead, RMSprop 0.90-0.94, Adagrad
// 0.96-0.99, momentum 0.92-0.98, Lion 0.96-0.97, Adam 0.89-0.92, LAMB 0.75-0.80 (1 KB: 0.74-0.81;
// 4 KB: as 2 KB). A prefetch past the end of a buffer is only a hint.
constexpr int64_t kPrefetchAhead = 2048;

// Streams [begin, end) of one tensor through update(param, grad, states) with the widest lane
// type, then the tail with the same math on plain T: no element is processed twice. The second
// pass of an algorithm with reductions (ReadOnlyStates) reads the states and no grad, and writes
// only the param.
template <class T, unsigned Pattern, bool ReadOnlyStates = false, class Update>
__attribute__((always_inline)) inline void stream_pattern(const TensorRef& t, int64_t begin,
                                                          int64_t end, Update update) {
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
    // Every buffer kPrefetchAhead ahead, for writing where the step writes it.
    constexpr int64_t ahead = kPrefetchAhead / sizeof(T);
    __builtin_prefetch(param + i + ahead, 1);
    if (write_grad)
      __builtin_prefetch(grad + i + ahead, 1);
    else if (!ReadOnlyStates)
      __builtin_prefetch(grad + i + ahead);
    for (int k = 0; k < kMaxStates; ++k) {
      if (!has_state[k]) continue;
      if (ReadOnlyStates)
        __builtin_prefetch(state[k] + i + ahead);
      else
        __builtin_prefetch(state[k] + i + ahead, 1);
    }
    at(Lane<T>(T(0)), i);
  }
  // The tail (fewer elements than a vector) as one vector, by masked loads and stores: the same
  // operations lane by lane give the same bits as the scalar math. Adam, 2 threads: 10000 x 100
  // 1.64 -> 1.39-1.48 ms, 1000 x 1000 0.62 -> 0.55-0.58 ms (their last 4 and 8 elements took a
  // scalar divide and root each); a single element stays scalar (10000 x 1 was 7% slower as a
  // vector). The other lanes compute on zeros. Float lanes only: the bandwidth ceiling streams
  // 16-bit storage as integers.
  if constexpr (std::is_floating_point_v<T>) {
    if (const int rest = static_cast<int>(end - i); rest >= 2) {
      Lane<T> p = Lane<T>::load_first(param + i, rest);
      Lane<T> g = ReadOnlyStates ? Lane<T>(T(0)) : Lane<T>::load_first(grad + i, rest);
      Lane<T> s[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k)
        s[k] = has_state[k] ? Lane<T>::load_first(state[k] + i, rest) : Lane<T>(T(0));
      update(p, g, s);
      p.store_first(param + i, rest);
      if (write_grad) g.store_first(grad + i, rest);
      if (!ReadOnlyStates)
        for (int k = 0; k < kMaxStates; ++k)
          if (has_state[k]) s[k].store_first(state[k] + i, rest);
      i = end;
    }
  }
#endif
  for (; i < end; ++i) at(T(0), i);
}

// A tensor's pattern is fixed for the whole range, so each pattern an algorithm commonly produces
// gets a loop of its own with no tests on absent buffers inside (those tests made SGD at 1e7
// elements run at half the bandwidth of a plain p += g); any other pattern takes the general
// loop.
template <class T, bool ReadOnlyStates, unsigned... Patterns, class Update>
__attribute__((always_inline)) inline void stream(const TensorRef& t, int64_t begin, int64_t end,
                                                  Update update) {
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
__attribute__((always_inline)) inline void stream_algorithm(
    const TensorRef& t, int64_t begin, int64_t end, Update update,
    std::integer_sequence<unsigned, Index...>) {
  stream<T, (A::reductions > 0), pattern_at<A, Index>()...>(t, begin, end, update);
}

// The coefficients are copied into the closure: it is then a local whose address never escapes,
// so the compiler keeps them in registers instead of reloading them after every store (a store
// through memcpy may alias anything reachable). Inlined by force: GCC 12 made a function of the
// larger updates (NAdam, RMSprop, LAMB), called once per vector, which reloads and broadcasts
// every coefficient at each call. The loops are inlined into the kernel too (stream_algorithm,
// stream, stream_pattern are always_inline): passed by value to a call, the closure was copied
// through the stack, a wide load of narrow stores that the CPU cannot forward, a stall at every
// call (the C ABI's Adam over 10000 x 100, 1 thread, AMD Zen 5: 681 -> 644 µs per step).
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

typedef float Floats16 __attribute__((vector_size(16 * sizeof(float))));

// float32 squares are summed in float32 over kSquaresPerLane groups of 16 (each lane adds 16
// squares: relative error under 2^-20, where Keras sums a whole tensor in float32), and those
// partial sums in double. Widening every square to double took conversions that LAMB's first
// pass, bound by its arithmetic, has no room for: in cache (32768 elements, 1 thread, AMD Zen 5,
// best of 15 rounds, six interleaved runs) 0.91-0.94 -> 0.83-0.87 ns per element for the step.
constexpr int64_t kSquaresPerLane = 16;

// The first pass over whole blocks of one tensor: the states updated in place, and per block the
// sums of the squares of what reduce() yields, 16 elements at a time. Each reduction keeps 16
// running sums, one per element index modulo 16, each its own sequential sum, so every ISA adds
// the same numbers in the same order; a block's are then added pairwise.
// StoredStates: the states were advanced and stored already (the staged first pass): no grad
// is read and no state written, and the summed values come from the states as they are.
template <class A, class T, bool StoredStates = false>
void reduce_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                   int64_t first_block, int64_t end_block, double* partials) {
  constexpr int R = A::reductions;
  const typename A::Coefficients c = coefficients;
  T* const param = static_cast<T*>(t.param);
  T* const grad = static_cast<T*>(t.grad);
  T* const state[kMaxStates] = {static_cast<T*>(t.state[0]), static_cast<T*>(t.state[1]),
                                static_cast<T*>(t.state[2])};
  // The states the algorithm always uses are known present, those past its own known absent: a
  // test at run time only for the optional ones.
  const auto present = [&](int k) __attribute__((always_inline)) {
    if (k >= static_cast<int>(A::state_names.size())) return false;
    return ((A::always_used_states >> k) & 1u) != 0 || state[k] != nullptr;
  };
  // Each reduction's running squares in registers, a part per vector of the group: 16 / lanes
  // parts, part p for element indices p * lanes to (p + 1) * lanes - 1 modulo 16. They were a
  // 16-float vector type filled from an array in L1 that every group stored and loaded again, at
  // different widths on AVX2, which the CPU cannot forward. LAMB at 1e7 float32 elements, best of
  // 15 in two interleaved runs, AMD Zen 3: 2.00-2.03 -> 1.80-1.82 ns per element on one thread,
  // 1.07-1.08 -> 0.97-1.00 on two; the same bits.
#if defined(__AVX512F__) || defined(__AVX2__)
  using Part = Lane<T>;
#else
  using Part = T;
#endif
  constexpr int kPartLanes = static_cast<int>(sizeof(Part) / sizeof(T));
  constexpr int kParts = 16 / kPartLanes;
  // float32 squares are summed in float32 for kSquaresPerLane groups, float64 ones go straight
  // into the sums.
  constexpr int64_t run = std::is_same_v<T, float> ? 16 * kSquaresPerLane : 16;
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * kReductionBlock;
    const int64_t end = std::min(begin + kReductionBlock, t.size);
    double sums[R][16] = {};
    Part squares[R][kParts];
    for (int r = 0; r < R; ++r)
      for (int part = 0; part < kParts; ++part) squares[r][part] = Part(T(0));
    for (int64_t group = begin; group < end; group += 16) {
      auto at = [&](auto lane, int64_t i, auto(&out)[R]) __attribute__((always_inline)) {
        using V = decltype(lane);
        const V p = load_lane<V>(param + i);
        V s[kMaxStates];
        for (int k = 0; k < kMaxStates; ++k)
          s[k] = present(k) ? load_lane<V>(state[k] + i) : V(T(0));
        if constexpr (StoredStates) {
          math::reduced(c, p, s, out);
        } else {
          math::reduce(c, p, load_lane<V>(grad + i), s, out);
          for (int k = 0; k < kMaxStates; ++k)
            if (present(k)) store_lane(state[k] + i, s[k]);
        }
      };
      if (end - group >= 16) {
#if defined(__AVX512F__) || defined(__AVX2__)
        // Every buffer kPrefetchAhead ahead.
        __builtin_prefetch(param + group + kPrefetchAhead / sizeof(T));
        if (!StoredStates) __builtin_prefetch(grad + group + kPrefetchAhead / sizeof(T));
        for (int k = 0; k < kMaxStates; ++k)
          if (present(k)) __builtin_prefetch(state[k] + group + kPrefetchAhead / sizeof(T), 1);
#endif
        for (int part = 0; part < kParts; ++part) {
          Part out[R];
          at(Part(T(0)), group + part * kPartLanes, out);
          for (int r = 0; r < R; ++r) squares[r][part] = squares[r][part] + out[r] * out[r];
        }
      } else {
        // A block's last, partial group: element by element, padded with zeros, which add
        // nothing.
        alignas(64) T summed[R][16] = {};
        for (int64_t i = group; i < end; ++i) {
          T out[R];
          at(T(0), i, out);
          for (int r = 0; r < R; ++r) summed[r][i - group] = out[r];
        }
        for (int r = 0; r < R; ++r)
          for (int part = 0; part < kParts; ++part) {
            const Part values = load_lane<Part>(summed[r] + part * kPartLanes);
            squares[r][part] = squares[r][part] + values * values;
          }
      }
      if ((group + 16 - begin) % run == 0 || group + 16 >= end) {
        for (int r = 0; r < R; ++r)
          for (int part = 0; part < kParts; ++part) {
            alignas(64) T values[kPartLanes];
            store_lane(values, squares[r][part]);
            for (int lane = 0; lane < kPartLanes; ++lane)
              sums[r][part * kPartLanes + lane] += static_cast<double>(values[lane]);
            squares[r][part] = Part(T(0));
          }
      }
    }
    for (int r = 0; r < R; ++r) {
      double* const lanes = sums[r];
      for (int width = 8; width >= 1; width /= 2)
        for (int k = 0; k < width; ++k) lanes[k] = lanes[k] + lanes[k + width];
      partials[block * R + r] = lanes[0];
    }
  }
}

// ---- 16-bit storage: staged through float32 -------------------------------------------------
// A staged tensor (TensorRef::staged) is updated a chunk at a time: its 16-bit buffers are
// widened into float32 scratch in L1, the float32 kernel above runs on the chunk (float32 buffers
// and the master copy take part in place), and the written buffers are rounded back. One float32
// kernel per algorithm serves every storage combination, so the math is the float32 math
// exactly. Chunks start at multiples of kStageChunk elements of the tensor.
constexpr int64_t kStageChunk = 256;
static_assert(kStageChunk % kQuantBlock == 0 && kReductionBlock % kQuantBlock == 0,
              "a staged chunk holds whole blocks of 8-bit state");

// Sixteen lanes of bits or floats: two ymm registers, one zmm, four xmm.
typedef uint32_t Bits16 __attribute__((vector_size(16 * sizeof(uint32_t))));
typedef uint16_t Halves16 __attribute__((vector_size(16 * sizeof(uint16_t))));

// Inlined by force: a function of its own over 16 lanes would be a symbol outside the per-ISA
// kernel loops (and a call per 16 elements).
template <Dtype D, class U>
FUSEDOPT_LANE_FN U widen_bits(U h) {
  if constexpr (D == Dtype::bfloat16)
    return math::bfloat16_to_float_bits(h);
  else
    return math::float16_to_float_bits<U, std::conditional_t<sizeof(U) == 4, float, Floats16>>(h);
}

// The rounding key of a role for elements within one 2^32 of their tensor (math::random_bits):
// its low half, and the high half mixed with those elements' index >> 32.
struct RoundingKey {
  uint32_t low = 0, high = 0;
  RoundingKey() = default;
  RoundingKey(uint64_t role_key, uint64_t index)
      : low(static_cast<uint32_t>(role_key)), high(math::chunk_key_high(role_key, index)) {}
};

#if defined(__AVX512F__) || defined(__AVX2__)
// The AVX2 and AVX-512 builds convert a lane of the ISA's width at a time, by intrinsics (F16C
// for float16: the integer conversions' bits, NaNs rounded to nearest made the canonical one),
// for the staged path and the in-register loop alike; the scalar build converts 16 lanes of GCC
// vectors by the integer code (csrc/math/rounding.h).
// A lane of floats, and of their bits.
using FloatLane = Lane<float>;
constexpr int kFloatLanes = FloatLane::lanes;
typedef uint32_t LaneBits __attribute__((vector_size(kFloatLanes * sizeof(uint32_t))));

template <int... Lane>
constexpr LaneBits lane_numbers(std::integer_sequence<int, Lane...>) {
  return LaneBits{static_cast<uint32_t>(Lane)...};
}

// One zero-extending load and one narrowing store, by intrinsics: GCC's generic vector
// conversions split these into halves and shuffles.
FUSEDOPT_LANE_FN LaneBits load_halves(const uint16_t* p) {
#if defined(__AVX512F__)
  return (LaneBits)_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return (LaneBits)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}

// Lanes below 2^16 (the roundings' results), narrowed to 16 bits.
FUSEDOPT_LANE_FN void store_halves(uint16_t* p, LaneBits x) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)x));
#else
  const __m256i v = (__m256i)x;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
#endif
}

// A lane of 16-bit values of dtype D, widened: float16 by F16C's conversion (the integer
// conversion's bits, csrc/math/rounding.h).
template <Dtype D>
FUSEDOPT_LANE_FN FloatLane load_sixteen(const void* buffer, int64_t i) {
  const uint16_t* const p = static_cast<const uint16_t*>(buffer) + i;
  FloatLane x;
  if constexpr (D == Dtype::float16) {
#if defined(__AVX512F__)
    x.v =
        (FloatLane::native)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
    x.v = (FloatLane::native)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  } else {
    const LaneBits bits = math::bfloat16_to_float_bits(load_halves(p));
    std::memcpy(&x.v, &bits, sizeof bits);
  }
  return x;
}

#if defined(__AVX512F__)
// bfloat16 to nearest by AVX512_BF16's vcvtneps2bf16 where the CPU has it (AMD Zen 4 and 5,
// Intel from Cooper Lake on): the bits of math::float_bits_to_bfloat16 for every float32 but
// NaNs (it keeps payload bits) and subnormals (it flushes them to zero), compared over all 2^32;
// a vector holding either takes the integer rounding. Inline assembly, so that the avx512
// compile, which also runs on AVX-512 CPUs without BF16, holds the instruction only behind the
// CPU check. Adam over 1e6 bfloat16 params and states in cache, 1 thread, AMD Zen 5: 0.41-0.43
// -> 0.31 ns per element (0.22 unchecked; checked by integer compares instead of vfpclassps,
// 0.39); 1e7, 2 threads, 0.26 -> 0.22-0.25.
FUSEDOPT_LANE_FN bool store_bfloat16_native(uint16_t* out, const FloatLane& x) {
  // One classification: quiet NaN (0x01), subnormal (0x20), signalling NaN (0x80).
  if (_mm512_fpclass_ps_mask((__m512)x.v, 0xa1)) return false;
  __m256i rounded;
  __asm__("vcvtneps2bf16 %1, %0" : "=v"(rounded) : "v"((__m512)x.v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), rounded);
  return true;
}
#endif

// Whether any lane is NaN: one compare and a mask test.
FUSEDOPT_LANE_FN bool any_nan(const FloatLane& x) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)x.v, (__m512)x.v, _CMP_UNORD_Q) != 0;
#else
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)x.v, (__m256)x.v, _CMP_UNORD_Q)) != 0;
#endif
}

// bfloat16 rounding without its NaN rule where no lane is NaN (the rule's compares and blends
// cost as much as the rounding itself). For every other float32 the rounding's own carry gives
// math::float_bits_to_bfloat16's and math::float_bits_to_bfloat16_stochastic's bits: infinity
// stays infinity (its low half is zero and at most 0xffff is added, which never carries into
// the high half), a value past the largest finite one carries into infinity, as those round it.
// Adam over 1e5 bfloat16 params and states in cache, 1 thread, AMD Zen 3, best of 400 in two
// interleaved runs: 1.35 -> 1.09 ns per element, with a float32 master 1.34 -> 1.05, rounded
// stochastically 2.51 -> 2.02; at 1e7 on 2 threads 0.70 -> 0.55 and 1.29 -> 1.03.
FUSEDOPT_LANE_FN LaneBits round_bfloat16(const FloatLane& x, LaneBits f) {
  if (__builtin_expect(any_nan(x), 0)) return math::float_bits_to_bfloat16(f);
  return (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
}
FUSEDOPT_LANE_FN LaneBits round_bfloat16_stochastic(const FloatLane& x, LaneBits f,
                                                    LaneBits random) {
  if (__builtin_expect(any_nan(x), 0)) return math::float_bits_to_bfloat16_stochastic(f, random);
  return (f + (random >> 16)) >> 16;
}

// float16 to nearest by F16C, stored as it comes: the integer rounding's bits once every NaN is
// made the quiet NaN with no payload, which converts to the canonical 0x7e00 (with its sign);
// the NaN test per vector, as for bfloat16. The converted halves were widened back to 32-bit
// lanes for the common narrowing store, and every lane's NaN test was an emulated unsigned
// compare and a blend. Adam over 1e5 float16 params and states in cache, 1 thread, AMD Zen 3,
// best of 400 in two interleaved runs: 1.43 -> 0.78 ns per element; at 1e7 on 2 threads 0.76 ->
// 0.44, under float32's 0.51.
FUSEDOPT_LANE_FN void store_float16_hardware(uint16_t* out, const FloatLane& x) {
  FloatLane::native v = x.v;
  if (__builtin_expect(any_nan(x), 0)) {
    LaneBits f;
    std::memcpy(&f, &v, sizeof f);
    const LaneBits nan = (LaneBits)((f & 0x7fffffffu) > 0x7f800000u);
    f = nan ? (f & 0x80000000u) | 0x7fc00000u : f;
    std::memcpy(&v, &f, sizeof f);
  }
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
}

// A lane rounded to 16 bits and stored at `out`; `index`: the low 32 bits of out[0]'s position
// in its tensor, for the random bits of stochastic rounding.
template <Dtype D, bool Stochastic>
FUSEDOPT_LANE_FN void store_sixteen(uint16_t* out, uint32_t index, const FloatLane& x,
                                    RoundingKey key) {
  LaneBits f;
  std::memcpy(&f, &x.v, sizeof f);
  LaneBits rounded;
  if constexpr (Stochastic) {
    const LaneBits lane_weyl =
        math::weyl(lane_numbers(std::make_integer_sequence<int, kFloatLanes>{}));
    const LaneBits random = math::random_bits(lane_weyl + math::weyl(index), key.low, key.high);
    rounded = D == Dtype::bfloat16 ? round_bfloat16_stochastic(x, f, random)
                                   : math::float_bits_to_float16_stochastic(f, random);
  } else {
#if defined(__AVX512F__)
    if constexpr (D == Dtype::bfloat16)
      if (avx512_bfloat16 && store_bfloat16_native(out, x)) return;
#endif
    if constexpr (D == Dtype::float16) return store_float16_hardware(out, x);
    rounded = round_bfloat16(x, f);
  }
  store_halves(out, rounded);
}

#endif

template <Dtype D>
void widen(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; i + kFloatLanes <= n; i += kFloatLanes) store_lane(out + i, load_sixteen<D>(in, i));
#else
  for (; i + 16 <= n; i += 16) {
    Halves16 h;
    std::memcpy(&h, in + i, sizeof h);
    const Bits16 f = widen_bits<D>(__builtin_convertvector(h, Bits16));
    std::memcpy(out + i, &f, sizeof f);
  }
#endif
  for (; i < n; ++i) {
    const uint32_t f = widen_bits<D>(static_cast<uint32_t>(in[i]));
    std::memcpy(out + i, &f, sizeof f);
  }
}

template <Dtype D, bool Stochastic, class U>
FUSEDOPT_LANE_FN U narrow_bits(U f, U random) {
  if constexpr (D == Dtype::bfloat16)
    return Stochastic ? math::float_bits_to_bfloat16_stochastic(f, random)
                      : math::float_bits_to_bfloat16(f);
  else
    return Stochastic ? math::float_bits_to_float16_stochastic(f, random)
                      : math::float_bits_to_float16(f);
}

// `index`: the position of in[0] in its tensor, for the random bits of stochastic rounding.
template <Dtype D, bool Stochastic>
void narrow(const float* in, int64_t n, uint16_t* out, uint64_t role_key, int64_t index) {
  const RoundingKey key(role_key, static_cast<uint64_t>(index));
  const auto first = static_cast<uint32_t>(index);
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
  for (; i + kFloatLanes <= n; i += kFloatLanes)
    store_sixteen<D, Stochastic>(out + i, first + static_cast<uint32_t>(i),
                                 load_lane<FloatLane>(in + i), key);
#else
  for (; i + 16 <= n; i += 16) {
    Bits16 f;
    std::memcpy(&f, in + i, sizeof f);
    Bits16 random{};
    if constexpr (Stochastic) {
      const Bits16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      random = math::random_bits(math::weyl(lane + (first + static_cast<uint32_t>(i))), key.low,
                                 key.high);
    }
    const Halves16 h = __builtin_convertvector(narrow_bits<D, Stochastic>(f, random), Halves16);
    std::memcpy(out + i, &h, sizeof h);
  }
#endif
  for (; i < n; ++i) {
    uint32_t f;
    std::memcpy(&f, in + i, sizeof f);
    const uint32_t random =
        Stochastic
            ? math::random_bits(math::weyl(first + static_cast<uint32_t>(i)), key.low, key.high)
            : 0u;
    out[i] = static_cast<uint16_t>(narrow_bits<D, Stochastic>(f, random));
  }
}

// Elements [first, first + n) of a buffer of dtype d as float32: in place for float32, widened
// into scratch otherwise.
inline float* stage_in(void* buffer, Dtype d, int64_t first, int64_t n, float* scratch) {
  if (d == Dtype::float32) return static_cast<float*>(buffer) + first;
  const uint16_t* in = static_cast<const uint16_t*>(buffer) + first;
  if (d == Dtype::bfloat16)
    widen<Dtype::bfloat16>(in, n, scratch);
  else
    widen<Dtype::float16>(in, n, scratch);
  return scratch;
}

// The float32 values back into a 16-bit buffer (nothing to do for float32: updated in place).
inline void stage_out(const float* values, void* buffer, Dtype d, int64_t first, int64_t n,
                      bool stochastic, uint64_t role_key) {
  if (d == Dtype::float32) return;
  uint16_t* out = static_cast<uint16_t*>(buffer) + first;
  if (d == Dtype::bfloat16) {
    if (stochastic)
      narrow<Dtype::bfloat16, true>(values, n, out, role_key, first);
    else
      narrow<Dtype::bfloat16, false>(values, n, out, role_key, first);
  } else {
    if (stochastic)
      narrow<Dtype::float16, true>(values, n, out, role_key, first);
    else
      narrow<Dtype::float16, false>(values, n, out, role_key, first);
  }
}

// ---- 8-bit blockwise state, as bitsandbytes' blockwise optimizers keep it -----------------------
// Each block of kQuantBlock elements of a state is stored as 8-bit indices into bitsandbytes'
// dynamic map (the signed one, or the unsigned one for a non-negative state) and the block's
// absmax: the value of element i is map[code[i]] * absmax. A step dequantizes, updates in
// float32, and quantizes each block again with its new absmax (docs/spec.md section 22).

// |x| lane by lane (the sign bit cleared) for a GCC vector of floats.
template <class F>
inline F lanes_abs(F x) {
  using Bits = decltype(x == x);  // integer lanes of the same width
  return (F)((Bits)x & 0x7fffffff);
}

inline const float* dynamic_map(bool nonnegative) {
  return nonnegative ? kUnsignedDynamicMap : kSignedDynamicMap;
}

// Elements [first, first + n) of a quantized state (first and n need not be block-aligned).
inline void dequantize_run(const uint8_t* codes, float scale, const float* map, int64_t n,
                           float* out);
inline void dequantize(const uint8_t* codes, const float* absmax, const float* map, int64_t first,
                       int64_t n, float* out) {
  for (int64_t i = 0; i < n;) {
    const int64_t block = (first + i) / kQuantBlock;
    const int64_t run = std::min(n - i, (block + 1) * kQuantBlock - (first + i));
    dequantize_run(codes + first + i, absmax[block], map, run, out + i);
    i += run;
  }
}

using math::nearest_code_by_search;  // csrc/math/dynamic_map.h: the rule, by search

// The least key in [low, high] for which `holds`, by bisection: `holds` is false below some key
// and true from it on, and true at high.
template <class Predicate>
uint32_t least_key(uint32_t low, uint32_t high, Predicate holds) {
  while (low < high) {
    const uint32_t middle = low + (high - low) / 2;
    if (holds(middle))
      high = middle;
    else
      low = middle + 1;
  }
  return low;
}

inline float float_of_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// The least float a in [0, 1] for which `holds` (false below it, true from it on), or +infinity
// when it holds nowhere there: non-negative floats are ordered as their bits.
template <class Predicate>
float least_magnitude(Predicate holds) {
  if (!holds(1.0f)) return std::numeric_limits<float>::infinity();
  return float_of_bits(
      least_key(0, 0x3f800000u, [&](uint32_t bits) { return holds(float_of_bits(bits)); }));
}

// The rule's code computed rather than looked up, for the vector kernels (AVX-512 and AVX2).
// bitsandbytes builds each map in decades (create_dynamic_map): decade i in
// 0..6 holds the midpoints of n equal parts of [0.1, 1] times 10^(i - 6), n = 2^i (signed) or
// 2^(i + 1) (unsigned), with consecutive codes; then 0 below them and 1.0 above. So within a
// decade the code is its first code plus floor(y), y = (|x| / 10^(i - 6) - 0.1) * n / 0.9, the
// part |x| falls in: y = fma(|x|, slope, intercept) in float32, a few instructions where the
// bucket table took a gather. Which decade: compared exactly, with its least |x| (one boundary
// at most per binade of |x|: a 32-entry table by the exponent). Within it floor(y) is the rule's
// answer wherever y is at least kBand from an integer: checked here, from the rule itself (a
// search per code, over the values quantized: x / absmax, in [-1, 1]), that at every x where the
// rule moves to the next code of a decade, y is within kBand of that integer; y rises with |x|
// (one rounding of a product-sum with a positive slope), so on either side of that band the
// answer is known. Lanes inside a band (about one in 2000 for values spread over a part; NaN)
// take the table and the rule's comparison. A negative x of the signed map takes the mirrored
// code, 254 less its decade's first code and part, with its own decade boundaries (a tie goes
// the other way); of the unsigned map, code 0. A map that is not built
// this way fails a check and is never coded by arithmetic. Adam over bfloat16 params with 8-bit
// state, 1e6 elements, 1 thread (AMD Zen 5, best of 7 in three interleaved runs): 2.18-3.45 ->
// 1.65-2.42 ns per element; 1e7, 2 threads: 12.4-13.2 -> 10.9-11.3 ms. On AVX2 (8-entry permutes:
// the decade by eight comparisons instead of the binade tables), with the division by the
// block's absmax moved into the coder's loop, AMD Zen 3, best of 7 interleaved rounds: 5.84 ->
// 5.24 ns per element (float32 params 5.02 -> 4.36); 1e7, 2 threads, 32.5 -> 27.9 ms.
struct DecadeCodes {
  static constexpr float kBand = 0x1p-12f;
  static constexpr int kBinadeBias = 104;  // binade slot of |x|: exponent field - 104, in [0, 31]
  bool usable = false;
  // A negative x's code: max(mirror - c, 0), c its decade's first code plus its part, the
  // decade found by the negative boundaries; 254 signed, 0 unsigned (every x <= 0: code 0).
  int32_t mirror = 0;
  // Per sign of x (0: not negative) and binade slot: the decade of the slot's smallest |x|, and
  // the least |x| in the slot that starts the next one (NaN if none does: no |x|, +infinity
  // included, compares >= it, so the decade stays in 0..8).
  int32_t below[2][32] = {};
  float boundary[2][32] = {};
  // Per sign of x and decade k: the least |x| of decade k (+infinity where none is: the AVX2
  // coder counts the decades whose start |x| has reached).
  float start[2][9] = {};
  // Per decade: 0 is the zero code, 1 to 7 bitsandbytes' decades 0 to 6, 8 the code of 1.0.
  float slope[16] = {}, intercept[16] = {};
  int32_t first[16] = {}, last[16] = {};  // its first code (x >= 0), and its count less one

  static DecadeCodes of(const float* map, bool nonnegative) {
    DecadeCodes d;
    d.mirror = nonnegative ? 0 : 254;
    const int zero_code = nonnegative ? 0 : 127;
    int code = zero_code;
    for (int k = 0; k < 9; ++k) {
      const int parts = k == 0 || k == 8 ? 1 : (nonnegative ? 2 : 1) << (k - 1);
      d.first[k] = k == 8 ? 255 : code;
      d.last[k] = parts - 1;
      if (k == 0 || k == 8) {
        d.slope[k] = 0.0f;
        d.intercept[k] = 0.5f;
      } else {
        d.slope[k] = static_cast<float>(parts / (0.9 * std::pow(10.0, k - 7)));
        d.intercept[k] = static_cast<float>(-parts / 9.0);
      }
      code += parts;
    }
    if (code != 256) return d;
    const auto code_of = [&](float x) { return nearest_code_by_search(x, map); };
    // Where, as |x| rises, x's code reaches `c` (for a negative x, max(mirror - c, 0): the signed
    // map has no -1.0, so a negative x's top decade is its last code, 0, and -1.0 is decided
    // there rather than at y = 64, a band's middle): +infinity where it never does.
    const auto reaches = [&](int sign, int c) {
      if (sign == 0) return least_magnitude([&](float a) { return code_of(a) >= c; });
      return least_magnitude([&](float a) { return code_of(-a) <= std::max(d.mirror - c, 0); });
    };
    for (int sign = 0; sign < (nonnegative ? 1 : 2); ++sign) {
      float starts[9];  // the least |x| of decade k
      for (int k = 0; k < 9; ++k) starts[k] = reaches(sign, d.first[k]);
      if (starts[0] != 0.0f) return d;
      std::memcpy(d.start[sign], starts, sizeof starts);
      for (int slot = 0; slot < 32; ++slot) {
        const float low = slot == 0 ? 0.0f : float_of_bits(uint32_t(slot + kBinadeBias) << 23);
        const float high = slot == 31 ? std::numeric_limits<float>::infinity()
                                      : float_of_bits((uint32_t(slot + 1 + kBinadeBias) << 23) - 1);
        int inside = 0;
        d.below[sign][slot] = 0;
        d.boundary[sign][slot] = std::numeric_limits<float>::quiet_NaN();
        for (int k = 1; k < 9; ++k) {
          if (starts[k] <= low) {
            ++d.below[sign][slot];
          } else if (starts[k] <= high && !std::isinf(starts[k])) {
            d.boundary[sign][slot] = starts[k];
            ++inside;
          }
        }
        if (inside > 1) return d;
      }
      for (int k = 1; k < 8; ++k)
        for (int j = 1; j <= d.last[k]; ++j) {
          const float y = std::fmaf(reaches(sign, d.first[k] + j), d.slope[k], d.intercept[k]);
          if (!(std::fabs(y - static_cast<float>(j)) < kBand)) return d;
        }
    }
    if (nonnegative) {  // map[0] = 0 is the least code: every x <= 0 takes code 0
      if (map[0] != 0.0f) return d;
      std::memcpy(d.below[1], d.below[0], sizeof d.below[0]);
      std::memcpy(d.boundary[1], d.boundary[0], sizeof d.boundary[0]);
      std::memcpy(d.start[1], d.start[0], sizeof d.start[0]);
    }
    d.usable = true;
    return d;
  }
};

// A dependent chain of eight loads per element was 30 times a float32 step, and a table of
// search starts refined by five gathers still 6 times. This table holds the answer: per sign,
// over buckets of |x| (its exponent and top 9 mantissa bits), the code of the bucket's lowest
// x. The rule's result rises with x, and no bucket spans more than one change (checked when
// built, else the search is used: the unsigned map's codes near 1 are 0.7% apart, a bucket
// 0.2% wide), so within a bucket it is that code c or c + 1, and c + 1 exactly where x has
// reached map[c + 1] or is strictly closer to it than to map[c]: the rule's own comparison.
struct CodeTable {
  static constexpr int kShift = 14;                                  // 23 - 9 mantissa bits kept
  static constexpr uint32_t kBuckets = (0x3f800000u >> kShift) + 1;  // |x| up to 1.0
  // [0, kBuckets) for x >= 0, then x < 0; three spare bytes so 32-bit gathers stay inside.
  uint8_t code[2 * kBuckets + 3] = {};
  // threshold[c]: the least x that the rule moves from c up to c + 1 (NaN for the last code, so
  // no x moves). The rule's comparison, |x - map[c + 1]| < |x - map[c]| or x >= map[c + 1], only
  // turns from false to true as x rises (a rounded difference is monotonic in x), and is false
  // below map[c]: one comparison with the threshold is the rule, and one gather fewer than
  // reading both map values.
  float threshold[256];
  bool exact = true;
  DecadeCodes decades;  // built and read by the AVX2 and AVX-512 kernels only

  explicit CodeTable(const float* map, bool nonnegative) {
    for (int c = 0; c < 256; ++c)
      threshold[c] = c == 255 ? std::numeric_limits<float>::quiet_NaN() : least_moved_up(map, c);
#if defined(__AVX512F__) || defined(__AVX2__)
    decades = DecadeCodes::of(map, nonnegative);  // a search per code: only where it is used
#endif
    for (uint32_t negative = 0; negative < 2; ++negative)
      for (uint32_t b = 0; b < kBuckets; ++b) {
        const uint32_t low = b << kShift, high = std::min(low | ((1u << kShift) - 1), 0x3f800000u);
        float small, large;  // the bucket's magnitudes
        std::memcpy(&small, &low, sizeof small);
        std::memcpy(&large, &high, sizeof large);
        const float lowest = negative ? -large : small, highest = negative ? -small : large;
        const int first = nearest_code_by_search(lowest, map);
        code[negative * kBuckets + b] = static_cast<uint8_t>(first);
        if (nearest_code_by_search(highest, map) - first > 1) exact = false;
      }
  }

  // By bisection over the floats of [map[c], map[c + 1]], ordered as integers that rise with
  // them (the sign bit flipped for x >= 0, every bit for x < 0).
  static float least_moved_up(const float* map, int c) {
    const auto moves_up = [&](float x) {
      return x >= map[c + 1] || std::fabs(x - map[c + 1]) < std::fabs(x - map[c]);
    };
    const auto ordered = [](float x) {
      uint32_t bits;
      std::memcpy(&bits, &x, sizeof bits);
      return bits >> 31 ? ~bits : bits | 0x80000000u;
    };
    const auto from_ordered = [](uint32_t key) {
      return float_of_bits(key >> 31 ? key & 0x7fffffffu : ~key);
    };
    // moves_up(map[c + 1]) holds
    return from_ordered(least_key(ordered(map[c]), ordered(map[c + 1]),
                                  [&](uint32_t key) { return moves_up(from_ordered(key)); }));
  }

  // The bucket of x (NaN and |x| > 1 clamp to the last; callers handle NaN).
  static uint32_t bucket(uint32_t bits) {
    return (bits >> 31) * kBuckets + std::min((bits & 0x7fffffffu) >> kShift, kBuckets - 1);
  }
};

inline const CodeTable& code_table(bool nonnegative) {
  static const CodeTable signed_table(kSignedDynamicMap, false),
      unsigned_table(kUnsignedDynamicMap, true);
  return nonnegative ? unsigned_table : signed_table;
}

inline uint8_t nearest_code(float x, const float* map, const CodeTable& table) {
  if (!table.exact || x != x) return static_cast<uint8_t>(nearest_code_by_search(x, map));
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int c = table.code[CodeTable::bucket(bits)];
  return static_cast<uint8_t>(c + (x >= table.threshold[c]));
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The same search and rule, a vector of lanes at a time: the bucket table by the ISA's gathers,
// the map and the thresholds (256 floats each) by FloatTable (the same comparisons: the same
// codes as the scalar search, on every ISA). Most lanes are coded by DecadeCodes instead.
#if defined(__AVX512F__)
constexpr int kGatherLanes = 16;
typedef int32_t GatherInts __attribute__((vector_size(64)));
typedef float GatherFloats __attribute__((vector_size(64)));
inline GatherInts gather_bytes(const uint8_t* table, GatherInts index) {
  return (GatherInts)_mm512_i32gather_epi32((__m512i)index, table, 1) & 0xff;
}
// A table of 256 floats (a dynamic map, a CodeTable's thresholds) held in sixteen registers and
// read by permutes: each of eight picks a lane of a register pair by the index's low five bits,
// and three rounds of blends choose among them by its top three. A 16-lane gather is one of the
// slowest instructions there is (5.5 ns from L1 on the AMD Zen 5 of 2 December; on the Intel
// machine of the earlier runs two fewer per 16 elements saved 1.3 ns per element): Adam over
// bfloat16 params with 8-bit state, 1e6 elements, 1 thread, 3.4-3.8 -> 2.3-2.7 ns per element; 1e7,
// 2 threads, 1.74-1.80 -> 1.38-1.41.
class FloatTable {
 public:
  explicit FloatTable(const float* table) {
    for (int k = 0; k < 16; ++k) part_[k] = _mm512_loadu_ps(table + 16 * k);
  }
  GatherFloats operator()(GatherInts index) const {
    const __m512i i = (__m512i)index;
    __m512 pairs[8];
    for (int k = 0; k < 8; ++k)
      pairs[k] = _mm512_permutex2var_ps(part_[2 * k], i, part_[2 * k + 1]);
    for (int bit = 5, count = 8; bit < 8; ++bit, count /= 2) {
      const __mmask16 high = _mm512_test_epi32_mask(i, _mm512_set1_epi32(1 << bit));
      for (int k = 0; k < count / 2; ++k)
        pairs[k] = _mm512_mask_blend_ps(high, pairs[2 * k], pairs[2 * k + 1]);
    }
    return (GatherFloats)pairs[0];
  }

 private:
  __m512 part_[16];
};
#else
constexpr int kGatherLanes = 8;
typedef int32_t GatherInts __attribute__((vector_size(32)));
typedef float GatherFloats __attribute__((vector_size(32)));
inline GatherInts gather_bytes(const uint8_t* table, GatherInts index) {
  return (GatherInts)_mm256_i32gather_epi32(reinterpret_cast<const int*>(table), (__m256i)index,
                                            1) &
         0xff;
}
// AVX2 permutes pick among 8 lanes only: its tables are gathered.
class FloatTable {
 public:
  explicit FloatTable(const float* table) : table_(table) {}
  GatherFloats operator()(GatherInts index) const {
    return (GatherFloats)_mm256_i32gather_ps(table_, (__m256i)index, 4);
  }

 private:
  const float* table_;
};
#endif

// kGatherLanes codes to and from 32-bit lanes by the ISA's own widening and narrowing: the vector
// extensions' conversions went a byte at a time through general registers (a third of a
// dequantization on AVX-512, the same share of the quantizing on AVX2).
inline GatherInts widen_codes(const uint8_t* codes) {
#if defined(__AVX512F__)
  return (GatherInts)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
#else
  return (GatherInts)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
#endif
}
inline void store_codes(uint8_t* out, GatherInts codes) {  // each lane in [0, 255]
#if defined(__AVX512F__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8((__m512i)codes));
#else
  const __m256i lanes = (__m256i)codes;
  const __m128i halves =
      _mm_packus_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(halves, halves));
#endif
}

// The codes of a vector of lanes by the bucket table (table.exact). Comparisons give -1 in a lane
// where true: subtracting a mask adds one.
inline GatherInts table_codes(GatherFloats v, const CodeTable& table,
                              const FloatTable& thresholds) {
  GatherInts bits;
  std::memcpy(&bits, &v, sizeof bits);
  const GatherInts magnitude = (bits & 0x7fffffff) >> CodeTable::kShift;
  const GatherInts bucket =
      (bits < 0 ? GatherInts{} + static_cast<int>(CodeTable::kBuckets) : GatherInts{}) +
      (magnitude < static_cast<int>(CodeTable::kBuckets)
           ? magnitude
           : GatherInts{} + (CodeTable::kBuckets - 1));
  const GatherInts c = gather_bytes(table.code, bucket);
  const GatherInts up = v >= thresholds(c);
  return v != v ? GatherInts{} : c - up;  // NaN: code 0
}

#if defined(__AVX512F__)
// DecadeCodes held in registers: the codes of 16 lanes, or false (nothing computed) when a lane
// is in a band or NaN.
class DecadeCoder {
 public:
  explicit DecadeCoder(const DecadeCodes& d)
      : slope_(_mm512_loadu_ps(d.slope)),
        intercept_(_mm512_loadu_ps(d.intercept)),
        first_(_mm512_loadu_si512(d.first)),
        last_(_mm512_loadu_si512(d.last)),
        mirror_(_mm512_set1_epi32(d.mirror)) {
    for (int sign = 0; sign < 2; ++sign)
      for (int half = 0; half < 2; ++half) {
        below_[sign][half] = _mm512_loadu_si512(d.below[sign] + 16 * half);
        boundary_[sign][half] = _mm512_loadu_ps(d.boundary[sign] + 16 * half);
      }
  }

  bool operator()(__m512 x, __m512i& codes) const {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i bits = _mm512_castps_si512(x);
    const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, zero);
    const __m512i magnitude_bits = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
    const __m512 a = _mm512_castsi512_ps(magnitude_bits);
    const __m512i slot = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_sub_epi32(_mm512_srli_epi32(magnitude_bits, 23),
                                          _mm512_set1_epi32(DecadeCodes::kBinadeBias)),
                         zero),
        _mm512_set1_epi32(31));
    const __m512i below = _mm512_mask_blend_epi32(
        negative, _mm512_permutex2var_epi32(below_[0][0], slot, below_[0][1]),
        _mm512_permutex2var_epi32(below_[1][0], slot, below_[1][1]));
    const __m512 boundary = _mm512_mask_blend_ps(
        negative, _mm512_permutex2var_ps(boundary_[0][0], slot, boundary_[0][1]),
        _mm512_permutex2var_ps(boundary_[1][0], slot, boundary_[1][1]));
    const __m512i decade = _mm512_mask_sub_epi32(below, _mm512_cmp_ps_mask(a, boundary, _CMP_GE_OQ),
                                                 below, _mm512_set1_epi32(-1));
    const __m512 y = _mm512_fmadd_ps(a, _mm512_permutexvar_ps(decade, slope_),
                                     _mm512_permutexvar_ps(decade, intercept_));
    const __m512 whole = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 part = _mm512_sub_ps(y, whole);
    const __mmask16 decided = _mm512_mask_cmp_ps_mask(
        _mm512_cmp_ps_mask(part, _mm512_set1_ps(DecadeCodes::kBand), _CMP_GT_OQ), part,
        _mm512_set1_ps(1.0f - DecadeCodes::kBand), _CMP_LT_OQ);
    if (decided != 0xffff) return false;
    const __m512i step = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(whole), zero),
                                          _mm512_permutexvar_epi32(decade, last_));
    const __m512i code = _mm512_add_epi32(_mm512_permutexvar_epi32(decade, first_), step);
    codes = _mm512_mask_max_epi32(code, negative, _mm512_sub_epi32(mirror_, code), zero);
    return true;
  }

 private:
  __m512 slope_, intercept_;
  __m512i first_, last_, mirror_;
  __m512i below_[2][2];
  __m512 boundary_[2][2];
};

#else
// The same on AVX2, whose permutes pick among 8 lanes: the decade by counting the decade starts
// |x| has reached (eight comparisons, each start chosen by x's sign), the per-decade values by
// the decade's low three bits (decade 8, the code of 1.0, has decade 0's slope, intercept and
// count; only its first code differs).
class DecadeCoder {
 public:
  explicit DecadeCoder(const DecadeCodes& d)
      : slope_(_mm256_loadu_ps(d.slope)),
        intercept_(_mm256_loadu_ps(d.intercept)),
        first_(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.first))),
        last_(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.last))),
        top_first_(d.first[8] - d.first[0]),
        mirror_(d.mirror) {
    for (int sign = 0; sign < 2; ++sign)
      for (int k = 1; k < 9; ++k) start_[sign][k - 1] = d.start[sign][k];
  }

  bool operator()(__m256 x, __m256i& codes) const {
    const __m256 a = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    __m256i decade = _mm256_setzero_si256();
    for (int k = 0; k < 8; ++k) {
      const __m256 start =
          _mm256_blendv_ps(_mm256_set1_ps(start_[0][k]), _mm256_set1_ps(start_[1][k]), x);
      decade = _mm256_sub_epi32(decade, _mm256_castps_si256(_mm256_cmp_ps(a, start, _CMP_GE_OQ)));
    }
    const __m256 y = _mm256_fmadd_ps(a, _mm256_permutevar8x32_ps(slope_, decade),
                                     _mm256_permutevar8x32_ps(intercept_, decade));
    const __m256 whole = _mm256_floor_ps(y);
    const __m256 part = _mm256_sub_ps(y, whole);
    const __m256 decided =
        _mm256_and_ps(_mm256_cmp_ps(part, _mm256_set1_ps(DecadeCodes::kBand), _CMP_GT_OQ),
                      _mm256_cmp_ps(part, _mm256_set1_ps(1.0f - DecadeCodes::kBand), _CMP_LT_OQ));
    if (_mm256_movemask_ps(decided) != 0xff) return false;
    const __m256i zero = _mm256_setzero_si256();
    const __m256i step = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(whole), zero),
                                          _mm256_permutevar8x32_epi32(last_, decade));
    const __m256i top = _mm256_and_si256(_mm256_cmpeq_epi32(decade, _mm256_set1_epi32(8)),
                                         _mm256_set1_epi32(top_first_));
    const __m256i code =
        _mm256_add_epi32(_mm256_add_epi32(_mm256_permutevar8x32_epi32(first_, decade), top), step);
    const __m256i mirrored =
        _mm256_max_epi32(_mm256_sub_epi32(_mm256_set1_epi32(mirror_), code), zero);
    codes = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(code), _mm256_castsi256_ps(mirrored), x));
    return true;
  }

 private:
  __m256 slope_, intercept_;
  __m256i first_, last_;
  int32_t top_first_, mirror_;
  float start_[2][8];
};
#endif

// The lanes DecadeCoder leaves (rare: a band is 2^-11 of a code's width): by the table or the
// search, its registers loaded here rather than held through the loop.
[[gnu::noinline]] inline GatherInts undecided_codes(GatherFloats v, const float* map,
                                                    const CodeTable& table) {
  if (table.exact) return table_codes(v, table, FloatTable(table.threshold));
  GatherInts codes;
  for (int lane = 0; lane < kGatherLanes; ++lane) codes[lane] = nearest_code(v[lane], map, table);
  return codes;
}

// The codes of x[i] / largest, i in [0, n): each quotient divided in the coder's registers (the
// divider is idle here; the update loop's roots and divisions are done).
inline void nearest_codes(const float* x, int64_t n, float largest, const float* map,
                          const CodeTable& table, uint8_t* out) {
  int64_t i = 0;
  const GatherFloats divisor = GatherFloats{} + largest;
  if (table.decades.usable) {
    const DecadeCoder decade_codes(table.decades);
    for (; i + kGatherLanes <= n; i += kGatherLanes) {
      GatherFloats v;
      std::memcpy(&v, x + i, sizeof v);
      v /= divisor;
#if defined(__AVX512F__)
      __m512i codes;
      if (!decade_codes((__m512)v, codes)) codes = (__m512i)undecided_codes(v, map, table);
#else
      __m256i codes;
      if (!decade_codes((__m256)v, codes)) codes = (__m256i)undecided_codes(v, map, table);
#endif
      store_codes(out + i, (GatherInts)codes);
    }
  }
  if (table.exact) {
    const FloatTable thresholds(table.threshold);
    for (; i + kGatherLanes <= n; i += kGatherLanes) {
      GatherFloats v;
      std::memcpy(&v, x + i, sizeof v);
      store_codes(out + i, table_codes(v / divisor, table, thresholds));
    }
  }
  for (; i < n; ++i) out[i] = nearest_code(x[i] / largest, map, table);
}

inline void dequantize_run(const uint8_t* codes, float scale, const float* map, int64_t n,
                           float* out) {
  int64_t i = 0;
  const FloatTable values_of(map);
  for (; i + kGatherLanes <= n; i += kGatherLanes) {
    const GatherFloats values = values_of(widen_codes(codes + i)) * scale;
    std::memcpy(out + i, &values, sizeof values);
  }
  for (; i < n; ++i) out[i] = map[codes[i]] * scale;
}
#else
inline void dequantize_run(const uint8_t* codes, float scale, const float* map, int64_t n,
                           float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = map[codes[i]] * scale;
}

inline void nearest_codes(const float* x, int64_t n, float largest, const float* map,
                          const CodeTable& table, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = nearest_code(x[i] / largest, map, table);
}
#endif

// The largest of the lanes of a vector none of which is NaN, by halves: the largest in any order.
template <class F>
inline float largest_lane(F lanes) {
  constexpr int n = sizeof(F) / sizeof(float);
  float halves[n];
  std::memcpy(halves, &lanes, sizeof halves);
  for (int width = n / 2; width > 0; width /= 2)
    for (int lane = 0; lane < width; ++lane)
      halves[lane] = halves[lane + width] > halves[lane] ? halves[lane + width] : halves[lane];
  return halves[0];
}

// The largest |x| of `count` values, NaN left out (a NaN never replaces a running maximum). Four
// sets of sixteen running maxima: a serial chain of maxima cost more than the rest of a block.
inline float block_absmax(const float* values, int64_t count) {
  Floats16 lanes[4] = {};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    Floats16 v;
    std::memcpy(&v, values + i, sizeof v);
    v = lanes_abs(v);
    Floats16& set = lanes[(i / 16) % 4];
    set = v > set ? v : set;
  }
  for (const Floats16& set : {lanes[1], lanes[2], lanes[3]})
    lanes[0] = set > lanes[0] ? set : lanes[0];
  float largest = largest_lane(lanes[0]);
  for (; i < count; ++i) {
    const float a = std::fabs(values[i]);
    largest = a > largest ? a : largest;
  }
  return largest;
}

// One block of `count` values whose absmax is `largest`: its codes, each value / largest coded
// by the rule. A block of zeros has absmax 0 (0 / 0 is NaN: code 0).
inline void code_block(const float* values, int64_t count, float largest, bool nonnegative,
                       uint8_t* codes) {
  nearest_codes(values, count, largest, dynamic_map(nonnegative), code_table(nonnegative), codes);
}

// Whole blocks: [first, first + n) starts on a block and ends on one or at the tensor's end.
inline void quantize(const float* values, bool nonnegative, int64_t first, int64_t n,
                     uint8_t* codes, float* absmax) {
  for (int64_t begin = 0; begin < n; begin += kQuantBlock) {
    const int64_t count = std::min(n - begin, kQuantBlock);
    const float largest = block_absmax(values + begin, count);
    absmax[(first + begin) / kQuantBlock] = largest;
    code_block(values + begin, count, largest, nonnegative, codes + first + begin);
  }
}

// Elements [first, first + n) of a staged tensor as a float32 tensor of n elements. Roles of the
// rounding keys: 0 the param, 1 + k state k. `nonnegative`: bit k set, state k takes the unsigned
// dynamic map when quantized.
struct StagedChunk {
  TensorRef view;
  float scratch[2 + kMaxStates][kReductionBlock] __attribute__((aligned(64)));

  // `with_grad`: false for the second pass of an algorithm with reductions, which reads none.
  void load(const TensorRef& t, int64_t first, int64_t n, bool with_grad, unsigned nonnegative) {
    view = t;
    view.size = n;
    view.dtype = view.state_dtype = Dtype::float32;
    view.master = nullptr;
    view.param = t.master ? t.master + first : stage_in(t.param, t.dtype, first, n, scratch[0]);
    view.grad = with_grad ? stage_in(t.grad, t.dtype, first, n, scratch[1]) : nullptr;
    for (int k = 0; k < kMaxStates; ++k) {
      if (!t.state[k]) continue;
      if (t.state_dtype == Dtype::blockwise8) {
        dequantize(static_cast<const uint8_t*>(t.state[k]), t.absmax[k],
                   dynamic_map(nonnegative & (1u << k)), first, n, scratch[2 + k]);
        view.state[k] = scratch[2 + k];
      } else {
        view.state[k] = stage_in(t.state[k], t.state_dtype, first, n, scratch[2 + k]);
      }
    }
  }

  void store_param(const TensorRef& t, int64_t first) const {
    stage_out(static_cast<const float*>(view.param), t.param, t.dtype, first, view.size,
              t.stochastic, role_key(t.rounding_key, 0));
    // The unscaled gradient written back is rounded to nearest, as torch's fused kernels do.
    if (t.write_grad)
      stage_out(static_cast<const float*>(view.grad), t.grad, t.dtype, first, view.size, false, 0);
  }

  void store_states(const TensorRef& t, int64_t first, unsigned nonnegative) const {
    for (int k = 0; k < kMaxStates; ++k) {
      if (!t.state[k]) continue;
      const auto* values = static_cast<const float*>(view.state[k]);
      if (t.state_dtype == Dtype::blockwise8)
        quantize(values, nonnegative & (1u << k), first, view.size,
                 static_cast<uint8_t*>(t.state[k]), t.absmax[k]);
      else
        stage_out(values, t.state[k], t.state_dtype, first, view.size, t.stochastic,
                  role_key(t.rounding_key, 1 + k));
    }
  }
};

// The staged path over [begin, end) of a tensor, a chunk at a time.
template <class A>
void staged_chunks(const TensorRef& t, const typename A::Coefficients& coefficients, int64_t begin,
                   int64_t end) {
  constexpr bool second_pass = A::reductions > 0;  // reads the states, writes only the param
  StagedChunk chunk;
  for (int64_t first = begin; first < end;) {
    const int64_t last = std::min(end, (first / kStageChunk + 1) * kStageChunk);
    chunk.load(t, first, last - first, !second_pass, A::nonnegative_states);
    update_kernel<A, float>(chunk.view, coefficients, 0, last - first);
    chunk.store_param(t, first);
    if (!second_pass) chunk.store_states(t, first, A::nonnegative_states);
    first = last;
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// ---- 16-bit storage in registers --------------------------------------------------------------
// Staging is an L1 round trip per buffer, which cost about as much as Adam's own math (Adam over
// bfloat16 at 1e7 elements was slower than over float32, though it moves half the bytes). For the
// common low-precision configurations, 16-bit params and grads with states of the same dtype or
// float32 (a master copy or not, either rounding), each lane of values is widened right after its
// load and rounded right before its store, inside the float32 loop: the same float32 math on the
// same values and the same rounding, so the same bits as staging. The rest (8-bit state, bfloat16
// state for float16 params, a written-back grad, a reduction's pass) and lanes left over at a
// tensor's end take the staged path; so does the scalar build.

inline bool sixteen_bit_in_registers(const TensorRef& t) {
  return (t.dtype == Dtype::bfloat16 || t.dtype == Dtype::float16) && !t.write_grad &&
         (t.state_dtype == t.dtype || t.state_dtype == Dtype::float32);
}

// The math on lanes that divide by the divider (vec.h's lane_divide) where the float32 lanes
// would multiply (AVX-512): the conversions of the 16-bit and 8-bit buffers keep the other port
// busy. The same registers, retyped.
template <class A>
FUSEDOPT_LANE_FN void update_dividing(const typename A::Coefficients& c, FloatLane& p, FloatLane& g,
                                      FloatLane (&s)[kMaxStates]) {
  using Dividing = Vec<float, sizeof(FloatLane), true>;
  Dividing dp = Dividing::wrap(p.v), dg = Dividing::wrap(g.v), ds[kMaxStates];
  for (int k = 0; k < kMaxStates; ++k) ds[k] = Dividing::wrap(s[k].v);
  math::update(c, dp, dg, ds);
  p.v = dp.v;
  g.v = dg.v;
  for (int k = 0; k < kMaxStates; ++k) s[k].v = ds[k].v;
}

// A loop per rounding and state dtype; the master copy and which states a tensor has are tested
// per lane (the same way every time for a tensor, so predicted), which keeps the build small.
template <class A, Dtype D, bool Stochastic, bool FloatStates>
void sixteen_bit_update_loop(const TensorRef& t, const typename A::Coefficients& coefficients,
                             int64_t begin, int64_t end) {
  // Everything the loop reads, in locals whose addresses never escape (see update_kernel): read
  // through `t`, the pointers were loaded again after every store.
  void* const param = t.param;
  const void* const grad = t.grad;
  float* const master = t.master;
  void* const state[kMaxStates] = {t.state[0], t.state[1], t.state[2]};
  const typename A::Coefficients c = coefficients;
  for (int64_t i = begin; i < end;) {
    // Lanes within one 2^32 elements of the tensor: the rounding keys' high half is per chunk.
    const int64_t segment_end = std::min(end, ((i >> 32) + 1) << 32);
    RoundingKey keys[1 + kMaxStates];
    if (Stochastic)
      for (int role = 0; role <= kMaxStates; ++role)
        keys[role] = RoundingKey(role_key(t.rounding_key, role), static_cast<uint64_t>(i));
    for (; i + kFloatLanes <= segment_end; i += kFloatLanes) {
      // With a master, the master and the param (written, never read), a kilobyte ahead, for
      // writing (see stream_pattern). The same for 16-bit buffers that are read first (two
      // prefetches a line) made those steps 12% slower.
      constexpr int64_t kAhead = 1024;
      if (master) {
        __builtin_prefetch(master + i + kAhead / sizeof(float), 1);
        __builtin_prefetch(static_cast<uint16_t*>(param) + i + kAhead / sizeof(uint16_t), 1);
      }
      FloatLane p = master ? load_lane<FloatLane>(master + i) : load_sixteen<D>(param, i);
      FloatLane g = load_sixteen<D>(grad, i);
      FloatLane s[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k) {
        if (!state[k]) {
          s[k] = FloatLane(0.0f);
        } else if (FloatStates) {
          float* const at = static_cast<float*>(state[k]) + i;
          __builtin_prefetch(at + kAhead / sizeof(float), 1);
          s[k] = load_lane<FloatLane>(at);
        } else {
          s[k] = load_sixteen<D>(state[k], i);
        }
      }
      update_dividing<A>(c, p, g, s);
      if (master) store_lane(master + i, p);
      const auto index = static_cast<uint32_t>(i);
      store_sixteen<D, Stochastic>(static_cast<uint16_t*>(param) + i, index, p, keys[0]);
      for (int k = 0; k < kMaxStates; ++k) {
        if (!state[k]) continue;
        if (FloatStates)
          store_lane(static_cast<float*>(state[k]) + i, s[k]);
        else
          store_sixteen<D, Stochastic>(static_cast<uint16_t*>(state[k]) + i, index, s[k],
                                       keys[1 + k]);
      }
    }
    if (i < segment_end) staged_chunks<A>(t, coefficients, i, segment_end);
    i = segment_end;
  }
}

template <class A, Dtype D>
void sixteen_bit_update_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                               int64_t begin, int64_t end) {
  const bool float_states = t.state_dtype == Dtype::float32;
  if (t.stochastic)
    (float_states ? sixteen_bit_update_loop<A, D, true, true>
                  : sixteen_bit_update_loop<A, D, true, false>)(t, coefficients, begin, end);
  else
    (float_states ? sixteen_bit_update_loop<A, D, false, true>
                  : sixteen_bit_update_loop<A, D, false, false>)(t, coefficients, begin, end);
}
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// ---- 8-bit states in registers ------------------------------------------------------------------
// The same for 8-bit states (float32 or 16-bit params, a master copy or not, either rounding of
// the param): a block of kQuantBlock elements at a time, each lane of each state dequantized
// right after its codes' load, the float32 math, the param stored, the block's new state values
// kept in L1 with their running largest |x|, then each state's block coded by the rule. The
// staged path dequantized every state into L1, staged the param and the grad, ran the math over
// L1 and read every state back twice more (its absmax, its division). The same values, the same
// math and the same rule: the same bits. A block cut short at a tensor's end takes the staged
// path.
inline bool blockwise8_in_registers(const TensorRef& t) {
  return t.state_dtype == Dtype::blockwise8 && !t.write_grad &&
         (t.dtype == Dtype::float32 || t.dtype == Dtype::bfloat16 || t.dtype == Dtype::float16);
}

template <class A, Dtype D, bool Stochastic>
void blockwise8_update_loop(const TensorRef& t, const typename A::Coefficients& coefficients,
                            int64_t begin, int64_t end) {
  // What the loop reads, in locals (see sixteen_bit_update_loop).
  void* const param = t.param;
  const void* const grad = t.grad;
  float* const master = t.master;
  const uint8_t* const codes[kMaxStates] = {static_cast<const uint8_t*>(t.state[0]),
                                            static_cast<const uint8_t*>(t.state[1]),
                                            static_cast<const uint8_t*>(t.state[2])};
  float* const absmax[kMaxStates] = {t.absmax[0], t.absmax[1], t.absmax[2]};
  const typename A::Coefficients c = coefficients;
  const auto load = [](const void* buffer, int64_t i) __attribute__((always_inline)) {
    if constexpr (D == Dtype::float32)
      return load_lane<FloatLane>(static_cast<const float*>(buffer) + i);
    else
      return load_sixteen<D>(buffer, i);
  };
  const FloatTable signed_values(kSignedDynamicMap), unsigned_values(kUnsignedDynamicMap);
  float values[kMaxStates][kQuantBlock] __attribute__((aligned(64)));
  for (int64_t first = begin; first < end; first += kQuantBlock) {
    if (end - first < kQuantBlock) {
      staged_chunks<A>(t, coefficients, first, end);
      break;
    }
    const int64_t block = first / kQuantBlock;
    const RoundingKey key =
        Stochastic ? RoundingKey(role_key(t.rounding_key, 0), static_cast<uint64_t>(first))
                   : RoundingKey();
    float scale[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) scale[k] = codes[k] ? absmax[k][block] : 0.0f;
    GatherFloats largest[kMaxStates] = {};
    for (int64_t j = 0; j < kQuantBlock; j += kFloatLanes) {
      const int64_t i = first + j;
      FloatLane p = master ? load_lane<FloatLane>(master + i) : load(param, i);
      FloatLane g = load(grad, i);
      FloatLane s[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k) {
        if (!codes[k]) {
          s[k] = FloatLane(0.0f);
          continue;
        }
        const FloatTable& map = A::nonnegative_states & (1u << k) ? unsigned_values : signed_values;
        s[k].v = map(widen_codes(codes[k] + i)) * scale[k];
      }
      update_dividing<A>(c, p, g, s);
      if (master) store_lane(master + i, p);
      if constexpr (D == Dtype::float32)
        store_lane(static_cast<float*>(param) + i, p);
      else
        store_sixteen<D, Stochastic>(static_cast<uint16_t*>(param) + i, static_cast<uint32_t>(i), p,
                                     key);
      for (int k = 0; k < kMaxStates; ++k) {
        if (!codes[k]) continue;
        store_lane(values[k] + j, s[k]);
        const GatherFloats magnitude = lanes_abs(s[k].v);
        largest[k] = magnitude > largest[k] ? magnitude : largest[k];  // NaN: left out
      }
    }
    for (int k = 0; k < kMaxStates; ++k) {
      if (!codes[k]) continue;
      const float block_largest = largest_lane(largest[k]);
      absmax[k][block] = block_largest;
      code_block(values[k], kQuantBlock, block_largest, A::nonnegative_states & (1u << k),
                 static_cast<uint8_t*>(t.state[k]) + first);
    }
  }
}

template <class A>
void blockwise8_update_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                              int64_t begin, int64_t end) {
  if (t.dtype == Dtype::float32)
    return blockwise8_update_loop<A, Dtype::float32, false>(t, coefficients, begin, end);
  if (t.dtype == Dtype::bfloat16)
    return t.stochastic
               ? blockwise8_update_loop<A, Dtype::bfloat16, true>(t, coefficients, begin, end)
               : blockwise8_update_loop<A, Dtype::bfloat16, false>(t, coefficients, begin, end);
  return t.stochastic
             ? blockwise8_update_loop<A, Dtype::float16, true>(t, coefficients, begin, end)
             : blockwise8_update_loop<A, Dtype::float16, false>(t, coefficients, begin, end);
}
#endif

template <class A>
void staged_update_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                          int64_t begin, int64_t end) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (A::reductions == 0) {
    if (sixteen_bit_in_registers(t))
      return t.dtype == Dtype::bfloat16
                 ? sixteen_bit_update_kernel<A, Dtype::bfloat16>(t, coefficients, begin, end)
                 : sixteen_bit_update_kernel<A, Dtype::float16>(t, coefficients, begin, end);
    if (blockwise8_in_registers(t)) return blockwise8_update_kernel<A>(t, coefficients, begin, end);
  }
#endif
  staged_chunks<A>(t, coefficients, begin, end);
}

// The first pass, a block of kReductionBlock elements at a time: the states advanced in float32
// over the widened values and stored (rounded or quantized), then the sums taken as the float32
// kernel takes them, over the values computed from the states as stored, which are what the
// second pass reads. Sums over the float32 states before their rounding had the norm of another
// update than the one applied: float16 rounds a second moment under 2^-24 to 0, the update
// divided by epsilon alone, and LAMB moved a float16 param by 10^4 times its trust ratio's bound.
template <class A>
void staged_reduce_kernel(const TensorRef& t, const typename A::Coefficients& coefficients,
                          int64_t first_block, int64_t end_block, double* partials) {
  const typename A::Coefficients c = coefficients;
  StagedChunk chunk;
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t first = block * kReductionBlock;
    const int64_t n = std::min(kReductionBlock, t.size - first);
    chunk.load(t, first, n, true, A::nonnegative_states);
    stream<float, false>(chunk.view, 0, n,
                         [&](auto&, auto& g, auto(&s)[kMaxStates]) { math::advance(c, g, s); });
    chunk.store_states(t, first, A::nonnegative_states);
    chunk.load(t, first, n, false, A::nonnegative_states);
    reduce_kernel<A, float, true>(chunk.view, c, 0, 1, partials + block * A::reductions);
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
// Inlined: as a call per vector (GCC kept it out of line), each lane of series paid a call, a
// return and a vzeroupper.
template <class V>
__attribute__((always_inline)) inline void ewma_row(const EwmaBlock& b, int64_t t, int64_t s) {
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

constexpr int64_t kEwmaRowsAhead = 8;

void ewma_kernel(const EwmaBlock& block, int64_t first, int64_t last) {
  // A copy whose address never escapes, so its pointers, strides and coefficients stay in
  // registers: read through the reference, each was loaded again after every store of a double
  // (which may alias the coefficients). With ewma_row inlined too, 100,000 x 100 series side
  // by side, 1 thread, best of 7 in three interleaved runs: 13.7-14.0 -> 8.7-8.9 ms.
  const EwmaBlock b = block;
  if (b.length == 0) return;
  if (b.series_stride == 1 && b.time_stride > 1) {
    for (int64_t t = 0; t < b.length; ++t) {
      int64_t s = first;
#if defined(__AVX512F__) || defined(__AVX2__)
      for (; s + Lane<double>::lanes <= last; s += Lane<double>::lanes) {
        // Rows ahead, x for reading and out for writing: a thread reads only its part of each
        // row, a strided walk the hardware prefetchers did not follow (two threads over 100,000
        // x 96 took twice one thread's time). A prefetch past the block is only a hint.
        const int64_t ahead = (t + kEwmaRowsAhead) * b.time_stride + s;
        __builtin_prefetch(b.x + ahead);
        __builtin_prefetch(b.out + ahead, 1);
        ewma_row<Lane<double>>(b, t, s);
      }
#endif
      for (; s < last; ++s) ewma_row<double>(b, t, s);
    }
    return;
  }
  int64_t s = first;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Series apart from each other (one after another, or strided): each series is a chain of
  // dependent steps, a division's latency each, which one series at a time waited on. Lanes of
  // different series run side by side instead, two vectors of them interleaved; every lane does
  // the same operations as the scalar loop: the same bits. fusedopt.ewma(x, axis=1) over 100
  // series of 100,000, best of 7 in two interleaved runs: 1 thread 73.0-74.8 -> 22.2-23.4 ms,
  // 2 threads 48.8-49.9 -> 15.2-19.3 ms.
  using V = Lane<double>;
  constexpr int64_t kGroup = 2 * V::lanes;
  for (; s + kGroup <= last; s += kGroup) {
    const double* x = b.x + s * b.series_stride;
    double* out = b.out + s * b.series_stride;
    math::EwmaLanes<V> state[2];
    for (int64_t t = 0; t < b.length; ++t) {
      const int64_t at = t * b.time_stride;
      for (int half = 0; half < 2; ++half) {
        typename V::native lanes;
        for (int k = 0; k < V::lanes; ++k)
          lanes[k] = x[(half * V::lanes + k) * b.series_stride + at];
        const V value = V::wrap(lanes);
        const V y = t == 0 ? math::ewma_first(b.coefficients, state[half], value)
                           : math::ewma_next(b.coefficients, state[half], value);
        for (int k = 0; k < V::lanes; ++k)
          out[(half * V::lanes + k) * b.series_stride + at] = y.v[k];
      }
    }
  }
#endif
  for (; s < last; ++s) {
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
            {reduce_kernel<A, float>, reduce_kernel<A, double>},
            staged_update_kernel<A>,
            staged_reduce_kernel<A>};
  else
    return {{update_kernel<A, float>, update_kernel<A, double>},
            {nullptr, nullptr},
            staged_update_kernel<A>,
            nullptr};
}

template <class... A>
constexpr KernelTable make_table(AlgorithmList<A...>) {
  // 16-bit buffers stream as integers: the ceiling counts their bytes, not their math.
  return {FUSEDOPT_STRING(FUSEDOPT_ISA),
          {kernels_for<A>()...},
          {stream_add_kernel<float>, stream_add_kernel<double>, stream_add_kernel<uint16_t>,
           stream_add_kernel<uint16_t>, stream_add_kernel<uint8_t>},
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
