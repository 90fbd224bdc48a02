"""Run a script from ``examples/`` in this process, as ``python examples/NAME.py ARGS`` would.

In-process, so that a test pays for importing a framework once, not once per script.
"""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` as ``__main__`` with ``args``; what it printed to stdout."""
    script = EXAMPLES / name
    out = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    return out.getvalue()
