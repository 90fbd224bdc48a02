"""FriendlySAM and SAM: drop-in optimizers over fused backends.

The optimizer owns parameter groups, state and the order of calls; the backends only
compute (DESIGN.md section 2). One step is

    loss.backward(); opt.first_step(zero_grad=True)     # perturb: p <- p + e
    loss_fn(model(x), y).backward(); opt.second_step()   # restore p, base step

and nothing in either half reads a value back to the host, except the one documented
case in ``second_step`` (a base optimizer that cannot skip a step on the device).

Per step the optimizer does O(1) Python work per param group and per plan: a *scan*
(:mod:`fsam_fused.scan`) reads every gradient in one loop, in C++ where the extension is
built, and says whether anything changed since the last step. Only then does the
optimizer re-plan (:meth:`FriendlySAM._replan`), with every check applied.
"""

from __future__ import annotations

import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import amp, backends, distributed, step_flags
from .base_step import BaseStep
from .hparams import ADAPTIVE, FISHER_ETA, GROUP_KEYS, CheckedRows, Row, check_values
from .param_state import ParamState
from .plan import DevicePlan, Plans, StepPlanner
from .state import FlatState

try:
    from ._C import zero_grads as _zero_grads_compiled
except ImportError:
    _zero_grads_compiled = None


@dataclass
class _PendingStep:
    """What first_step leaves for second_step.

    Kept outside the optimizer object: torch.compile does not replay attribute writes on
    Optimizer instances, but it does on plain objects.
    """

    perturbed: bool = False
    found_inf: Tensor | None = None
    plans: Plans = field(default_factory=list)
    momentum_saved: bool = False
    scaler: torch.amp.GradScaler | None = None  # first_step's, if enabled
    steps_taken: int = 0  # completed steps, SAM or plain (for sam_interval)

    def start(self, found_inf: Tensor, plans: Plans, grad_scaler: torch.amp.GradScaler | None) -> None:
        self.perturbed, self.found_inf, self.plans = True, found_inf, plans
        self.momentum_saved, self.scaler = grad_scaler is not None, amp.scaling(grad_scaler)

    def finish(self, completed: bool = True) -> None:
        self.perturbed, self.found_inf, self.plans, self.momentum_saved = False, None, [], False
        self.scaler = None
        self.steps_taken += completed


class _GroupsRef:
    """The param-group list, for traced code to reach without going through the optimizer.

    ``torch.compile`` guards every value of a ``torch.optim.Optimizer``'s param groups read
    through the optimizer (for torch.optim's own compiled steps), so a compiled first_step
    would recompile each time a schedule changed a value it never reads. Reached through
    this plain object, a group's values are guarded only where traced code reads them.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups


class FriendlySAM(torch.optim.Optimizer):
    """Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024), fused.

    A drop-in for the authors' ``FriendlySAM``: the same constructor, methods and
    ``state[p]["momentum"]``. ``base_optimizer`` is a class (e.g. ``torch.optim.SGD``)
    built on this optimizer's param groups with the remaining keyword arguments, so LR
    schedulers work on either object.

    Args:
        params: parameters or param-group dicts; groups may set ``rho``, ``sigma``,
            ``lmbda``, ``adaptive``, ``adaptive_eta`` and ``fisher_eta`` (changeable between steps).
        base_optimizer: optimizer class used for the update at the perturbed point.
        rho: neighbourhood radius.
        sigma: weight of the gradient EMA subtracted from the gradient (0 is SAM).
        lmbda: EMA decay of the gradient momentum.
        adaptive: ASAM's element-wise scaling by ``|p| + adaptive_eta``.
        adaptive_eta: ASAM's eta (0 in the authors' F-SAM code and the common wrappers, 0.01
            in the ASAM authors' code); used where ``adaptive``.
        fisher_eta: Fisher SAM's eta: the perturbation is normalised by the diagonal Fisher
            ``1 + fisher_eta * g^2`` of this step's gradient (0, the default, turns it off).
        sam_interval: take the two-pass SAM step every ``sam_interval``-th step and a
            :meth:`plain_step` (one forward/backward) on the others; :meth:`step` does this
            itself, a hand-written loop asks :attr:`sam_due`. 1 (the default) is SAM every step.
        norm_eps: added to the global norm before dividing (the authors' code adds 1e-12). Not
            ``eps``: that one goes to the base optimizer, as in the authors' class (AdamW's eps).
        backend: ``"auto"``, ``"native"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        process_group: for parameters split over ranks as plain tensors (each element on
            one rank), the group whose ranks hold the parts: the squared norm is summed
            over it. DTensor parameters (FSDP2) name their groups themselves; DDP needs
            none (see :mod:`fsam_fused.distributed`).
        replica_group: for DDP with per-worker perturbation, the data-parallel group:
            a step skipped for non-finite gradients on one rank is then skipped on every
            rank, so the replicas stay identical.
        **base_optimizer_kwargs: passed to ``base_optimizer``.

    A step whose gradients hold a NaN or Inf (or whose squared norm overflows) is
    skipped whole: parameters, momentum and the base optimizer's state stay as they
    were, and :attr:`skipped_steps` counts it.
    """

    _uses_momentum = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        *,
        adaptive_eta: float = 0.0,
        fisher_eta: float = 0.0,
        sam_interval: int = 1,
        norm_eps: float = 1e-12,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
        **base_optimizer_kwargs: Any,
    ) -> None:
        distributed.check_group("process_group", process_group)
        if (
            isinstance(sam_interval, bool)
            or not isinstance(sam_interval, numbers.Integral)
            or not sam_interval >= 1
        ):
            raise ValueError(f"sam_interval must be an integer >= 1, got {sam_interval!r}")
        distributed.check_group("replica_group", replica_group)
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (it is "
                f"built on this optimizer's param groups), got {base_optimizer!r}"
            )
        finite_number = isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool)
        if not finite_number or not 0 < norm_eps < float("inf"):
            raise ValueError(f"norm_eps must be a finite number > 0, got {norm_eps!r}")
        check_values("", rho, sigma, lmbda, adaptive, adaptive_eta, fisher_eta)
        self._base_built = False
        defaults = dict(
            rho=rho,
            sigma=sigma,
            lmbda=lmbda,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            fisher_eta=fisher_eta,
            **base_optimizer_kwargs,
        )
        super().__init__(params, defaults)
        try:
            base = base_optimizer(self.param_groups, **base_optimizer_kwargs)
        except TypeError as exc:
            if "eps" in base_optimizer_kwargs and "eps" in str(exc):
                raise TypeError(
                    f"{exc} (eps goes to the base optimizer, as in the authors' class; the epsilon "
                    "added to the perturbation's norm is norm_eps)"
                ) from exc
            raise
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}")
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self._base_built = True
        self.eps = float(norm_eps)  # (the attribute keeps its name: pickles of earlier releases hold it)
        self.sam_interval = int(sam_interval)
        self.process_group = process_group
        self.replica_group = replica_group
        self.state = ParamState()
        self._skipped = torch.zeros((), dtype=torch.float32, device=self._main_device())
        self._base_step = BaseStep(base, self._main_device())
        self._backend = backend
        self.backend = backend

    # ----------------------------------------------------------------- groups
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The param groups (shared with the base optimizer)."""
        return self._groups_ref.groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.__dict__.setdefault("_groups_ref", _GroupsRef(groups)).groups = groups
        if self.__dict__.get("_base_built"):
            # One list for both, as the constructor made it: the base optimizer steps what we perturb.
            self.base_optimizer.param_groups = groups
            self._planner.scan = None

    @property
    def state(self) -> Any:  # type: ignore[override]
        """``optimizer.state``: per-parameter entries (see :mod:`fsam_fused.param_state`); replaceable."""
        return self.__dict__["_state"]

    @state.setter
    def state(self, value: Any) -> None:
        previous = self.__dict__.get("_state")
        self.__dict__["_state"] = value
        if isinstance(previous, ParamState):
            # (Traced code never reads ``state`` through the optimizer, where torch.compile would
            # guard every group value: it asks the mapping the last eager step synced, now stale.)
            previous.dirty = True

    @property
    def backend(self) -> str:
        """The backend name asked for (``"auto"`` picks per device); settable between steps."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"backend must be a string, got {type(name).__name__}")
        backends.check_name(name)
        if name != backends.AUTO:
            backends.resolve(name, self._main_device().type)
        if self._base_built and getattr(self, "_pending", None) is not None and self._pending.perturbed:
            raise RuntimeError("the backend cannot change between first_step() and second_step()")
        self._backend = name
        self._reset_step_cache()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its missing F-SAM values (``rho``, ``sigma``, ...) take the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if self._base_built and self._pending.perturbed:
            raise RuntimeError(
                "add_param_group() between first_step() and second_step() is not supported; "
                "add the group before first_step() or after second_step()"
            )
        params = param_group["params"]
        if isinstance(params, set):  # (as torch.optim refuses it: the order would change between runs)
            raise TypeError("param_group['params'] must be an ordered collection (a list), not a set")
        # A list from here on: a generator read once here would reach the base optimizer empty.
        params = param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        tensors = [q[1] if isinstance(q, tuple) else q for q in params]  # (named: (name, tensor) pairs)
        if len({id(p) for p in tensors}) != len(tensors):
            # (torch.optim only warns: here the second copy's backup would be the perturbed value,
            # so second_step would leave part of the perturbation in the parameter.)
            raise ValueError(
                "param_group['params'] holds a parameter more than once; list each parameter once"
            )
        for p in tensors:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError("complex parameters are not supported: split them with torch.view_as_real")
            if isinstance(p, Tensor) and not p.dtype.is_floating_point:
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
        for key in GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        check_values(" (in a param group)", *(param_group[k] for k in GROUP_KEYS))
        if self._base_built:
            self.base_optimizer.add_param_group(param_group)
            self._planner.scan = None  # the next step re-plans (and sees the new parameters)
        else:
            super().add_param_group(param_group)

    def _main_device(self) -> torch.device:
        """The device of the first parameter (of the first group that has one; the CPU if every
        group is empty, as torch.optim allows)."""
        first = next((p for group in self._groups_ref.groups for p in group["params"]), None)
        return torch.device("cpu") if first is None else first.device

    def _group_rows(self) -> tuple[Row, ...]:
        return self._checked_rows.rows(self.param_groups)

    def _describe(self, p: Tensor) -> str:
        for g, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"parameter {i} of param group {g} (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    # ------------------------------------------------------------------ state
    def _reset_step_cache(self) -> None:
        """Forget flat buffers, plans and tables; the next step rebuilds them, carrying the
        momentum over from ``self.state`` (whose entries still hold it)."""
        self._planner = StepPlanner(FlatState(with_momentum=self._uses_momentum), self._group_rows)
        self._checked_rows = CheckedRows(with_momentum=self._uses_momentum)
        previous = self.__dict__.get("_pending")
        self._pending = _PendingStep(steps_taken=previous.steps_taken if previous is not None else 0)
        if isinstance(self.state, ParamState):
            self.state.dirty = True

    def _param_lists(self) -> list[list[Tensor]]:
        return [group["params"] for group in self.param_groups]

    def _param_state(self) -> ParamState:
        """``self.state``, wrapped again if the user replaced it with a plain mapping (whose
        entries are then honoured, as in the authors' optimizer)."""
        if not isinstance(self.state, ParamState):
            self.state = ParamState(self.state)
        return self.state

    def _sync_state(self) -> None:
        self._planner.sync_state(self._param_lists(), self._param_state(), self._describe, self.process_group)

    def sync_hyperparameters(self) -> None:
        """Copy the param groups' ``rho``/``sigma``/``lmbda``/``adaptive`` to the device tables now.

        ``first_step`` does this itself. Call it when replaying a captured CUDA graph, after
        changing one of them: a replay runs no Python.
        """
        rows = self._group_rows()
        if not self._planner.flat.devices:
            self._sync_state()
        for device in self._planner.flat.devices:
            self._planner.table(device).refresh(rows)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Move every parameter with a gradient to its perturbed point ``p + e``.

        With ``grad_scaler``, the gradients are still scaled (do not call
        ``scaler.unscale_`` before this): they are unscaled on the fly as they are read.
        Pass the same scaler to :meth:`second_step`.
        """
        self._check_not_pending("first_step()")
        self._perturb(grad_scaler, plain=False)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """Restore the parameters saved by :meth:`first_step`, then run the base optimizer.

        With ``grad_scaler`` (the one given to :meth:`first_step`): unscales the second-pass
        gradients unless ``scaler.unscale_(optimizer)`` already ran (so clipping can sit
        between the two), skips the whole step if either pass overflowed (momentum is
        taken back too), and leaves ``scaler.update()`` to the caller.
        """
        if not self._pending.perturbed:
            raise RuntimeError(
                "second_step() was called without a preceding first_step(); the order is "
                "first_step(), a second forward/backward, then second_step()"
            )
        if amp.scaling(grad_scaler) is not self._pending.scaler:
            # (Without the scaler here the base step would take still-scaled gradients; with one
            # that first_step did not have, momentum took scaled ones and no copy was saved.)
            raise ValueError(
                "second_step() got another grad_scaler than first_step() (one, none, or a different "
                "one): pass the same GradScaler to both (abort_step() puts the parameters back)"
            )
        self._complete(zero_grad, grad_scaler)

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """A step without the perturbation: the base optimizer steps on this iteration's gradient.

        For the iterations between SAM steps when ``sam_interval > 1`` (see :attr:`sam_due`):
        one forward/backward, then ``plain_step()``. The momentum EMA takes this gradient as a
        SAM step's first pass would (``m <- lmbda m + (1 - lmbda) g``, seeding where unseeded),
        so it keeps averaging every iteration's gradient; the parameters are not perturbed.
        A non-finite gradient skips it whole, as a SAM step. With ``grad_scaler``, as
        :meth:`second_step` (the gradients are unscaled once; ``scaler.update()`` is the caller's).
        """
        self._check_not_pending("plain_step()")
        self._perturb(grad_scaler, plain=True)
        self._complete(zero_grad, grad_scaler)

    @property
    def sam_due(self) -> bool:
        """Whether the next step should be a SAM step (``first_step`` ... ``second_step``) rather than
        a :meth:`plain_step`: every ``sam_interval``-th step is, counting from the first."""
        return self._pending.steps_taken % self.sam_interval == 0

    def _check_not_pending(self, what: str) -> None:
        if self._pending.perturbed:
            raise RuntimeError(
                f"{what} was called between first_step() and second_step(); the order is "
                "first_step(), a second forward/backward, then second_step() (or abort_step() "
                "to put the parameters back after a failed second pass)"
            )

    def _perturb(self, grad_scaler: torch.amp.GradScaler | None, *, plain: bool) -> None:
        """The first half of a step: EMA of the momentum, backup, ``p <- p + e`` (``e = 0`` when
        ``plain``); leaves what the second half needs in ``self._pending``."""
        planner = self._planner
        inv_scale = None
        if grad_scaler is not None and not (plain and amp.unscaled_already(grad_scaler, self)):
            # (A plain step's gradient is the one its base step takes: like second_step's, it may
            # have been unscaled already, to clip it.) Compiled or not, the same checks apply.
            amp.check_first_pass_scaled(grad_scaler, self)
            if torch.compiler.is_compiling():
                inv_scale = amp.traced_inverse_scale(grad_scaler)
            else:
                inv_scale = amp.inverse_scale(grad_scaler)
        if torch.compiler.is_compiling():
            # No group value is read in traced code (see GroupTable.refresh), except
            # ``adaptive``, which decides the ops of the torch backend; it runs the Fisher ops
            # for every group here (exact when fisher_eta is 0), so fisher_eta is not read either.
            groups = self._groups_ref.groups
            if planner.state_edits is None or planner.state_edits.dirty:
                raise RuntimeError(
                    "optimizer.state was edited since the last eager step; run one eager first_step/"
                    "second_step before calling the compiled first_step again"
                )
            rows, adaptive, fisher = None, [group["adaptive"] for group in groups], [True] * len(groups)
            plans, traced_grads = planner.traced(groups, self.backend, self._describe)
            source = None
        else:
            rows = self._group_rows()
            adaptive = [row[ADAPTIVE] != 0 for row in rows]
            fisher = [row[FISHER_ETA] != 0 for row in rows]
            lists = self._param_lists()
            state = self._param_state()
            changed = planner.scan is None or state.dirty
            if not changed:
                changed, total = self._scan_and_first_pass(lists, rows, adaptive, fisher, plain, grad_scaler)
                if total is not None:
                    self._finish_first_pass(total, planner.plans, planner.scan, grad_scaler)
                    return
            if changed:
                planner.replan(lists, self.backend, state, self._describe, self.process_group)
                self._base_step.note_participants(planner.flat.params, planner.plans)
            plans, traced_grads, source = planner.plans, None, planner.scan
        if grad_scaler is not None:
            for state in planner.flat.devices.values():
                state.save_momentum()
        main = self._main_device()
        total = None  # (each backend's sq_norm returns a new tensor: one plan's is the total)
        for index, (backend, plan) in enumerate(plans):
            self._attach(plan, source, rows, adaptive, fisher, plain, inv_scale)
            if traced_grads is not None:
                plan.grads = traced_grads[index]
            norm = backend.sq_norm(plan).to(main)
            total = norm if total is None else total + norm
        if total is None:
            total = torch.zeros((), dtype=torch.float32, device=main)
        total = distributed.all_reduce_sum_(total, planner.flat.norm_groups)
        if self.replica_group is not None:
            total = distributed.nonfinite_if_any_rank(total, self.replica_group)
        for backend, plan in plans:
            backend.perturb_(plan, total.to(plan.device))
        self._finish_first_pass(total, plans, source, grad_scaler)

    def _scan_and_first_pass(
        self,
        lists: list[list[Tensor]],
        rows: tuple[Row, ...],
        adaptive: list[bool],
        fisher: list[bool],
        plain: bool,
        grad_scaler: torch.amp.GradScaler | None,
    ) -> tuple[bool, Tensor | None]:
        """The scan of an eager step that has plans; returns whether it saw a change.

        Where the step has one plan, on the main device, whose backend's ``first_pass`` is ready for
        it (the native backend, on the CPU, with its kept lists), no norm to reduce across processes
        and no loss scale, the whole first pass runs in the scan's call: no Python between the scan
        and the kernels (unless a gradient's own code ran in the scan: see
        ``ParamScan::python_may_have_run``), so the parameters need not be read again. Then it also
        returns the squared norm, and only :meth:`_finish_first_pass` is left.
        """
        planner = self._planner
        scan, plans = planner.scan, planner.plans
        assert scan is not None
        if len(plans) != 1:
            return scan.scan(lists), None
        backend, plan = plans[0]
        if (
            len(rows) < plan.table_rows  # fewer groups (one removed): attach would gather missing rows
            or not hasattr(backend, "first_pass")
            or grad_scaler is not None
            or planner.flat.norm_groups
            or self.replica_group is not None
            or plan.device != self._main_device()
            or not backend.first_pass_ready(plan, scan)
        ):
            return scan.scan(lists), None
        self._attach(plan, scan, rows, adaptive, fisher, plain, None)
        changed, total = backend.first_pass(plan, lists)
        if total is None:
            plan.release()
        return changed, total

    def _attach(
        self,
        plan: DevicePlan,
        source: Any,
        rows: tuple[Row, ...] | None,
        adaptive: list[bool],
        fisher: list[bool],
        plain: bool,
        inv_scale: Tensor | None,
    ) -> None:
        """Hand ``plan`` this step's gradients (held by ``source``), coefficients and loss scale."""
        table = self._planner.table(plan.device).refresh(rows)
        plan.attach(source, table, rows or (), adaptive, fisher, self.eps, plain=plain)
        plan.inv_scale = inv_scale.to(plan.device) if inv_scale is not None else None

    def _finish_first_pass(
        self, total: Tensor, plans: Plans, source: Any, grad_scaler: torch.amp.GradScaler | None
    ) -> None:
        """After the first pass's kernels (``total``: the squared norm they used): the seeded flags,
        the gradients released, and what second_step needs."""
        step_ok, found_inf = step_flags.finite_flags(total)
        for _, plan in plans:
            plan.mark_seeded(step_ok)
            plan.release()
        if source is not None:
            source.release()
        self._pending.start(found_inf, plans, grad_scaler)

    def _complete(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> None:
        """The second half of a step: restore the parameters, then the base optimizer's step."""
        for backend, plan in self._pending.plans:
            backend.restore_(plan)
        found_inf = self._pending.found_inf
        if grad_scaler is not None and grad_scaler.is_enabled():
            found_inf = amp.step_found_inf(grad_scaler, self, found_inf)
            for device, state in self._planner.flat.devices.items():
                state.rollback_momentum(found_inf.to(device))
        self._base_step(found_inf, self._planner, self._pending.plans)
        step_flags.count_skipped(self._skipped, found_inf)
        self._pending.finish()
        # LR schedulers attached to this optimizer check this flag to confirm that a step
        # ran before theirs; a step completes here.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a :meth:`first_step` whose second pass failed: put the parameters back, bit for bit.

        The optimizer is then ready for a new ``first_step``. The momentum keeps this step's
        EMA update unless the step ran with a ``grad_scaler`` (then it is taken back too);
        the base optimizer does not step. Does nothing outside a step.
        """
        pending = self._pending
        if not pending.perturbed:
            return
        for backend, plan in pending.plans:
            backend.restore_(plan)
        if pending.momentum_saved:
            for device, state in self._planner.flat.devices.items():
                state.rollback_momentum(torch.ones((), dtype=torch.float32, device=device))
        pending.finish(completed=False)

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        before_base_step: Callable[[], None] | None = None,
    ) -> Any:
        """A whole step: ``first_step``, ``closure()`` (forward and backward), ``second_step``.

        Call it after the first forward/backward, as with the authors' optimizer; the
        closure runs with gradients enabled and its return value is returned. If the
        closure raises, the parameters are put back (:meth:`abort_step`) before the
        exception propagates. With ``sam_interval > 1``, the steps in between are
        :meth:`plain_step` s: the closure is not called, and None is returned.

        Args:
            closure: the second forward and backward pass, at the perturbed point.
            grad_scaler: handed to both halves (see :meth:`first_step`); ``scaler.update()`` is
                the caller's.
            before_base_step: called once the base step's gradient is there (after the closure;
                on a plain step, before it): Lightning's ``SAMMixedPrecision`` unscales the
                gradients and runs its hooks (clipping) there.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that runs the forward and "
                "backward pass at the perturbed point; or call first_step() and second_step() "
                "(docs/training_loops.md shows both with Lightning, Accelerate and timm)"
            )
        self._check_not_pending("step()")
        # (With a scaler, before its own check of a first pass it did not scale says otherwise.
        # ``any`` stops at the first gradient.)
        if grad_scaler is not None and not any(
            p.grad is not None for group in self.param_groups for p in group["params"]
        ):
            raise self._no_gradient_error()
        if not self.sam_due:
            if before_base_step is not None:
                before_base_step()
            self.plain_step(zero_grad=True, grad_scaler=grad_scaler)
            return None
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        if not self._pending.plans:
            self.abort_step()
            raise self._no_gradient_error()
        try:
            with torch.enable_grad():
                loss = closure()
            if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
                raise RuntimeError(
                    f"the closure passed to {type(self).__name__}.step() ran no backward pass: it must "
                    "run the forward and backward at the perturbed point (e.g. loss_fn(model(x), y)"
                    ".backward()) and return the loss"
                )
            if before_base_step is not None:
                before_base_step()
        except BaseException:
            self.abort_step()
            raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def _no_gradient_error(self) -> RuntimeError:
        return RuntimeError(
            f"{type(self).__name__}.step(closure) found no gradient: run the first forward and "
            "backward before step() (with PyTorch Lightning, turn automatic optimisation off: "
            "self.automatic_optimization = False; see docs/training_loops.md)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter (to None by default), in one C++ loop when built."""
        if set_to_none and torch.compiler.is_compiling():
            # (torch.optim.Optimizer.zero_grad is on dynamo's skip list: a fullgraph
            # first_step(zero_grad=True) would break there. The groups are reached through
            # _groups_ref, not self.param_groups, on which dynamo would guard every group value.)
            for group in self._groups_ref.groups:
                for p in group["params"]:
                    p.grad = None
        elif set_to_none and _zero_grads_compiled is not None:
            _zero_grads_compiled(self._param_lists())
        else:
            super().zero_grad(set_to_none)

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients (reading it syncs)."""
        return int(self._skipped.item())

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Our state (``momentum`` per parameter), the param groups, and the base optimizer's state."""
        if self._pending.perturbed:
            # (Not refused: an emergency save, such as Lightning's on SLURM pre-emption, may land
            # here from a signal handler, and a crash would lose the job.)
            warnings.warn(
                "state_dict() between first_step() and second_step(): the model's parameters are at "
                "their perturbed point, so a run resumed from a checkpoint taken now is not the one "
                "that continues; save after second_step() (or call abort_step() first)",
                stacklevel=2,
            )
        if self._planner.flat.location:
            self._sync_state()  # edits of optimizer.state since the last step
        # The hooks (register_state_dict_pre/post_hook) run here, the post-hooks on the whole dict,
        # ours included; torch.optim's state_dict runs without them (a hook a pre-hook registers
        # is in the optimizer's own table, which is back in place before any post-hook runs).
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        hooks = self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_pre_hooks = self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = hooks
        post_hooks = self._optimizer_state_dict_post_hooks
        state_dict["state"] = {key: dict(entry) for key, entry in state_dict["state"].items()}
        state_dict["base_optimizer"] = self.base_optimizer.state_dict()
        state_dict["fsam_fused"] = {
            "skipped_steps": self._skipped.clone(),
            "steps_taken": self._pending.steps_taken,
        }
        for hook in post_hooks.values():
            returned = hook(self, state_dict)
            state_dict = state_dict if returned is None else returned
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer, or of the authors' ``FriendlySAM``.

        Momentum stays fp32 whatever the parameter dtype. A checkpoint without the base
        optimizer's state (the authors' format) leaves the base optimizer's state empty.
        """
        if self._pending.perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step() is not supported")
        state_dict = state_dict.copy()  # (as torch.optim: a hook that replaces a key leaves the caller's)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            state_dict = state_dict if returned is None else returned
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        id_to_param: dict[int, Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("state_dict param groups do not match this optimizer's in size")
            id_to_param.update(zip(saved["params"], group["params"]))
        new_state = ParamState()
        for key, entry in state_dict["state"].items():
            p = id_to_param[key]
            if self._uses_momentum and "momentum" in entry:
                new_state[p] = {
                    "momentum": entry["momentum"].to(device=p.device, dtype=torch.float32, copy=True),
                    "momentum_seeded": torch.as_tensor(entry.get("momentum_seeded", 1.0)).float().clone(),
                }
        if "base_optimizer" in state_dict:
            self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
            self.param_groups = self.base_optimizer.param_groups
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = new_state
        extra = state_dict.get("fsam_fused", {})
        self._skipped = (
            torch.as_tensor(extra.get("skipped_steps", 0.0)).float().to(self._main_device()).clone()
        )
        self._base_step.from_base_state()
        # The parameters did not change: flat buffers, plans and group tables stay (a compiled
        # first_step keeps running on them); the loaded momentum is adopted into the slots now.
        self._planner.scan = None
        self._pending = _PendingStep(steps_taken=int(extra.get("steps_taken", 0)))
        self._sync_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -------------------------------------------------------- copy and pickle
    _PICKLED = ("defaults", "_groups_ref", "base_optimizer", "eps", "sam_interval", "_backend", "_skipped",
                "_base_step", "_base_built")  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        if self._pending.perturbed:
            raise RuntimeError(
                "an optimizer between first_step() and second_step() cannot be copied or pickled; "
                "do it after second_step()"
            )
        if self.process_group is not None or self.replica_group is not None:
            raise TypeError(
                "an optimizer with a process_group or replica_group cannot be copied or pickled "
                "(process groups cannot); save optimizer.state_dict() instead"
            )
        state = {key: self.__dict__[key] for key in self._PICKLED}
        state["state"] = {p: dict(entry) for p, entry in self.state.items()}
        state["steps_taken"] = self._pending.steps_taken
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        entries = state.pop("state")
        steps_taken = state.pop("steps_taken", 0)
        if "_base_step" not in state:  # pickled by an earlier release: its skip flag as an attribute
            state.pop("_base_stepped", None)
            base_step = BaseStep.__new__(BaseStep)
            base_step.__setstate__(
                {"base": state["base_optimizer"], "flag": state.pop("_base_found_inf", None)}
            )
            state["_base_step"] = base_step
        super().__setstate__(state)
        self.process_group = self.replica_group = None
        self.state = ParamState(entries)
        self._reset_step_cache()
        self._pending.steps_taken = steps_taken


class SAM(FriendlySAM):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021), fused.

    A drop-in for the widely used PyTorch ``SAM`` wrapper: F-SAM with ``sigma = 0``,
    keeping no momentum at all. ``adaptive=True`` is ASAM (with ``adaptive_eta``, ASAM as
    its authors run it); ``fisher_eta > 0`` is Fisher SAM.
    """

    _uses_momentum = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        adaptive_eta: float = 0.0,
        fisher_eta: float = 0.0,
        sam_interval: int = 1,
        norm_eps: float = 1e-12,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
        **base_optimizer_kwargs: Any,
    ) -> None:
        for name in ("sigma", "lmbda"):
            if name in base_optimizer_kwargs:
                raise TypeError(
                    f"SAM takes no {name}: it is F-SAM with sigma = 0 and no momentum; use FriendlySAM "
                    f"for {name}"
                )
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            sigma=0.0,
            lmbda=0.0,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            fisher_eta=fisher_eta,
            sam_interval=sam_interval,
            norm_eps=norm_eps,
            backend=backend,
            process_group=process_group,
            replica_group=replica_group,
            **base_optimizer_kwargs,
        )
