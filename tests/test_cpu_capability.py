"""The CPU kernels' AVX2 copies give bit for bit what their baseline x86-64 copies give
(csrc/cpu/wide_vectors.h), and FSAM_FUSED_CPU_CAPABILITY chooses between them."""

from __future__ import annotations

import pytest
import torch

from tests.op_oracle import DTYPES, SHAPE_SETS, VARIANTS, Lists, assert_bits_equal, seeded_lists

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

CAPABILITY = "FSAM_FUSED_CPU_CAPABILITY"
# Odd widths and whole vectors of either width, channels_last, and sizes across sq_norm's
# 4096-element fp32 blocks and its 32768-element slices (more than one slice per tensor).
SHAPES = [*SHAPE_SETS["vector_widths"], *SHAPE_SETS["channels_last"], (3 * 4096 + 13,), (70_001,)]


def _step(lists: Lists, capability: str, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """sq_norm, then perturb_ with its total, run by the kernels ``capability`` names."""
    monkeypatch.setenv(CAPABILITY, capability)
    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)
    _ops.perturb_(
        lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, lists.inv_scale
    )
    monkeypatch.delenv(CAPABILITY)
    return total


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="this CPU has no AVX2: only the baseline kernels run here",
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_avx2_kernels_give_the_baseline_kernels_results_bit_for_bit(variant, monkeypatch):
    # Every tensor draws its own variant (adaptive or not, each eta 0 or not, seeded or not).
    baseline, wide = (seeded_lists(SHAPES, DTYPES, "cpu", **VARIANTS[variant], label="isa") for _ in range(2))
    expected_total = _step(baseline, "default", monkeypatch)
    total = _step(wide, "avx2", monkeypatch)
    assert_bits_equal([total], [expected_total], "sq_norm")
    assert_bits_equal(wide.params, baseline.params, "perturb_ params")
    assert_bits_equal(wide.momentum, baseline.momentum, "perturb_ momentum")
    assert_bits_equal(wide.backup, baseline.backup, "perturb_ backup")


def test_an_unknown_capability_is_an_error_that_names_the_variable_and_its_values(monkeypatch):
    lists = seeded_lists([(5,)], DTYPES, "cpu", with_momentum=True, inv_scale=False, label="isa-error")
    monkeypatch.setenv(CAPABILITY, "avx512")
    with pytest.raises(RuntimeError, match=f"{CAPABILITY}=avx512 is not a capability: use default or avx2"):
        _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)
