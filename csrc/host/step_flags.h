// A CPU step's small bookkeeping (a plan's coefficient table, the finite-norm flags, the seeded
// flags, the skipped-step count), written by plain loops (fsam_fused/step_flags.py has the contract
// and the tensor-op twin that every other device and torch.compile use). The same work as tensor
// ops costs one dispatch each, about fourteen a step, and a dispatch after a forward and backward
// pass finds its code and tables out of cache: tens of microseconds each on the CPU, a millisecond
// a step, more than the loops over thousands of tensors.
//
// Each function returns false, having done nothing, where its loops may not stand in for the ops:
// a tensor that is not plain CPU memory (a subclass, a functional or batched wrapper, a view with
// a pending negation or conjugation), or a Python dispatch mode (a tracer, FakeTensorMode) that
// must see the ops. The caller then runs the ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fsam_fused::host {

// coef[i, :] = table[group_of[i], :], then coef[i, lmbda_column] *= seeded[slots[i]], and
// coef[i, zero_column] = 0 if given. coef: fp32 [n, C]; table: fp32 [groups, C]; group_of, slots:
// int64 [n]; seeded: fp32 [slots]. Out-of-range indexes raise.
bool gather_coef(
    const at::Tensor& coef,
    const at::Tensor& table,
    const at::Tensor& group_of,
    const at::Tensor& seeded,
    const at::Tensor& slots,
    int64_t lmbda_column,
    std::optional<int64_t> zero_column);

// `total` (a 0-d fp32 squared norm) checked for finiteness: a pair of new 0-d fp32 CPU tensors
// (step_ok, found_inf), 1 and 0 for a finite total, 0 and 1 otherwise; nullopt where the loops
// may not run.
std::optional<std::pair<at::Tensor, at::Tensor>> finite_flags(const at::Tensor& total);

// seeded[slots[i]] = max(seeded[slots[i]], step_ok) (step_ok: a 0-d fp32 flag on the CPU).
bool mark_seeded(const at::Tensor& seeded, const at::Tensor& slots, const at::Tensor& step_ok);

// counter += flag (both 0-d fp32 on the CPU): the count of skipped steps.
bool add_flag(const at::Tensor& counter, const at::Tensor& flag);

}  // namespace fsam_fused::host
