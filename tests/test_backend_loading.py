"""Every backend whose dependencies are installed loads.

The registry turns any failure to load an optional backend into "unavailable" (so a
broken Triton cannot break ``import fsam_fused``), and the shared test cases run over the
available backends only; these tests keep a bug in our own backend modules from hiding
as a quietly skipped backend.
"""

import pytest

from fsam_fused import backends


def test_native_backend_loads_whenever_the_extension_is_built():
    pytest.importorskip("fsam_fused._C", reason="the native extension is not built")
    assert backends._load("native") is not None, backends._load_errors.get("native")


def test_triton_backend_loads_whenever_triton_imports():
    pytest.importorskip("triton")
    assert backends._load("triton") is not None, backends._load_errors.get("triton")


def test_torch_backend_always_loads():
    assert backends._load("torch") is not None, backends._load_errors.get("torch")
