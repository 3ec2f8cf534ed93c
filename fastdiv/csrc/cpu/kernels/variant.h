// One instruction-set variant of the CPU kernels: the kernel sources compiled into the namespace
// fastdiv::cpu::FASTDIV_ISA, and that variant's kernel_table(). Included once by each cpu/isa_*.cpp, after
// the target pragma that picks the instruction set, so every function of the variant (the kernels and
// tile.h's helpers) has its own symbol and no variant's code can replace another's at link time.
//
// What stays shared are inline functions of other headers (libstdc++, c10, head_math.h): each variant's
// translation unit emits its own copy and the linker keeps the first. The build lists isa_0_default.cpp
// before the other variants, so the copy kept is the default one, which every CPU can run;
// tests/test_cpu_dispatch.py checks the built library for AVX instructions outside the variants.
#pragma once

#if !defined(FASTDIV_ISA) || !defined(FASTDIV_ISA_NAME) || !defined(FASTDIV_ISA_VECTOR_BYTES) || \
    !defined(FASTDIV_ISA_VECTOR_REGISTERS)
#error "define FASTDIV_ISA (the variant's namespace), FASTDIV_ISA_NAME, FASTDIV_ISA_VECTOR_BYTES and FASTDIV_ISA_VECTOR_REGISTERS before including cpu/kernels/variant.h"
#endif

#include "cpu/kernels/eot.cpp"
#include "cpu/kernels/gram.cpp"
#include "cpu/kernels/rows.cpp"

namespace fastdiv::cpu::FASTDIV_ISA {

const KernelTable& kernel_table() {
  static const KernelTable table{FASTDIV_ISA_NAME,  &gram,         &gram_pullback,         &gram_loss,
                                 &concentration_stats, &normalize, &normalize_pullback, &column_stats,
                                 &column_stats_pullback, &eot_step};
  return table;
}

}  // namespace fastdiv::cpu::FASTDIV_ISA
