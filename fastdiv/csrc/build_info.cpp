// What the CPU kernels were compiled for, registered as torch.ops.fastdiv_build.cpu_capability() (its own
// namespace: it is not a kernel, and fastdiv::* holds exactly the ops of csrc/ops.cpp). `python -m
// fastdiv info` prints it. The answer comes from the compiler's predefined macros, so it is what the
// -march of this build really enabled, whichever way the build was made (setup.py, first-import
// compilation or CMake).
#include <string>

#include <torch/library.h>

namespace {

std::string cpu_capability() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return "AVX512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "AVX2";
#elif defined(__SSE4_2__)
  return "SSE4.2";
#elif defined(__x86_64__)
  return "x86-64 baseline (SSE2)";
#else
  return "non-x86 (compiler default)";
#endif
}

}  // namespace

TORCH_LIBRARY(fastdiv_build, m) { m.def("cpu_capability() -> str", &cpu_capability); }
