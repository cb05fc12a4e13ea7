#include "core/ewma.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"

namespace fusedopt {
namespace {

EwmaCoefficients ewma_coefficients(double com, bool adjust, bool ignore_na, int64_t min_periods) {
  // The same operations as pandas (alpha = 1 / (1 + com)), so alpha rounds as pandas' does.
  const double alpha = 1.0 / (1.0 + com);
  return {1.0 - alpha, adjust ? 1.0 : alpha, adjust, ignore_na, std::max<int64_t>(min_periods, 1)};
}

struct EwmaWork {
  EwmaBlock block;
  EwmaFn kernel;
  int64_t num_series, series_per_item;
};

void ewma_item(void* context, int64_t item) {
  const EwmaWork& w = *static_cast<const EwmaWork*>(context);
  const int64_t first = item * w.series_per_item;
  w.kernel(w.block, first, std::min(first + w.series_per_item, w.num_series));
}

// The bytes [first, end) that a non-empty series block at data spans: from its first element to
// just past its last, (length - 1) * time_stride + (num_series - 1) * series_stride elements
// further (strides >= 0; a stride of 0 reads one element again). Everything is computed in
// unsigned integers with overflow checks: a layout that reaches past the end of the address space
// cannot describe a real buffer, and wrapped arithmetic could hide an overlap.
struct Extent {
  uintptr_t first, end;
};

Extent extent_of(const double* data, const char* name, int64_t length, int64_t num_series,
                 int64_t time_stride, int64_t series_stride) {
  const auto n = [](int64_t v) { return static_cast<uint64_t>(v); };
  uint64_t last_time, last_series, last, bytes;
  uintptr_t end;
  const uintptr_t first = reinterpret_cast<uintptr_t>(data);
  if (__builtin_mul_overflow(n(length - 1), n(time_stride), &last_time) ||
      __builtin_mul_overflow(n(num_series - 1), n(series_stride), &last_series) ||
      __builtin_add_overflow(last_time, last_series, &last) ||
      __builtin_add_overflow(last, uint64_t{1}, &last) ||
      __builtin_mul_overflow(last, uint64_t{sizeof(double)}, &bytes) ||
      __builtin_add_overflow(first, bytes, &end))
    throw Error(ErrorKind::value, std::string(name) +
                                      ": length, num_series and the strides reach past the end "
                                      "of the address space");
  return {first, end};
}

// Writes a zero into every page of a dense out, on the pool's threads, a run of pages each. A
// fresh out (the Python API allocates one per call) is mapped by the kernel at its first write,
// which zeroes the page: 80 MB took 4.2 ms on one thread. Every element is written by the EWMA
// afterwards, so the zeros are never seen. Series one after another only: series side by side
// were touched first too (their threads, each writing every row, meet in the same pages), but
// once their kernel kept its block in registers it streamed at memory speed, and a page zeroed
// just before the kernel writes it is still in cache where one zeroed beforehand is read back
// from memory: 100,000 x 100, 2 threads, fusedopt.ewma, best of 15 in four interleaved runs,
// 18.1-21.0 ms touched first against 14.5-16.0 without (AMD Zen 3).
void first_touch(double* out, int64_t count) {
  constexpr int64_t kPage = 4096 / sizeof(double);
  constexpr int64_t kPagesPerItem = 256;  // 1 MiB
  struct Touch {
    double* out;
    int64_t count;
  } touch{out, count};
  const int64_t pages = (count + kPage - 1) / kPage;
  cpu::parallel_for((pages + kPagesPerItem - 1) / kPagesPerItem,
                    [](void* context, int64_t item) {
                      const Touch& t = *static_cast<const Touch*>(context);
                      const int64_t end = std::min(t.count, (item + 1) * kPagesPerItem * kPage);
                      for (int64_t i = item * kPagesPerItem * kPage; i < end; i += kPage)
                        *static_cast<volatile double*>(t.out + i) = 0.0;
                    },
                    &touch);
}

// Whether no two series share memory: each series is written by one thread, its elements in
// time order (a time stride of 0 leaves the last value), but two series are written by two
// threads. Series one after another (series_stride past a series' last element), series side by
// side (time_stride past a row's last series), or series of one element each, apart.
bool series_apart(int64_t length, int64_t num_series, int64_t time_stride, int64_t series_stride) {
  if (num_series <= 1) return true;
  if (length <= 1 || time_stride == 0) return series_stride > 0;
  using Wide = __int128;
  return series_stride > Wide{length - 1} * time_stride ||
         (series_stride > 0 && time_stride > Wide{num_series - 1} * series_stride);
}

}  // namespace

void ewma(const double* x, double* out, int64_t length, int64_t num_series, int64_t time_stride,
          int64_t series_stride, double com, bool adjust, bool ignore_na, int64_t min_periods) {
  if (!(com >= 0)) throw Error(ErrorKind::value, "com must satisfy: com >= 0");
  if (length < 0 || num_series < 0 || time_stride < 0 || series_stride < 0)
    throw Error(ErrorKind::value, "length, num_series and the strides must be >= 0");
  // The kernels write out while x is still being read, in an order set by the layout and the
  // threads, so an out that overlaps x can feed results back in as input: a wrong result that was
  // reported as success. Refuse any overlap before anything is written. An empty block reads and
  // writes nothing, whatever the pointers. The test is on the spans, so it also refuses
  // interleaved layouts that share no element.
  if (length > 0 && num_series > 0) {
    const Extent in = extent_of(x, "x", length, num_series, time_stride, series_stride);
    const Extent result = extent_of(out, "out", length, num_series, time_stride, series_stride);
    if (in.first < result.end && result.first < in.end) {
      const std::string where = result.first == in.first ? "at x"
                                : result.first > in.first
                                    ? std::to_string(result.first - in.first) + " bytes after x"
                                    : std::to_string(in.first - result.first) + " bytes before x";
      throw Error(ErrorKind::value, "x and out overlap: out starts " + where + " and both span " +
                                        std::to_string(in.end - in.first) +
                                        " bytes; out must not share memory with x");
    }
  }
  // Two series that share memory in out were written by two threads in an order they set, a
  // result that changed from run to run.
  if (length > 0 && !series_apart(length, num_series, time_stride, series_stride))
    throw Error(ErrorKind::value,
                "out's series would share memory: with length " + std::to_string(length) +
                    " and num_series " + std::to_string(num_series) +
                    ", series_stride must pass a series' last element or time_stride a row's "
                    "last series (strides " +
                    std::to_string(time_stride) + " and " + std::to_string(series_stride) + ")");
  const bool side_by_side = series_stride == 1 && time_stride > 1;
  // Series side by side keep their running state in memory between rows: mean, old weight and
  // observation count, one array each. Each array starts on a cache line and items are whole
  // cache lines of series, so two threads never write the same line (they did at first, and two
  // threads ran slower than one).
  constexpr int64_t kSeriesPerCacheLine = 64 / sizeof(double);
  const int64_t padded =
      (num_series + kSeriesPerCacheLine - 1) / kSeriesPerCacheLine * kSeriesPerCacheLine;
  std::vector<double> state(side_by_side ? 3 * padded + kSeriesPerCacheLine : 0);
  double* state_data = state.data();
  if (side_by_side) {
    const auto misalignment = reinterpret_cast<uintptr_t>(state_data) % 64;
    if (misalignment) state_data += (64 - misalignment) / sizeof(double);
  }
  EwmaWork w{{x, out, length, time_stride, series_stride, state_data, state_data + padded,
              state_data + 2 * padded, ewma_coefficients(com, adjust, ignore_na, min_periods)},
             cpu::kernels().ewma,
             num_series,
             0};
  // Series side by side: one item per thread, a whole number of cache lines wide. Every item
  // walks all rows, so narrower items cost more than they balance (100 series as four items of
  // 32 took twice as long as one of 100), and two threads never write the same line. Series one
  // after another: about four items per thread, enough series per item that the shared counter
  // is touched rarely.
  const int64_t threads = cpu::num_threads();
  const int64_t per_thread = (num_series + threads - 1) / threads;
  w.series_per_item =
      side_by_side
          ? (per_thread + kSeriesPerCacheLine - 1) / kSeriesPerCacheLine * kSeriesPerCacheLine
          : std::max<int64_t>(64, (num_series + 4 * threads - 1) / (4 * threads));
  if (length * num_series < (1 << 16)) w.series_per_item = std::max<int64_t>(num_series, 1);
  const int64_t items = (num_series + w.series_per_item - 1) / w.series_per_item;
  const cpu::StepInProgress writing;  // out is the caller's: a fork waits for it whole
  if (items > 1 && time_stride == 1 && series_stride == length) {
    first_touch(out, length * num_series);  // series one after another, dense
  }
  cpu::parallel_for(items, ewma_item, &w);
}

}  // namespace fusedopt
