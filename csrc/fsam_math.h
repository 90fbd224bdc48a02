// The per-element F-SAM arithmetic of DESIGN.md section 1, shared by the CPU and CUDA
// kernels so that both compute bit-for-bit the same fp32 expression.
//
// The perturbation is the general form of the paper's appendix A4,
//   e = rho * T^2 d / ||T d||,   T^2 = a^2 / f,
//   a = |p| + adaptive_eta if adaptive (ASAM) else 1,
//   f = 1 + fisher_eta * g^2 (Fisher SAM's diagonal, from the raw gradient g, never d).
// With adaptive_eta = fisher_eta = 0 every result is bit for bit the one of plain F-SAM/ASAM:
// |p| * |p| == p * p, |p| + 0 == |p|, and the Fisher division is skipped altogether.
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
constexpr int kAdaptiveEta = 4;
constexpr int kFisherEta = 5;
constexpr int kCoefColumns = 6;

// A tensor's normalisation operator T (see above). `fisher` is fisher_eta != 0: kernels
// branch on it (or instantiate on it) so that plain SAM pays for no division.
struct Normalisation {
  bool adaptive;
  float adaptive_eta;
  bool fisher;
  float fisher_eta;
};

// One tensor's row of the coefficient table, read once per tensor (or chunk).
struct TensorCoef {
  float rho;
  float sigma;
  float lmbda;
  Normalisation t;
};

C10_HOST_DEVICE inline TensorCoef read_coef(const float* coef, int64_t row) {
  const float* r = coef + row * kCoefColumns;
  const Normalisation t{r[kAdaptive] != 0.0f, r[kAdaptiveEta], r[kFisherEta] != 0.0f, r[kFisherEta]};
  return TensorCoef{r[kRho], r[kSigma], r[kLmbda], t};
}

// d = g - sigma * m, with the momentum from before this step's EMA update.
C10_HOST_DEVICE inline float direction(float g, float m, float sigma) {
  return g - sigma * m;
}

// The EMA takes the (unscaled) gradient, never d.
C10_HOST_DEVICE inline float ema(float m, float g, float lmbda) {
  return m * lmbda + g * (1.0f - lmbda);
}

// ASAM's weight a = |p| + adaptive_eta (used only where adaptive).
C10_HOST_DEVICE inline float adaptive_weight(float p, float adaptive_eta) {
  return ::fabsf(p) + adaptive_eta;
}

// x / f with Fisher SAM's diagonal f = 1 + fisher_eta * g^2 where fisher, else x untouched.
C10_HOST_DEVICE inline float fisher_divided(float x, float g, const Normalisation& t) {
  return t.fisher ? x / (1.0f + t.fisher_eta * g * g) : x;
}

// (T d)^2 = (a * d)^2 / f.
C10_HOST_DEVICE inline float norm_term(float p, float g, float d, const Normalisation& t) {
  const float ad = t.adaptive ? adaptive_weight(p, t.adaptive_eta) * d : d;
  return fisher_divided(ad * ad, g, t);
}

// rho / (||T d|| + eps), from the global squared norm, as the reference computes it.
C10_HOST_DEVICE inline float step_scale(float total_sq_norm, float rho, float eps) {
  return rho / (::sqrtf(total_sq_norm) + eps);
}

// p + (T^2 d) * scale, with T^2 d = ((a * a) * d) / f in the reference loop's order of operations.
C10_HOST_DEVICE inline float perturbed(float p, float g, float d, float scale, const Normalisation& t) {
  float weighted = d;
  if (t.adaptive) {
    const float a = adaptive_weight(p, t.adaptive_eta);
    weighted = (a * a) * d;
  }
  return p + fisher_divided(weighted, g, t) * scale;
}

}  // namespace fsam_fused
