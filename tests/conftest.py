import pytest
import torch

from tests.cases import CPU_BACKENDS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend that runs on CPU tensors here: reference, native, torch, and triton in a
    process that interprets its kernels. A test narrows it with
    ``@pytest.mark.parametrize("backend", [...], indirect=True)``."""
    return request.param
