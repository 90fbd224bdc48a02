"""Every Triton kernel compiles to a CUDA binary (sm_90), no GPU needed.

The interpreter runs kernels as Python and misses what only the compiler rejects (for
example a non-constexpr global read inside a kernel), so CI compiles them too.
"""

import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "kernels imported under TRITON_INTERPRET=1 are not compilable objects", allow_module_level=True
    )

from fsam_fused.backends import triton_backend  # noqa: E402

TARGET = triton.backends.compiler.GPUTarget("cuda", 90, 32)
TABLE = {"table": "*i64", "n": "i32", "block_map": "*i64"}
FLAGS = {
    "ELEMENT": "constexpr",
    "HAS_MOMENTUM": "constexpr",
    "HAS_INV_SCALE": "constexpr",
    "BLOCK": "constexpr",
}
STEP_ARGS = {"coef": "*fp32", "inv_scale": "*fp32"}
KERNELS = {
    "sq_norm._partials_kernel": {**TABLE, **STEP_ARGS, "partials": "*fp32", **FLAGS},
    "perturb._perturb_kernel": {**TABLE, **STEP_ARGS, "total_sq_norm": "*fp32", "eps": "fp32", **FLAGS},
    "restore._restore_kernel": {**TABLE, "ELEMENT": "constexpr", "BLOCK": "constexpr"},
    "sq_norm._sum_kernel": {"values": "*fp32", "count": "i32", "out": "*fp32", "BLOCK": "constexpr"},
}
CONSTEXPRS = {"ELEMENT": None, "HAS_MOMENTUM": True, "HAS_INV_SCALE": True, "BLOCK": 2048}


def _compile(kernel: str, dtype: torch.dtype):
    module_name, function_name = kernel.split(".")
    module = importlib.import_module(f"{triton_backend.kernels.__name__}.{module_name}")
    signature = KERNELS[kernel]
    constexprs = {**CONSTEXPRS, "ELEMENT": triton_backend.kernels.ELEMENT_TYPES[dtype]}
    source = triton.compiler.ASTSource(
        fn=getattr(module, function_name),
        signature=signature,
        constexprs={k: v for k, v in constexprs.items() if k in signature},
    )
    return triton.compile(source, target=TARGET, options={"num_warps": 8})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_sm90(kernel, dtype):
    assert _compile(kernel, dtype).asm["cubin"]


# Streaming kernels reach full bandwidth only with 16-byte accesses (kernels/vector.py).
VECTOR_ACCESSES = {
    "sq_norm._partials_kernel": ("ld.global.v4",),
    "perturb._perturb_kernel": ("ld.global.v4", "st.global.v4"),
    "restore._restore_kernel": ("ld.global.v4", "st.global.v4"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel", VECTOR_ACCESSES)
def test_aligned_chunks_are_read_and_written_with_16_byte_vectors(kernel, dtype):
    ptx = _compile(kernel, dtype).asm["ptx"]
    for access in VECTOR_ACCESSES[kernel]:
        assert access in ptx, f"{kernel} ({dtype}) has no {access}"


# Registers per thread that leave room for 4 programs of 256 threads on an SM (65536
# registers): with fewer resident programs, too few bytes are in flight to keep HBM busy.
REGISTER_BUDGET = 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", VECTOR_ACCESSES)
def test_streaming_kernels_fit_the_register_budget(kernel, dtype, tmp_path):
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip(f"no ptxas bundled with triton at {ptxas}")
    compiled = _compile(kernel, dtype)
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    arch = re.search(r"\.target (sm_\w+)", compiled.asm["ptx"])[1]
    result = subprocess.run(
        [str(ptxas), "-v", f"-arch={arch}", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    registers = int(re.search(r"Used (\d+) registers", result.stdout + result.stderr)[1])
    assert registers <= REGISTER_BUDGET, f"{kernel} ({dtype}) uses {registers} registers per thread"
