"""The compiled ops ``torch.ops.fsam_fused.*`` against the per-tensor oracle of ``tests/op_oracle.py``."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fsam_fused.plan import COEF_COLUMNS
from tests.op_oracle import (
    CUDA_CHUNK,
    DTYPES,
    SHAPE_SETS,
    VARIANTS,
    Lists,
    assert_bits_equal,
    bits,
    check_shapes,
    check_zero_etas_are_bit_exact,
    clone,
    make_lists,
    poison,
)

_ops = pytest.importorskip("fsam_fused._ops", reason="the native extension is not built")

gpu_device = pytest.param("cuda", marks=pytest.mark.gpu)
DEVICES = ["cpu", gpu_device]


class NativeOps:
    """``torch.ops.fsam_fused.*`` on :class:`Lists`."""

    def sq_norm(self, lists: Lists) -> torch.Tensor:
        return _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)

    def perturb_(self, lists: Lists, total: torch.Tensor, eps: float) -> None:
        _ops.perturb_(
            lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, eps, lists.inv_scale
        )

    def restore_(self, lists: Lists) -> None:
        _ops.restore_(lists.params, lists.backup)


class CapturedNativeOps(NativeOps):
    """Each op recorded into a CUDA graph, then replayed once."""

    def _replayed(self, op):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = op()
        graph.replay()
        torch.cuda.synchronize()
        return out

    def sq_norm(self, lists: Lists) -> torch.Tensor:
        return self._replayed(lambda: super(CapturedNativeOps, self).sq_norm(lists))

    def perturb_(self, lists: Lists, total: torch.Tensor, eps: float) -> None:
        self._replayed(lambda: super(CapturedNativeOps, self).perturb_(lists, total, eps))

    def restore_(self, lists: Lists) -> None:
        self._replayed(lambda: super(CapturedNativeOps, self).restore_(lists))


CASES = [
    pytest.param(shapes, dtypes, id=f"{name}-{'+'.join(str(d)[6:] for d in dtypes)}")
    for name, shapes in SHAPE_SETS.items()
    for dtypes in ([torch.float32], [torch.bfloat16], [torch.float16], DTYPES)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shapes,dtypes", CASES)
def test_ops_match_oracle(shapes, dtypes, variant, device):
    check_shapes(NativeOps(), shapes, dtypes, device, **VARIANTS[variant], label="native")


@pytest.mark.gpu
@pytest.mark.parametrize("shape_set", ["over_one_launch", "chunk_boundaries"])
def test_ops_captured_in_a_cuda_graph_match_oracle(shape_set):
    """While a stream is captured the launchers pass 4 KB launch tables (more launches)."""
    variant = VARIANTS["fsam_scaled"]
    check_shapes(CapturedNativeOps(), SHAPE_SETS[shape_set], DTYPES, "cuda", **variant, label="graph")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_etas_give_the_formula_from_before_the_etas_bit_for_bit(variant, device):
    check_zero_etas_are_bit_exact(NativeOps(), device, **VARIANTS[variant], label="native")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_total", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_total_leaves_params_and_momentum_bit_identical(dtype, bad_total, device):
    gen = torch.Generator().manual_seed(7)
    lists = make_lists(SHAPE_SETS["vector_widths"] + [(CUDA_CHUNK + 3,)], [dtype], device, gen)
    lists.grads[0].view(-1)[0] = math.inf  # an Inf gradient must not leak either
    old_p, old_m = clone(lists.params), clone(lists.momentum)
    poison(lists.backup)
    total = torch.tensor(bad_total, device=device)
    _ops.perturb_(lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, None)
    assert_bits_equal(lists.params, old_p, "params")
    assert_bits_equal(lists.momentum, old_m, "momentum")
    assert_bits_equal(lists.backup, old_p, "backup")


@pytest.mark.parametrize("device", DEVICES)
def test_inf_gradient_makes_the_norm_non_finite(device):
    gen = torch.Generator().manual_seed(3)
    lists = make_lists([(100,), (40000,)], [torch.float32], device, gen)
    lists.grads[1].view(-1)[12345] = math.inf
    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, None)
    assert not math.isfinite(float(total))


def test_norm_is_bitwise_independent_of_thread_count():
    gen = torch.Generator().manual_seed(11)
    shapes = [(1 << 20,), (300_001,), (17,), (2048, 513)] + [(5,)] * 50
    lists = make_lists(shapes, DTYPES, "cpu", gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, None))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(bits(r), bits(results[0])) for r in results), [float(r) for r in results]


def test_empty_lists_give_zero_norm_and_no_op():
    coef = torch.empty((0, COEF_COLUMNS))
    assert float(_ops.sq_norm([], [], [], coef, None)) == 0.0
    _ops.perturb_([], [], [], [], coef, torch.tensor(1.0), 1e-12, None)
    _ops.restore_([], [])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda ls: ls.grads.pop(), "grads has"),
        (lambda ls: ls.momentum.__setitem__(0, ls.momentum[0].double()), "momentum[0] must be float32"),
        (lambda ls: ls.params.__setitem__(0, ls.params[0].double()), "params[0] has dtype"),
        (lambda ls: ls.backup.__setitem__(1, ls.backup[1].t().contiguous().t()), "backup[1] has strides"),
        (lambda ls: setattr(ls, "coef", ls.coef[:, :3].contiguous()), "coef must be"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(mutate, message):
    gen = torch.Generator().manual_seed(5)
    lists = make_lists([(3,), (4, 5)], [torch.float32], "cpu", gen)
    mutate(lists)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        total = torch.tensor(1.0)
        _ops.perturb_(lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_momentum", [True, False], ids=["fsam", "sam"])
def test_opcheck_passes_for_every_op(with_momentum, device):
    gen = torch.Generator().manual_seed(13)
    lists = make_lists(
        [(), (5,), (3, 7), (33,)],
        [torch.float32, torch.bfloat16],
        device,
        gen,
        momentum=with_momentum,
        inv_scale=True,
    )
    total = _ops.sq_norm(lists.params, lists.grads, lists.momentum, lists.coef, lists.inv_scale)
    torch.library.opcheck(
        torch.ops.fsam_fused.sq_norm.default, (lists.params, lists.grads, lists.momentum, lists.coef, None)
    )
    torch.library.opcheck(
        torch.ops.fsam_fused.perturb_.default,
        (lists.params, lists.grads, lists.momentum, lists.backup, lists.coef, total, 1e-12, lists.inv_scale),
    )
    torch.library.opcheck(torch.ops.fsam_fused.restore_.default, (lists.params, lists.backup))


@pytest.mark.gpu
def test_restore_refuses_tensors_of_two_devices():
    """One launch covers the list, so a tensor elsewhere would be read through a wrong pointer."""
    params = [torch.zeros(4, device="cuda"), torch.zeros(4)]
    backup = [torch.ones(4, device="cuda"), torch.ones(4)]
    with pytest.raises(RuntimeError, match=re.escape("params[1] is on cpu but params[0] is on cuda:0")):
        _ops.restore_(params, backup)
    assert torch.equal(params[0], torch.zeros(4, device="cuda"))
