// The Python module `fsam_fused._C`. Importing it loads this library, which registers the
// ops (schemas in csrc/ops.cpp, reached through torch.ops.fsam_fused), and exposes the
// host-side step helpers that keep per-tensor work out of Python (ParamScan, NativeLists).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "native_lists.h"
#include "param_scan.h"
#include "step_flags.h"

#ifndef FSAM_FUSED_CUDA_ARCHS
#define FSAM_FUSED_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using fsam_fused::host::NativeLists;
using fsam_fused::host::ParamScan;

PYBIND11_MODULE(_C, m) {
  // The CUDA targets this build was compiled for ("" without CUDA), so tests and users can
  // check that a wheel holds what it was asked to, and Python can tell CUDA kernels exist.
  m.attr("cuda_arch_list") = FSAM_FUSED_CUDA_ARCHS;

  py::class_<ParamScan>(m, "ParamScan")
      .def(py::init<const py::list&>(), py::arg("param_lists"))
      // (Holding the gradients: a scan that keeps only their addresses is for a caller that uses
      // them within the same call, NativeLists::first_pass.)
      .def("scan", [](ParamScan& scan, const py::list& param_lists) { return scan.scan(param_lists); }, py::arg("param_lists"))
      .def("grads", &ParamScan::grads, py::arg("positions"))
      .def("grad_addresses", &ParamScan::grad_addresses_at, py::arg("positions"))
      .def("release", &ParamScan::release)
      .def("watch", &ParamScan::watch, py::arg("tensors"))
      .def_property_readonly("entries_observed", &ParamScan::entries_observed);
  m.def("zero_grads", &fsam_fused::host::zero_grads, py::arg("param_lists"));

  // The op calls keep the GIL: they borrow the parameters' tensors from their Python objects
  // (see NativeLists::params_now), and only a GIL holder can swap or free what those objects
  // hold (torch.utils.swap_tensors, p.data = ...). The CPU kernels' worker threads need no GIL.
  py::class_<NativeLists>(m, "NativeLists")
      .def(
          py::init<std::vector<py::object>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>>(),
          py::arg("params"),
          py::arg("momentum"),
          py::arg("backup"),
          py::arg("positions"))
      .def("sq_norm", &NativeLists::sq_norm)
      .def("perturb_", &NativeLists::perturb_)
      .def("restore_", &NativeLists::restore_)
      .def("first_pass_ready", &NativeLists::first_pass_ready)
      .def("first_pass", &NativeLists::first_pass);

  // A CPU step's coefficient table, flags and skipped-step count by plain loops (fsam_fused/step_flags.py).
  m.def(
      "gather_coef",
      &fsam_fused::host::gather_coef,
      py::arg("coef"),
      py::arg("table"),
      py::arg("group_of"),
      py::arg("seeded"),
      py::arg("slots"),
      py::arg("lmbda_column"),
      py::arg("zero_column") = py::none());
  m.def("finite_flags", &fsam_fused::host::finite_flags, py::arg("total"));
  m.def("mark_seeded", &fsam_fused::host::mark_seeded, py::arg("seeded"), py::arg("slots"), py::arg("step_ok"));
  m.def("add_flag", &fsam_fused::host::add_flag, py::arg("counter"), py::arg("flag"));
}
