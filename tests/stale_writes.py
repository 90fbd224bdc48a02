"""Shared checks of the tests where what a step reads or writes is replaced or freed during it
(by another thread, by Python run inside the scan, by a scan that raised): the native backend must
not write a storage a parameter no longer holds, must leave the parameters as the reference backend
does, and must not read or write memory freed meanwhile (run_in_own_process)."""

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

# What a script run by run_in_own_process starts with: ``n``, the size of a tensor whose memory is
# unmapped when freed; ``pause()``, which a script puts in the step; and
# ``while_another_thread(step, action)``, which runs ``step()`` while another thread, once the step
# has paused, runs ``action()`` (frees what the step must no longer read or write).
_THREAD_HARNESS = """
import threading
import torch
torch.set_num_threads(1)
n = 16_000_000  # 64 MB: allocated with mmap, so a block of n floats is unmapped when freed
_paused, _released = threading.Event(), threading.Event()
def pause():
    _paused.set()
    _released.wait(timeout=60)
def while_another_thread(step, action):
    def other():
        assert _paused.wait(timeout=60)
        action()
        _released.set()
    t = threading.Thread(target=other)
    t.start()
    step()
    t.join()
    assert _paused.is_set(), "the step did not pause"
"""


def run_in_own_process(script: str, path: str) -> None:
    """Runs ``script`` (its ``PATH`` replaced by ``path``) after _THREAD_HARNESS in a process of its
    own, from the repository root, and checks that it exits cleanly: where the script frees a large
    block (64 MB: unmapped when freed), a stale read or write of it crashes that process."""
    source = _THREAD_HARNESS + textwrap.dedent(script).replace("PATH", repr(path))
    done = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, f"the process exited with {done.returncode}: {done.stderr[-2000:]}"


def check_against_reference(run, path: str) -> None:
    """``run(backend, path, monkeypatch)`` returns (parameters seen, former storage, its values
    before); native must leave the former storage alone and see what the reference backend sees."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        expected, _, _ = run("reference", path, monkeypatch)
    with pytest.MonkeyPatch.context() as monkeypatch:
        actual, former, former_before = run("native", path, monkeypatch)
    written = int((former != former_before).sum())
    assert written == 0, f"the step wrote {written} elements of a storage the parameter no longer holds"
    torch.testing.assert_close(actual, expected)


def first_step_with_a_storage_replaced(params, opt, install_pause) -> tuple[torch.Tensor, ...]:
    """``opt.first_step`` while another thread runs ``params[0].data = params[0].data.clone()``, at
    the point where the step calls the ``pause`` that ``install_pause(pause)`` puts in it
    (``install_pause`` returns what takes it out): the step waits there without the GIL until the
    other thread is done, as it could in any torch op. Returns params[0] after the step, the storage
    it held before (kept alive here, so a stale write lands in it instead of freed memory) and that
    storage's values before the step."""
    in_step, replaced = threading.Event(), threading.Event()
    held = []

    def pause() -> None:
        in_step.set()
        assert replaced.wait(timeout=60)

    def other_thread() -> None:
        assert in_step.wait(timeout=60)
        held.append(params[0].data)
        params[0].data = params[0].data.clone()
        replaced.set()

    before = params[0].detach().clone()
    uninstall = install_pause(pause)
    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        opt.first_step(zero_grad=True)
    finally:
        uninstall()
        replaced.set()  # (whatever happened, the step does not wait on)
        thread.join()
    assert held, "the other thread did not run during the step"
    return params[0].detach().clone(), held[0], before
