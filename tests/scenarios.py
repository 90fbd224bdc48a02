"""Random training scenarios for the property tests: what happens to an optimizer, step by step.

A :class:`Scenario` is plain data (shapes, dtypes, groups, and per-step events), drawn by the
hypothesis strategy :func:`scenarios` and replayed by :mod:`tests.lockstep` on an optimizer and
on the fp64 oracle side by side. Being data, a failing scenario prints in full and shrinks.

What the strategy draws:
  - a model: parameters of 0-d, empty, odd and chunk-crossing sizes, 4-d ones in channels_last,
    each fp32, bf16, fp16 or fp64 (fp64 goes to the torch backend), over 1-3 param groups;
  - FriendlySAM or SAM, and each group's rho, sigma (0 included), lmbda, adaptive,
    adaptive_eta and fisher_eta;
  - the base optimizer: PlainSGD with or without a momentum buffer (mirrored by the oracle), or
    torch's SGD/AdamW, fused or not (the oracle steps a twin of it);
  - optionally a GradScaler and a ``sam_interval``;
  - per step: hyperparameter changes (a schedule), parameters moved to another group, storage
    swaps (``p.data = ...``: a new storage, another dtype, another memory layout), which
    parameters get a gradient in each pass, gradients laid out unlike their parameter, and
    injected NaN, Inf or huge values.

Not drawn yet (tests/test_edits_between_steps.py holds them one by one; drawing them needs the
oracle and the lockstep to follow a changing parameter list): ``add_param_group``,
``nn.Parameter(p.data)`` rewraps, and assigning ``param_groups``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

# Storage swaps, as ``p.data = SWAPS[name](p.data)``.
SWAPS = {
    "clone": lambda t: t.clone(),
    "float": lambda t: t.float(),
    "double": lambda t: t.double(),
    "half": lambda t: t.half(),
    "bfloat16": lambda t: t.bfloat16(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "contiguous": lambda t: t.contiguous(),
}
DTYPE_SWAPS = ("float", "double", "half", "bfloat16")
LAYOUT_SWAPS = ("channels_last", "contiguous")  # 4-d parameters only

# Values injected into one gradient element. HUGE is finite, but its square overflows fp32.
HUGE = 1e25
POISONS = (math.nan, math.inf, -math.inf, HUGE)

# Base optimizers: PlainSGD's are mirrored by the oracle itself; torch's by a twin instance.
PLAIN_BASES = ("plain", "plain_momentum")
TORCH_BASES = ("sgd", "sgd_fused", "adamw_fused")
FUSED_BASES = ("sgd_fused", "adamw_fused")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = (
    (),
    (0,),
    (1,),
    (7,),
    (17,),
    (129,),
    (1031,),
    (3, 5),
    (2, 0, 3),
    (4, 3, 3, 3),
    (2, 5, 1, 3),
    (6, 4, 2, 2),
)
HYPER_VALUES = dict(
    rho=(0.0, 0.01, 0.05, 0.2, 0.5),
    sigma=(0.0, 0.5, 1.0, 2.0),
    lmbda=(0.0, 0.3, 0.6, 0.9, 1.0),
    adaptive=(False, True),
    adaptive_eta=(0.0, 0.01, 0.1),
    fisher_eta=(0.0, 0.1, 1.0),
)


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False


@dataclass(frozen=True)
class Grads:
    """One backward pass: who gets a gradient, how it is laid out, what is injected into it."""

    present: tuple[bool, ...]
    scale: float = 1.0
    foreign_layout: bool = False  # each gradient in a memory layout unlike its parameter's
    poison: tuple[tuple[int, float, float], ...] = ()  # (parameter, where in it as a fraction, value)


@dataclass(frozen=True)
class Step:
    changes: tuple[tuple[int, str, object], ...]  # (group, key, value), applied before the step
    swaps: tuple[tuple[int, str], ...]  # (parameter, SWAPS name), applied before the step
    first: Grads
    second: Grads  # unused on a plain step (sam_interval), which takes ``first``
    seed: int
    # (parameter, group): moved there from its group before the step (unless that would empty it)
    moves: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Scenario:
    sam: bool  # the SAM class (no momentum) rather than FriendlySAM
    groups: tuple[tuple[ParamSpec, ...], ...]
    hyper: tuple[dict, ...]  # each group's initial values
    base: str
    scaler: tuple[int, int] | None  # (log2 of the initial scale, growth interval), or no GradScaler
    sam_interval: int
    steps: tuple[Step, ...]

    @property
    def params(self) -> list[ParamSpec]:
        """Every parameter, in the optimizer's order (group by group)."""
        return [spec for group in self.groups for spec in group]

    @property
    def group_of(self) -> list[int]:
        return [g for g, group in enumerate(self.groups) for _ in group]


def _hyper() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({key: st.sampled_from(values) for key, values in HYPER_VALUES.items()})


@st.composite
def _param(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...]) -> ParamSpec:
    shape = draw(st.one_of(st.sampled_from(SHAPES), st.lists(st.integers(1, 6), max_size=4).map(tuple)))
    return ParamSpec(shape, draw(st.sampled_from(dtypes)), len(shape) == 4 and draw(st.booleans()))


@st.composite
def _grads(
    draw: st.DrawFn, n: int, poison_values: tuple[float, ...], *, all_present: bool, foreign: bool
) -> Grads:
    everyone = st.just((True,) * n)
    present = draw(
        everyone
        if all_present
        else st.one_of(everyone, st.lists(st.booleans(), min_size=n, max_size=n).map(tuple))
    )
    poison = ()
    if poison_values and draw(st.integers(0, 4)) == 0:  # one pass in five
        where = st.tuples(
            st.integers(0, n - 1), st.floats(0, 1, exclude_max=True), st.sampled_from(poison_values)
        )
        poison = tuple(draw(st.lists(where, min_size=1, max_size=2)))
    return Grads(
        present, draw(st.sampled_from((1.0, 1e-3, 8.0))), foreign and draw(st.integers(0, 5)) == 0, poison
    )


@dataclass(frozen=True)
class _Limits:
    """What a scenario's base optimizer and GradScaler allow its steps to do."""

    n_groups: int
    swaps: tuple[str, ...]
    scaled: bool
    fused_sgd: bool
    foreign: bool


@st.composite
def _step(draw: st.DrawFn, params: list[ParamSpec], limits: _Limits) -> Step:
    n = len(params)
    changes = ()
    if draw(st.integers(0, 2)) == 0:
        key = st.sampled_from(tuple(HYPER_VALUES))
        change = key.flatmap(
            lambda k: st.tuples(
                st.integers(0, limits.n_groups - 1), st.just(k), st.sampled_from(HYPER_VALUES[k])
            )
        )
        changes = tuple(draw(st.lists(change, min_size=1, max_size=3)))
    chosen = ()
    if limits.swaps and draw(st.integers(0, 3)) == 0:
        swap = st.integers(0, n - 1).flatmap(
            lambda i: st.tuples(
                st.just(i),
                st.sampled_from(limits.swaps + (LAYOUT_SWAPS if len(params[i].shape) == 4 else ())),
            )
        )
        chosen = tuple(draw(st.lists(swap, min_size=1, max_size=2)))
    # Every gradient a fused SGD base sees is present: torch's fused SGD with momentum fails on a
    # parameter that joins after its first step (TypeError in _fused_sgd_, torch's own limit).
    first = draw(_grads(n, POISONS, all_present=limits.fused_sgd, foreign=limits.foreign))
    # Without a GradScaler nothing checks the second pass: its gradients go to the base step as they are.
    second = draw(
        _grads(
            n,
            (math.nan, math.inf) if limits.scaled else (),
            all_present=limits.fused_sgd,
            foreign=limits.foreign,
        )
    )
    moves = ()
    if limits.n_groups > 1 and draw(st.integers(0, 5)) == 0:
        move = st.tuples(st.integers(0, n - 1), st.integers(0, limits.n_groups - 1))
        moves = tuple(draw(st.lists(move, min_size=1, max_size=2)))
    return Step(changes, chosen, first, second, draw(st.integers(0, 2**31 - 1)), moves)


@st.composite
def scenarios(draw: st.DrawFn, max_steps: int = 12) -> Scenario:
    """A whole scenario; ``max_steps`` bounds its length."""
    scaler = draw(st.one_of(st.none(), st.tuples(st.integers(0, 12), st.sampled_from((1, 2, 1000)))))
    base = draw(st.sampled_from(PLAIN_BASES + TORCH_BASES))
    sam_interval = draw(st.sampled_from((1, 1, 2, 3)))
    # GradScaler.unscale_ refuses fp16 gradients; torch's fused bases refuse a buffer of another dtype.
    dtypes = tuple(d for d in DTYPES if not (scaler and d == torch.float16))
    swaps = ("clone",) if base in TORCH_BASES else ("clone", *DTYPE_SWAPS)
    if scaler:
        swaps = tuple(s for s in swaps if s != "half")
    groups = tuple(
        tuple(draw(st.lists(_param(dtypes), min_size=1, max_size=3))) for _ in range(draw(st.integers(1, 3)))
    )
    params = [spec for group in groups for spec in group]
    limits = _Limits(
        n_groups=len(groups),
        swaps=swaps,
        scaled=scaler is not None,
        fused_sgd=base == "sgd_fused",
        # torch's fused optimizers read a gradient as if it had its parameter's strides.
        foreign=base not in FUSED_BASES,
    )
    steps = draw(st.lists(_step(params, limits), min_size=1, max_size=max_steps))
    return Scenario(
        sam=draw(st.booleans()),
        groups=groups,
        hyper=tuple(draw(_hyper()) for _ in groups),
        base=base,
        scaler=scaler,
        sam_interval=sam_interval,
        steps=tuple(steps),
    )
