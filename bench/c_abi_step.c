/* The C ABI's plan step timed in C: fp32 Adam over COUNT tensors of SIZE elements, registered
 * once with fusedopt_plan_create, then stepped with fusedopt_plan_step in a loop.
 *
 *     c_abi_step COUNT SIZE THREADS
 *
 * then reads batch sizes from standard input, one a line: for each it runs that many steps and
 * prints the nanoseconds per step (CLOCK_MONOTONIC around the whole batch), so the Python suite
 * can interleave its batches with its other candidates. The grads come from one of four sets of
 * arrays in turn, as a training loop hands over new grad arrays every step (none is written).
 * bench/native.py compiles it against the installed package. */
#define _POSIX_C_SOURCE 199309L

#include <fusedopt/fusedopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define GRAD_SETS 4

static void check(fusedopt_status status, const char* what) {
  if (status != FUSEDOPT_STATUS_OK) {
    fprintf(stderr, "c_abi_step: %s failed: %s\n", what, fusedopt_last_error());
    exit(1);
  }
}

static float* filled(int64_t n, float scale, uint32_t* seed) {
  float* x = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
  if (!x) {
    fprintf(stderr, "c_abi_step: out of memory\n");
    exit(1);
  }
  for (int64_t i = 0; i < n; ++i) {
    *seed = *seed * 1664525u + 1013904223u;
    x[i] = scale * ((float)(*seed >> 8) / 16777216.0f - 0.5f);
  }
  return x;
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: c_abi_step COUNT SIZE THREADS (batch sizes on stdin)\n");
    return 2;
  }
  const int64_t count = atoll(argv[1]), size = atoll(argv[2]);
  const int32_t threads = atoi(argv[3]);
  if (count < 1 || size < 0 || threads < 1) {
    fprintf(stderr, "c_abi_step: COUNT >= 1, SIZE >= 0, THREADS >= 1\n");
    return 2;
  }
  check(fusedopt_set_num_threads(threads), "fusedopt_set_num_threads");
  fusedopt_options* adam = NULL;
  check(fusedopt_options_create("adam", &adam), "fusedopt_options_create");
  check(fusedopt_options_set(adam, "lr", 1e-3), "fusedopt_options_set");

  uint32_t seed = 1;
  const int64_t total = count * size;
  float* params = filled(total, 2.0f, &seed);
  float* exp_avgs = filled(total, 0.0f, &seed);
  float* exp_avg_sqs = filled(total, 0.0f, &seed);
  fusedopt_tensor* tensors = calloc((size_t)count, sizeof(fusedopt_tensor));
  void** grads[GRAD_SETS];
  for (int s = 0; s < GRAD_SETS; ++s) {
    float* g = filled(total, 0.02f, &seed);
    grads[s] = malloc(sizeof(void*) * (size_t)count);
    if (!grads[s] || !tensors) return 1;
    for (int64_t i = 0; i < count; ++i) grads[s][i] = g + i * size;
  }
  for (int64_t i = 0; i < count; ++i) {
    tensors[i].param = params + i * size;
    tensors[i].state[0] = exp_avgs + i * size;
    tensors[i].state[1] = exp_avg_sqs + i * size;
    tensors[i].size = size;
    tensors[i].step = 1;
    tensors[i].dtype = FUSEDOPT_FLOAT32;
  }
  const fusedopt_options* groups[1] = {adam};
  fusedopt_plan* plan = NULL;
  check(fusedopt_plan_create(groups, 1, tensors, count, &plan), "fusedopt_plan_create");

  long long batch = 0;
  uint64_t k = 0;
  while (scanf("%lld", &batch) == 1 && batch > 0) {
    const double start = now_ns();
    for (long long b = 0; b < batch; ++b, ++k)
      check(fusedopt_plan_step(plan, grads[k % GRAD_SETS], NULL), "fusedopt_plan_step");
    printf("%.3f\n", (now_ns() - start) / (double)batch);
    fflush(stdout);
  }
  fusedopt_plan_destroy(plan);
  fusedopt_options_destroy(adam);
  return 0;
}
