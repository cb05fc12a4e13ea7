#include "core/ewma.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

// kLanes adjacent series side by side. math::ewma_next on each lane: the same operations in the
// same order, every branch a lane-wise select, so each lane rounds exactly as the scalar code
// (and pandas) does. A 2-D block of series ran at a tenth of the machine's speed one series
// element at a time: the recurrence is serial in time but independent across series. Two lanes:
// the width of the baseline x86-64 registers this file is compiled for (wider vectors were
// split back into scalar code with branches).
constexpr int64_t kLanes = 2;
typedef double Lanes __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t LaneMask __attribute__((vector_size(kLanes * sizeof(int64_t))));

struct EwmaLanes {
  Lanes mean;
  Lanes old_weight;
  Lanes observations;  // a count, exact in a double up to 2^53
};

// Spelled with SSE2 intrinsics where there are some: GCC turns the plain and/andnot/or form
// back into a conditional move per lane, which made the loop slower than scalar code.
inline Lanes select(LaneMask mask, Lanes if_true, Lanes if_false) {
#if defined(__SSE2__)
  const __m128d m = (__m128d)mask;
  return (Lanes)_mm_or_pd(_mm_and_pd(m, (__m128d)if_true), _mm_andnot_pd(m, (__m128d)if_false));
#else
  return (Lanes)((mask & (LaneMask)if_true) | (~mask & (LaneMask)if_false));
#endif
}

inline Lanes load_lanes(const double* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void store_lanes(double* p, const Lanes& x) { std::memcpy(p, &x, sizeof x); }

// The coefficients as lanes, made once per block: the uniform branches of the scalar code
// become masks, so the loop over a row has none.
struct EwmaLaneCoefficients {
  explicit EwmaLaneCoefficients(const EwmaCoefficients& c)
      : old_weight_factor(Lanes{} + c.old_weight_factor),
        new_weight(Lanes{} + c.new_weight),
        one(Lanes{} + 1.0),
        not_a_number(Lanes{} + NAN),
        min_periods(Lanes{} + static_cast<double>(c.min_periods)),
        nan_decays(LaneMask{} - (c.ignore_na ? 0 : 1)),
        adjust(LaneMask{} - (c.adjust ? 1 : 0)) {}
  Lanes old_weight_factor, new_weight, one, not_a_number, min_periods;
  LaneMask nan_decays;  // all ones unless ignore_na: a NaN still decays the old weights
  LaneMask adjust;      // all ones when adjust
};

inline Lanes ewma_output_lanes(const EwmaLaneCoefficients& c, const EwmaLanes& s) {
  return select(s.observations >= c.min_periods, s.mean, c.not_a_number);
}

inline Lanes ewma_first_lanes(const EwmaLaneCoefficients& c, EwmaLanes& s, Lanes x) {
  s.mean = x;
  s.old_weight = c.one;
  s.observations = select(x == x, c.one, Lanes{});
  return ewma_output_lanes(c, s);
}

inline bool every_lane(LaneMask mask) {
#if defined(__SSE2__)
  return _mm_movemask_pd((__m128d)mask) == (1 << kLanes) - 1;
#else
  for (int64_t i = 0; i < kLanes; ++i)
    if (!mask[i]) return false;
  return true;
#endif
}

inline Lanes ewma_next_lanes(const EwmaLaneCoefficients& c, EwmaLanes& s, Lanes x) {
  const LaneMask observed = x == x;
  const LaneMask has_mean = s.mean == s.mean;
  if (every_lane(observed & has_mean)) {
    // The scalar code's usual path (a value, and a mean to blend it into) without the selects
    // for NaNs: a third of the instructions.
    s.observations += c.one;
    s.old_weight = s.old_weight * c.old_weight_factor;
    const Lanes blended =
        (s.old_weight * s.mean + c.new_weight * x) / (s.old_weight + c.new_weight);
    s.mean = select(s.mean != x, blended, s.mean);
    s.old_weight = select(c.adjust, s.old_weight + c.new_weight, c.one);
    return ewma_output_lanes(c, s);
  }
  s.observations += select(observed, c.one, Lanes{});
  s.old_weight = select(has_mean & (observed | c.nan_decays), s.old_weight * c.old_weight_factor,
                        s.old_weight);
  const LaneMask updates = has_mean & observed;
  const Lanes blended = (s.old_weight * s.mean + c.new_weight * x) / (s.old_weight + c.new_weight);
  s.mean = select(updates & (s.mean != x), blended, s.mean);
  s.old_weight =
      select(updates, select(c.adjust, s.old_weight + c.new_weight, c.one), s.old_weight);
  s.mean = select(~has_mean & observed, x, s.mean);
  return ewma_output_lanes(c, s);
}

// Series [first, last): when series are adjacent in memory (time_stride > series_stride) the
// loop walks time outermost so every row is read once, contiguously, kLanes series at a time
// where they are contiguous; otherwise series by series.
void ewma_block(const EwmaWork& w, int64_t first, int64_t last) {
  if (w.length == 0) return;
  const auto at = [&](int64_t s, int64_t t) { return s * w.series_stride + t * w.time_stride; };
  if (w.time_stride > w.series_stride) {
    const int64_t lanes_end =
        w.series_stride == 1 ? first + (last - first) / kLanes * kLanes : first;
    const EwmaLaneCoefficients c(w.c);
    std::vector<EwmaLanes> lanes((lanes_end - first) / kLanes);
    std::vector<EwmaState> states(last - lanes_end);
    for (int64_t s = first; s < lanes_end; s += kLanes)
      store_lanes(w.out + s, ewma_first_lanes(c, lanes[(s - first) / kLanes], load_lanes(w.x + s)));
    for (int64_t s = lanes_end; s < last; ++s)
      w.out[at(s, 0)] = math::ewma_first(w.c, states[s - lanes_end], w.x[at(s, 0)]);
    for (int64_t t = 1; t < w.length; ++t) {
      const double* row = w.x + t * w.time_stride;
      double* out_row = w.out + t * w.time_stride;
      for (int64_t s = first; s < lanes_end; s += kLanes)
        store_lanes(out_row + s,
                    ewma_next_lanes(c, lanes[(s - first) / kLanes], load_lanes(row + s)));
      for (int64_t s = lanes_end; s < last; ++s)
        w.out[at(s, t)] = math::ewma_next(w.c, states[s - lanes_end], w.x[at(s, t)]);
    }
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
  EwmaWork w{x,           out,
             length,      num_series,
             time_stride, series_stride,
             0,           math::ewma_coefficients(com, adjust, ignore_na, min_periods)};
  // Series side by side in memory: one item per thread, a whole number of cache lines wide.
  // Every item walks all rows, so narrower items cost more than they balance (100 series as
  // four items of 32 took twice as long as one of 100), and two threads never write the same
  // line. Series one after another: about four items per thread, enough series per item that the
  // shared counter is touched rarely.
  const int64_t threads = cpu::num_threads();
  constexpr int64_t kSeriesPerCacheLine = 64 / sizeof(double);
  const int64_t per_thread = (num_series + threads - 1) / threads;
  w.series_per_item =
      time_stride > series_stride
          ? (per_thread + kSeriesPerCacheLine - 1) / kSeriesPerCacheLine * kSeriesPerCacheLine
          : std::max<int64_t>(64, (num_series + 4 * threads - 1) / (4 * threads));
  if (length * num_series < (1 << 16)) w.series_per_item = std::max<int64_t>(num_series, 1);
  const int64_t items = (num_series + w.series_per_item - 1) / w.series_per_item;
  cpu::parallel_for(items, ewma_item, &w);
}

}  // namespace fusedopt
