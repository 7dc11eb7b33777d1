// Runtime CPU dispatch for hand-written CPU loops (the build uses no -march flag): a function marked
// NTK_CPU_CLONES is compiled for AVX-512, AVX2+FMA and the baseline, and the loader picks the best one for the
// running CPU (GCC's target_clones; a no-op elsewhere).  Templates cannot carry the attribute: mark plain
// wrappers (one per scalar type) and keep the template NTK_ALWAYS_INLINE so it is compiled inside each clone.
#pragma once

#define NTK_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NTK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NTK_CPU_CLONES
#endif
