// The non-generic parts of a step: the schedule's checks and the fork/join over all tensors.
#include "core/step.h"

#include <algorithm>

#include "cpu/parallel.h"

namespace fusedopt {
namespace {

// Work item size: small enough to balance two threads on 1e5 elements, large enough that the
// shared counter is touched rarely. A multiple of 16 so items start on cache lines.
constexpr int64_t kChunkElements = 1 << 14;

struct Work {
  const TensorRef* tensors;
  void (*run)(void*, size_t, int64_t, int64_t);
  void* context;
  const WorkLayout& layout;
};

// One item is a run of kChunkElements consecutive elements of the concatenation of all tensors,
// so a thousand small tensors make a few items and a large one many.
void run_item(void* context, int64_t item) {
  const Work& w = *static_cast<const Work*>(context);
  const std::vector<int64_t>& starts = w.layout.starts;
  const int64_t begin = item * kChunkElements;
  const int64_t end = std::min(begin + kChunkElements, w.layout.total);
  size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  for (; i < starts.size() && starts[i] < end; ++i) {
    const int64_t local_begin = std::max<int64_t>(0, begin - starts[i]);
    const int64_t local_end = std::min(w.tensors[i].size, end - starts[i]);
    if (local_end > local_begin) w.run(w.context, i, local_begin, local_end);
  }
}

// The first pass of a reducing step: items of kBlocksPerItem consecutive blocks of the list of
// every tensor's blocks, each writing its own partial sums.
constexpr int64_t kBlocksPerItem = 4;

struct ReductionWork {
  const TensorRef* tensors;
  void (*run)(void*, size_t, int64_t, int64_t, double*);
  void* context;
  std::vector<int64_t> first_block;  // first_block[i]: tensor i's first block in the list
  int64_t total_blocks;
  double* partials;
  int reductions;
};

void run_reduction_item(void* context, int64_t item) {
  const ReductionWork& w = *static_cast<const ReductionWork*>(context);
  const int64_t begin = item * kBlocksPerItem;
  const int64_t end = std::min(begin + kBlocksPerItem, w.total_blocks);
  size_t i = std::upper_bound(w.first_block.begin(), w.first_block.end(), begin) -
             w.first_block.begin() - 1;
  for (int64_t block = begin; block < end; ++i) {
    const int64_t blocks = (w.tensors[i].size + kReductionBlock - 1) / kReductionBlock;
    const int64_t local_begin = block - w.first_block[i];
    const int64_t local_end = std::min(blocks, end - w.first_block[i]);
    if (local_end > local_begin)
      w.run(w.context, i, local_begin, local_end, w.partials + w.first_block[i] * w.reductions);
    block = w.first_block[i] + blocks;
  }
}

}  // namespace

std::vector<double> run_reductions(size_t num_tensors, const TensorRef* tensors, int reductions,
                                   void (*run)(void*, size_t, int64_t, int64_t, double*),
                                   void* context) {
  ReductionWork w{tensors, run, context, {}, 0, nullptr, reductions};
  w.first_block.reserve(num_tensors);
  int64_t total_elements = 0;
  for (size_t i = 0; i < num_tensors; ++i) {
    w.first_block.push_back(w.total_blocks);
    w.total_blocks += (tensors[i].size + kReductionBlock - 1) / kReductionBlock;
    total_elements += tensors[i].size;
  }
  std::vector<double> partials(static_cast<size_t>(w.total_blocks) * reductions);
  w.partials = partials.data();
  const int64_t items = (w.total_blocks + kBlocksPerItem - 1) / kBlocksPerItem;
  if (total_elements < kParallelElements || cpu::num_threads() <= 1) {
    for (int64_t item = 0; item < items; ++item) run_reduction_item(&w, item);
  } else {
    cpu::parallel_for(items, run_reduction_item, &w);
  }
  std::vector<double> sums(num_tensors * reductions, 0.0);
  for (size_t i = 0; i < num_tensors; ++i) {
    const int64_t blocks = (tensors[i].size + kReductionBlock - 1) / kReductionBlock;
    for (int64_t b = 0; b < blocks; ++b)
      for (int r = 0; r < reductions; ++r)
        sums[i * reductions + r] += partials[(w.first_block[i] + b) * reductions + r];
  }
  return sums;
}

void check_schedule(const StepSchedule& s, size_t num_tensors, size_t num_groups) {
  if (s.group_of.size() != num_tensors || s.steps.size() != num_tensors)
    throw Error(ErrorKind::value, "steps: expected one group index and one step per param");
  if (!s.new_state.empty() && s.new_state.size() != num_tensors)
    throw Error(ErrorKind::value, "new_state: expected one flag per param");
  for (size_t i = 0; i < num_tensors; ++i) {
    if (s.group_of[i] < 0 || static_cast<size_t>(s.group_of[i]) >= num_groups)
      throw Error(ErrorKind::value,
                  "group index of params[" + std::to_string(i) + "] is out of range");
    if (s.steps[i] < 1)
      throw Error(ErrorKind::value, "step of params[" + std::to_string(i) +
                                        "] must be >= 1 (the first step is 1), got " +
                                        std::to_string(s.steps[i]));
  }
}

WorkLayout work_layout(size_t num_tensors, const TensorRef* tensors) {
  WorkLayout layout;
  layout.starts.reserve(num_tensors);
  // A block of 8-bit state is quantized by one thread: tensors with one start on a block in the
  // list, so that work items (multiples of the block) split them between blocks.
  bool quantized = false;
  for (size_t i = 0; i < num_tensors; ++i) quantized |= tensors[i].state_dtype == Dtype::blockwise8;
  const int64_t align = quantized ? kQuantBlock : 1;
  static_assert(kChunkElements % kQuantBlock == 0, "work items hold whole blocks");
  for (size_t i = 0; i < num_tensors; ++i) {
    layout.starts.push_back(layout.total);
    layout.total += (tensors[i].size + align - 1) / align * align;
  }
  return layout;
}

void run_work(size_t num_tensors, const TensorRef* tensors,
              void (*run)(void*, size_t, int64_t, int64_t), void* context,
              const WorkLayout* layout) {
  WorkLayout own;
  if (!layout) {
    own = work_layout(num_tensors, tensors);
    layout = &own;
  }
  if (layout->total < kParallelElements || cpu::num_threads() <= 1) {
    for (size_t i = 0; i < num_tensors; ++i)
      if (tensors[i].size > 0) run(context, i, 0, tensors[i].size);
    return;
  }
  Work w{tensors, run, context, *layout};
  const int64_t items = (layout->total + kChunkElements - 1) / kChunkElements;
  cpu::parallel_for(items, run_item, &w);
}

}  // namespace fusedopt
