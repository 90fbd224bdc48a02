"""Start the interpreted Triton tests in a process with TRITON_INTERPRET=1, and check availability.

See ``tests/test_triton_interpreted.py`` for why they need a process of their own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )


# A loop bound loaded from memory, as every kernel of the backend has. Triton 3.6's
# interpreter turns it into a Python int with int() of a 1-element array, which NumPy
# 2.4 and newer refuse; Triton 3.8 (CI) handles it, and so does 3.6 with NumPy < 2.4.
LOADED_LOOP_BOUND_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count_up(bound, out, B: tl.constexpr):
    for off in range(0, tl.load(bound), B):
        tl.store(out + off + tl.arange(0, B), 1.0)
out = torch.zeros(8)
count_up[(1,)](torch.tensor([8]), out, B=4)
assert out.sum() == 8
"""
INTERPRETER_NUMPY_CLASH = "only 0-dimensional arrays can be converted to Python scalars"


# The kernel tests, and the behaviour tests whose ``backend`` fixture includes triton in an
# interpreting process (tests/conftest.py); the 200-step training comparison is left to the
# compiled backends, the interpreter runs each program in Python.
INTERPRETED_MODULES = [
    "tests/test_triton_interpreted.py",
    "tests/test_semantics.py",
    "tests/test_nonfinite.py",
    "tests/test_grad_scaler.py",
    "tests/test_mixed_precision.py",
    "tests/test_parameter_swaps.py",
    "tests/test_step_lifecycle.py",
    "tests/test_sam_variants.py",
    "tests/test_invalidation.py",
    "tests/test_properties.py",
]
INTERPRETED_SELECTION = "triton and not 200_steps"


def test_triton_kernels_pass_their_tests_under_the_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets already: test_triton_interpreted.py runs in it directly")
    probe = _python(["-c", LOADED_LOOP_BOUND_PROBE], TRITON_INTERPRET="1")
    if probe.returncode != 0 and INTERPRETER_NUMPY_CLASH in probe.stderr:
        pytest.skip(
            "this Triton's interpreter cannot loop to a bound loaded from memory with this NumPy "
            "(Triton 3.6 needs NumPy < 2.4)"
        )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = _python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", *INTERPRETED_MODULES, "-k", INTERPRETED_SELECTION],
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[
        -2000:
    ]


def test_without_triton_the_backend_is_unavailable_with_a_hint():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import fsam_fused, torch\n"
        "assert 'triton' not in fsam_fused.available_backends()\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "try:\n"
        "    fsam_fused.FriendlySAM([p], torch.optim.SGD, lr=0.1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=triton was accepted without triton')\n"
    )
    result = _python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_triton_that_fails_to_load_leaves_the_package_usable():
    """Triton 3.2 without a GPU raised RuntimeError at import; that must not break fsam_fused."""
    script = (
        "import importlib.abc, sys\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fsam_fused.kernels':\n"
        "            raise RuntimeError('0 active drivers ([]). There should only be one.')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import warnings\n"
        "import fsam_fused, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert 'triton' not in fsam_fused.available_backends()\n"
        "assert any('triton backend failed to load' in str(w.message) for w in caught), caught\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "fsam_fused.FriendlySAM([p], torch.optim.SGD, lr=0.1)\n"
        "try:\n"
        "    fsam_fused.FriendlySAM([p], torch.optim.SGD, lr=0.1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert '0 active drivers' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=triton was accepted with a broken triton')\n"
    )
    result = _python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
