"""Every available backend matches the reference loop over several steps, on every case."""

import zlib

import pytest
import torch

from tests.cases import CASE_IDS, CASES, CPU_FAST_BACKENDS, assert_traces_close, run


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backend_matches_reference_over_steps(case, dtype, backend):
    seed = zlib.crc32(f"{case.name}{dtype}{backend}".encode()) % 10_000
    expected = run(case, "reference", dtype=dtype, seed=seed)
    actual = run(case, backend, dtype=dtype, seed=seed)
    assert_traces_close(actual, expected, dtype)
