"""The extension's link flags keep a statically linked C++ runtime private to the extension.

Some toolchains link libstdc++ statically into every shared object: the g++ wrapper of the
H200 image we test on finds only libstdc++.a. The extension then carries a second copy of the
C++ runtime next to the one torch loaded. Without `--exclude-libs,ALL`, that copy's exported
data (the locale ids, the classic locale) resolves to torch's copy while its code stays the
extension's, and formatting a number into a stream (every error message that names an index
or a count) read the wrong facet: on the H200 it crashed the process, here it cut the message
short. The probe below is that situation in a few lines: a shared object linked like the
extension but with `-static-libstdc++`, loaded into a process that already holds torch.
"""

import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

import build_ext

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared objects only")

PROBE = textwrap.dedent(
    """
    #include <cstring>
    #include <sstream>
    #include <string>

    extern "C" int format_count(unsigned long n, char* out, int capacity) {
      std::ostringstream message;
      message << "backup has " << n << " tensors";
      const std::string text = message.str();
      std::strncpy(out, text.c_str(), capacity - 1);
      out[capacity - 1] = 0;
      return static_cast<int>(text.size());
    }
    """
)

LOAD_AND_FORMAT = textwrap.dedent(
    """
    import ctypes, sys
    import torch  # loads the shared libstdc++ first, as it is when the extension loads
    probe = ctypes.CDLL(sys.argv[1])
    out = ctypes.create_string_buffer(64)
    probe.format_count(ctypes.c_ulong(2), out, 64)
    print(out.value.decode())
    """
)


def compiler() -> list[str]:
    cxx = shlex.split(os.environ.get("CXX", "c++"))  # what torch's extension builder uses
    if not cxx or shutil.which(cxx[0]) is None:
        pytest.fail(f"no C++ compiler {cxx!r}: the extension itself could not have been built")
    return cxx


def test_the_extension_links_with_these_flags(monkeypatch):
    monkeypatch.delenv("FSAM_FUSED_NO_EXT", raising=False)
    assert [ext.extra_link_args for ext in build_ext.extensions()] == [build_ext.LINK_FLAGS]


def test_a_statically_linked_cxx_runtime_still_formats_numbers(tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)
    library = tmp_path / "probe.so"
    link = [*compiler(), "-shared", "-fPIC", "-O1", str(source), "-o", str(library), "-static-libstdc++"]
    built = subprocess.run(link + build_ext.LINK_FLAGS, capture_output=True, text=True)
    if built.returncode != 0 and "lstdc++" in built.stderr:
        pytest.skip(f"this toolchain has no static libstdc++ to link: {built.stderr.strip()[-200:]}")
    assert built.returncode == 0, built.stderr
    ran = subprocess.run(
        [sys.executable, "-c", LOAD_AND_FORMAT, str(library)], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, f"the probe process died ({ran.returncode}): {ran.stderr[-2000:]}"
    assert ran.stdout.strip() == "backup has 2 tensors"
