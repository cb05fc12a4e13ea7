/* fusedopt's C ABI: fused multi-tensor optimizer steps and EWMA for native code.
 *
 * Every function returns a fusedopt_status (or a plain value that cannot fail); nothing throws
 * across this boundary. On failure, fusedopt_last_error() holds a message naming the offending
 * argument by its role and its tensor's index ("max_exp_avg_sq[3] is missing but this param's
 * options need it", "grads[2] overlaps params[0] in memory; ..."), and nothing was written:
 * every buffer of a call is validated before the first one is touched.
 *
 * Buffers are contiguous arrays of `size` elements of the tensor's dtype. Within one call no
 * buffer may overlap another that is written (a step is not idempotent). A tensor's `step`
 * counts its steps including this one (1 on its first step): the caller keeps the count, as it
 * keeps the state buffers, so a state can be saved and restored as plain arrays.
 *
 * The math is SPEC.md's, identical to fusedopt's Python package: FUSEDOPT_CONVENTION_TORCH
 * follows torch.optim, FUSEDOPT_CONVENTION_KERAS follows Keras 3. Options structs are POD;
 * start from fusedopt_*_default_options() (torch.optim's defaults) and change what you need.
 * Fields typed int32_t that hold a flag mean true when nonzero; the fixed-width types keep the
 * struct layout the same for every compiler.
 */
#ifndef FUSEDOPT_FUSEDOPT_H
#define FUSEDOPT_FUSEDOPT_H

#include <stdint.h>

#if defined(_WIN32)
#if defined(FUSEDOPT_BUILDING_LIBRARY)
#define FUSEDOPT_API __declspec(dllexport)
#else
#define FUSEDOPT_API __declspec(dllimport)
#endif
#else
#define FUSEDOPT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fusedopt_status {
  FUSEDOPT_STATUS_OK = 0,
  /* A buffer of the wrong dtype, or a NULL buffer: Python's TypeError. */
  FUSEDOPT_STATUS_TYPE_ERROR = 1,
  /* An invalid hyperparameter, size, index, step or ISA name, or overlapping buffers. */
  FUSEDOPT_STATUS_VALUE_ERROR = 2,
  FUSEDOPT_STATUS_OUT_OF_MEMORY = 3,
  /* A bug in fusedopt; the message says what failed. */
  FUSEDOPT_STATUS_INTERNAL_ERROR = 4
} fusedopt_status;

typedef enum fusedopt_dtype { FUSEDOPT_FLOAT32 = 0, FUSEDOPT_FLOAT64 = 1 } fusedopt_dtype;

typedef enum fusedopt_convention {
  FUSEDOPT_CONVENTION_TORCH = 0,
  FUSEDOPT_CONVENTION_KERAS = 1
} fusedopt_convention;

/* The message of this thread's latest failed call; "" when its latest call succeeded. Valid
 * until this thread's next fusedopt call. */
FUSEDOPT_API const char* fusedopt_last_error(void);
/* A fixed description of a status code, e.g. "value error". */
FUSEDOPT_API const char* fusedopt_status_string(fusedopt_status status);
/* "MAJOR.MINOR.PATCH" of the library that is loaded. */
FUSEDOPT_API const char* fusedopt_version(void);

/* ---- Hyperparameters, one struct per group of tensors ------------------------------------ */

typedef struct fusedopt_sgd_options {
  double lr, momentum, dampening, weight_decay;
  int32_t nesterov, maximize;
  int32_t convention; /* fusedopt_convention */
} fusedopt_sgd_options;

typedef struct fusedopt_adagrad_options {
  double lr, lr_decay, weight_decay, eps;
  int32_t maximize;
  int32_t convention;
} fusedopt_adagrad_options;

typedef struct fusedopt_rmsprop_options {
  double lr, alpha, eps, weight_decay, momentum;
  int32_t centered, maximize;
  int32_t convention;
} fusedopt_rmsprop_options;

/* Adam; AdamW is decoupled_weight_decay = 1 (with torch.optim.AdamW's weight_decay = 1e-2). */
typedef struct fusedopt_adam_options {
  double lr, beta1, beta2, eps, weight_decay;
  int32_t amsgrad, maximize, decoupled_weight_decay;
  int32_t convention;
} fusedopt_adam_options;

FUSEDOPT_API fusedopt_sgd_options fusedopt_sgd_default_options(void);
FUSEDOPT_API fusedopt_adagrad_options fusedopt_adagrad_default_options(void);
FUSEDOPT_API fusedopt_rmsprop_options fusedopt_rmsprop_default_options(void);
FUSEDOPT_API fusedopt_adam_options fusedopt_adam_default_options(void);

/* ---- Tensors: the buffers of one parameter and where it stands ---------------------------- */

/* grad is read, and written only when a step is given a grad_scale (the unscaled gradient is
 * stored back, as PyTorch's fused optimizers do). A state pointer may be NULL exactly when this
 * tensor's options keep no such state; an empty tensor (size 0) may have NULL buffers. */
typedef struct fusedopt_sgd_tensor {
  void* param;
  void* grad;
  void* momentum_buffer; /* when momentum != 0; torch: filled with the gradient at step 1 */
  int64_t size;
  int64_t step;
  int32_t dtype; /* fusedopt_dtype, the same for every buffer of the tensor */
  int32_t group; /* index into the options array of the call */
} fusedopt_sgd_tensor;

typedef struct fusedopt_adagrad_tensor {
  void* param;
  void* grad;
  void* sum; /* torch: starts at initial_accumulator_value; Keras: at 0.1 */
  int64_t size;
  int64_t step;
  int32_t dtype;
  int32_t group;
} fusedopt_adagrad_tensor;

typedef struct fusedopt_rmsprop_tensor {
  void* param;
  void* grad;
  void* square_avg;
  void* momentum_buffer; /* when momentum != 0 */
  void* grad_avg;        /* when centered */
  int64_t size;
  int64_t step;
  int32_t dtype;
  int32_t group;
} fusedopt_rmsprop_tensor;

typedef struct fusedopt_adam_tensor {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq; /* when amsgrad */
  int64_t size;
  int64_t step;
  int32_t dtype;
  int32_t group;
} fusedopt_adam_tensor;

/* ---- Steps on the CPU: every tensor of the call in one pass over a shared thread pool ------ */

/* grad_scale: NULL for none; otherwise the gradient is divided by *grad_scale (and written
 * back), as torch's fused SGD/Adam do under a GradScaler. */
FUSEDOPT_API fusedopt_status fusedopt_sgd_step(const fusedopt_sgd_options* groups,
                                               int64_t num_groups,
                                               const fusedopt_sgd_tensor* tensors,
                                               int64_t num_tensors, const double* grad_scale);
FUSEDOPT_API fusedopt_status fusedopt_adagrad_step(const fusedopt_adagrad_options* groups,
                                                   int64_t num_groups,
                                                   const fusedopt_adagrad_tensor* tensors,
                                                   int64_t num_tensors);
FUSEDOPT_API fusedopt_status fusedopt_rmsprop_step(const fusedopt_rmsprop_options* groups,
                                                   int64_t num_groups,
                                                   const fusedopt_rmsprop_tensor* tensors,
                                                   int64_t num_tensors);
FUSEDOPT_API fusedopt_status fusedopt_adam_step(const fusedopt_adam_options* groups,
                                                int64_t num_groups,
                                                const fusedopt_adam_tensor* tensors,
                                                int64_t num_tensors, const double* grad_scale);

/* ---- EWMA: pandas' ewm(com=...).mean() over many float64 series at once -------------------- */

typedef struct fusedopt_ewma_options {
  /* Center of mass, >= 0; pandas' other parameters map onto it: com = (span - 1) / 2,
   * com = (1 - alpha) / alpha, com = 1 / (1 - exp(log(0.5) / halflife)) - 1. */
  double com;
  int32_t adjust, ignore_na;
  int64_t min_periods;
} fusedopt_ewma_options;

/* pandas' defaults: adjust = 1, ignore_na = 0, min_periods = 0; com = 0 (set it). */
FUSEDOPT_API fusedopt_ewma_options fusedopt_ewma_default_options(void);

/* Element t of series s is x[s * series_stride + t * time_stride] (strides in elements, >= 0);
 * out has the same layout and must not overlap x: the bytes from the first to the last element
 * of each may not meet (so interleaved x and out are refused too), else
 * FUSEDOPT_STATUS_VALUE_ERROR and nothing is written. An empty block (length or num_series 0)
 * is never an overlap. */
FUSEDOPT_API fusedopt_status fusedopt_ewma(const double* x, double* out, int64_t length,
                                           int64_t num_series, int64_t time_stride,
                                           int64_t series_stride,
                                           const fusedopt_ewma_options* options);

/* ---- CPU kernels and threads (process-wide settings of this library) ---------------------- */

/* The kernel compile in use: "scalar", "avx2" or "avx512". At load it is the best this CPU and
 * OS can run, or the lower one named by the environment variable FUSEDOPT_CPU_ISA. */
FUSEDOPT_API const char* fusedopt_cpu_isa(void);
/* The ISAs this CPU can run, of those built, lowest first and comma-separated, e.g.
 * "scalar,avx2,avx512". Static storage. */
FUSEDOPT_API const char* fusedopt_available_isas(void);
FUSEDOPT_API fusedopt_status fusedopt_set_cpu_isa(const char* isa);

/* At load: FUSEDOPT_NUM_THREADS from the environment when it is an integer from 1 to 1024,
 * else (unset, or any other value, which is ignored) the number of hardware threads, at most
 * 1024. */
FUSEDOPT_API int32_t fusedopt_num_threads(void);
/* 1 <= n <= 1024, else FUSEDOPT_STATUS_VALUE_ERROR and the count is unchanged; takes effect at
 * the next step. A process forked while another thread is in a step gets a thread pool of its
 * own: fork() waits for that step to finish. */
FUSEDOPT_API fusedopt_status fusedopt_set_num_threads(int32_t n);

/* ---- CUDA device pointers --------------------------------------------------------------------
 * Reserved: the device entry points (fusedopt_cuda_*_step, taking the same options and tensor
 * structs with device addresses, plus a cudaStream_t) belong here, declared only in builds with
 * FUSEDOPT_CUDA. This build provides the CPU steps only. */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FUSEDOPT_FUSEDOPT_H */
