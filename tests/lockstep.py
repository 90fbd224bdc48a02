"""Replay a :class:`~tests.scenarios.Scenario` on an optimizer and on the fp64 oracle, checking every step.

After each half of each step it checks what the README promises:
  - perturbed parameters: close to the oracle's (``fsam_fused.testing.step``), and bit for bit
    unchanged where the parameter had no gradient or the step was skipped;
  - parameters after the step: bit for bit the oracle's (the restore is exact and both sides take
    the same base step), in the same storage (``data_ptr``) and layout as before the step;
  - momentum: seeded exactly where the oracle's is, close to it (fp32), laid out like the parameter;
    none at all for SAM;
  - the base optimizer's state: bit for bit the oracle's (PlainSGD's buffers, or the twin's state);
  - ``skipped_steps``: the oracle's count;
  - memory: no first-pass gradient storage outlives ``first_step(zero_grad=True)``, a replaced
    parameter storage is not kept alive, and at most ``MAX_CACHED_PLANS`` plans are cached.
"""

from __future__ import annotations

import gc

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from fsam_fused import SAM, FriendlySAM, testing
from fsam_fused.plan import MAX_CACHED_PLANS
from tests.oracle import Oracle, PlainSGD
from tests.scenarios import SWAPS, TORCH_BASES, Grads, ParamSpec, Scenario, Step

LR = 0.05
TORCH_BASE_KWARGS = {
    "sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9, weight_decay=1e-3)),
    "sgd_fused": (torch.optim.SGD, dict(lr=LR, momentum=0.9, weight_decay=1e-3, fused=True)),
    "adamw_fused": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, fused=True)),
}


class TwinBase:
    """The oracle's base step for a torch base optimizer: the same optimizer class on twin
    parameters, stepped only on the steps the oracle does not skip."""

    def __init__(self, params: list[Tensor], base: str) -> None:
        cls, kwargs = TORCH_BASE_KWARGS[base]
        self.params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        self.optimizer = cls(self.params, **kwargs)

    def __call__(self, params: list[Tensor], grads: list[Tensor | None]) -> list[Tensor]:
        for twin, p, g in zip(self.params, params, grads):
            twin.data = p.clone()
            # torch's kernels may round differently for other strides: give the twin the same ones.
            twin.grad = None if g is None else copy_strided(g, g)
        self.optimizer.step()
        return [twin.detach().clone() for twin in self.params]


def copy_strided(values: Tensor, like: Tensor) -> Tensor:
    """A copy of ``values`` in ``like``'s dtype, with ``like``'s exact strides (gaps included)."""
    return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype).copy_(values)


def _make_param(spec: ParamSpec, gen: torch.Generator) -> torch.nn.Parameter:
    t = torch.randn(spec.shape, generator=gen).to(spec.dtype)
    if spec.channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return torch.nn.Parameter(t)


def _foreign_layout(g: Tensor) -> Tensor:
    """``g``'s values in a memory layout unlike the parameter's (which ``g`` has)."""
    if g.dim() == 4:
        other = torch.contiguous_format if not g.is_contiguous() else torch.channels_last
        return g.contiguous(memory_format=other)
    if g.dim() >= 2:
        return g.transpose(0, 1).contiguous().transpose(0, 1)
    if g.numel() > 1:  # strided, with gaps: every other element of a buffer twice as long
        wide = torch.empty(2 * g.numel(), dtype=g.dtype)
        wide[::2] = g
        return wide[::2]
    return g


def make_grads(params: list[Tensor], spec: Grads, seed: int) -> list[Tensor | None]:
    """The gradients of one pass, in each parameter's dtype and layout (unless ``foreign_layout``)."""
    gen = torch.Generator().manual_seed(seed)
    grads: list[Tensor | None] = []
    for p, present in zip(params, spec.present):
        # Drawn whether present or not, so that one parameter's values do not depend on the others'.
        g = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * spec.scale)
        grads.append((_foreign_layout(g) if spec.foreign_layout else g) if present else None)
    for index, where, value in spec.poison:
        g = grads[index]
        if g is not None and g.numel() > 0:
            g[_unravel(int(where * g.numel()), g.shape)] = value
    return grads


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    """The row-major index of element ``flat_index`` of a tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat_index, i = divmod(flat_index, size)
        index.append(i)
    return tuple(reversed(index))


class Lockstep:
    """An optimizer on ``backend`` and the oracle, driven through ``scenario`` together."""

    def __init__(self, scenario: Scenario, backend: str, seed: int = 0) -> None:
        self.scenario, self.backend = scenario, backend
        gen = torch.Generator().manual_seed(seed)
        self.params = [_make_param(spec, gen) for spec in scenario.params]
        groups, start = [], 0
        for specs, hyper in zip(scenario.groups, scenario.hyper):
            group = dict(params=self.params[start : start + len(specs)], **hyper)
            if scenario.sam:
                del group["sigma"], group["lmbda"]
            groups.append(group)
            start += len(specs)
        if scenario.base in TORCH_BASES:
            base_cls, base_kwargs = TORCH_BASE_KWARGS[scenario.base]
            base_step = TwinBase(self.params, scenario.base)
        else:
            base_cls, base_kwargs = (
                PlainSGD,
                dict(lr=LR, momentum=0.9 if scenario.base == "plain_momentum" else 0.0),
            )
            base_step = None
        cls = SAM if scenario.sam else FriendlySAM
        self.optimizer = cls(
            groups, base_cls, sam_interval=scenario.sam_interval, backend=backend, **base_kwargs
        )
        self.oracle = Oracle(
            self.params,
            scenario.group_of,
            list(scenario.hyper),
            lr=LR,
            base_momentum=base_kwargs.get("momentum", 0.0),
            base_step=base_step,
            with_momentum=not scenario.sam,
        )
        self.twin = base_step
        self.scaler = None
        if scenario.scaler is not None:
            log2_scale, growth_interval = scenario.scaler
            self.scaler = torch.amp.GradScaler(
                "cpu", init_scale=2.0**log2_scale, growth_interval=growth_interval
            )
        self._replaced: list[tuple[int, StorageWeakRef]] = []
        # Per parameter, the sum over its EMA updates of max |m before| + max |g|: see _check_momentum.
        self._ema_magnitude = [0.0] * len(self.params)

    # ------------------------------------------------------------------ driving
    def run(self) -> None:
        """Replay the scenario, checking each step; stop before a step that would hit a known bug."""
        for index, step in enumerate(self.scenario.steps):
            self._apply_events(step)
            storage = [(p.data_ptr(), p.dtype, p.stride()) for p in self.params]
            due = self.optimizer.sam_due
            assert due == (index % self.scenario.sam_interval == 0), f"step {index}: sam_due is {due}"
            first = self._hand_over(make_grads(self.params, step.first, step.seed))
            if due:
                self.optimizer.first_step(zero_grad=True, grad_scaler=self.scaler)
                self._check_released(first, f"step {index} first_step")
                momentum_before = list(self.oracle.momentum)
                self.oracle.first_step(first.oracle)
                self._track_ema_magnitude(momentum_before, first.oracle)
                self._check_perturbed(first.oracle, f"step {index}")
                second = self._hand_over(make_grads(self.params, step.second, step.seed + 1))
                self.optimizer.second_step(zero_grad=True, grad_scaler=self.scaler)
                self.oracle.second_step(second.oracle, skip_if_non_finite=self.scaler is not None)
            else:
                self.optimizer.plain_step(zero_grad=True, grad_scaler=self.scaler)
                self._check_released(first, f"step {index} plain_step")
                momentum_before = list(self.oracle.momentum)
                self.oracle.plain_step(first.oracle, skip_if_non_finite=self.scaler is not None)
                self._track_ema_magnitude(momentum_before, first.oracle)
            if self.scaler is not None:
                self.scaler.update()
            self._check_after_step(storage, f"step {index}")

    def _track_ema_magnitude(self, momentum_before: list[Tensor | None], grads: list[Tensor | None]) -> None:
        """Add the inputs of the EMA update the oracle just made to ``_ema_magnitude`` (a momentum
        rolled back later by a GradScaler keeps them, which only widens the tolerance)."""
        if self.oracle.step_skipped:
            return
        for i, (m, g) in enumerate(zip(momentum_before, grads)):
            if g is not None and g.numel() > 0:
                before = 0.0 if m is None else float(m.abs().max())
                self._ema_magnitude[i] += before + float(g.double().abs().max())

    def _apply_events(self, step: Step) -> None:
        for group, key, value in step.changes:
            if self.scenario.sam and key in ("sigma", "lmbda"):
                continue  # SAM has neither
            self.optimizer.param_groups[group][key] = value
            self.oracle.hyper[group][key] = value
        groups = self.optimizer.param_groups
        for i, target in step.moves:
            source = groups[self.oracle.groups[i]]["params"]
            if target != self.oracle.groups[i] and len(source) > 1:
                p = self.params[i]
                source.pop(next(k for k, q in enumerate(source) if q is p))
                groups[target]["params"].append(p)
                self.oracle.groups[i] = target
        for i, name in step.swaps:
            p = self.params[i]
            old, old_ptr = StorageWeakRef(p.untyped_storage()), p.untyped_storage().data_ptr()
            p.data = SWAPS[name](p.data)
            self.oracle.swap(i, SWAPS[name])
            if p.untyped_storage().data_ptr() != old_ptr:
                self._replaced.append((i, old))

    def _hand_over(self, grads: list[Tensor | None]) -> _Handed:
        """Give ``grads`` to the parameters (scaled, with a GradScaler); keep only what the oracle
        needs (unscaled copies) and weak references to what the optimizer got."""
        scale = None
        if self.scaler is not None:
            self.scaler.scale(torch.ones(()))  # what scaler.scale(loss) does to the scaler every pass
            scale = self.scaler.get_scale()
        oracle_grads, refs = [], []
        for p, g in zip(self.params, grads):
            if g is not None and scale is not None:
                g.mul_(scale)  # the backward of a scaled loss (in place: the layout stays)
            p.grad = g
            if g is None:
                oracle_grads.append(None)
                continue
            refs.append(StorageWeakRef(g.untyped_storage()))
            # A power-of-two scale is undone exactly; an overflow stays an Inf.
            oracle_grads.append(copy_strided(g if scale is None else g.double() * (1.0 / scale), g))
        return _Handed(oracle_grads, refs)

    # ------------------------------------------------------------------ checks
    def _check_released(self, handed: _Handed, what: str) -> None:
        assert all(p.grad is None for p in self.params), f"{what}: zero_grad=True left a gradient"
        if not all(ref.expired() for ref in handed.refs):
            gc.collect()  # a reference cycle counts only until it is collected
        alive = sum(not ref.expired() for ref in handed.refs)
        assert alive == 0, f"{what}: {alive} first-pass gradient storages are still alive"

    def _check_perturbed(self, first: list[Tensor | None], what: str) -> None:
        skipped = self.oracle.step_skipped
        for i, (p, expected, g) in enumerate(zip(self.params, self.oracle.params, first)):
            actual = p.detach()
            assert actual.dtype == expected.dtype, f"{what} perturbed p{i}: dtype {actual.dtype}"
            if skipped or g is None:
                assert torch.equal(actual, expected), (
                    f"{what} perturbed p{i} moved (skipped step or no gradient)"
                )
            else:
                torch.testing.assert_close(
                    actual, expected, **testing.step(p.dtype), msg=lambda m: f"{what} perturbed p{i}: {m}"
                )

    def _check_after_step(self, storage: list[tuple], what: str) -> None:
        opt, oracle = self.optimizer, self.oracle
        for i, (p, expected, before) in enumerate(zip(self.params, oracle.params, storage)):
            assert (p.data_ptr(), p.dtype, p.stride()) == before, f"{what} p{i}: storage or layout moved"
            if not torch.equal(p.detach(), expected):
                difference = (p.detach().double() - expected.double()).abs().max()
                raise AssertionError(f"{what} p{i}: differs from the oracle by {difference}")
        self._check_momentum(what)
        self._check_base_state(what)
        assert opt.skipped_steps == oracle.skipped, (
            f"{what}: skipped_steps {opt.skipped_steps}, oracle {oracle.skipped}"
        )
        assert len(opt._planner.cache) <= MAX_CACHED_PLANS, f"{what}: {len(opt._planner.cache)} cached plans"
        if self._replaced and not all(ref.expired() for _, ref in self._replaced):
            gc.collect()
        kept = [i for i, ref in self._replaced if not ref.expired()]
        assert not kept, f"{what}: the replaced storages of parameters {kept} are still alive"
        self._replaced = []

    def _check_momentum(self, what: str) -> None:
        for i, (p, expected) in enumerate(zip(self.params, self.oracle.momentum)):
            entry = self.optimizer.state.get(p, {})
            if self.scenario.sam:
                assert "momentum" not in entry, f"{what} p{i}: SAM keeps a momentum"
                continue
            seeded = "momentum" in entry and bool(entry.get("momentum_seeded", 1.0))
            assert seeded == (expected is not None), (
                f"{what} p{i}: seeded {seeded}, oracle {expected is not None}"
            )
            if expected is None:
                continue
            m = entry["momentum"]
            assert m.dtype == torch.float32 and m.shape == p.shape, (
                f"{what} p{i} momentum: {m.dtype} {m.shape}"
            )
            assert m.stride() == p.stride() or p.numel() <= 1, f"{what} p{i} momentum strides {m.stride()}"
            # Each fp32 EMA update m <- lmbda m + (1 - lmbda) g (or a lerp) rounds at the magnitude of its
            # inputs, not of its result, and lmbda <= 1 carries earlier errors on undiminished: an
            # element that cancels to near 0 may be off by 2^-23 times the sum of those magnitudes.
            tolerance = testing.step(torch.float32)
            torch.testing.assert_close(
                m,
                expected.float(),
                rtol=tolerance["rtol"],
                atol=tolerance["atol"] + 2.0**-23 * self._ema_magnitude[i],
                msg=lambda msg: f"{what} p{i} momentum: {msg}",
            )

    def _check_base_state(self, what: str) -> None:
        base = self.optimizer.base_optimizer
        if self.twin is not None:
            expected = [self.twin.optimizer.state.get(t, {}) for t in self.twin.params]
        else:
            buffers = self.oracle.base_step.buffers
            expected = [
                {"momentum_buffer": buffers[i]} if i in buffers else {} for i in range(len(self.params))
            ]
        for i, (p, want) in enumerate(zip(self.params, expected)):
            got = base.state.get(p, {})
            assert got.keys() == want.keys(), (
                f"{what} p{i}: base state keys {sorted(got)}, expected {sorted(want)}"
            )
            for key, value in want.items():
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), (
                    f"{what} p{i}: base {key}"
                )


class _Handed:
    """The gradients of one pass as the oracle sees them, and weak references to the optimizer's."""

    def __init__(self, oracle: list[Tensor | None], refs: list[StorageWeakRef]) -> None:
        self.oracle, self.refs = oracle, refs
