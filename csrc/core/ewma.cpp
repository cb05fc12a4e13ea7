#include "core/ewma.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "cpu/parallel.h"
#include "math/ewma.h"

namespace fusedopt {
namespace {

using math::EwmaCoefficients;
using math::EwmaState;

struct EwmaWork {
  const double* x;
  double* out;
  int64_t length, num_series, time_stride, series_stride, series_per_item;
  EwmaCoefficients c;
};

// Series [first, last): when series are adjacent in memory (time_stride > series_stride) the
// loop walks time outermost so every row is read once, contiguously; otherwise series by series.
void ewma_block(const EwmaWork& w, int64_t first, int64_t last) {
  if (w.length == 0) return;
  const auto at = [&](int64_t s, int64_t t) { return s * w.series_stride + t * w.time_stride; };
  if (w.time_stride > w.series_stride) {
    std::vector<EwmaState> states(last - first);
    for (int64_t s = first; s < last; ++s)
      w.out[at(s, 0)] = math::ewma_first(w.c, states[s - first], w.x[at(s, 0)]);
    for (int64_t t = 1; t < w.length; ++t)
      for (int64_t s = first; s < last; ++s)
        w.out[at(s, t)] = math::ewma_next(w.c, states[s - first], w.x[at(s, t)]);
    return;
  }
  for (int64_t s = first; s < last; ++s) {
    EwmaState state;
    w.out[at(s, 0)] = math::ewma_first(w.c, state, w.x[at(s, 0)]);
    for (int64_t t = 1; t < w.length; ++t)
      w.out[at(s, t)] = math::ewma_next(w.c, state, w.x[at(s, t)]);
  }
}

void ewma_item(void* context, int64_t item) {
  const EwmaWork& w = *static_cast<const EwmaWork*>(context);
  const int64_t first = item * w.series_per_item;
  ewma_block(w, first, std::min(first + w.series_per_item, w.num_series));
}

}  // namespace

void ewma(const double* x, double* out, int64_t length, int64_t num_series, int64_t time_stride,
          int64_t series_stride, double com, bool adjust, bool ignore_na, int64_t min_periods) {
  if (!(com >= 0)) throw Error(ErrorKind::value, "com must satisfy: com >= 0");
  EwmaWork w{x, out, length, num_series, time_stride, series_stride, 0,
             math::ewma_coefficients(com, adjust, ignore_na, min_periods)};
  // Enough series per item to keep each item's rows a few cache lines wide, and enough items to
  // share among the threads.
  const int64_t threads = cpu::num_threads();
  w.series_per_item = std::max<int64_t>(64, (num_series + 4 * threads - 1) / (4 * threads));
  if (length * num_series < (1 << 16)) w.series_per_item = std::max<int64_t>(num_series, 1);
  const int64_t items = (num_series + w.series_per_item - 1) / w.series_per_item;
  cpu::parallel_for(items, ewma_item, &w);
}

}  // namespace fusedopt
