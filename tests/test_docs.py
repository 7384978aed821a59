"""The documentation stays true: its Python blocks run, its relative links resolve, CI runs the README's command.

Python blocks of README.md and docs/*.md run in order, one namespace per file, in a temporary working
directory. A block whose previous line is ``<!-- not run: REASON -->`` is skipped (it needs a trained
checkpoint, a GPU, a data set that is not shipped, or minutes of CPU); the reason must be given.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_FILES = [
    *RUN_FILES,
    *sorted((ROOT / "benchmarks" / "results").glob("*/README.md")),
    *sorted((ROOT / "benchmarks" / "results" / "archive").glob("*/README.md")),
    *sorted((ROOT / "benchmarks" / "robustness").glob("*.md")),
]
NOT_RUN = re.compile(r"^<!-- not run: (.+\S) -->$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _fenced_blocks(text: str) -> list[tuple[str, int, str, str]]:
    """(info string, 1-based line of the opening fence, the line before it, body) of each fenced block."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, info = i, lines[i][3:].strip()
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"unclosed code block at line {start + 1}")
            blocks.append((info, start + 1, lines[start - 1] if start else "", "\n".join(body)))
        i += 1
    return blocks


def _prose(text: str) -> str:
    """The text without its fenced code blocks (whose '#' comments are not headings, nor links)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose(path.read_text()).split("\n"):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def _python_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, skip reason or None, code) of each python block of a file."""
    out = []
    for info, line, before, body in _fenced_blocks(path.read_text()):
        if info == "python":
            match = NOT_RUN.match(before.strip())
            out.append((line, match.group(1) if match else None, body))
    return out


def test_slug_matches_github():
    assert _slug("The gate's gradient (`model.gate_score`)") == "the-gates-gradient-modelgate_score"
    assert _slug("Headline results (measured)") == "headline-results-measured"
    assert _slug("`advmoe bench` (`benchmarks/bench_models.py`)") == "advmoe-bench-benchmarksbench_modelspy"


def test_block_parser_sees_skip_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("a\n<!-- not run: needs a GPU -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n")
    assert _python_blocks(page) == [(3, "needs a GPU", "x = 1"), (7, None, "y = 2")]
    page.write_text("```python\nx = 1\n")
    with pytest.raises(AssertionError, match="unclosed"):
        _python_blocks(page)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _broken_links(path: Path) -> list[str]:
    """Relative links of the page whose file (or folder) does not exist, or whose #anchor names no heading."""
    broken = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {_shown(resolved)}")
    return broken


@pytest.mark.parametrize("path", LINK_FILES, ids=_shown)
def test_relative_links_resolve(path):
    """Every relative link of the page points to a file or folder that exists, and to a heading that exists."""
    assert not _broken_links(path), f"{_shown(path)}: broken links: {_broken_links(path)}"


def test_link_checker_catches_a_missing_target(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](missing.md) [gone](#nothing) [web](https://example.org/x)\n")
    assert _broken_links(page) == ["missing.md: no such file", f"#nothing: no heading with that anchor in {page}"]


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command (the last line of the README's first bash block)."""
    readme_bash = [body for info, _, _, body in _fenced_blocks((ROOT / "README.md").read_text()) if info == "bash"]
    commands = [line for line in readme_bash[0].split("\n") if line and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("advmoe demo"), commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text().split("\n")


@pytest.mark.parametrize("path", RUN_FILES, ids=_shown)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    """The page's python blocks run in order in one namespace; skipped blocks name their reason."""
    blocks = _python_blocks(path)
    if not any(reason is None for _, reason, _ in blocks):
        pytest.skip(f"{path.name}: no runnable python block")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{path.stem}"}
    for line, reason, code in blocks:
        if reason is None:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
