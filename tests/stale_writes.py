"""Shared check of the tests where a parameter gets a new storage during a step (another thread,
Python run inside the scan, a scan that raised): the native backend must not write the storage the
parameter no longer holds, and must leave the parameters as the reference backend does."""

import threading

import pytest
import torch


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
