"""Every backend whose dependencies are installed loads.

The registry turns any failure to load an optional backend into "unavailable" (so a
broken Triton cannot break ``import fsam_fused``), and the shared test cases run over the
available backends only; these tests keep a bug in our own backend modules from hiding
as a quietly skipped backend.
"""

import importlib.util

import pytest

from fsam_fused import backends


def test_native_backend_loads_whenever_the_extension_is_built():
    # find_spec, not importorskip: an extension that is there but fails to import must fail.
    if importlib.util.find_spec("fsam_fused._C") is None:
        pytest.skip("the native extension is not built")
    assert backends._load("native") is not None, backends._load_errors.get("native")


def test_triton_backend_loads_whenever_triton_imports():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert backends._load("triton") is not None, backends._load_errors.get("triton")


def test_torch_backend_always_loads():
    assert backends._load("torch") is not None, backends._load_errors.get("torch")
