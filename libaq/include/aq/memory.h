// Memory instrumentation: what a device holds now and at its peak, an
// allocator setting for large batches, and a trace of where a step's memory
// goes.  Below everything else in libaq: it knows devices, not layers.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aq {

// Memory held on a device: the CUDA caching allocator's statistics, or on
// the CPU those of a counting wrapper around LibTorch's CPU allocator
// (install_cpu_memory_counter(); zeros until it is installed).
struct Memory {
  int64_t allocated = 0, peak = 0;
};
// Installs the CPU counter once per process (later calls do nothing); only
// allocations made after it are counted.
void install_cpu_memory_counter();
Memory memory(const c10::Device& device);
void reset_peak(const c10::Device& device);

// Whether e says an allocation failed: CUDA's OutOfMemoryError, the CPU
// allocator's failure (a plain c10::Error), or a cuDNN or cuBLAS workspace
// that could not be allocated.
bool is_out_of_memory(const c10::Error& e);
// e's message without its stack trace, on one line; for an allocation
// failure of the CPU allocator without the "[enforce fail at ...]" prefix.
std::string error_line(const c10::Error& e);

// Has LibTorch's CUDA caching allocator grow its segments in place
// (expandable_segments), unless PYTORCH_CUDA_ALLOC_CONF or
// PYTORCH_ALLOC_CONF already set that key (their other keys are kept).  At
// large batches compressed activations and the activation-size tensors of
// backward are allocated and freed in turn, and fixed segments end up with
// memory reserved in pieces too small for the next large tensor.  The tools
// call it for a CUDA device; a library user may too, before or after CUDA's
// first use (it applies to segments made from then on).  Returns whether
// expandable segments are on.
bool use_expandable_segments();

// Where a step's memory goes: each outermost operator, aq scope or
// autograd node (forward and backward, in the order they ran) with the
// memory allocated before it, the allocator's peak while it ran and what it
// left allocated.  Recorded between construction and destruction, through
// LibTorch's RecordFunction callbacks; one trace at a time.
struct OpMemory {
  std::string name;
  bool backward = false;
  int64_t before = 0, peak = 0, after = 0;
};
class OpMemoryTrace {
 public:
  explicit OpMemoryTrace(const c10::Device& device);
  ~OpMemoryTrace();
  OpMemoryTrace(const OpMemoryTrace&) = delete;
  OpMemoryTrace& operator=(const OpMemoryTrace&) = delete;
  std::vector<OpMemory> ops() const;

 private:
  uint64_t handle_ = 0;
};

}  // namespace aq
