"""The end-to-end benchmark's variants, including SAM every k steps, on a tiny budget."""

import torch

from benchmarks.e2e import SAM_INTERVALS, run_e2e
from benchmarks.measure import Budget


def test_every_variant_is_timed_per_iteration():
    results = run_e2e(
        ["torch"], torch.device("cpu"), batch=2, budget=Budget(1, 1, 1, 0.0), progress=lambda m: None
    )
    names = [r.variant for r in results]
    assert names[:4] == ["sgd", "sam_reference", "fsam_reference", "fsam_torch"]
    assert names[4:] == [f"fsam_torch_every{k}" for k in SAM_INTERVALS]
    assert all(r.time.median > 0 and r.vs_sgd > 0 for r in results)
    assert all(r.vs_sam_reference is not None for r in results if r.variant.startswith("fsam_"))
