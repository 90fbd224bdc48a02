"""How setup.py builds the extension ``fsam_fused._C`` from csrc/.

The CPU ops are always built. The CUDA ops are added when the CUDA toolkit (nvcc) and a
CUDA build of torch are both present and their CUDA major versions agree, whether or not a
GPU is visible; a toolkit that fails to compile the sources fails the build, so CI sees it.
A toolkit whose major version differs from torch's (which torch's extension builder
refuses) gives a CPU-only build with a warning that says why.

Environment:
  FSAM_FUSED_NO_EXT=1    install pure Python (no extension; the torch/triton backends only).
  FSAM_FUSED_CUDA=0|1    force the CUDA ops off, or on (an error if they cannot be built).
  TORCH_CUDA_ARCH_LIST   CUDA targets, e.g. "8.0;8.9;9.0;10.0;12.0+PTX"; when unset and no
                         GPU is visible, DEFAULT_CUDA_ARCHS (a short list keeps CI builds quick).
  MAX_JOBS               parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# -fopenmp: at::parallel_for is OpenMP in torch's builds. -fno-wrapv undoes the -fwrapv
# that Python's CFLAGS bring: with wrapping signed indices GCC vectorises the norm's
# loop poorly (measured 2x slower).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-wrapv", "-ffp-contract=off"]
# --fmad=false here and -ffp-contract=off above: compilers may fuse a * b + c into one
# rounding (nvcc by default, GCC wherever the target has FMA, e.g. aarch64), and the CPU
# and CUDA kernels share one expression (csrc/fsam_math.h) so that both round alike. The
# step is bound by memory traffic, not arithmetic.
NVCC_FLAGS = ["-O3", "--fmad=false"]
# --exclude-libs,ALL: some toolchains link libstdc++ statically into every shared object (the
# H200 image's g++ finds only libstdc++.a). Unhidden, that second C++ runtime's data resolved
# to the copy torch loaded while its code stayed ours, and formatting a number into an error
# message crashed the process there (tests/test_build_link_flags.py). Hidden, the copy's code
# binds to its own data (weak template instances of our code stay exported, as they are without
# a static runtime); with a shared libstdc++ the flag changes nothing. GNU ld, gold and lld know it.
LINK_FLAGS = ["-fopenmp"] + (["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else [])


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    if value not in (None, "", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value or None


def _nvcc_release(cuda_home: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` under ``cuda_home``, or None if it cannot tell."""
    try:
        out = subprocess.run(
            [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=120
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match[1]}.{match[2]}" if match else None


def cuda_build_blocker() -> str | None:
    """Why the CUDA ops cannot be built in this environment, or None when they can."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    release = _nvcc_release(cpp_extension.CUDA_HOME)
    if release is None:
        return f"nvcc under {cpp_extension.CUDA_HOME} did not report its version"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (
            f"nvcc {release} (in {cpp_extension.CUDA_HOME}) and torch's CUDA {torch.version.cuda} "
            "differ in major version, which torch's extension builder refuses"
        )
    return None


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    forced = _flag("FSAM_FUSED_CUDA")
    if forced == "0":
        return False
    blocker = cuda_build_blocker()
    if blocker is None:
        return True
    if forced == "1":
        raise RuntimeError(
            f"FSAM_FUSED_CUDA=1 but the CUDA ops cannot be built: {blocker}. Install the CUDA toolkit "
            "matching torch (or point CUDA_HOME at it), or unset FSAM_FUSED_CUDA."
        )
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        print(
            f"fsam_fused: building the CPU ops only: {blocker}. The triton backend still runs on CUDA; "
            "set FSAM_FUSED_CUDA=1 to make this an error.",
            file=sys.stderr,
        )
    return False


def _cuda_arch_list() -> str:
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def _pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Include and library dirs for a toolkit that lacks what ATen and torch's link line need.

    ATen's CUDA headers include cuSPARSE/cuBLAS headers, and torch links ``-lcudart``;
    pip's nvidia wheels carry both, the runtime only as a versioned ``libcudart.so.N``,
    for which a link directory with an unversioned symlink is made under build/.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    include_dirs: list[str] = []
    library_dirs: list[str] = []
    # pip installs torch's nvidia wheels beside torch, which need not be this interpreter's
    # site-packages (a virtualenv that reaches a shared torch through a .pth file).
    site = Path(torch.__file__).resolve().parents[1] / "nvidia"
    toolkit = Path(CUDA_HOME)
    if not (toolkit / "include" / "cusparse.h").exists():
        include_dirs += [str(p.parent) for p in sorted(site.glob("*/include/cusparse.h"))]
    if not any((toolkit / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
        versioned = sorted(site.glob("*/lib/libcudart.so.*"))
        if versioned:
            link_dir = ROOT / "build" / "cudart_link"
            link_dir.mkdir(parents=True, exist_ok=True)
            link = link_dir / "libcudart.so"
            link.unlink(missing_ok=True)
            link.symlink_to(versioned[-1])
            library_dirs.append(str(link_dir))
    return include_dirs, library_dirs


def extensions() -> list:
    """The setuptools extensions to build (none with FSAM_FUSED_NO_EXT=1)."""
    if _flag("FSAM_FUSED_NO_EXT") == "1":
        return []
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/host/*.cpp"))
    if not _want_cuda():
        return [
            CppExtension(
                "fsam_fused._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS
            )
        ]
    archs = _cuda_arch_list()
    include_dirs, library_dirs = _pip_cuda_dirs()
    define = [("FSAM_FUSED_CUDA_ARCHS", f'"{archs}"')]
    return [
        CUDAExtension(
            "fsam_fused._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            define_macros=define,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]


def cmdclass() -> dict:
    """BuildExtension (ninja, torch's flags) when an extension is built."""
    if _flag("FSAM_FUSED_NO_EXT") == "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}
