// The per-element F-SAM arithmetic of DESIGN.md section 1, shared by the CPU and CUDA
// kernels so that both compute bit-for-bit the same fp32 expression.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fsam_fused {

// Columns of the per-tensor coefficient table (fsam_fused/plan.py).
constexpr int kRho = 0;
constexpr int kSigma = 1;
constexpr int kLmbda = 2;
constexpr int kAdaptive = 3;
constexpr int kCoefColumns = 4;

// One tensor's row of the coefficient table, read once per tensor (or chunk).
struct TensorCoef {
  float rho;
  float sigma;
  float lmbda;
  bool adaptive;
};

C10_HOST_DEVICE inline TensorCoef read_coef(const float* coef, int64_t row) {
  const float* r = coef + row * kCoefColumns;
  return TensorCoef{r[kRho], r[kSigma], r[kLmbda], r[kAdaptive] != 0.0f};
}

// d = g - sigma * m, with the momentum from before this step's EMA update.
C10_HOST_DEVICE inline float direction(float g, float m, float sigma) {
  return g - sigma * m;
}

// (a * d)^2 with a = |p| when adaptive; |p|^2 == p * p, so no abs is needed.
C10_HOST_DEVICE inline float norm_term(float p, float d, bool adaptive) {
  const float ad = adaptive ? p * d : d;
  return ad * ad;
}

// The EMA takes the (unscaled) gradient, never d.
C10_HOST_DEVICE inline float ema(float m, float g, float lmbda) {
  return m * lmbda + g * (1.0f - lmbda);
}

// rho / (||d|| + eps), from the global squared norm, as the reference computes it.
C10_HOST_DEVICE inline float step_scale(float total_sq_norm, float rho, float eps) {
  return rho / (::sqrtf(total_sq_norm) + eps);
}

// p + (p * p if adaptive else 1) * d * scale, in the reference loop's order of operations.
C10_HOST_DEVICE inline float perturbed(float p, float d, float scale, bool adaptive) {
  const float weighted = adaptive ? (p * p) * d : d;
  return p + weighted * scale;
}

}  // namespace fsam_fused
