// One validator for every entry point: nothing is written until every buffer of the call passed.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/step.h"

namespace fusedopt {
namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string indexed(const std::string& name, size_t i) {
  return name + "[" + std::to_string(i) + "]";
}

std::string dtype_of(const BufferInfo& b) { return b.dtype_str(); }

[[noreturn]] void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

// Where a buffer sits in the call. Names are spelled out only for a message: building them for
// every buffer of a ten-thousand-tensor step cost more than the step itself.
struct BufferName {
  const std::string* role;  // "params", "grads" or a state name
  size_t index;
  std::string str() const { return indexed(*role, index); }
};

void check_buffer(const BufferInfo& b, const BufferName& name, bool written) {
  if (!b.dtype)
    fail(ErrorKind::type, name.str() + " has dtype " + b.dtype_name +
                              "; fusedopt updates float32, float64, bfloat16 and float16 arrays");
  // A C caller's size is any int64: one whose bytes overflow, or reach past the end of the
  // address space, would wrap the extents the overlap check compares (and the step's counts).
  const int64_t element = dtype_size(*b.dtype);
  if (b.size < 0 || b.size > std::numeric_limits<int64_t>::max() / element ||
      reinterpret_cast<uintptr_t>(b.data) >
          std::numeric_limits<uintptr_t>::max() - static_cast<uintptr_t>(b.size * element))
    fail(ErrorKind::value, name.str() + " has " + std::to_string(b.size) +
                               " elements, which would reach past the end of the address space");
  if (!b.contiguous)
    fail(ErrorKind::value,
         name.str() + (written ? " is not C-contiguous; an in-place update needs the "
                                 "array's own memory (a contiguous copy would be "
                                 "updated instead of it)"
                               : " is not C-contiguous; the step reads it as one block "
                                 "of memory (pass a contiguous copy of it)"));
  if (written && !b.writeable) fail(ErrorKind::value, name.str() + " is read-only");
}

}  // namespace

void check_scales(const float* scales, int64_t blocks, const std::string& state_name,
                  size_t index) {
  for (int64_t b = 0; b < blocks; ++b)
    if (!(scales[b] >= 0.0f))  // NaN compares false
      fail(ErrorKind::value, indexed(state_name + "_absmax", index) +
                                 " holds a NaN or negative value (block " + std::to_string(b) +
                                 ": " + std::to_string(scales[b]) +
                                 "); an absmax is the largest |x| of its block");
}

namespace {

// A one-dimensional shape is the size beside it: comparing sizes first spares a cache miss on the
// shape's own allocation per grad (memcmp took 12% of a step over 10000 tensors of 100 elements).
bool same_shape(const BufferInfo& a, const BufferInfo& b) {
  if (a.size != b.size || a.shape.size() != b.shape.size()) return false;
  return a.shape.size() <= 1 || a.shape == b.shape;
}

void check_shape_matches(const BufferInfo& b, const BufferName& name, const BufferInfo& param,
                         const BufferName& param_name) {
  if (!same_shape(b, param))
    fail(ErrorKind::value, name.str() + " has shape " + shape_string(b.shape) + " but " +
                               param_name.str() + " has shape " + shape_string(param.shape));
}

void check_matches_param(const BufferInfo& b, const BufferName& name, const BufferInfo& param,
                         const BufferName& param_name) {
  if (b.dtype != param.dtype)
    fail(ErrorKind::type, name.str() + " has dtype " + dtype_of(b) + " but " + param_name.str() +
                              " has " + dtype_of(param));
  check_shape_matches(b, name, param, param_name);
}

// A tensor's states share one dtype: the param's, or (for float32 and 16-bit params) float32 or
// bfloat16, which the staged kernels widen and round (docs/spec.md section 22).
void check_state_dtype(const BufferInfo& state, const BufferName& name, const BufferInfo& param,
                       const BufferName& param_name, std::optional<Dtype>& tensor_state_dtype) {
  const Dtype d = *state.dtype;
  if (tensor_state_dtype && d != *tensor_state_dtype)
    fail(ErrorKind::type, name.str() + " has dtype " + dtype_of(state) +
                              " but the other states of " + param_name.str() + " have " +
                              dtype_name(*tensor_state_dtype));
  const bool allowed = d == *param.dtype ||
                       (*param.dtype != Dtype::float64 &&
                        (d == Dtype::float32 || d == Dtype::bfloat16 || d == Dtype::blockwise8));
  if (!allowed)
    fail(ErrorKind::type, name.str() + " has dtype " + dtype_of(state) + " but " +
                              param_name.str() + " has " + dtype_of(param) +
                              "; a state has its param's dtype, or float32, bfloat16 or 8-bit "
                              "blockwise (uint8 codes) for float32, bfloat16 and float16 params");
  tensor_state_dtype = d;
  check_shape_matches(state, name, param, param_name);
}

struct Extent {
  uintptr_t begin, end;
  bool written;
  BufferName name;
};

// The extents in order of their first byte. An LSD radix sort over the 11-bit digits in which
// the addresses differ (user-space addresses share their top bits; 2048 counters stay in L1):
// linear in the number of buffers, where std::sort of the extents was the largest cost of a
// ten-thousand-tensor step.
std::vector<uint32_t> order_by_address(const std::vector<Extent>& extents) {
  const size_t n = extents.size();
  // (address, index) pairs side by side, so every pass streams through memory.
  std::vector<std::pair<uintptr_t, uint32_t>> keys(n), scratch(n);
  for (size_t i = 0; i < n; ++i) keys[i] = {extents[i].begin, static_cast<uint32_t>(i)};
  if (n < 256) {
    std::sort(keys.begin(), keys.end());
  } else {
    constexpr unsigned kDigitBits = 11;
    constexpr uintptr_t kDigitMask = (uintptr_t{1} << kDigitBits) - 1;
    uintptr_t differing = 0;
    for (const auto& key : keys) differing |= key.first ^ keys[0].first;
    uint32_t count[kDigitMask + 1];
    for (unsigned shift = 0; shift < 8 * sizeof(uintptr_t); shift += kDigitBits) {
      if (((differing >> shift) & kDigitMask) == 0) continue;
      std::fill(std::begin(count), std::end(count), 0);
      for (const auto& key : keys) ++count[(key.first >> shift) & kDigitMask];
      uint32_t position = 0;
      for (uint32_t& c : count) position += std::exchange(c, position);
      for (const auto& key : keys) scratch[count[(key.first >> shift) & kDigitMask]++] = key;
      keys.swap(scratch);
    }
  }
  std::vector<uint32_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = keys[i].second;
  return order;
}

// Any byte written through one buffer and touched through another would make the result depend
// on the order of the pass: a param given twice, a grad that is a view of its param, ...
void check_no_overlap(const std::vector<Extent>& extents) {
  const Extent* furthest_any = nullptr;
  const Extent* furthest_written = nullptr;
  for (uint32_t i : order_by_address(extents)) {
    const Extent& e = extents[i];
    const Extent* clash = nullptr;
    if (e.written && furthest_any && e.begin < furthest_any->end) clash = furthest_any;
    if (!clash && furthest_written && e.begin < furthest_written->end) clash = furthest_written;
    if (clash)
      fail(ErrorKind::value, e.name.str() + " overlaps " + clash->name.str() +
                                 " in memory; every param, grad and state must be its own buffer");
    if (!furthest_any || e.end > furthest_any->end) furthest_any = &e;
    if (e.written && (!furthest_written || e.end > furthest_written->end)) furthest_written = &e;
  }
}

}  // namespace

std::vector<TensorRef> validate_step_buffers(const StepBuffers& b, bool with_grads) {
  static const std::string params_role = "params", grads_role = "grads";
  const size_t n = b.params.size();
  if (with_grads && b.grads.size() != n)
    fail(ErrorKind::value, "grads: expected " + std::to_string(n) +
                               " arrays (one per param), got " + std::to_string(b.grads.size()));
  for (size_t k = 0; k < b.states.size(); ++k)
    if (!b.states[k].empty() && b.states[k].size() != n)
      fail(ErrorKind::value, b.state_names[k] + ": expected " + std::to_string(n) +
                                 " arrays (one per param), got " +
                                 std::to_string(b.states[k].size()));

  std::vector<TensorRef> tensors(n);
  std::vector<Extent> extents;
  extents.reserve(n * (2 + b.states.size()));
  if (!b.masters.empty() && b.masters.size() != n)
    fail(ErrorKind::value, "masters: expected " + std::to_string(n) +
                               " arrays (one per param, None where there is none), got " +
                               std::to_string(b.masters.size()));
  static const std::string masters_role = "masters";
  // The scales' names, alive until the overlap check at the end has named any clash.
  std::vector<std::string> absmax_roles;
  for (const std::string& name : b.state_names) absmax_roles.push_back(name + "_absmax");
  auto add_extent = [&](const BufferInfo& buffer, bool written, const BufferName& name) {
    const int64_t bytes = buffer.bytes();
    if (bytes == 0) return;
    const auto begin = reinterpret_cast<uintptr_t>(buffer.data);
    extents.push_back({begin, begin + static_cast<uintptr_t>(bytes), written, name});
  };

  for (size_t i = 0; i < n; ++i) {
    const BufferInfo& param = b.params[i];
    const BufferName param_name{&params_role, i};
    const BufferName grad_name{&grads_role, i};
    if (!param.present) fail(ErrorKind::type, param_name.str() + " is None");
    check_buffer(param, param_name, true);
    if (param.dtype == Dtype::blockwise8)
      fail(ErrorKind::type, param_name.str() +
                                " has dtype uint8; fusedopt updates float32, float64, bfloat16 and "
                                "float16 params (uint8 arrays are the codes of 8-bit states)");
    add_extent(param, true, param_name);
    if (with_grads) {
      if (!b.grads[i].present) fail(ErrorKind::type, grad_name.str() + " is None");
      check_buffer(b.grads[i], grad_name, b.grads_written);
      check_matches_param(b.grads[i], grad_name, param, param_name);
      add_extent(b.grads[i], b.grads_written, grad_name);
    }

    TensorRef& t = tensors[i];
    t = TensorRef{};
    t.param = param.data;
    t.grad = with_grads ? b.grads[i].data : nullptr;
    t.size = param.size;
    t.dtype = *param.dtype;
    t.write_grad = b.grads_written;
    std::optional<Dtype> state_dtype;
    for (size_t k = 0; k < b.states.size(); ++k) {
      const bool has_scale =
          b.absmax.size() > k && b.absmax[k].size() == n && b.absmax[k][i].present;
      const bool has_state = !b.states[k].empty() && b.states[k][i].present;
      // Scales exactly for 8-bit states: others would be ignored, as if they were in use.
      if (has_scale && (!has_state || b.states[k][i].dtype != Dtype::blockwise8))
        fail(ErrorKind::value, BufferName{&absmax_roles.at(k), i}.str() + " is given but " +
                                   BufferName{&b.state_names[k], i}.str() +
                                   (has_state ? " is not 8-bit state (uint8 codes)" : " is not"));
      if (!has_state) continue;
      const BufferInfo& state = b.states[k][i];
      const BufferName state_name{&b.state_names[k], i};
      check_buffer(state, state_name, true);
      check_state_dtype(state, state_name, param, param_name, state_dtype);
      add_extent(state, true, state_name);
      t.state[k] = state.data;
      // An empty tensor has no blocks: its scales may be absent (the C ABI's NULL).
      if (*state.dtype == Dtype::blockwise8 && (param.size > 0 || has_scale)) {
        const BufferName scale_name{&absmax_roles.at(k), i};
        if (!has_scale)
          fail(ErrorKind::value, state_name.str() + " is 8-bit (uint8 codes) but " +
                                     scale_name.str() + ", its per-block absmax, is not given");
        const BufferInfo& scale = b.absmax[k][i];
        check_buffer(scale, scale_name, true);
        const int64_t blocks = quant_blocks(param.size);
        if (scale.dtype != Dtype::float32 || scale.size != blocks)
          fail(ErrorKind::value, scale_name.str() + " must be float32 with " +
                                     std::to_string(blocks) + " values (one per block of " +
                                     std::to_string(kQuantBlock) + "), got " + dtype_of(scale) +
                                     " with " + std::to_string(scale.size));
        if (b.values_readable)
          check_scales(static_cast<const float*>(scale.data), blocks, b.state_names[k], i);
        add_extent(scale, true, scale_name);
        t.absmax[k] = static_cast<float*>(scale.data);
      }
    }
    t.state_dtype = state_dtype.value_or(t.dtype);
    if (!b.masters.empty() && b.masters[i].present) {
      const BufferInfo& master = b.masters[i];
      const BufferName master_name{&masters_role, i};
      check_buffer(master, master_name, true);
      if (master.dtype != Dtype::float32)
        fail(ErrorKind::type,
             master_name.str() + " has dtype " + dtype_of(master) + "; a master copy is float32");
      if (t.dtype != Dtype::bfloat16 && t.dtype != Dtype::float16)
        fail(ErrorKind::type, master_name.str() + " is given but " + param_name.str() +
                                  " has dtype " + dtype_of(param) +
                                  "; master copies are for bfloat16 and float16 params");
      check_shape_matches(master, master_name, param, param_name);
      add_extent(master, true, master_name);
      t.master = static_cast<float*>(master.data);
    }
  }
  check_no_overlap(extents);
  return tensors;
}

void check_rounding_applies(const StepBuffers& b, const StepExtras& extras) {
  if (!extras.rounding_seed) return;
  auto sixteen_bit = [](const BufferInfo& buffer) {
    return buffer.present && (buffer.dtype == Dtype::bfloat16 || buffer.dtype == Dtype::float16);
  };
  if (std::any_of(b.params.begin(), b.params.end(), sixteen_bit)) return;
  for (const std::vector<BufferInfo>& state : b.states)
    if (std::any_of(state.begin(), state.end(), sixteen_bit)) return;
  fail(ErrorKind::value,
       "stochastic_rounding: nothing is stored in 16 bits (no param or state of this call is "
       "bfloat16 or float16)");
}

void check_grad(const BufferInfo& grad, size_t index, const BufferInfo& param, bool written) {
  static const std::string params_role = "params", grads_role = "grads";
  const BufferName grad_name{&grads_role, index};
  if (!grad.present) fail(ErrorKind::type, grad_name.str() + " is None");
  check_buffer(grad, grad_name, written);
  check_matches_param(grad, grad_name, param, BufferName{&params_role, index});
}

ExtentIndex::ExtentIndex(std::vector<Extent> extents) : extents_(std::move(extents)) {
  std::sort(extents_.begin(), extents_.end(),
            [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  begins_.reserve(extents_.size());
  furthest_end_.reserve(extents_.size());
  uintptr_t furthest = 0;
  for (const Extent& e : extents_) {
    begins_.push_back(e.begin);
    furthest_end_.push_back(furthest = std::max(furthest, e.end));
  }
}

const std::string* ExtentIndex::find_overlap(uintptr_t begin, uintptr_t end, size_t* hint) const {
  // The extents starting before `end`; one of them overlaps when the furthest reaches past begin.
  // Searched outward from the hint (the previous answer) by doubling steps: a framework's grads
  // of one step are mostly allocated one after another, near where the previous one was found.
  const uintptr_t last = end - 1;
  auto first = begins_.begin(), stop = begins_.end();
  if (hint && *hint <= begins_.size()) {
    const auto at = begins_.begin() + static_cast<std::ptrdiff_t>(*hint);
    if (at != begins_.begin() && *(at - 1) > last) {  // the answer is left of the hint
      size_t step = 1;
      stop = at - 1;
      while (static_cast<size_t>(stop - begins_.begin()) > step && *(stop - step) > last) {
        stop -= step;
        step *= 2;
      }
      first = static_cast<size_t>(stop - begins_.begin()) > step ? stop - step : begins_.begin();
    } else {  // at or right of it
      size_t step = 1;
      first = at;
      while (static_cast<size_t>(begins_.end() - first) > step && *(first + step - 1) <= last) {
        first += step;
        step *= 2;
      }
      stop = static_cast<size_t>(begins_.end() - first) > step ? first + step : begins_.end();
    }
  }
  const size_t count = std::upper_bound(first, stop, last) - begins_.begin();
  if (hint) *hint = count;
  if (count == 0 || furthest_end_[count - 1] <= begin) return nullptr;
  for (size_t i = count; i-- > 0;)
    if (extents_[i].end > begin) return &extents_[i].name;
  return nullptr;
}

}  // namespace fusedopt
