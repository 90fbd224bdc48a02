import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.cases import CPU_BACKENDS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cuda_context_lost() -> bool:
    """Whether this process's CUDA context is poisoned (a sticky error such as an illegal address:
    every later CUDA call fails with it). Asked after a failed test only."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return False
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        return True
    return False


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.stash[_FAILED] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Under pytest-xdist (benchmarks/gpu_check.sh), a worker whose CUDA context a failed test
    # poisoned exits, and xdist replaces it: otherwise every later test in that worker fails the
    # same way. Only once the test's reports (its traceback) have gone to the controller, which
    # then also lists the test as the one the worker crashed in.
    yield
    if item.stash.get(_FAILED, False) and os.environ.get("PYTEST_XDIST_WORKER") and cuda_context_lost():
        os._exit(3)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend that runs on CPU tensors here: reference, native, torch, and triton in a
    process that interprets its kernels. A test narrows it with
    ``@pytest.mark.parametrize("backend", [...], indirect=True)``."""
    return request.param


@pytest.fixture
def two_threads():
    """At least two intra-op threads for the test, so that the native backend's host loops over a
    step's tensors share models of more than a few chunks of tensors with a helper thread
    (csrc/host/parallel_tensors.h), on a machine of any size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


# Hypothesis profiles (tests/test_properties.py): CI runs a fixed, derandomized set of examples, fewer
# in the process that interprets the Triton kernels (each program runs in Python there, ~10x slower);
# `--hypothesis-profile=fsam-thorough` searches long, freshly random, keeping failures to replay.
settings.register_profile(
    "fsam-ci",
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("fsam-ci-interpreted", parent=settings.get_profile("fsam-ci"), max_examples=25)
settings.register_profile(
    "fsam-thorough",
    parent=settings.get_profile("fsam-ci"),
    max_examples=2000,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
)
settings.load_profile("fsam-ci-interpreted" if os.environ.get("TRITON_INTERPRET") == "1" else "fsam-ci")
