"""Build and install fsam_fused.

The pure-Python package always installs. The compiled extension ``fsam_fused._C``
(csrc/) is added by the native backend's build logic in ``build_ext.py``; its
docstring lists the environment variables (FSAM_FUSED_NO_EXT, FSAM_FUSED_CUDA,
TORCH_CUDA_ARCH_LIST, MAX_JOBS).
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_ext  # noqa: E402

setup(
    packages=[
        "fsam_fused",
        "fsam_fused.backends",
        "fsam_fused.integrations",
        "fsam_fused.kernels",
        "fsam_fused.bench",
        "fsam_fused.bench.study",
    ],
    package_dir={"fsam_fused.kernels": "kernels", "fsam_fused.bench": "benchmarks"},
    ext_modules=build_ext.extensions(),
    cmdclass=build_ext.cmdclass(),
)
