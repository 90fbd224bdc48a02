"""The per-group F-SAM hyperparameters: their checks and their table on each device.

Kernels read a group's ``rho``, ``sigma``, ``lmbda``, ``adaptive``, ``adaptive_eta`` and
``fisher_eta`` from an fp32 ``[groups, COEF_COLUMNS]`` device table (the plan turns it into
one row per tensor), so a schedule that changes them between steps needs neither a new
kernel nor a new CUDA graph: only the table's contents change.

The two etas select the SAM variant of the normalisation operator T (DESIGN.md section 1):
``adaptive_eta`` is ASAM's eta (T = |w| + eta where adaptive), ``fisher_eta`` Fisher SAM's
(T^2 = 1 / (1 + fisher_eta * g^2)); both 0 is the plain (or plainly adaptive) update.
"""

from __future__ import annotations

import math
import numbers
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .upload import Staging, capturing

GROUP_KEYS = ("rho", "sigma", "lmbda", "adaptive", "adaptive_eta", "fisher_eta")
# Columns of the table, shared with csrc/fsam_math.h and kernels/fsam_math.py.
RHO, SIGMA, LMBDA, ADAPTIVE, ADAPTIVE_ETA, FISHER_ETA = range(6)
COEF_COLUMNS = 6

Row = tuple[float, ...]


def _real(name: str, value: Any, where: str) -> float:
    # numbers.Real admits Python and NumPy floats and ints alike (np.float32 included); bool
    # is an int, but a flag given for a radius is a mistake.
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{where}, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # False for NaN too
        raise ValueError(f"{name} must be finite{where}, got {value}")
    return value


def check_values(
    where: str, rho: Any, sigma: Any, lmbda: Any, adaptive: Any, adaptive_eta: Any, fisher_eta: Any
) -> Row:
    """Validate one group's values and return its table row; errors name the argument."""
    reals = dict(rho=rho, sigma=sigma, lmbda=lmbda, adaptive_eta=adaptive_eta, fisher_eta=fisher_eta)
    values = {name: _real(name, value, where) for name, value in reals.items()}
    for name in ("rho", "sigma", "adaptive_eta", "fisher_eta"):
        if values[name] < 0:
            raise ValueError(f"{name} must be >= 0{where}, got {values[name]}")
    if not 0.0 <= values["lmbda"] <= 1.0:
        raise ValueError(f"lmbda must lie in [0, 1]{where}, got {values['lmbda']}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be True or False{where}, got {adaptive!r}")
    return (
        float(values["rho"]),
        float(values["sigma"]),
        float(values["lmbda"]),
        float(adaptive),
        float(values["adaptive_eta"]),
        float(values["fisher_eta"]),
    )


# Value types whose objects never change value (so the same object means the same value).
_IMMUTABLE = (int, float, bool)
_group_values = operator.itemgetter(*GROUP_KEYS)


class CheckedRows:
    """Each param group's checked table row, checked again only where a value was replaced.

    Every step reads every group's values. Checking them (types, ranges) cost about 7 us per group
    per step in Python: most of a step's host time for a model with a param group per layer (layer-
    wise learning rates), on any device. A value that is the same object as at the group's last
    check is the same value when it is an ``int``, ``float`` or ``bool`` (immutable), so the row
    checked then serves; a schedule that assigns a new value has it checked. Groups holding any
    other kind of value (a NumPy scalar, a Tensor given by mistake) are checked at every step.
    SAM (no momentum) has sigma = lmbda = 0 in its rows.
    """

    def __init__(self, *, with_momentum: bool) -> None:
        self.with_momentum = with_momentum
        self._checked: list[tuple[tuple[Any, ...], Row] | None] = []  # per group: (values, row)

    def rows(self, groups: Sequence[dict[str, Any]]) -> tuple[Row, ...]:
        """The table rows of ``groups`` (a ``param_groups`` list); raises as :func:`check_values`."""
        checked = self._checked
        del checked[len(groups) :]
        checked.extend([None] * (len(groups) - len(checked)))
        out = []
        for index, group in enumerate(groups):
            values = _group_values(group)
            seen = checked[index]
            if seen is not None and all(map(operator.is_, values, seen[0])):
                out.append(seen[1])
                continue
            row = check_values(f" (param group {index})", *values)
            if not self.with_momentum:
                row = (row[RHO], 0.0, 0.0, *row[ADAPTIVE:])
            checked[index] = (values, row) if all(type(v) in _IMMUTABLE for v in values) else None
            out.append(row)
        return tuple(out)


# What the compiled-graph op below reads the rows from, by id (see GroupTable.refresh).
_ROW_SOURCES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


@torch.library.custom_op("fsam_fused_py::load_group_table", mutates_args=("table",))
def _load_group_table(table: Tensor, source_id: int) -> None:
    source = _ROW_SOURCES[source_id]
    source._staging.upload(source.rows_now(), table)


@_load_group_table.register_fake
def _(table: Tensor, source_id: int) -> None:
    return None


class GroupTable:
    """The fp32 ``[groups, COEF_COLUMNS]`` table of one device, uploaded only when it changes.

    Args:
        device: where the table lives.
        rows_now: the current (checked) rows; called inside compiled graphs, at run time.
    """

    def __init__(self, device: torch.device, rows_now: Callable[[], tuple[Row, ...]]) -> None:
        self.device = device
        self.rows: tuple[Row, ...] | None = None
        self.tensor: Tensor | None = None
        self.rows_now = rows_now
        self._staging = Staging()
        self.key = id(self)  # read in traced code as a plain int (dynamo cannot guard on id())
        _ROW_SOURCES[self.key] = self

    def refresh(self, rows: tuple[Row, ...] | None) -> Tensor:
        """The device table holding ``rows``; uploads (without a host sync) only on change.

        Inside ``torch.compile`` (``rows`` None), the rows are read by an opaque op when the
        graph runs: reading the values in traced code would make the graph depend on them,
        and a schedule would recompile it. So a compiled step is one graph for any schedule.
        """
        if rows is None:
            assert self.tensor is not None, "an eager step builds the table before a compiled one"
            torch.ops.fsam_fused_py.load_group_table(self.tensor, self.key)
            return self.tensor
        if rows == self.rows:
            return self.tensor
        if capturing(self.device):
            raise RuntimeError(
                "rho, sigma or lmbda changed since the last step, and a CUDA graph capture cannot "
                "upload the new values: call optimizer.sync_hyperparameters() before capturing "
                "(and after each change between replays)"
            )
        if self.tensor is None or self.tensor.shape[0] != len(rows):
            self.tensor = torch.empty((len(rows), COEF_COLUMNS), dtype=torch.float32, device=self.device)
            self._staging = Staging()
        self._staging.upload(rows, self.tensor)
        self.rows = rows
        return self.tensor
