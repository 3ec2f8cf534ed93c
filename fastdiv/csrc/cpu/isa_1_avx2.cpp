// The CPU kernels compiled for AVX2 + FMA (the x86-64-v3 instruction set: 16 ymm registers), chosen at run
// time on CPUs that have it (cpu/dispatch.cpp). The pragma comes before every include so the whole
// translation unit, the kernels' inline helpers included, is compiled for it.
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define FASTDIV_ISA isa_avx2
#define FASTDIV_ISA_NAME "avx2"
#define FASTDIV_ISA_VECTOR_BYTES 32  // register blocking: cpu/kernels/tile.h
#define FASTDIV_ISA_VECTOR_REGISTERS 16
#include "cpu/kernels/variant.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
