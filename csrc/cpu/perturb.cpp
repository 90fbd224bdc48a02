// fsam_fused::perturb_ on the CPU: one pass per element writing backup, momentum and p.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../fsam_math.h"
#include "../tensor_lists.h"
#include "flat_walk.h"
#include "wide_vectors.h"

namespace fsam_fused::cpu {
namespace {

struct PieceArgs {
  void* p;
  const void* g;
  float* m;
  void* backup;
  int64_t n;
  TensorCoef coef;
  float scale;
  float inv_scale;
};

template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_ALWAYS_INLINE void perturb_piece(const PieceArgs& a) {
  T* __restrict p = static_cast<T*>(a.p);
  const T* __restrict g = static_cast<const T*>(a.g);
  float* __restrict m = a.m;
  T* __restrict backup = static_cast<T*>(a.backup);
  // The flags as constants, so the loop has no branch.
  const Normalisation t{Adaptive, a.coef.t.adaptive_eta, Fisher, a.coef.t.fisher_eta};
  for (int64_t i = 0; i < a.n; ++i) {
    const T old = p[i];
    backup[i] = old;
    const float grad = static_cast<float>(g[i]) * a.inv_scale;
    float d = grad;
    if constexpr (HasMomentum) {
      d = direction(grad, m[i], a.coef.sigma);
      m[i] = ema(m[i], grad, a.coef.lmbda);
    }
    p[i] = static_cast<T>(perturbed(static_cast<float>(old), grad, d, a.scale, t));
  }
}

// The loop compiled for baseline x86-64 and for AVX2 (wide_vectors.h).
template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_NOINLINE void perturb_piece_default(const PieceArgs& a) {
  perturb_piece<T, HasMomentum, Adaptive, Fisher>(a);
}

template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_NOINLINE FSAM_TARGET_AVX2 void perturb_piece_avx2(const PieceArgs& a) {
  perturb_piece<T, HasMomentum, Adaptive, Fisher>(a);
}

void perturb_piece_dispatch(at::ScalarType dtype, bool avx2, bool has_momentum, const PieceArgs& a) {
  dispatch_param_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    dispatch_bools(
        [&](auto wide, auto with_m, auto adaptive, auto fisher) {
          constexpr bool M = decltype(with_m)::value, A = decltype(adaptive)::value, F = decltype(fisher)::value;
          if constexpr (decltype(wide)::value) {
            perturb_piece_avx2<T, M, A, F>(a);
          } else {
            perturb_piece_default<T, M, A, F>(a);
          }
        },
        avx2, has_momentum, a.coef.t.adaptive, a.coef.t.fisher);
  });
}

void perturb_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    at::TensorList backup,
    const at::Tensor& coef,
    const at::Tensor& total_sq_norm,
    double eps,
    const std::optional<at::Tensor>& inv_scale) {
  check_perturb_args(params, grads, momentum, backup, coef, total_sq_norm, inv_scale);
  const float unscale = inv_scale.has_value() ? inv_scale->item<float>() : 1.0f;
  perturb_flat(
      FlatLists::of(params, grads, momentum, backup), coef.data_ptr<float>(), total_sq_norm.item<float>(),
      static_cast<float>(eps), unscale);
}

}  // namespace

void perturb_flat(const FlatLists& lists, const float* coef, float total_sq_norm, float eps, float inv_scale) {
  // A non-finite norm makes the step a no-op for p and m; the backup is still taken so
  // that restore_ stays unconditional.
  const bool step_ok = std::isfinite(total_sq_norm);
  const bool has_momentum = !lists.momentum.empty();
  const bool avx2 = use_avx2_kernels();
  at::parallel_for(0, lists.starts.back(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for_each_piece(lists.starts, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      lists.prefetch(i + kPrefetchAhead);
      const size_t elem = c10::elementSize(lists.dtypes[i]);
      char* p = lists.params[i] + lo * elem;
      char* b = lists.backup[i] + lo * elem;
      if (!step_ok) {
        std::memcpy(b, p, (hi - lo) * elem);
        return;
      }
      const TensorCoef c = read_coef(coef, static_cast<int64_t>(i));
      const PieceArgs a{
          p,
          lists.grads[i] + lo * elem,
          has_momentum ? lists.momentum[i] + lo : nullptr,
          b,
          hi - lo,
          c,
          step_scale(total_sq_norm, c.rho, eps),
          inv_scale};
      perturb_piece_dispatch(lists.dtypes[i], avx2, has_momentum, a);
    });
  });
}

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("perturb_", &perturb_);
}

}  // namespace fsam_fused::cpu
