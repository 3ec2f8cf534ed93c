// The CPU kernels compiled for the build's own target: the compiler's default (x86-64 without AVX on x86,
// NEON on aarch64), so they run on every CPU the library loads on.
#define FASTDIV_ISA isa_default
#define FASTDIV_ISA_NAME "default"
#define FASTDIV_ISA_VECTOR_BYTES 16  // register blocking: cpu/kernels/tile.h
#if defined(__aarch64__)
#define FASTDIV_ISA_VECTOR_REGISTERS 32  // NEON: v0-v31
#else
#define FASTDIV_ISA_VECTOR_REGISTERS 16
#endif
#include "cpu/kernels/variant.h"
