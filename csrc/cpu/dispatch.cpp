#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace fusedopt {
namespace cpu {

// Defined by each per-ISA compile of kernels.cpp.
const KernelTable& kernel_table_scalar();
#if defined(FUSEDOPT_HAVE_avx2)
const KernelTable& kernel_table_avx2();
#endif
#if defined(FUSEDOPT_HAVE_avx512)
const KernelTable& kernel_table_avx512();
#endif

namespace {

#if defined(__x86_64__) || defined(__i386__)
// XCR0 says which register states the OS saves on a context switch; a CPU that has AVX-512 but
// runs under an OS that does not save ZMM registers must not use it.
unsigned long long read_xcr0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
  bool avx512_bfloat16 = false;  // AVX512_BF16 (CPUID leaf 7, subleaf 1, EAX bit 5)
};

CpuFeatures detect_features() {
  CpuFeatures f;
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27);
  const bool avx = ecx & (1u << 28);
  const bool fma = ecx & (1u << 12);
  const bool f16c = ecx & (1u << 29);
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = read_xcr0();
  const bool os_saves_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_saves_zmm = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  f.avx2 = os_saves_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_saves_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  if (f.avx512 && eax >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx))
    f.avx512_bfloat16 = eax & (1u << 5);
  return f;
}

// Read once: the ISA list and the AVX512_BF16 flag below both come from here.
const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_features();
  return features;
}
#endif

struct IsaEntry {
  const char* name;
  const KernelTable& (*table)();
};

std::vector<IsaEntry> runnable_isas() {
  std::vector<IsaEntry> isas = {{"scalar", kernel_table_scalar}};
#if defined(__x86_64__) || defined(__i386__)
  const CpuFeatures& f = cpu_features();
#if defined(FUSEDOPT_HAVE_avx2)
  if (f.avx2) isas.push_back({"avx2", kernel_table_avx2});
#endif
#if defined(FUSEDOPT_HAVE_avx512)
  if (f.avx512) isas.push_back({"avx512", kernel_table_avx512});
#endif
#endif
  return isas;
}

const std::vector<IsaEntry>& isas() {
  static const std::vector<IsaEntry> detected = runnable_isas();
  return detected;
}

const KernelTable* find_table(const std::string& name) {
  for (const IsaEntry& isa : isas())
    if (name == isa.name) return &isa.table();
  return nullptr;
}

const KernelTable* initial_table() {
  if (const char* forced = std::getenv("FUSEDOPT_CPU_ISA"); forced && *forced) {
    if (const KernelTable* table = find_table(forced)) return table;
    // An unknown or unavailable request falls back to the best path rather than failing at
    // import; fusedopt.cpu_isa() reports what runs.
  }
  return &isas().back().table();
}

std::atomic<const KernelTable*>& active_table() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& isa : isas()) names.emplace_back(isa.name);
  return names;
}

std::string current_isa() { return active_table().load()->isa; }

void set_isa(const std::string& isa) {
  const KernelTable* table = find_table(isa);
  if (!table) {
    std::string known;
    for (const std::string& name : available_isas()) known += (known.empty() ? "" : ", ") + name;
    throw std::invalid_argument("isa: '" + isa +
                                "' is not available on this CPU (available: " + known + ")");
  }
  active_table().store(table);
}

const KernelTable& kernels() { return *active_table().load(); }

#if defined(__x86_64__) || defined(__i386__)
const bool avx512_bfloat16 = cpu_features().avx512_bfloat16;
#else
const bool avx512_bfloat16 = false;
#endif

}  // namespace cpu
}  // namespace fusedopt
