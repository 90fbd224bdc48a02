"""fsam_fused.hessian against Hessians formed in full (torch.autograd.functional.hessian) and
quadratics with known spectra."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from benchmarks.study.hvp_count import (
    Quadratic,
    exact_hessian,
    lanczos_products_needed,
    oracle_stop,
    power_iteration,
    quadratic_problem,
    symmetric_with_spectrum,
)
from fsam_fused import hessian


def _exact_hessian(model, inputs, targets, criterion=F.cross_entropy):
    """The Hessian of ``criterion(model(inputs), targets)`` in the parameters that require
    grad, formed in full by torch.autograd.functional.hessian on a flat-vector function."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(vector):
        chunks = vector.split([p.numel() for _, p in named])
        params = {name: chunk.view_as(p) for (name, p), chunk in zip(named, chunks)}
        return criterion(functional_call(model, params, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss, flat)


def _top(matrix, k=5):
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]


def _net(seed=0, norm=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8), *([norm(8)] if norm else []), nn.Tanh(), nn.Linear(8, 4)]
    return nn.Sequential(*layers).double()


def _data(samples=45, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 6, generator=generator, dtype=torch.float64), torch.randint(
        0, 4, (samples,), generator=generator
    )


def _quadratic(spectrum, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor(spectrum, dtype=torch.float64)
    model = Quadratic(symmetric_with_spectrum(spectrum, generator), generator)
    return model, model.criterion, model.data()


def _assert_relative(values, expected, rtol):
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), expected, rtol=rtol, atol=0)


def test_top_eigenvalues_of_the_mean_loss_over_unequal_batches_match_the_exact_hessian():
    model, (x, y) = _net(), _data()
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]  # 30 and 15 samples: the mean weighs them 2:1
    result = hessian.eigenvalues(model, F.cross_entropy, batches, k=5)
    _assert_relative(result.values, _top(_exact_hessian(model, x, y)), rtol=1e-4)
    assert result.products == hessian.default_iterations(5)
    assert all(r < 1e-3 for r in result.residuals)


def test_residuals_bound_the_distance_to_an_eigenvalue_before_convergence():
    model, (x, y) = _net(), _data()
    exact = torch.linalg.eigvalsh(_exact_hessian(model, x, y))
    result = hessian.eigenvalues(model, F.cross_entropy, [(x, y)], k=5, iterations=8)
    for value, residual in zip(result.values, result.residuals):
        assert residual > 1e-6  # eight steps: not converged, so the bound is doing work
        assert (exact - value).abs().min().item() <= residual


def test_batches_takes_only_the_first_batches_of_the_data():
    model, (x, y) = _net(), _data()
    batches = iter([(x[:20], y[:20]), (x[20:], y[20:])])  # a one-shot iterator is read once
    result = hessian.eigenvalues(model, F.cross_entropy, batches, k=3, batches=1)
    _assert_relative(result.values, _top(_exact_hessian(model, x[:20], y[:20]), 3), rtol=1e-4)


@pytest.mark.parametrize(
    "spectrum",
    [
        [3.0, 2.0, 1.5, 1.0, 0.5, -0.2] + [0.1 / i for i in range(1, 35)] + [-9.0],  # a larger |negative|
        [-0.1 * i for i in range(1, 6)] + [-2.0 - 0.1 * i for i in range(30)],  # negative definite
        [4.0] * 3 + [2.5] * 2 + [-7.0] * 5 + [0.3] * 30,  # few distinct values, repeated
        [1.5] * 12,  # a multiple of the identity: the Krylov space is one vector
    ],
    ids=["negatives", "negative-definite", "repeated", "scaled-identity"],
)
def test_eigenvalues_of_quadratics_with_known_spectra_are_the_largest_algebraic_ones(spectrum):
    model, criterion, data = _quadratic(spectrum)
    expected = torch.tensor(sorted(spectrum, reverse=True)[:5], dtype=torch.float64)
    iterations = min(30, len(spectrum) - 1)  # fewer than the parameters: not exact by exhaustion
    result = hessian.eigenvalues(model, criterion, data, k=5, iterations=iterations)
    _assert_relative(result.values, expected, rtol=1e-8)


def test_a_zero_hessian_gives_zero_eigenvalues_and_trace():
    # A loss linear in the parameters: its gradient is constant, the Krylov space empty.
    model = nn.Linear(3, 1).double()
    data = [(torch.ones(4, 3, dtype=torch.float64), torch.zeros(4))]
    criterion = lambda out, _: out.sum()  # noqa: E731
    assert hessian.eigenvalues(model, criterion, data, k=2, iterations=3).values == [0.0, 0.0]
    assert hessian.trace(model, criterion, data, probes=3).value == 0.0


def test_batchnorm_uses_running_statistics_and_every_module_keeps_its_mode():
    model, (x, y) = _net(norm=nn.BatchNorm1d), _data()
    norm = model[1]
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    model.train()
    model[3].eval()  # mixed modes must come back as they were
    before = copy.deepcopy(model.state_dict())
    result = hessian.eigenvalues(model, F.cross_entropy, [(x, y)], k=5)
    _assert_relative(result.values, _top(_exact_hessian(copy.deepcopy(model).eval(), x, y)), rtol=1e-4)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_parameters_that_do_not_require_grad_are_left_out():
    model, (x, y) = _net(), _data()
    model[0].requires_grad_(False)
    result = hessian.eigenvalues(
        model, F.cross_entropy, [(x, y)], k=5, iterations=model[2].weight.numel() + 4
    )
    exact = _exact_hessian(model, x, y)
    assert exact.shape == (36, 36)
    _assert_relative(result.values, _top(exact), rtol=1e-8)


def test_a_seed_reproduces_a_run_and_the_global_rng_is_left_alone():
    model, (x, y) = _net(), _data()
    data = [(x, y)]
    rng = torch.get_rng_state()
    first = hessian.eigenvalues(model, F.cross_entropy, data, k=3, iterations=6, seed=5)
    again = hessian.eigenvalues(model, F.cross_entropy, data, k=3, iterations=6, seed=5)
    other = hessian.eigenvalues(model, F.cross_entropy, data, k=3, iterations=6, seed=6)
    assert first == again
    assert first.values != other.values  # six steps have not converged: the start vector shows
    assert hessian.trace(model, F.cross_entropy, data, probes=4, seed=5) == hessian.trace(
        model, F.cross_entropy, data, probes=4, seed=5
    )
    assert torch.equal(torch.get_rng_state(), rng)


def test_progress_is_called_after_every_product():
    model, data = _net(), [_data()]
    calls = []
    hessian.trace(
        model, F.cross_entropy, data, probes=3, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    hessian.density(model, F.cross_entropy, data, iterations=2, probes=2, progress=lambda *c: calls.append(c))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_trace_is_exact_for_a_diagonal_hessian():
    # Rademacher probes: v @ D @ v = sum(D_ii * v_i**2) = trace(D) for every probe.
    diagonal = torch.tensor([3.0, -1.0, 0.25, 7.5, -2.0, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    model = Quadratic(torch.diag(diagonal), generator)
    result = hessian.trace(model, model.criterion, model.data(), probes=3)
    assert result.value == pytest.approx(diagonal.sum().item(), rel=1e-12)
    assert result.standard_error == pytest.approx(0.0, abs=1e-12)
    assert result.products == 3


def test_trace_of_a_network_is_within_the_probe_error_of_the_exact_trace():
    model, (x, y) = _net(), _data()
    exact = _exact_hessian(model, x, y)
    probes = 200
    # Variance of one Rademacher probe: 2 * sum over i != j of H_ij**2.
    spread = (2 * (exact.square().sum() - exact.diagonal().square().sum()) / probes).sqrt().item()
    result = hessian.trace(model, F.cross_entropy, [(x, y)], probes=probes)
    assert abs(result.value - exact.trace().item()) < 4 * spread
    assert 0.5 * spread < result.standard_error < 2 * spread


def test_density_with_as_many_steps_as_parameters_is_the_exact_spectrum():
    spectrum = [2.0, 1.0, 0.75, 0.5, 0.1, -0.3, -1.2, 4.0]
    model, criterion, data = _quadratic(spectrum)
    result = hessian.density(model, criterion, data, iterations=len(spectrum), probes=3)
    assert result.nodes.shape == result.weights.shape == (3, len(spectrum))
    torch.testing.assert_close(
        result.nodes, torch.tensor(sorted(spectrum), dtype=torch.float64).expand(3, -1)
    )
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    grid = torch.linspace(-4, 7, 4001, dtype=torch.float64)
    assert torch.trapezoid(result.evaluate(grid, width=0.05), grid).item() == pytest.approx(1.0, rel=1e-6)
    assert result.products == 3 * len(spectrum)


def test_lanczos_needs_under_half_the_products_of_power_iteration_with_deflation():
    model, spectrum = quadratic_problem(200)
    data = model.data()
    exact = spectrum.sort(descending=True).values[:5].tolist()
    operator = hessian.Hessian(model, model.criterion, data)
    power_iteration(operator, 5, oracle_stop(exact, 1e-3))
    lanczos = lanczos_products_needed(model, model.criterion, data, exact, 1e-3)
    assert lanczos < 0.5 * operator.products


def test_the_lanczos_loop_reads_nothing_back_to_the_host():
    # On the meta device any host read (.item(), bool(), a Python `if` on a tensor) raises.
    model = Quadratic(torch.eye(16, device="meta"), torch.Generator())
    operator = hessian.Hessian(model, model.criterion, [(torch.zeros(1), torch.zeros(1))])
    start = torch.empty(16, device="meta")
    alpha, beta = hessian._lanczos(operator, start, 8, torch.Generator(), lambda: None)
    assert alpha.shape == beta.shape == (8,) and alpha.device.type == "meta"


def test_the_benchmarks_forward_over_reverse_hessian_matches_autograd():
    model, (x, y) = _net(), _data()
    torch.testing.assert_close(exact_hessian(model, F.cross_entropy, x, y), _exact_hessian(model, x, y))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=5, iterations=3), "iterations must be at least k=5"),
        (dict(k=500), "k=500 is more than the 92 parameters"),
        (dict(batches=0), "batches must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    model, data = _net(), [_data()]
    with pytest.raises(ValueError, match=message):
        hessian.eigenvalues(model, F.cross_entropy, data, **kwargs)


def test_bad_models_and_data_say_what_is_wrong():
    model = _net()
    with pytest.raises(ValueError, match="data yielded no batches"):
        hessian.trace(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        hessian.trace(model, F.cross_entropy, [_data()], probes=0)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        hessian.trace(model.requires_grad_(False), F.cross_entropy, [_data()])


@pytest.mark.gpu
def test_eigenvalues_and_trace_on_cuda_match_the_exact_hessian():
    model, (x, y) = _net(), _data()
    exact = _exact_hessian(model, x, y)
    model, data = model.cuda(), [(x.cuda(), y.cuda())]
    _assert_relative(hessian.eigenvalues(model, F.cross_entropy, data, k=5).values, _top(exact), rtol=1e-4)
    spread = (2 * (exact.square().sum() - exact.diagonal().square().sum()) / 100).sqrt().item()
    assert abs(hessian.trace(model, F.cross_entropy, data).value - exact.trace().item()) < 4 * spread
