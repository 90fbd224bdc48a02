// A native plan's tensor lists, held on the C++ side: the three fsam_fused ops are called on
// them through the dispatcher with this step's gradients taken from a ParamScan, so a step
// converts no Python list of tensors (fsam_fused/backends/native.py). sq_norm and perturb_
// run their full argument checks once per scan generation; while the scan sees no change,
// the lists are what those checks passed (same tensors, same layouts), so later calls skip
// the per-tensor checks. On the CPU they also skip the dispatcher and the momentum, backup and
// gradient objects: the lists' addresses are kept (cpu::FlatLists) and only the gradients' are
// renewed, from the scan. Every call still reads each parameter as it is now and compares it
// with what was kept (another thread may re-point one between the step's calls; FSDP re-points
// them between the passes, before restore_), and checks and gathers everything again when one
// differs.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <utility>
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

  // Whether first_pass would run the kernels if `scan` saw no change (the kept CPU lists serve).
  bool first_pass_ready(const ParamScan& scan) const;

  // The first pass in one call, for a step with this one plan: the scan of `param_lists` (held by
  // `scan`), then, if it saw no change and first_pass_ready, sq_norm and perturb_ on the kept
  // lists with the squared norm they found. Unless Python ran during the scan (a gradient
  // subclass, a copy's dispatch: ParamScan::python_may_have_run), nothing ran in between, so the
  // parameters are as the scan saw them and are not read again, and the scan holds no gradient
  // (except its own copies); else they are compared with what was kept. Returns whether the scan
  // saw a change (then the caller re-plans, with a new scan), and the squared norm (fp32 0-dim) if
  // the pass ran; with (false, nullopt) the scan holds this step's gradients and the caller calls
  // sq_norm and perturb_ itself.
  std::pair<bool, std::optional<at::Tensor>> first_pass(
      ParamScan& scan,
      const pybind11::list& param_lists,
      const at::Tensor& coef,
      double eps,
      const std::optional<at::Tensor>& inv_scale) const;

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

  // The lists' addresses, taken after a full check at scan `kept_at_`, with what they were taken
  // from: each parameter's TensorImpl, shape and version counter, and the distinct version
  // counters of the momentum and backup views.
  // Kept only when each parameter is what the scan saw at that generation, so a later scan that
  // sees no change vouches for the kept lists (first_pass). A write on the kept lists bumps the
  // kept counters: those of the parameters as the scan or params_unchanged() just found them.
  struct Kept {
    cpu::FlatLists lists;
    std::vector<const c10::TensorImpl*> impls;
    std::vector<Geometry> geometry;
    std::vector<c10::VariableVersion> param_versions;
    std::vector<c10::VariableVersion> state_versions;
  };
  // The device of the lists: the backup's, which the optimizer allocates on its plan's device,
  // the device of every parameter of the plan.
  c10::Device device_ = c10::Device(c10::kCPU);
  bool on_cpu_ = false;
  mutable std::optional<Kept> kept_;
  mutable Checked kept_at_;
  void keep(const BorrowedTensors& params, const ParamScan& scan) const;
  // Whether the kept lists still describe `params`, as read now under the GIL (and were kept at
  // `scan`'s generation, unless null): another thread may have re-pointed a parameter since the
  // scan, while the step ran Python between its op calls.
  // Both read the parameters through their Python objects, without gathering them: a vector of
  // them per call would be an allocation of a size at which glibc's malloc first consolidates
  // every small block freed since (by the passes between the step's calls), about a millisecond.
  bool still_kept(const ParamScan* scan) const;
  bool params_unchanged() const;
  bool params_unchanged_in(size_t begin, size_t end) const;
  // Whether a call runs the CPU kernels on the kept lists rather than through the dispatcher.
  bool runs_flat() const;
  // The kept lists with this step's gradient addresses.
  const cpu::FlatLists& with_grads(const ParamScan& scan) const;

  // The parameters' Python objects, unpacked at each call: holding their C++ tensors would make
  // torch.utils.swap_tensors refuse them (see ParamScan::Entry). Momentum and backup are the
  // optimizer's own views, never handed to users.
  std::vector<pybind11::object> params_;
  std::vector<at::Tensor> momentum_;
  std::vector<at::Tensor> backup_;
  std::vector<int64_t> positions_;
};

}  // namespace fsam_fused::host
