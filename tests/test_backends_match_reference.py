"""Every available backend matches the reference loop over several steps, on every case."""

import zlib

import pytest
import torch

import fsam_fused
from tests.cases import CASE_IDS, CASES, assert_traces_close, run

CPU_BACKENDS = [b for b in fsam_fused.available_backends() if b not in ("reference", "triton")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backend_matches_reference_over_steps(case, dtype, backend):
    seed = zlib.crc32(f"{case.name}{dtype}{backend}".encode()) % 10_000
    expected = run(case, "reference", dtype=dtype, seed=seed)
    actual = run(case, backend, dtype=dtype, seed=seed)
    assert_traces_close(actual, expected, dtype)
