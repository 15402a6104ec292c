"""Every reference to the mathematics ("theory.md 5.4", "theory 6.3", "theory.md 4.5-4.6") in the
code, the tests, the benchmarks, the configs and the README names a section that exists in the
repository's own docs/theory.md, and no file points outside the repository for it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
SCANNED = ["ncfast", "tests", "bench", "csrc", "configs", "docs"]
SUFFIXES = {".py", ".md", ".cpp", ".cu", ".h", ".sh", ".yaml", ".toml"}

# "theory.md 4.2", "theory 6.3", "Theory.md 4.5-4.6", "theory.md 5.2, 5.3, 5.6", "theory.md 3-4"
_NUMBER = r"\d+(?:\.\d+)?"
_REFERENCE = re.compile(
    rf"\btheory(?:\.md)?(?:'s)?\s+§?({_NUMBER}(?:\s*(?:-|,|and)\s*{_NUMBER})*)",
    re.IGNORECASE,
)
_HEADING = re.compile(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", re.MULTILINE)


def sections(text: str) -> set[str]:
    """Section numbers of a markdown file's '## N.' and '### N.M' headings."""
    return set(_HEADING.findall(text))


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line, section) for every section number cited after 'theory' / 'theory.md' in ``text``."""
    found = []
    for match in _REFERENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        for number in re.findall(_NUMBER, match.group(1)):
            found.append((line, number.rstrip(".")))
    return found


def dangling(text: str, known: set[str]) -> list[tuple[int, str]]:
    return [(line, s) for line, s in cited_sections(text) if s not in known]


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SCANNED:
        files += [p for p in sorted((ROOT / folder).rglob("*"))
                  if p.suffix in SUFFIXES and p.is_file() and p != Path(__file__).resolve()]
    return files


def test_theory_md_has_the_expected_sections():
    known = sections(THEORY.read_text())
    assert {"1", "2.1", "3.3", "4.2", "4.8", "5.3", "5.6", "5.9", "6.3", "7.6"} <= known


def test_every_theory_reference_names_an_existing_section():
    known = sections(THEORY.read_text())
    problems = []
    cited = 0
    for path in scanned_files():
        text = path.read_text(errors="replace")
        cited += len(cited_sections(text))
        problems += [f"{path.relative_to(ROOT)}:{line}: theory.md {s}"
                     for line, s in dangling(text, known)]
    assert cited > 50, "the reference pattern no longer finds the code's citations"
    assert problems == [], "references to sections docs/theory.md does not have:\n" + "\n".join(
        problems)


def test_no_file_points_outside_the_repository_for_its_docs():
    # A relative path that climbs above the repository root, or an absolute path into the
    # development machine's workspace, is something a user's copy does not have.
    climbing = re.compile(r"(?:\.\./)+[\w.-]+")
    workspace = re.compile(r"/work/\w")
    hits = []
    for p in scanned_files() + [ROOT / "Makefile"]:
        text = p.read_text(errors="replace")
        outside = [m for m in climbing.findall(text)
                   if not (p.parent / m).resolve().is_relative_to(ROOT.resolve())]
        if outside or workspace.search(text):
            hits.append(f"{p.relative_to(ROOT)}: {outside or workspace.search(text).group()}")
    assert hits == []


def test_readme_links_resolve_to_files():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert "docs/theory.md" in local
    assert [t for t in local if not (ROOT / t).exists()] == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("see theory.md 5.4 and theory 6.3", []),
        ("see theory.md 5.10", [(1, "5.10")]),
        ("x\n(theory.md 4.5-4.9)", [(2, "4.9")]),
        ("Theory.md 4.4, then theory.md 2.1, 9.2", [(1, "9.2")]),
        ("theory.md 3-4 and theory.md 8", [(1, "8")]),
    ],
    ids=["existing", "missing-subsection", "range-end", "list", "whole-section"],
)
def test_dangling_references_are_found(text, expected):
    known = {"2.1", "3", "4", "4.4", "4.5", "5.4", "6.3"}
    assert dangling(text, known) == expected
