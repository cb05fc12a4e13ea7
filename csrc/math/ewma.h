// pandas' exponentially weighted mean, ewm(...).mean() (docs/spec.md section 9), one step of many
// series at once: each lane of V is one series. pandas' branches (aggregations.pyx) become
// lane-wise selects, so every lane does the operations pandas does for that series, in the same
// order, and the results are bit-identical where pandas' algorithm is. (At com == 1 with
// adjust=False and a NaN this is the pandas 2 rule; pandas 3.0 special-cases it, see spec A.5.)
#pragma once

#include <cmath>
#include <cstdint>

#include "math/common.h"

namespace fusedopt {

// pandas' ewm(...).mean(), from the center of mass com, computed once on the host.
struct EwmaCoefficients {
  double old_weight_factor;  // 1 - alpha, alpha = 1 / (1 + com)
  double new_weight;         // 1 if adjust else alpha
  bool adjust;
  bool ignore_na;
  int64_t min_periods;  // already max(min_periods, 1)
};

}  // namespace fusedopt

FUSEDOPT_MATH_BEGIN

template <class V>
struct EwmaLanes {
  V mean;
  V old_weight;
  V observations;  // a count, exact in a double up to 2^53
};

template <class V>
FUSEDOPT_LANE_FN V ewma_output(const EwmaCoefficients& c, const EwmaLanes<V>& s) {
  return lane_select(s.observations >= splat<V>(static_cast<double>(c.min_periods)), s.mean,
                     splat<V>(NAN));
}

// pandas treats ±inf as missing, as NaN (its window code replaces them before the loop): x - x
// is 0 only for a finite x.
template <class V>
FUSEDOPT_LANE_FN auto ewma_observed(V x) {
  return (x - x) == (x - x);
}

template <class V>
FUSEDOPT_LANE_FN V ewma_first(const EwmaCoefficients& c, EwmaLanes<V>& s, V x) {
  const auto observed = ewma_observed(x);
  s.mean = lane_select(observed, x, splat<V>(NAN));
  s.old_weight = splat<V>(1.0);
  s.observations = lane_select(observed, splat<V>(1.0), splat<V>(0.0));
  return ewma_output(c, s);
}

template <class V>
FUSEDOPT_LANE_FN V ewma_next(const EwmaCoefficients& c, EwmaLanes<V>& s, V x) {
  const V one = splat<V>(1.0);
  const V new_weight = splat<V>(c.new_weight);
  const auto observed = ewma_observed(x);
  const auto has_mean = s.mean == s.mean;
  if (lane_all(observed & has_mean)) {
    // pandas' usual path, a value and a mean to blend it into, without the selects for NaNs.
    s.observations = s.observations + one;
    s.old_weight = s.old_weight * splat<V>(c.old_weight_factor);
    const V blended = (s.old_weight * s.mean + new_weight * x) / (s.old_weight + new_weight);
    // Skipped when equal, so a constant series stays exact.
    s.mean = lane_select(s.mean != x, blended, s.mean);
    s.old_weight = c.adjust ? s.old_weight + new_weight : one;
    return ewma_output(c, s);
  }
  s.observations = s.observations + lane_select(observed, one, splat<V>(0.0));
  // Without ignore_na a NaN still decays the weights of the values before it.
  const auto decays = c.ignore_na ? (has_mean & observed) : has_mean;
  s.old_weight = lane_select(decays, s.old_weight * splat<V>(c.old_weight_factor), s.old_weight);
  const auto updates = has_mean & observed;
  const V blended = (s.old_weight * s.mean + new_weight * x) / (s.old_weight + new_weight);
  s.mean = lane_select(updates & (s.mean != x), blended, s.mean);
  s.old_weight = lane_select(updates, c.adjust ? s.old_weight + new_weight : one, s.old_weight);
  // The first value after leading NaNs starts the mean; its weight stays 1.
  s.mean = lane_select(!has_mean & observed, x, s.mean);
  return ewma_output(c, s);
}

FUSEDOPT_MATH_END
