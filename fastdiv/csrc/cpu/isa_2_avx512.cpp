// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ, CD: the x86-64-v4 instruction set, 32 zmm
// registers, full-width 512-bit vectors), chosen at run time on CPUs that have it (cpu/dispatch.cpp). The
// pragma comes before every include so the whole translation unit is compiled for it.
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(                                                                           \
    __attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd"))), \
    apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd")
#pragma GCC target("prefer-vector-width=512")
#endif
#define FASTDIV_ISA isa_avx512
#define FASTDIV_ISA_NAME "avx512"
#define FASTDIV_ISA_VECTOR_BYTES 64  // register blocking: cpu/kernels/tile.h
#define FASTDIV_ISA_VECTOR_REGISTERS 32
#include "cpu/kernels/variant.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
