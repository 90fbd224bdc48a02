"""The native backend's host loops shared with a helper thread (csrc/host/parallel_tensors.h).

An unchanged step's scan of a model of many tensors runs the read-only loop shared with the
helper, and any change sends it to the full check of every entry; a process forked after such
steps still steps (its helper is its own: an OpenMP region here would hang a forked child).
What the steps compute is checked against the reference by tests/test_invalidation.py and
tests/test_kept_addresses.py on models of the same size.
"""

import os
import time

import pytest
import torch

from fsam_fused import FriendlySAM
from fsam_fused.scan import _compiled_scan_class
from tests.oracle import PlainSGD
from tests.warm_steps import random_grads, warm_up

pytestmark = pytest.mark.skipif(_compiled_scan_class() is None, reason="needs fsam_fused._C")

MANY = 600  # (more than the few chunks that one thread takes alone)


def _warm_model(n: int = MANY):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(n)]
    opt = FriendlySAM(params, PlainSGD, lr=0.05, rho=0.1, sigma=1.0, lmbda=0.6, backend="native")
    warm_up(opt, lambda: random_grads(params, gen))
    return params, opt, gen


def test_an_unchanged_step_scans_through_the_shared_loop(two_threads):
    params, opt, gen = _warm_model()
    opt.first_step()
    assert opt._planner.scan.entries_observed == 0


def test_a_change_in_the_last_chunk_is_seen_by_the_full_check(two_threads):
    params, opt, gen = _warm_model()
    scan = opt._planner.scan
    params[-1].grad = None  # the gradient set changed, in the last chunk
    opt.first_step()
    assert scan.entries_observed == MANY


def test_a_forked_child_steps_after_the_parent_shared_its_loops(two_threads):
    params, opt, gen = _warm_model()
    pid = os.fork()
    if pid == 0:  # the child: one more whole step, then out without running pytest's teardown
        code = 1
        try:
            opt.first_step()
            random_grads(params, gen)
            opt.second_step()
            code = 0 if opt._planner.scan.entries_observed == 0 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's step did not finish within 60 s")
