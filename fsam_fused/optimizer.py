"""FriendlySAM and SAM: drop-in optimizers over fused backends.

The optimizer owns parameter groups, state and the order of calls; the backends only
compute (DESIGN.md section 2). One step is

    loss.backward(); opt.first_step(zero_grad=True)     # perturb: p <- p + e
    loss_fn(model(x), y).backward(); opt.second_step()   # restore p, base step

and nothing in either half reads a value back to the host, except the one documented
case in ``second_step`` (a non-fused base optimizer and the skip-on-non-finite rule).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import amp, backends, distributed, reference
from .plan import COEF_COLUMNS, DevicePlan, build_plan, mark_seeded, refresh_coefficients
from .state import DeviceState, is_dense

_HPARAMS = ("rho", "sigma", "lmbda", "adaptive")


def _check_hparams(where: str, rho: Any, sigma: Any, lmbda: Any, adaptive: Any) -> None:
    for name, value in (("rho", rho), ("sigma", sigma), ("lmbda", lmbda)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number{where}, got {type(value).__name__}")
        if value != value:
            raise ValueError(f"{name} must not be NaN{where}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0{where}, got {rho}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0{where}, got {sigma}")
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must lie in [0, 1]{where}, got {lmbda}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be True or False{where}, got {adaptive!r}")


@dataclass
class _PendingStep:
    """What first_step leaves for second_step.

    Kept outside the optimizer object: torch.compile does not replay attribute writes on
    Optimizer instances, but it does on plain objects.
    """

    perturbed: bool = False
    found_inf: Tensor | None = None
    plans: list[tuple[ModuleType, DevicePlan]] = field(default_factory=list)


class FriendlySAM(torch.optim.Optimizer):
    """Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024), fused.

    A drop-in for the authors' ``FriendlySAM``: the same constructor, methods and
    ``state[p]["momentum"]``. ``base_optimizer`` is a class (e.g. ``torch.optim.SGD``)
    built on this optimizer's param groups with the remaining keyword arguments, so LR
    schedulers work on either object.

    Args:
        params: parameters or param-group dicts; groups may set ``rho``, ``sigma``,
            ``lmbda`` and ``adaptive`` (changeable between steps).
        base_optimizer: optimizer class used for the update at the perturbed point.
        rho: neighbourhood radius.
        sigma: weight of the gradient EMA subtracted from the gradient (0 is SAM).
        lmbda: EMA decay of the gradient momentum.
        adaptive: ASAM's element-wise scaling by ``|p|``.
        eps: added to the global norm before dividing.
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
        eps: float = 1e-12,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
        **base_optimizer_kwargs: Any,
    ) -> None:
        distributed.check_group("process_group", process_group)
        distributed.check_group("replica_group", replica_group)
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD (it is "
                f"built on this optimizer's param groups), got {base_optimizer!r}"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        backends.check_name(backend)
        _check_hparams("", rho, sigma, lmbda, adaptive)
        self._base_built = False
        defaults = dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive, **base_optimizer_kwargs)
        super().__init__(params, defaults)
        base = base_optimizer(self.param_groups, **base_optimizer_kwargs)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}")
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self._base_built = True
        self.eps = float(eps)
        self.backend = backend
        self.process_group = process_group
        self.replica_group = replica_group
        if backend != backends.AUTO and backend != backends.REFERENCE:
            backends.resolve(backend, self._main_device().type)
        self._pending = _PendingStep()
        self._skipped = torch.zeros((), dtype=torch.float32, device=self._main_device())
        # A fused torch.optim optimizer skips its step on a device flag read from its
        # ``found_inf`` attribute, as GradScaler drives it. The attribute is set here, once,
        # to a flag that each step overwrites in place: torch.compile traces the copy, while
        # an attribute assignment inside a compiled second_step fails on some torch
        # releases (2.11: "setattr on a user-defined object").
        self._base_found_inf: Tensor | None = None
        if getattr(base, "_step_supports_amp_scaling", False):
            self._base_found_inf = torch.zeros((), dtype=torch.float32, device=self._main_device())
            base.found_inf = self._base_found_inf
        self._reference_backups: dict[Tensor, Tensor] = {}
        self._invalidate()

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its missing ``rho``/``sigma``/``lmbda``/``adaptive`` take the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError("complex parameters are not supported: split them with torch.view_as_real")
            if isinstance(p, Tensor) and not p.dtype.is_floating_point:
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
        for key in _HPARAMS:
            param_group.setdefault(key, self.defaults[key])
        _check_hparams(" (in a param group)", *(param_group[k] for k in _HPARAMS))
        if self._base_built:
            self.base_optimizer.add_param_group(param_group)
            self._invalidate()
        else:
            super().add_param_group(param_group)

    def _hparams(self, index: int, group: dict[str, Any]) -> tuple[float, float, float, bool]:
        rho, sigma, lmbda, adaptive = (group[k] for k in _HPARAMS)
        _check_hparams(f" (param group {index})", rho, sigma, lmbda, adaptive)
        return float(rho), float(sigma), float(lmbda), adaptive

    def _main_device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    # ------------------------------------------------------------------ state
    def _invalidate(self) -> None:
        """Forget flat buffers and plans; they are rebuilt, keeping state, on the next step."""
        self._states: dict[torch.device, DeviceState] | None = None
        self._plans: dict[tuple, tuple[ModuleType, DevicePlan]] = {}
        self._tables: dict[torch.device, tuple[tuple, Tensor]] = {}

    def _device_states(self) -> dict[torch.device, DeviceState]:
        """Flat state per device, over each parameter's local part (the shard of a DTensor)."""
        if self._states is None:
            by_device: dict[torch.device, list[Tensor]] = {}
            self._local_of: dict[Tensor, Tensor] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    local = self._local_of[p] = distributed.local_tensor(p)
                    if not is_dense(local):
                        raise ValueError(
                            "parameters must be dense (contiguous or a permutation of contiguous, "
                            f"such as channels_last); got shape {tuple(p.shape)} strides {p.stride()}"
                        )
                    by_device.setdefault(local.device, []).append(p)
            self._states = {
                device: DeviceState([self._local_of[p] for p in params], with_momentum=self._uses_momentum)
                for device, params in by_device.items()
            }
            for state, params in zip(self._states.values(), by_device.values(), strict=True):
                self._adopt_state(state, params)
            self._norm_groups = distributed.norm_groups(self._local_of, self.process_group)
        return self._states

    def _adopt_state(self, state: DeviceState, params: list[Tensor]) -> None:
        """Move momentum found in ``self.state`` into the flat buffers, then expose views.

        ``params`` are the parameters themselves, whose local parts ``state`` holds.
        """
        if state.momentum is None:
            return
        for slot, p in enumerate(params):
            entry = self.state[p]
            if "momentum" in entry:
                state.momentum[slot].copy_(distributed.local_tensor(entry["momentum"]))
                state.seeded[slot].copy_(torch.as_tensor(entry.get("momentum_seeded", 1.0)))
            entry["momentum"] = distributed.like_param(state.momentum[slot], p)
            entry["momentum_seeded"] = state.seeded[slot]

    def _group_table(self, device: torch.device, hparams: list[tuple]) -> Tensor:
        """The fp32 ``[groups, COEF_COLUMNS]`` hyperparameter table on ``device``, copied only on change."""
        key = tuple(hparams)
        cached = self._tables.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        # adaptive_eta and fisher_eta are 0 (off) until the groups carry them.
        rows = torch.tensor([[float(v) for v in h] + [0.0, 0.0] for h in hparams], dtype=torch.float32)
        assert rows.shape[1] == COEF_COLUMNS
        table = cached[1] if cached is not None else torch.empty_like(rows, device=device)
        table.copy_(rows)
        self._tables[device] = (key, table)
        return table

    def _check_grad(self, grad: Tensor) -> None:
        if grad.layout != torch.strided:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; use dense "
                "gradients (e.g. nn.Embedding(sparse=False))"
            )

    def _step_plans(self, hparams: list[tuple]) -> list[tuple[ModuleType, DevicePlan]]:
        states = self._device_states()
        members: dict[tuple, tuple[list[int], list[int], list[Tensor]]] = {}
        chosen: dict[str, ModuleType] = {}
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                self._check_grad(grad)
                grad, p = distributed.local_tensor(grad), self._local_of[p]
                if grad.stride() != p.stride():
                    grad = torch.empty_like(p).copy_(grad)
                device_type = p.device.type
                if device_type not in chosen:
                    chosen[device_type] = backends.resolve(self.backend, device_type)
                backend = chosen[device_type]
                if not backend.supports(p.dtype):
                    backend = backends.resolve("torch", device_type)
                state = states[p.device]
                slots, groups, grads = members.setdefault((p.device, backend.name), ([], [], []))
                slots.append(state.slot_of[p])
                groups.append(group_index)
                grads.append(grad)
        plans = []
        for (device, backend_name), (slots, groups, grads) in members.items():
            key = (device, backend_name, tuple(slots), tuple(groups))
            if key not in self._plans:
                self._plans[key] = (
                    backends.resolve(backend_name, device.type),
                    build_plan(states[device], slots, groups, self.eps),
                )
            backend, plan = self._plans[key]
            plan.grads = grads
            plan.group_hparams = hparams
            refresh_coefficients(plan, self._group_table(device, hparams))
            plans.append((backend, plan))
        return plans

    def sync_hyperparameters(self) -> None:
        """Copy the param groups' ``rho``/``sigma``/``lmbda`` to the device tables now.

        ``first_step`` does this itself. Call it when replaying a captured CUDA graph, after
        changing one of them: a replay runs no Python. (``adaptive`` decides which kernels
        run, so changing it needs a new capture.)
        """
        hparams = [self._hparams(i, g) for i, g in enumerate(self.param_groups)]
        for device in self._device_states():
            self._group_table(device, hparams)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Move every parameter with a gradient to its perturbed point ``p + e``.

        With ``grad_scaler``, the gradients are still scaled (do not call
        ``scaler.unscale_`` before this): they are unscaled on the fly as they are read.
        Pass the same scaler to :meth:`second_step`.
        """
        if self._pending.perturbed:
            raise RuntimeError(
                "first_step() was called twice without second_step(); the order is "
                "first_step(), a second forward/backward, then second_step()"
            )
        main = self._main_device()
        hparams = [self._hparams(i, g) for i, g in enumerate(self.param_groups)]
        inv_scale = amp.inverse_scale(grad_scaler) if grad_scaler is not None else None
        if self.backend == backends.REFERENCE:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._check_grad(p.grad)
            if grad_scaler is not None:
                self._reference_saved_momentum = {
                    p: self.state[p]["momentum"].clone() if "momentum" in self.state[p] else None
                    for group in self.param_groups
                    for p in group["params"]
                }
            skipped = reference.first_step(
                self.param_groups,
                self.state,
                self._reference_backups,
                eps=self.eps,
                with_momentum=self._uses_momentum,
                inv_scale=inv_scale,
            )
            found_inf = torch.tensor(float(skipped), device=main)
            self._pending.plans = []
        else:
            plans = self._step_plans(hparams)
            if grad_scaler is not None:
                for state in self._device_states().values():
                    state.save_momentum()
            total = torch.zeros((), dtype=torch.float32, device=main)
            for backend, plan in plans:
                plan.inv_scale = inv_scale.to(plan.device) if inv_scale is not None else None
                total = total + backend.sq_norm(plan).to(main)
            total = self._reduce_sq_norm(total)
            step_ok = torch.isfinite(total)
            for backend, plan in plans:
                backend.perturb_(plan, total.to(plan.device))
                mark_seeded(plan, step_ok.to(device=plan.device, dtype=torch.float32))
            found_inf = (~step_ok).float()
            self._pending.plans = plans
        self._pending.found_inf = found_inf
        self._pending.perturbed = True
        if zero_grad:
            self.zero_grad()

    def _reduce_sq_norm(self, total: Tensor) -> Tensor:
        """The squared norm over all devices of this process, summed over sharding ranks."""
        total = distributed.all_reduce_sum_(total, self._norm_groups)
        if self.replica_group is not None:
            total = distributed.nonfinite_if_any_rank(total, self.replica_group)
        return total

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
        if self.backend == backends.REFERENCE:
            reference.restore(self._reference_backups)
        else:
            for backend, plan in self._pending.plans:
                backend.restore_(plan)
        found_inf = self._pending.found_inf
        if grad_scaler is not None and grad_scaler.is_enabled():
            found_inf = amp.step_found_inf(grad_scaler, self, found_inf)
            self._rollback_momentum(found_inf)
        self._base_step(found_inf)
        self._skipped += found_inf.to(self._skipped.device)
        self._pending.perturbed = False
        # LR schedulers attached to this optimizer check this flag to confirm that a step
        # ran before theirs; second_step is where our step completes.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def _rollback_momentum(self, found_inf: Tensor) -> None:
        """Undo this step's momentum update where the second pass overflowed."""
        if self.backend == backends.REFERENCE:
            if bool(found_inf):  # the reference loop may read back; it is the oracle
                for p, saved in self._reference_saved_momentum.items():
                    if saved is None:
                        self.state[p].pop("momentum", None)
                    else:
                        self.state[p]["momentum"] = saved
            return
        for device, state in self._device_states().items():
            state.rollback_momentum(found_inf.to(device))

    def _base_step(self, found_inf: Tensor) -> None:
        base = self.base_optimizer
        flag = self._base_found_inf
        if flag is not None:
            if getattr(base, "found_inf", None) is not flag:
                base.found_inf = flag  # someone (a GradScaler.step on the base) took it away
            flag.copy_(found_inf)
            try:
                base.step()
            finally:
                flag.zero_()  # a direct base_optimizer.step() later is not skipped
        elif not bool(found_inf):  # the one host sync, for base optimizers that cannot skip on the device
            base.step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A whole step: ``first_step``, ``closure()`` (forward and backward), ``second_step``.

        Call it after the first forward/backward, as with the authors' optimizer; the
        closure runs with gradients enabled and its return value is returned.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that runs the forward and "
                "backward pass at the perturbed point; or call first_step() and second_step()"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients (reading it syncs)."""
        return int(self._skipped.item())

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Our state (``momentum`` per parameter), the param groups, and the base optimizer's state."""
        state_dict = super().state_dict()
        state_dict["base_optimizer"] = self.base_optimizer.state_dict()
        state_dict["fsam_fused"] = {"skipped_steps": self._skipped.clone()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer, or of the authors' ``FriendlySAM``.

        Momentum stays fp32 whatever the parameter dtype. A checkpoint without the base
        optimizer's state (the authors' format) leaves the base optimizer's state empty.
        """
        if self._pending.perturbed:
            raise RuntimeError("load_state_dict() between first_step() and second_step() is not supported")
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
        new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, entry in state_dict["state"].items():
            p = id_to_param[key]
            if not (self._uses_momentum and "momentum" in entry):
                continue
            seeded = torch.as_tensor(entry.get("momentum_seeded", 1.0)).float().clone()
            if self.backend == backends.REFERENCE and not bool(seeded):
                continue  # the reference loop keeps momentum only once it is seeded
            new_state[p]["momentum"] = entry["momentum"].to(device=p.device, dtype=torch.float32, copy=True)
            if self.backend != backends.REFERENCE:
                new_state[p]["momentum_seeded"] = seeded
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
        self._invalidate()
        if self.backend != backends.REFERENCE:
            self._device_states()


class SAM(FriendlySAM):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021), fused.

    A drop-in for the widely used PyTorch ``SAM`` wrapper: F-SAM with ``sigma = 0``,
    keeping no momentum at all. ``adaptive=True`` is ASAM.
    """

    _uses_momentum = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eps: float = 1e-12,
        backend: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
        **base_optimizer_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            sigma=0.0,
            lmbda=0.0,
            adaptive=adaptive,
            eps=eps,
            backend=backend,
            process_group=process_group,
            replica_group=replica_group,
            **base_optimizer_kwargs,
        )

    def _hparams(self, index: int, group: dict[str, Any]) -> tuple[float, float, float, bool]:
        rho, _, _, adaptive = super()._hparams(index, group)
        return rho, 0.0, 0.0, adaptive
