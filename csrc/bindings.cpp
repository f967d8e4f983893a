// SPDX-License-Identifier: Apache-2.0
// The one entry point of kvcomp._C.
//
// Operators are registered with the torch dispatcher (TORCH_LIBRARY, namespace `kvcomp_C`), not
// bound through pybind11, because:
//  * torch.ops.kvcomp_C.* have schemas with mutation annotations, so torch.compile / CUDA graphs
//    can treat them as opaque custom ops (fake implementations are registered in kvcomp/_ext.py);
//  * the same op name dispatches to its CPU or CUDA implementation by the devices of its tensors;
//  * no tensor crosses pybind11, so the pip `pybind11` used here may differ from the copy bundled
//    in torch without any ABI coupling to torch_python.
// PYBIND11_MODULE only makes the shared object importable as `kvcomp._C` (importing it runs the
// registrations) and exposes build facts and the CPU ISA switch (cpu_isa.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "cpu_isa.h"
#include "kvcomp/host_mirror.h"

namespace kvcomp {
#ifdef KVCOMP_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Runs f, turning a c10 ValueError (bad KVCOMP_CPU_ISA / ISA name) into a Python ValueError.
template <typename F>
auto value_errors(F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
}
}  // namespace kvcomp

TORCH_LIBRARY(kvcomp_C, m) {
  m.def("gather_tokens(Tensor src, Tensor idx, Tensor(a!) out, Tensor? block_table=None) -> ()");
  m.def("scatter_tokens(Tensor(a!) cache, Tensor new_tokens, Tensor slots) -> ()");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor count, Tensor? block_table, "
      "float scale) -> Tensor");
#ifdef KVCOMP_WITH_CUDA
  m.def("gather_tokens_uva(Tensor src, Tensor idx, Tensor(a!) out, Tensor? block_table=None) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) {
  m.impl("gather_tokens", &kvcomp::gather_tokens_cpu);
  m.impl("scatter_tokens", &kvcomp::scatter_tokens_cpu);
  m.impl("sparse_attention", &kvcomp::sparse_attention_cpu);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvcomp native extension: operators live in torch.ops.kvcomp_C (see kvcomp/ops/host_mirror.py)";
  m.def("with_cuda", [] { return kvcomp::kWithCuda; }, "True when the CUDA operators were compiled in.");
  m.def(
      "build_info",
      [] {
        pybind11::dict d;
        d["torch"] = TORCH_VERSION;
        d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                        "." + std::to_string(PYBIND11_VERSION_PATCH);
        d["compiler"] = __VERSION__;
        d["cuda"] = kvcomp::kWithCuda;
        return d;
      },
      "Versions the extension was built against.");
  m.def(
      "cpu_isa",
      [] { return kvcomp::value_errors([] { return std::string(kvcomp::isa::name(kvcomp::isa::current())); }); },
      "The ISA the CPU kernels run with: 'generic', 'avx2' or 'avx512' (the best this CPU has, lowered by "
      "KVCOMP_CPU_ISA or set_cpu_isa).");
  m.def(
      "cpu_isas",
      [] {
        std::vector<std::string> out;
        for (int i = 0; i <= static_cast<int>(kvcomp::isa::detected()); ++i) {
          out.emplace_back(kvcomp::isa::name(static_cast<kvcomp::isa::CpuIsa>(i)));
        }
        return out;
      },
      "The ISAs this CPU can run, lowest first.");
  m.def(
      "set_cpu_isa", [](const std::string& name) { kvcomp::value_errors([&] { kvcomp::isa::set_current(name); }); },
      pybind11::arg("name"),
      "Runs the CPU kernels with `name` ('generic', 'avx2', 'avx512'; 'auto' = back to KVCOMP_CPU_ISA or the "
      "best the CPU has) from now on, process-wide. ValueError for an ISA this CPU lacks.");
}
