"""The installed extension holds the CUDA kernels whenever they could be built.

CI builds without a GPU; these tests make it fail when the CUDA sources stop compiling
(a build that silently dropped CUDA) or a requested target is missing.
"""

import os

import pytest
import torch
from torch.utils import cpp_extension

import build_ext
from tests.cuda_targets import embedded_targets, find_cuobjdump, requested_targets, wide_access_kernels

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

# The build's own rule, so the two cannot disagree on whether CUDA should be inside.
BLOCKER = "FSAM_FUSED_CUDA=0" if os.environ.get("FSAM_FUSED_CUDA") == "0" else build_ext.cuda_build_blocker()
needs_cuda_build = pytest.mark.skipif(BLOCKER is not None, reason=f"CUDA ops not buildable here: {BLOCKER}")


def test_cpu_kernels_are_registered():
    for op in ("sq_norm", "perturb_", "restore_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam_fused::{op}", "CPU")


def test_has_cuda_kernels_agrees_with_the_dispatcher():
    """has_cuda_kernels() reads the build's record of CUDA targets; the dispatcher must agree."""
    for op in ("sq_norm", "perturb_", "restore_"):
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam_fused::{op}", "CUDA")
        assert _ops.has_cuda_kernels() == registered, (op, _ops.cuda_arch_list)


@needs_cuda_build
def test_cuda_kernels_are_built_when_the_toolkit_is_present():
    assert _ops.has_cuda_kernels(), "nvcc and a CUDA torch are present but the extension has no CUDA kernels"
    for op in ("perturb_", "restore_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fsam_fused::{op}", "CUDA")
    assert _ops.cuda_arch_list


@pytest.fixture
def cuobjdump() -> str:
    found = find_cuobjdump()
    if found is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    return found


@needs_cuda_build
def test_extension_embeds_the_requested_cuda_targets(cuobjdump):
    want_elf, want_ptx = requested_targets(_ops.cuda_arch_list)
    assert want_elf, f"no numeric targets in {_ops.cuda_arch_list!r}"
    have_elf, have_ptx = embedded_targets(_ops._C.__file__, cuobjdump)
    assert want_elf <= have_elf, f"requested {sorted(want_elf)}, ELF code for {sorted(have_elf)}"
    assert want_ptx <= have_ptx, f"requested PTX for {sorted(want_ptx)}, found {sorted(have_ptx)}"


@needs_cuda_build
def test_cuda_kernels_read_and_write_with_16_byte_accesses(cuobjdump):
    """Every streaming kernel has its vector path in the machine code (the scalar tail is there too)."""
    want_elf, _ = requested_targets(_ops.cuda_arch_list)
    arch = max(want_elf)
    kernels = wide_access_kernels(_ops._C.__file__, cuobjdump, arch)
    expected = {"chunk_sq_norm_kernel": {"LDG.E.128"}, "perturb_kernel": {"LDG.E.128", "STG.E.128"}}
    expected["restore_kernel"] = {"LDG.E.128", "STG.E.128"}
    for family, accesses in expected.items():
        found = {name: got for name, got in kernels.items() if family in name}
        assert found, f"no {family} in the {arch} code"
        for name, got in found.items():
            assert accesses <= got, f"{name} ({arch}) lacks {accesses - got}"


def test_requested_targets_parses_arch_lists():
    assert requested_targets("8.0;8.9 9.0a;12.0+PTX;Hopper") == (
        {"sm_80", "sm_89", "sm_90a", "sm_120"},
        {"sm_120"},
    )


@pytest.fixture
def cuda_torch_with_toolkit(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("FSAM_FUSED_CUDA", raising=False)


def test_toolkit_of_another_major_version_builds_cpu_only_and_says_why(
    cuda_torch_with_toolkit, monkeypatch, capsys
):
    monkeypatch.setattr(build_ext, "_nvcc_release", lambda home: "12.4")
    assert "nvcc 12.4" in build_ext.cuda_build_blocker() and "13.0" in build_ext.cuda_build_blocker()
    assert build_ext._want_cuda() is False
    assert "building the CPU ops only" in capsys.readouterr().err
    monkeypatch.setenv("FSAM_FUSED_CUDA", "1")
    with pytest.raises(RuntimeError, match="FSAM_FUSED_CUDA=1 but the CUDA ops cannot be built: nvcc 12.4"):
        build_ext._want_cuda()


def test_toolkit_of_the_same_major_version_builds_cuda(cuda_torch_with_toolkit, monkeypatch):
    monkeypatch.setattr(build_ext, "_nvcc_release", lambda home: "13.2")
    assert build_ext.cuda_build_blocker() is None
    assert build_ext._want_cuda() is True
    monkeypatch.setenv("FSAM_FUSED_CUDA", "0")
    assert build_ext._want_cuda() is False


def test_toolkit_whose_version_cannot_be_read_builds_cpu_only_and_says_why(
    cuda_torch_with_toolkit, monkeypatch, capsys
):
    monkeypatch.setattr(build_ext, "_nvcc_release", lambda home: None)
    assert build_ext._want_cuda() is False
    assert "did not report its version" in capsys.readouterr().err
