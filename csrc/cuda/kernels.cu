// The CUDA kernels of every algorithm, float32 and float64, and their launches. Built with
// -fmad=false (CMakeLists.txt) so that, like the CPU build with -ffp-contract=off, no multiply-add
// is fused behind the math's back: both backends round every element the same way.
#if !defined(FUSEDOPT_CUDA_EMULATION)
#include <cuda_runtime.h>
// kernel<<<blocks, threads, 0, stream>>>: the kernel last, so that its template arguments' commas
// need no parentheses (csrc/cuda/emulation.h defines both for the host compiler).
#define FUSEDOPT_LAUNCH(blocks, threads, stream, ...) __VA_ARGS__<<<blocks, threads, 0, stream>>>
#define FUSEDOPT_LAUNCH_SYNCING FUSEDOPT_LAUNCH
#endif

#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/architectures.h"
#include "cuda/backend.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/staged.cuh"
#include "math/dynamic_map.h"
#include "math/registry.h"

namespace fusedopt {
namespace cuda {
namespace {

// cudaGetLastError also clears the error it returns (unless the context is lost for good).
void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt.cuda: launching ") + kernel +
                             " failed: " + cudaGetErrorString(error));
}

// A grid-stride loop covers what is past this many blocks; a million blocks of 64K elements is
// far beyond any device's memory anyway.
constexpr int64_t kMaxFlatBlocks = int64_t{1} << 20;

template <class T, class A>
void launch_flat(const PlanTensor& tensor, const typename A::Coefficients& c, cudaStream_t stream) {
  FlatArguments<typename A::Coefficients> args{};
  for (int k = 0; k < kMaxOperands; ++k) args.addresses[k] = tensor.addresses[k];
  args.size = tensor.size;
  args.flags = static_cast<uint8_t>((is_vectorizable(tensor) ? kVectorized : 0) |
                                    (tensor.write_grad ? kWriteGrad : 0));
  args.coefficients = c;
  const int64_t chunks = (tensor.size + kChunkElements - 1) / kChunkElements;
  const unsigned blocks = static_cast<unsigned>(chunks < kMaxFlatBlocks ? chunks : kMaxFlatBlocks);
  FUSEDOPT_LAUNCH(blocks, kThreadsPerBlock, stream, flat_kernel<T, A>)(args);
  check_launch("the flat-buffer kernel");
}

template <class T, class A>
void launch_batch(const LaunchBatch& batch,
                  const std::vector<typename A::Coefficients>& coefficients, cudaStream_t stream) {
  LaunchArguments<typename A::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  FUSEDOPT_LAUNCH(batch.metadata.num_blocks, kThreadsPerBlock, stream, multi_tensor_kernel<T, A>)
  (args);
  check_launch("the multi-tensor kernel");
}

void check(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    cudaGetLastError();  // not left to surface at the next step's launch check
    throw std::runtime_error(std::string("fusedopt.cuda: ") + call +
                             " failed: " + cudaGetErrorString(error));
  }
}

// A step's tables copied to the device through pinned memory. From pageable memory the runtime
// first waits for all the work queued on the stream (CUDA's "API synchronization behavior"):
// every step would wait for the backward pass before it could queue its kernels. Per device, two
// pinned buffers in turn, each grown as needed and written again only once the copy from it has
// completed (an event): the host may run two steps ahead of the device.
class PinnedStaging {
 public:
  static void copy(void* to, const void* from, size_t bytes, cudaStream_t stream) {
    static std::mutex mutex;
    static std::map<int, PinnedStaging> per_device;
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    const std::lock_guard<std::mutex> lock(mutex);
    per_device[device].copy_here(to, from, bytes, stream);
  }

 private:
  struct Buffer {
    void* host = nullptr;
    size_t capacity = 0;
    cudaEvent_t copied = nullptr;  // recorded after the last copy from it
  };

  void copy_here(void* to, const void* from, size_t bytes, cudaStream_t stream) {
    Buffer& b = buffers_[next_];
    next_ = 1 - next_;
    if (!b.copied)
      check(cudaEventCreateWithFlags(&b.copied, cudaEventDisableTiming), "cudaEventCreate");
    else
      check(cudaEventSynchronize(b.copied), "cudaEventSynchronize");
    if (bytes > b.capacity) {
      if (b.host) cudaFreeHost(b.host);
      b.host = nullptr;
      b.capacity = 0;
      check(cudaHostAlloc(&b.host, bytes, cudaHostAllocPortable), "cudaHostAlloc");
      b.capacity = bytes;
    }
    std::memcpy(b.host, from, bytes);
    check(cudaMemcpyAsync(to, b.host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check(cudaEventRecord(b.copied, stream), "cudaEventRecord");
  }

  Buffer buffers_[2];
  int next_ = 0;
};

template <class T, class A, class Kernel>
void launch_reducing(Kernel kernel, const LaunchBatch& batch,
                     const std::vector<typename A::Coefficients>& coefficients,
                     const std::vector<int64_t>& first_chunk, double* partials, const double* sums,
                     cudaStream_t stream) {
  ReducingArguments<typename A::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  for (int slot = 0; slot < batch.metadata.num_tensors; ++slot) {
    args.tensor_index[slot] = batch.tensor_index[slot];
    args.first_chunk[slot] = first_chunk[batch.tensor_index[slot]];
  }
  args.partials = partials;
  args.sums = sums;
  // reduce_kernel meets at __syncthreads (the emulation runs it on threads of its own).
  FUSEDOPT_LAUNCH_SYNCING(batch.metadata.num_blocks, kThreadsPerBlock, stream, kernel)(args);
  check_launch("a reducing kernel");
}

// The three launches of an algorithm with per-tensor reductions (multi_tensor.cuh), with their
// scratch memory allocated and freed in the stream's order.
template <class A>
void launch_reducing_step(const PreparedStep<A>& step, cudaStream_t stream) {
  constexpr int R = A::reductions;
  const std::vector<PlanTensor> tensors = plan_tensors(step.tensors, step.coefficient_of);
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    first_chunk[i + 1] = first_chunk[i] + (tensors[i].size + kChunkElements - 1) / kChunkElements;
  const int64_t chunks = first_chunk[n];
  if (chunks == 0) return;
  const size_t bytes = sizeof(double) * (chunks * R + n * R) + sizeof(int64_t) * (n + 1);
  void* scratch = nullptr;
  check(cudaMallocAsync(&scratch, bytes, stream), "cudaMallocAsync");
  double* partials = static_cast<double*>(scratch);
  double* sums = partials + chunks * R;
  auto* chunk_index = reinterpret_cast<int64_t*>(sums + n * R);
  const std::vector<LaunchBatch> plan = build_launch_plan(tensors);
  try {
    PinnedStaging::copy(chunk_index, first_chunk.data(), sizeof(int64_t) * (n + 1), stream);
    for (const LaunchBatch& batch : plan) {
      if (batch.element_bytes == 4)
        launch_reducing<float, A>(reduce_kernel<float, A>, batch, step.coefficients, first_chunk,
                                  partials, sums, stream);
      else
        launch_reducing<double, A>(reduce_kernel<double, A>, batch, step.coefficients, first_chunk,
                                   partials, sums, stream);
    }
    const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
    FUSEDOPT_LAUNCH(blocks, 256, stream, sum_chunks_kernel<R>)(partials, chunk_index, n, sums);
    check_launch("the per-tensor sums");
    for (const LaunchBatch& batch : plan) {
      if (batch.element_bytes == 4)
        launch_reducing<float, A>(finished_update_kernel<float, A>, batch, step.coefficients,
                                  first_chunk, partials, sums, stream);
      else
        launch_reducing<double, A>(finished_update_kernel<double, A>, batch, step.coefficients,
                                   first_chunk, partials, sums, stream);
    }
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

// The staged tensors of a step (staged.cuh), in one launch: their descriptions, blocks,
// coefficient structs and the dynamic maps copied into one scratch buffer first.
template <class A>
void launch_staged(const PreparedStep<A>& step, const std::vector<size_t>& staged,
                   cudaStream_t stream) {
  using Coefficients = typename A::Coefficients;
  std::vector<StagedTensor> tensors;
  std::vector<StagedBlock> blocks;
  for (size_t i : staged) {
    const TensorRef& t = step.tensors[i];
    if (t.size == 0) continue;
    if (t.dtype == Dtype::float64)
      throw std::invalid_argument("fusedopt.cuda: float64 params take float64 state only");
    StagedTensor d{};
    d.param = t.param;
    d.grad = t.grad;
    for (int k = 0; k < kMaxStates; ++k) {
      d.state[k] = t.state[k];
      d.absmax[k] = t.absmax[k];
    }
    d.master = t.master;
    d.size = t.size;
    for (int role = 0; role < 1 + kMaxStates; ++role)
      d.role_key[role] = t.stochastic ? role_key(t.rounding_key, role) : 0;
    d.coefficient_set = step.coefficient_of[i];
    d.dtype = static_cast<uint8_t>(t.dtype);
    d.state_dtype = static_cast<uint8_t>(t.state_dtype);
    d.flags = static_cast<uint8_t>((t.write_grad ? kStagedWriteGrad : 0) |
                                   (t.stochastic ? kStagedStochastic : 0));
    const int64_t chunks = (t.size + kChunkElements - 1) / kChunkElements;
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      blocks.push_back({static_cast<int32_t>(tensors.size()), static_cast<int32_t>(chunk)});
    tensors.push_back(d);
  }
  if (blocks.empty()) return;
  if (blocks.size() > static_cast<size_t>(INT32_MAX))
    throw std::length_error("fusedopt.cuda: too many chunks for one launch");
  // One buffer: maps, coefficients, tensors, blocks, each on a 64-byte boundary.
  const auto rounded = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
  const size_t maps_at = 0, coefficients_at = rounded(2 * 256 * sizeof(float));
  const size_t tensors_at =
      coefficients_at + rounded(step.coefficients.size() * sizeof(Coefficients));
  const size_t blocks_at = tensors_at + rounded(tensors.size() * sizeof(StagedTensor));
  std::vector<unsigned char> host(blocks_at + blocks.size() * sizeof(StagedBlock));
  std::memcpy(host.data() + maps_at, kSignedDynamicMap, sizeof kSignedDynamicMap);
  std::memcpy(host.data() + maps_at + sizeof kSignedDynamicMap, kUnsignedDynamicMap,
              sizeof kUnsignedDynamicMap);
  std::memcpy(host.data() + coefficients_at, step.coefficients.data(),
              step.coefficients.size() * sizeof(Coefficients));
  std::memcpy(host.data() + tensors_at, tensors.data(), tensors.size() * sizeof(StagedTensor));
  std::memcpy(host.data() + blocks_at, blocks.data(), blocks.size() * sizeof(StagedBlock));
  void* scratch = nullptr;
  check(cudaMallocAsync(&scratch, host.size(), stream), "cudaMallocAsync");
  auto* device = static_cast<unsigned char*>(scratch);
  try {
    PinnedStaging::copy(scratch, host.data(), host.size(), stream);
    StagedArguments<Coefficients> args;
    args.maps = reinterpret_cast<const float*>(device + maps_at);
    args.coefficients = reinterpret_cast<const Coefficients*>(device + coefficients_at);
    args.tensors = reinterpret_cast<const StagedTensor*>(device + tensors_at);
    args.blocks = reinterpret_cast<const StagedBlock*>(device + blocks_at);
    // staged_kernel meets at __syncthreads (the emulation runs it on threads of its own).
    FUSEDOPT_LAUNCH_SYNCING(static_cast<unsigned>(blocks.size()), kStagedThreads, stream,
                            staged_kernel<A>)
    (args);
    check_launch("the low-precision kernel");
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

}  // namespace

template <class A>
void launch_step(const PreparedStep<A>& step, void* stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  std::vector<size_t> staged;  // low-precision tensors: their own kernel
  for (size_t i = 0; i < step.tensors.size(); ++i)
    if (step.tensors[i].staged()) staged.push_back(i);
  if constexpr (A::reductions > 0) {
    if (!staged.empty())  // refused before the step (cuda_bindings.cpp): never reached
      throw std::invalid_argument("fusedopt.cuda: " + std::string(A::name) +
                                  " takes float32 and float64 tensors only on the GPU");
    launch_reducing_step(step, stream);
    return;
  }
  if (!staged.empty()) launch_staged(step, staged, stream);
  std::vector<PlanTensor> tensors;  // float32 and float64 tensors, planned below
  const std::vector<PlanTensor> all = plan_tensors(step.tensors, step.coefficient_of);
  for (size_t i = 0; i < all.size(); ++i)
    if (!step.tensors[i].staged()) tensors.push_back(all[i]);
  // A dtype with a single non-empty tensor (one flat buffer for a whole model, say) takes the flat
  // kernel: one launch whatever its size, with no plan to build.
  std::vector<PlanTensor> planned;
  for (int element_bytes : {4, 8}) {
    std::vector<const PlanTensor*> of_dtype;
    for (const PlanTensor& t : tensors)
      if (t.element_bytes == element_bytes && t.size > 0) of_dtype.push_back(&t);
    if (of_dtype.size() == 1) {
      const PlanTensor& t = *of_dtype[0];
      const auto& c = step.coefficients[t.coefficient_id];
      if (element_bytes == 4)
        launch_flat<float, A>(t, c, stream);
      else
        launch_flat<double, A>(t, c, stream);
    } else {
      for (const PlanTensor* t : of_dtype) planned.push_back(*t);
    }
  }
  for (const LaunchBatch& batch : build_launch_plan(planned)) {
    if (batch.element_bytes == 4)
      launch_batch<float, A>(batch, step.coefficients, stream);
    else
      launch_batch<double, A>(batch, step.coefficients, stream);
  }
}

#if !defined(FUSEDOPT_CUDA_EMULATION)  // emulated_runtime.cpp's says yes
bool kernels_run_on(int device, std::string* reason) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    if (reason) *reason = "cannot query CUDA device " + std::to_string(device);
    return false;
  }
  cudaError_t error = cudaSuccess;
  const ImagesFor images = images_for(FUSEDOPT_CUDA_ARCHITECTURES, major, minor);
  if (images == ImagesFor::machine_code) return true;
  if (images == ImagesFor::none) {
    error = cudaErrorNoKernelImageForDevice;
  } else {
    // PTX only, which the driver must be able to compile (it may be older than the toolkit's
    // PTX), or a list not read here: the runtime is asked, creating this device's context.
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      if (reason) *reason = "cannot select CUDA device " + std::to_string(device);
      return false;
    }
    // Asking for a kernel's attributes fails when the module has no image for this device.
    cudaFuncAttributes attributes{};
    error = cudaFuncGetAttributes(&attributes, flat_kernel<float, Algorithms::First>);
    cudaGetLastError();
    cudaSetDevice(previous);
    if (error == cudaSuccess) return true;
  }
  if (reason) {
    cudaDeviceProp properties{};
    cudaGetDeviceProperties(&properties, device);
    cudaGetLastError();
    *reason = std::string("fusedopt's CUDA kernels have no image for ") + properties.name +
              " (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
              "; this build serves " FUSEDOPT_CUDA_ARCHITECTURES "): " + cudaGetErrorString(error);
  }
  return false;
}
#endif

// Every registered algorithm's launch is compiled here, once, by this function's references to
// them (it has external linkage, so it and they are kept): the bindings (host code) call them.
template <class... A>
constexpr auto launches_of(AlgorithmList<A...>) {
  return std::make_tuple(&launch_step<A>...);
}
decltype(launches_of(Algorithms{})) registered_launches() { return launches_of(Algorithms{}); }

}  // namespace cuda
}  // namespace fusedopt
