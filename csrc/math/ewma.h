// pandas' exponentially weighted mean, ewm(...).mean() (SPEC section 9), one series at a time:
// the same operations in the same order as pandas' aggregations.pyx, so results are bit-identical
// where pandas' algorithm is. (At com == 1 with adjust=False and a NaN this is the pandas 2 rule;
// pandas 3.0 special-cases it, see SPEC A.5.)
#pragma once

#include <cmath>
#include <cstdint>

#include "math/common.h"

FUSEDOPT_MATH_BEGIN

struct EwmaCoefficients {
  double old_weight_factor;  // 1 - alpha, alpha = 1 / (1 + com)
  double new_weight;         // 1 if adjust else alpha
  bool adjust;
  bool ignore_na;
  int64_t min_periods;  // already max(min_periods, 1)
};

inline EwmaCoefficients ewma_coefficients(double com, bool adjust, bool ignore_na,
                                          int64_t min_periods) {
  const double alpha = 1.0 / (1.0 + com);
  return {1.0 - alpha, adjust ? 1.0 : alpha, adjust, ignore_na, min_periods < 1 ? 1 : min_periods};
}

struct EwmaState {
  double mean;
  double old_weight;
  int64_t observations;
};

inline double ewma_output(const EwmaCoefficients& c, const EwmaState& s) {
  return s.observations >= c.min_periods ? s.mean : NAN;
}

inline double ewma_first(const EwmaCoefficients& c, EwmaState& s, double x) {
  s.mean = x;
  s.old_weight = 1.0;
  s.observations = x == x;
  return ewma_output(c, s);
}

inline double ewma_next(const EwmaCoefficients& c, EwmaState& s, double x) {
  const bool observed = x == x;
  s.observations += observed;
  if (s.mean == s.mean) {
    if (observed || !c.ignore_na) {
      s.old_weight *= c.old_weight_factor;
      if (observed) {
        // Skipped when equal, so a constant series stays exact.
        if (s.mean != x) {
          s.mean = s.old_weight * s.mean + c.new_weight * x;
          s.mean /= s.old_weight + c.new_weight;
        }
        s.old_weight = c.adjust ? s.old_weight + c.new_weight : 1.0;
      }
    }
  } else if (observed) {
    s.mean = x;  // the first value after leading NaNs; the weight stays 1
  }
  return ewma_output(c, s);
}

FUSEDOPT_MATH_END
