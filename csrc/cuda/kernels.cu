// The CUDA kernels of every algorithm, float32 and float64, and their launches. Built with
// -fmad=false (CMakeLists.txt) so that, like the CPU build with -ffp-contract=off, no multiply-add
// is fused behind the math's back: both backends round every element the same way.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/backend.h"
#include "cuda/multi_tensor.cuh"
#include "math/registry.h"

namespace fusedopt {
namespace cuda {
namespace {

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
  flat_kernel<T, A><<<blocks, kThreadsPerBlock, 0, stream>>>(args);
  check_launch("the flat-buffer kernel");
}

template <class T, class A>
void launch_batch(const LaunchBatch& batch,
                  const std::vector<typename A::Coefficients>& coefficients, cudaStream_t stream) {
  LaunchArguments<typename A::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  multi_tensor_kernel<T, A><<<batch.metadata.num_blocks, kThreadsPerBlock, 0, stream>>>(args);
  check_launch("the multi-tensor kernel");
}

}  // namespace

template <class A>
void launch_step(const PreparedStep<A>& step, void* stream_handle) {
  if constexpr (A::reductions > 0) {
    throw std::invalid_argument(std::string("fusedopt.cuda: ") + A::name +
                                " needs per-tensor reductions, which the CUDA backend does not "
                                "run yet; use the CPU backend for it");
  }
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const std::vector<PlanTensor> tensors = plan_tensors(step.tensors, step.coefficient_of);
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

// Every registered algorithm's launch is compiled here, once, by this function's references to
// them (it has external linkage, so it and they are kept): the bindings (host code) call them.
template <class... A>
constexpr auto launches_of(AlgorithmList<A...>) {
  return std::make_tuple(&launch_step<A>...);
}
decltype(launches_of(Algorithms{})) registered_launches() { return launches_of(Algorithms{}); }

}  // namespace cuda
}  // namespace fusedopt
