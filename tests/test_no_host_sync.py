"""Nothing in a step reads a tensor's value back to the host (DESIGN.md section 2).

On a GPU such a read is a device sync (and fails under CUDA-graph capture and
``torch.cuda.set_sync_debug_mode("error")``). On the CPU it is no sync, but the same code
path issues the same operators, so a dispatch mode that refuses every operator whose result
depends on tensor *values* on the host (``.item()``, ``bool(t)``, ``nonzero``...) proves
the path free of them here. It sees every operator the step issues, from Python or from the
extension's C++ (``NativeLists`` calls the ops through the dispatcher); what runs inside
an op (the CPU kernels read the norm directly) is the op's own business, and on CUDA the
kernels read it on the device.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsam_fused import SAM, FriendlySAM
from tests.cases import CPU_FAST_BACKENDS

aten = torch.ops.aten

# Operators whose result on the host depends on tensor values.
HOST_READS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t) of a one-element tensor
    aten.is_nonzero,
    aten.equal,
    aten.allclose,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
}


class RefuseHostReads(TorchDispatchMode):
    """Raises on any operator of :data:`HOST_READS` issued while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_READS:
            raise AssertionError(f"host read of a tensor value inside the step: {func}")
        self.seen.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen) for p in params]


@pytest.mark.parametrize("cls", [FriendlySAM, SAM])
@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS, indirect=True)
def test_steps_with_a_per_step_schedule_read_nothing_back(backend, cls):
    if backend == "triton":
        pytest.skip("Triton's interpreter runs kernels on the host, reading tensors there by design")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5,), (3, 4), (2, 3, 3, 3))]
    groups = [dict(params=params[:2]), dict(params=params[2:], adaptive=True)]
    opt = cls(groups, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, fused=True, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)

    def step(i, grad_scaler=None):
        for group in opt.param_groups:  # the schedule: new values every step
            group["rho"] = 0.1 + 0.01 * i
            if cls is FriendlySAM:
                group["sigma"], group["lmbda"] = 1.0 - 0.02 * i, 0.5 + 0.02 * i
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.first_step(zero_grad=True, grad_scaler=grad_scaler)
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.second_step(zero_grad=True, grad_scaler=grad_scaler)
        if grad_scaler is not None:
            grad_scaler.update()

    scaler.scale(torch.ones(()))  # creates the scale
    step(0)  # the base optimizer's first step is decided on the host (see _base_step)
    mode = RefuseHostReads()
    with mode:
        for i in range(1, 4):
            step(i)
        step(4, grad_scaler=scaler)
    expected = "fsam_fused.sq_norm" if backend == "native" else "aten._foreach_norm"
    assert any(name.endswith(expected) for name in mode.seen), sorted(mode.seen)


def test_the_mode_catches_a_host_read():
    with pytest.raises(AssertionError, match="host read"), RefuseHostReads():
        bool(torch.ones(()) > 0)
