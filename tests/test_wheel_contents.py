"""A wheel holds every subpackage of ``fsam_fused/`` (setup.py lists them by hand).

Built without the extension (``FSAM_FUSED_NO_EXT=1``), which takes seconds, from a copy of
the tree without ``build/``: setuptools would otherwise package what an earlier build left there.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns("build", "dist", ".git", "*.so", "*.egg-info", "__pycache__")


def test_pure_python_wheel_holds_every_subpackage(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    env = dict(os.environ, FSAM_FUSED_NO_EXT="1")
    subprocess.run([*command, "-w", str(tmp_path), str(source)], env=env, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fsam_fused-*.whl")
    packaged = {
        Path(name).parent for name in zipfile.ZipFile(wheel).namelist() if name.endswith("__init__.py")
    }
    packages = {init.parent.relative_to(ROOT) for init in (ROOT / "fsam_fused").rglob("__init__.py")}
    assert packages <= packaged, f"setup.py does not package {sorted(map(str, packages - packaged))}"
