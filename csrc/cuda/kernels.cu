// The CUDA kernels of every algorithm, float32 and float64, and their launches. Built with
// -fmad=false (CMakeLists.txt) so that, like the CPU build with -ffp-contract=off, no multiply-add
// is fused behind the math's back: both backends round every element the same way.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/backend.h"
#include "cuda/multi_tensor.cuh"
#include "math/adagrad.h"
#include "math/adam.h"
#include "math/rmsprop.h"
#include "math/sgd.h"

namespace fusedopt {
namespace cuda {
namespace {

struct Sgd {
  using Coefficients = SgdCoefficients;
  template <class T>
  __device__ static void update(const Coefficients& c, T& p, T& g, T (&s)[kMaxStates]) {
    math::sgd_update(c, p, g, s[0]);
  }
};

struct Adagrad {
  using Coefficients = AdagradCoefficients;
  template <class T>
  __device__ static void update(const Coefficients& c, T& p, T& g, T (&s)[kMaxStates]) {
    math::adagrad_update(c, p, g, s[0]);
  }
};

struct Rmsprop {
  using Coefficients = RmspropCoefficients;
  template <class T>
  __device__ static void update(const Coefficients& c, T& p, T& g, T (&s)[kMaxStates]) {
    math::rmsprop_update(c, p, g, s[0], s[1], s[2]);
  }
};

struct Adam {
  using Coefficients = AdamCoefficients;
  template <class T>
  __device__ static void update(const Coefficients& c, T& p, T& g, T (&s)[kMaxStates]) {
    math::adam_update(c, p, g, s[0], s[1], s[2]);
  }
};

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt.cuda: launching ") + kernel +
                             " failed: " + cudaGetErrorString(error));
}

// A grid-stride loop covers what is past this many blocks; a million blocks of 64K elements is
// far beyond any device's memory anyway.
constexpr int64_t kMaxFlatBlocks = int64_t{1} << 20;

template <class T, class Algorithm>
void launch_flat(const PlanTensor& tensor, const typename Algorithm::Coefficients& c,
                 cudaStream_t stream) {
  FlatArguments<typename Algorithm::Coefficients> args{};
  for (int k = 0; k < kMaxOperands; ++k) args.addresses[k] = tensor.addresses[k];
  args.size = tensor.size;
  args.flags = static_cast<uint8_t>((is_vectorizable(tensor) ? kVectorized : 0) |
                                    (tensor.write_grad ? kWriteGrad : 0));
  args.coefficients = c;
  const int64_t chunks = (tensor.size + kChunkElements - 1) / kChunkElements;
  const unsigned blocks = static_cast<unsigned>(chunks < kMaxFlatBlocks ? chunks : kMaxFlatBlocks);
  flat_kernel<T, Algorithm><<<blocks, kThreadsPerBlock, 0, stream>>>(args);
  check_launch("the flat-buffer kernel");
}

template <class T, class Algorithm>
void launch_batch(const LaunchBatch& batch,
                  const std::vector<typename Algorithm::Coefficients>& coefficients,
                  cudaStream_t stream) {
  LaunchArguments<typename Algorithm::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  multi_tensor_kernel<T, Algorithm>
      <<<batch.metadata.num_blocks, kThreadsPerBlock, 0, stream>>>(args);
  check_launch("the multi-tensor kernel");
}

template <class Algorithm>
void launch(const PreparedStep<typename Algorithm::Coefficients>& step, void* stream_handle) {
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
        launch_flat<float, Algorithm>(t, c, stream);
      else
        launch_flat<double, Algorithm>(t, c, stream);
    } else {
      for (const PlanTensor* t : of_dtype) planned.push_back(*t);
    }
  }
  for (const LaunchBatch& batch : build_launch_plan(planned)) {
    if (batch.element_bytes == 4)
      launch_batch<float, Algorithm>(batch, step.coefficients, stream);
    else
      launch_batch<double, Algorithm>(batch, step.coefficients, stream);
  }
}

}  // namespace

void launch_step(const PreparedStep<SgdCoefficients>& step, void* stream) {
  launch<Sgd>(step, stream);
}
void launch_step(const PreparedStep<AdagradCoefficients>& step, void* stream) {
  launch<Adagrad>(step, stream);
}
void launch_step(const PreparedStep<RmspropCoefficients>& step, void* stream) {
  launch<Rmsprop>(step, stream);
}
void launch_step(const PreparedStep<AdamCoefficients>& step, void* stream) {
  launch<Adam>(step, stream);
}

}  // namespace cuda
}  // namespace fusedopt
