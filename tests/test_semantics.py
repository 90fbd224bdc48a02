"""The F-SAM rules of DESIGN.md section 1 that are easy to get subtly wrong."""

import torch

from fsam_fused import SAM, FriendlySAM
from tests.cases import CASES


def _one_param(values, backend, **kwargs):
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    return p, opt


def _fsam_steps(p, opt, grads):
    """Run first_step/second_step for each gradient; return the perturbations e."""
    perturbations = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.first_step(zero_grad=True)
        perturbations.append(p.detach() - before)
        p.grad = torch.zeros_like(p)
        opt.second_step(zero_grad=True)
    return perturbations


def test_first_step_is_plain_sam_and_seeds_momentum_with_the_gradient(backend):
    p, opt = _one_param([1.0, -2.0, 3.0], backend, rho=0.5, sigma=1.0, lmbda=0.9)
    g = torch.tensor([3.0, 0.0, 4.0])
    (e,) = _fsam_steps(p, opt, [g])
    torch.testing.assert_close(e, 0.5 * g / 5.0)
    torch.testing.assert_close(opt.state[p]["momentum"], g)


def test_ema_takes_the_raw_gradient_not_the_direction(backend):
    # With g1 then g2: d2 = g2 - sigma*g1 and m2 = lmbda*g1 + (1-lmbda)*g2. Feeding d2 into
    # the EMA instead (a known divergence in the wild) would give lmbda*g1 + (1-lmbda)*d2.
    sigma, lmbda = 0.7, 0.6
    p, opt = _one_param([0.5, 0.25], backend, rho=0.1, sigma=sigma, lmbda=lmbda)
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    _, e2 = _fsam_steps(p, opt, [g1, g2])
    d2 = g2 - sigma * g1
    torch.testing.assert_close(e2, 0.1 * d2 / d2.norm())
    torch.testing.assert_close(opt.state[p]["momentum"], lmbda * g1 + (1 - lmbda) * g2)
    wrong = lmbda * g1 + (1 - lmbda) * d2
    assert not torch.allclose(opt.state[p]["momentum"], wrong)


def test_adaptive_scales_norm_by_abs_p_and_perturbation_by_p_squared(backend):
    p, opt = _one_param([2.0, -0.5, 1.0], backend, rho=0.2, adaptive=True)
    w = p.detach().clone()
    g = torch.tensor([1.0, 4.0, -2.0])
    (e,) = _fsam_steps(p, opt, [g])
    torch.testing.assert_close(e, 0.2 * w * w * g / (w.abs() * g).norm())


def test_one_norm_over_all_groups_with_rho_per_group(backend):
    a = torch.nn.Parameter(torch.tensor([3.0]))
    b = torch.nn.Parameter(torch.tensor([4.0]))
    opt = FriendlySAM(
        [dict(params=[a], rho=1.0), dict(params=[b], rho=0.5, adaptive=True)],
        torch.optim.SGD,
        lr=0.0,
        backend=backend,
    )
    a.grad, b.grad = torch.tensor([6.0]), torch.tensor([2.0])
    opt.first_step()
    norm = (36.0 + (4.0 * 2.0) ** 2) ** 0.5
    torch.testing.assert_close(a.detach(), torch.tensor([3.0 + 1.0 * 6.0 / norm]))
    torch.testing.assert_close(b.detach(), torch.tensor([4.0 + 0.5 * 16.0 * 2.0 / norm]))


def test_sam_is_fsam_with_sigma_zero_and_keeps_no_momentum(backend):
    torch.manual_seed(3)
    grads = [torch.randn(6) for _ in range(3)]
    p1 = torch.nn.Parameter(torch.randn(6))
    p2 = torch.nn.Parameter(p1.detach().clone())
    sam = SAM([p1], torch.optim.SGD, rho=0.3, lr=0.1, backend=backend)
    fsam = FriendlySAM([p2], torch.optim.SGD, rho=0.3, sigma=0.0, lmbda=0.5, lr=0.1, backend=backend)
    for g in grads:
        for p, opt in ((p1, sam), (p2, fsam)):
            p.grad = g.clone()
            opt.first_step(zero_grad=True)
            p.grad = g.flip(0).clone()
            opt.second_step(zero_grad=True)
    torch.testing.assert_close(p1, p2)
    assert "momentum" not in sam.state[p1]
    assert all(s.momentum_flat is None for s in sam._planner.flat.devices.values())


def test_parameter_without_grad_is_untouched_and_seeded_when_its_grad_arrives(backend):
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    b = torch.nn.Parameter(torch.tensor([2.0]))
    opt = FriendlySAM([a, b], torch.optim.SGD, lr=0.0, rho=1.0, sigma=1.0, lmbda=0.5, backend=backend)
    a.grad = torch.tensor([3.0, 4.0])
    opt.first_step()
    assert b.item() == 2.0
    torch.testing.assert_close(a.detach(), torch.tensor([1.6, 1.8]))
    opt.second_step(zero_grad=True)
    seeded_b = opt.state[b].get("momentum_seeded", torch.tensor(1.0 if "momentum" in opt.state[b] else 0.0))
    assert not bool(seeded_b)
    # b's first grad arrives on step 2: plain SAM for b (d = g), a uses its momentum.
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([2.0])
    opt.first_step()
    d_a = torch.tensor([0.0, 0.0])
    d_b = torch.tensor([2.0])
    norm = torch.cat([d_a, d_b]).norm()
    torch.testing.assert_close(b.detach(), torch.tensor([2.0]) + d_b / norm)
    torch.testing.assert_close(opt.state[b]["momentum"], torch.tensor([2.0]))


def test_all_zero_gradients_give_zero_perturbation(backend):
    p, opt = _one_param([1.0, 2.0], backend, rho=0.5)
    (e,) = _fsam_steps(p, opt, [torch.zeros(2)])
    assert torch.equal(e, torch.zeros(2))
    assert torch.isfinite(p).all()


def test_rho_schedule_changes_take_effect_between_steps(backend):
    p, opt = _one_param([0.0, 0.0], backend, rho=0.1, sigma=0.0)
    g = torch.tensor([3.0, 4.0])
    (e1,) = _fsam_steps(p, opt, [g])
    opt.param_groups[0]["rho"] = 0.4
    (e2,) = _fsam_steps(p, opt, [g])
    torch.testing.assert_close(e2, 4 * e1)


def test_restore_is_bit_exact(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in ((33,), (4, 7))]
    opt = FriendlySAM(params, torch.optim.SGD, lr=0.0, rho=0.7, backend=backend)
    before = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
    opt.second_step()
    for p, b, ptr in zip(params, before, ptrs):
        assert torch.equal(p, b)
        assert p.data_ptr() == ptr, "the parameter's storage must not move"


def test_channels_last_parameters_match_contiguous(backend):
    torch.manual_seed(1)
    w = torch.randn(8, 3, 3, 3)
    grads = [torch.randn(8, 3, 3, 3) for _ in range(6)]
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = torch.nn.Parameter(w.clone().to(memory_format=fmt))
        opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2, backend=backend)
        for i in range(0, 6, 2):
            p.grad = grads[i].to(memory_format=fmt)
            opt.first_step(zero_grad=True)
            p.grad = grads[i + 1].to(memory_format=fmt)
            opt.second_step(zero_grad=True)
        assert p.is_contiguous(memory_format=fmt)
        results.append((p.detach().contiguous(), opt.state[p]["momentum"].contiguous()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)


def test_momentum_views_share_layout_with_channels_last_params():
    p = torch.nn.Parameter(torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last))
    opt = FriendlySAM([p], torch.optim.SGD, lr=0.1, backend="torch")
    p.grad = torch.randn_like(p)
    opt.first_step()
    assert opt.state[p]["momentum"].stride() == p.stride()


def test_cases_cover_what_design_section_4_lists():
    names = {c.name for c in CASES}
    assert {
        "mixed_shapes",
        "chunk_boundaries",
        "many_tiny",
        "groups",
        "adaptive",
        "sigma_zero",
        "none_grads",
        "channels_last",
        "sam",
    } <= names
    shapes = [s for c in CASES for s in c.shapes]
    assert () in shapes and (0,) in shapes
