"""The op oracle itself: its lists reach both paths of a kernel (aligned tensors and
unaligned views), its formula matches a case worked out by hand, and a kernel that
disagrees with it gets a report that locates the error."""

import pytest
import torch

from tests.op_oracle import (
    DTYPES,
    SHAPE_SETS,
    Lists,
    check_ops_match_oracle,
    make_lists,
    oracle_perturb,
    oracle_sq_norm,
    seeded_lists,
)


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


class _OracleOps:
    """The oracle as an :class:`Ops`, with one deliberate error: ``wrong`` names the output."""

    def __init__(self, wrong: str, tensor: int, index: tuple[int, ...]) -> None:
        self.wrong, self.tensor, self.index = wrong, tensor, index
        self.bad_address = None

    def sq_norm(self, lists: Lists) -> torch.Tensor:
        if self.bad_address is None:
            self.bad_address = lists.params[self.tensor].data_ptr()
        total = oracle_sq_norm(lists)
        if self.wrong == "sq_norm" and any(p.data_ptr() == self.bad_address for p in lists.params):
            total *= 1.01
        return torch.tensor(total, dtype=torch.float32)

    def perturb_(self, lists: Lists, total: torch.Tensor, eps: float) -> None:
        new_p, new_m = oracle_perturb(lists, total, eps)
        for outputs, values in ((lists.backup, lists.params), (lists.params, new_p), (lists.momentum, new_m)):
            for out, v in zip(outputs, values):
                out.copy_(v)
        wrong = {"params": lists.params, "momentum": lists.momentum}.get(self.wrong)
        if wrong is not None:
            wrong[self.tensor][self.index] += 1.0

    def restore_(self, lists: Lists) -> None:
        for p, b in zip(lists.params, lists.backup):
            p.copy_(b)


@pytest.mark.parametrize("wrong", ["params", "momentum"])
def test_a_wrong_element_is_reported_with_its_inputs_and_layout(wrong):
    lists = seeded_lists(SHAPE_SETS["channels_last"], DTYPES, "cpu", True, True, "report")
    with pytest.raises(AssertionError) as failure:
        check_ops_match_oracle(_OracleOps(wrong, tensor=1, index=(1, 5, 2, 1)), lists)
    message = str(failure.value)
    expected = [
        f"perturb_ {wrong}[1]: 1 of 126 elements differ",
        "first at index (1, 5, 2, 1) (storage element 117)",  # channels_last: 63 + 5 + 2 * 21 + 7
        "got ", "expected ", "inputs there: p=", ", g=", ", m=",
        "coef row 1: rho=", "fisher_eta=", "total_sq_norm=",
        f"params {str(lists.params[1].dtype)[6:]} shape (2, 7, 3, 3) strides (63, 1, 21, 7) offset",
        "address % 16 = ", "with momentum, inv_scale 0.", "redraw with seeded_lists key 'report|",
    ]  # fmt: skip
    for part in expected:
        assert part in message, f"{part!r} missing from:\n{message}"


def test_a_wrong_norm_is_traced_to_its_tensor():
    lists = seeded_lists(SHAPE_SETS["vector_widths"], DTYPES, "cpu", True, False, "report")
    traced = r"sq_norm: got .*\n  tensor 5 alone: got .*\n  coef row 5: rho="
    with pytest.raises(AssertionError, match=traced):
        check_ops_match_oracle(_OracleOps("sq_norm", tensor=5, index=()), lists)
