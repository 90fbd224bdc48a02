"""Triton kernels of the three F-SAM backend ops (DESIGN.md section 2), one op per module.

Installed as ``fsam_fused.kernels``. Each op works on a :class:`PlanArrays`: the
plan's tensors as an int64 address table plus a block map of fixed-size chunks, so one
launch per element type covers the whole model. The per-element arithmetic lives in
``fsam_math`` (the counterpart of csrc/fsam_math.h). Every kernel launches with one fixed
configuration (no autotuning, so no synchronisation on first use) and is compiled with fp
fusion off (``enable_fp_fusion=False``), so it rounds like the native build and the
interpreter: see ``common``.
"""

from .common import ELEMENT_TYPES, INTERPRETED
from .perturb import perturb_
from .plan_arrays import PlanArrays
from .restore import restore_
from .sq_norm import sq_norm

__all__ = ["ELEMENT_TYPES", "INTERPRETED", "PlanArrays", "perturb_", "restore_", "sq_norm"]
