// The table kernel: one launch for any number of tensors of any kind, described by tables in
// device memory (csrc/cuda/tables.h). A float32 or float64 tensor is updated as multi_tensor.cuh
// updates it; a low-precision one (docs/spec.md section 22: bfloat16 and float16 params and
// grads, a float32 master copy, bfloat16 or float16 states, 8-bit blockwise states, stochastic
// rounding) element by element: widened to float32, updated by the float32 math (csrc/math, as
// every other kernel) and rounded back by csrc/math/rounding.h's integer roundings, keyed as the
// CPU's (role 0 the param, 1 + k state k; the element's index in its tensor). The CPU's staged
// path (csrc/cpu/kernels.cpp) computes the same values in the same order: the same bits.
//
// A step over device arrays launches it for its low-precision tensors; a registered plan
// (backend.h RegisteredTables) for all its tensors, its tables kept on the device between steps.
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/tables.h"
#include "math/dynamic_map.h"
#include "math/rounding.h"

namespace fusedopt {
namespace cuda {

template <class Coefficients>
struct TableArguments {
  const TableTensor* tensors;
  const TableBlock* blocks;
  const Coefficients* coefficients;
  const SetKeys* keys;  // one per coefficient struct
  const float* maps;    // [2][256]: bitsandbytes' signed and unsigned dynamic maps
};

// The 8-bit path codes two blocks of kQuantBlock elements at a time, one element per thread.
constexpr int kStagedThreads = 2 * kQuantBlock;
static_assert(kStagedThreads == kThreadsPerBlock, "one block size for every kind of tensor");

// ---- One element: widened, and rounded back ---------------------------------------------------

__device__ __forceinline__ float load_widened(const void* buffer, uint8_t dtype, int64_t i) {
  if (dtype == static_cast<uint8_t>(Dtype::float32)) return static_cast<const float*>(buffer)[i];
  const uint32_t h = static_cast<const uint16_t*>(buffer)[i];
  const uint32_t bits = dtype == static_cast<uint8_t>(Dtype::bfloat16)
                            ? math::bfloat16_to_float_bits(h)
                            : math::float16_to_float_bits<uint32_t, float>(h);
  float x;
  __builtin_memcpy(&x, &bits, sizeof x);
  return x;
}

// `role_key` given: rounded stochastically with the bits of element i under that role.
__device__ __forceinline__ void store_rounded(void* buffer, uint8_t dtype, int64_t i, float x,
                                              bool stochastic, uint64_t role_key) {
  if (dtype == static_cast<uint8_t>(Dtype::float32)) {
    static_cast<float*>(buffer)[i] = x;
    return;
  }
  uint32_t f;
  __builtin_memcpy(&f, &x, sizeof f);
  const bool bfloat16 = dtype == static_cast<uint8_t>(Dtype::bfloat16);
  uint32_t h;
  if (stochastic) {
    const auto index = static_cast<uint64_t>(i);
    const uint32_t random =
        math::random_bits(math::weyl(static_cast<uint32_t>(index)), static_cast<uint32_t>(role_key),
                          math::chunk_key_high(role_key, index));
    h = bfloat16 ? math::float_bits_to_bfloat16_stochastic(f, random)
                 : math::float_bits_to_float16_stochastic(f, random);
  } else {
    h = bfloat16 ? math::float_bits_to_bfloat16(f) : math::float_bits_to_float16(f);
  }
  static_cast<uint16_t*>(buffer)[i] = static_cast<uint16_t>(h);
}

// ---- The kernel --------------------------------------------------------------------------------

// Elements [begin, end) of a tensor whose states are not 8-bit: element by element.
template <class A>
__device__ __forceinline__ void update_staged_range(const TableTensor& t,
                                                    const typename A::Coefficients& c,
                                                    const SetKeys& keys, int64_t begin,
                                                    int64_t end) {
  const bool stochastic = t.flags & kStochastic;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float p = t.master ? t.master[i] : load_widened(t.param, t.dtype, i);
    float g = load_widened(t.grad, t.dtype, i);
    float s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k)
      s[k] = t.state[k] ? load_widened(t.state[k], t.state_dtype, i) : 0.0f;
    math::update(c, p, g, s);
    if (t.master) t.master[i] = p;
    store_rounded(t.param, t.dtype, i, p, stochastic, keys.role_key[0]);
    // The unscaled grad written back is rounded to nearest, as torch's fused kernels do.
    if (t.flags & kWriteGrad) store_rounded(t.grad, t.dtype, i, g, false, 0);
    for (int k = 0; k < kMaxStates; ++k)
      if (t.state[k])
        store_rounded(t.state[k], t.state_dtype, i, s[k], stochastic, keys.role_key[1 + k]);
  }
}

// Elements [begin, end) of a tensor with 8-bit states, begin on a block: per element its states
// decoded (map[code] * absmax) and `advance(i, s)` (which advances them, and in the update pass
// stores the param); per block of kQuantBlock the new largest |state| (NaN left out, as the
// CPU's block_absmax), then each element's code of state / largest, and `stored(i, s)` with the
// states as stored (map[code] * largest). Every thread of the block reaches every __syncthreads.
template <class A, class Advance, class Stored>
__device__ __forceinline__ void quantized_range(const TableTensor& t, int64_t begin, int64_t end,
                                                const float (&maps)[2][256], Advance advance,
                                                Stored stored) {
  __shared__ float largest[kMaxStates][kStagedThreads];
  const int lane = threadIdx.x % kQuantBlock;  // within its block
  const int half = threadIdx.x - lane;         // its block's first thread
  for (int64_t first = begin; first < end; first += kStagedThreads) {
    const int64_t i = first + threadIdx.x;
    const bool inside = i < end;
    const int64_t block = i / kQuantBlock;
    float s[kMaxStates] = {};
    if (inside) {
      for (int k = 0; k < kMaxStates; ++k)
        if (t.state[k]) {
          const float* map = maps[(A::nonnegative_states >> k) & 1u];
          s[k] = map[static_cast<const uint8_t*>(t.state[k])[i]] * t.absmax[k][block];
        }
      advance(i, s);
    }
    for (int k = 0; k < kMaxStates; ++k) {
      const float a = s[k] < 0 ? -s[k] : s[k];
      largest[k][threadIdx.x] = a > 0.0f ? a : 0.0f;  // NaN left out; outside the tensor: 0
    }
    __syncthreads();
    for (int width = kQuantBlock / 2; width > 0; width /= 2) {
      if (lane < width)
        for (int k = 0; k < kMaxStates; ++k) {
          const float other = largest[k][threadIdx.x + width];
          if (other > largest[k][threadIdx.x]) largest[k][threadIdx.x] = other;
        }
      __syncthreads();
    }
    if (inside) {
      for (int k = 0; k < kMaxStates; ++k) {
        if (!t.state[k]) continue;
        const float scale = largest[k][half];
        const float* map = maps[(A::nonnegative_states >> k) & 1u];
        const int code = math::nearest_code_by_search(s[k] / scale, map);
        static_cast<uint8_t*>(t.state[k])[i] = static_cast<uint8_t>(code);
        if (lane == 0) t.absmax[k][block] = scale;
        s[k] = map[code] * scale;
      }
      stored(i, s);
    }
    __syncthreads();  // `largest` is written again by the next pair of blocks
  }
}

// The update pass over a tensor with 8-bit states.
template <class A>
__device__ __forceinline__ void update_quantized_range(const TableTensor& t,
                                                       const typename A::Coefficients& c,
                                                       const SetKeys& keys, int64_t begin,
                                                       int64_t end, const float (&maps)[2][256]) {
  const bool stochastic = t.flags & kStochastic;
  quantized_range<A>(
      t, begin, end, maps,
      [&](int64_t i, float(&s)[kMaxStates]) {
        float p = t.master ? t.master[i] : load_widened(t.param, t.dtype, i);
        float g = load_widened(t.grad, t.dtype, i);
        math::update(c, p, g, s);
        if (t.master) t.master[i] = p;
        store_rounded(t.param, t.dtype, i, p, stochastic, keys.role_key[0]);
        if (t.flags & kWriteGrad) store_rounded(t.grad, t.dtype, i, g, false, 0);
      },
      [](int64_t, const float(&)[kMaxStates]) {});
}

// The dynamic maps, read by data-dependent indices: copied into the block's shared memory.
__device__ __forceinline__ void load_maps(float (&maps)[2][256], const float* from) {
  for (int j = threadIdx.x; j < 2 * 256; j += blockDim.x) maps[j / 256][j % 256] = from[j];
  __syncthreads();
}

// What a table kernel's block updates: elements [begin, end) of table tensor `index`, with a copy
// of its record (read through a reference, every field would be loaded again after each store:
// the compiler cannot tell that the stores through the tensor's pointers miss the table).
struct BlockChunk {
  TableTensor t;
  int32_t index;
  int64_t begin, end;
};

template <class Coefficients>
__device__ __forceinline__ BlockChunk block_chunk(const TableArguments<Coefficients>& args) {
  const TableBlock b = args.blocks[blockIdx.x];
  const TableTensor& t = args.tensors[b.tensor];
  const int64_t begin = static_cast<int64_t>(b.chunk) * kChunkElements;
  return {t, b.tensor, begin, begin + kChunkElements < t.size ? begin + kChunkElements : t.size};
}

template <class A>
__global__ void __launch_bounds__(kStagedThreads)
    table_kernel(const TableArguments<typename A::Coefficients> args) {
  __shared__ float maps[2][256];
  load_maps(maps, args.maps);
  const BlockChunk chunk = block_chunk(args);
  const TableTensor& t = chunk.t;
  const int64_t begin = chunk.begin, end = chunk.end;
  const typename A::Coefficients c = args.coefficients[t.coefficient_set];
  if (t.kind != kStaged) {  // each kind is the same for the whole block
    void* addresses[kMaxOperands] = {t.param, t.grad};
    for (int k = 0; k < kMaxStates; ++k) addresses[2 + k] = t.state[k];
    const uint8_t flags = t.flags & (kVectorized | kWriteGrad);
    if (t.kind == kPlainFloat)
      update_range<float>(
          addresses, begin, end, flags,
          [&](float& p, float& g, float(&s)[kMaxStates]) { math::update(c, p, g, s); });
    else
      update_range<double>(
          addresses, begin, end, flags,
          [&](double& p, double& g, double(&s)[kMaxStates]) { math::update(c, p, g, s); });
  } else if (t.state_dtype == static_cast<uint8_t>(Dtype::blockwise8)) {
    update_quantized_range<A>(t, c, args.keys[t.coefficient_set], begin, end, maps);
  } else {
    update_staged_range<A>(t, c, args.keys[t.coefficient_set], begin, end);
  }
}

// ---- Algorithms with per-tensor reductions (LAMB) over the tables ------------------------------
// A step of LAMB that holds a low-precision tensor runs its passes (multi_tensor.cuh) over the
// tables, each block one chunk of a tensor, a tensor's chunks consecutive, so that block b's sums
// go to partials[b]. The first pass advances the states in float32, stores them (rounded, or
// quantized) and sums the squares of what reduced() yields from the states as stored; the second
// finishes the coefficients from the tensor's sums and moves the param from the stored states,
// which it does not write (docs/spec.md section 22, as the CPU's staged passes). The states'
// values and roundings are the CPU's, bit for bit; the sums add in the GPU's order.
template <class Coefficients>
struct ReducingTableArguments {
  TableArguments<Coefficients> table;
  double* partials;    // [block][reduction]
  const double* sums;  // [tensor][reduction]
};

// The first pass over a tensor whose states are 16-bit or float32 (16-bit params, a master):
// the states advanced, stored, and given to `stored(i, s)` as stored.
template <class A, class Stored>
__device__ __forceinline__ void reduce_staged_range(const TableTensor& t,
                                                    const typename A::Coefficients& c,
                                                    const SetKeys& keys, int64_t begin, int64_t end,
                                                    Stored stored) {
  const bool stochastic = t.flags & kStochastic;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = load_widened(t.grad, t.dtype, i);
    float s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k)
      s[k] = t.state[k] ? load_widened(t.state[k], t.state_dtype, i) : 0.0f;
    math::advance(c, g, s);
    for (int k = 0; k < kMaxStates; ++k)
      if (t.state[k]) {
        store_rounded(t.state[k], t.state_dtype, i, s[k], stochastic, keys.role_key[1 + k]);
        s[k] = load_widened(t.state[k], t.state_dtype, i);  // as stored
      }
    stored(i, s);
  }
}

// The first pass over a float32 or float64 tensor of the table.
template <class T, class A>
__device__ __forceinline__ void reduce_plain_range(const TableTensor& t,
                                                   const typename A::Coefficients& c, int64_t begin,
                                                   int64_t end, double (&sum)[A::reductions]) {
  T* const state[kMaxStates] = {static_cast<T*>(t.state[0]), static_cast<T*>(t.state[1]),
                                static_cast<T*>(t.state[2])};
  reduce_range<T, A>(static_cast<T*>(t.param), static_cast<T*>(t.grad), state, c, begin, end, sum);
}

template <class A>
__global__ void __launch_bounds__(kStagedThreads)
    table_reduce_kernel(const ReducingTableArguments<typename A::Coefficients> args) {
  constexpr int R = A::reductions;
  __shared__ float maps[2][256];
  load_maps(maps, args.table.maps);
  const BlockChunk chunk = block_chunk(args.table);
  const TableTensor& t = chunk.t;
  const int64_t begin = chunk.begin, end = chunk.end;
  const typename A::Coefficients c = args.table.coefficients[t.coefficient_set];
  double sum[R] = {};
  // A low-precision element's share of the sums, from its states as stored.
  const auto add_reduced = [&](int64_t i, const float(&s)[kMaxStates]) {
    const float p = t.master ? t.master[i] : load_widened(t.param, t.dtype, i);
    float out[R];
    math::reduced(c, p, s, out);
    for (int r = 0; r < R; ++r) sum[r] += static_cast<double>(out[r]) * static_cast<double>(out[r]);
  };
  if (t.kind == kPlainFloat) {
    reduce_plain_range<float, A>(t, c, begin, end, sum);
  } else if (t.kind == kPlainDouble) {
    reduce_plain_range<double, A>(t, c, begin, end, sum);
  } else if (t.state_dtype == static_cast<uint8_t>(Dtype::blockwise8)) {
    quantized_range<A>(
        t, begin, end, maps,
        [&](int64_t i, float(&s)[kMaxStates]) {
          math::advance(c, load_widened(t.grad, t.dtype, i), s);
        },
        add_reduced);
  } else {
    reduce_staged_range<A>(t, c, args.table.keys[t.coefficient_set], begin, end, add_reduced);
  }
  sum_over_block<R>(sum, args.partials + static_cast<int64_t>(blockIdx.x) * R);
}

template <class A>
__global__ void __launch_bounds__(kStagedThreads)
    table_finish_kernel(const ReducingTableArguments<typename A::Coefficients> args) {
  __shared__ float maps[2][256];
  load_maps(maps, args.table.maps);
  const BlockChunk chunk = block_chunk(args.table);
  const TableTensor& t = chunk.t;
  const int64_t begin = chunk.begin, end = chunk.end;
  typename A::Coefficients c = args.table.coefficients[t.coefficient_set];
  A::finish(c, args.sums + static_cast<int64_t>(chunk.index) * A::reductions);
  const auto move = [&](auto& p, auto& g, auto(&s)[kMaxStates]) { math::update(c, p, g, s); };
  if (t.kind != kStaged) {
    void* addresses[kMaxOperands] = {t.param, t.grad};
    for (int k = 0; k < kMaxStates; ++k) addresses[2 + k] = t.state[k];
    const uint8_t flags = t.flags & kVectorized;
    if (t.kind == kPlainFloat)
      update_range<float, false>(addresses, begin, end, flags, move);
    else
      update_range<double, false>(addresses, begin, end, flags, move);
    return;
  }
  // The states as stored, read (decoded), not written; the param moved and stored.
  const bool quantized = t.state_dtype == static_cast<uint8_t>(Dtype::blockwise8);
  const bool stochastic = t.flags & kStochastic;
  const SetKeys& keys = args.table.keys[t.coefficient_set];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float p = t.master ? t.master[i] : load_widened(t.param, t.dtype, i);
    float g = 0.0f;  // the second pass reads no grad
    float s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) {
      if (!t.state[k])
        s[k] = 0.0f;
      else if (quantized)
        s[k] = maps[(A::nonnegative_states >> k) & 1u][static_cast<const uint8_t*>(t.state[k])[i]] *
               t.absmax[k][i / kQuantBlock];
      else
        s[k] = load_widened(t.state[k], t.state_dtype, i);
    }
    move(p, g, s);
    if (t.master) t.master[i] = p;
    store_rounded(t.param, t.dtype, i, p, stochastic, keys.role_key[0]);
  }
}

}  // namespace cuda
}  // namespace fusedopt
