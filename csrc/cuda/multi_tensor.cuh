// Multi-tensor apply: every chunk of every tensor of a step, each block one chunk, with the
// metadata of the launch passed by value (launch_plan.h). Each element is loaded once, updated by
// the algorithm's math (csrc/math, the same templates the CPU runs, with V = float or double)
// and stored once.
#pragma once

#include <cstdint>

#include "cuda/launch_plan.h"

namespace fusedopt {
namespace cuda {

constexpr int kThreadsPerBlock = 512;

template <class T>
struct Vector16;
template <>
struct Vector16<float> {
  using type = float4;
  static constexpr int lanes = 4;
};
template <>
struct Vector16<double> {
  using type = double2;
  static constexpr int lanes = 2;
};

// The kernel argument of a multi-tensor launch. __grid_constant__ keeps it in the parameter
// space: the blocks index it with their own slot, which would otherwise copy all ~19 KB of it to
// local memory.
template <class Coefficients>
struct LaunchArguments {
  LaunchMetadata metadata;
  Coefficients coefficients[kMaxCoefficientSetsPerLaunch];
};

// One flat buffer per operand: no metadata, any size, one launch.
template <class Coefficients>
struct FlatArguments {
  void* addresses[kMaxOperands];
  int64_t size;
  uint8_t flags;
  Coefficients coefficients;
};

// Updates elements [begin, end) of one tensor. `update(param, grad, states)` works on registers.
// Vectorized: whole 16-byte vectors, then the tail element by element; the plan set the flag
// only when every pointer is 16-byte aligned, and chunks start at multiples of the vector width.
// Otherwise the guarded path: one element per thread per iteration, every index checked.
// WriteStates false: the states are only read (the second pass of an algorithm with reductions,
// which moves the param from the states the first pass stored), and not stored back.
template <class T, bool WriteStates = true, class Update>
__device__ __forceinline__ void update_range(void* const (&addresses)[kMaxOperands], int64_t begin,
                                             int64_t end, uint8_t flags, Update update) {
  T* const param = static_cast<T*>(addresses[0]);
  T* const grad = static_cast<T*>(addresses[1]);
  T* state[kMaxStates];
  for (int k = 0; k < kMaxStates; ++k) state[k] = static_cast<T*>(addresses[2 + k]);
  const bool write_grad = flags & kWriteGrad;
  const int64_t stride = blockDim.x;

  auto update_element = [&](int64_t i) {
    T p = param[i], g = grad[i];
    T s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = state[k] ? state[k][i] : T(0);
    update(p, g, s);
    param[i] = p;
    if (write_grad) grad[i] = g;
    if constexpr (WriteStates)
      for (int k = 0; k < kMaxStates; ++k)
        if (state[k]) state[k][i] = s[k];
  };

  int64_t tail_begin = begin;
  if (flags & kVectorized) {
    using Vector = typename Vector16<T>::type;
    constexpr int lanes = Vector16<T>::lanes;
    const int64_t vectors = (end - begin) / lanes;
    for (int64_t v = threadIdx.x; v < vectors; v += stride) {
      const int64_t i = begin + v * lanes;
      Vector pv = *reinterpret_cast<const Vector*>(param + i);
      Vector gv = *reinterpret_cast<const Vector*>(grad + i);
      Vector sv[kMaxStates];
      for (int k = 0; k < kMaxStates; ++k)
        if (state[k]) sv[k] = *reinterpret_cast<const Vector*>(state[k] + i);
      T* const pl = reinterpret_cast<T*>(&pv);
      T* const gl = reinterpret_cast<T*>(&gv);
#pragma unroll
      for (int lane = 0; lane < lanes; ++lane) {
        T s[kMaxStates];
        for (int k = 0; k < kMaxStates; ++k)
          s[k] = state[k] ? reinterpret_cast<T*>(&sv[k])[lane] : T(0);
        update(pl[lane], gl[lane], s);
        for (int k = 0; k < kMaxStates; ++k)
          if (state[k]) reinterpret_cast<T*>(&sv[k])[lane] = s[k];
      }
      *reinterpret_cast<Vector*>(param + i) = pv;
      if (write_grad) *reinterpret_cast<Vector*>(grad + i) = gv;
      if constexpr (WriteStates)
        for (int k = 0; k < kMaxStates; ++k)
          if (state[k]) *reinterpret_cast<Vector*>(state[k] + i) = sv[k];
    }
    tail_begin = begin + vectors * lanes;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < end; i += stride) update_element(i);
}

template <class T, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_kernel(const __grid_constant__ LaunchArguments<typename A::Coefficients> args) {
  static_assert(sizeof(args) <= 32764, "a kernel's parameters are limited to 32764 bytes");
  const LaunchMetadata& m = args.metadata;
  const int slot = m.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(m.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t size = m.sizes[slot];
  const int64_t end = begin + kChunkElements < size ? begin + kChunkElements : size;
  void* addresses[kMaxOperands];
  for (int k = 0; k < kMaxOperands; ++k) addresses[k] = m.addresses[k][slot];
  const typename A::Coefficients c = args.coefficients[m.coefficient_set[slot]];
  update_range<T>(addresses, begin, end, m.flags[slot],
                  [&](T& p, T& g, T(&s)[kMaxStates]) { math::update(c, p, g, s); });
}

template <class T, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    flat_kernel(const __grid_constant__ FlatArguments<typename A::Coefficients> args) {
  const typename A::Coefficients c = args.coefficients;
  const int64_t chunks = (args.size + kChunkElements - 1) / kChunkElements;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int64_t begin = chunk * kChunkElements;
    const int64_t end = begin + kChunkElements < args.size ? begin + kChunkElements : args.size;
    update_range<T>(args.addresses, begin, end, args.flags,
                    [&](T& p, T& g, T(&s)[kMaxStates]) { math::update(c, p, g, s); });
  }
}

// ---- Algorithms with per-tensor reductions (LAMB) -------------------------------------------
// A first launch updates the states and writes, per block (one chunk of one tensor), the sums of
// the squares of what reduce() yields; a second sums each tensor's chunks in order; a third moves
// the params with coefficients finished from those sums. Every sum has a fixed order (per thread,
// then a tree over the block, then chunk by chunk), so a step is reproducible, though not bit for
// bit the CPU's (whose blocks and lanes add in another order).
template <class Coefficients>
struct ReducingArguments {
  LaunchMetadata metadata;
  Coefficients coefficients[kMaxCoefficientSetsPerLaunch];
  int32_t tensor_index[kMaxTensorsPerLaunch];  // the step-wide index of each slot's tensor
  int64_t first_chunk[kMaxTensorsPerLaunch];   // its first chunk in the step-wide numbering
  double* partials;                            // [chunk][reduction]
  const double* sums;                          // [tensor][reduction]
};

// Elements [begin, end) of a float32 or float64 tensor in the first pass: the states advanced
// and stored, the squares of what reduce() yields added to this thread's sums.
template <class T, class A>
__device__ __forceinline__ void reduce_range(T* param, T* grad, T* const (&state)[kMaxStates],
                                             const typename A::Coefficients& c, int64_t begin,
                                             int64_t end, double (&sum)[A::reductions]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    T s[kMaxStates];
    for (int k = 0; k < kMaxStates; ++k) s[k] = state[k] ? state[k][i] : T(0);
    T out[A::reductions];
    math::reduce(c, param[i], grad[i], s, out);
    for (int k = 0; k < kMaxStates; ++k)
      if (state[k]) state[k][i] = s[k];
    for (int r = 0; r < A::reductions; ++r)
      sum[r] += static_cast<double>(out[r]) * static_cast<double>(out[r]);
  }
}

// The block's threads' sums added in a fixed tree, written to out[0, R) by thread 0. Every thread
// of the block reaches each __syncthreads.
template <int R>
__device__ __forceinline__ void sum_over_block(const double (&sum)[R], double* out) {
  __shared__ double shared[R][kThreadsPerBlock];
  for (int r = 0; r < R; ++r) shared[r][threadIdx.x] = sum[r];
  __syncthreads();
  for (int width = kThreadsPerBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      for (int r = 0; r < R; ++r) shared[r][threadIdx.x] += shared[r][threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0)
    for (int r = 0; r < R; ++r) out[r] = shared[r][0];
}

template <class T, class A>
__global__ void __launch_bounds__(kThreadsPerBlock)
    reduce_kernel(const __grid_constant__ ReducingArguments<typename A::Coefficients> args) {
  static_assert(sizeof(args) <= 32764, "a kernel's parameters are limited to 32764 bytes");
  constexpr int R = A::reductions;
  const LaunchMetadata& m = args.metadata;
  const int slot = m.block_tensor[blockIdx.x];
  const int64_t chunk = m.block_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunkElements;
  const int64_t size = m.sizes[slot];
  const int64_t end = begin + kChunkElements < size ? begin + kChunkElements : size;
  T* state[kMaxStates];
  for (int k = 0; k < kMaxStates; ++k) state[k] = static_cast<T*>(m.addresses[2 + k][slot]);
  double sum[R] = {};
  reduce_range<T, A>(static_cast<T*>(m.addresses[0][slot]), static_cast<T*>(m.addresses[1][slot]),
                     state, args.coefficients[m.coefficient_set[slot]], begin, end, sum);
  sum_over_block<R>(sum, args.partials + (args.first_chunk[slot] + chunk) * R);
}

// One thread per tensor: its chunks' partial sums in order.
template <int R>
__global__ void sum_chunks_kernel(const double* partials, const int64_t* first_chunk,
                                  int64_t num_tensors, double* sums) {
  const int64_t tensor = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tensor >= num_tensors) return;
  for (int r = 0; r < R; ++r) {
    double total = 0;
    for (int64_t chunk = first_chunk[tensor]; chunk < first_chunk[tensor + 1]; ++chunk)
      total += partials[chunk * R + r];
    sums[tensor * R + r] = total;
  }
}

template <class T, class A>
__global__ void __launch_bounds__(kThreadsPerBlock) finished_update_kernel(
    const __grid_constant__ ReducingArguments<typename A::Coefficients> args) {
  const LaunchMetadata& m = args.metadata;
  const int slot = m.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(m.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t size = m.sizes[slot];
  const int64_t end = begin + kChunkElements < size ? begin + kChunkElements : size;
  void* addresses[kMaxOperands];
  for (int k = 0; k < kMaxOperands; ++k) addresses[k] = m.addresses[k][slot];
  typename A::Coefficients c = args.coefficients[m.coefficient_set[slot]];
  A::finish(c, args.sums + static_cast<int64_t>(args.tensor_index[slot]) * A::reductions);
  update_range<T, false>(addresses, begin, end, m.flags[slot],
                         [&](T& p, T& g, T(&s)[kMaxStates]) { math::update(c, p, g, s); });
}

}  // namespace cuda
}  // namespace fusedopt
