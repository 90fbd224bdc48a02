"""Backend registry: which implementations of the three ops exist and which one to use.

A backend is a module with ``name``, ``supports(dtype)``, ``sq_norm(plan)``,
``perturb_(plan, total_sq_norm)`` and ``restore_(plan)`` (DESIGN.md section 2), and
``device_types``: the device types it runs on in this installation (None: every device).
``reference`` is the plain per-tensor loop (the test oracle and benchmark baseline); it is
never picked by ``"auto"``.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

REFERENCE = "reference"
AUTO = "auto"

# The order is auto's order of preference.
_FAST_BACKENDS = ("native", "triton", "torch")

_HOW_TO_GET = {
    "native": (
        "the compiled extension fsam_fused._C is not built or does not cover this device; "
        "reinstall from a source checkout with a C++ compiler (and the CUDA toolkit for "
        "CUDA): `pip install --no-build-isolation -e .`, without FSAM_FUSED_NO_EXT set"
    ),
    "triton": (
        "the Triton backend needs the `triton` package (`pip install triton`) and a CUDA "
        "device (or TRITON_INTERPRET=1 to run it on the CPU)"
    ),
    "torch": "",
    "reference": "",
}

_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except Exception as exc:  # noqa: BLE001
            # An optional backend that cannot load (a missing or incompatible triton, an
            # extension built for another torch) is unavailable, with the reason kept for
            # the error that asks for it; it must not break importing the package. A
            # failure other than a missing module is said aloud, since "auto" then quietly
            # picks a slower backend.
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ImportError):
                warnings.warn(
                    f"fsam_fused: the {name} backend failed to load and is unavailable: {_load_errors[name]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _loaded[name]


_MODULES = {"native": "native", "triton": "triton_backend", "torch": "foreach", "reference": "reference"}


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` that work in this installation, best first.

    ``"auto"`` is always accepted as well and picks per device (see :func:`resolve`).
    """
    names = [n for n in _FAST_BACKENDS if _load(n) is not None]
    return names + [REFERENCE]


def known_backends() -> tuple[str, ...]:
    """Every name ``backend=`` accepts, available here or not."""
    return (AUTO, *_FAST_BACKENDS, REFERENCE)


def check_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is not a backend at all."""
    if name not in known_backends():
        raise ValueError(f"backend={name!r} is not a backend; choose one of {known_backends()}")


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend ``name`` (not ``"auto"``) is available here for tensors of ``device_type``."""
    module = _load(name)
    return module is not None and (module.device_types is None or device_type in module.device_types)


def resolve(name: str, device_type: str) -> ModuleType:
    """The backend module to use for tensors of ``device_type``.

    ``"auto"`` takes the first of native, triton, torch that runs on that device type.
    An explicit name that cannot run here raises ``RuntimeError`` saying how to get it.
    """
    check_name(name)
    candidates = _FAST_BACKENDS if name == AUTO else (name,)
    for candidate in candidates:
        if runs_on(candidate, device_type):
            return _load(candidate)
    reason = _load_errors.get(name, f"it does not run on {device_type!r} tensors in this installation")
    raise RuntimeError(f"backend={name!r} is not available: {reason}. {_HOW_TO_GET[name]}".rstrip(". ") + ".")
