// Which instruction-set variant of the CPU kernels runs (cpu/dispatch.cpp), registered in its own op
// namespace (it is not a kernel, and fastdiv::* holds exactly the ops of csrc/ops.cpp):
//   torch.ops.fastdiv_build.cpu_capability()         the active variant: "default", "avx2" or "avx512"
//   torch.ops.fastdiv_build.cpu_capabilities()       the variants this build holds and this CPU can run
//   torch.ops.fastdiv_build.set_cpu_capability(name) switch variants (tests and benchmarks do)
// `python -m fastdiv info` prints them; FASTDIV_CPU_CAPABILITY sets the first choice.
#include <string>
#include <vector>

#include <torch/library.h>

#include "cpu/kernels.h"

namespace {

std::string cpu_capability() { return fastdiv::cpu::active_kernels().name; }

std::vector<std::string> cpu_capabilities() { return fastdiv::cpu::supported_capabilities(); }

void set_cpu_capability(const std::string& name) { fastdiv::cpu::set_capability(name); }

}  // namespace

TORCH_LIBRARY(fastdiv_build, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
  m.def("cpu_capabilities() -> str[]", &cpu_capabilities);
  m.def("set_cpu_capability(str name) -> ()", &set_cpu_capability);
}
