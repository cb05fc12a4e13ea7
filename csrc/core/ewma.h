// Many EWMA series at once over a strided float64 block.
#pragma once

#include <cstdint>

namespace fusedopt {

// Element t of series s is at x[s * series_stride + t * time_stride] (in elements); out has the
// same layout. Series are spread over the thread pool.
void ewma(const double* x, double* out, int64_t length, int64_t num_series, int64_t time_stride,
          int64_t series_stride, double com, bool adjust, bool ignore_na, int64_t min_periods);

}  // namespace fusedopt
