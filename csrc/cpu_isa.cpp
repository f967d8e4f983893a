// SPDX-License-Identifier: Apache-2.0
// The extension-wide CPU ISA choice (see cpu_isa.h): detection, the KVCOMP_CPU_ISA override and
// the setter kvcomp._C.set_cpu_isa.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>

namespace kvcomp::isa {
namespace {

constexpr const char* kNames[] = {"generic", "avx2", "avx512"};

std::optional<CpuIsa> parse(const std::string& s) {
  for (int i = 0; i < 3; ++i) {
    if (s == kNames[i]) return static_cast<CpuIsa>(i);
  }
  return std::nullopt;
}

CpuIsa detect() {
#ifdef KVCOMP_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? CpuIsa::avx512 : avx2 ? CpuIsa::avx2 : CpuIsa::generic;
#else
  return CpuIsa::generic;
#endif
}

// The default choice: KVCOMP_CPU_ISA (clamped to detected() with a warning), else detected().
// Throws on an unknown value; a throwing static initialiser runs again on the next call, so every
// kernel call raises until the variable is fixed.
CpuIsa from_env() {
  const CpuIsa best = detected();
  const char* env = std::getenv("KVCOMP_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::optional<CpuIsa> want = parse(env);
  TORCH_CHECK_VALUE(want.has_value(), "KVCOMP_CPU_ISA=", env, " is not one of generic, avx2, avx512");
  if (static_cast<int>(*want) > static_cast<int>(best)) {
    TORCH_WARN("KVCOMP_CPU_ISA=", env, " but this CPU supports at most ", name(best), ": running ", name(best),
               " kernels");
    return best;
  }
  return *want;
}

CpuIsa env_default() {
  static const CpuIsa isa = from_env();
  return isa;
}

std::atomic<int> g_override{-1};  // set_current(); -1: none

}  // namespace

const char* name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

CpuIsa detected() {
  static const CpuIsa isa = detect();
  return isa;
}

CpuIsa current() {
  const int o = g_override.load(std::memory_order_relaxed);
  return o >= 0 ? static_cast<CpuIsa>(o) : env_default();
}

void set_current(const std::string& s) {
  if (s == "auto") {
    g_override.store(-1);
    return;
  }
  const std::optional<CpuIsa> want = parse(s);
  TORCH_CHECK_VALUE(want.has_value(), "cpu isa must be one of generic, avx2, avx512, auto; got '", s, "'");
  TORCH_CHECK_VALUE(static_cast<int>(*want) <= static_cast<int>(detected()), "cpu isa '", s,
                    "' is not supported by this CPU (best: ", name(detected()), ")");
  g_override.store(static_cast<int>(*want));
}

}  // namespace kvcomp::isa
