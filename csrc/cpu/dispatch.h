// Run-time choice of the kernel compile to use, from cpuid and XCR0.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"

namespace fusedopt {
namespace cpu {

// The ISAs this processor and OS can run, of those built, lowest first ("scalar", "avx2", ...).
std::vector<std::string> available_isas();
// The ISA in use: the best available, or FUSEDOPT_CPU_ISA when it names a lower one.
std::string current_isa();
// Switches the ISA for later calls; throws std::invalid_argument if it is not available.
void set_isa(const std::string& isa);
const KernelTable& kernels();
// Whether the CPU and OS run AVX-512 and its bfloat16 conversions (AVX512_BF16): the avx512
// kernels then round float32 to bfloat16 by vcvtneps2bf16 (csrc/cpu/kernels.cpp). Set at load by
// this file's initializer, which the ISA flags of the kernels' compiles never touch.
extern const bool avx512_bfloat16;

}  // namespace cpu
}  // namespace fusedopt
