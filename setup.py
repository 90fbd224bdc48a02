"""Build and install fsam_fused.

The pure-Python package always installs. The compiled extension ``fsam_fused._C``
(csrc/) is added by the native backend's build logic in ``build_ext.py``.
"""

from setuptools import setup

setup(
    packages=["fsam_fused", "fsam_fused.backends", "fsam_fused.kernels", "fsam_fused.bench"],
    package_dir={"fsam_fused.kernels": "kernels", "fsam_fused.bench": "benchmarks"},
)
