// The core of every step: validate every buffer of the call, compute each tensor's coefficients
// on the host in double, and run the kernels over all tensors in one fork/join. The Python
// bindings and the C ABI both come through here.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "math/coefficients.h"

namespace fusedopt {

// One array as the caller holds it; validation decides whether it may take part.
struct BufferInfo {
  bool present = true;  // false: the caller passed None (no such state for this tensor)
  void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;  // number of elements
  bool is_float32 = false;
  bool is_float64 = false;
  bool contiguous = false;  // C order, no gaps
  bool writeable = false;
  std::string dtype_name;  // set only for dtypes other than float32/float64, for messages
};

// The buffers of one step, by role. states[k] is empty when no tensor keeps such a state;
// otherwise it has one entry per param, absent (None) where that tensor's group keeps none.
struct StepBuffers {
  std::vector<BufferInfo> params;
  std::vector<BufferInfo> grads;
  std::vector<std::vector<BufferInfo>> states;
  std::vector<std::string> state_names;  // e.g. "exp_avgs", for messages
  bool grads_written = false;            // grad_scale writes the unscaled gradient back
};

// Per-tensor step bookkeeping shared by every algorithm: which hyperparameter group a tensor
// belongs to and its step count t (1 on its first step).
struct StepSchedule {
  std::vector<int> group_of;
  std::vector<int64_t> steps;
};

struct SgdOptions {
  double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
  Convention convention = Convention::torch;
};
struct AdagradOptions {
  double lr = 1e-2, lr_decay = 0, weight_decay = 0, eps = 1e-10;
  bool maximize = false;
  Convention convention = Convention::torch;
};
struct RmspropOptions {
  double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
  bool centered = false, maximize = false;
  Convention convention = Convention::torch;
};
struct AdamOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool amsgrad = false, maximize = false, decoupled_weight_decay = false;
  Convention convention = Convention::torch;
};

// Hyperparameter checks with the argument named in the message (same rules as torch.optim).
void validate_options(const SgdOptions& o);
void validate_options(const AdagradOptions& o);
void validate_options(const RmspropOptions& o);
void validate_options(const AdamOptions& o);

// For SGD, steps[i] == 1 marks a momentum buffer created by this step (PyTorch copies the
// gradient into it). grad_scale (SGD, Adam) divides the gradient, which is written back.
void sgd_step(const std::vector<SgdOptions>& groups, const StepSchedule& schedule,
              const StepBuffers& buffers, std::optional<double> grad_scale);
void adagrad_step(const std::vector<AdagradOptions>& groups, const StepSchedule& schedule,
                  const StepBuffers& buffers);
void rmsprop_step(const std::vector<RmspropOptions>& groups, const StepSchedule& schedule,
                  const StepBuffers& buffers);
void adam_step(const std::vector<AdamOptions>& groups, const StepSchedule& schedule,
               const StepBuffers& buffers, std::optional<double> grad_scale);
// The bench's bandwidth ceiling: param += grad and state += grad over the same buffers.
void stream_add_step(const StepBuffers& buffers);

// The coefficients of one step (exposed for tests and the CUDA backend).
SgdCoefficients sgd_coefficients(const SgdOptions& o, int64_t step,
                                 std::optional<double> grad_scale);
AdagradCoefficients adagrad_coefficients(const AdagradOptions& o, int64_t step);
RmspropCoefficients rmsprop_coefficients(const RmspropOptions& o);
AdamCoefficients adam_coefficients(const AdamOptions& o, int64_t step,
                                   std::optional<double> grad_scale);

// A validated step, ready for any backend: tensors[i].coefficients points at
// coefficients[coefficient_of[i]], one struct per run of tensors sharing (group, step). Move-only,
// so those pointers stay valid.
template <class Coefficients>
struct PreparedStep {
  std::vector<TensorRef> tensors;
  std::vector<Coefficients> coefficients;
  std::vector<int> coefficient_of;
  PreparedStep() = default;
  PreparedStep(PreparedStep&&) = default;
  PreparedStep(const PreparedStep&) = delete;
};

// Everything a step does before its kernels run (the CUDA backend launches these itself).
PreparedStep<SgdCoefficients> prepare_sgd_step(const std::vector<SgdOptions>& groups,
                                               const StepSchedule& schedule,
                                               const StepBuffers& buffers,
                                               std::optional<double> grad_scale);
PreparedStep<AdagradCoefficients> prepare_adagrad_step(const std::vector<AdagradOptions>& groups,
                                                       const StepSchedule& schedule,
                                                       const StepBuffers& buffers);
PreparedStep<RmspropCoefficients> prepare_rmsprop_step(const std::vector<RmspropOptions>& groups,
                                                       const StepSchedule& schedule,
                                                       const StepBuffers& buffers);
PreparedStep<AdamCoefficients> prepare_adam_step(const std::vector<AdamOptions>& groups,
                                                 const StepSchedule& schedule,
                                                 const StepBuffers& buffers,
                                                 std::optional<double> grad_scale);

// Checks every buffer of the call (type, dtype, shape, contiguity, writeability, aliasing) and
// returns the kernel's view of each tensor; throws Error naming the argument otherwise.
std::vector<TensorRef> validate_step_buffers(const StepBuffers& buffers);

// Runs one kernel per dtype over all tensors in one fork/join.
void run_kernels(const KernelFn (&kernel)[kNumDtypes], const std::vector<TensorRef>& tensors);

}  // namespace fusedopt
