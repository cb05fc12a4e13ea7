// The CUDA kernels of every algorithm, float32 and float64, and their launches. Built with
// -fmad=false (CMakeLists.txt) so that, like the CPU build with -ffp-contract=off, no multiply-add
// is fused behind the math's back: both backends round every element the same way.
#if !defined(FUSEDOPT_CUDA_EMULATION)
#include <cuda_runtime.h>
// kernel<<<blocks, threads, 0, stream>>>: the kernel last, so that its template arguments' commas
// need no parentheses (csrc/cuda/emulation.h defines both for the host compiler).
#define FUSEDOPT_LAUNCH(blocks, threads, stream, ...) __VA_ARGS__<<<blocks, threads, 0, stream>>>
#define FUSEDOPT_LAUNCH_SYNCING FUSEDOPT_LAUNCH
#endif

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/architectures.h"
#include "cuda/backend.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/staged.cuh"
#include "math/dynamic_map.h"
#include "math/registry.h"

namespace fusedopt {
namespace cuda {
namespace {

// cudaGetLastError also clears the error it returns (unless the context is lost for good).
void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt.cuda: launching ") + kernel +
                             " failed: " + cudaGetErrorString(error));
}

// A grid-stride loop covers what is past this many blocks; a million blocks of 64K elements is
// far beyond any device's memory anyway.
constexpr int64_t kMaxFlatBlocks = int64_t{1} << 20;

template <class T, class A>
void launch_flat(const PlanTensor& tensor, const typename A::Coefficients& c, cudaStream_t stream) {
  FlatArguments<typename A::Coefficients> args{};
  for (int k = 0; k < kMaxOperands; ++k) args.addresses[k] = tensor.addresses[k];
  args.size = tensor.size;
  args.flags = static_cast<uint8_t>((is_vectorizable(tensor) ? kVectorized : 0) |
                                    (tensor.write_grad ? kWriteGrad : 0));
  args.coefficients = c;
  const int64_t chunks = (tensor.size + kChunkElements - 1) / kChunkElements;
  const unsigned blocks = static_cast<unsigned>(chunks < kMaxFlatBlocks ? chunks : kMaxFlatBlocks);
  FUSEDOPT_LAUNCH(blocks, kThreadsPerBlock, stream, flat_kernel<T, A>)(args);
  check_launch("the flat-buffer kernel");
}

template <class T, class A>
void launch_batch(const LaunchBatch& batch,
                  const std::vector<typename A::Coefficients>& coefficients, cudaStream_t stream) {
  LaunchArguments<typename A::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  FUSEDOPT_LAUNCH(batch.metadata.num_blocks, kThreadsPerBlock, stream, multi_tensor_kernel<T, A>)
  (args);
  check_launch("the multi-tensor kernel");
}

void check(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    cudaGetLastError();  // not left to surface at the next step's launch check
    throw std::runtime_error(std::string("fusedopt.cuda: ") + call +
                             " failed: " + cudaGetErrorString(error));
  }
}

// A step's tables copied to the device through pinned memory. From pageable memory the runtime
// first waits for all the work queued on the stream (CUDA's "API synchronization behavior"):
// every step would wait for the backward pass before it could queue its kernels. Per device, a
// few pinned buffers, each grown as needed and written again only once the copy from it has
// completed (an event, asked without waiting; waited for only when all are in use). Where pinned
// memory cannot be had, the pageable copy.
class PinnedStaging {
 public:
  static void copy(void* to, const void* from, size_t bytes, cudaStream_t stream) {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    of_device(device).copy_here(to, from, bytes, stream);
  }

 private:
  static constexpr size_t kBuffers = 4;
  struct Buffer {
    void* host = nullptr;
    size_t capacity = 0;
    cudaEvent_t copied = nullptr;  // recorded after the last copy from it
  };

  static PinnedStaging& of_device(int device) {
    static std::mutex mutex;
    static std::map<int, PinnedStaging> per_device;
    const std::lock_guard<std::mutex> lock(mutex);
    return per_device[device];  // (std::map: references stay valid)
  }

  void copy_here(void* to, const void* from, size_t bytes, cudaStream_t stream) {
    const std::lock_guard<std::mutex> lock(mutex_);  // this device's only
    Buffer* free = nullptr;
    for (Buffer& b : buffers_)
      if (!b.copied || cudaEventQuery(b.copied) == cudaSuccess) {
        free = &b;
        break;
      }
    cudaGetLastError();  // (cudaErrorNotReady from the queries)
    if (!free) {         // all in use: the oldest, once its copy is done
      free = &buffers_[oldest_];
      check(cudaEventSynchronize(free->copied), "cudaEventSynchronize");
    }
    oldest_ = (static_cast<size_t>(free - buffers_) + 1) % kBuffers;
    if (!free->copied &&
        cudaEventCreateWithFlags(&free->copied, cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      free->copied = nullptr;
    }
    if (bytes > free->capacity) {
      if (free->host) cudaFreeHost(free->host);
      free->host = nullptr;
      free->capacity = 0;
      if (cudaHostAlloc(&free->host, bytes, cudaHostAllocPortable) == cudaSuccess) {
        free->capacity = bytes;
      } else {
        cudaGetLastError();
        free->host = nullptr;
      }
    }
    if (!free->host || !free->copied) {  // no pinned memory (or event): the pageable copy
      check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
      return;
    }
    std::memcpy(free->host, from, bytes);
    check(cudaMemcpyAsync(to, free->host, bytes, cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync");
    if (cudaEventRecord(free->copied, stream) != cudaSuccess) {
      // The copy is queued but not tracked: wait for it, so the buffer can be written again.
      cudaGetLastError();
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
  }

  std::mutex mutex_;
  Buffer buffers_[kBuffers];
  size_t oldest_ = 0;
};

template <class T, class A, class Kernel>
void launch_reducing(Kernel kernel, const LaunchBatch& batch,
                     const std::vector<typename A::Coefficients>& coefficients,
                     const std::vector<int64_t>& first_chunk, double* partials, const double* sums,
                     cudaStream_t stream) {
  ReducingArguments<typename A::Coefficients> args{};
  args.metadata = batch.metadata;
  for (int k = 0; k < batch.num_coefficient_sets; ++k)
    args.coefficients[k] = coefficients[batch.coefficient_ids[k]];
  for (int slot = 0; slot < batch.metadata.num_tensors; ++slot) {
    args.tensor_index[slot] = batch.tensor_index[slot];
    args.first_chunk[slot] = first_chunk[batch.tensor_index[slot]];
  }
  args.partials = partials;
  args.sums = sums;
  // reduce_kernel meets at __syncthreads (the emulation runs it on threads of its own).
  FUSEDOPT_LAUNCH_SYNCING(batch.metadata.num_blocks, kThreadsPerBlock, stream, kernel)(args);
  check_launch("a reducing kernel");
}

// The three launches of an algorithm with per-tensor reductions (multi_tensor.cuh), with their
// scratch memory allocated and freed in the stream's order.
template <class A>
void launch_reducing_step(const PreparedStep<A>& step, cudaStream_t stream) {
  constexpr int R = A::reductions;
  const std::vector<PlanTensor> tensors = plan_tensors(step.tensors, step.coefficient_of);
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    first_chunk[i + 1] = first_chunk[i] + (tensors[i].size + kChunkElements - 1) / kChunkElements;
  const int64_t chunks = first_chunk[n];
  if (chunks == 0) return;
  const size_t bytes = sizeof(double) * (chunks * R + n * R) + sizeof(int64_t) * (n + 1);
  void* scratch = nullptr;
  check(cudaMallocAsync(&scratch, bytes, stream), "cudaMallocAsync");
  double* partials = static_cast<double*>(scratch);
  double* sums = partials + chunks * R;
  auto* chunk_index = reinterpret_cast<int64_t*>(sums + n * R);
  const std::vector<LaunchBatch> plan = build_launch_plan(tensors);
  try {
    PinnedStaging::copy(chunk_index, first_chunk.data(), sizeof(int64_t) * (n + 1), stream);
    for (const LaunchBatch& batch : plan) {
      if (batch.element_bytes == 4)
        launch_reducing<float, A>(reduce_kernel<float, A>, batch, step.coefficients, first_chunk,
                                  partials, sums, stream);
      else
        launch_reducing<double, A>(reduce_kernel<double, A>, batch, step.coefficients, first_chunk,
                                   partials, sums, stream);
    }
    const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
    FUSEDOPT_LAUNCH(blocks, 256, stream, sum_chunks_kernel<R>)(partials, chunk_index, n, sums);
    check_launch("the per-tensor sums");
    for (const LaunchBatch& batch : plan) {
      if (batch.element_bytes == 4)
        launch_reducing<float, A>(finished_update_kernel<float, A>, batch, step.coefficients,
                                  first_chunk, partials, sums, stream);
      else
        launch_reducing<double, A>(finished_update_kernel<double, A>, batch, step.coefficients,
                                   first_chunk, partials, sums, stream);
    }
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

// Where the tables of a launch lie in one buffer, each on a 64-byte boundary.
struct TableLayout {
  static size_t rounded(size_t bytes) { return (bytes + 63) / 64 * 64; }
  size_t maps = 0, coefficients, keys, tensors, blocks, end;
  TableLayout(size_t coefficient_bytes, size_t num_sets, size_t num_tensors, size_t num_blocks)
      : coefficients(rounded(2 * 256 * sizeof(float))),
        keys(coefficients + rounded(coefficient_bytes)),
        tensors(keys + rounded(num_sets * sizeof(SetKeys))),
        blocks(tensors + rounded(num_tensors * sizeof(TableTensor))),
        end(blocks + num_blocks * sizeof(TableBlock)) {}

  // The tables that stay as long as the tensors do: the maps, the records, the blocks. `image`
  // is the buffer's image from its start.
  void write_tables(unsigned char* image, const std::vector<TableTensor>& table,
                    const std::vector<TableBlock>& chunks) const {
    std::memcpy(image + maps, kSignedDynamicMap, sizeof kSignedDynamicMap);
    std::memcpy(image + maps + sizeof kSignedDynamicMap, kUnsignedDynamicMap,
                sizeof kUnsignedDynamicMap);
    std::memcpy(image + tensors, table.data(), table.size() * sizeof(TableTensor));
    std::memcpy(image + blocks, chunks.data(), chunks.size() * sizeof(TableBlock));
  }

  // What each step changes: its coefficient structs and their keys. `image` is the buffer's
  // image from offset `origin` on.
  template <class Coefficients>
  void write_step(unsigned char* image, size_t origin, const std::vector<Coefficients>& c,
                  const std::vector<SetKeys>& step_keys) const {
    std::memcpy(image + (coefficients - origin), c.data(), c.size() * sizeof(Coefficients));
    std::memcpy(image + (keys - origin), step_keys.data(), step_keys.size() * sizeof(SetKeys));
  }
};

// The tables' arguments for a launch from `device`, laid out as `at`.
template <class Coefficients>
TableArguments<Coefficients> table_arguments(const unsigned char* device, const TableLayout& at) {
  TableArguments<Coefficients> args;
  args.maps = reinterpret_cast<const float*>(device + at.maps);
  args.coefficients = reinterpret_cast<const Coefficients*>(device + at.coefficients);
  args.keys = reinterpret_cast<const SetKeys*>(device + at.keys);
  args.tensors = reinterpret_cast<const TableTensor*>(device + at.tensors);
  args.blocks = reinterpret_cast<const TableBlock*>(device + at.blocks);
  return args;
}

template <class A>
void launch_table_kernel(const unsigned char* device, const TableLayout& at, size_t num_blocks,
                         cudaStream_t stream) {
  const auto args = table_arguments<typename A::Coefficients>(device, at);
  // The table kernel meets at __syncthreads (the emulation runs it on threads of its own).
  FUSEDOPT_LAUNCH_SYNCING(static_cast<unsigned>(num_blocks), kStagedThreads, stream,
                          table_kernel<A>)
  (args);
  check_launch("the table kernel");
}

// A step's tables for the table kernels, built per step: the records of the tensors `which` that
// have elements, their blocks (a tensor's in order), each one's first block, and their image
// (with the step's coefficients, keys and the dynamic maps) laid out as `at`.
struct StepTables {
  std::vector<TableTensor> tensors;
  std::vector<TableBlock> blocks;
  std::vector<int64_t> first_block{0};  // per tensor, then the end
  std::optional<TableLayout> at;
  std::vector<unsigned char> image;  // `at.end` bytes
};

template <class A>
StepTables step_tables(const PreparedStep<A>& step, const std::vector<size_t>& which) {
  StepTables tables;
  for (size_t i : which) {
    const TensorRef& t = step.tensors[i];
    if (t.size == 0) continue;
    if (t.staged() && t.dtype == Dtype::float64)
      throw std::invalid_argument("fusedopt.cuda: float64 params take float64 state only");
    tables.tensors.push_back(table_tensor(t, step.coefficient_of[i]));
    append_blocks(tables.tensors.back(), static_cast<int32_t>(tables.tensors.size() - 1),
                  tables.blocks);
    tables.first_block.push_back(static_cast<int64_t>(tables.blocks.size()));
  }
  if (tables.blocks.empty()) return tables;
  const std::vector<SetKeys> keys =
      set_keys(step.tensors, step.coefficient_of, step.coefficients.size());
  const TableLayout& at =
      tables.at.emplace(step.coefficients.size() * sizeof(typename A::Coefficients), keys.size(),
                        tables.tensors.size(), tables.blocks.size());
  tables.image.resize(at.end);
  at.write_tables(tables.image.data(), tables.tensors, tables.blocks);
  at.write_step(tables.image.data(), 0, step.coefficients, keys);
  return tables;
}

// The low-precision tensors of a step, in one launch of the table kernel: their tables, the
// coefficient structs and the dynamic maps copied into a scratch buffer first.
template <class A>
void launch_staged(const PreparedStep<A>& step, const std::vector<size_t>& staged,
                   cudaStream_t stream) {
  const StepTables tables = step_tables(step, staged);
  if (tables.blocks.empty()) return;
  const std::vector<unsigned char>& host = tables.image;
  void* scratch = nullptr;
  check(cudaMallocAsync(&scratch, host.size(), stream), "cudaMallocAsync");
  try {
    PinnedStaging::copy(scratch, host.data(), host.size(), stream);
    launch_table_kernel<A>(static_cast<unsigned char*>(scratch), *tables.at, tables.blocks.size(),
                           stream);
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

// A step of an algorithm with reductions that holds a low-precision tensor: its passes over the
// tables of every tensor (staged.cuh), with the per-block partial sums, the per-tensor sums and
// each tensor's first block in the scratch buffer after the tables.
template <class A>
void launch_reducing_tables(const PreparedStep<A>& step, cudaStream_t stream) {
  using Coefficients = typename A::Coefficients;
  constexpr int R = A::reductions;
  std::vector<size_t> every(step.tensors.size());
  std::iota(every.begin(), every.end(), size_t{0});
  const StepTables tables = step_tables(step, every);
  if (tables.blocks.empty()) return;
  const TableLayout& at = *tables.at;
  const size_t n = tables.tensors.size();
  const size_t first_at = TableLayout::rounded(at.end);
  const size_t partials_at = TableLayout::rounded(first_at + sizeof(int64_t) * (n + 1));
  const size_t sums_at = partials_at + sizeof(double) * tables.blocks.size() * R;
  std::vector<unsigned char> host(tables.image);  // the tables and first blocks, copied
  host.resize(partials_at);
  std::memcpy(host.data() + first_at, tables.first_block.data(), sizeof(int64_t) * (n + 1));
  void* scratch = nullptr;
  check(cudaMallocAsync(&scratch, sums_at + sizeof(double) * n * R, stream), "cudaMallocAsync");
  auto* device = static_cast<unsigned char*>(scratch);
  try {
    PinnedStaging::copy(scratch, host.data(), host.size(), stream);
    ReducingTableArguments<Coefficients> args;
    args.table = table_arguments<Coefficients>(device, at);
    args.partials = reinterpret_cast<double*>(device + partials_at);
    args.sums = reinterpret_cast<const double*>(device + sums_at);
    const auto num_blocks = static_cast<unsigned>(tables.blocks.size());
    // Both passes meet at __syncthreads (the emulation runs them on threads of its own).
    FUSEDOPT_LAUNCH_SYNCING(num_blocks, kStagedThreads, stream, table_reduce_kernel<A>)(args);
    check_launch("the tables' first pass");
    FUSEDOPT_LAUNCH(static_cast<unsigned>((n + 255) / 256), 256, stream, sum_chunks_kernel<R>)
    (args.partials, reinterpret_cast<const int64_t*>(device + first_at), static_cast<int64_t>(n),
     reinterpret_cast<double*>(device + sums_at));
    check_launch("the per-tensor sums");
    FUSEDOPT_LAUNCH_SYNCING(num_blocks, kStagedThreads, stream, table_finish_kernel<A>)(args);
    check_launch("the tables' second pass");
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check(cudaFreeAsync(scratch, stream), "cudaFreeAsync");
}

}  // namespace

template <class A>
void launch_step(const PreparedStep<A>& step, void* stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if constexpr (A::reductions > 0) {
    if (std::any_of(step.tensors.begin(), step.tensors.end(), std::mem_fn(&TensorRef::staged)))
      launch_reducing_tables(step, stream);
    else
      launch_reducing_step(step, stream);
    return;
  }
  std::vector<size_t> staged;       // low-precision tensors: the table kernel
  std::vector<PlanTensor> tensors;  // float32 and float64 tensors, planned below
  for (size_t i = 0; i < step.tensors.size(); ++i) {
    if (step.tensors[i].staged())
      staged.push_back(i);
    else
      tensors.push_back(plan_tensor(step.tensors[i], step.coefficient_of[i]));
  }
  if (!staged.empty()) launch_staged(step, staged, stream);
  // A dtype with a single non-empty tensor (one flat buffer for a whole model, say) takes the flat
  // kernel: one launch whatever its size, with no plan to build.
  std::vector<PlanTensor> planned;
  for (int element_bytes : {4, 8}) {
    std::vector<const PlanTensor*> of_dtype;
    for (const PlanTensor& t : tensors)
      if (t.element_bytes == element_bytes && t.size > 0) of_dtype.push_back(&t);
    if (of_dtype.size() == 1) {
      const PlanTensor& t = *of_dtype[0];
      const auto& c = step.coefficients[t.coefficient_id];
      if (element_bytes == 4)
        launch_flat<float, A>(t, c, stream);
      else
        launch_flat<double, A>(t, c, stream);
    } else {
      for (const PlanTensor* t : of_dtype) planned.push_back(*t);
    }
  }
  for (const LaunchBatch& batch : build_launch_plan(planned)) {
    if (batch.element_bytes == 4)
      launch_batch<float, A>(batch, step.coefficients, stream);
    else
      launch_batch<double, A>(batch, step.coefficients, stream);
  }
}

// ---- A registered plan's tables ------------------------------------------------------------

RegisteredTables::~RegisteredTables() {
  if (!device_ && !done_) return;
  try {
    DeviceGuard guard(device_id_);
    // Memory from cudaMallocAsync freed by cudaFree is taken as no longer in use, without a
    // wait: the last launch (maybe not started yet, behind its producers) must finish first.
    if (done_) cudaEventSynchronize(static_cast<cudaEvent_t>(done_));
    if (device_) cudaFree(device_);
    if (done_) cudaEventDestroy(static_cast<cudaEvent_t>(done_));
  } catch (...) {  // at exit, with the runtime gone: nothing left to free
  }
  cudaGetLastError();
}

template <class A>
void RegisteredTables::launch(const PreparedStep<A>& step, void* stream_handle) {
  if constexpr (A::reductions > 0) {
    launch_step(step, stream_handle);  // LAMB's three launches, its tables per step
    return;
  } else {
    using Coefficients = typename A::Coefficients;
    const auto stream = static_cast<cudaStream_t>(stream_handle);
    const size_t n = step.tensors.size();
    std::vector<TableTensor> tensors(n);
    for (size_t i = 0; i < n; ++i)
      tensors[i] = table_tensor(step.tensors[i], step.coefficient_of[i]);
    const std::vector<SetKeys> keys =
        set_keys(step.tensors, step.coefficient_of, step.coefficients.size());
    if (!done_) {  // first: every copy and launch of this plan is covered by it
      cudaEvent_t event = nullptr;
      check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
      done_ = event;
      check(cudaGetDevice(&device_id_), "cudaGetDevice");
    }
    const auto done = static_cast<cudaEvent_t>(done_);
    // The previous launch, maybe on another stream, reads the tables this one writes.
    check(cudaStreamWaitEvent(stream, done, 0), "cudaStreamWaitEvent");
    // After this step's last queued work: the next step's copies wait for it, the destructor
    // too. Where it cannot be recorded, the stream is waited for here instead.
    const auto settle = [&] {
      if (cudaEventRecord(done, stream) != cudaSuccess) {
        cudaGetLastError();
        cudaStreamSynchronize(stream);
        cudaGetLastError();
      }
    };
    try {
      bool same_blocks = device_ && tensors.size() == tensors_.size();
      for (size_t i = 0; same_blocks && i < n; ++i)
        same_blocks = tensors[i].size == tensors_[i].size;
      const size_t coefficient_bytes = step.coefficients.size() * sizeof(Coefficients);
      if (!same_blocks || coefficient_bytes > layout_coefficient_bytes_ ||
          keys.size() > layout_sets_) {
        // Built whole in a new buffer, with room for twice as many coefficient structs as this
        // step has (for a plan whose groups' steps diverge later); the members change once it is
        // in place.
        std::vector<TableBlock> blocks;
        for (size_t i = 0; i < n; ++i) append_blocks(tensors[i], static_cast<int32_t>(i), blocks);
        const size_t coefficient_room = 2 * coefficient_bytes, set_room = 2 * keys.size();
        const TableLayout at(coefficient_room, set_room, n, blocks.size());
        std::vector<unsigned char> host(at.end);
        at.write_tables(host.data(), tensors, blocks);
        void* fresh = nullptr;
        check(cudaMallocAsync(&fresh, host.size(), stream), "cudaMallocAsync");
        try {
          PinnedStaging::copy(fresh, host.data(), host.size(), stream);
        } catch (...) {
          cudaFreeAsync(fresh, stream);
          throw;
        }
        if (device_ && cudaFreeAsync(device_, stream) != cudaSuccess) cudaGetLastError();
        device_ = fresh;
        tensors_ = tensors;
        blocks_ = std::move(blocks);
        layout_coefficient_bytes_ = coefficient_room;
        layout_sets_ = set_room;
      } else {
        // Only the records that changed (a grad's address, a flag), as one copied range.
        size_t first = n, last = 0;
        for (size_t i = 0; i < n; ++i)
          if (std::memcmp(&tensors[i], &tensors_[i], sizeof(TableTensor)) != 0) {
            first = std::min(first, i);
            last = i + 1;
          }
        const TableLayout at(layout_coefficient_bytes_, layout_sets_, n, blocks_.size());
        if (first < last) {
          PinnedStaging::copy(
              static_cast<unsigned char*>(device_) + at.tensors + first * sizeof(TableTensor),
              tensors.data() + first, (last - first) * sizeof(TableTensor), stream);
          std::copy(tensors.begin() + first, tensors.begin() + last, tensors_.begin() + first);
        }
      }
      const TableLayout at(layout_coefficient_bytes_, layout_sets_, n, blocks_.size());
      // The step's coefficient structs and keys, side by side as the layout places them.
      std::vector<unsigned char> per_step(at.tensors - at.coefficients);
      at.write_step(per_step.data(), at.coefficients, step.coefficients, keys);
      PinnedStaging::copy(static_cast<unsigned char*>(device_) + at.coefficients, per_step.data(),
                          per_step.size(), stream);
      if (!blocks_.empty())
        launch_table_kernel<A>(static_cast<unsigned char*>(device_), at, blocks_.size(), stream);
    } catch (...) {
      settle();  // what was queued before the failure is covered too
      throw;
    }
    settle();  // launched: nothing after it may throw (the plan would undo a step that ran)
  }
}

#if !defined(FUSEDOPT_CUDA_EMULATION)  // emulated_runtime.cpp's says yes
bool kernels_run_on(int device, std::string* reason) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    if (reason) *reason = "cannot query CUDA device " + std::to_string(device);
    return false;
  }
  cudaError_t error = cudaSuccess;
  const ImagesFor images = images_for(FUSEDOPT_CUDA_ARCHITECTURES, major, minor);
  if (images == ImagesFor::machine_code) return true;
  if (images == ImagesFor::none) {
    error = cudaErrorNoKernelImageForDevice;
  } else {
    // PTX only, which the driver must be able to compile (it may be older than the toolkit's
    // PTX), or a list not read here: the runtime is asked, creating this device's context.
    int previous = -1;
    if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      cudaGetLastError();
      if (reason) *reason = "cannot select CUDA device " + std::to_string(device);
      return false;
    }
    // Asking for a kernel's attributes fails when the module has no image for this device.
    cudaFuncAttributes attributes{};
    error = cudaFuncGetAttributes(&attributes, flat_kernel<float, Algorithms::First>);
    cudaGetLastError();
    cudaSetDevice(previous);
    if (error == cudaSuccess) return true;
  }
  if (reason) {
    cudaDeviceProp properties{};
    cudaGetDeviceProperties(&properties, device);
    cudaGetLastError();
    *reason = std::string("fusedopt's CUDA kernels have no image for ") + properties.name +
              " (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
              "; this build serves " FUSEDOPT_CUDA_ARCHITECTURES "): " + cudaGetErrorString(error);
  }
  return false;
}
#endif

// Every registered algorithm's launch is compiled here, once, by this function's references to
// them (it has external linkage, so it and they are kept): the bindings (host code) call them.
template <class... A>
constexpr auto launches_of(AlgorithmList<A...>) {
  return std::make_tuple(&launch_step<A>..., &RegisteredTables::launch<A>...);
}
decltype(launches_of(Algorithms{})) registered_launches() { return launches_of(Algorithms{}); }

}  // namespace cuda
}  // namespace fusedopt
