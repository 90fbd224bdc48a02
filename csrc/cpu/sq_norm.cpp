// fsam_fused::sq_norm on the CPU.
//
// Deterministic whatever the thread count: the flat index space is cut into slices whose
// bounds depend only on the total size; each slice is summed by one thread in a fixed
// order (fp32 lanes over short inner blocks, each block added into a double), and the
// slice partials are added in slice order. The partials live on the stack.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>

#include "../fsam_math.h"
#include "../tensor_lists.h"
#include "flat_walk.h"
#include "wide_vectors.h"

namespace fsam_fused::cpu {
namespace {

constexpr int64_t kMaxSlices = 256;
constexpr int64_t kMinSlice = int64_t{1} << 15;
// Independent fp32 accumulators: enough for the compiler to fill vector registers
// without reassociating a single sum.
constexpr int kLanes = 16;
// Elements summed in fp32 before the block is added into the double total.
constexpr int64_t kInnerBlock = 4096;

struct PieceArgs {
  const void* p;
  const void* g;
  const float* m;
  int64_t n;
  float sigma;
  Normalisation t;
  float inv_scale;
};

template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_ALWAYS_INLINE double piece_sq_norm(const PieceArgs& a) {
  const T* __restrict p = static_cast<const T*>(a.p);
  const T* __restrict g = static_cast<const T*>(a.g);
  const float* __restrict m = a.m;
  // The flags as constants: the loop has no branch, and reads p only where adaptive.
  const Normalisation t{Adaptive, a.t.adaptive_eta, Fisher, a.t.fisher_eta};
  auto term = [&](int64_t i) C10_ALWAYS_INLINE_ATTRIBUTE {
    const float grad = static_cast<float>(g[i]) * a.inv_scale;
    const float d = direction(grad, HasMomentum ? m[i] : 0.0f, a.sigma);
    return norm_term(Adaptive ? static_cast<float>(p[i]) : 0.0f, grad, d, t);
  };
  double total = 0.0;
  for (int64_t start = 0; start < a.n; start += kInnerBlock) {
    const int64_t end = std::min(a.n, start + kInnerBlock);
    std::array<float, kLanes> lanes{};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        lanes[j] += term(i + j);
      }
    }
    float tail = 0.0f;
    for (; i < end; ++i) {
      tail += term(i);
    }
    double block = tail;
    for (float lane : lanes) {
      block += lane;
    }
    total += block;
  }
  return total;
}

// The loop compiled for baseline x86-64 and for AVX2 (wide_vectors.h).
template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_NOINLINE double piece_sq_norm_default(const PieceArgs& a) {
  return piece_sq_norm<T, HasMomentum, Adaptive, Fisher>(a);
}

template <typename T, bool HasMomentum, bool Adaptive, bool Fisher>
C10_NOINLINE FSAM_TARGET_AVX2 double piece_sq_norm_avx2(const PieceArgs& a) {
  return piece_sq_norm<T, HasMomentum, Adaptive, Fisher>(a);
}

double piece_sq_norm_dispatch(at::ScalarType dtype, bool avx2, bool has_momentum, const PieceArgs& a) {
  return dispatch_param_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    return dispatch_bools(
        [&](auto wide, auto with_m, auto adaptive, auto fisher) {
          constexpr bool M = decltype(with_m)::value, A = decltype(adaptive)::value, F = decltype(fisher)::value;
          if constexpr (decltype(wide)::value) {
            return piece_sq_norm_avx2<T, M, A, F>(a);
          } else {
            return piece_sq_norm_default<T, M, A, F>(a);
          }
        },
        avx2, has_momentum, a.t.adaptive, a.t.fisher);
  });
}

at::Tensor sq_norm(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum,
    const at::Tensor& coef,
    const std::optional<at::Tensor>& inv_scale) {
  check_sq_norm_args(params, grads, momentum, coef, inv_scale);
  const float unscale = inv_scale.has_value() ? inv_scale->item<float>() : 1.0f;
  const double sum = sq_norm_flat(FlatLists::of(params, grads, momentum, {}), coef.data_ptr<float>(), unscale);
  at::Tensor out = at::empty({}, coef.options());
  out.fill_(static_cast<float>(sum));
  return out;
}

}  // namespace

double sq_norm_flat(const FlatLists& lists, const float* coef, float inv_scale) {
  const std::vector<int64_t>& starts = lists.starts;
  const bool avx2 = use_avx2_kernels();
  const int64_t total = starts.back();
  const int64_t slices = std::clamp((total + kMinSlice - 1) / kMinSlice, int64_t{1}, kMaxSlices);
  const int64_t slice_len = (total + slices - 1) / slices;
  const bool has_momentum = !lists.momentum.empty();

  std::array<double, kMaxSlices> partials{};
  at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      double sum = 0.0;
      for_each_piece(starts, s * slice_len, std::min(total, (s + 1) * slice_len), [&](size_t i, int64_t lo, int64_t hi) {
        lists.prefetch(i + kPrefetchAhead);
        const TensorCoef c = read_coef(coef, static_cast<int64_t>(i));
        const size_t elem = c10::elementSize(lists.dtypes[i]);
        const PieceArgs a{
            lists.params[i] + lo * elem,
            lists.grads[i] + lo * elem,
            has_momentum ? lists.momentum[i] + lo : nullptr,
            hi - lo,
            c.sigma,
            c.t,
            inv_scale};
        sum += piece_sq_norm_dispatch(lists.dtypes[i], avx2, has_momentum, a);
      });
      partials[s] = sum;
    }
  });
  double sum = 0.0;
  for (int64_t s = 0; s < slices; ++s) {
    sum += partials[s];
  }
  return sum;
}

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("sq_norm", &sq_norm);
}

}  // namespace fsam_fused::cpu
