// Exercises fusedopt.hpp, the C++ layer over the C ABI: Options (value semantics, names,
// errors), tensor(), step() and Plan. tests/test_cpp_layer.py builds it as C++17 and as C++20
// (std::span) against the installed package and runs it; it prints "ok" when every check held.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fusedopt/fusedopt.hpp>
#include <string>
#include <utility>
#include <vector>

namespace {

int failures = 0;

#define CHECK(condition)                                                        \
  do {                                                                          \
    if (!(condition)) {                                                         \
      std::printf("%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #condition); \
      ++failures;                                                               \
    }                                                                           \
  } while (0)

// body() throws fusedopt::Error with this status and a message containing `needle`.
void expect_error(const std::function<void()>& body, fusedopt_status status, const char* needle,
                  int line) {
  try {
    body();
    std::printf("line %d: no fusedopt::Error thrown\n", line);
    ++failures;
  } catch (const fusedopt::Error& e) {
    if (e.status() != status || !std::strstr(e.what(), needle)) {
      std::printf("line %d: status %d, message '%s'; expected %d and '%s'\n", line, e.status(),
                  e.what(), status, needle);
      ++failures;
    }
  }
}
#define EXPECT_ERROR(body, status, needle) expect_error([&] { body; }, status, needle, __LINE__)

std::vector<double> ramp(int n, double scale) {
  std::vector<double> v(n);
  for (int i = 0; i < n; ++i) v[i] = scale * std::sin(1.0 + i);
  return v;
}

void options() {
  const std::vector<std::string> algorithms = fusedopt::algorithms();
  for (const char* name : {"sgd", "adagrad", "rmsprop", "adam"}) {
    bool found = false;
    for (const std::string& a : algorithms) found = found || a == name;
    CHECK(found);
  }

  fusedopt::Options adam("adam");
  CHECK(adam.algorithm() == "adam");
  CHECK(adam.get("lr") == 1e-3 && adam.get("beta2") == 0.999 && adam.get("amsgrad") == 0);
  CHECK(&adam.set("lr", 0.01).set("amsgrad", 1) == &adam);  // chains on the same object
  CHECK(adam.get("lr") == 0.01 && adam.get("amsgrad") == 1);
  const std::vector<std::string> states = adam.state_names();
  CHECK((states == std::vector<std::string>{"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}));
  CHECK(adam.uses_state(0) && adam.uses_state(1) && adam.uses_state(2));
  CHECK(!fusedopt::Options("adam").uses_state(2));
  CHECK(adam.scalar_names().empty());

  // A copy holds every option and is independent of its source.
  adam.set("convention", FUSEDOPT_CONVENTION_KERAS).set("weight_decay", 0.25);
  fusedopt::Options copy = adam;
  CHECK(copy.handle() != adam.handle());
  CHECK(copy.option_names() == adam.option_names() && !copy.option_names().empty());
  for (const std::string& name : adam.option_names()) CHECK(copy.get(name) == adam.get(name));
  copy.set("lr", 0.5);
  CHECK(adam.get("lr") == 0.01);
  fusedopt::Options assigned("sgd");
  assigned = copy;
  CHECK(assigned.algorithm() == "adam" && assigned.get("lr") == 0.5);
  fusedopt::Options moved = std::move(assigned);
  CHECK(moved.get("convention") == static_cast<double>(FUSEDOPT_CONVENTION_KERAS));
  const fusedopt::Options chained = fusedopt::Options("adagrad").set("lr", 0.2);
  CHECK(chained.get("lr") == 0.2);
  CHECK(fusedopt::Options("adagrad").set("initial_accumulator_value", 0.1).initial_state(0) == 0.1);
  CHECK(fusedopt::Options("rprop").set("lr", 0.25).initial_state(1) == 0.25);
  CHECK(std::isnan(adam.initial_state(3)) && std::isnan(adam.initial_state(-1)));
  CHECK(std::isnan(adam.initial_scalar(0)));
  CHECK(adam.takes_grad_scale() && !fusedopt::Options("nadam").takes_grad_scale());

  // fusedopt's own options are copied too (NAdam's float32_scalars).
  const fusedopt::Options nadam = fusedopt::Options("nadam").set("float32_scalars", 0);
  const fusedopt::Options nadam_copy = nadam;
  CHECK(nadam_copy.get("float32_scalars") == 0 && nadam_copy.get("momentum_decay") == 4e-3);
  CHECK((nadam_copy.scalar_names() == std::vector<std::string>{"mu_product"}));
  CHECK(nadam_copy.initial_scalar(0) == 1 && std::isnan(nadam_copy.initial_scalar(1)));
  fusedopt::Options moved_from = fusedopt::Options("sgd");
  const fusedopt::Options taken = std::move(moved_from);
  CHECK(taken.algorithm() == "sgd");
  EXPECT_ERROR(fusedopt::Options{moved_from}, FUSEDOPT_STATUS_TYPE_ERROR, "options is NULL");

  EXPECT_ERROR(fusedopt::Options("adamm"), FUSEDOPT_STATUS_VALUE_ERROR, "adamm");
  EXPECT_ERROR(adam.set("betas", 0.5), FUSEDOPT_STATUS_VALUE_ERROR, "betas");
  EXPECT_ERROR(adam.get("momentum"), FUSEDOPT_STATUS_VALUE_ERROR, "momentum");
  EXPECT_ERROR(adam.set("convention", 7), FUSEDOPT_STATUS_VALUE_ERROR, "convention");
  adam.set("beta1", 1.5);
  EXPECT_ERROR(adam.check(), FUSEDOPT_STATUS_VALUE_ERROR, "beta1");
}

void tensors() {
  std::vector<float> p(5), g(5), m(5), wrong(4);
  const fusedopt_tensor t = fusedopt::tensor(p, g, {m, {}}, 3, 1);
  CHECK(t.param == p.data() && t.grad == g.data() && t.state[0] == m.data());
  CHECK(!t.state[1] && !t.state[2] && !t.scalars && t.new_state == 0);
  CHECK(t.size == 5 && t.step == 3 && t.group == 1 && t.dtype == FUSEDOPT_FLOAT32);
  std::vector<double> pd(2);
  CHECK(fusedopt::tensor(pd, {}).dtype == FUSEDOPT_FLOAT64 &&
        fusedopt::tensor(pd, {}).grad == nullptr);
  EXPECT_ERROR(fusedopt::tensor(p, wrong), FUSEDOPT_STATUS_VALUE_ERROR, "grad has 4 elements");
  EXPECT_ERROR(fusedopt::tensor(p, g, {m, wrong}), FUSEDOPT_STATUS_VALUE_ERROR, "state[1]");
  EXPECT_ERROR(fusedopt::tensor(p, g, {m, m, m, m}), FUSEDOPT_STATUS_VALUE_ERROR, "at most");
}

// Two groups (torch Adam and AMSGrad with another lr) and a grad scale: step() with every buffer
// and a Plan with grads only give the same bits, step after step.
void steps_and_plans() {
  const int n = 37, steps = 4;
  std::vector<fusedopt::Options> groups;
  groups.push_back(fusedopt::Options("adam").set("lr", 0.01).set("weight_decay", 0.1));
  groups.push_back(fusedopt::Options(groups[0]).set("amsgrad", 1).set("lr", 0.02));
  struct Buffers {
    std::vector<double> param, exp_avg, exp_avg_sq, max_exp_avg_sq;
  };
  auto fresh = [&](int i) {
    return Buffers{ramp(n + i, 1.0 + i), std::vector<double>(n + i), std::vector<double>(n + i),
                   std::vector<double>(n + i)};
  };
  Buffers direct[2] = {fresh(0), fresh(1)}, planned[2] = {fresh(0), fresh(1)};
  auto tensor = [](Buffers& b, int64_t step, int32_t group) {
    return fusedopt::tensor(b.param, {}, {b.exp_avg, b.exp_avg_sq, b.max_exp_avg_sq}, step, group);
  };
  fusedopt::Plan plan(
      groups, std::vector<fusedopt_tensor>{tensor(planned[0], 1, 0), tensor(planned[1], 1, 1)});
  CHECK(plan.size() == 2 && (plan.steps() == std::vector<int64_t>{1, 1}));
  for (int step = 1; step <= steps; ++step) {
    std::vector<double> g0 = ramp(n, 4.0 * step), g1 = ramp(n + 1, -2.0 * step);
    std::vector<double> h0 = g0, h1 = g1;  // grad_scale writes the grads back unscaled
    std::vector<fusedopt_tensor> call = {tensor(direct[0], step, 0), tensor(direct[1], step, 1)};
    call[0].grad = g0.data();
    call[1].grad = g1.data();
    fusedopt::step(groups, call, 2.0);
    plan.step({h0, h1}, 2.0);
    CHECK(g0 == h0 && g1 == h1 && g0 != ramp(n, 4.0 * step));
  }
  for (int i = 0; i < 2; ++i) {
    CHECK(direct[i].param == planned[i].param && direct[i].exp_avg == planned[i].exp_avg);
    CHECK(direct[i].max_exp_avg_sq == planned[i].max_exp_avg_sq);
  }
  CHECK(direct[0].max_exp_avg_sq == std::vector<double>(n));  // group 0 keeps none
  CHECK((plan.steps() == std::vector<int64_t>{steps + 1, steps + 1}));

  // A moved plan keeps stepping; set_options changes a group's lr (lr 0: nothing moves).
  fusedopt::Plan moved = std::move(plan);
  moved.set_options(0, fusedopt::Options("adam").set("lr", 0).set("weight_decay", 0));
  const std::vector<double> before = planned[0].param;
  std::vector<double> g0 = ramp(n, 1.0), g1 = ramp(n + 1, 1.0);
  void* grads[] = {g0.data(), g1.data()};
  moved.step(grads);
  CHECK(planned[0].param == before && planned[1].param != direct[1].param);

  std::vector<float> wrong_dtype(n);
  std::vector<double> short_grad(n - 1);
  EXPECT_ERROR(moved.step({wrong_dtype, wrong_dtype}), FUSEDOPT_STATUS_TYPE_ERROR,
               "grads[0] is float32 but params[0] is float64");
  EXPECT_ERROR(moved.step({g0, short_grad}), FUSEDOPT_STATUS_VALUE_ERROR, "grads[1] has");
  EXPECT_ERROR(moved.step({g0}), FUSEDOPT_STATUS_VALUE_ERROR, "expected 2");
  EXPECT_ERROR(moved.step({planned[0].exp_avg, g1}), FUSEDOPT_STATUS_VALUE_ERROR, "overlaps");
  EXPECT_ERROR(moved.set_options(2, groups[0]), FUSEDOPT_STATUS_VALUE_ERROR, "out of range");
  EXPECT_ERROR(moved.set_options(0, fusedopt::Options("sgd")), FUSEDOPT_STATUS_VALUE_ERROR, "sgd");
  EXPECT_ERROR(fusedopt::step(fusedopt::Options("sgd"), tensor(direct[0], 1, 0)),
               FUSEDOPT_STATUS_TYPE_ERROR, "grad is NULL");
  CHECK((moved.steps() == std::vector<int64_t>{steps + 2, steps + 2}));

  // A state registered before the options use it: set_options may switch it on.
  std::vector<double> q(3, 1.0), m(3), v(3), v_max(3), h(3, 0.5);
  fusedopt::Plan later(fusedopt::Options("adam"), {fusedopt::tensor(q, {}, {m, v, v_max})});
  later.step({h});
  CHECK(v_max == std::vector<double>(3) && m != std::vector<double>(3));
  later.set_options(0, fusedopt::Options("adam").set("amsgrad", 1));
  later.step({h});
  CHECK(v_max == v && v_max != std::vector<double>(3));

  // A single tensor, one Options (SGD with momentum, a new momentum buffer on the first step).
  std::vector<float> p = {1, 2}, g = {0.5f, -1}, buffer(2);
  fusedopt_tensor single = fusedopt::tensor(p, g, {buffer});
  single.new_state = 1;
  fusedopt::step(fusedopt::Options("sgd").set("lr", 0.5).set("momentum", 0.9), single);
  CHECK(buffer == g && p[0] == 0.75f && p[1] == 2.5f);
}

// Per-tensor scalars (ASGD's eta and mu): step() and a Plan advance them alike, and a plan reads
// the caller's values at each step (here: eta halved between steps by the caller).
void scalars() {
  const int n = 11;
  const fusedopt::Options asgd =
      fusedopt::Options("asgd").set("lr", 0.05).set("t0", 1).set("lambd", 0.01);
  std::vector<double> direct = ramp(n, 1.0), direct_ax(n), planned = direct, planned_ax(n);
  double direct_scalars[FUSEDOPT_MAX_SCALARS] = {asgd.initial_scalar(0), asgd.initial_scalar(1)};
  double planned_scalars[FUSEDOPT_MAX_SCALARS] = {direct_scalars[0], direct_scalars[1]};
  CHECK(direct_scalars[0] == static_cast<float>(0.05) && direct_scalars[1] == 1);
  fusedopt_tensor registered = fusedopt::tensor(planned, {}, {planned_ax});
  registered.scalars = planned_scalars;
  fusedopt::Plan plan(asgd, {registered});
  for (int step = 1; step <= 4; ++step) {
    std::vector<double> g = ramp(n, 0.5 * step);
    fusedopt_tensor t = fusedopt::tensor(direct, g, {direct_ax}, step);
    t.scalars = direct_scalars;
    fusedopt::step(asgd, t);
    plan.step({g});
    CHECK(direct == planned && direct_ax == planned_ax);
    CHECK(direct_scalars[0] == planned_scalars[0] && direct_scalars[1] == planned_scalars[1]);
    direct_scalars[0] *= 0.5;
    planned_scalars[0] *= 0.5;
  }
  CHECK(direct_scalars[1] == static_cast<float>(1.0 / 3));  // 1 / (t - t0) after step 4, a float
  std::vector<double> g = ramp(n, 1.0);
  const fusedopt_tensor without = fusedopt::tensor(direct, g, {direct_ax}, 5);
  EXPECT_ERROR(fusedopt::step(asgd, without), FUSEDOPT_STATUS_TYPE_ERROR, "scalars is NULL");
}

void library() {
  const std::vector<std::string> isas = fusedopt::available_isas();
  CHECK(!isas.empty() && isas.front() == "scalar");
  const std::string isa = fusedopt::cpu_isa();
  fusedopt::set_cpu_isa("scalar");
  CHECK(fusedopt::cpu_isa() == "scalar");
  fusedopt::set_cpu_isa(isa);
  EXPECT_ERROR(fusedopt::set_cpu_isa("neon"), FUSEDOPT_STATUS_VALUE_ERROR, "neon");
  EXPECT_ERROR(fusedopt::set_num_threads(0), FUSEDOPT_STATUS_VALUE_ERROR, "n must be >= 1");
  CHECK(fusedopt::num_threads() >= 1);
  std::vector<double> x = {1, 2, 3}, out(3);
  fusedopt_ewma_options ewma = fusedopt_ewma_default_options();
  ewma.com = 1;
  fusedopt::ewma(x, out, ewma);
  CHECK(out[0] == 1 && std::fabs(out[1] - 5.0 / 3) < 1e-15);
}

}  // namespace

int main() {
  options();
  tensors();
  steps_and_plans();
  scalars();
  library();
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
