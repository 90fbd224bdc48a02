"""docs/training_loops.md shows excerpts of files that CI runs; each must still be in its file.

A code block preceded by ``<!-- excerpt: PATH -->`` must appear in PATH as consecutive lines,
compared without indentation and blank lines (an excerpt may come from inside a function).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training_loops.md"
EXCERPT = re.compile(r"<!-- excerpt: (\S+) -->\n```python\n(.*?)```", re.S)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _excerpts() -> list[tuple[str, str]]:
    return EXCERPT.findall(DOC.read_text())


def test_every_code_block_is_a_marked_excerpt():
    blocks = DOC.read_text().count("```python")
    assert blocks == len(_excerpts()), (
        "a python block in the doc has no <!-- excerpt: PATH --> line before it"
    )


@pytest.mark.parametrize(
    ("path", "code"), _excerpts(), ids=[f"{p}:{i}" for i, (p, _) in enumerate(_excerpts())]
)
def test_excerpt_appears_in_its_file(path, code):
    wanted = _lines(code)
    source = _lines((ROOT / path).read_text())
    found = any(source[i : i + len(wanted)] == wanted for i in range(len(source) - len(wanted) + 1))
    assert found, f"docs/training_loops.md shows lines that {path} no longer has:\n{code}"
