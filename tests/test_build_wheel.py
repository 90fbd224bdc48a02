"""A wheel built for two CUDA targets holds kernels for both.

Slow (a full CUDA build, minutes): marked ``slow``, so it runs with ``pytest -m slow``, as
CI's wheel job does.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import CUDA_HOME

from tests.cuda_targets import embedded_targets, find_cuobjdump

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CUDA_HOME is None or torch.version.cuda is None, reason="no CUDA toolkit"),
]


def test_wheel_for_two_targets_embeds_both(tmp_path):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.0;9.0", "FSAM_FUSED_CUDA": "1"}
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(ROOT)],
        env=env,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fsam_fused-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (library,) = [n for n in zf.namelist() if n.startswith("fsam_fused/_C") and n.endswith(".so")]
        zf.extract(library, tmp_path / "unpacked")
    elf, _ = embedded_targets(tmp_path / "unpacked" / library, cuobjdump)
    assert {"sm_80", "sm_90"} <= elf, f"wheel embeds {sorted(elf)}"
