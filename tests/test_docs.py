"""The teaching material quotes the code: every quoted line must still be in the package."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(text: str) -> list[list[str]]:
    """The ```python blocks of a Markdown text, as lists of stripped lines (without blank lines and `...` elisions)."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [[line.strip() for line in block.splitlines() if line.strip() not in ("", "...")] for block in blocks]


def is_excerpt(lines: list[str]) -> bool:
    """Blocks that start with a prompt or an import are usage examples, not quotes of the source."""
    return bool(lines) and not lines[0].startswith((">>>", "import ", "from "))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_code_quoted_in_the_docs_is_in_the_package(chapter):
    source_lines = {line.strip() for path in (ROOT / "dpa3_ref").glob("*.py") for line in path.read_text().splitlines()}
    excerpts = [lines for lines in python_blocks(chapter.read_text()) if is_excerpt(lines)]
    stale = [line for lines in excerpts for line in lines if line not in source_lines]
    assert not stale, f"{chapter.name} quotes lines that are no longer in dpa3_ref/: {stale}"


def test_the_excerpt_check_notices_a_changed_line():
    text = "```python\nreturn g.reshape(g.shape[0], -1)\n```\n```python\nreturn g.reshape(-1, g.shape[0])  # changed\n```"
    source_lines = {line.strip() for line in (ROOT / "dpa3_ref" / "repflow.py").read_text().splitlines()}
    found = [all(line in source_lines for line in lines) for lines in python_blocks(text)]
    assert found == [True, False]
