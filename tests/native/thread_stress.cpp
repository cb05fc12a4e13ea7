// Stress test of the thread pool through libfusedopt's C ABI, for ThreadSanitizer: .ci/sanitizers
// builds it with -fsanitize=thread against a -fsanitize=thread libfusedopt and fails on any
// report (or a nonzero exit). Python under TSan is not practical (CPython and NumPy are not
// instrumented, so TSan would see only half of every synchronisation and flood false reports);
// the Python tests of the same behaviour are in tests/test_threads.py.
//
// While several threads step tensors of their own (one at a time holds the shared pool, the
// others run on their own thread), another thread resizes the pool and switches the ISA, and
// another forks; each child steps with a pool of its own and checks its result. Every result must
// equal the same steps done beforehand on one thread: the math is element-wise, so neither the
// thread count nor the ISA may change a bit.
#include <fusedopt/fusedopt.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

// Above the 65536 elements under which a step runs on the calling thread, so steps use the pool.
constexpr int64_t kSize = 1 << 17;
constexpr int kSteps = 30;
constexpr int kAdamSteppers = 2;
constexpr int kForks = 4;
constexpr int kSeries = 64, kLength = 2048;  // EWMA: 131072 elements, series side by side

std::atomic<bool> failed{false};

void fail(const std::string& what) {
  std::fprintf(stderr, "thread_stress: %s\n", what.c_str());
  failed = true;
}

void check(fusedopt_status status, const char* call) {
  if (status != FUSEDOPT_STATUS_OK) fail(std::string(call) + ": " + fusedopt_last_error());
}

struct Adam {
  std::vector<float> param, grad, exp_avg, exp_avg_sq;
  int64_t steps = 0;

  explicit Adam(int seed)
      : param(kSize), grad(kSize), exp_avg(kSize, 0.0f), exp_avg_sq(kSize, 0.0f) {
    for (int64_t i = 0; i < kSize; ++i) {
      param[i] = static_cast<float>((i * 7 + seed * 13) % 101) / 50.0f - 1.0f;
      grad[i] = static_cast<float>((i * 11 + seed * 5) % 97) / 48.0f - 1.0f;
    }
  }

  void step() {
    fusedopt_options* options = nullptr;
    check(fusedopt_options_create("adam", &options), "fusedopt_options_create");
    check(fusedopt_options_set(options, "lr", 1e-2), "fusedopt_options_set");
    check(fusedopt_options_set(options, "weight_decay", 0.1), "fusedopt_options_set");
    fusedopt_tensor t{};
    t.param = param.data();
    t.grad = grad.data();
    t.state[0] = exp_avg.data();
    t.state[1] = exp_avg_sq.data();
    t.size = kSize;
    t.step = ++steps;
    t.dtype = FUSEDOPT_FLOAT32;
    const fusedopt_options* groups[] = {options};
    const fusedopt_status status = fusedopt_step(groups, 1, &t, 1, nullptr);
    fusedopt_options_destroy(options);
    check(status, "fusedopt_step");
  }

  bool operator==(const Adam& o) const {
    return param == o.param && exp_avg == o.exp_avg && exp_avg_sq == o.exp_avg_sq;
  }
};

Adam adam_after(int seed, int steps) {
  Adam a(seed);
  for (int i = 0; i < steps; ++i) a.step();
  return a;
}

std::vector<double> ewma_input() {
  std::vector<double> x(static_cast<size_t>(kSeries) * kLength);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<double>((i * 31) % 1009) / 100.0;
  return x;
}

std::vector<double> ewma_of(const std::vector<double>& x) {
  std::vector<double> out(x.size());
  fusedopt_ewma_options options = fusedopt_ewma_default_options();
  options.com = 3.0;
  // Row-major (time, series): series side by side, the layout whose items are cache lines.
  check(fusedopt_ewma(x.data(), out.data(), kLength, kSeries, kSeries, 1, &options),
        "fusedopt_ewma");
  return out;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> isas;
  std::string all = fusedopt_available_isas();
  for (size_t start = 0; start <= all.size();) {
    const size_t comma = std::min(all.find(',', start), all.size());
    if (comma > start) isas.push_back(all.substr(start, comma - start));
    start = comma + 1;
  }
  return isas;
}

// Forks while the other threads step; the child steps with its own pool and reports by its
// exit status. A child that does not finish in time (a pool mutex inherited locked, a worker
// waited for that does not exist) is killed and counts as a failure.
void fork_and_check(const Adam& expected) {
  const pid_t pid = fork();
  if (pid < 0) return fail("fork failed");
  if (pid == 0) {
    // Two threads whatever the resizer last set, so the child's step starts workers.
    if (fusedopt_set_num_threads(2) != FUSEDOPT_STATUS_OK) _exit(2);
    const Adam got = adam_after(99, 3);
    _exit(got == expected && !failed ? 0 : 1);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return fail("a forked child did not finish its step in 120 s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    fail("a forked child's step failed (status " + std::to_string(status) + ")");
}

}  // namespace

int main() {
  const int initial_threads = fusedopt_num_threads();
  // Every result, computed first on one thread.
  check(fusedopt_set_num_threads(1), "fusedopt_set_num_threads");
  std::vector<Adam> expected;
  for (int s = 0; s < kAdamSteppers; ++s) expected.push_back(adam_after(s, kSteps));
  const Adam expected_in_child = adam_after(99, 3);
  const std::vector<double> x = ewma_input();
  const std::vector<double> expected_ewma = ewma_of(x);
  check(fusedopt_set_num_threads(4), "fusedopt_set_num_threads");

  // The steppers repeat their runs until the forks are done, so every fork meets steps in flight.
  std::atomic<int> started{0};
  std::atomic<bool> forks_done{false}, stop{false};
  std::vector<std::thread> threads;
  for (int s = 0; s < kAdamSteppers; ++s)
    threads.emplace_back([&, s] {
      ++started;
      do {
        if (!(adam_after(s, kSteps) == expected[s]))
          fail("stepper " + std::to_string(s) + ": result differs");
      } while (!forks_done);
    });
  threads.emplace_back([&] {
    ++started;
    do {
      if (ewma_of(x) != expected_ewma) fail("ewma: result differs");
    } while (!forks_done);
  });
  // Resizes the pool (and is refused counts out of range) and switches the ISA while steps run.
  threads.emplace_back([&] {
    const std::vector<std::string> isas = available_isas();
    for (int i = 0; !stop; ++i) {
      check(fusedopt_set_num_threads(1 + i % 4), "fusedopt_set_num_threads");
      if (fusedopt_set_num_threads(0) != FUSEDOPT_STATUS_VALUE_ERROR ||
          fusedopt_set_num_threads(1025) != FUSEDOPT_STATUS_VALUE_ERROR)
        fail("fusedopt_set_num_threads accepted a count out of [1, 1024]");
      check(fusedopt_set_cpu_isa(isas[i % isas.size()].c_str()), "fusedopt_set_cpu_isa");
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  while (started < kAdamSteppers + 1) std::this_thread::yield();
  for (int i = 0; i < kForks; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    fork_and_check(expected_in_child);
  }
  forks_done = true;
  for (int i = 0; i < kAdamSteppers + 1; ++i) threads[i].join();
  stop = true;
  threads.back().join();
  check(fusedopt_set_num_threads(initial_threads), "fusedopt_set_num_threads");

  if (failed) return 1;
  std::printf("thread_stress: ok (%d steppers, ewma, resizes, forks)\n", kAdamSteppers);
  return 0;
}
