#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace flexkd::cpu {
namespace {

struct Variant {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

bool always() { return true; }

#if FLEXKD_CPU_X86_VARIANTS
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#endif

const std::vector<Variant>& variants() {
  static const std::vector<Variant> all = {
      {"baseline", &baseline_kernels, &always},
#if FLEXKD_CPU_X86_VARIANTS
      {"avx2", &avx2_kernels, &has_avx2},
      {"avx512", &avx512_kernels, &has_avx512},
#endif
  };
  return all;
}

const Variant* find_supported(const std::string& name) {
  for (const Variant& v : variants()) {
    if (name == v.name && v.supported()) return &v;
  }
  return nullptr;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

const KernelTable* initial_kernels() {
  if (const char* requested = std::getenv("FLEXKD_CPU_ISA"); requested && *requested) {
    if (const Variant* v = find_supported(requested)) return &v->table();
    TORCH_WARN("FLEXKD_CPU_ISA=", requested, " is not one of the variants this CPU can run (",
               join(supported_isas()), "); using the widest one");
  }
  const Variant* best = &variants().front();
  for (const Variant& v : variants()) {
    if (v.supported()) best = &v;
  }
  return &best->table();
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{initial_kernels()};
  return table;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const Variant& v : variants()) names.emplace_back(v.name);
  return names;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Variant& v : variants()) {
    if (v.supported()) names.emplace_back(v.name);
  }
  return names;
}

const KernelTable& active_kernels() { return *active().load(std::memory_order_acquire); }

void set_active_isa(const std::string& name) {
  const Variant* v = find_supported(name);
  TORCH_CHECK_VALUE(v != nullptr, "isa must be one of the variants this CPU can run (",
                    join(supported_isas()), "), got '", name, "'");
  active().store(&v->table(), std::memory_order_release);
}

}  // namespace flexkd::cpu
