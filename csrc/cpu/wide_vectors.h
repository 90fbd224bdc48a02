// The CPU kernels' AVX2 copies, chosen at run time.
//
// The build targets baseline x86-64 (SSE2: 4 floats per vector), so that a wheel runs on any
// x86-64 CPU. Each elementwise kernel is also compiled for AVX2 (FSAM_TARGET_AVX2, 8 floats
// per vector) and runs that copy where the CPU has AVX2. With few cores the step is not bound
// by memory alone: the AVX2 copies take 1.4-10% off an fp32 step and 6-20% off a bf16 step on
// a 2-core Zen 3 (README, Performance), the most where Fisher SAM divides once per element.
//
// Both copies give bit for bit the same results: the AVX2 target does not include FMA (and
// -ffp-contract=off forbids contraction anyway), every lane does the IEEE fp32 operation
// the scalar code does, and sums are kept in explicit lanes (sq_norm.cpp) or added in
// order, so a wider vector reorders no addition. tests/test_cpu_capability.py checks it.
//
// FSAM_FUSED_CPU_CAPABILITY=default runs the baseline copies (as PyTorch's
// ATEN_CPU_CAPABILITY=default does for its own kernels); unset or "avx2", the best the CPU has.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FSAM_TARGET_AVX2 __attribute__((target("avx2")))
#define FSAM_HAVE_AVX2_KERNELS 1
#else
#define FSAM_TARGET_AVX2
#define FSAM_HAVE_AVX2_KERNELS 0
#endif

namespace fsam_fused::cpu {

// Whether the kernels run their AVX2 copies. Read at each op call (a getenv, once per op,
// not per element), so that a test can compare both copies in one process.
inline bool use_avx2_kernels() {
  const char* requested = std::getenv("FSAM_FUSED_CPU_CAPABILITY");
  const bool best = requested == nullptr || *requested == '\0' || std::strcmp(requested, "avx2") == 0;
  TORCH_CHECK(
      best || std::strcmp(requested, "default") == 0,
      "FSAM_FUSED_CPU_CAPABILITY=", requested, " is not a capability: use default or avx2 (or unset it)");
#if FSAM_HAVE_AVX2_KERNELS
  return best && __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

}  // namespace fsam_fused::cpu
