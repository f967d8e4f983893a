// SPDX-License-Identifier: Apache-2.0
// Which vector instruction set the CPU kernels run with: one choice for the whole extension, made
// once (cpu_isa.cpp) instead of a __builtin_cpu_supports block per kernel file.
//
//  * generic: plain / `omp simd` loops compiled for the baseline target (any x86-64, or another CPU);
//  * avx2:    AVX2 + FMA + F16C (Haswell and later);
//  * avx512:  AVX-512 F/BW/VL/DQ + FMA + F16C (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later).
//
// Each kernel file compiles its loops once per ISA, in namespaces `generic`, `avx2`, `avx512`, the
// last two between KVCOMP_BEGIN_AVX2 / KVCOMP_BEGIN_AVX512 and KVCOMP_END_ISA (x86 + GCC/Clang only:
// KVCOMP_X86), and picks the namespace of current() on each call.
//
// current() is the best ISA the CPU has (detected once), lowered by the environment variable
// KVCOMP_CPU_ISA=generic|avx2|avx512 (read once, at the first kernel call) or by set_current()
// (kvcomp._C.set_cpu_isa, for tests and benchmarks). An ISA above what the CPU has is never run:
// the environment variable falls back to the best available with a warning (one setting can be
// shared by machines of different generations), set_current() raises a ValueError; an unknown
// name raises a ValueError either way.
#pragma once

#include <string>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define KVCOMP_X86 1
#define KVCOMP_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define KVCOMP_BEGIN_AVX512                    \
  _Pragma("GCC push_options")                  \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512\")")
#define KVCOMP_END_ISA _Pragma("GCC pop_options")
#endif

namespace kvcomp::isa {

enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

const char* name(CpuIsa isa);

// The best ISA this CPU (and this build) supports; detected on the first call.
CpuIsa detected();

// The ISA the kernels run with now (see above).
CpuIsa current();

// Sets current() to `name` ("generic", "avx2", "avx512"), or back to the default ("auto": the
// environment variable's choice, else detected()). ValueError for an unknown name or an ISA the
// CPU lacks.
void set_current(const std::string& name);

}  // namespace kvcomp::isa
