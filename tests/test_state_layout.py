"""The flat state buffers: aligned, non-overlapping slots behind per-parameter views."""

import pytest
import torch

from fsam_fused import FriendlySAM
from fsam_fused.state import SLOT_ALIGNMENT, DeviceState, slot_offsets
from tests.cases import CPU_FAST_BACKENDS, random_step

ODD_SHAPES = [(10,), (3, 3, 3), (), (7, 5), (1,), (64,), (0,), (13, 1, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _mixed_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=gen).to(DTYPES[i % len(DTYPES)])
        for i, shape in enumerate(ODD_SHAPES * 2)
    ]


@pytest.mark.parametrize("element_size", [1, 2, 4, 8, 32])
def test_slot_offsets_are_aligned_increasing_and_hold_each_slot(element_size):
    numels = [0, 1, 3, 10, 17, 4096, 5]
    offsets, total = slot_offsets(numels, element_size)
    for i, (offset, numel) in enumerate(zip(offsets, numels)):
        assert offset * element_size % SLOT_ALIGNMENT == 0 or element_size > SLOT_ALIGNMENT
        end = offsets[i + 1] if i + 1 < len(offsets) else total
        assert offset + numel <= end
    assert total - (offsets[-1] + numels[-1]) < max(1, SLOT_ALIGNMENT // element_size)


def test_every_state_view_starts_on_a_16_byte_boundary():
    state = DeviceState(_mixed_params(), with_momentum=True)
    for view in state.momentum + state.backup:
        assert view.data_ptr() % SLOT_ALIGNMENT == 0, (view.shape, view.dtype)


def test_state_views_do_not_overlap():
    params = _mixed_params()
    state = DeviceState(params, with_momentum=True)
    for views in (state.momentum, state.backup):
        for i, view in enumerate(views):
            view.fill_(i + 1)
        for i, view in enumerate(views):
            assert torch.all(view == i + 1), f"slot {i} was overwritten by a later one"


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_odd_sized_parameters_step_like_the_reference(backend):
    steps = []
    for name in ("reference", backend):
        params = [p.float().requires_grad_() for p in _mixed_params(1)]
        opt = FriendlySAM(params, torch.optim.SGD, backend=name, lr=0.1, rho=0.05)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            random_step(opt, params, gen)
        steps.append([p.detach().clone() for p in params])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
