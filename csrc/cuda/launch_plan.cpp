// Builds the CUDA launch plan and the table kernel's records on the host (see launch_plan.h and
// tables.h). No CUDA here: the core library compiles it with the host compiler and the tests
// check it on any machine.
#include "cuda/launch_plan.h"

#include <algorithm>
#include <climits>
#include <stdexcept>

#include "cuda/tables.h"
#include "math/rounding.h"

namespace fusedopt {
namespace cuda {
namespace {

class PlanBuilder {
 public:
  PlanBuilder(std::vector<LaunchBatch>& plan, int element_bytes)
      : plan_(plan), element_bytes_(element_bytes) {
    start_batch();
  }

  void add(const PlanTensor& tensor, int32_t index) {
    if (tensor.size == 0) return;  // an empty tensor never takes a slot
    const int64_t chunks = (tensor.size + kChunkElements - 1) / kChunkElements;
    if (chunks > INT32_MAX) throw std::length_error("tensor too large for the CUDA launch plan");
    int slot = take_slot(tensor, index);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      LaunchMetadata& m = current().metadata;
      if (m.num_blocks == kMaxBlocksPerLaunch) {
        flush();
        slot = take_slot(tensor, index);  // the rest of this tensor continues in the next launch
      }
      LaunchMetadata& n = current().metadata;
      n.block_tensor[n.num_blocks] = static_cast<uint16_t>(slot);
      n.block_chunk[n.num_blocks] = static_cast<int32_t>(chunk);
      ++n.num_blocks;
    }
  }

  // The final flush: the last, partly filled launch.
  void finish() {
    if (current().metadata.num_blocks > 0) flush();
    plan_.pop_back();
  }

 private:
  LaunchBatch& current() { return plan_.back(); }

  void start_batch() {
    plan_.emplace_back();
    plan_.back().element_bytes = element_bytes_;  // emplace_back() zeroed everything else
  }

  void flush() { start_batch(); }

  int coefficient_set_of(int id) {
    LaunchBatch& b = current();
    for (int k = 0; k < b.num_coefficient_sets; ++k)
      if (b.coefficient_ids[k] == id) return k;
    return -1;
  }

  int take_slot(const PlanTensor& tensor, int32_t index) {
    const LaunchMetadata& m = current().metadata;
    const bool full = m.num_tensors == kMaxTensorsPerLaunch || m.num_blocks == kMaxBlocksPerLaunch;
    const bool no_set_left = coefficient_set_of(tensor.coefficient_id) < 0 &&
                             current().num_coefficient_sets == kMaxCoefficientSetsPerLaunch;
    if (full || no_set_left) flush();

    LaunchBatch& b = current();
    int set = coefficient_set_of(tensor.coefficient_id);
    if (set < 0) {
      set = b.num_coefficient_sets++;
      b.coefficient_ids[set] = tensor.coefficient_id;
    }
    LaunchMetadata& n = b.metadata;
    const int slot = n.num_tensors++;
    for (int k = 0; k < kMaxOperands; ++k) n.addresses[k][slot] = tensor.addresses[k];
    n.sizes[slot] = tensor.size;
    n.coefficient_set[slot] = static_cast<uint8_t>(set);
    n.flags[slot] = static_cast<uint8_t>((is_vectorizable(tensor) ? kVectorized : 0) |
                                         (tensor.write_grad ? kWriteGrad : 0));
    b.tensor_index[slot] = index;
    return slot;
  }

  std::vector<LaunchBatch>& plan_;
  int element_bytes_;
};

}  // namespace

bool is_vectorizable(const PlanTensor& tensor) {
  for (void* address : tensor.addresses)
    if (reinterpret_cast<uintptr_t>(address) % kVectorBytes != 0) return false;
  return true;
}

std::vector<LaunchBatch> build_launch_plan(const std::vector<PlanTensor>& tensors) {
  if (tensors.size() > INT32_MAX) throw std::length_error("too many tensors for one CUDA step");
  std::vector<LaunchBatch> plan;
  for (int element_bytes : {4, 8}) {
    PlanBuilder builder(plan, element_bytes);
    for (size_t i = 0; i < tensors.size(); ++i)
      if (tensors[i].element_bytes == element_bytes)
        builder.add(tensors[i], static_cast<int32_t>(i));
    builder.finish();
  }
  return plan;
}

PlanTensor plan_tensor(const TensorRef& t, int coefficient_id) {
  PlanTensor p{};
  p.addresses[0] = t.param;
  p.addresses[1] = t.grad;
  for (int k = 0; k < kMaxStates; ++k) p.addresses[2 + k] = t.state[k];
  p.size = t.size;
  p.element_bytes = static_cast<int>(dtype_size(t.dtype));
  p.coefficient_id = coefficient_id;
  p.write_grad = t.write_grad;
  return p;
}

std::vector<PlanTensor> plan_tensors(const std::vector<TensorRef>& tensors,
                                     const std::vector<int>& coefficient_id) {
  std::vector<PlanTensor> result;
  result.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i)
    result.push_back(plan_tensor(tensors[i], coefficient_id[i]));
  return result;
}

TableTensor table_tensor(const TensorRef& t, int coefficient_set) {
  TableTensor d{};
  d.param = t.param;
  d.grad = t.grad;
  for (int k = 0; k < kMaxStates; ++k) {
    d.state[k] = t.state[k];
    d.absmax[k] = t.absmax[k];
  }
  d.master = t.master;
  d.size = t.size;
  d.coefficient_set = coefficient_set;
  d.dtype = static_cast<uint8_t>(t.dtype);
  d.state_dtype = static_cast<uint8_t>(t.state_dtype);
  d.kind = t.staged() ? kStaged : t.dtype == Dtype::float64 ? kPlainDouble : kPlainFloat;
  d.flags = static_cast<uint8_t>(
      (d.kind != kStaged && is_vectorizable(plan_tensor(t, coefficient_set)) ? kVectorized : 0) |
      (t.write_grad ? kWriteGrad : 0) | (t.stochastic ? kStochastic : 0));
  return d;
}

void append_blocks(const TableTensor& t, int32_t tensor, std::vector<TableBlock>& blocks) {
  const int64_t chunks = (t.size + kChunkElements - 1) / kChunkElements;
  if (static_cast<int64_t>(blocks.size()) + chunks > INT32_MAX)
    throw std::length_error("fusedopt.cuda: too many chunks for one launch");
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    blocks.push_back({tensor, static_cast<int32_t>(chunk)});
}

std::vector<SetKeys> set_keys(const std::vector<TensorRef>& tensors,
                              const std::vector<int>& coefficient_of, size_t num_sets) {
  std::vector<SetKeys> keys(num_sets, SetKeys{});
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].stochastic) continue;
    // A struct's tensors share their step, so their rounding key (prepare_step).
    SetKeys& k = keys[coefficient_of[i]];
    for (int role = 0; role < 1 + kMaxStates; ++role)
      k.role_key[role] = role_key(tensors[i].rounding_key, role);
  }
  return keys;
}

}  // namespace cuda
}  // namespace fusedopt
