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
 * The math is docs/spec.md's, identical to fusedopt's Python package: FUSEDOPT_CONVENTION_TORCH
 * follows torch.optim, FUSEDOPT_CONVENTION_KERAS follows Keras 3. Options are opaque objects
 * whose hyperparameters are set by name, so a new algorithm needs no new function or struct.
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

/* 16-bit buffers hold bfloat16 or IEEE float16 bits; their math is float32, rounded to nearest
 * (ties to even) when written back unless stochastic rounding is asked for (fusedopt_precision). */
typedef enum fusedopt_dtype {
  FUSEDOPT_FLOAT32 = 0,
  FUSEDOPT_FLOAT64 = 1,
  FUSEDOPT_BFLOAT16 = 2,
  FUSEDOPT_FLOAT16 = 3,
  /* For states only (fusedopt_tensor_precision.state_dtype; a param's is refused): bitsandbytes'
   * blockwise 8-bit state, one uint8 code of its dynamic map per element (the signed map, or the
   * unsigned one for a non-negative state such as a second moment) and one float32 absmax per 256
   * elements. */
  FUSEDOPT_INT8_BLOCKWISE = 4
} fusedopt_dtype;

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

/* ---- Algorithms and their options ------------------------------------------------------------
 * Every algorithm is reached by its name ("sgd", "adagrad", "rmsprop", "adam", ...; the list is
 * fusedopt_algorithm_name(0 .. fusedopt_algorithm_count() - 1)) and its hyperparameters are set
 * by name on an options object, which starts at torch.optim's defaults. Flags (amsgrad, maximize,
 * nesterov, ...) are 0 or 1; "convention" is FUSEDOPT_CONVENTION_TORCH or _KERAS. The names are
 * the fields of the algorithm's description in csrc/math/<name>.h, listed by
 * fusedopt_option_name. */

#define FUSEDOPT_MAX_STATES 3
#define FUSEDOPT_MAX_SCALARS 2

typedef struct fusedopt_options fusedopt_options;

FUSEDOPT_API int32_t fusedopt_algorithm_count(void);
/* NULL past the last algorithm. Static storage. */
FUSEDOPT_API const char* fusedopt_algorithm_name(int32_t index);

/* A new options object for `algorithm` with its defaults; release it with
 * fusedopt_options_destroy. */
FUSEDOPT_API fusedopt_status fusedopt_options_create(const char* algorithm,
                                                     fusedopt_options** options);
/* A new options object with the algorithm and every value of `options` (fusedopt's own options,
 * such as float32_scalars, included); release it with fusedopt_options_destroy. */
FUSEDOPT_API fusedopt_status fusedopt_options_copy(const fusedopt_options* options,
                                                   fusedopt_options** copy);
FUSEDOPT_API void fusedopt_options_destroy(fusedopt_options* options);
/* The algorithm an options object is for. Static storage. */
FUSEDOPT_API const char* fusedopt_options_algorithm(const fusedopt_options* options);
/* A value error for an unknown name, a flag other than exactly 0 or 1, or a convention that is
 * neither; any other value is checked when a step (or a plan) takes it. */
FUSEDOPT_API fusedopt_status fusedopt_options_set(fusedopt_options* options, const char* name,
                                                  double value);
FUSEDOPT_API fusedopt_status fusedopt_options_get(const fusedopt_options* options, const char* name,
                                                  double* value);
/* The name of the index-th hyperparameter, or NULL past the last. Static storage. */
FUSEDOPT_API const char* fusedopt_option_name(const fusedopt_options* options, int32_t index);
/* A value error naming the first invalid hyperparameter. */
FUSEDOPT_API fusedopt_status fusedopt_options_check(const fusedopt_options* options);

/* The algorithm's per-element state buffers, in the order of fusedopt_tensor.state; NULL past the
 * last. Static storage. */
FUSEDOPT_API const char* fusedopt_state_name(const fusedopt_options* options, int32_t index);
/* Bit k set: these options read and write state k (its buffer must be given). */
FUSEDOPT_API uint32_t fusedopt_states_used(const fusedopt_options* options);
/* The value a new buffer of state k starts at (Adagrad: initial_accumulator_value; Rprop's
 * step_size: lr). NaN when k is not a state of the algorithm or options is NULL. */
FUSEDOPT_API double fusedopt_initial_state(const fusedopt_options* options, int32_t k);
/* The algorithm's per-tensor scalars (fusedopt_tensor.scalars[k]: NAdam's mu_product, ASGD's eta
 * and mu), NULL past the last (an algorithm without scalars has none: NULL at 0), and the value
 * scalar k of a new tensor starts at: NaN when k is not a scalar of the algorithm or options is
 * NULL. */
FUSEDOPT_API const char* fusedopt_scalar_name(const fusedopt_options* options, int32_t index);
FUSEDOPT_API double fusedopt_initial_scalar(const fusedopt_options* options, int32_t k);
/* 1 when a step of this algorithm may be given a grad_scale (SGD, Adam: as torch's fused
 * optimizers), 0 otherwise (a step given one is refused) or when options is NULL. */
FUSEDOPT_API int32_t fusedopt_takes_grad_scale(const fusedopt_options* options);

/* ---- Tensors: the buffers of one parameter and where it stands ---------------------------- */

/* grad is read, and written only when a step is given a grad_scale (the unscaled gradient is
 * stored back, as PyTorch's fused optimizers do). state[k] may be NULL exactly when this tensor's
 * options keep no state k; an empty tensor (size 0) may have NULL buffers. */
typedef struct fusedopt_tensor {
  void* param;
  void* grad;
  void* state[FUSEDOPT_MAX_STATES];
  /* The algorithm's per-tensor scalars: an array of FUSEDOPT_MAX_SCALARS doubles (those past
   * the algorithm's count are left as they are), read and updated in place by each step; an
   * algorithm without any never reads or writes the pointer (NULL, or anything). A new tensor's
   * start at fusedopt_initial_scalar. Keras keeps NAdam's u_product once for the whole optimizer:
   * give every tensor of a step the same value (tensors at the same step with the same options all
   * come out with the same new one), or the same array. An array may be shared whole by several
   * tensors, but may not overlap another tensor's in part, nor any buffer of the call. */
  double* scalars;
  int64_t size;
  /* The tensor's step number t for this step: 1 on its first step. */
  int64_t step;
  int32_t dtype; /* fusedopt_dtype, the same for every buffer of the tensor */
  int32_t group; /* index into the options array of the call */
  /* Nonzero: the state buffers were created for this step. PyTorch's SGD copies the gradient
   * into a new momentum buffer instead of accumulating. */
  int32_t new_state;
} fusedopt_tensor;

/* ---- Low precision (docs/spec.md section 22): the options every front end names alike ------ */

/* How one tensor's states are stored, and its master copy (Python's state_dtype and
 * master_weights). A zeroed struct means float32 states and no master. */
typedef struct fusedopt_tensor_precision {
  /* The fusedopt_dtype of every state buffer of the tensor: the tensor's own dtype (what the
   * steps without precision use), or FUSEDOPT_FLOAT32, FUSEDOPT_BFLOAT16 or
   * FUSEDOPT_INT8_BLOCKWISE for a float32, bfloat16 or float16 tensor. */
  int32_t state_dtype;
  /* NULL, or a float32 copy of a bfloat16 or float16 param (size elements): the step updates it
   * and writes the param as its rounding. */
  float* master;
  /* For FUSEDOPT_INT8_BLOCKWISE states: state k's absmax, (size + 255) / 256 floats; NULL for an
   * unused state, for other state dtypes and for an empty tensor (size 0). */
  float* absmax[FUSEDOPT_MAX_STATES];
} fusedopt_tensor_precision;

/* How 16-bit params and states are written (Python's stochastic_rounding and seed). */
typedef struct fusedopt_precision {
  /* Nonzero: rounded stochastically, from random bits keyed by (seed, the tensor's step, the
   * element's index): the same bits for any thread count or ISA. Zero: to nearest, ties to even.
   * Nonzero where no param and no state of the call is bfloat16 or float16 is a value error
   * (nothing would be rounded). */
  int32_t stochastic_rounding;
  uint64_t seed;
} fusedopt_precision;

/* ---- Steps on the CPU: every tensor of the call in one pass over a shared thread pool ------ */

/* One step of every tensor; groups[g] are the options of group g, all for one algorithm.
 * grad_scale: NULL for none; otherwise the gradient is divided by *grad_scale (and written back),
 * as torch's fused SGD/Adam do under a GradScaler. */
FUSEDOPT_API fusedopt_status fusedopt_step(const fusedopt_options* const* groups,
                                           int64_t num_groups, const fusedopt_tensor* tensors,
                                           int64_t num_tensors, const double* grad_scale);

/* fusedopt_step with storage: tensor_precision[i] for tensors[i] (NULL: every tensor's states in
 * its own dtype, no master), and precision (NULL: rounding to nearest). */
FUSEDOPT_API fusedopt_status fusedopt_step_with_precision(
    const fusedopt_options* const* groups, int64_t num_groups, const fusedopt_tensor* tensors,
    const fusedopt_tensor_precision* tensor_precision, int64_t num_tensors,
    const double* grad_scale, const fusedopt_precision* precision);

/* A plan: the params and states of an optimizer, described and validated once, so that each step
 * checks only its grads (the many-small-tensors case costs its bytes, not its tensor count). The
 * plan copies the options, the tensors' descriptions and their step numbers (tensors[i].step: t
 * of the plan's first step) and advances the step numbers itself; tensors[i].grad is ignored.
 * Every state buffer given is registered, one the options do not use yet included (options set
 * later may use it). The caller keeps every param, state and scalar buffer alive and in place
 * until fusedopt_plan_destroy. Scalars stay the caller's: each step reads tensors[i].scalars as
 * they are then (a value the caller set between steps, such as Keras' optimizer-wide u_product
 * shared by several plans, is the one used) and writes the advanced values back, as
 * fusedopt_step does; a refused step writes nothing. Steps on one plan are serialized by its
 * lock (the scalars' reads and writes included); different plans run in parallel. */
typedef struct fusedopt_plan fusedopt_plan;

FUSEDOPT_API fusedopt_status fusedopt_plan_create(const fusedopt_options* const* groups,
                                                  int64_t num_groups,
                                                  const fusedopt_tensor* tensors,
                                                  int64_t num_tensors, fusedopt_plan** plan);
/* A plan with storage, as fusedopt_step_with_precision takes it: the masters and absmax arrays
 * are registered with the params and states. */
FUSEDOPT_API fusedopt_status fusedopt_plan_create_with_precision(
    const fusedopt_options* const* groups, int64_t num_groups, const fusedopt_tensor* tensors,
    const fusedopt_tensor_precision* tensor_precision, int64_t num_tensors,
    const fusedopt_precision* precision, fusedopt_plan** plan);
/* grads[i] for tensor i, with the dtype and size tensor i was registered with (unchecked: a
 * plan's grads are addresses); none may overlap a registered buffer. A refused step is not
 * counted. */
FUSEDOPT_API fusedopt_status fusedopt_plan_step(fusedopt_plan* plan, void* const* grads,
                                                const double* grad_scale);
/* New hyperparameters for one group (e.g. a learning-rate schedule); refused, and nothing
 * changed, when they are invalid or need a state the group's tensors were registered without. */
FUSEDOPT_API fusedopt_status fusedopt_plan_set_options(fusedopt_plan* plan, int64_t group,
                                                       const fusedopt_options* options);
/* steps[i]: the step number t that tensor i's next step will have; FUSEDOPT_STATUS_VALUE_ERROR,
 * and nothing written, once a tensor has taken step 2**63 - 1 (it has no next). */
FUSEDOPT_API fusedopt_status fusedopt_plan_steps(fusedopt_plan* plan, int64_t* steps);
/* Frees the plan. Not serialized by its lock: no other call on the plan may run or follow. */
FUSEDOPT_API void fusedopt_plan_destroy(fusedopt_plan* plan);

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
 * of each may not meet (so interleaved x and out are refused too), and no two series may share
 * memory (series one after another, or side by side, as in a 2-D array of either order; a
 * time_stride of 0 writes each series' last value to its one element), else
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
 * else (unset, or any other value, which is ignored) the number of CPUs the process may use (its
 * affinity mask, and at most its cgroup CPU quota rounded up), at most 1024. */
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
