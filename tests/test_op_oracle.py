"""The op oracle itself: its lists reach both paths of a kernel (aligned tensors and
unaligned views), and its formula matches a case worked out by hand."""

import torch

from tests.op_oracle import SHAPE_SETS, Lists, make_lists, oracle_perturb, oracle_sq_norm


def test_lists_mix_16_byte_aligned_tensors_and_unaligned_views():
    gen = torch.Generator().manual_seed(0)
    lists = make_lists(SHAPE_SETS["over_one_launch"], [torch.bfloat16], "cpu", gen)
    per_tensor = zip(lists.params, lists.grads, lists.momentum, lists.backup)
    aligned = [all(t.data_ptr() % 16 == 0 for t in ts) for ts in per_tensor]
    assert 0.3 < sum(aligned) / len(aligned) < 0.7
    assert any(p.storage_offset() > 0 for p in lists.params)


def _lists(params, grads, momentum, coef_rows) -> Lists:
    def as_tensors(values):
        return [torch.tensor(v, dtype=torch.float32) for v in values]

    params = as_tensors(params)
    return Lists(
        params, as_tensors(grads), as_tensors(momentum), [torch.empty_like(p) for p in params],
        torch.tensor(coef_rows, dtype=torch.float32), None,
    )  # fmt: skip


def test_oracle_matches_a_hand_computed_case():
    """Tensor 0: ASAM with eta and Fisher; tensor 1: Fisher only, its adaptive_eta ignored."""
    # Columns: rho, sigma, lmbda, adaptive, adaptive_eta, fisher_eta.
    lists = _lists(
        params=[[-1.5], [-1.0, 3.0]],
        grads=[[1.0], [2.0, 0.0]],
        momentum=[[0.5], [0.0, 0.0]],
        coef_rows=[[0.3, 1.0, 0.5, 1.0, 0.5, 3.0], [0.6, 0.5, 0.25, 0.0, 7.0, 0.25]],
    )
    # Tensor 0: d = 1 - 0.5 = 0.5, a = 1.5 + 0.5 = 2, f = 1 + 3 * 1^2 = 4: (a d)^2 / f = 0.25.
    # Tensor 1: d = g = (2, 0), a = 1, f = (1 + 0.25 * 4, 1) = (2, 1): terms (2, 0).
    assert oracle_sq_norm(lists) == 2.25
    # sqrt(2.25) = 1.5; scale = rho / 1.5 = 0.2 and 0.4. T^2 d = a^2 d / f: 4 * 0.5 / 4 = 0.5; (1, 0).
    params, momentum = oracle_perturb(lists, torch.tensor(2.25), eps=0.0)
    torch.testing.assert_close(params, [torch.tensor([-1.5 + 0.5 * 0.2]), torch.tensor([-1.0 + 0.4, 3.0])])
    # m <- lmbda m + (1 - lmbda) g: 0.5 * 0.5 + 0.5 * 1 = 0.75; (0.75 * 2, 0).
    torch.testing.assert_close(momentum, [torch.tensor([0.75]), torch.tensor([1.5, 0.0])])
