"""Step plans: what one backend computes on one device in one step.

A plan lists the parameters that take part in a step (those with a gradient), in a
fixed order, with views of their momentum and backup slots and the per-tensor metadata
the kernels need. The optimizer keeps the plans of the last few participation patterns in a
:class:`PlanCache` and, while nothing changes between steps, reuses the same plans with only
the gradients and the coefficient table refreshed, so a backend never walks
``param_groups`` itself.

Coefficient table ``coef`` (fp32, one row per tensor, on the plan's device): the tensor's
group's row of the group table (:mod:`fsam_fused.hparams`: ``rho``, ``sigma``, ``lmbda``,
``adaptive`` (0 or 1), ``adaptive_eta`` and ``fisher_eta``; the column constants are shared
with csrc/fsam_math.h and the Triton kernels), with ``lmbda`` set to 0 for tensors whose
momentum is not seeded yet. With the momentum of an unseeded tensor kept at zero, the one
formula of DESIGN.md section 1 then covers the first step as well: ``d = g - sigma * 0 = g``
and ``m <- 0 * m + g``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, distributed, step_flags
from .hparams import ADAPTIVE, ADAPTIVE_ETA, COEF_COLUMNS, FISHER_ETA, LMBDA, RHO, SIGMA, GroupTable, Row
from .scan import Scan, make_scan
from .state import DeviceState, FlatState, checked_parameters, layout_of
from .upload import Staging

if TYPE_CHECKING:
    from .param_state import Edits, ParamState

__all__ = [
    "ADAPTIVE",
    "ADAPTIVE_ETA",
    "COEF_COLUMNS",
    "FISHER_ETA",
    "LMBDA",
    "RHO",
    "SIGMA",
    "DevicePlan",
    "PlanCache",
    "Plans",
    "StepPlanner",
    "build_plan",
]

# Plans kept for reuse. Each holds per-tensor lists and small device tables (no model-sized
# buffer: the torch backend's work buffer is shared per device), so a bounded number keeps
# memory flat however the set of parameters with gradients changes from step to step.
MAX_CACHED_PLANS = 8


@dataclass(eq=False)
class DevicePlan:
    """The tensors of one device that one backend updates in one step.

    Attributes that backends read:
      params, momentum (None when the optimizer keeps no momentum), backup: equally long
        lists, position ``i`` describing one parameter; momentum and backup views have the
        parameter's shape and strides.
      grad_list(): this step's gradients, laid out like the parameters (valid between the
        optimizer's attach and release, i.e. inside ``first_step``).
      grad_addresses(): their data addresses, without a tensor object per gradient.
      positions: each tensor's index in the optimizer's parameter order (the scan's order).
      slot_list, group_list: host copies of ``slots`` and ``group_of``.
      table_rows: how many rows a group table needs for this plan (one past its largest group index).
      coef: fp32 ``[n, COEF_COLUMNS]`` device tensor (see module docstring), refreshed every step
        (in eager mode the plan's own buffer, rewritten by the next step).
      group_positions: ``(group_index, positions in this plan)`` pairs, for backends that work per group.
      group_rows: host copies of each group's table row (empty inside ``torch.compile``).
      group_adaptive, group_fisher: whether each group is adaptive, and whether it may use
        Fisher SAM (``fisher_eta`` not known to be 0), which decide the ops of some backends.
      eps: the constant added to the norm.
      inv_scale: optional fp32 0-dim device tensor multiplied into every gradient
        element as it is read (an inverse loss scale), or None.
      source: the scan that holds this step's gradients (None outside ``first_step``).
      cache: backend-private data that lives as long as the plan (buffers, pointer
        tables); backends key it by their own name.
    """

    device: torch.device
    state: DeviceState
    params: list[Tensor]
    momentum: list[Tensor] | None
    slots: Tensor
    group_of: Tensor
    positions: list[int]
    group_positions: list[tuple[int, list[int]]]
    slot_list: list[int]
    group_list: list[int]
    table_rows: int
    coef: Tensor | None = None
    group_rows: Sequence[Row] = ()
    group_adaptive: Sequence[bool] = ()
    group_fisher: Sequence[bool] = ()
    eps: float = 1e-12
    inv_scale: Tensor | None = None
    source: Scan | None = None
    grads: list[Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def backup(self) -> list[Tensor]:
        """Per-tensor backup views, in the parameters' dtypes (allocated on first use)."""
        cached = self.cache.get("backup")
        if cached is None:
            all_backups = self.state.backup
            cached = self.cache["backup"] = [all_backups[s] for s in self.slot_list]
        return cached

    def grad_list(self) -> list[Tensor]:
        """This step's gradients of the plan's tensors, in plan order."""
        if self.grads is None:
            assert self.source is not None, "gradients are only available inside first_step"
            self.grads = self.source.grads(self.positions)
        return self.grads

    def grad_addresses(self) -> list[int]:
        """The data addresses of :meth:`grad_list`, in plan order. From the scan, which knows them,
        unless the gradients were handed over already: a tensor object for each gradient costs
        about a microsecond, which a step over many small tensors pays once per tensor."""
        if self.grads is None:
            assert self.source is not None, "gradients are only available inside first_step"
            return self.source.grad_addresses(self.positions)
        return [g.data_ptr() for g in self.grads]

    def attach(
        self,
        source: Scan | None,
        group_table: Tensor,
        group_rows: Sequence[Row],
        group_adaptive: Sequence[bool],
        group_fisher: Sequence[bool],
        eps: float,
        *,
        plain: bool = False,
    ) -> None:
        """Hand the plan this step's gradients (held by ``source``) and coefficients (no host sync);
        a ``plain`` step's coefficients have ``rho`` 0 (no perturbation, the EMA as usual)."""
        self.source, self.grads = source, None
        self.group_rows, self.eps = group_rows, eps
        self.group_adaptive, self.group_fisher = group_adaptive, group_fisher
        seeded = self.state.seeded
        if torch.compiler.is_compiling():
            self.coef = step_flags.traced_coef(group_table, self.group_of, seeded, self.slots, plain=plain)
            return
        coef, selected = self._step_buffers()
        step_flags.gather_coef(coef, group_table, self.group_of, seeded, self.slots, selected, plain=plain)
        self.coef = coef

    def _step_buffers(self) -> tuple[Tensor, Tensor]:
        """The plan's own ``coef`` table and a buffer for its tensors' seeded flags, rewritten
        by every eager step. Allocating them per step cost more than the rest of the step's host
        work on a model of small tensors: on the CPU, a block of this size is where glibc's malloc
        first consolidates all the small blocks freed since (by the forward and backward passes,
        or another optimizer), about a millisecond after a pass that freed many tensors."""
        buffers = self.cache.get("step_buffers")
        if buffers is None:
            n = len(self.params)
            buffers = self.cache["step_buffers"] = (
                torch.empty((n, COEF_COLUMNS), dtype=torch.float32, device=self.device),
                torch.empty((n,), dtype=torch.float32, device=self.device),
            )
        return buffers

    def release(self) -> None:
        """Forget this step's gradients."""
        self.source, self.grads = None, None

    def mark_seeded(self, step_ok: Tensor) -> None:
        """Record on the device that a finite step seeded the momentum of the plan's tensors
        (``step_ok``: fp32 0-dim, 1 for a finite step, on any device)."""
        if step_ok.device != self.device:
            step_ok = step_ok.to(self.device)
        selected = None if torch.compiler.is_compiling() else self._step_buffers()[1]
        step_flags.mark_seeded(self.state.seeded, self.slots, step_ok, selected)


def build_plan(
    state: DeviceState, slots: list[int], group_of: list[int], positions: list[int], *, traced: bool = False
) -> DevicePlan:
    """A plan over the tensors of ``state`` at ``slots``, each in group ``group_of[i]``.

    The index tables are uploaded without a host sync, through staging buffers that the
    plan keeps; ``traced`` (inside ``torch.compile``) builds them with plain tensor ops.
    """
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        by_group.setdefault(g, []).append(i)
    cache: dict[str, Any] = {}
    if traced:
        slots_t, group_t = (torch.tensor(v, dtype=torch.int64).to(state.device) for v in (slots, group_of))
    else:
        staging = cache["staging"] = (Staging(), Staging())
        slots_t, group_t = (
            s.new_tensor(v, torch.int64, state.device) for s, v in zip(staging, (slots, group_of))
        )
    return DevicePlan(
        device=state.device,
        state=state,
        params=[state.params[s] for s in slots],
        momentum=[state.momentum[s] for s in slots] if state.momentum is not None else None,
        slots=slots_t,
        group_of=group_t,
        positions=positions,
        group_positions=sorted(by_group.items()),
        slot_list=slots,
        group_list=group_of,
        table_rows=max(group_of, default=-1) + 1,
        cache=cache,
    )


class PlanCache:
    """The plans of the last :data:`MAX_CACHED_PLANS` participation patterns, least recently used out."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, DevicePlan] = OrderedDict()

    def get(self, key: tuple) -> DevicePlan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def peek(self, key: tuple) -> DevicePlan | None:
        """The plan for ``key`` without marking it used (no reordering: safe to trace)."""
        return self._plans.get(key)

    def put(self, key: tuple, plan: DevicePlan) -> None:
        self._plans[key] = plan
        while len(self._plans) > MAX_CACHED_PLANS:
            self._plans.popitem(last=False)

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


Plans = list[tuple[ModuleType, DevicePlan]]


class StepPlanner:
    """Each step's plans, and everything kept between steps to find them cheaply.

    While the scan sees nothing change since the last step, the last step's plans serve
    again; otherwise :meth:`replan` applies every check (parameters, state, gradients) and
    finds them again, from the cache of the last participation patterns where it can.

    Args:
        flat: the optimizer's flat state.
        rows_now: the param groups' current table rows (checked), for the device tables.
    """

    def __init__(self, flat: FlatState, rows_now: Callable[[], tuple[Row, ...]]) -> None:
        self.flat = flat
        self.rows_now = rows_now
        self.cache = PlanCache()
        self.tables: dict[torch.device, GroupTable] = {}
        self.scan: Scan | None = None
        self.plans: Plans = []
        # Which positions had a gradient at the last re-plan: a compiled first_step runs only on
        # the same set (the base-step bookkeeping, BaseStep.note_participants, is eager).
        self.participants: list[int] = []
        # The edit flag of the optimizer.state that the last sync brought up to date.
        self.state_edits: Edits | None = None
        self._pointers: tuple[int, ...] | None = None

    def table(self, device: torch.device) -> GroupTable:
        """The group table of ``device``."""
        table = self.tables.get(device)
        if table is None:
            table = self.tables[device] = GroupTable(device, self.rows_now)
        return table

    def sync_state(
        self,
        lists: Sequence[Sequence[Tensor]],
        param_state: ParamState,
        describe: Callable[[Tensor], str],
        process_group: dist.ProcessGroup | None,
    ) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """Check the parameters and bring the flat state and ``param_state`` up to date; returns
        the parameters in order, their local parts and group indices (see checked_parameters)."""
        params, local_parts, group_of = checked_parameters(lists)
        self.state_edits = None  # until this succeeds
        if self.flat.update(params, local_parts, param_state, describe, process_group):
            # New buffers: the plans of the last step hold the old ones, so the next step re-plans
            # (a sync outside a step, by state_dict(), rebuilds when a parameter has another dtype
            # for now; the next scan may see it back as it was).
            self.cache.clear()
            self.scan = None
        self.state_edits = param_state.edits
        return params, local_parts, group_of

    def replan(
        self,
        lists: list[list[Tensor]],
        backend: str,
        param_state: ParamState,
        describe: Callable[[Tensor], str],
        process_group: dist.ProcessGroup | None,
    ) -> None:
        """The full check of a step: state, participation, gradients, plans."""
        self.scan = None  # until this succeeds: a failed check must be repeated next step
        params, local_parts, group_of = self.sync_state(lists, param_state, describe, process_group)
        pointers = tuple(local.data_ptr() for local in local_parts)
        if pointers != self._pointers:  # a new storage: plans that cached addresses are stale
            self.cache.clear()
            self._pointers = pointers
        scan = make_scan(lists)
        scan.watch(self.flat.watched())
        scan.scan(lists)
        grads = scan.grads(range(len(params)))
        self.plans = self._plans_for(backend, params, local_parts, group_of, grads, describe, traced=False)
        self.participants = [i for i, grad in enumerate(grads) if grad is not None]
        self.scan = scan

    def traced(
        self, groups: list[dict[str, Any]], backend: str, describe: Callable[[Tensor], str]
    ) -> tuple[Plans, list[list[Tensor]]]:
        """Plans and gradients inside ``torch.compile``: the flat state comes from an eager step."""
        if not self.flat.slots:
            raise RuntimeError("run one eager first_step/second_step before calling a compiled first_step")
        params, local_parts, group_of, grads = [], [], [], []
        for g, group in enumerate(groups):
            for p in group["params"]:
                local = distributed.local_tensor(p)
                grad = p.grad
                if grad is not None:
                    grad = distributed.local_tensor(grad)
                    if grad.stride() != local.stride():
                        grad = torch.empty_like(local).copy_(grad)
                params.append(p)
                local_parts.append(local)
                group_of.append(g)
                grads.append(grad)
        known = self.flat.params
        if (
            len(params) != len(known)
            or any(p is not q for p, q in zip(params, known))
            or any(  # a new dtype or layout (model.double(), channels_last) needs new buffers
                local.device != device or layout_of(local) != self.flat.devices[device].layouts[slot]
                for local, (device, slot) in zip(local_parts, self.flat.slots)
            )
        ):
            raise RuntimeError(
                "the parameters (or their dtypes or layouts) changed since the last eager step; run one "
                "eager first_step/second_step before calling the compiled first_step again"
            )
        if any(t.tensor is not None and t.tensor.shape[0] != len(groups) for t in self.tables.values()):
            raise RuntimeError(  # (the group tables are shaped at an eager step: one row per group)
                "a param group was added or removed since the last eager step; run one eager "
                "first_step/second_step before calling the compiled first_step again"
            )
        if [i for i, grad in enumerate(grads) if grad is not None] != self.participants:
            raise RuntimeError(
                "the set of parameters with a gradient changed since the last eager step; run one eager "
                "first_step/second_step before calling the compiled first_step again"
            )
        plans = self._plans_for(backend, params, local_parts, group_of, grads, describe, traced=True)
        return plans, [[grads[i] for i in plan.positions] for _, plan in plans]

    def _plans_for(
        self,
        backend_name: str,
        params: list[Tensor],
        local_parts: list[Tensor],
        group_of: list[int],
        grads: Sequence[Tensor | None],
        describe: Callable[[Tensor], str],
        *,
        traced: bool,
    ) -> Plans:
        """Group the parameters with a gradient by device and backend; a plan for each."""
        members: dict[tuple[torch.device, str], tuple[list[int], list[int], list[int]]] = {}
        chosen: dict[str, ModuleType] = {}
        for position, (p, local, grad) in enumerate(zip(params, local_parts, grads)):
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise RuntimeError(
                    f"sparse gradients are not supported ({describe(p)}); use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            device_type = local.device.type
            if device_type not in chosen:
                chosen[device_type] = backends.resolve(backend_name, device_type)
            backend = chosen[device_type]
            if not backend.supports(local.dtype):
                backend = backends.resolve("torch", device_type)
            _, slot = self.flat.slots[position]
            slots, groups, positions = members.setdefault((local.device, backend.name), ([], [], []))
            slots.append(slot)
            groups.append(group_of[position])
            positions.append(position)
        plans = []
        for (device, name), (slots, groups, positions) in members.items():
            # The groups are part of the key: a parameter moved to another group, the order of
            # parameters unchanged, takes its new group's coefficients.
            key = (device, name, tuple(positions), tuple(groups))
            plan = self.cache.peek(key) if traced else self.cache.get(key)
            if plan is None:
                plan = build_plan(self.flat.devices[device], slots, groups, positions, traced=traced)
                self.cache.put(key, plan)
            plans.append((backends.resolve(name, device.type), plan))
        return plans
