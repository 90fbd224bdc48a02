// A native plan's tensor lists, held on the C++ side: the three fsam_fused ops are called on
// them through the dispatcher with this step's gradients taken from a ParamScan, so a step
// converts no Python list of tensors (fsam_fused/backends/native.py). sq_norm and perturb_
// run their full argument checks once per scan generation; while the scan sees no change,
// the lists are what those checks passed (same tensors, same layouts), so later calls skip
// the per-tensor checks. On the CPU they also skip the tensor objects: the lists' addresses
// are kept (cpu::FlatLists) and only the gradients' are renewed, from the scan. restore_ runs
// after the second pass, when the parameters may have changed again (FSDP re-points them
// between passes): it compares each parameter with what the kept addresses were taken from,
// and checks and gathers everything again when one differs.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <vector>

#include "../cpu/flat_walk.h"
#include "param_scan.h"

namespace fsam_fused::host {

// Tensors borrowed from their owners (no reference count taken) for the length of one op call.
struct BorrowedTensors {
  std::vector<at::Tensor> tensors;
  BorrowedTensors() = default;
  BorrowedTensors(BorrowedTensors&&) = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors();
};

class NativeLists {
 public:
  // `positions[i]`: the scan position of the parameter params[i]. `momentum` is empty for SAM.
  NativeLists(
      std::vector<pybind11::object> params,
      std::vector<at::Tensor> momentum,
      std::vector<at::Tensor> backup,
      std::vector<int64_t> positions);

  at::Tensor sq_norm(const ParamScan& scan, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale) const;
  void perturb_(
      const ParamScan& scan,
      const at::Tensor& coef,
      const at::Tensor& total_sq_norm,
      double eps,
      const std::optional<at::Tensor>& inv_scale) const;
  void restore_() const;

 private:
  BorrowedTensors grads_of(const ParamScan& scan) const;
  BorrowedTensors params_now() const;

  // The (scan id, generation) at which each op last passed its full checks.
  struct Checked {
    uint64_t scan = 0;
    uint64_t generation = 0;
    bool current(const ParamScan& s) const {
      return scan == s.id() && generation == s.generation();
    }
    void record(const ParamScan& s) {
      scan = s.id();
      generation = s.generation();
    }
  };
  mutable Checked sq_norm_checked_;
  mutable Checked perturb_checked_;

  // The CPU lists' addresses, taken after a full check at scan `kept_`, with what they were
  // taken from: each parameter's TensorImpl and shape, and the version counters the ops bump.
  struct Kept {
    cpu::FlatLists lists;
    std::vector<const c10::TensorImpl*> impls;
    std::vector<Geometry> geometry;
    std::vector<c10::VariableVersion> param_versions;
    std::vector<c10::VariableVersion> state_versions;  // momentum and backup
  };
  bool on_cpu_ = false;
  mutable std::optional<Kept> kept_;
  mutable Checked kept_at_;
  // kept_, with this step's gradient addresses, when it serves `scan`; else nullptr.
  const cpu::FlatLists* kept_for(const ParamScan& scan) const;
  void keep(const BorrowedTensors& params, const ParamScan& scan) const;
  // Whether every parameter is still what kept_ was taken from (for restore_).
  bool params_unchanged(const BorrowedTensors& params) const;

  // The parameters' Python objects, unpacked at each call: holding their C++ tensors would make
  // torch.utils.swap_tensors refuse them (see ParamScan::Entry). Momentum and backup are the
  // optimizer's own views, never handed to users.
  std::vector<pybind11::object> params_;
  std::vector<at::Tensor> momentum_;
  std::vector<at::Tensor> backup_;
  std::vector<int64_t> positions_;
};

}  // namespace fsam_fused::host
