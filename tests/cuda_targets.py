"""What CUDA targets a built ``_C`` library embeds, read with ``cuobjdump``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+PTX)?$")


def requested_targets(arch_list: str) -> tuple[set[str], set[str]]:
    """(``sm_XY`` names that must have ELF code, ``sm_XY`` names that must have PTX) for a
    ``TORCH_CUDA_ARCH_LIST`` string such as ``"8.0;9.0+PTX"``; named archs are ignored."""
    elf, ptx = set(), set()
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = _ARCH.match(entry)
        if match is None:
            continue
        name = f"sm_{match[1]}{match[2]}{match[3]}"
        elf.add(name)
        if match[4]:
            ptx.add(name)
    return elf, ptx


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [Path(CUDA_HOME) / "bin" / "cuobjdump"] if CUDA_HOME else []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def embedded_targets(library: str | Path, cuobjdump: str) -> tuple[set[str], set[str]]:
    """(``sm_XY`` names with ELF code, ``sm_XY`` names with PTX) inside ``library``."""

    def listed(flag: str, suffix: str) -> set[str]:
        result = subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True, check=True)
        out = result.stdout
        return set(re.findall(rf"\.(sm_\d+[a-z]?)\.{suffix}\b", out))

    return listed("--list-elf", "cubin"), listed("--list-ptx", "ptx")


def wide_access_kernels(library: str | Path, cuobjdump: str, arch: str) -> dict[str, set[str]]:
    """For each kernel of ``arch``'s machine code, its 128-bit global accesses (``LDG.E.128``...)."""
    result = subprocess.run(
        [cuobjdump, "-sass", "-arch", arch, str(library)], capture_output=True, text=True, check=True
    )
    kernels: dict[str, set[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            kernels[current] = set()
        elif current is not None:
            kernels[current].update(re.findall(r"\b((?:LDG|STG)\.E\.128)\b", line))
    return kernels
