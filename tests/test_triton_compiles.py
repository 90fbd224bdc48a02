"""Every Triton kernel compiles to a CUDA binary (sm_90), no GPU needed.

The interpreter runs kernels as Python and misses what only the compiler rejects (for
example a non-constexpr global read inside a kernel), so CI compiles them too. What gets
compiled is what the op wrappers launch: each wrapper runs on CPU tensors with Triton's
launch replaced by a recorder, and the recorded arguments give every kernel's signature,
constexprs and compile options. A wrapper that autotuned would need a GPU to time its
candidates, so recording also proves that each launch carries its one fixed configuration.
"""

import functools
import inspect
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "kernels imported under TRITON_INTERPRET=1 are not compilable objects", allow_module_level=True
    )

from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from fsam_fused.backends import triton_backend  # noqa: E402
from fsam_fused.plan import COEF_COLUMNS  # noqa: E402

kernels = triton_backend.kernels
TARGET = triton.backends.compiler.GPUTarget("cuda", 90, 32)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run_wrappers(dtype: torch.dtype) -> None:
    """One call of each op wrapper on a small CPU plan with momentum and a loss scale."""
    params = [torch.randn(n).to(dtype) for n in (5, 40)]
    arrays = kernels.PlanArrays(params, [p.clone() for p in params], [torch.zeros(p.shape) for p in params],
                                [p.clone() for p in params])  # fmt: skip
    coef, inv_scale, total = torch.zeros(len(params), COEF_COLUMNS), torch.ones(()), torch.ones(())
    kernels.sq_norm(arrays, coef, inv_scale, torch.empty(()))
    kernels.perturb_(arrays, coef, inv_scale, total, 1e-12)
    kernels.restore_(arrays)


@functools.cache
def _launches(dtype: torch.dtype) -> dict[str, tuple[JITFunction, dict, dict]]:
    """``{kernel name: (kernel, bound arguments, launch options)}`` of the wrappers' launches."""
    launches = {}

    def record(fn, *args, grid, warmup, **kwargs):
        names = set(fn.arg_names)
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        launches[fn.__name__] = (fn, dict(bound.arguments), options)

    original = JITFunction.run
    JITFunction.run = record
    try:
        _run_wrappers(dtype)
    finally:
        JITFunction.run = original
    return launches


KERNELS = sorted(_launches(torch.float32))


@functools.cache
def _compile(kernel: str, dtype: torch.dtype, **option_overrides):
    fn, arguments, options = _launches(dtype)[kernel]
    constexprs = {p.name: arguments[p.name] for p in fn.params if p.is_constexpr}
    signature = {p.name: "constexpr" if p.is_constexpr else mangle_type(arguments[p.name]) for p in fn.params}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={**options, **option_overrides})


FMA = re.compile(r"\bfma\.rn(\.ftz)?\.f32\b")


def test_the_wrappers_launch_every_kernel():
    assert KERNELS == ["_partials_kernel", "_perturb_kernel", "_restore_kernel", "_sum_kernel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_sm90(kernel, dtype):
    assert _compile(kernel, dtype).asm["cubin"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp32_kernels_have_no_fused_multiply_adds(kernel):
    """Compiled with fp fusion off, the kernels round every product like the native build."""
    assert not FMA.search(_compile(kernel, torch.float32).asm["ptx"]), f"{kernel} has an FMA"


def test_fp_fusion_would_show_as_fmas_in_the_perturb_kernel():
    """The check above can fail: with fusion on, the EMA and the direction become FMAs."""
    assert FMA.search(_compile("_perturb_kernel", torch.float32, enable_fp_fusion=True).asm["ptx"])


# Streaming kernels reach full bandwidth only with 16-byte accesses (kernels/vector.py).
VECTOR_ACCESSES = {
    "_partials_kernel": ("ld.global.v4",),
    "_perturb_kernel": ("ld.global.v4", "st.global.v4"),
    "_restore_kernel": ("ld.global.v4", "st.global.v4"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
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
