"""The installed extension holds the CUDA kernels whenever they could be built.

CI builds without a GPU; these tests make it fail when the CUDA sources stop compiling
(a build that silently dropped CUDA) or a requested target is missing.
"""

import os

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

from tests.cuda_targets import embedded_targets, find_cuobjdump, requested_targets

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

CUDA_BUILDABLE = (
    CUDA_HOME is not None and torch.version.cuda is not None and os.environ.get("FSAM_FUSED_CUDA") != "0"
)
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILDABLE, reason="no CUDA toolkit or CPU-only torch")


def test_cpu_kernels_are_registered():
    for op in ("sq_norm", "perturb_", "restore_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam_fused::{op}", "CPU")


@needs_cuda_build
def test_cuda_kernels_are_built_when_the_toolkit_is_present():
    assert _ops.has_cuda_kernels(), "nvcc and a CUDA torch are present but the extension has no CUDA kernels"
    for op in ("perturb_", "restore_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam_fused::{op}", "CUDA")
    assert _ops.cuda_arch_list


@needs_cuda_build
def test_extension_embeds_the_requested_cuda_targets():
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    want_elf, want_ptx = requested_targets(_ops.cuda_arch_list)
    assert want_elf, f"no numeric targets in {_ops.cuda_arch_list!r}"
    have_elf, have_ptx = embedded_targets(_ops._C.__file__, cuobjdump)
    assert want_elf <= have_elf, f"requested {sorted(want_elf)}, ELF code for {sorted(have_elf)}"
    assert want_ptx <= have_ptx, f"requested PTX for {sorted(want_ptx)}, found {sorted(have_ptx)}"


def test_requested_targets_parses_arch_lists():
    assert requested_targets("8.0;8.9 9.0a;12.0+PTX;Hopper") == (
        {"sm_80", "sm_89", "sm_90a", "sm_120"},
        {"sm_120"},
    )
